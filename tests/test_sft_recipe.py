"""``recipes/sft_lora.py``: SSAM + LoRA supervised fine-tuning through TRL's ``SFTTrainer``.

Configs parse into ``sam_arguments(SFTConfig)``, the offline default's CPU settings stay out of Hub runs, the
offline corpus and tokenizer are built without a download, a tiny run of both variants trains end to end, and only
the LoRA adapter's weights change while the base model stays bitwise frozen.
"""

from __future__ import annotations

import math
import runpy
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import HfArgumentParser
from trl import SFTConfig

from hf_ssam import sam_arguments
from recipes import _recipe_utils, sft_lora

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
CONFIGS = sorted((RECIPES / "configs").glob("sft_lora_*.yaml"))
DATACLASSES = (sft_lora.ModelArguments, sft_lora.DataArguments, sft_lora.SSAMSFTConfig)
#: A few seconds on a CPU: a width-32 model, a few sentences, a few steps.
TINY_RUN = (
    "--max_steps 3 --logging_steps 1 --disable_tqdm true --tiny_hidden_size 32 --tiny_num_heads 2 "
    "--max_train_samples 24 --max_eval_samples 8 --per_device_train_batch_size 8 --max_length 24"
).split()


def test_configs_exist_for_the_offline_run_and_a_hub_run() -> None:
    assert [c.name for c in CONFIGS] == ["sft_lora_ssam.yaml", "sft_lora_tiny_ssam.yaml"]
    assert sft_lora.DEFAULT_CONFIG in CONFIGS


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_parses_into_the_sft_arguments(config: Path) -> None:
    parser = HfArgumentParser(DATACLASSES)
    values = _recipe_utils.load_config(config, parser)
    # use_cpu: the GPU config asks for bf16, which a machine without a GPU may refuse.
    model_args, data_args, training_args = parser.parse_dict({**values, "use_cpu": True})
    assert type(training_args) is sam_arguments(SFTConfig) and isinstance(training_args, SFTConfig)
    assert training_args.sam_variant == "ssam" and training_args.sam_rho == values["sam_rho"] > 0
    assert model_args.use_peft and model_args.lora_r == values["lora_r"]
    assert "use_cpu" not in values, "a config must not pin the device: it would carry over to real runs"
    assert config.read_text().startswith("#"), "every config starts with a header comment"


def test_offline_default_sets_the_cpu_settings() -> None:
    model_args, data_args, training_args = sft_lora.parse_arguments([])
    assert (model_args.model_name_or_path, data_args.dataset_name) == (sft_lora.TINY_MODEL, sft_lora.SKLEARN_TEXTS)
    assert training_args.bf16 is False and training_args.gradient_checkpointing is False
    assert data_args.compare is True and training_args.sam_variant == "ssam"
    assert training_args.use_cpu is False


@pytest.mark.parametrize(
    "argv",
    [["--model_name_or_path", "Qwen/Qwen2.5-0.5B"], ["--dataset_name", "stanfordnlp/imdb"], ["--config", "none"]],
)
def test_a_model_or_data_option_keeps_the_sft_defaults(argv: list[str]) -> None:
    """The offline run's CPU settings (no bf16, no gradient checkpointing, 200 steps) do not leak into Hub runs."""
    # use_cpu: SFTConfig's bf16 default is on, which TrainingArguments refuses on a machine without a GPU.
    args = sft_lora.parse_arguments([*argv, "--use_cpu", "true"])
    plain_argv = [] if argv == ["--config", "none"] else argv
    plain = HfArgumentParser(DATACLASSES).parse_args_into_dataclasses([*plain_argv, "--use_cpu", "true"])
    offline = yaml.safe_load(sft_lora.DEFAULT_CONFIG.read_text())
    for key in offline:
        resolved = next(getattr(a, key) for a in args if hasattr(a, key))
        assert resolved == next(getattr(a, key) for a in plain if hasattr(a, key)), f"{key} leaked from the config"
    training_args = args[2]
    assert training_args.bf16 is True and training_args.gradient_checkpointing is True  # SFTConfig's own
    assert training_args.max_steps == -1 and args[1].compare is False


def test_command_line_overrides_the_yaml() -> None:
    config = RECIPES / "configs" / "sft_lora_ssam.yaml"
    model_args, _, training_args = sft_lora.parse_arguments(
        ["--config", str(config), "--sam_rho", "0.2", "--lora_r", "4", "--use_cpu", "true"]
    )
    assert training_args.sam_rho == 0.2 and model_args.lora_r == 4  # from the command line
    values = yaml.safe_load(config.read_text())
    assert model_args.model_name_or_path == values["model_name_or_path"]  # from the YAML
    assert training_args.learning_rate == values["learning_rate"]


def test_sklearn_descriptions_are_prose_without_markup() -> None:
    sentences = sft_lora.sklearn_descriptions()
    assert len(sentences) > 200 and sentences == sft_lora.sklearn_descriptions()  # fixed order
    assert all(len(s.split()) >= 4 for s in sentences)
    for marker in ("``", ":ref:", ">>>", "<http", "]_", "::", "====", "----", "**"):
        assert not any(marker in s for s in sentences), marker
    assert any("Fisher" in s for s in sentences)  # the iris description is in


