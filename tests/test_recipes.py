"""The recipes under ``recipes/``: configs parse, options resolve, offline defaults train end to end, bad input
fails early.

Each offline default runs a handful of optimizer steps on a small subset (no download); the full runs and
their accuracy are documented in ``docs/recipes.md``.
"""

from __future__ import annotations

import json
import math
import os
import runpy
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from transformers import AutoTokenizer, EvalPrediction, HfArgumentParser

from hf_ssam import SSAMTrainingArguments
from recipes import _recipe_utils, demo, text_classification, vit_imagenet

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
RECIPE_OF_CONFIG = {"vit": vit_imagenet, "text": text_classification}
# sft_lora_*.yaml parse into sam_arguments(SFTConfig): tests/test_sft_recipe.py checks them.
CONFIGS = sorted(c for c in (RECIPES / "configs").glob("*.yaml") if c.name.split("_")[0] in RECIPE_OF_CONFIG)
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
    assert "use_cpu" not in values, "a config must not pin the device: it would carry over to real runs"
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
    model_args, data_args, training_args = vit_imagenet.parse_arguments(
        ["--config", str(config), "--learning_rate", "0.01", "--sam_variant", "sam", "--use_cpu", "true"]
    )
    assert training_args.learning_rate == 0.01 and training_args.sam_variant == "sam"  # from the command line
    assert training_args.weight_decay == 0.3 and model_args.model_name == "vit_small_patch16_224"  # from the YAML


def test_unknown_config_key_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("learning_rate: 1.0e-3\nsam_rhoo: 0.1\n")
    with pytest.raises(ValueError, match="sam_rhoo"):
        vit_imagenet.main(["--config", str(config)])


def _offline_values(recipe: types.ModuleType) -> dict:
    return yaml.safe_load(recipe.DEFAULT_CONFIG.read_text())


def _resolved(args: tuple, name: str) -> object:
    return next(getattr(a, name) for a in args if hasattr(a, name))


@pytest.mark.parametrize(
    ("recipe", "argv"),
    [
        (vit_imagenet, []),
        (vit_imagenet, ["--sam_variant", "none", "--max_train_samples", "96"]),
        (text_classification, []),
        (text_classification, ["--sam_variant", "sam", "--max_eval_samples", "64"]),
    ],
)
def test_offline_default_applies_when_no_model_or_data_option_is_given(
    recipe: types.ModuleType, argv: list[str]
) -> None:
    args = recipe.parse_arguments(argv)
    given = {name.lstrip("-") for name in argv[::2]}
    expected = {key: value for key, value in _offline_values(recipe).items() if key not in given}
    for key in ("model_name", "image_size", "depth", "dataset_name", "model_name_or_path", "max_seq_length"):
        if key in expected:
            assert _resolved(args, key) == expected[key], key
    training_args = args[2]
    assert training_args.learning_rate == expected["learning_rate"] and training_args.seed == expected["seed"]
    assert training_args.use_cpu is False


@pytest.mark.parametrize(
    ("recipe", "argv"),
    [
        (vit_imagenet, ["--model_name", "vit_base_patch16_224", "--data_dir", "/path/to/imagenet"]),
        (vit_imagenet, ["--model_name", "vit_tiny_patch16_384"]),
        (vit_imagenet, ["--dataset_name", "cifar10"]),
        (vit_imagenet, ["--config", "none"]),
        (text_classification, ["--model_name_or_path", "bert-base-uncased"]),
        (text_classification, ["--train_file", "train.csv"]),
        (text_classification, ["--config", "none"]),
    ],
)
def test_a_model_or_data_option_turns_the_offline_default_off(recipe: types.ModuleType, argv: list[str]) -> None:
    args = recipe.parse_arguments(argv)
    # The reference: the same options through a plain HfArgumentParser, no YAML anywhere.
    plain_argv = [] if argv == ["--config", "none"] else argv
    plain = HfArgumentParser(_dataclasses(recipe)).parse_args_into_dataclasses(plain_argv)
    for key in _offline_values(recipe):
        if key != "image_size":  # resolved from the model, below
            assert _resolved(args, key) == _resolved(plain, key), f"{key} leaked from the offline default config"
    training_args = args[2]
    assert training_args.use_cpu is False and training_args.max_steps == -1
    if recipe is vit_imagenet:
        model_args = args[0]
        assert (model_args.patch_size, model_args.depth, model_args.embed_dim, model_args.num_heads) == (None,) * 4
        own_size = timm.get_pretrained_cfg_value(model_args.model_name, "input_size")[-1]
        assert model_args.image_size == own_size == (384 if model_args.model_name.endswith("384") else 224)
    else:
        assert args[0].max_seq_length is None  # resolved from the model's tokenizer when it is loaded


