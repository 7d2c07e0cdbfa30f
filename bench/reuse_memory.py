"""What `sam_reuse` costs in memory: the kept direction v, one more copy of the trainable parameters.

Each configuration trains a few steps of `SSAMTrainer` in a fresh process (its own high-water mark, measured as in
the step-cost benchmark: peak anonymous resident memory), on an MLP large enough (8.4 M parameters, 32 MiB) that
a copy of the parameters stands far above the run-to-run noise (about 1 MiB). Printed: each configuration's peak
over plain training, in units of the parameters' bytes.

```bash
python bench/reuse_memory.py            # plain, ssam every 2nd step, the same with sam_reuse (about 1 minute)
```
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

CONFIGS = {
    "plain": dict(sam_variant="none"),
    "ssam@2": dict(sam_variant="ssam", sam_interval=2),
    "ssam@2+reuse": dict(sam_variant="ssam", sam_interval=2, sam_reuse=True),
}
WIDTH, STEPS = 2048, 6


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(),
                                 nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 1))  # fmt: skip

    def forward(self, x, labels=None):
        return {"loss": ((self.net(x).squeeze(-1) - labels) ** 2).mean()}


def child(config: str) -> dict:
    from stepcost.memory import peak_memory_bytes

    from hf_ssam import SSAMTrainer, SSAMTrainingArguments

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Wide()
    data = [{"x": torch.randn(64), "labels": torch.randn(())} for _ in range(64)]
    with tempfile.TemporaryDirectory() as tmp:
        args = SSAMTrainingArguments(output_dir=tmp, report_to="none", use_cpu=True, save_strategy="no",
                                     disable_tqdm=True, max_steps=STEPS, per_device_train_batch_size=8,
                                     optim="sgd", learning_rate=1e-3, **CONFIGS[config])  # fmt: skip
        SSAMTrainer(model=model, args=args, train_dataset=data).train()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"config": config, "peak_bytes": peak_memory_bytes(), "param_bytes": param_bytes}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per configuration (min is kept)")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child)), flush=True)
        return {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024), OMP_NUM_THREADS="1")  # as bench/step_cost.py
    peaks: dict[str, int] = {}
    param_bytes = 0
    for config in CONFIGS:
        for _ in range(args.repeats):
            out = subprocess.run([sys.executable, __file__, "--child", config], capture_output=True, text=True,
                                 env=env, check=True)  # fmt: skip
            result = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
            peaks[config] = min(peaks.get(config, result["peak_bytes"]), result["peak_bytes"])
            param_bytes = result["param_bytes"]
    print(f"parameters: {param_bytes / 2**20:.1f} MiB")
    extra = {config: (peaks[config] - peaks["plain"]) / param_bytes for config in CONFIGS}
    for config in CONFIGS:
        print(
            f"{config:>14}: peak {peaks[config] / 2**20:7.1f} MiB, over plain {extra[config]:+.2f} x parameter bytes"
        )
    print(f"sam_reuse over ssam@2: {extra['ssam@2+reuse'] - extra['ssam@2']:+.2f} x parameter bytes")
    return extra


if __name__ == "__main__":
    main()
