"""The recipes under ``recipes/``: configs parse, offline defaults train end to end, bad input fails early.

Each offline default runs a handful of optimizer steps on a small subset (no download); the full runs and
their accuracy are documented in ``docs/recipes.md``.
"""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from transformers import EvalPrediction, HfArgumentParser

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
sys.path.insert(0, str(RECIPES))

import _recipe_utils  # noqa: E402
import demo  # noqa: E402
import text_classification  # noqa: E402
import vit_imagenet  # noqa: E402

from hf_ssam import SSAMTrainingArguments  # noqa: E402

CONFIGS = sorted((RECIPES / "configs").glob("*.yaml"))
RECIPE_OF_CONFIG = {"vit": vit_imagenet, "text": text_classification}
SHORT_RUN = "--max_steps 3 --logging_steps 1 --eval_strategy no --disable_tqdm true".split()


def _dataclasses(recipe: types.ModuleType) -> tuple[type, ...]:
    return (recipe.ModelArguments, recipe.DataArguments, SSAMTrainingArguments)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_parses_into_the_argument_dataclasses(config: Path) -> None:
    recipe = RECIPE_OF_CONFIG[config.name.split("_")[0]]
    parser = HfArgumentParser(_dataclasses(recipe))
    values = _recipe_utils.load_config(config, parser)
    # use_cpu: the GPU configs ask for bf16, which TrainingArguments refuses on a machine without a GPU.
    _, data_args, training_args = parser.parse_dict({**values, "use_cpu": True})
    assert training_args.sam_variant in ("none", "sam", "usam", "asam", "ssam")
    assert config.read_text().startswith("#"), "every config starts with a header comment"


@pytest.mark.parametrize("model", ["s16", "s32"])
def test_imagenet_configs_follow_the_paper_and_differ_only_in_the_variant(model: str) -> None:
    variants = {"adamw": "none", "sam": "sam", "usam": "usam", "ssam": "ssam"}
    configs = {v: yaml.safe_load((RECIPES / "configs" / f"vit_{model}_{v}.yaml").read_text()) for v in variants}
    assert {v: config["sam_variant"] for v, config in configs.items()} == variants

    def shared(config: dict) -> dict:
        return {k: v for k, v in config.items() if k not in ("sam_variant", "output_dir", "run_name")}

    assert all(shared(config) == shared(configs["ssam"]) for config in configs.values())
    paper = {
        "model_name": f"vit_small_patch{model[1:]}_224",
        "image_size": 224,
        "learning_rate": 3e-4,
        "weight_decay": 0.3,
        "num_train_epochs": 300,
        "lr_scheduler_type": "cosine",
        "sam_rho": 0.2,
        "crop_scale_min": 0.08,
    }
    assert paper.items() <= configs["ssam"].items()
    assert configs["ssam"]["per_device_train_batch_size"] * 8 == 256 and configs["ssam"]["warmup_steps"] > 0


@pytest.mark.parametrize("name", ["single_node_8gpu", "multi_node_2x8gpu"])
def test_accelerate_configs_load(name: str) -> None:
    from accelerate.commands.config.config_args import ClusterConfig

    path = RECIPES / "accelerate" / f"{name}.yaml"
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.distributed_type == "MULTI_GPU" and config.mixed_precision == "bf16"
    assert (config.num_machines, config.num_processes) == ((1, 8) if name == "single_node_8gpu" else (2, 16))
    assert path.read_text().startswith("#")


def test_command_line_overrides_the_yaml() -> None:
    config = RECIPES / "configs" / "vit_s16_ssam.yaml"
    model_args, data_args, training_args = _recipe_utils.parse_recipe_args(
        _dataclasses(vit_imagenet),
        ["--config", str(config), "--learning_rate", "0.01", "--sam_variant", "sam", "--use_cpu", "true"],
        vit_imagenet.DEFAULT_CONFIG,
    )
    assert training_args.learning_rate == 0.01 and training_args.sam_variant == "sam"  # from the command line
    assert training_args.weight_decay == 0.3 and model_args.model_name == "vit_small_patch16_224"  # from the YAML


