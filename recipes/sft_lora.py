"""Supervised fine-tuning of a causal language model with a LoRA adapter and SSAM, through TRL's ``SFTTrainer``.

The trainer is ``class SSAMSFTTrainer(SSAMMixin, SFTTrainer)`` and its arguments are ``sam_arguments(SFTConfig)``
(every ``trl.SFTConfig`` option plus ``sam_*``). The adapter is a PEFT ``LoraConfig`` handed to ``SFTTrainer``
(``--use_peft``, ``--lora_r``, ``--lora_alpha``, ``--lora_dropout``, ``--lora_target_modules``, TRL's option
names): only the adapter weights are perturbed and trained, the base model stays frozen. Reported: the last
training loss, the validation loss and perplexity, and the training wall time, for each variant run.

Model and data: any ``AutoModelForCausalLM`` folder or Hub id (``--model_name_or_path``) and any Hugging Face
data set that ``SFTTrainer`` accepts (``--dataset_name``: a ``text`` column, or conversational ``messages``, or
``prompt``/``completion``), or the offline default, which downloads nothing:

* data ``sklearn-descriptions``: the dataset descriptions that ship inside the ``scikit-learn`` package
  (``sklearn/datasets/descr/*.rst``: iris, digits, wine, twenty newsgroups, ... about 5k words of English), with
  reStructuredText markup, headings, tables and code examples removed, cut into sentences (4 words or more, 247 of
  them) and split 80/20;
* model ``tiny-llama``: a 2-layer Llama (width 128) built from a config with random weights (standard deviation
  0.1), and a word-level tokenizer (lower-cased words and punctuation seen twice or more in the training
  sentences, from the ``tokenizers`` library) built from the training split. The base model is not pretrained, so
  the run shows the mechanics (a LoRA adapter trained with SSAM next to plain AdamW), not a real model's quality.

Offline default (``recipes/configs/sft_lora_tiny_ssam.yaml``: both ``none`` and ``ssam``, 200 steps each, a markdown
table at the end; 34 s on 2 CPU cores, validation perplexity 67.7 with AdamW and 64.8 with SSAM,
``docs/recipes.md``)::

    python recipes/sft_lora.py
    python recipes/sft_lora.py --compare false                        # the ssam run only
    python -m recipes.sft_lora --help                                 # the same script as a module

A model and a data set from the Hub, on a GPU (``recipes/configs/sft_lora_ssam.yaml``: Qwen2.5-0.5B on Capybara)::

    python recipes/sft_lora.py --config recipes/configs/sft_lora_ssam.yaml
    python recipes/sft_lora.py --config recipes/configs/sft_lora_ssam.yaml --compare true   # AdamW baseline too
    python recipes/sft_lora.py --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name stanfordnlp/imdb \\
        --max_length 512 --learning_rate 2e-4 --sam_rho 0.05 --output_dir outputs/sft_imdb

Several GPUs (DDP; DeepSpeed and FSDP are refused with SAM)::

    accelerate launch --multi_gpu --num_processes 8 recipes/sft_lora.py --config recipes/configs/sft_lora_ssam.yaml

Options: those of ``SSAMSFTConfig`` and of the dataclasses below, from ``--config file.yaml`` and the command line
(the command line wins). The offline default config is read only when neither ``--config`` nor an option choosing
the model or the data (``--model_name_or_path``, ``--dataset_name``, ``--dataset_config_name``) is given, so a Hub
run keeps ``SFTConfig``'s own defaults (bf16 and gradient checkpointing where the hardware has them) instead of the
CPU settings of the offline run. ``--config none`` reads no file.
"""

from __future__ import annotations

import copy
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    set_seed,
)
from trl import SFTConfig, SFTTrainer

from hf_ssam import SSAMMixin, sam_arguments

if __package__:  # imported as recipes.sft_lora, or run with python -m recipes.sft_lora
    from ._recipe_utils import CONFIG_DIR, parse_recipe_args, train_and_evaluate, train_validation_splits
