"""A tiny float64 GPT-2 and token batches with unequal label counts, plus the SAM step computed by hand.

The hand computation uses only the model's own mean loss and `torch.autograd`: for each group of sequences
(one micro-batch, or the same micro-batch of every process), ``g`` is the gradient of its mean loss per label
token, ``e = ρ·g`` (``ρ·g/‖g‖`` for sam), ``g_asc`` the gradient at ``w + e``, ``γ = ‖g‖/‖g_asc‖``.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

VOCAB, LENGTH = 32, 16


def tiny_lm(kind: str = "llama") -> torch.nn.Module:
    """A float64 causal LM without dropout. The Trainer counts a Llama's label tokens shifted by one (as its loss
    does) and a GPT-2's unshifted (GPT2LMHeadModel has no registered loss type)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=8, n_layer=1, n_head=2, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)  # fmt: skip
        return GPT2LMHeadModel(cfg).double()
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=LENGTH,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)  # fmt: skip
    return LlamaForCausalLM(cfg).double()


class Sequences(Dataset):
    """Token sequences whose label counts differ a lot (padding labelled -100), in a fixed order."""

    def __init__(self, lengths: list[int], seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for length in lengths:
            ids = torch.randint(0, VOCAB, (LENGTH,), generator=g)
            labels = ids.clone()
            labels[length:] = -100
            self.items.append({"input_ids": ids, "labels": labels})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


def label_tokens(labels: torch.Tensor, shifted: bool = True) -> int:
    """Label tokens: shifted by one (those a causal LM's loss averages over) or all non-ignored labels."""
    return int((labels[..., 1:] if shifted else labels).ne(-100).sum())


def _grad(model, params, batches, shifted):
    """∇ of the summed token loss over ``batches`` (a list of (input_ids, labels)) divided by their label count."""
    total = sum(label_tokens(lab, shifted) for _, lab in batches)
    loss = sum(model(input_ids=ids, labels=lab).loss * label_tokens(lab) for ids, lab in batches) / total
    return [g.detach() for g in torch.autograd.grad(loss, params)]


def _norm(ts):
    return torch.sqrt(sum((t**2).sum() for t in ts))


def hand_sam_gradient(model, groups, coefs, variant: str, rho: float, shifted: bool = True):
    """Σ_j coef_j · γ_j · g_asc_j, and the list of ‖g_j‖ (one per group)."""
    params = list(model.parameters())
    w0 = [p.detach().clone() for p in params]
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for batches, coef in zip(groups, coefs):
        g = _grad(model, params, batches, shifted)
        g_norm = _norm(g)
        norms.append(float(g_norm))
        scale = rho / g_norm if variant == "sam" else rho  # e = ρ·g/‖g‖ (sam) or ρ·g
        with torch.no_grad():
            for p, gi in zip(params, g):
                p.add_(scale * gi)  # w + e
        g_asc = _grad(model, params, batches, shifted)
        with torch.no_grad():
            for p, w in zip(params, w0):
                p.copy_(w)
        gamma = g_norm / _norm(g_asc) if variant == "ssam" else 1.0  # γ = ‖g‖/‖g_asc‖
        for t, ga in zip(total, g_asc):
            t.add_(coef * gamma * ga)
    return total, norms
