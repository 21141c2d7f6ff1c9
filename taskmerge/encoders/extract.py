"""Batched, gradient-free feature extraction through the encoder contract."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


@torch.no_grad()
def extract_features(encoder: nn.Module, images: torch.Tensor, kind: str, batch_size: int = 256) -> torch.Tensor:
    """`encoder.features(images, kind)` over `images` in batches, in eval mode, as float32 on the CPU."""
    encoder.eval()
    device = next(encoder.parameters()).device
    chunks = [
        encoder.features(images[i : i + batch_size].to(device), kind).float().cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks)


@torch.no_grad()
def extract_batches(encoder: nn.Module, batches: Iterable[torch.Tensor], kind: str) -> torch.Tensor:
    """`encoder.features(batch, kind)` of every batch, in eval mode, concatenated as float32 on the CPU."""
    encoder.eval()
    device = next(encoder.parameters()).device
    return torch.cat([encoder.features(batch.to(device), kind).float().cpu() for batch in batches])


@torch.no_grad()
def extract_split(encoder: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (float32, CPU) and targets of every (images, targets) batch, for splits read from disk."""
    encoder.eval()
    device = next(encoder.parameters()).device
    features, targets = [], []
    for images, labels in batches:
        features.append(encoder.features(images.to(device), kind).float().cpu())
        targets.append(labels)
    return torch.cat(features), torch.cat(targets)
