"""Pieces shared by the recipes: YAML + command-line arguments, classification metrics, run summaries.

Not part of the ``hf_ssam`` package: the recipes are scripts that use the package; this module sits next to them
in the ``recipes`` package.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import time
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from datasets import DatasetDict
from transformers import HfArgumentParser

__all__ = [
    "CONFIG_DIR",
    "NONE_WORDS",
    "argmax_logits",
    "classification_metrics",
    "load_config",
    "make_compute_metrics",
    "parse_recipe_args",
    "train_and_evaluate",
    "train_validation_splits",
]

logger = logging.getLogger(__name__)

#: Folder of the YAML configs shipped with the recipes.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
#: Command-line values that unset an option whose default may be None (``--depth none``).
NONE_WORDS = ("none", "null")


def load_config(path: str | Path, parser: HfArgumentParser) -> dict[str, Any]:
    """Read a YAML config and check that every key is an option of ``parser``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config {path} does not exist or is not a file.")
    with path.open(encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise ValueError(f"--config {path} must hold a mapping of option: value, got {type(config).__name__}.")
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"--config {path} has keys that are not options of this recipe: {unknown}.")
    return config


class _OrNone:
    """argparse ``type``: ``none``/``null`` give None, anything else is converted by ``convert``."""

    def __init__(self, convert: Callable[[str], Any]) -> None:
        self.convert = convert
        self.__name__ = f"{getattr(convert, '__name__', 'value')} or none"

    def __call__(self, text: str) -> Any:
        return None if text.strip().lower() in NONE_WORDS else self.convert(text)


def _nullable_fields(dataclass_types: Sequence[type]) -> set[str]:
    """Fields typed ``X | None`` of the recipe's own dataclasses (not of the training arguments)."""
    from transformers import TrainingArguments

    names = set()
    for dataclass_type in dataclass_types:
        if issubclass(dataclass_type, TrainingArguments):
            continue
        hints = typing.get_type_hints(dataclass_type)
        for field in dataclasses.fields(dataclass_type):
            if type(None) in typing.get_args(hints[field.name]):
                names.add(field.name)
    return names


def _build_parser(dataclass_types: Sequence[type], **kwargs: Any) -> HfArgumentParser:
    """``HfArgumentParser`` of ``dataclass_types`` plus ``--config``; ``--option none`` unsets nullable options."""
    parser = HfArgumentParser(dataclass_types, **kwargs)
    parser.add_argument(
        "--config",
        default=None,
        help="YAML file of options; command-line options override it. Without it the recipe's offline default "
        "config is read, unless an option choosing the model or the data is given; 'none' reads no file.",
    )
    nullable = _nullable_fields(dataclass_types)
    for action in parser._actions:
        if action.dest in nullable and action.nargs is None and action.type in (int, float, str):
            action.type = _OrNone(action.type)
    return parser


def options_given(dataclass_types: Sequence[type], argv: Sequence[str]) -> dict[str, Any]:
    """The options that ``argv`` sets (abbreviations included), by field name (and ``config``), with their values."""
    probe = _build_parser(dataclass_types, add_help=False)
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    namespace, _ = probe.parse_known_args(list(argv))
    return vars(namespace)


