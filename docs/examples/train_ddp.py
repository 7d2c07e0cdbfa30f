"""train.py for several processes: the launcher starts one copy per GPU (or per CPU process).

Launch with `accelerate launch --multi_gpu --num_processes 8 train.py` on a GPU machine,
`torchrun --standalone --nproc_per_node 2 train.py` for a check on CPUs, or `python train.py`.
"""

import os
import sys

import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification, HfArgumentParser

from hf_ssam import SSAMTrainer, SSAMTrainingArguments

defaults = ["--output_dir", "outputs/ddp", "--max_steps", "6", "--per_device_train_batch_size", "8",
            "--learning_rate", "1e-3", "--logging_steps", "3", "--save_strategy", "no",
            "--report_to", "none"]  # fmt: skip
if not torch.cuda.is_available():
    defaults.append("--use_cpu")  # without it, the Trainer runs CPU-only processes as independent single runs
(args,) = HfArgumentParser(SSAMTrainingArguments).parse_args_into_dataclasses(defaults + sys.argv[1:])

torch.manual_seed(0)  # same initial weights on every replica (DDP also broadcasts them)
config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
model = BertForSequenceClassification(config)
gen = torch.Generator().manual_seed(0)
input_ids = torch.randint(1, 128, (128, 16), generator=gen).tolist()
data = Dataset.from_dict({"input_ids": input_ids, "labels": [0, 1] * 64})

trainer = SSAMTrainer(model=model, args=args, train_dataset=data)  # each process gets its own shard of every batch
trainer.train()

# Every replica applied the same averaged SAM gradient: the weights are identical everywhere.
checksum = sum(p.detach().double().sum() for p in model.parameters()).reshape(1)
checksums = trainer.accelerator.gather(checksum.to(trainer.accelerator.device))
assert torch.allclose(checksums, checksums[0]), checksums
if trainer.is_world_process_zero():
    print(f"{args.world_size} process(es), sam_sync_ascent={args.sam_sync_ascent}: replicas identical")

if torch.distributed.is_initialized():  # tear the process group down on every rank before exiting
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    # DDP's reducer still holds the process group, and a gloo worker thread that frees its last collective during
    # interpreter shutdown aborts the exit after the work is done (pytorch/pytorch#179291): skip that shutdown.
    sys.stdout.flush()
    os._exit(0)
