"""Train a timm Vision Transformer on ImageNet (or any image data set) with SSAM, SAM, USAM, ASAM or plain AdamW.

This recipe reproduces the ViT rows of Table 2 of Tan et al. (2024), "Stabilizing Sharpness-aware Minimization
Through A Simple Renormalization Strategy": ViT-S/16 and ViT-S/32 trained from scratch on ImageNet-1K for 300
epochs with AdamW (peak lr 3e-4, weight decay 0.3, global batch 256, cosine decay), rho = 0.2, 224 px and
Inception-style crops only. One YAML config per model and variant lives in ``recipes/configs/``.

Run it from the repository root, as a file or as a module (``python -m recipes.vit_imagenet``, same options).

Offline default (no download): scikit-learn's 8x8 digits resized to 32 px and a 4-layer ViT, 30 epochs of SSAM;
94.2% top-1 on the 360 validation images after about 2 minutes on 2 CPU cores (``docs/recipes.md``)::

    python recipes/vit_imagenet.py
    python recipes/vit_imagenet.py --sam_variant none --output_dir outputs/vit_digits_none
    python -m recipes.vit_imagenet --help

ImageNet, one process (``--data_dir`` holds ``train/`` and ``val/`` with one folder per class)::

    python recipes/vit_imagenet.py --config recipes/configs/vit_s16_ssam.yaml --data_dir /path/to/imagenet \\
        --per_device_train_batch_size 256

ImageNet, 8 GPUs on one node (global batch 8 x 32 = 256)::

    accelerate launch --multi_gpu --num_processes 8 recipes/vit_imagenet.py \\
        --config recipes/configs/vit_s16_ssam.yaml --data_dir /path/to/imagenet

or with the shipped accelerate config (bf16)::

    accelerate launch --config_file recipes/accelerate/single_node_8gpu.yaml recipes/vit_imagenet.py \\
        --config recipes/configs/vit_s16_ssam.yaml --data_dir /path/to/imagenet

A Hugging Face image data set instead of a folder (columns are detected, or set ``--image_column``/
``--label_column``)::

    python recipes/vit_imagenet.py --config recipes/configs/vit_s16_ssam.yaml --data_dir none \\
        --dataset_name ILSVRC/imagenet-1k

Every option of ``SSAMTrainingArguments`` (that is, of ``transformers.TrainingArguments`` plus ``sam_*``) and of
the dataclasses below can be set in the YAML file or on the command line; the command line wins.
The offline default config ``recipes/configs/vit_digits_ssam.yaml`` is read only when neither ``--config`` nor an
option choosing the model or the data (``--model_name``, ``--data_dir``, ``--dataset_name``,
``--dataset_config_name``) is given: ``--model_name vit_base_patch16_224 --data_dir /path`` builds ViT-B/16 at its
own 224 px with the ``TrainingArguments`` defaults (start real runs from a config). ``--config none`` reads no file;
``--depth none`` (and likewise ``--image_size``, ``--patch_size``, ``--embed_dim``, ``--num_heads``) undoes a
config's override and keeps the model's own value.
The validation split is evaluated for top-1 accuracy (``eval_accuracy`` in the logs); checkpoints and logs go to
``--output_dir`` as with any ``Trainer`` run (resume with ``--resume_from_checkpoint``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from datasets import DatasetDict, load_dataset
from torch import nn
from torchvision import transforms
from transformers import set_seed

from hf_ssam import SSAMTrainer, SSAMTrainingArguments

if __package__:  # imported as recipes.vit_imagenet, or run with python -m recipes.vit_imagenet
    from ._data import digits_dataset
    from ._recipe_utils import (
        CONFIG_DIR,
        argmax_logits,
        make_compute_metrics,
        parse_recipe_args,
        train_and_evaluate,
        train_validation_splits,
    )
else:  # run as a file, python recipes/vit_imagenet.py: Python puts this folder first on the import path
    from _data import digits_dataset
    from _recipe_utils import (
        CONFIG_DIR,
        argmax_logits,
        make_compute_metrics,
        parse_recipe_args,
        train_and_evaluate,
        train_validation_splits,
    )

logger = logging.getLogger(__name__)

#: Config read when neither ``--config`` nor any of ``SELECTORS`` is given: the offline digits run.
DEFAULT_CONFIG = CONFIG_DIR / "vit_digits_ssam.yaml"
#: The options that choose the model or the data: any of them on the command line turns the offline default off.
SELECTORS = ("model_name", "data_dir", "dataset_name", "dataset_config_name")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_IMAGE_COLUMNS = ("image", "img", "pixel_values", "jpg", "png")
_LABEL_COLUMNS = ("label", "labels", "cls", "fine_label")
_VALIDATION_SPLITS = ("validation", "val", "valid", "test")


@dataclass
class ModelArguments:
    """Which timm model to build (from scratch: weights are never downloaded)."""

    model_name: str = field(
        default="vit_small_patch16_224",
        metadata={
            "help": "Any timm model name, e.g. vit_small_patch16_224, vit_small_patch32_224, vit_base_patch16_224."
        },
    )
    image_size: int | None = field(
        default=None,
        metadata={"help": "Input resolution (square) for training and evaluation; none: the model's own (timm)."},
    )
    patch_size: int | None = field(
        default=None, metadata={"help": "Override the ViT patch size (timm kwarg); none: the model's own."}
    )
    depth: int | None = field(
        default=None, metadata={"help": "Override the number of ViT blocks (timm kwarg); none: the model's own."}
    )
    embed_dim: int | None = field(
        default=None, metadata={"help": "Override the ViT width (timm kwarg); none: the model's own."}
    )
    num_heads: int | None = field(
        default=None, metadata={"help": "Override the ViT head count (timm kwarg); none: the model's own."}
    )
    drop_rate: float = field(default=0.0, metadata={"help": "Dropout before the classifier head."})
    drop_path_rate: float = field(default=0.0, metadata={"help": "Stochastic depth rate."})


@dataclass
class DataArguments:
    """Where the images come from and how they are augmented."""

    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Image folder with train/ and val/ (or validation/) sub-folders of class folders; "
            "'none' unsets it (to use --dataset_name with a config that sets data_dir)."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A Hugging Face image data set name, or 'digits' (scikit-learn, offline). "
            "Ignored when --data_dir is set."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Config name of --dataset_name."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (default: detected)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (default: detected)."})
    validation_split_percentage: float = field(
        default=5.0,
        metadata={"help": "Validation share carved out of train when the data set has no validation split."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use a random subset of N training images."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use a random subset of N validation images."}
    )
    crop_scale_min: float = field(
        default=0.08, metadata={"help": "Smallest area share of RandomResizedCrop (0.08 = Inception-style)."}
    )
    hflip: bool = field(default=True, metadata={"help": "Random horizontal flips in training."})
    eval_crop_pct: float = field(
        default=0.875, metadata={"help": "Evaluation: resize to image_size / eval_crop_pct, then center-crop."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where datasets caches downloads and Arrow files."})

    def __post_init__(self) -> None:
        if self.data_dir is not None and self.data_dir.strip().lower() in ("", "none", "null"):
            self.data_dir = None


class ImageClassifier(nn.Module):
    """Wraps a logits-returning model so the Trainer can feed it ``pixel_values``/``labels`` and read a loss.

    (``--label_smoothing_factor`` still works: the Trainer then computes the loss from ``logits`` itself.)
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.model(pixel_values)
        if labels is None:
            return {"logits": logits}
        loss = nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def check_model_name(model_name: str) -> None:
    if not timm.is_model(model_name):
        raise ValueError(
            f"--model_name {model_name} is not a timm model; list the names with "
            "timm.list_models('vit_*'), e.g. vit_small_patch16_224 or vit_small_patch32_224."
        )