else:  # run as a file, python recipes/sft_lora.py: Python puts this folder first on the import path
    from _recipe_utils import CONFIG_DIR, parse_recipe_args, train_and_evaluate, train_validation_splits

logger = logging.getLogger(__name__)

#: ``SFTConfig`` plus the ``sam_*`` fields.
SSAMSFTConfig = sam_arguments(SFTConfig)
#: Config read when neither ``--config`` nor any of ``SELECTORS`` is given: the offline run.
DEFAULT_CONFIG = CONFIG_DIR / "sft_lora_tiny_ssam.yaml"
#: The options that choose the model or the data: any of them on the command line turns the offline default off.
SELECTORS = ("model_name_or_path", "dataset_name", "dataset_config_name")
#: ``--model_name_or_path`` value for the small Llama built from a config (random weights, offline).
TINY_MODEL = "tiny-llama"
#: ``--dataset_name`` value for the sentences of scikit-learn's bundled dataset descriptions (offline).
SKLEARN_TEXTS = "sklearn-descriptions"
#: Special tokens of the offline word-level tokenizer.
UNK, PAD, BOS, EOS = "<unk>", "<pad>", "<s>", "</s>"
_VALIDATION_SPLITS = ("validation", "test", "dev", "valid", "val")
_RST_RULE = re.compile(r"^\s*[=\-~^*+#`]{3,}[\s=\-~^*+#`]*$")  # section underlines and table borders
_RST_ITEM = re.compile(r"^([-*+]|\d+\.|:[^:]+:)\s+")  # list items and field-list fields
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(])")