def test_unknown_config_key_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("learning_rate: 1.0e-3\nsam_rhoo: 0.1\n")
    with pytest.raises(ValueError, match="sam_rhoo"):
        vit_imagenet.main(["--config", str(config)])


def _finite_loss_and_metric(result: dict) -> None:
    assert math.isfinite(result["train_loss"])
    assert 0.0 <= result["eval"]["eval_accuracy"] <= 1.0
    assert any("sam/gamma" in row for row in result["log_history"])


def test_vit_offline_default_runs(tmp_path: Path) -> None:
    argv = f"--output_dir {tmp_path} --max_train_samples 96 --max_eval_samples 32".split()
    _finite_loss_and_metric(vit_imagenet.main(SHORT_RUN + argv))


def test_vit_runs_on_an_image_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            folder = tmp_path / "data" / split / label
            folder.mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    argv = f"--output_dir {tmp_path / 'out'} --data_dir {tmp_path / 'data'} --cache_dir {tmp_path / 'cache'}".split()
    _finite_loss_and_metric(vit_imagenet.main(SHORT_RUN + argv + ["--per_device_train_batch_size", "4"]))


def test_text_offline_default_runs(tmp_path: Path) -> None:
    argv = f"--output_dir {tmp_path} --max_train_samples 96 --max_eval_samples 64 --metrics_backend numpy".split()
    result = text_classification.main(SHORT_RUN + argv + ["--per_device_train_batch_size", "8"])
    _finite_loss_and_metric(result)
    assert 0.0 <= result["eval"]["eval_f1"] <= 1.0


