"""The dense tasks' metrics as streaming accumulators fitting `taskmerge.tasks.metrics.Metric`.

Both score at the ground truth's own resolution: predictions are resized (bilinear, align_corners False) to
each target, so `target` may be a batch tensor `[B, H, W]` or a list of `[H_i, W_i]` tensors of varying sizes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from taskmerge.settings.dense.datasets import ADE_NUM_CLASSES, EIGEN_CROP, IGNORE_INDEX, NYU_DEPTH_RANGE

Targets = torch.Tensor | Sequence[torch.Tensor]


def _resized(output: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """One `[C, h, w]` prediction resized to `size` with bilinear interpolation (align_corners False)."""
    if tuple(output.shape[-2:]) == tuple(size):
        return output
    return F.interpolate(output[None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0]


class SegmentationMIoU:
    """Mean IoU in percent as mmseg: drop gt == 255, per-class intersection and union summed over the whole split,
    nanmean over classes whose union is non-zero; `output` holds logits `[B, C, h, w]`."""

    name, higher_is_better = "miou", True

    def __init__(self, num_classes: int = ADE_NUM_CLASSES, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.intersection = torch.zeros(num_classes, dtype=torch.float64)
        self.area_pred = torch.zeros(num_classes, dtype=torch.float64)
        self.area_label = torch.zeros(num_classes, dtype=torch.float64)

    def update(self, output: torch.Tensor, target: Targets) -> None:
        for logits, label in zip(output, target):
            self.update_labels(_resized(logits, label.shape).argmax(0), label)

    def update_labels(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """Accumulate one image's predicted class map against its labels (both `[H, W]`)."""
        keep = label != self.ignore_index
        pred, label = pred[keep].long(), label[keep].long()
        hit = pred[pred == label]
        self.intersection += self._histogram(hit)
        self.area_pred += self._histogram(pred)
        self.area_label += self._histogram(label)

    def _histogram(self, values: torch.Tensor) -> torch.Tensor:
        """Counts of classes 0..C-1 (values outside are not counted, as mmseg's histc)."""
        values = values[(values >= 0) & (values < self.num_classes)]
        return torch.bincount(values, minlength=self.num_classes).double()

    def compute(self) -> float:
        union = self.area_pred + self.area_label - self.intersection
        return float(100.0 * torch.nanmean(self.intersection / union))


class DepthRMSE:
    """RMSE in metres as the DINOv2/Monocular-Depth-Estimation-Toolbox NYU protocol; `output` is `[B, 1, h, w]`.

    Predictions are clamped to [min, max] and resized to the ground truth; valid pixels have min < gt < max and
    lie inside `eval_box` (the Eigen crop by default; None scores the whole frame); RMSE per image, then the
    nanmean over images (an image with no valid pixel counts as NaN).
    """

    name, higher_is_better = "rmse", False

    def __init__(self, depth_range: tuple[float, float] = NYU_DEPTH_RANGE,
                 eval_box: tuple[int, int, int, int] | None = EIGEN_CROP) -> None:
        self.min_depth, self.max_depth = depth_range
        self.eval_box = eval_box
        self.per_image: list[float] = []

    def update(self, output: torch.Tensor, target: Targets) -> None:
        for pred, gt in zip(output, target):
            pred = _resized(pred.clamp(self.min_depth, self.max_depth), gt.shape)[0].double()
            valid = (gt > self.min_depth) & (gt < self.max_depth)
            if self.eval_box is not None:
                top, bottom, left, right = self.eval_box
                inside = torch.zeros_like(valid)
                inside[top:bottom, left:right] = True
                valid &= inside
            error = (pred[valid] - gt[valid].double()) ** 2
            self.per_image.append(float(error.mean().sqrt()) if valid.any() else float("nan"))

    def compute(self) -> float:
        return float(torch.tensor(self.per_image, dtype=torch.float64).nanmean())
