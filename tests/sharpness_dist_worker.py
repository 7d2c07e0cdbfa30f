"""Worker for tests/test_sharpness.py: SSAMTrainer under DDP with a SharpnessCallback; saves what each rank logged.

    torchrun --standalone --nproc_per_node 2 tests/sharpness_dist_worker.py --out /tmp/s

Each rank gives the callback batches of its own (seeded by the rank), so the ranks log equal values only because
the callback broadcasts rank 0's. Writes <out>/rank<r>.json: the logged sharpness rows, the values this rank
measures on its own batches at the final weights, and the world size.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from _teardown import leave  # tests/, the script's own folder
from torch import nn
from torch.utils.data import Dataset

from hf_ssam import SSAMTrainer, SSAMTrainingArguments
from hf_ssam.sharpness import SharpnessCallback


class Regression(Dataset):
    def __init__(self, n: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x[:, 0] - 2 * self.x[:, 1] + 0.1 * torch.randn(n, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x, labels=None):
        return {"loss": ((self.net(x).squeeze(-1) - labels) ** 2).mean()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = parser.parse_args().out
    torch.set_num_threads(1)
    args = SSAMTrainingArguments(
        output_dir=os.path.join(out, "run"), report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
        max_steps=4, logging_steps=2, eval_strategy="steps", eval_steps=2, per_device_train_batch_size=8,
        learning_rate=0.05, sam_variant="ssam", sam_rho=0.1, seed=0,
    )  # fmt: skip
    data = Regression()
    own = Regression(n=16, seed=10 + args.process_index)  # different batches on each rank
    batches = [{"x": own.x[:8], "labels": own.y[:8]}, {"x": own.x[8:], "labels": own.y[8:]}]
    callback = SharpnessCallback(batches, k=2)
    trainer = SSAMTrainer(model=MLP(), args=args, train_dataset=data, eval_dataset=data, callbacks=[callback])
    callback.bind(trainer)
    trainer.train()
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    logged = [
        {k: v for k, v in row.items() if k.startswith("sharpness/")}
        for row in trainer.state.log_history
        if "sharpness/sam_rho" in row
    ]
    local = callback.measure(trainer.model, 0.1)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"world_size": world, "logged": logged, "local": local}, f)


if __name__ == "__main__":
    main()
    leave()
