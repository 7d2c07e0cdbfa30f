"""Worker for tests/test_token_normalization.py: one SSAM step of a tiny GPT-2 under DDP, unequal tokens per rank.

    torchrun --standalone --nproc_per_node 2 tests/token_worker.py --out /tmp/t --runs '[{"name": "a", ...}]' ...

Each run writes <out>/<name>.rank<r>.pt: the flat weights after the step, the logs and the micro-batches the
rank trained on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.utils.data import SequentialSampler

sys.path.insert(0, os.path.dirname(__file__))
from _lm import Sequences, tiny_lm  # noqa: E402
from _teardown import leave  # noqa: E402

from hf_ssam import SSAMTrainer, SSAMTrainingArguments  # noqa: E402


class InOrder(SSAMTrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def run(out: str, spec: dict, lengths: list[int], lr: float, rho: float) -> None:
    args = SSAMTrainingArguments(
        output_dir=os.path.join(out, spec["name"]), report_to="none", use_cpu=True, save_strategy="no",
        disable_tqdm=True, logging_steps=1, max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=lr, lr_scheduler_type="constant", max_grad_norm=0.0, sam_variant="ssam", sam_rho=rho,
        sam_sync_ascent=spec["sync"], average_tokens_across_devices=spec["average_tokens"], seed=0,
    )  # fmt: skip
    model = tiny_lm()
    seen = []
    model.register_forward_pre_hook(  # the passes, not the once-per-run loss probe (which runs under no_grad)
        lambda m, a, kw: (
            seen.append((kw["input_ids"].clone(), kw["labels"].clone())) if torch.is_grad_enabled() else None
        ),
        with_kwargs=True,
    )
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    trainer = InOrder(model=model, args=args, train_dataset=Sequences(lengths), optimizers=(opt, None))
    trainer.train()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    logs = [{k: v for k, v in h.items() if k.startswith("sam/") or k == "loss"} for h in trainer.state.log_history]
    torch.save(
        {"weights": flat, "logs": logs, "micro_batches": seen[::2], "world_size": dist.get_world_size()},
        os.path.join(out, f"{spec['name']}.rank{dist.get_rank()}.pt"),
    )  # two forward passes per micro-batch: keep the first


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", required=True)
    parser.add_argument("--lengths", required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--rho", type=float, required=True)
    ns = parser.parse_args()
    torch.set_num_threads(1)
    for spec in json.loads(ns.runs):
        run(ns.out, spec, json.loads(ns.lengths), ns.lr, ns.rho)


if __name__ == "__main__":
    main()
    leave()
