"""The linear probe per point of ScaLR's protocol (spec lidar §4), its loss and its mIoU on every original point.

Head: BatchNorm1d over the 768 (or C) channels, then a zero-initialised 1x1 Conv1d to the classes, named like the
reference Segmenter's `classif` so a release's head loads into it. Loss: cross-entropy (ignore 255) plus
Lovász-softmax (Berman et al., CVPR 2018) over the classes present in the batch. The backbone is frozen and in eval
mode; the head's BatchNorm trains on the points of a batch of scans (the valid points only: the reference's padded
points, spec §9 Q6, are left out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from taskmerge.decoders.training import PairedBatches, train_module
from taskmerge.tasks.metrics import MeanIoU

IGNORE = 255
WARMUP_EPOCHS = 2  # ScaLR's linear probing: per-iteration warm-up over 2 epochs, then cosine
FINAL_LR = 1e-5  # ... down to this learning rate


@dataclass(frozen=True)
class PointLabels:
    """The labels of one scan: train ids of every original point (255 = ignore), which original points the
    preprocessing kept, and for every original point its nearest kept point (predictions are carried back)."""

    labels: torch.Tensor  # [N_original] long
    kept: torch.Tensor  # [M] long, indices into the original points
    upsample: torch.Tensor  # [N_original] long, indices into the kept points

    @property
    def kept_labels(self) -> torch.Tensor:
        """Train ids of the kept points, the probe's training targets."""
        return self.labels[self.kept]


class PointHead(nn.Module):
    """ScaLR's linear probe: `classif = [BatchNorm1d(C), Conv1d(C, classes, 1)]`, the conv zero-initialised;
    points `[P, C]` in, logits `[P, classes]` out."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.classif = nn.Sequential(nn.BatchNorm1d(channels), nn.Conv1d(channels, classes, 1))
        nn.init.zeros_(self.classif[1].weight)
        nn.init.zeros_(self.classif[1].bias)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return self.classif(points.T.unsqueeze(0))[0].T


def _lovasz_grad(sorted_truth: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovász extension of the Jaccard loss at the errors sorted in decreasing order."""
    total = sorted_truth.sum()
    intersection = total - sorted_truth.cumsum(0)
    union = total + (1.0 - sorted_truth).cumsum(0)
    jaccard = 1.0 - intersection / union
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])


def lovasz_softmax(probs: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """Lovász-softmax loss of class probabilities `[P, C]` against labels `[P]`, averaged over the classes present
    among the labelled points (0 when no point is labelled)."""
    keep = labels != ignore_index
    probs, labels = probs[keep], labels[keep]
    losses = []
    for c in labels.unique():
        truth = (labels == c).to(probs.dtype)
        errors = (truth - probs[:, c]).abs()
        order = errors.argsort(descending=True)
        losses.append(torch.dot(errors[order], _lovasz_grad(truth[order])))
    return torch.stack(losses).mean() if losses else probs.sum() * 0.0


def probe_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ScaLR's probe loss: cross-entropy (ignore 255) + Lovász-softmax, weight 1 each."""
    if not bool((labels != IGNORE).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels, ignore_index=IGNORE) + lovasz_softmax(logits.softmax(1), labels)


def train_probe(read: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], scans: int, channels: int, classes: int,
                epochs: int, lr: float, batch_size: int, weight_decay: float, seed: int, desc: str | None = None) -> PointHead:
    """A probe trained on `scans` scans, `batch_size` per step: `read(indices)` gives their point features `[P, C]`
    and labels `[P]`, concatenated (AdamW, warm-up over 2 epochs, cosine to 1e-5)."""
    torch.manual_seed(seed)
    head = PointHead(channels, classes)
    data = PairedBatches(read, scans)
    train_module(head, data.inputs, data.targets, probe_loss, epochs, lr, batch_size, seed, weight_decay,
                 warmup=min(WARMUP_EPOCHS / epochs, 0.5), desc=desc, floor=FINAL_LR / lr)
    return head.eval()


@torch.no_grad()
def score_probe(head: PointHead, scans: Iterable[tuple[torch.Tensor, PointLabels]], classes: int) -> float:
    """mIoU (percent) of one confusion matrix over every original point of the scans (255 left out), each point
    taking the prediction of its nearest kept point."""
    head.eval()
    metric = MeanIoU(classes, ignore_index=IGNORE)
    for features, target in scans:
        predicted = head(features).argmax(1)
        metric.update_labels(predicted[target.upsample], target.labels)
    return metric.compute()
