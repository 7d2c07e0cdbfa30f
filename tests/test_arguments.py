"""SSAMTrainingArguments: parsing from the command line and YAML, validation, promotion."""

import dataclasses
import os
import re
import sys

import pytest
import transformers
from packaging.version import Version
from transformers import HfArgumentParser, TrainingArguments

from hf_ssam import SSAMTrainingArguments
from hf_ssam.arguments import _fsdp_version
from hf_ssam.zero import ALLOW_UNTESTED, check_deepspeed_version

TRANSFORMERS_4 = Version(transformers.__version__).major < 5


def _args(**kw):
    if TRANSFORMERS_4 and kw.get("fsdp"):
        # transformers 4.x ignores fsdp_config["fsdp_version"]: Accelerate builds FSDP_VERSION from the environment
        # (conftest restores os.environ after the test). transformers 5 defaults `fsdp=` to FSDP2.
        os.environ["FSDP_VERSION"] = str((kw.get("fsdp_config") or {}).get("fsdp_version", 2))
    return SSAMTrainingArguments(output_dir="out", report_to="none", use_cpu=True, **kw)


def test_defaults():
    args = _args()
    assert (args.sam_variant, args.sam_rho, args.sam_renormalize, args.sam_asam_eta) == ("ssam", 0.05, None, 0.01)
    assert (args.sam_sync_ascent, args.sam_interval, args.sam_replay_rng) == (False, 1, True)


def test_every_sam_field_is_prefixed_and_has_help():
    base = TrainingArguments.__dataclass_fields__
    own = [f for f in dataclasses.fields(SSAMTrainingArguments) if f.name not in base]
    assert own and all(f.name.startswith("sam_") for f in own)
    assert all(f.metadata.get("help") for f in own)
    for f in own:
        assert f"{f.name} (`" in SSAMTrainingArguments.__doc__, f"{f.name} is not documented in the docstring"


def test_command_line():
    parser = HfArgumentParser(SSAMTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", "o", "--sam_variant", "asam", "--sam_rho", "0.5", "--sam_renormalize", "true",
         "--sam_asam_eta", "0.1", "--sam_sync_ascent", "--sam_interval", "3", "--sam_replay_rng", "false",
         "--report_to", "none", "--use_cpu"]
    )  # fmt: skip
    assert args.sam_variant == "asam" and args.sam_rho == 0.5 and args.sam_renormalize is True
    assert args.sam_asam_eta == 0.1 and args.sam_sync_ascent is True and args.sam_interval == 3
    assert args.sam_replay_rng is False


def test_command_line_rejects_unknown_variant(capsys):
    parser = HfArgumentParser(SSAMTrainingArguments)
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", "o", "--sam_variant", "adam"])
    assert "sam_variant" in capsys.readouterr().err