def test_word_level_tokenizer_built_offline() -> None:
    tokenizer = sft_lora.word_level_tokenizer(["the cat sat.", "the dog sat!", "a cat"], max_length=16)
    # min_frequency 2: the, cat, sat; punctuation and once-seen words map to <unk>.
    assert set(tokenizer.get_vocab()) == {"<unk>", "<pad>", "<s>", "</s>", "the", "cat", "sat"}
    ids = tokenizer("The cat sat on the mat").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["the", "cat", "sat", "<unk>", "the", "<unk>"]
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.model_max_length) == ("<pad>", "</s>", 16)


def test_lora_config_of_the_options() -> None:
    model_args = sft_lora.ModelArguments(lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj"])
    config = sft_lora.lora_config(model_args)
    assert (config.r, config.lora_alpha, set(config.target_modules)) == (4, 8, {"q_proj", "v_proj"})
    assert sft_lora.lora_config(sft_lora.ModelArguments()).target_modules == "all-linear"
    assert sft_lora.lora_config(sft_lora.ModelArguments(use_peft=False)) is None


def test_tiny_run_of_both_variants(tmp_path: Path) -> None:
    results = sft_lora.main(TINY_RUN + ["--output_dir", str(tmp_path)])
    assert list(results) == ["none", "ssam"]
    for variant, result in results.items():
        assert math.isfinite(result["train_loss"]) and math.isfinite(result["eval"]["eval_loss"])
        assert result["eval_perplexity"] == pytest.approx(math.exp(result["eval"]["eval_loss"]))
        has_sam_logs = any("sam/gamma" in row for row in result["log_history"])
        assert has_sam_logs == (variant == "ssam")
        assert (tmp_path / variant / "adapter_config.json").is_file()  # the adapter is what gets saved
        card = (tmp_path / variant / "README.md").read_text()  # the Trainer's card with the SAM section appended
        assert "### Sharpness-aware training" in card
        assert ("sam_variant: ssam" if variant == "ssam" else "sam_variant='none'") in card
    table = (tmp_path / "results.md").read_text()
    assert table == sft_lora.format_table(results) + "\n"
    assert table.startswith("| variant | train loss | eval loss | eval perplexity | wall time (s) |")
    assert "\n| none | " in table and "\n| ssam | " in table


def test_only_the_lora_weights_change(tmp_path: Path) -> None:
    model_args, data_args, training_args = sft_lora.parse_arguments(
        TINY_RUN + ["--output_dir", str(tmp_path), "--compare", "false", "--report_to", "none"]
    )
    splits = sft_lora.load_text_splits(data_args, training_args.seed)
    tokenizer = sft_lora.load_tokenizer(model_args, splits["train"]["text"], training_args.max_length)
    trainer = sft_lora.build_trainer(model_args, splits, training_args, tokenizer)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert len(trainable) < len(before)

    trainer.train()

    after = dict(trainer.model.named_parameters())
    assert set(after) == set(before)
    for name, p in after.items():
        if name in trainable:  # B starts at zero, so A moves from the second step on: both have moved after 3
            assert not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert torch.equal(p, before[name]), f"{name} of the frozen base model changed"
    assert any("sam/gamma" in row for row in trainer.state.log_history)


def test_bad_input_fails_before_training(tmp_path: Path) -> None:
    out = ["--output_dir", str(tmp_path)]
    no_model = "--model_name_or_path /no/such/model --dataset_name sklearn-descriptions --use_cpu true".split()
    with pytest.raises(ValueError, match="--model_name_or_path /no/such/model is neither"):
        sft_lora.main([*no_model, *out])
    with pytest.raises(ValueError, match="--compare runs sam_variant none next to a SAM variant"):
        sft_lora.main(["--compare", "true", "--sam_variant", "none", *out])
    with pytest.raises(ValueError, match="Set --dataset_name"):
        sft_lora.main(["--model_name_or_path", "tiny-llama", "--use_cpu", "true", *out])
    with pytest.raises(ValueError, match="sam_rho"):
        sft_lora.main(["--sam_rho", "-1", *out])


@pytest.mark.parametrize("style", ["module", "file"])
def test_recipe_runs_as_a_module_and_as_a_file(
    style: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m recipes.sft_lora --help`` and ``python recipes/sft_lora.py --help``, in this process."""
    monkeypatch.setattr(sys, "argv", ["sft_lora", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        if style == "module":
            monkeypatch.delitem(sys.modules, "recipes.sft_lora")  # run it afresh, as `python -m` does
            runpy.run_module("recipes.sft_lora", run_name="__main__", alter_sys=True)
        else:
            monkeypatch.syspath_prepend(str(RECIPES))  # what `python recipes/sft_lora.py` does
            runpy.run_path(str(RECIPES / "sft_lora.py"), run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--config CONFIG" in out and "--lora_r LORA_R" in out and "--sam_rho SAM_RHO" in out
