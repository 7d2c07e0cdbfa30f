"""Worker for tests/test_deepspeed.py: SSAMTrainer under DeepSpeed ZeRO 1/2/3, 2 CPU processes, gloo.

Launched by the tests as users launch training:

    torchrun --standalone --nproc_per_node 2 tests/deepspeed_worker.py --out /tmp/d --runs '[{"name": "a", ...}]'

`TrainingArguments(deepspeed=config, use_cpu=True)` runs the real engine: DeepSpeed picks its CPU accelerator and
gloo by itself, `Trainer` → `accelerator.prepare` → `deepspeed.initialize` builds the ZeRO optimizer around the
Trainer's SGD, and the engine reduces, clips and steps as on GPUs. One thing is left out: DeepSpeed's CPU
communication backend compiles a shared-memory op at start-up (minutes) that serves only inference all-reduces;
`main` turns that build off (`build_shm_op` returns None, DeepSpeed's own fallback), training collectives are gloo's.

A run trains the MLP of tests/fsdp_trainer_worker.py for a few steps and writes <out>/<name>.rank<r>.pt: the weights
at the start, DeepSpeed's fp32 master weights at the end (gathered, only to compare them), the inputs of every
forward pass, the logs, and the engine's step count. Runs of kind ``refusal`` build trainers from an Accelerate
DeepSpeed config and save the error messages.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.utils.data import SequentialSampler

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's hf_ssam

from _lm import Sequences, tiny_lm  # noqa: E402  (tests/, the script's own folder)
from _teardown import leave  # noqa: E402
from fsdp_trainer_worker import MLP, Regression, SummedMLP, environment  # noqa: E402

from hf_ssam import SSAMTrainer, SSAMTrainingArguments  # noqa: E402


def ds_config(spec: dict) -> dict:
    zero = {"stage": spec["stage"], **spec.get("zero", {})}
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",  # max_grad_norm
        "zero_allow_untested_optimizer": True,  # the Trainer's torch SGD as DeepSpeed's client optimizer
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},  # transformers 4.x reads a config without an fp16 section as fp16
    }


class DropoutMLP(MLP):
    """The MLP with dropout before the head: both passes must draw the same masks."""

    def __init__(self):
        super().__init__()
        self.dropout = torch.nn.Dropout(0.3)

    def predict(self, x):
        return self.head(self.dropout(self.blocks(x))).squeeze(-1).float()


class InOrder(SSAMTrainer):
    momentum = 0.9

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)

    def create_optimizer(self, *args, **kwargs):
        """SGD with the run's momentum (transformers 4.x ignores `optim_args` for `optim="sgd"`)."""
        if self.optimizer is None:
            params = [p for p in self.model.parameters() if p.requires_grad]
            self.optimizer = torch.optim.SGD(params, lr=self.args.learning_rate, momentum=self.momentum)
        return self.optimizer


def make_args(out: str, spec: dict, **overrides) -> SSAMTrainingArguments:
    values = dict(
        output_dir=os.path.join(out, spec["name"]), report_to="none", use_cpu=True, save_strategy="no",
        disable_tqdm=True, logging_steps=1, max_steps=spec.get("steps", 4), per_device_train_batch_size=4,
        gradient_accumulation_steps=spec.get("accumulation", 1), learning_rate=0.05, lr_scheduler_type="constant",
        max_grad_norm=spec.get("max_grad_norm", 1.0),
        sam_replay_rng=spec.get("replay_rng", True),
        bf16=spec.get("bf16", False), sam_variant=spec.get("variant", "ssam"), sam_rho=spec.get("rho", 0.1),
        sam_sync_ascent=True, seed=0, dataloader_num_workers=0, deepspeed=ds_config(spec),
    )  # fmt: skip
    values.update(overrides)
    return SSAMTrainingArguments(**values)


def build(out: str, spec: dict, **overrides) -> tuple[InOrder, list]:
    if spec.get("model") == "lm":
        return build_lm(out, spec, **overrides)
    model = SummedMLP() if spec.get("token") else DropoutMLP() if spec.get("dropout") else MLP()
    seen: list = []
    model.register_forward_pre_hook(
        lambda m, a, kw: seen.append((kw["x"].detach().clone(), kw["labels"].detach().clone())), with_kwargs=True
    )
    trainer = InOrder(model=model, args=make_args(out, spec, **overrides), train_dataset=Regression(spec.get("token")))
    if spec.get("token"):  # the loss divides by num_items_in_batch, declared: no loss probe
        trainer.loss_is_scaled_for_ga = True
    return trainer, seen


