"""Decoders trained on top of an encoder's features: an image-level linear classifier and a dense
per-patch linear head that predicts every pixel of its patch (segmentation logits or depth)."""

from __future__ import annotations

import torch
from torch import nn


class LinearClassifier(nn.Module):
    """Linear classifier on the pooled image embedding `[B, D] -> [B, C]`."""

    feature_kind = "pooled"

    def __init__(self, embed_dim: int, num_outputs: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.linear = nn.Linear(embed_dim, num_outputs)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(features))


class DensePatchHead(nn.Module):
    """Per-patch linear decoder `[B, N, D] -> [B, C, H, W]`: each token predicts its p×p pixels."""

    feature_kind = "tokens"

    def __init__(self, embed_dim: int, num_outputs: int, patch_size: int, grid_size: tuple[int, int]) -> None:
        super().__init__()
        self.num_outputs = num_outputs
        self.patch_size = patch_size
        self.grid_size = tuple(grid_size)
        self.norm = nn.LayerNorm(embed_dim)
        self.linear = nn.Linear(embed_dim, num_outputs * patch_size * patch_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch = features.shape[0]
        (gh, gw), p, c = self.grid_size, self.patch_size, self.num_outputs
        out = self.linear(self.norm(features)).view(batch, gh, gw, c, p, p)
        return out.permute(0, 3, 1, 4, 2, 5).reshape(batch, c, gh * p, gw * p)


def build_decoder(kind: str, embed_dim: int, num_outputs: int, patch_size: int, grid_size: tuple[int, int]) -> nn.Module:
    """Decoder factory by task kind: `classification` → LinearClassifier, `segmentation`/`depth` → DensePatchHead."""
    if kind == "classification":
        return LinearClassifier(embed_dim, num_outputs)
    if kind in ("segmentation", "depth"):
        return DensePatchHead(embed_dim, num_outputs, patch_size, grid_size)
    raise ValueError(f"unknown task kind {kind!r}; expected classification, segmentation or depth")
