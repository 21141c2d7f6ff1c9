"""Dense metrics against hand-computed cases: mmseg mIoU and the NYU RMSE protocol."""

from __future__ import annotations

import math

import pytest
import torch

from taskmerge.settings.dense.metrics import DepthRMSE, SegmentationMIoU


def _logits(pred: list[list[int]], num_classes: int) -> torch.Tensor:
    """One-hot logits `[1, C, H, W]` whose argmax is `pred`."""
    return torch.nn.functional.one_hot(torch.tensor(pred), num_classes).permute(2, 0, 1)[None].float()


def test_miou_ignores_255_and_skips_classes_absent_everywhere():
    metric = SegmentationMIoU(num_classes=4)
    gt = torch.tensor([[[0, 0, 1], [1, 255, 2]]])
    pred = [[0, 1, 1], [1, 2, 0]]  # the ignored pixel's prediction (2) must not count
    metric.update(_logits(pred, 4), gt)
    # class 0: pred {(0,0),(1,2)}, gt {(0,0),(0,1)} -> I 1, U 3
    # class 1: pred {(0,1),(0,2),(1,0)}, gt {(0,2),(1,0)} -> I 2, U 3; class 2: pred {}, gt {(1,2)} -> I 0, U 1
    # class 3: absent from gt and pred -> NaN, skipped
    assert metric.compute() == pytest.approx(100 * (1 / 3 + 2 / 3 + 0) / 3)


def test_miou_accumulates_over_the_split_not_per_image():
    metric = SegmentationMIoU(num_classes=2)
    metric.update(_logits([[0, 0, 0, 0]], 2), torch.tensor([[[0, 0, 0, 1]]]))
    metric.update(_logits([[1]], 2), torch.tensor([[[1]]]))
    # class 0: I 3, U 4; class 1: I 1, U 2 (a per-image mean would give (3/4 + 0)/2 and 1)
    assert metric.compute() == pytest.approx(100 * (3 / 4 + 1 / 2) / 2)


def test_miou_scores_at_each_targets_resolution():
    metric = SegmentationMIoU(num_classes=3)
    low = _logits([[2, 2], [2, 2]], 3)  # constant logits upsample to constant class 2
    targets = [torch.full((5, 7), 2), torch.tensor([[2, 255], [1, 2]])]
    metric.update(torch.cat([low, low]), targets)
    # class 2: I 35 + 2, pred area 35 + 3, label area 35 + 2 -> IoU 37/38; class 1: I 0, U 1; class 0 NaN
    assert metric.compute() == pytest.approx(100 * (37 / 38 + 0) / 2)


def test_rmse_eigen_crop_range_and_per_image_mean():
    gt = torch.full((480, 640), 2.0)
    gt[100, 100] = 0.0  # no depth: ignored
    gt[101, 100] = 12.0  # beyond max depth: ignored
    pred = torch.full((1, 1, 480, 640), 3.0)
    pred[0, 0, 100:102, 100] = 50.0  # errors only on ignored pixels
    pred[0, 0, :45] = 100.0  # outside the Eigen crop rows
    pred[0, 0, :, 601:] = 100.0  # outside the Eigen crop cols
    metric = DepthRMSE()
    metric.update(pred, gt[None])
    assert metric.per_image == [pytest.approx(1.0)]
    metric.update(torch.full((1, 1, 60, 80), 5.0), [gt])  # a low-resolution prediction, resized to 480x640
    assert metric.per_image[-1] == pytest.approx(3.0)
    assert metric.compute() == pytest.approx(2.0)  # the mean of per-image RMSEs, not sqrt((1 + 9) / 2)


def test_rmse_clamps_predictions_and_skips_images_without_valid_pixels():
    metric = DepthRMSE(eval_box=None)
    metric.update(torch.full((1, 1, 2, 2), 30.0), torch.full((1, 2, 2), 9.0))  # clamped to 10 -> error 1
    metric.update(torch.full((1, 1, 2, 2), 1.0), torch.zeros(1, 2, 2))  # nothing valid -> NaN
    assert metric.per_image[0] == pytest.approx(1.0) and math.isnan(metric.per_image[1])
    assert metric.compute() == pytest.approx(1.0)
    assert not metric.higher_is_better and SegmentationMIoU().higher_is_better
