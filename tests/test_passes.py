"""`leave_no_trace`: the second pass of a step leaves the trainer's bookkeeping as the first pass left it."""

from __future__ import annotations

from collections import defaultdict

import torch

from hf_ssam.passes import leave_no_trace


class Bookkeeper:
    def __init__(self):
        self.metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.total_tokens = 10
        self.counter = torch.tensor(5)
        self.history = [1, 2]
        self.helper = object()


def _record(b: Bookkeeper, n: int) -> None:
    """What a compute_loss does: append metrics, replace a list, count tokens, add and rebind attributes."""
    for _ in range(n):
        b.metrics["train"]["entropy"].append(0.5)
    b.metrics["train"]["num_tokens"] = [b.total_tokens]
    b.metrics["train"]["new_metric"].append(1.0)
    b.total_tokens += 7
    b.counter += 3  # in place
    b.history.append(3)
    b.helper = object()
    b.created = 1


def test_everything_the_block_did_is_undone_in_place():
    b = Bookkeeper()
    _record(b, 2500)  # the first pass: more values than any fixed budget would allow
    metrics, train, history, helper = b.metrics, b.metrics["train"], b.history, b.helper
    before = {k: list(v) for k, v in train.items()}
    with leave_no_trace(b):
        _record(b, 3)  # the second pass
    assert b.metrics is metrics and b.metrics["train"] is train and b.history is history  # same objects
    assert {k: list(v) for k, v in train.items()} == before and len(train["entropy"]) == 2500
    assert b.total_tokens == 17 and b.counter.item() == 8 and b.history == [1, 2, 3] and b.helper is helper
    assert b.created == 1  # set before the block (by the first pass): kept


def test_attributes_added_by_the_block_are_removed():
    b = Bookkeeper()
    with leave_no_trace(b):
        b.created = 1
        b.metrics["eval"]["x"].append(1)
    assert not hasattr(b, "created") and "x" not in b.metrics["eval"]


def test_model_sized_tensors_are_not_copied():
    b = Bookkeeper()
    b.weights = torch.zeros(1000)
    with leave_no_trace(b):
        b.weights += 1  # state that is not bookkeeping: in-place changes to big tensors are not undone
    assert b.weights.sum().item() == 1000
