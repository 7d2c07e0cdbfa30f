"""Resuming from a checkpoint continues exactly as the uninterrupted run."""

import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification

from hf_ssam import SSAMTrainer, SSAMTrainingArguments

gen = torch.Generator().manual_seed(0)
data = Dataset.from_dict({"input_ids": torch.randint(1, 128, (64, 16), generator=gen).tolist(), "labels": [0, 1] * 32})
config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def make_trainer() -> SSAMTrainer:
    args = SSAMTrainingArguments(
        output_dir="outputs/resume",
        sam_variant="ssam",
        sam_rho=0.05,
        max_steps=6,
        save_steps=3,  # checkpoint-3 and checkpoint-6
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        report_to="none",
    )
    torch.manual_seed(0)
    return SSAMTrainer(model=BertForSequenceClassification(config), args=args, train_dataset=data)


uninterrupted = make_trainer()
uninterrupted.train()

resumed = make_trainer()
resumed.train(resume_from_checkpoint="outputs/resume/checkpoint-3")  # or resume_from_checkpoint=True: the latest

for a, b in zip(uninterrupted.model.parameters(), resumed.model.parameters()):
    torch.testing.assert_close(a, b)
print("resumed run == uninterrupted run")
