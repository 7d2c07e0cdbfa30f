"""SSAMTrainer around the step: repeated train() calls, settings changed after construction (hyperparameter
search), the optimizer it takes, the model card and the logged key names that integrations show."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _lm import Sequences, tiny_lm
from _reference import data
from _versions import TRANSFORMERS_4
from test_trainer import LR, InOrder, LinReg, Pairs, _args, _theta
from transformers import TrainingArguments

from hf_ssam import SSAMOptimizer, SSAMTrainer


def _trainer(tmp_path, theta, x, y, **kw):
    model = LinReg(theta)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    return InOrder(model=model, args=_args(tmp_path, **kw), train_dataset=Pairs(x, y), optimizers=(opt, None))


def test_metrics_of_one_train_call_do_not_leak_into_the_next(tmp_path):
    theta, x, y = data(n=16)
    kw = dict(sam_variant="ssam", sam_rho=0.2, per_device_train_batch_size=4, max_steps=4, logging_steps=3)
    trainer = _trainer(tmp_path, theta, x, y, **kw)
    trainer.train()  # step 4 is never logged: its metrics are still accumulated at the end
    after_first = _theta(trainer.model)
    trainer.train()  # a second run from the trained weights
    fresh = _trainer(tmp_path, after_first, x, y, **kw)  # the same second run in a new trainer
    fresh.train()
    second = [h for h in trainer.state.log_history if "sam/grad_norm" in h][0]
    expected = [h for h in fresh.state.log_history if "sam/grad_norm" in h][0]
    for key in ("sam/grad_norm", "sam/ascent_grad_norm", "sam/gamma", "sam/ascent_loss"):
        assert second[key] == pytest.approx(expected[key], abs=1e-12), key


@pytest.mark.parametrize(
    "field_name, value, match",
    [
        ("sam_variant", "SSAM", r"sam_variant='SSAM' is not supported; choose one of \['ssam'"),
        ("sam_rho", -1.0, r"sam_rho=-1.0 is invalid"),
        ("sam_renormalize", 0, r"sam_renormalize=0 is invalid"),
        ("sam_interval", 0, r"sam_interval=0 is invalid"),
    ],
)
def test_settings_changed_after_construction_are_checked_when_training_starts(tmp_path, field_name, value, match):
    theta, x, y = data(n=8)
    trainer = _trainer(tmp_path, theta, x, y, per_device_train_batch_size=4, max_steps=1)
    setattr(trainer.args, field_name, value)
    with pytest.raises(ValueError, match=match):
        trainer.train()


def _hp_trainer(tmp_path, seen):
    from transformers import TrainerCallback

    theta, x, y = data(n=16)

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen.append((args.sam_variant, args.sam_rho))

    return SSAMTrainer(
        model_init=lambda trial=None: LinReg(theta),
        args=_args(tmp_path, per_device_train_batch_size=4, max_steps=2, eval_strategy="no"),
        train_dataset=Pairs(x, y),
        eval_dataset=Pairs(x, y),
        callbacks=[Record()],
    )


def test_sam_settings_as_optuna_search_dimensions(tmp_path):
    pytest.importorskip("optuna")
    seen = []
    trainer = _hp_trainer(tmp_path, seen)

    def space(trial):
        return {
            "sam_variant": trial.suggest_categorical("sam_variant", ["ssam", "sam"]),
            "sam_rho": trial.suggest_float("sam_rho", 0.01, 0.2, log=True),
        }

    best = trainer.hyperparameter_search(hp_space=space, backend="optuna", n_trials=3, direction="minimize")
    assert len(seen) == 3 and set(best.hyperparameters) == {"sam_variant", "sam_rho"}
    assert all(v in ("ssam", "sam") and 0.01 <= rho <= 0.2 for v, rho in seen)
    assert len({rho for _, rho in seen}) == 3  # each trial trained with its own rho


def test_a_bad_search_value_fails_with_the_construction_message(tmp_path):
    pytest.importorskip("optuna")
    trainer = _hp_trainer(tmp_path, [])
    space = lambda trial: {"sam_variant": trial.suggest_categorical("sam_variant", ["SSAM"])}  # noqa: E731
    with pytest.raises(ValueError, match=r"sam_variant='SSAM' is not supported; choose one of"):
        trainer.hyperparameter_search(hp_space=space, backend="optuna", n_trials=1, direction="minimize")


def test_an_ssam_optimizer_is_refused_with_a_pointer_to_the_base_optimizer(tmp_path):
    theta, x, y = data(n=8)
    model = LinReg(theta)
    opt = SSAMOptimizer(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match=r"takes the \*base\* optimizer"):
        SSAMTrainer(model=model, args=_args(tmp_path), train_dataset=Pairs(x, y), optimizers=(opt, None))


def test_model_card_names_the_sam_settings_and_cites_ssam(tmp_path):
    args = _args(tmp_path, sam_variant="usam", sam_rho=0.07, sam_renormalize=True, sam_interval=2,
                 per_device_train_batch_size=2, max_steps=2)  # fmt: skip
    trainer = SSAMTrainer(model=tiny_lm(), args=args, train_dataset=Sequences([5, 9, 12, 3]))
    trainer.train()
    trainer.create_model_card(model_name="tiny")
    card = (tmp_path / "README.md").read_text()
    for line in ("- sam_variant: usam", "- sam_rho: 0.07", "- renormalization (g_asc rescaled to ‖g‖): True",
                 "- ascent mode: local (per-replica g)", "- sam_interval: 2"):  # fmt: skip
        assert line in card
    assert "arXiv:2401.07250" in card and "Stabilizing Sharpness-aware Minimization" in card
    trainer.create_model_card(model_name="tiny")  # written again: the section is there once
    assert (tmp_path / "README.md").read_text().count("### Sharpness-aware training") == 1


def test_tensorboard_shows_the_metrics_under_train_prefix(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))  # transformers 5
    # transformers 4.x reads the TensorBoard folder from its `logging_dir` argument
    where = {"logging_dir": str(tmp_path / "tb")} if "logging_dir" in TrainingArguments.__dataclass_fields__ else {}
    theta, x, y = data(n=8)
    trainer = _trainer(tmp_path, theta, x, y, per_device_train_batch_size=4, max_steps=2, report_to="tensorboard",
                       **where)  # fmt: skip
    trainer.train()
    events = EventAccumulator(str(next((tmp_path / "tb").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    own = "train/loss" if TRANSFORMERS_4 else "train/grad_norm"  # 4.x logs grad_norm only when it clips
    assert {"train/sam/grad_norm", "train/sam/gamma", "train/sam/ascent_loss", own} <= tags
    logged = [h["sam/gamma"] for h in trainer.state.log_history if "sam/gamma" in h]
    np.testing.assert_allclose([e.value for e in events.Scalars("train/sam/gamma")], logged, rtol=1e-6)
