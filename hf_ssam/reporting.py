"""What a Trainer run reports about its SAM steps: the `sam/*` log keys and the model card's section.

The metrics are summed on the device, step after step, and read on the host only when a log is written.
"""

from __future__ import annotations

from typing import Any

import torch

from .functional import uses_renormalization

__all__ = ["CARD_HEADING", "METRIC_NAMES", "MetricsAccumulator", "REUSE_METRIC", "model_card_section"]

#: Keys added to the training logs, averaged over each logging window (``sam/skipped`` is a count).
METRIC_NAMES: tuple[str, ...] = (
    "sam/grad_norm",
    "sam/ascent_grad_norm",
    "sam/gamma",
    "sam/ascent_loss",
    "sam/skipped",
)
#: Added with ``sam_reuse``: the fraction of the optimizer steps since the last log that used the reused direction.
REUSE_METRIC = "sam/reused"
# Row layout of the on-device sums: SAM micro-batches' quantities, then every micro-batch's step share.
_GRAD_NORM, _ASCENT_GRAD_NORM, _GAMMA, _ASCENT_LOSS, _SKIPPED, _MICRO_BATCHES, _STEPS, _ALL_STEPS, _REUSED = range(9)


class MetricsAccumulator:
    """Sums of the per-micro-batch SAM quantities since the last log, kept on the device (no host sync)."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None
        self.tracks_reuse = False  # report `sam/reused` (steps between SAM steps are counted with `count_step`)

    def add(self, grad_norm, ascent_grad_norm, gamma, ascent_loss, skipped, k: int) -> None:
        """One micro-batch of an optimizer step over ``k`` micro-batches: ‖g‖, ‖g_asc‖, γ, L(w + e), skipped."""
        device = grad_norm.device
        dtype = torch.float32 if device.type == "mps" else torch.float64  # float64: exact logs for small norms
        row = torch.stack(
            [
                grad_norm.to(dtype),
                ascent_grad_norm.to(dtype),
                gamma.to(device, dtype),
                ascent_loss.detach().to(device, dtype),
                skipped.to(device, dtype),
                torch.ones((), device=device, dtype=dtype),
                torch.full((), 1.0 / k, device=device, dtype=dtype),
                torch.full((), 1.0 / k, device=device, dtype=dtype),
                torch.zeros((), device=device, dtype=dtype),
            ]
        )
        self.sums = row if self.sums is None else self.sums + row

    def count_step(self, k: int, device: torch.device, reused: torch.Tensor | None = None) -> None:
        """One micro-batch of a step that is not a SAM step: plain, or reusing the SAM direction (``reused`` says
        whether it was used; a reuse step that could not use it counts as skipped)."""
        dtype = torch.float32 if device.type == "mps" else torch.float64
        row = torch.zeros(9, device=device, dtype=dtype)
        row[_ALL_STEPS] = 1.0 / k
        if reused is not None:
            used = reused.to(device, dtype)
            row[_REUSED] = used / k
            row[_SKIPPED] = 1.0 - used
        self.sums = row if self.sums is None else self.sums + row

    def clear(self) -> None:
        self.sums = None

    def pop(self, accelerator: Any, device: torch.device) -> dict[str, float]:
        """The averages since the last call, over micro-batches and processes (this is where the host waits)."""
        sums, self.sums = self.sums, None
        if sums is None:
            return {}
        world = 1 if accelerator is None else accelerator.num_processes
        if accelerator is not None:
            sums = accelerator.reduce(sums.to(device), reduction="mean")
        n, steps = sums[_MICRO_BATCHES].item(), sums[_STEPS].item()
        reuse = {REUSE_METRIC: sums[_REUSED].item() / sums[_ALL_STEPS].item()} if self.tracks_reuse else {}
        if n == 0:  # only steps between SAM steps in this window
            return {"sam/skipped": sums[_SKIPPED].item() * world, **reuse}
        return {
            **reuse,
            "sam/grad_norm": sums[_GRAD_NORM].item() / n,
            "sam/ascent_grad_norm": sums[_ASCENT_GRAD_NORM].item() / n,
            "sam/gamma": sums[_GAMMA].item() / n,
            "sam/ascent_loss": sums[_ASCENT_LOSS].item() / steps,
            "sam/skipped": sums[_SKIPPED].item() * world,
        }


#: The heading of the section `model_card_section` writes (the card gets it once).
CARD_HEADING = "### Sharpness-aware training"
_SSAM_CITATION = """@article{tan2024stabilizing,
  title   = {Stabilizing Sharpness-aware Minimization Through A Simple Renormalization Strategy},
  author  = {Tan, Chengli and Zhang, Jiangshe and Liu, Junmin and Wang, Yicheng and Hao, Yunda},
  journal = {arXiv preprint arXiv:2401.07250},
  year    = {2024}
}"""


def model_card_section(args: Any) -> str:
    """The model card's section on the SAM-family step (appended after the Trainer's own card)."""
    if not args.sam_enabled:
        return f"\n{CARD_HEADING}\n\nTrained with hf_ssam, sam_variant='none' (plain training, no SAM step).\n"
    renormalize = uses_renormalization(args.sam_variant, args.sam_renormalize)
    return (
        f"\n{CARD_HEADING}\n\n"
        "Trained with a two-pass sharpness-aware step (hf_ssam) around the optimizer listed above:\n"
        f"- sam_variant: {args.sam_variant}\n"
        f"- sam_rho: {args.sam_rho}\n"
        f"- renormalization (g_asc rescaled to ‖g‖): {renormalize}\n"
        f"- ascent mode: {'synchronized (global-batch g)' if args.sam_sync_ascent else 'local (per-replica g)'}\n"
        f"- sam_interval: {args.sam_interval}\n"
        + (f"- sam_start: {args.sam_start}\n" if args.sam_start else "")
        + (f"- sam_reuse: True (sam_reuse_alpha: {args.sam_reuse_alpha})\n" if args.sam_reuse else "")
        + (f"- sam_asam_eta: {args.sam_asam_eta}\n" if args.sam_variant == "asam" else "")
        + f"\nSSAM (Tan et al., 2024):\n\n```bibtex\n{_SSAM_CITATION}\n```\n"
    )
