"""The names of the variants and the checks shared by the arguments and the optimizer: their one home.

Kept apart from `arguments` so that `SSAMOptimizer` (plain PyTorch loops) needs no `transformers` import, and
free of `torch`, so that `functional` can take the names from here.
"""

from __future__ import annotations

__all__ = ["NO_SAM", "VARIANTS", "VARIANT_CHOICES", "check_sam_config"]

#: The SAM-family variants: ``sam`` (SAM*, normalized), ``usam`` (SAM, unnormalized), ``asam`` (adaptive),
#: ``ssam`` (unnormalized perturbation + renormalization).
VARIANTS: tuple[str, ...] = ("ssam", "sam", "usam", "asam")

#: ``sam_variant`` value for plain single-pass training (for A/B runs from one script).
NO_SAM = "none"
#: Every accepted ``sam_variant``.
VARIANT_CHOICES: tuple[str, ...] = (*VARIANTS, NO_SAM)


def check_sam_config(
    variant: str, rho: float, renormalize: bool | None, asam_eta: float, *, prefix: str = "sam_"
) -> None:
    """Raise a ``ValueError`` naming the field, the value and the allowed values for a bad setting.

    Shared by `SSAMTrainingArguments` (``prefix="sam_"``) and `SSAMOptimizer` (``prefix=""``, for the constructor's
    settings and for every parameter group's). Both refuse exactly the same Python values, with one difference in
    what reaches this check: `SSAMTrainingArguments.check_sam_settings` first converts a string ``sam_rho`` or
    ``sam_asam_eta`` that spells a number (``"5e-2"``: the command line gives strings and YAML reads ``5e-2`` as
    one) to a float, and checks the float. `SSAMOptimizer` converts nothing: a string ``rho`` or ``asam_eta`` is
    refused here, with a message saying it is a string.
    """
    if variant not in VARIANT_CHOICES:
        raise ValueError(f"{prefix}variant={variant!r} is not supported; choose one of {list(VARIANT_CHOICES)}.")
    if not _is_finite_non_negative(rho):
        raise ValueError(f"{prefix}rho={rho!r} is invalid; it must be a finite number >= 0{_not_a_number(rho)}.")
    if renormalize is not None and not isinstance(renormalize, bool):  # 0/1 would compare equal to False/True
        raise ValueError(
            f"{prefix}renormalize={renormalize!r} is invalid; choose one of [None, True, False] (a bool, not "
            f"{type(renormalize).__name__})."
        )
    if variant == "ssam" and renormalize is False:
        raise ValueError(
            f"{prefix}renormalize=False contradicts {prefix}variant='ssam' (SSAM is usam + renormalization); "
            f"use {prefix}variant='usam' for the unnormalized perturbation without renormalization, "
            f"or {prefix}renormalize=None/True."
        )
    if not _is_finite_non_negative(asam_eta):
        raise ValueError(
            f"{prefix}asam_eta={asam_eta!r} is invalid; it must be a finite number >= 0{_not_a_number(asam_eta)}."
        )


def _is_finite_non_negative(value: object) -> bool:
    """A real number in [0, ∞): bools (``rho=True``), strings, NaN and ∞ are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return 0 <= value < float("inf")


def _not_a_number(value: object) -> str:
    """What to add to the message when ``value`` is not an int or float at all (empty for a bad number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f" (an int or float, not {type(value).__name__})"
    return ""