class SSAMSFTTrainer(SSAMMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` with the SAM-family two-pass step."""


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default=TINY_MODEL,
        metadata={"help": f"A causal LM folder or Hub id, or {TINY_MODEL} (built from a config, random weights)."},
    )
    use_peft: bool = field(default=True, metadata={"help": "Train a LoRA adapter; false: full fine-tuning."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank r."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapter's input."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules that get an adapter (default: all-linear, every linear layer)."}
    )
    tiny_hidden_size: int = field(default=128, metadata={"help": f"{TINY_MODEL} only: model width."})
    tiny_num_layers: int = field(default=2, metadata={"help": f"{TINY_MODEL} only: number of decoder layers."})
    tiny_num_heads: int = field(default=4, metadata={"help": f"{TINY_MODEL} only: attention heads."})
    tiny_initializer_range: float = field(
        default=0.1,
        metadata={
            "help": f"{TINY_MODEL} only: standard deviation of the random weights (Llama's own 0.02 leaves the frozen "
            "output layer too weak for an adapter to move the predictions)."
        },
    )


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None, metadata={"help": f"A Hugging Face data set name, or {SKLEARN_TEXTS} (offline)."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The data set's config name."})
    validation_split_percentage: float = field(
        default=10.0, metadata={"help": "Validation share carved out of train when there is no validation split."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only N validation examples."})
    compare: bool = field(
        default=False,
        metadata={"help": "Run sam_variant none as well, with the same settings, and print both in one table."},
    )


def parse_arguments(argv: Sequence[str] | None = None) -> tuple[ModelArguments, DataArguments, Any]:
    """The options of a run: ``--config`` (or the offline default) and the command line; see ``parse_recipe_args``."""
    return parse_recipe_args((ModelArguments, DataArguments, SSAMSFTConfig), argv, DEFAULT_CONFIG, SELECTORS)


# ------------------------------------------------------------------------------------------------ offline data


def _clean_rst(text: str) -> list[str]:
    """The prose of a reStructuredText file, one string per paragraph or list item; markup, headings, tables and
    directives dropped."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines or any(_RST_RULE.match(line) for line in lines) or lines[0].lstrip().startswith(".."):
            continue  # headings, tables, directives
        if any(line.lstrip().startswith(">>>") for line in lines):
            continue  # code examples
        items: list[list[str]] = []
        for line in lines:
            stripped = line.strip()
            if _RST_ITEM.match(stripped) or not items:
                items.append([])
            items[-1].append(_RST_ITEM.sub("", stripped))
        for item in items:
            prose = " ".join(item)
            prose = re.sub(r":\w+:`([^`<]*)[^`]*`", r"\1", prose)  # :ref:`text <target>` -> text
            prose = re.sub(r"[`*]{1,2}([^`*]+?)[`*]{1,2}_?", r"\1", prose)  # ``literal``, **strong**, `link`_
            prose = re.sub(r"\s*<\w+://[^>]*>_?", "", prose)  # `text <https://...>`_ -> text
            prose = re.sub(r"\s*\[\w+\]_", "", prose).replace("::", ":")  # citations [3]_, literal-block marks
            paragraphs.append(re.sub(r"\s+", " ", prose).strip())
    return paragraphs


def sklearn_descriptions(min_words: int = 4) -> list[str]:
    """The sentences of the dataset descriptions bundled with scikit-learn, in a fixed order."""
    try:
        from sklearn.datasets import descr
    except ImportError as error:
        raise ValueError(f"--dataset_name {SKLEARN_TEXTS} needs scikit-learn (pip install scikit-learn).") from error
    sentences = []
    for path in sorted(Path(descr.__file__).resolve().parent.glob("*.rst")):
        for paragraph in _clean_rst(path.read_text(encoding="utf-8")):
            sentences += [s for s in _SENTENCE_END.split(paragraph) if len(s.split()) >= min_words]
    return sentences


def load_text_splits(data_args: DataArguments, seed: int) -> DatasetDict:
    """``train`` and ``validation`` splits, columns as ``SFTTrainer`` reads them (``text``, ``messages``, ...)."""
    if data_args.dataset_name is None:
        raise ValueError(f"Set --dataset_name (a Hub data set, or {SKLEARN_TEXTS} offline).")
    if data_args.dataset_name == SKLEARN_TEXTS:
        raw = DatasetDict(train=Dataset.from_dict({"text": sklearn_descriptions()}))
    else:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    return train_validation_splits(
        raw,
        _VALIDATION_SPLITS,
        data_args.validation_split_percentage,
        seed,
        data_args.max_train_samples,
        data_args.max_eval_samples,
    )


# ---------------------------------------------------------------------------------------------- model, tokenizer


def word_level_tokenizer(texts: Sequence[str], max_length: int | None, min_frequency: int = 2) -> Any:
    """A lower-cased word-level tokenizer (words and punctuation marks) trained on ``texts``, built offline."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(min_frequency=min_frequency, special_tokens=[UNK, PAD, BOS, EOS])
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token=UNK,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        model_max_length=max_length or 10**6,
    )


def tiny_llama(model_args: ModelArguments, tokenizer: Any, max_length: int | None) -> PreTrainedModel:
    """A small Llama with random weights, sized by the ``tiny_*`` options, for ``tokenizer``'s vocabulary."""
    width = model_args.tiny_hidden_size
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=model_args.tiny_num_layers,
        num_attention_heads=model_args.tiny_num_heads,
        num_key_value_heads=model_args.tiny_num_heads,
        max_position_embeddings=max(max_length or 0, 128),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        initializer_range=model_args.tiny_initializer_range,
    )
    return LlamaForCausalLM(config)


def load_tokenizer(model_args: ModelArguments, train_texts: Sequence[str], max_length: int | None) -> Any:
    """The model's own tokenizer, or a word-level one built from the training texts for ``tiny-llama``."""
    if model_args.model_name_or_path == TINY_MODEL:
        if not train_texts:
            raise ValueError(f"--model_name_or_path {TINY_MODEL} builds its tokenizer from a 'text' column.")
        return word_level_tokenizer(train_texts, max_length)
    try:
        AutoConfig.from_pretrained(model_args.model_name_or_path)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"--model_name_or_path {model_args.model_name_or_path} is neither {TINY_MODEL}, a model folder nor a "
            f"model id that can be loaded (offline, only local folders and {TINY_MODEL} work): {error}"
        ) from error
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_args: ModelArguments, tokenizer: Any, max_length: int | None) -> PreTrainedModel:
    if model_args.model_name_or_path == TINY_MODEL:
        return tiny_llama(model_args, tokenizer, max_length)
    return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)


