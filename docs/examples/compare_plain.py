"""A/B runs from one script: the same training with and without SAM (sam_variant="none")."""

import sys

import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification

from hf_ssam import SSAMTrainer, SSAMTrainingArguments

gen = torch.Generator().manual_seed(0)
ids = torch.randint(1, 128, (64, 16), generator=gen)
data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] % 2).tolist()})
config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)

variants = sys.argv[1:] or ["none", "ssam"]  # e.g. python compare_plain.py none sam usam ssam asam
for variant in variants:
    args = SSAMTrainingArguments(
        output_dir=f"outputs/compare-{variant}",
        sam_variant=variant,
        sam_rho=0.5 if variant == "asam" else 0.05,
        max_steps=8,
        per_device_train_batch_size=16,
        learning_rate=1e-3,
        save_strategy="no",
        report_to="none",
        seed=0,
    )
    torch.manual_seed(0)
    trainer = SSAMTrainer(model=BertForSequenceClassification(config), args=args, train_dataset=data)
    result = trainer.train()
    print(f"{variant:>5}: train loss {result.training_loss:.4f}, {result.metrics['train_runtime']:.2f} s")