def default_image_size(model_name: str) -> int:
    """The input resolution timm defines for ``model_name`` (its pretrained config; nothing is downloaded)."""
    check_model_name(model_name)
    input_size = timm.get_pretrained_cfg_value(model_name, "input_size")
    if not input_size:
        raise ValueError(f"--model_name {model_name}: timm defines no input size for it; set --image_size.")
    return int(input_size[-1])


def parse_arguments(argv: Sequence[str] | None = None) -> tuple[ModelArguments, DataArguments, SSAMTrainingArguments]:
    """The options of a run: ``--config`` (or the offline default) and the command line; see ``parse_recipe_args``.

    An ``--image_size`` left unset is resolved to the model's own input size.
    """
    model_args, data_args, training_args = parse_recipe_args(
        (ModelArguments, DataArguments, SSAMTrainingArguments), argv, DEFAULT_CONFIG, SELECTORS
    )
    if model_args.image_size is None:
        model_args.image_size = default_image_size(model_args.model_name)
    return model_args, data_args, training_args


def check_arguments(model_args: ModelArguments, data_args: DataArguments) -> None:
    """Refuse bad options with a message naming them, before anything is loaded."""
    check_model_name(model_args.model_name)
    if data_args.data_dir is not None:
        root = Path(data_args.data_dir).expanduser()
        if not root.is_dir():
            raise ValueError(
                f"--data_dir {data_args.data_dir} does not exist or is not a folder; it must hold train/ and val/ "
                "with one sub-folder per class (the ImageNet layout), or use --dataset_name."
            )
        if not (root / "train").is_dir():
            raise ValueError(f"--data_dir {data_args.data_dir} has no train/ sub-folder of class folders.")
    elif data_args.dataset_name is None:
        raise ValueError("Set --data_dir (an image folder) or --dataset_name (a Hub data set, or 'digits' offline).")
    if not 0.0 < data_args.crop_scale_min <= 1.0:
        raise ValueError(f"--crop_scale_min {data_args.crop_scale_min} must lie in (0, 1].")
    if not 0.0 < data_args.eval_crop_pct <= 1.0:
        raise ValueError(f"--eval_crop_pct {data_args.eval_crop_pct} must lie in (0, 1].")