def lora_config(model_args: ModelArguments) -> Any:
    """The PEFT ``LoraConfig`` of the options, or None without ``--use_peft``."""
    if not model_args.use_peft:
        return None
    from peft import LoraConfig

    targets = model_args.lora_target_modules
    if targets is None or targets == ["all-linear"]:
        targets = "all-linear"  # PEFT's name for every linear layer except the output head
    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )


# ---------------------------------------------------------------------------------------------------- running


def build_trainer(
    model_args: ModelArguments, splits: DatasetDict, training_args: Any, tokenizer: Any
) -> SSAMSFTTrainer:
    """A fresh model (seeded) and its ``SSAMSFTTrainer``; the LoRA adapter is added by ``SFTTrainer``."""
    set_seed(training_args.seed)
    model = load_model(model_args, tokenizer, training_args.max_length)
    return SSAMSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        processing_class=tokenizer,
        peft_config=lora_config(model_args),
    )


def run_variant(model_args: ModelArguments, splits: DatasetDict, training_args: Any, tokenizer: Any) -> dict[str, Any]:
    """Train and evaluate one variant; the summary of ``train_and_evaluate`` plus ``eval_perplexity``."""
    trainer = build_trainer(model_args, splits, training_args, tokenizer)
    result = train_and_evaluate(trainer)
    eval_loss = result["eval"].get("eval_loss", float("nan"))
    result["eval_perplexity"] = math.exp(eval_loss) if eval_loss < 50 else float("inf")
    result["trainable_parameters"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return result


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table: one row per variant."""
    rows = [
        "| variant | train loss | eval loss | eval perplexity | wall time (s) |",
        "|---|---|---|---|---|",
    ]
    for variant, r in results.items():
        rows.append(
            f"| {variant} | {r['train_loss']:.4f} | {r['eval'].get('eval_loss', float('nan')):.4f} "
            f"| {r['eval_perplexity']:.2f} | {r['wall_time_s']:.0f} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Run the recipe; returns, per variant run, the summary of ``train_and_evaluate`` and ``eval_perplexity``."""
    model_args, data_args, training_args = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING)
    variants = [training_args.sam_variant]
    if data_args.compare:
        if training_args.sam_variant == "none":
            raise ValueError("--compare runs sam_variant none next to a SAM variant: set --sam_variant (e.g. ssam).")
        variants = ["none", training_args.sam_variant]

    with training_args.main_process_first(desc="loading the data set and the tokenizer"):
        splits = load_text_splits(data_args, training_args.seed)
        texts = splits["train"]["text"] if "text" in splits["train"].column_names else []
        tokenizer = load_tokenizer(model_args, texts, training_args.max_length)
    logger.info(
        "%s on %s: %d train / %d validation examples, variants %s",
        model_args.model_name_or_path,
        data_args.dataset_name,
        len(splits["train"]),
        len(splits["validation"]),
        variants,
    )

    results = {}
    for variant in variants:
        args = training_args
        if len(variants) > 1:
            args = copy.deepcopy(training_args)
            args.sam_variant = variant
            args.output_dir = str(Path(training_args.output_dir) / variant)
        results[variant] = run_variant(model_args, splits, args, tokenizer)
    table = format_table(results)
    if training_args.should_log:
        print(f"\n{model_args.model_name_or_path} on {data_args.dataset_name}\n\n{table}\n")
    if training_args.should_save:
        Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(training_args.output_dir) / "results.md").write_text(table + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