def _parameter_shapes(model: object) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


@pytest.mark.parametrize(
    "argv",
    [
        ["--model_name", "vit_tiny_patch16_384"],
        # The offline config asked for explicitly, each size override undone with `none`:
        ["--config", str(vit_imagenet.DEFAULT_CONFIG), "--model_name", "vit_tiny_patch16_384"]
        + "--image_size none --patch_size none --depth none --embed_dim none --num_heads null".split(),
    ],
    ids=["model_name_alone", "offline_config_with_sizes_unset"],
)
def test_vit_model_name_gives_that_timm_model_at_its_own_image_size(argv: list[str]) -> None:
    model_args, _, _ = vit_imagenet.parse_arguments(argv)
    assert model_args.image_size == 384
    built = vit_imagenet.build_model(model_args, num_classes=10).model
    reference = timm.create_model("vit_tiny_patch16_384", pretrained=False, num_classes=10)
    assert _parameter_shapes(built) == _parameter_shapes(reference)
    assert built.patch_embed.img_size == (384, 384) and len(built.blocks) == 12 and built.embed_dim == 192
    assert built.pos_embed.shape == (1, 1 + (384 // 16) ** 2, 192)


def test_size_overrides_given_on_the_command_line_still_apply() -> None:
    sizes = "--image_size 64 --patch_size 16 --depth 2 --embed_dim 48 --num_heads 2"
    model_args, _, _ = vit_imagenet.parse_arguments(["--model_name", "vit_tiny_patch16_384", *sizes.split()])
    built = vit_imagenet.build_model(model_args, num_classes=3).model
    assert built.patch_embed.img_size == (64, 64) and len(built.blocks) == 2 and built.embed_dim == 48
    assert built.blocks[0].attn.num_heads == 2 and built.pos_embed.shape == (1, 1 + 4 * 4, 48)


def test_text_options_accept_none_to_unset_a_config_value() -> None:
    model_args, data_args, training_args = text_classification.parse_arguments(
        ["--max_seq_length", "none", "--max_train_samples", "null"]
    )
    assert model_args.max_seq_length is None and data_args.max_train_samples is None
    assert data_args.dataset_name == "vader" and training_args.max_steps == 150  # still the offline default


def test_hub_text_model_alone_gets_that_models_own_sequence_length() -> None:
    model_args, data_args, training_args = text_classification.parse_arguments(
        ["--model_name_or_path", "sentence-transformers/all-MiniLM-L6-v2"]
    )
    assert (model_args.max_seq_length, data_args.dataset_name, training_args.max_steps) == (None, None, -1)
    path = text_classification.resolve_model(model_args.model_name_or_path)  # bundled: nothing is downloaded
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = text_classification.AutoConfig.from_pretrained(path)
    # all-MiniLM-L6-v2 ships tokenizer_config.json with model_max_length 512 (and 512 position embeddings)
    assert text_classification.resolve_max_seq_length(None, tokenizer, config) == 512


def test_max_seq_length_resolution_order() -> None:
    resolve = text_classification.resolve_max_seq_length
    tokenizer = types.SimpleNamespace(model_max_length=48)
    no_limit = types.SimpleNamespace(model_max_length=int(1e30))  # what tokenizers report without a limit
    config = types.SimpleNamespace(max_position_embeddings=64)
    assert resolve(16, tokenizer, config) == 16
    assert resolve(None, tokenizer, config) == 48
    assert resolve(None, no_limit, config) == 64
    with pytest.raises(ValueError, match="set --max_seq_length"):
        resolve(None, no_limit, types.SimpleNamespace())
    with pytest.raises(ValueError, match="--max_seq_length 0"):
        resolve(0, tokenizer, config)


@pytest.mark.parametrize("recipe", ["vit_imagenet", "text_classification"])
@pytest.mark.parametrize("style", ["module", "file"])
def test_recipe_runs_as_a_module_and_as_a_file(
    recipe: str, style: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m recipes.<name> --help`` and ``python recipes/<name>.py --help``, in this process."""
    monkeypatch.setattr(sys, "argv", [recipe, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        if style == "module":
            monkeypatch.delitem(sys.modules, f"recipes.{recipe}")  # run it afresh, as `python -m` does
            runpy.run_module(f"recipes.{recipe}", run_name="__main__", alter_sys=True)
        else:
            monkeypatch.syspath_prepend(str(RECIPES))  # what `python recipes/<name>.py` does
            runpy.run_path(str(RECIPES / f"{recipe}.py"), run_name="__main__")
    assert exit_info.value.code == 0
    assert "--config CONFIG" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("style", ["module", "file"])
def test_recipe_runs_as_a_module_and_as_a_file_in_a_new_interpreter(style: str, tmp_path: Path) -> None:
    # hf_ssam importable as if installed, the repository root not on the import path: as for a user.
    (tmp_path / "hf_ssam").symlink_to(ROOT / "hf_ssam", target_is_directory=True)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    command = ["-m", "recipes.vit_imagenet"] if style == "module" else ["recipes/vit_imagenet.py"]
    result = subprocess.run(
        [sys.executable, *command, "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "--depth DEPTH" in result.stdout and "--config CONFIG" in result.stdout


def _finite_loss_and_metric(result: dict) -> None:
    assert math.isfinite(result["train_loss"])
    assert 0.0 <= result["eval"]["eval_accuracy"] <= 1.0
    assert any("sam/gamma" in row for row in result["log_history"])


def test_vit_offline_default_runs(tmp_path: Path) -> None:
    argv = f"--output_dir {tmp_path} --max_train_samples 96 --max_eval_samples 32".split()
    _finite_loss_and_metric(vit_imagenet.main(SHORT_RUN + argv))
    card = (tmp_path / "README.md").read_text()  # a timm model has no transformers config: the SAM section alone
    assert "### Sharpness-aware training" in card


def test_vit_runs_on_an_image_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            folder = tmp_path / "data" / split / label
            folder.mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    argv = f"--output_dir {tmp_path / 'out'} --data_dir {tmp_path / 'data'} --cache_dir {tmp_path / 'cache'}".split()
    # --data_dir turns the offline default off; the digits config is asked for explicitly to keep the model small.
    argv += ["--config", str(vit_imagenet.DEFAULT_CONFIG), "--per_device_train_batch_size", "4"]
    _finite_loss_and_metric(vit_imagenet.main(SHORT_RUN + argv))


def test_text_offline_default_runs(tmp_path: Path) -> None:
    argv = f"--output_dir {tmp_path} --max_train_samples 96 --max_eval_samples 64 --metrics_backend numpy".split()
    result = text_classification.main(SHORT_RUN + argv + ["--per_device_train_batch_size", "8"])
    _finite_loss_and_metric(result)
    assert 0.0 <= result["eval"]["eval_f1"] <= 1.0
    card = (tmp_path / "README.md").read_text()
    assert "### Sharpness-aware training" in card and "sam_variant: ssam" in card


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
        (
            ["--model_name_or_path", "/no/such/model", "--dataset_name", "vader"],
            "--model_name_or_path /no/such/model is neither",
        ),
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
    report = (tmp_path / "results.md").read_text()
    header, separator, *rows = out["table"].splitlines()
    assert out["table"] in report and separator == "|" + "---|" * 11
    for column in ("mean ± 95 % CI", "Δ accuracy vs none, paired ± 95 % CI", "paired t p", "(sign test p)"):
        assert column in header
    assert [row.split(" | ")[:2] for row in rows] == [
        [f"| {lr:g}", v] for lr in (demo.BASE_LR, demo.LARGE_LR) for v in demo.VARIANTS
    ]
    for row in rows:  # none is the baseline; the others are paired with it over the 2 seeds
        cells = row.split(" | ")
        assert (cells[3:6] == ["—"] * 3) == (cells[1] == "none") and cells[5].startswith(("—", "0/2", "1/2", "2/2"))
    assert out["pairs"] and all(line in report for line in out["pairs"])  # ssam - sam at each learning rate
    saved = json.loads((tmp_path / "runs.json").read_text())
    assert [r["accuracy"] for r in saved] == [r["accuracy"] for r in runs] and "log_history" not in saved[0]
    assert (tmp_path / "demo.png").stat().st_size > 10_000


def _demo_run(lr: float, variant: str, seed: int, accuracy: float, loss: float = 0.5, eigen: float = 2.0) -> dict:
    return {"lr": lr, "variant": variant, "seed": seed, "accuracy": accuracy, "train_loss": loss,
            "hessian_top": eigen, "sam_sharpness": 0.01, "wall_time_s": 3.0,
            "collapsed": not loss < demo.COLLAPSED_LOSS}  # fmt: skip


def test_demo_t_distribution_matches_closed_forms_and_tables() -> None:
    for t in (0.1, 1.0, 4.3, 30.0):  # df 1 (Cauchy) and df 2 have closed forms
        assert demo.t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), rel=1e-12)
        assert demo.t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-12)
    assert demo.t_quantile(0.95, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-9)  # 12.706
    assert demo.t_quantile(0.95, 2) == pytest.approx(0.95 * math.sqrt(2 / (1 - 0.95**2)), rel=1e-9)  # 4.303
    table = {4: 2.776445, 9: 2.262157, 19: 2.093024, 29: 2.045230}  # two-sided 95 %, printed t tables
    assert {df: round(demo.t_quantile(0.95, df), 6) for df in table} == table
    assert demo.t_quantile(0.95, 10**6) == pytest.approx(1.959964, abs=1e-5)  # the normal limit
    assert demo.t_quantile(0.99, 9) == pytest.approx(3.249836, abs=1e-6)
    assert demo.t_two_sided_p(0.0, 5) == 1.0 and demo.t_two_sided_p(math.inf, 5) == 0.0


def test_demo_confidence_interval_and_paired_tests_match_a_hand_computation() -> None:
    # 1..5: mean 3, sample std sqrt(2.5), standard error sqrt(0.5); t(0.975, 4) = 2.776445 -> half-width 1.963243
    assert demo.mean_ci([1, 2, 3, 4, 5, math.nan]) == pytest.approx((3.0, 2.776445 * math.sqrt(0.5)), rel=1e-6)
    assert demo.mean_ci([7.0])[0] == 7.0 and math.isnan(demo.mean_ci([7.0])[1])
    # differences 1, 2, 0, 2, 2: mean 1.4, std sqrt(0.8), standard error 0.4, t = 3.5 on 4 degrees of freedom
    paired = demo.paired_difference(dict(enumerate([1, 2, 3, 4, 5])), dict(enumerate([2, 4, 3, 6, 7, 99])))
    assert paired.n == 5 and paired.mean == pytest.approx(1.4) and paired.higher == 4
    assert paired.half_width == pytest.approx(2.776445 * 0.4, rel=1e-6)
    assert paired.t_p == pytest.approx(0.0248962, rel=1e-5)  # the paired t-test's two-sided p, t = 3.5, df 4
    assert paired.sign_p == 0.125  # 4 of 4 non-tied differences positive: 2 / 2**4
    assert demo.sign_test_p([1, -1] + [1] * 8) == pytest.approx(2 * 11 / 1024)  # 9 of 10: 2 (1 + 10) / 2**10
    assert demo.sign_test_p([0.0, 0.0]) == 1.0


def test_demo_summary_is_mean_ci_and_paired_comparison_over_seeds() -> None:
    runs = [_demo_run(0.1, "none", s, a) for s, a in enumerate((0.80, 0.82, 0.84))]
    runs += [_demo_run(0.1, "ssam", s, a, loss, eigen=2.0 * (s + 1))
             for s, (a, loss) in enumerate(((0.83, 0.4), (0.84, 0.6), (0.88, math.nan)))]  # fmt: skip
    rows = demo.summarize(runs)
    # none: 80, 82, 84 -> mean 82, std 2, half-width t(0.975, 2) 4.302653 * 2 / sqrt 3 = 4.97
    # ssam: 83, 84, 88 -> mean 85, std sqrt 7 -> 6.57; differences 3, 2, 4 -> +3, std 1 -> 2.48;
    # t = 3 sqrt 3 = 5.196 on 2 degrees of freedom -> p = 1 - t / sqrt(2 + t^2) = 0.035; 3 of 3 above: sign p 0.25
    assert [row["accuracy"] for row in rows] == ["82 ± 5", "85 ± 6.6"]
    assert rows[1]["vs_baseline"] == "+3 ± 2.5" and rows[1]["t_p"] == "0.035" and rows[1]["higher"] == "3/3 (0.25)"
    assert rows[0]["vs_baseline"] == rows[0]["t_p"] == rows[0]["higher"] == "—"
    assert rows[1]["train_loss"] == "0.5 ± 1.3" and rows[1]["collapsed"] == "1/3"  # finite 0.4, 0.6: 12.7 * 0.1
    assert rows[1]["hessian_top"] == "4 ± 5"  # 2, 4, 6: std 2 -> 4.97
    assert "| 0.1 | ssam | 85 ± 6.6 | +3 ± 2.5 | 0.035 | 3/3 (0.25) | 0.5 ± 1.3 | 4 ± 5 | 0.01 ± 0 | 1/3 | 3.0 |" in (
        demo.format_table(rows)
    )
    runs += [_demo_run(0.1, "sam", s, a) for s, a in enumerate((0.81, 0.84, 0.86))]  # ssam - sam: 2, 0, 2
    assert demo.pairwise_lines(runs) == [
        "lr 0.1: sam − ssam = -1.33 ± 2.9 points (95 % CI, paired t p 0.18; sam above on 0/3 seeds, sign test p 0.5)"
    ]


def test_demo_compare_reports_how_far_each_cell_mean_moved() -> None:
    here = [_demo_run(0.2, "none", s, a) for s, a in enumerate((0.80, 0.70, 0.90))]
    there = [_demo_run(0.2, "none", s, a) for s, a in enumerate((0.80, 0.76, 0.90, 0.10))]  # seed 3: not here
    assert demo.compare_runs(here, there) == [
        "lr 0.2 none : mean 80.00 here, 82.00 there, shift -2.00; median per-seed |difference| 0.00; "
        "identical on 2/3 seeds"
    ]


def test_demo_weight_jitter_is_rounding_sized_and_fixed_by_the_seed() -> None:
    torch.manual_seed(0)
    model = demo.DigitsMLP(8)
    before = [p.detach().clone() for p in model.parameters()]
    demo.jitter_weights(model, 1e-6, seed=3)
    ratios = torch.cat([(p.detach() / b).flatten() - 1 for p, b in zip(model.parameters(), before)])
    assert 0 < ratios.abs().max() < 1e-5 and ratios.std() == pytest.approx(1e-6, rel=0.2)
    again = demo.DigitsMLP(8)
    again.load_state_dict(dict(zip(dict(model.named_parameters()), before)))
    demo.jitter_weights(again, 1e-6, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), model.parameters()))


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
