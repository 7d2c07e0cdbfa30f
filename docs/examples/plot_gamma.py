"""Plot the renormalization factor γ over training from trainer.state.log_history (cf. Figure 3 of the paper)."""

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt
import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification

from hf_ssam import SSAMTrainer, SSAMTrainingArguments

gen = torch.Generator().manual_seed(0)
data = Dataset.from_dict({"input_ids": torch.randint(1, 128, (96, 16), generator=gen).tolist(), "labels": [0, 1] * 48})
config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)

for rho in (0.05, 0.2):
    torch.manual_seed(0)
    args = SSAMTrainingArguments(
        output_dir=f"outputs/gamma-rho{rho}",
        sam_variant="usam",  # γ is logged for every variant; the paper's Figure 3 shows SAM (usam)
        sam_rho=rho,
        max_steps=12,
        per_device_train_batch_size=16,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
    )
    trainer = SSAMTrainer(model=BertForSequenceClassification(config), args=args, train_dataset=data)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "sam/gamma" in entry]
    plt.plot([e["step"] for e in logs], [e["sam/gamma"] for e in logs], label=f"ρ = {rho}")

plt.xlabel("optimizer step")
plt.ylabel("γ = ‖g‖ / ‖g_asc‖")
plt.legend()
plt.savefig("gamma.png")
print("wrote gamma.png")
