"""train.py in the style of transformers' `*_no_trainer.py` examples, with the SAM-family step of hf_ssam.

Two lines differ from the plain Accelerate loop: `SSAMBackward` is built after `accelerator.prepare`, and it runs
in place of `accelerator.backward(loss)`. Launch with `python train.py`,
`accelerate launch --multi_gpu --num_processes 8 train.py` on a GPU machine, or
`torchrun --standalone --nproc_per_node 2 train.py` for a check on CPUs; add `--sync_ascent` for the synchronized
ascent.
"""

import argparse
import os
import sys

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification, get_scheduler

from hf_ssam import SSAMBackward

parser = argparse.ArgumentParser()
parser.add_argument("--gradient_accumulation_steps", type=int, default=2)
parser.add_argument("--max_train_steps", type=int, default=4)
parser.add_argument("--sync_ascent", action="store_true", help="perturb with the global-batch gradient")
args = parser.parse_args()

# cpu=True makes torchrun's CPU processes one multi-process job (gloo); on GPUs leave it False.
accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                          cpu=not torch.cuda.is_available())  # fmt: skip

torch.manual_seed(0)  # same initial weights on every replica (DDP also broadcasts them)
config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
model = BertForSequenceClassification(config)  # with dropout: both passes of a micro-batch draw the same masks
gen = torch.Generator().manual_seed(0)
input_ids = torch.randint(1, 128, (128, 16), generator=gen)
train_dataset = [{"input_ids": ids, "labels": torch.tensor(i % 2)} for i, ids in enumerate(input_ids)]
train_dataloader = DataLoader(train_dataset, batch_size=8, shuffle=True)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)  # the base optimizer, as usual
lr_scheduler = get_scheduler("linear", optimizer, num_warmup_steps=1, num_training_steps=args.max_train_steps)

model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
    model, optimizer, train_dataloader, lr_scheduler
)
sam_backward = SSAMBackward(  # new: after accelerator.prepare
    model, optimizer, accelerator=accelerator, variant="ssam", rho=0.05, sync_ascent=args.sync_ascent
)

completed_steps = 0
model.train()
while completed_steps < args.max_train_steps:
    for batch in train_dataloader:
        with accelerator.accumulate(model):
            # was: loss = model(**batch).loss; accelerator.backward(loss)
            loss = sam_backward(lambda: model(**batch).loss)  # noqa: B023 (the lambda runs inside this call)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)  # clips the accumulated SAM gradient
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:  # an optimizer step was taken
            completed_steps += 1
            logs = {"loss": accelerator.reduce(loss, reduction="mean").item(), **sam_backward.metrics()}
            accelerator.print(f"step {completed_steps}: " + ", ".join(f"{k} {v:.4f}" for k, v in logs.items()))
            if completed_steps >= args.max_train_steps:
                break

# Every replica applied the same averaged SAM gradient: the weights are identical everywhere.
checksum = sum(p.detach().double().sum() for p in model.parameters()).reshape(1)
checksums = accelerator.gather(checksum)
assert torch.allclose(checksums, checksums[0]), checksums
accelerator.print(f"{accelerator.num_processes} process(es), sync_ascent={args.sync_ascent}: replicas identical")

if torch.distributed.is_initialized():  # tear the process group down on every rank before exiting
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    # DDP's reducer still holds the process group, and a gloo worker thread that frees its last collective during
    # interpreter shutdown aborts the exit after the work is done (pytorch/pytorch#179291): skip that shutdown.
    sys.stdout.flush()
    os._exit(0)