def build_lm(out: str, spec: dict, **overrides) -> tuple[InOrder, list]:
    """A tiny Llama (float32), token-normalized loss, unequal label tokens per micro-batch and per rank; with
    ``lora``, LoRA adapters on q/v (peft)."""
    model = tiny_lm().float()
    if spec.get("lora"):
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                          task_type="CAUSAL_LM")  # fmt: skip
        model = get_peft_model(model, lora)
    seen: list = []
    model.register_forward_pre_hook(  # the passes, not the once-per-run loss probe (under no_grad)
        lambda m, a, kw: (
            seen.append((kw["input_ids"].clone(), kw["labels"].clone())) if torch.is_grad_enabled() else None
        ),
        with_kwargs=True,
    )
    values = dict(per_device_train_batch_size=2, steps=spec.get("steps", 1), learning_rate=0.5, max_grad_norm=0.0,
                  sam_rho=0.05)  # fmt: skip
    values.update(overrides)
    steps = values.pop("steps")
    args = make_args(out, {**spec, "steps": steps}, **values)
    trainer = InOrder(model=model, args=args, train_dataset=Sequences(spec["lengths"]))
    trainer.momentum = 0.0  # plain SGD: the hand computation is one step of w − lr·g
    return trainer, seen


def master_weights(trainer: InOrder) -> torch.Tensor:
    """DeepSpeed's fp32 master weights, assembled from the partitions (only to compare them)."""
    return torch.cat([safe_full(p).reshape(-1) for p in trainer.model.parameters()])


def safe_full(p: torch.nn.Parameter) -> torch.Tensor:
    """A parameter's full value: DeepSpeed's fp32 master copy where it holds one (trainable), else the module's."""
    from deepspeed.utils import safe_get_full_fp32_param

    if p.requires_grad:
        return safe_get_full_fp32_param(p).detach().float().clone()
    if hasattr(p, "ds_id"):  # a frozen ZeRO-3 parameter: gathered to read it
        import deepspeed

        with deepspeed.zero.GatheredParameters([p]):
            return p.detach().float().clone()
    return p.detach().float().clone()


def run_train(out: str, spec: dict) -> dict:
    if "accelerate_env" in spec:  # DeepSpeed from an Accelerate config, as `accelerate launch --config_file` sets it
        with environment(**spec["accelerate_env"]):
            trainer, seen = build(out, spec, deepspeed=None)
            return _run_train(out, spec, trainer, seen)
    trainer, seen = build(out, spec)
    return _run_train(out, spec, trainer, seen)


def _run_train(out: str, spec: dict, trainer: InOrder, seen: list) -> dict:
    start = torch.cat([p.detach().reshape(-1).float().clone() for p in trainer.model.parameters()])
    start_named = {n: p.detach().float().clone() for n, p in trainer.model.named_parameters()}
    resume = spec.get("resume_at")
    if resume:  # stop at a checkpoint, then resume into a fresh trainer (other initial weights) up to `steps`
        trainer, seen = build(out, spec, max_steps=resume, save_strategy="steps", save_steps=resume)
        trainer.train()
        trainer, seen = build(out, spec)
        with torch.no_grad():
            for p in trainer.model.parameters():
                p.add_(1.0)  # the checkpoint must overwrite these
        trainer.train(resume_from_checkpoint=os.path.join(out, spec["name"], f"checkpoint-{resume}"))
    else:
        trainer.train()
    engine = trainer.model_wrapped
    sam_set = trainer._sam_zero.params() if trainer._sam_zero is not None else []
    backup = trainer._sam_zero_step.backup or []
    logs = [{k: v for k, v in h.items() if k.startswith("sam/") or k in ("loss", "grad_norm")}
            for h in trainer.state.log_history]  # fmt: skip
    return {
        "start": start,
        "start_named": start_named,
        "weights": master_weights(trainer),
        "forward_inputs": seen,
        "logs": logs,
        "engine": type(engine).__name__,
        "stage": engine.zero_optimization_stage(),
        "engine_global_steps": engine.global_steps,
        "trainer_global_step": trainer.state.global_step,
        "bf16": engine.bfloat16_enabled(),
        "from_accelerate_config": trainer.args.deepspeed is None and trainer.is_deepspeed_enabled,
        "sam_set": [n for n, p in trainer.model.named_parameters() if any(p is q for q in sam_set)],
        "trainable": [n for n, p in trainer.model.named_parameters() if p.requires_grad],
        "backup_numel": sum(b.numel() for b in backup),
        "named_weights": {n: safe_full(p) for n, p in trainer.model.named_parameters()},
        "checkpoints": sorted(os.listdir(os.path.join(out, spec["name"])))
        if os.path.isdir(os.path.join(out, spec["name"]))
        else [],
    }