def load_image_dataset(data_args: DataArguments, seed: int) -> DatasetDict:
    """``train`` and ``validation`` splits with ``image`` and ``label`` columns."""
    if data_args.data_dir is not None:
        # "imagefolder" stores file paths only; images are decoded lazily in the dataloader workers.
        raw = load_dataset(
            "imagefolder", data_dir=str(Path(data_args.data_dir).expanduser()), cache_dir=data_args.cache_dir
        )
    elif data_args.dataset_name == "digits":
        raw = digits_dataset(seed=seed)
    else:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=data_args.cache_dir)
    splits = train_validation_splits(
        raw,
        _VALIDATION_SPLITS,
        data_args.validation_split_percentage,
        seed,
        data_args.max_train_samples,
        data_args.max_eval_samples,
    )

    columns = splits["train"].column_names
    image_column = data_args.image_column or next((c for c in _IMAGE_COLUMNS if c in columns), None)
    label_column = data_args.label_column or next((c for c in _LABEL_COLUMNS if c in columns), None)
    for option, column in (("--image_column", image_column), ("--label_column", label_column)):
        if column is None or column not in columns:
            raise ValueError(f"{option} {column} is not a column of the data set (columns: {columns}).")
    renames = {old: new for old, new in ((image_column, "image"), (label_column, "label")) if old != new}
    return splits.rename_columns(renames).select_columns(["image", "label"])


def num_classes_of(dataset: Any) -> int:
    feature = dataset.features["label"]
    return int(feature.num_classes) if hasattr(feature, "num_classes") else int(max(dataset["label"])) + 1


def build_transforms(model_args: ModelArguments, data_args: DataArguments) -> tuple[Any, Any]:
    """Inception-style training crops (+ flip) and resize/center-crop evaluation, ImageNet normalization."""
    size = model_args.image_size
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = [
        transforms.RandomResizedCrop(
            size, scale=(data_args.crop_scale_min, 1.0), interpolation=transforms.InterpolationMode.BICUBIC
        )
    ]
    if data_args.hflip:
        train.append(transforms.RandomHorizontalFlip())
    train += [transforms.ToTensor(), normalize]
    evaluation = [
        transforms.Resize(
            math.floor(size / data_args.eval_crop_pct), interpolation=transforms.InterpolationMode.BICUBIC
        ),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        normalize,
    ]
    return transforms.Compose(train), transforms.Compose(evaluation)


class BatchTransform:
    """``set_transform`` callable: PIL images to normalized tensors, ``label`` to ``labels``.

    A class rather than a closure so that it pickles into dataloader workers started with ``spawn``.
    """

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, Any]:
        return {
            "pixel_values": [self.transform(image.convert("RGB")) for image in batch["image"]],
            "labels": batch["label"],
        }


def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example["labels"] for example in examples], dtype=torch.long),
    }


def build_model(model_args: ModelArguments, num_classes: int) -> ImageClassifier:
    """``timm.create_model(model_name, pretrained=False)`` with the size overrides, wrapped for the Trainer."""
    overrides = {
        key: value
        for key in ("patch_size", "depth", "embed_dim", "num_heads")
        if (value := getattr(model_args, key)) is not None
    }
    kwargs: dict[str, Any] = {}
    if model_args.image_size is not None and model_args.model_name.startswith(("vit_", "deit")):
        kwargs["img_size"] = model_args.image_size
    model = timm.create_model(
        model_args.model_name,
        pretrained=False,
        num_classes=num_classes,
        drop_rate=model_args.drop_rate,
        drop_path_rate=model_args.drop_path_rate,
        **kwargs,
        **overrides,
    )
    return ImageClassifier(model)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the recipe; returns final validation metrics, last training loss, training wall time and logs."""
    model_args, data_args, training_args = parse_arguments(argv)
    check_arguments(model_args, data_args)
    # The image columns are turned into pixel_values/labels on the fly: the Trainer must not drop them.
    training_args.remove_unused_columns = False
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING)

    with training_args.main_process_first(desc="loading the data set"):
        splits = load_image_dataset(data_args, training_args.seed)
    train_transform, eval_transform = build_transforms(model_args, data_args)
    splits["train"].set_transform(BatchTransform(train_transform))
    splits["validation"].set_transform(BatchTransform(eval_transform))
    num_classes = num_classes_of(splits["train"])

    set_seed(training_args.seed)  # the weights are initialized here, before the Trainer seeds anything
    model = build_model(model_args, num_classes)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "%s: %.2fM parameters, %d classes, %d train / %d validation images",
        model_args.model_name,
        n_params / 1e6,
        num_classes,
        len(splits["train"]),
        len(splits["validation"]),
    )

    trainer = SSAMTrainer(
        model=model,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        data_collator=collate,
        compute_metrics=make_compute_metrics(num_classes, backend="numpy"),
        preprocess_logits_for_metrics=argmax_logits,
    )
    return train_and_evaluate(trainer)


if __name__ == "__main__":
    main()
