"""Task metrics as streaming accumulators (update per batch, compute once) with their direction."""

from __future__ import annotations

from typing import Protocol

import torch


class Metric(Protocol):
    name: str
    higher_is_better: bool

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None: ...

    def compute(self) -> float: ...


class Accuracy:
    """Top-1 accuracy in percent; `output` holds logits `[B, C]`."""

    name, higher_is_better = "accuracy", True

    def __init__(self) -> None:
        self.correct, self.total = 0, 0

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        self.correct += int((output.argmax(1) == target).sum())
        self.total += target.numel()

    def compute(self) -> float:
        return 100.0 * self.correct / max(self.total, 1)


class MeanIoU:
    """Mean intersection-over-union in percent over classes present in prediction or target (nanmean of the
    per-class IoU of one confusion matrix); targets equal to `ignore_index` are left out. `output` holds logits
    `[B, C, ...]` (pixels) or `[P, C]` (points)."""

    name, higher_is_better = "miou", True

    def __init__(self, num_classes: int, ignore_index: int | None = None) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        self.update_labels(output.argmax(1), target)

    def update_labels(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Accumulate predicted classes against targets of the same shape."""
        pred, target = pred.flatten(), target.flatten()
        if self.ignore_index is not None:
            keep = target != self.ignore_index
            pred, target = pred[keep], target[keep]
        index = target * self.num_classes + pred
        self.confusion += torch.bincount(index, minlength=self.num_classes**2).view(self.num_classes, -1)

    def compute(self) -> float:
        inter = self.confusion.diag().double()
        union = self.confusion.sum(0).double() + self.confusion.sum(1).double() - inter
        present = union > 0
        return float(100.0 * (inter[present] / union[present]).mean())


class RMSE:
    """Root mean squared error over all pixels; `output` is `[B, 1, H, W]`, `target` `[B, H, W]`."""

    name, higher_is_better = "rmse", False

    def __init__(self) -> None:
        self.squared, self.count = 0.0, 0

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        self.squared += float(((output[:, 0] - target) ** 2).double().sum())
        self.count += target.numel()

    def compute(self) -> float:
        return (self.squared / max(self.count, 1)) ** 0.5


def normalized(metric: float, finetuned: float, higher_is_better: bool) -> float:
    """Performance relative to the fine-tuned model: merged/ft (↑ metrics) or ft/merged (↓ metrics).

    Either way 1.0 means "as good as the fine-tuned encoder" and larger is better.
    """
    if higher_is_better:
        return metric / finetuned
    return finetuned / metric