def run_dpo(out: str, spec: dict) -> dict:
    """TRL's DPOTrainer with SSAMMixin under ZeRO: the policy is the SAM set, the reference model is never touched."""
    from test_mixin import _dpo_data, tiny_llama, word_tokenizer
    from trl import DPOConfig, DPOTrainer

    from hf_ssam import SSAMMixin, sam_arguments

    class SSAMDPOTrainer(SSAMMixin, DPOTrainer):
        pass

    model, ref = tiny_llama(torch.float32), tiny_llama(torch.float32)
    ref_before = {n: p.detach().clone() for n, p in ref.named_parameters()}
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = sam_arguments(DPOConfig)(
        output_dir=os.path.join(out, spec["name"]), report_to="none", use_cpu=True, save_strategy="no",
        disable_tqdm=True, logging_steps=1, max_steps=3, per_device_train_batch_size=1, gradient_accumulation_steps=2,
        learning_rate=0.1, lr_scheduler_type="constant", optim="sgd", max_grad_norm=0.0, seed=0, bf16=False,
        dataset_num_proc=None, sam_variant=spec.get("variant", "ssam"), sam_rho=spec.get("rho", 0.05),
        sam_sync_ascent=True, deepspeed=ds_config(spec),
    )  # fmt: skip
    trainer = SSAMDPOTrainer(model=model, ref_model=ref, args=args, train_dataset=_dpo_data(),
                             processing_class=word_tokenizer())  # fmt: skip
    ref_engine = trainer.ref_model
    ref_module = getattr(ref_engine, "module", ref_engine)
    seen = []  # the reference model's weights at each of its forwards: never perturbed
    ref_module.register_forward_pre_hook(
        lambda m, a: seen.append(torch.equal(m.model.embed_tokens.weight, ref_before["model.embed_tokens.weight"]))
    )
    trainer.train()
    engine = trainer.model_wrapped
    sam_set = trainer._sam_zero.params() if trainer._sam_zero is not None else []
    return {
        "start_named": start,
        "named_weights": {n: safe_full(p) for n, p in trainer.model.named_parameters()},
        "ref_unchanged": all(torch.equal(p, ref_before[n]) for n, p in ref_module.named_parameters()),
        "ref_forwards_at_its_weights": seen,
        "sam_set_is_policy": len(sam_set) == sum(p.requires_grad for p in trainer.model.parameters())
        and all(any(p is q for q in trainer.model.parameters()) for p in sam_set),
        "logs": [
            {k: v for k, v in h.items() if "runtime" not in k and "per_second" not in k}
            for h in trainer.state.log_history
        ],  # fmt: skip
        "engine_global_steps": engine.global_steps,
        "trainer_global_step": trainer.state.global_step,
    }


def run_fault(out: str, spec: dict) -> dict:
    """An exception in the second pass of a micro-batch (the ``fault_at``-th forward under grad): the weights the
    forward reads (parameters, or ZeRO-3 partitions) are back at w bitwise when it reaches the caller."""

    def weights() -> list[torch.Tensor]:
        return [(p.ds_tensor if hasattr(p, "ds_tensor") else p).detach().clone() for p in trainer.model.parameters()]

    class Faulty(InOrder):
        calls = 0
        snapshots: dict = {}

        def compute_loss(self, *args, **kwargs):
            if torch.is_grad_enabled():
                type(self).calls += 1
                if type(self).calls == spec["fault_at"] - 1:
                    self.snapshots["at_w"] = weights()
                if type(self).calls == spec["fault_at"]:
                    self.snapshots["at_w_plus_e"] = weights()
                    raise RuntimeError("injected fault in the second pass")
            return super().compute_loss(*args, **kwargs)

    trainer = Faulty(model=MLP(), args=make_args(out, spec), train_dataset=Regression(False))
    try:
        trainer.train()
        message = "no exception"
    except RuntimeError as err:
        message = str(err)
    after = weights()
    at_w, at_w_plus_e = Faulty.snapshots["at_w"], Faulty.snapshots["at_w_plus_e"]
    return {
        "message": message,
        "restored": all(torch.equal(a, b) for a, b in zip(after, at_w)),
        "was_perturbed": any(not torch.equal(a, b) for a, b in zip(at_w_plus_e, at_w)),
    }


def run_refusal(out: str, spec: dict) -> dict:
    """Trainers built from an Accelerate DeepSpeed config (no `deepspeed=` argument), as `accelerate launch` sets
    it up, and settings changed after construction."""
    messages = {}
    cases = {
        "local_ascent": ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, {"sam_sync_ascent": False}),
        "offload": ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "cpu"}, {}),
        "accepted": ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, {}),
        "plain_local": ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, {"sam_variant": "none", "sam_sync_ascent": False}),
    }
    for case, (env, overrides) in cases.items():
        with environment(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_GRADIENT_ACCUMULATION_STEPS="1", **env):
            args = make_args(out, {"name": f"{spec['name']}-{case}", "stage": 2}, deepspeed=None, **overrides)
            try:
                trainer = InOrder(model=MLP(), args=args, train_dataset=Regression(False))
                messages[case] = f"accepted, deepspeed={trainer.is_deepspeed_enabled}"
            except ValueError as err:
                messages[case] = str(err)
                continue
            if case == "accepted":  # a setting changed after construction is checked again when training starts
                trainer.args.sam_sync_ascent = False
                try:
                    trainer.train()
                    messages["changed_before_train"] = "trained"
                except ValueError as err:
                    messages["changed_before_train"] = str(err)
    return {"messages": messages}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", required=True, help="JSON list of run specs")
    ns = parser.parse_args()
    torch.set_num_threads(1)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # see the module docstring
    for spec in json.loads(ns.runs):
        kind = spec.get("kind", "train")
        result = {"refusal": run_refusal, "dpo": run_dpo, "fault": run_fault, "train": run_train}[kind](ns.out, spec)
        result["world_size"] = dist.get_world_size()
        torch.save(result, os.path.join(ns.out, f"{spec['name']}.rank{dist.get_rank()}.pt"))
    leave()


if __name__ == "__main__":
    main()
