"""SSAM with the Hugging Face Trainer: swap two class names, keep everything else."""

import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification

from hf_ssam import SSAMTrainer, SSAMTrainingArguments

# A tiny randomly initialised model and a toy data set, so that this runs offline in seconds.
# In real use: AutoModelForSequenceClassification.from_pretrained(...) and your tokenized data set.
config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
model = BertForSequenceClassification(config)
gen = torch.Generator().manual_seed(0)
train_dataset = Dataset.from_dict(
    {"input_ids": torch.randint(1, 128, (64, 16), generator=gen).tolist(), "labels": [0, 1] * 32}
)

args = SSAMTrainingArguments(  # was: TrainingArguments
    output_dir="outputs/quickstart",
    sam_variant="ssam",  # "sam" (SAM*), "usam" (SAM), "asam", or "none" for plain training
    sam_rho=0.05,
    max_steps=8,
    per_device_train_batch_size=16,
    learning_rate=1e-3,
    logging_steps=4,
    report_to="none",
)
trainer = SSAMTrainer(model=model, args=args, train_dataset=train_dataset)  # was: Trainer
trainer.train()
print({k: v for k, v in trainer.state.log_history[-2].items() if k.startswith("sam/")})
