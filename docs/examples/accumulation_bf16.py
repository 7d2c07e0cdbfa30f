"""Gradient accumulation, bf16 and BatchNorm with SSAMTrainer: nothing to change in the training script."""

import torch
from datasets import Dataset
from transformers import ResNetConfig, ResNetForImageClassification

from hf_ssam import SSAMTrainer, SSAMTrainingArguments

config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=4)
model = ResNetForImageClassification(config)  # BatchNorm in every block
gen = torch.Generator().manual_seed(0)
data = Dataset.from_dict(
    {"pixel_values": torch.randn(48, 3, 16, 16, generator=gen).tolist(), "labels": [0, 1, 2, 3] * 12}
)

args = SSAMTrainingArguments(
    output_dir="outputs/accumulation-bf16",
    sam_variant="ssam",
    sam_rho=0.05,
    per_device_train_batch_size=4,
    gradient_accumulation_steps=2,  # SAM runs per micro-batch; the step averages the micro-batch SAM gradients
    bf16=True,  # autocast; no loss scaler needed. On GPUs without bf16 use fp16=True (loss scaling is handled)
    use_cpu=not torch.cuda.is_available(),  # transformers wants this for bf16 on a CPU-only machine
    max_steps=3,
    learning_rate=0.05,
    optim="sgd",
    save_strategy="no",
    report_to="none",
)
trainer = SSAMTrainer(model=model, args=args, train_dataset=data)
trainer.train()

# 3 optimizer steps x 2 micro-batches = 6 forward passes that update the running statistics:
# the second (descent) pass of each micro-batch leaves them alone.
bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
assert bn.num_batches_tracked.item() == 6, bn.num_batches_tracked
print("BatchNorm updates:", bn.num_batches_tracked.item())