def parse_recipe_args(
    dataclass_types: Sequence[type],
    argv: Sequence[str] | None,
    default_config: Path,
    selectors: Sequence[str],
) -> tuple[Any, ...]:
    """Parse ``--config file.yaml`` plus command-line options into ``dataclass_types``.

    The YAML file gives the defaults and every option given on the command line wins over it. Without ``--config``
    the recipe's offline default ``default_config`` is read only when none of ``selectors`` (the options that
    choose the model or the data) is given; otherwise the dataclasses' own defaults apply, so that a model or data
    set named on the command line is not shaped by the offline run's settings; ``--config none`` reads no file at
    all. Options of the recipe's own
    dataclasses that default to None accept ``none`` (``--depth none``) to unset a value a config gives.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser(dataclass_types)
    given = options_given(dataclass_types, argv)
    config = given.get("config")
    if config is None and not given.keys() & set(selectors):
        config = default_config
        options = ", ".join(f"--{name}" for name in selectors)
        logger.info("No --config and none of %s given: reading the offline default %s", options, config)
    if config is not None and str(config).strip().lower() not in NONE_WORDS:
        parser.set_defaults(**load_config(config, parser))
    *outputs, _namespace = parser.parse_args_into_dataclasses(args=argv)
    return tuple(outputs)


def classification_metrics(predictions: np.ndarray, labels: np.ndarray, num_labels: int) -> dict[str, float]:
    """Accuracy, plus F1 of the positive class (label 1) when there are two classes. Plain numpy."""
    predictions = np.asarray(predictions).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} differ in shape.")
    metrics = {"accuracy": float((predictions == labels).mean()) if labels.size else float("nan")}
    if num_labels == 2:
        tp = float(np.sum((predictions == 1) & (labels == 1)))
        fp = float(np.sum((predictions == 1) & (labels != 1)))
        fn = float(np.sum((predictions != 1) & (labels == 1)))
        metrics["f1"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else 0.0
    return metrics


def _evaluate_metrics(num_labels: int) -> Callable[[np.ndarray, np.ndarray], dict[str, float]] | None:
    """The same metrics through the ``evaluate`` library, or None where it cannot load them (offline)."""
    try:
        import evaluate

        accuracy = evaluate.load("accuracy")
        f1 = evaluate.load("f1") if num_labels == 2 else None
    except Exception:  # noqa: BLE001 - offline, missing package or hub error: fall back to numpy
        return None

    def compute(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        out = {"accuracy": float(accuracy.compute(predictions=predictions, references=labels)["accuracy"])}
        if f1 is not None:
            out["f1"] = float(f1.compute(predictions=predictions, references=labels)["f1"])
        return out

    return compute


def make_compute_metrics(num_labels: int, backend: str = "auto") -> Callable[[Any], dict[str, float]]:
    """A ``compute_metrics`` for the Trainer; predictions are class ids (see ``argmax_logits``).

    ``backend``: ``"evaluate"`` (the ``evaluate`` library, which loads its metric scripts from the Hub),
    ``"numpy"`` (:func:`classification_metrics`), or ``"auto"`` (``evaluate`` where it loads, else numpy).
    """
    if backend not in ("auto", "evaluate", "numpy"):
        raise ValueError(f"--metrics_backend {backend} is not one of ['auto', 'evaluate', 'numpy'].")
    compute = None if backend == "numpy" else _evaluate_metrics(num_labels)
    if compute is None and backend == "evaluate":
        raise ValueError(
            "--metrics_backend evaluate: evaluate.load('accuracy') failed (it needs the Hugging Face Hub); "
            "use --metrics_backend numpy or auto offline."
        )
    if compute is None:

        def compute(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
            return classification_metrics(predictions, labels, num_labels)

    def compute_metrics(eval_prediction: Any) -> dict[str, float]:
        predictions, labels = eval_prediction.predictions, eval_prediction.label_ids
        if isinstance(predictions, tuple):
            predictions = predictions[0]
        return compute(np.asarray(predictions).reshape(-1), np.asarray(labels).reshape(-1))

    return compute_metrics


def argmax_logits(logits: Any, labels: Any) -> Any:
    """``preprocess_logits_for_metrics``: keep class ids only, so evaluation does not gather all logits."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def train_validation_splits(
    raw: Any,
    validation_names: Sequence[str],
    validation_percentage: float,
    seed: int,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> DatasetDict:
    """``train`` plus the first of ``validation_names`` found in ``raw``, or a seeded share of train.

    ``max_train_samples`` / ``max_eval_samples`` keep a random (seeded) subset of each split.
    """
    if "train" not in raw:
        raise ValueError(f"The data set has no train split (splits: {list(raw)}).")
    validation = next((name for name in validation_names if name in raw), None)
    if validation is None:
        if not 0.0 < validation_percentage < 100.0:
            raise ValueError(f"--validation_split_percentage {validation_percentage} must lie in (0, 100).")
        parts = raw["train"].train_test_split(test_size=validation_percentage / 100, seed=seed)
        splits = DatasetDict(train=parts["train"], validation=parts["test"])
    else:
        splits = DatasetDict(train=raw["train"], validation=raw[validation])
    for split, limit in (("train", max_train_samples), ("validation", max_eval_samples)):
        if limit is not None:
            splits[split] = splits[split].shuffle(seed=seed).select(range(min(limit, len(splits[split]))))
    return splits


def train_and_evaluate(trainer: Any) -> dict[str, Any]:
    """Train (resuming if asked), save model, metrics and state, evaluate; return a summary.

    The summary holds ``eval`` (final validation metrics), ``train_loss`` (the last logged training loss),
    ``wall_time_s`` (training wall time) and ``log_history`` (the Trainer's logs, ``sam/*`` keys included).
    """
    start = time.perf_counter()
    train_result = trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    wall_time = time.perf_counter() - start
    trainer.save_model()
    trainer.create_model_card()  # the Trainer's card (over PEFT's template) with the SAM settings appended
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()
    eval_metrics = trainer.evaluate()
    trainer.log_metrics("eval", eval_metrics)
    trainer.save_metrics("eval", eval_metrics)
    history = trainer.state.log_history
    losses = [row["loss"] for row in history if "loss" in row and math.isfinite(row["loss"])]
    return {
        "eval": eval_metrics,
        "train_loss": losses[-1] if losses else float("nan"),
        "wall_time_s": wall_time,
        "log_history": history,
    }