def test_yaml(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("output_dir: o\nreport_to: none\nuse_cpu: true\nsam_variant: sam\nsam_rho: 0.2\n"
                   "sam_renormalize: true\nsam_interval: 2\n")  # fmt: skip
    (args,) = HfArgumentParser(SSAMTrainingArguments).parse_yaml_file(str(cfg))
    assert (args.sam_variant, args.sam_rho, args.sam_renormalize, args.sam_interval) == ("sam", 0.2, True, 2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sam_variant="adam"), r"sam_variant='adam'.*\['ssam', 'sam', 'usam', 'asam', 'none'\]"),
        (dict(sam_rho=-0.01), r"sam_rho=-0.01.*>= 0"),
        (dict(sam_rho=float("nan")), r"sam_rho=nan"),
        (dict(sam_variant="ssam", sam_renormalize=False), r"sam_renormalize=False.*sam_variant='ssam'"),
        (dict(sam_asam_eta=-1.0), r"sam_asam_eta=-1.0.*>= 0"),
        (dict(sam_interval=0), r"sam_interval=0.*>= 1"),
        (dict(fsdp=True), r"fsdp=True \(FSDP2\) with sam_sync_ascent=False is not supported.*sam_sync_ascent=True"),
        (
            dict(fsdp=True, fsdp_config={"fsdp_version": 1}, sam_sync_ascent=True),
            r"fsdp_version=1 is not supported.*fsdp_config=\{'fsdp_version': 2\}",
        ),
        (dict(fsdp=True, sam_sync_ascent=True, fp16=True), r"fp16=True is not supported.*Use bf16=True"),
    ],
)
def test_bad_input_raises_value_error_naming_field_value_and_choices(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _args(**kwargs)


def test_renormalize_false_is_fine_for_other_variants():
    assert _args(sam_variant="usam", sam_renormalize=False).sam_renormalize is False


def test_deepspeed_and_fsdp_are_allowed_without_sam():
    assert _args(sam_variant="none", fsdp="").sam_enabled is False
    assert _fsdp_version(_args(sam_variant="none", fsdp=True, fsdp_config={"fsdp_version": 1})) == 1


def test_fsdp2_is_allowed_with_the_synchronized_ascent_and_rechecked_at_train_time():
    args = _args(fsdp=True, fsdp_config={"fsdp_version": 2}, sam_sync_ascent=True, bf16=True)
    assert _fsdp_version(args) == 2
    args.sam_sync_ascent = False  # set after construction: train() runs the same checks
    with pytest.raises(ValueError, match="sam_sync_ascent=False is not supported"):
        args.check_sam_settings()


def test_fsdp_version_is_the_one_the_installed_transformers_builds(monkeypatch):
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    kwargs = dict(output_dir="out", report_to="none", use_cpu=True, fsdp=True, fsdp_config={"fsdp_version": 2},
                  sam_sync_ascent=True)  # fmt: skip
    if TRANSFORMERS_4:  # fsdp_config["fsdp_version"] ignored: Accelerate's default, FSDP1, and the way to FSDP2
        with pytest.raises(ValueError, match=r"fsdp=True with fsdp_version=1 is not supported.*FSDP_VERSION=2"):
            SSAMTrainingArguments(**kwargs)
    else:
        assert _fsdp_version(SSAMTrainingArguments(**kwargs)) == 2


def test_promotion_keeps_every_training_argument():
    plain = TrainingArguments(output_dir="o", learning_rate=0.123, gradient_accumulation_steps=3, report_to="none",
                              use_cpu=True, lr_scheduler_type="cosine", warmup_steps=7)  # fmt: skip
    promoted = SSAMTrainingArguments.from_training_arguments(plain, sam_rho=0.3)
    assert promoted.learning_rate == 0.123 and promoted.gradient_accumulation_steps == 3
    assert promoted.lr_scheduler_type == plain.lr_scheduler_type and promoted.warmup_steps == 7
    assert promoted.sam_rho == 0.3 and promoted.sam_variant == "ssam"


@pytest.mark.parametrize("value", [0, 1, 0.0, "false"])
def test_renormalize_accepts_only_none_or_a_bool(value):
    with pytest.raises(ValueError, match=rf"sam_renormalize={value!r} is invalid.*\[None, True, False\]"):
        _args(sam_variant="ssam", sam_renormalize=value)


@pytest.mark.parametrize("field_name", ["sam_rho", "sam_asam_eta"])
def test_numbers_must_not_be_booleans(field_name):
    with pytest.raises(ValueError, match=rf"{field_name}=True is invalid"):
        _args(**{field_name: True})


def test_renormalize_command_line_accepts_what_its_help_advertises(capsys):
    parser = HfArgumentParser(SSAMTrainingArguments)
    parser.print_help()
    help_text = capsys.readouterr().out
    advertised = help_text.split("--sam_renormalize")[1].split("}")[0].split("{")[1].split(",")
    assert advertised == ["True", "False"]  # unset = the default (on for ssam only)
    for word in advertised:
        (args,) = parser.parse_args_into_dataclasses(
            ["--output_dir", "o", "--sam_variant", "sam", "--sam_renormalize", word]
        )
        assert args.sam_renormalize is (word == "True")
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", "o"])
    assert args.sam_renormalize is None
    assert "g_asc to ||g|| (sam/grad_norm)" in " ".join(help_text.split())


def test_yaml_numbers_in_exponent_notation(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("output_dir: o\nreport_to: none\nsam_rho: 5e-2\nsam_asam_eta: 1e-3\n")  # PyYAML: strings
    (args,) = HfArgumentParser(SSAMTrainingArguments).parse_yaml_file(str(cfg))
    assert args.sam_rho == 0.05 and isinstance(args.sam_rho, float) and args.sam_asam_eta == 0.001
    with pytest.raises(ValueError, match=r"sam_rho='five' is invalid"):
        _args(sam_rho="five")


@pytest.mark.parametrize("field_name", ["sam_sync_ascent", "sam_replay_rng"])
@pytest.mark.parametrize("value", ["false", "true", None, 0, 1])
def test_switches_accept_only_bools(field_name, value):
    """`"false"` (and None, 0, 1) would silently act as a bool: refused at construction and when training starts."""
    match = rf"{field_name}={value!r} is invalid; choose one of \[True, False\] \(a bool, not {type(value).__name__}\)"
    with pytest.raises(ValueError, match=match):
        _args(**{field_name: value})
    args = _args()
    setattr(args, field_name, value)  # set afterwards, as a hyperparameter search would
    with pytest.raises(ValueError, match=match):
        args.check_sam_settings()


def test_switches_from_the_command_line_and_yaml_are_bools(tmp_path):
    parser = HfArgumentParser(SSAMTrainingArguments)
    for words, expected in (("false", False), ("true", True), ("False", False), ("yes", True), ("0", False)):
        (args,) = parser.parse_args_into_dataclasses(
            ["--output_dir", "o", "--sam_sync_ascent", words, "--sam_replay_rng", words]
        )
        assert args.sam_sync_ascent is expected and args.sam_replay_rng is expected
    cfg = tmp_path / "c.yaml"
    cfg.write_text("output_dir: o\nreport_to: none\nsam_sync_ascent: true\nsam_replay_rng: false\n")
    (args,) = parser.parse_yaml_file(str(cfg))
    assert args.sam_sync_ascent is True and args.sam_replay_rng is False
    cfg.write_text("output_dir: o\nreport_to: none\nsam_replay_rng: 'false'\n")  # quoted: a string
    with pytest.raises(ValueError, match=r"sam_replay_rng='false' is invalid; choose one of \[True, False\]"):
        parser.parse_yaml_file(str(cfg))


@pytest.mark.parametrize(
    "given, kwargs, match",
    [
        ("full_shard", {}, r"^fsdp='full_shard' \(FSDP2\) with sam_sync_ascent=False is not supported"),
        (["full_shard"], dict(sam_sync_ascent=True, fp16=True), r"^fsdp=\['full_shard'\] \(FSDP2\) with fp16=True"),
        (
            "full_shard auto_wrap",
            dict(fsdp_config={"fsdp_version": 1}, sam_sync_ascent=True),
            r"^fsdp='full_shard auto_wrap' with fsdp_version=1 is not supported",
        ),
    ],
)
def test_fsdp_refusal_quotes_the_value_as_given(given, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _args(fsdp=given, **kwargs)


def test_fsdp_refusal_at_train_time_quotes_the_value_as_given():
    args = _args(fsdp="full_shard", fsdp_config={"fsdp_version": 2}, sam_sync_ascent=True, bf16=True)
    assert args.fsdp != "full_shard"  # TrainingArguments converted it
    args.sam_sync_ascent = False
    with pytest.raises(ValueError, match=r"^fsdp='full_shard' \(FSDP2\) with sam_sync_ascent=False"):
        args.check_sam_settings()


@pytest.mark.parametrize("version", ["0.19.8", "0.19.9", "0.19.10"])
def test_a_tested_deepspeed_version_passes(version):
    check_deepspeed_version(version)


@pytest.mark.parametrize("version", ["0.19.7", "0.18.0", "0.20.0", "1.0.0"])
def test_a_deepspeed_version_outside_the_tested_range_is_refused(version, monkeypatch):
    monkeypatch.delenv(ALLOW_UNTESTED, raising=False)
    with pytest.raises(ValueError, match=rf"DeepSpeed {re.escape(version)} is outside the range.*>=0.19.8,<0.20"):
        check_deepspeed_version(version)
    monkeypatch.setenv(ALLOW_UNTESTED, "1")  # the user's own risk: a warning naming the range instead
    with pytest.warns(UserWarning, match=r"outside the range the SAM step is tested with \(>=0.19.8,<0.20\)"):
        check_deepspeed_version(version)


def test_a_missing_deepspeed_is_named_when_sam_asks_for_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed → ImportError
    with pytest.raises(ValueError, match=r"DeepSpeed is not installed: pip install 'hf_ssam\[deepspeed\]'"):
        _args(deepspeed={"zero_optimization": {"stage": 2}}, sam_sync_ascent=True)
