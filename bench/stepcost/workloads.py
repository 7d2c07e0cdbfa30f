"""The models of the step-cost benchmark: a small BERT and a small timm ViT built from configs (no download).

``--device cuda`` adds ``vit_s16``: a ViT-S/16 at 224 px, batch 256, bf16 (compute-bound on one large GPU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "LR",
    "RHO",
    "WORKLOADS",
    "ImageClassifier",
    "Workload",
    "bert_workload",
    "vit_s16_workload",
    "vit_workload",
]

RHO = 0.05
LR = 1e-4


class ImageClassifier(nn.Module):
    """A timm backbone with the Trainer's calling convention: ``forward(pixel_values, labels) -> {loss, logits}``."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.backbone(pixel_values)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


@dataclass
class Workload:
    """A model built from a config, a synthetic dataset and a batch size."""

    name: str
    build: Callable[[], nn.Module]
    samples: Callable[[int], list[dict[str, torch.Tensor]]]
    batch_size: int
    description: str
    bf16: bool = False  # bf16 autocast (the Trainer's bf16=True; the hand-written loops' autocast)


def bert_workload(quick: bool) -> Workload:
    from transformers import BertConfig, BertForSequenceClassification

    if quick:
        cfg = BertConfig(
            vocab_size=128,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=16,
            num_labels=2,
        )
        seq, batch = 16, 4
    else:
        cfg = BertConfig(
            vocab_size=4096,
            hidden_size=192,
            num_hidden_layers=6,
            num_attention_heads=4,
            intermediate_size=768,
            max_position_embeddings=64,
            num_labels=2,
        )
        seq, batch = 64, 16

    def samples(n: int) -> list[dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size, (n, seq), generator=g)
        labels = torch.randint(0, 2, (n,), generator=g)
        mask = torch.ones(seq, dtype=torch.long)
        return [{"input_ids": ids[i], "attention_mask": mask, "labels": labels[i]} for i in range(n)]

    def build() -> nn.Module:
        torch.manual_seed(0)
        return BertForSequenceClassification(cfg)

    desc = (
        f"BertForSequenceClassification hidden={cfg.hidden_size} layers={cfg.num_hidden_layers} "
        f"vocab={cfg.vocab_size}, batch {batch} x seq {seq}"
    )
    return Workload("bert", build, samples, batch, desc)


def vit_workload(quick: bool) -> Workload:
    from timm.models.vision_transformer import VisionTransformer

    if quick:
        kw = dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
        batch = 4
    else:
        kw = dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, num_classes=10)
        batch = 16

    def samples(n: int) -> list[dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 3, kw["img_size"], kw["img_size"], generator=g)
        labels = torch.randint(0, 10, (n,), generator=g)
        return [{"pixel_values": x[i], "labels": labels[i]} for i in range(n)]

    def build() -> nn.Module:
        torch.manual_seed(0)
        return ImageClassifier(VisionTransformer(**kw))

    desc = (
        f"timm VisionTransformer embed={kw['embed_dim']} depth={kw['depth']} "
        f"img={kw['img_size']} patch={kw['patch_size']}, batch {batch}"
    )
    return Workload("vit", build, samples, batch, desc)


def vit_s16_workload(quick: bool) -> Workload:
    """ViT-S/16 (embed 384, depth 12, 6 heads) on 224 px images, batch 256, bf16: compute-bound on an H200."""
    from timm.models.vision_transformer import VisionTransformer

    if quick:
        kw = dict(img_size=32, patch_size=16, embed_dim=48, depth=2, num_heads=2, num_classes=10)
        batch = 4
    else:
        kw = dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, num_classes=1000)
        batch = 256

    def samples(n: int) -> list[dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 3, kw["img_size"], kw["img_size"], generator=g)
        labels = torch.randint(0, kw["num_classes"], (n,), generator=g)
        return [{"pixel_values": x[i], "labels": labels[i]} for i in range(n)]

    def build() -> nn.Module:
        torch.manual_seed(0)
        return ImageClassifier(VisionTransformer(**kw))

    desc = (
        f"timm VisionTransformer (ViT-S/16) embed={kw['embed_dim']} depth={kw['depth']} "
        f"img={kw['img_size']} patch={kw['patch_size']}, batch {batch}, bf16"
    )
    return Workload("vit_s16", build, samples, batch, desc, bf16=True)


WORKLOADS: dict[str, Callable[[bool], Workload]] = {
    "bert": bert_workload,
    "vit": vit_workload,
    "vit_s16": vit_s16_workload,
}