def test_text_runs_on_local_csv_sentence_pairs(tmp_path: Path) -> None:
    rows = "premise,hypothesis,label\n" + "".join(
        f"a good day {i},it was fine,yes\nan awful day {i},it was fine,no\n" for i in range(8)
    )
    for name in ("train.csv", "dev.csv"):
        (tmp_path / name).write_text(rows)
    argv = f"--train_file {tmp_path / 'train.csv'} --validation_file {tmp_path / 'dev.csv'} --metrics_backend numpy"
    result = text_classification.main(SHORT_RUN + argv.split() + ["--output_dir", str(tmp_path / "out")])
    _finite_loss_and_metric(result)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data_dir", "/no/such/imagenet"], "--data_dir /no/such/imagenet does not exist"),
        (["--model_name", "vit_nonexistent_model"], "--model_name vit_nonexistent_model is not a timm model"),
        (["--config", "/no/such/config.yaml"], "--config /no/such/config.yaml does not exist"),
    ],
)
def test_vit_bad_input_fails_before_training(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        vit_imagenet.main(argv)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--train_file", "/no/such/train.csv"], "--train_file /no/such/train.csv does not exist"),
        (["--model_name_or_path", "/no/such/model"], "--model_name_or_path /no/such/model is neither"),
    ],
)
def test_text_bad_input_fails_before_training(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        text_classification.main(argv)


def test_numpy_metrics_on_a_hand_example() -> None:
    predictions = np.array([1, 0, 1, 1, 0, 0])
    labels = np.array([1, 0, 0, 1, 1, 0])
    # 4 of 6 right; tp = 2, fp = 1, fn = 1 -> F1 = 2*2 / (2*2 + 1 + 1) = 2/3
    metrics = _recipe_utils.classification_metrics(predictions, labels, num_labels=2)
    assert metrics == pytest.approx({"accuracy": 4 / 6, "f1": 2 / 3})
    assert _recipe_utils.classification_metrics(np.array([2, 1, 0]), np.array([2, 0, 0]), 3) == pytest.approx(
        {"accuracy": 2 / 3}
    )
    assert _recipe_utils.classification_metrics(np.array([0, 0]), np.array([0, 0]), 2) == {"accuracy": 1.0, "f1": 0.0}


def test_auto_metrics_fall_back_to_numpy_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline_load(name: str, *args: object, **kwargs: object) -> None:
        raise FileNotFoundError(f"Couldn't find a module script for {name} (offline)")

    monkeypatch.setitem(sys.modules, "evaluate", types.SimpleNamespace(load=offline_load))
    compute = _recipe_utils.make_compute_metrics(2, backend="auto")
    logits_argmax = np.array([1, 0, 1, 1, 0, 0])
    metrics = compute(EvalPrediction(predictions=logits_argmax, label_ids=np.array([1, 0, 0, 1, 1, 0])))
    assert metrics == pytest.approx({"accuracy": 4 / 6, "f1": 2 / 3})
    with pytest.raises(ValueError, match="--metrics_backend evaluate"):
        _recipe_utils.make_compute_metrics(2, backend="evaluate")


def test_demo_quick_runs_the_whole_pipeline(tmp_path: Path) -> None:
    out = demo.main(["--quick", "--output_dir", str(tmp_path)])
    runs = out["runs"]
    assert [(r["lr"], r["variant"], r["seed"]) for r in runs] == [
        (lr, v, s) for lr in (demo.BASE_LR, demo.LARGE_LR) for v in demo.VARIANTS for s in (0, 1)
    ]
    for run in runs:
        assert 0.0 <= run["accuracy"] <= 1.0 and math.isfinite(run["train_loss"])
        assert math.isfinite(run["hessian_top"]) and run["hessian_top"] > 0  # measured by the callback
        assert sum(demo.EIGEN_KEY in row for row in run["log_history"]) == 2  # at each of the 2 evaluations
        assert any("sam/gamma" in row for row in run["log_history"]) == (run["variant"] != "none")
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {lr:g} | {v} |" in table for lr in (demo.BASE_LR, demo.LARGE_LR) for v in demo.VARIANTS)
    assert (tmp_path / "demo.png").stat().st_size > 10_000


def test_demo_summary_is_mean_and_std_over_seeds() -> None:
    def run(seed: int, accuracy: float, loss: float) -> dict:
        return {"lr": 0.1, "variant": "ssam", "seed": seed, "accuracy": accuracy, "train_loss": loss,
                "hessian_top": 2.0 * (seed + 1), "sam_sharpness": 0.01, "wall_time_s": 3.0,
                "collapsed": not loss < demo.COLLAPSED_LOSS}  # fmt: skip

    rows = demo.summarize([run(0, 0.80, 0.5), run(1, 0.90, 0.7), run(2, 0.10, float("nan"))])
    # accuracy 80, 90, 10 -> mean 60, sample std 43.6; loss: the finite 0.5, 0.7 -> 0.6 ± 0.14; eigenvalues 2, 4, 6
    expected = {"lr": 0.1, "variant": "ssam", "accuracy": "60 ± 44", "train_loss": "0.6 ± 0.14",
                "hessian_top": "4 ± 2", "sam_sharpness": "0.01 ± 0", "collapsed": "1/3", "time": "3.0"}  # fmt: skip
    assert rows == [expected]
    assert "| 0.1 | ssam | 60 ± 44 | 0.6 ± 0.14 | 4 ± 2 | 0.01 ± 0 | 1/3 | 3.0 |" in demo.format_table(rows)


def test_demo_label_noise_flips_a_fixed_fifth_of_the_training_labels_only() -> None:
    data = demo.digits_with_label_noise(0.2)
    flipped = data["train_y"] != data["clean_train_y"]
    assert len(data["train_y"]) == 1437 and len(data["val_y"]) == 360
    assert abs(flipped.float().mean().item() - 0.2) < 0.03  # 1437 draws: 3 standard deviations is 0.032
    assert torch.equal(demo.digits_with_label_noise(0.2)["train_y"], data["train_y"])
    assert torch.equal(demo.digits_with_label_noise(0.0)["train_y"], data["clean_train_y"])
    val, train = data["val_y"].bincount(), data["clean_train_y"].bincount()
    assert torch.all((val - 0.2 * (val + train)).abs() <= 1)  # a stratified 20% validation split, labels clean


def test_demo_refuses_an_unknown_variant() -> None:
    with pytest.raises(ValueError, match="--variants adam is not one of"):
        demo.main(["--variants", "adam", "--quick"])
