"""ScaLR's linear probe per point: the head's layout, the Lovász-softmax loss, training, and mIoU on every original
point through the nearest kept point."""

from __future__ import annotations

import torch

from taskmerge.settings.lidar.probe import IGNORE, PointHead, PointLabels, lovasz_softmax, probe_loss, score_probe, train_probe


def test_the_head_is_scalr_classif_with_a_zero_initialised_conv():
    head = PointHead(32, 5)
    assert list(head.state_dict()) == ["classif.0.weight", "classif.0.bias", "classif.0.running_mean", "classif.0.running_var",
                                       "classif.0.num_batches_tracked", "classif.1.weight", "classif.1.bias"]
    assert head.classif[1].weight.shape == (5, 32, 1) and not head.classif[1].weight.any()
    assert head(torch.randn(7, 32)).shape == (7, 5)


def test_lovasz_softmax_is_the_jaccard_loss_at_hard_predictions():
    labels = torch.tensor([0, 0, 1, 1, 1, 2, IGNORE])
    predicted = torch.tensor([0, 1, 1, 1, 2, 2, 0])
    probs = torch.nn.functional.one_hot(predicted, 4).double()
    iou = []
    keep = labels != IGNORE
    for c in (0, 1, 2):  # the classes present among the labelled points
        inter = ((predicted == c) & (labels == c) & keep).sum()
        union = (((predicted == c) & keep) | (labels == c)).sum()
        iou.append(float(inter / union))
    expected = sum(1 - v for v in iou) / 3
    assert abs(float(lovasz_softmax(probs, labels)) - expected) < 1e-12


def test_lovasz_softmax_is_zero_for_perfect_predictions_and_ignores_the_ignored():
    labels = torch.tensor([2, 0, 1, IGNORE])
    probs = torch.nn.functional.one_hot(torch.tensor([2, 0, 1, 0]), 3).double()
    assert float(lovasz_softmax(probs, labels)) == 0.0
    assert float(probe_loss(torch.randn(3, 3), torch.full((3,), IGNORE))) == 0.0


def test_the_probe_learns_separable_points_and_is_scored_on_every_original_point():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=generator) * 3
    features, labels = [], []
    for _ in range(12):
        label = torch.randint(0, 3, (50,), generator=generator)
        features.append(centres[label] + torch.randn(50, 8, generator=generator) * 0.3)
        labels.append(label)
    def read(index):
        return torch.cat([features[int(i)] for i in index]), torch.cat([labels[int(i)] for i in index])

    head = train_probe(read, len(features), 8, 3, epochs=20, lr=1e-2, batch_size=4, weight_decay=3e-3, seed=0)
    # two kept points carried to five original points; the last original point is ignored
    kept_features = torch.stack([centres[0], centres[2]])
    target = PointLabels(labels=torch.tensor([0, 0, 2, 2, IGNORE]), kept=torch.tensor([0, 2]),
                         upsample=torch.tensor([0, 0, 1, 1, 1]))
    assert score_probe(head, [(kept_features, target)], 3) == 100.0
    wrong = PointLabels(labels=torch.tensor([0, 0, 2, 0, IGNORE]), kept=torch.tensor([0, 2]), upsample=torch.tensor([0, 0, 1, 1, 1]))
    # class 0: 2 of 3 labelled points hit (IoU 2/3); class 2: predicted on 2 points, 1 right (IoU 1/2)
    assert abs(score_probe(head, [(kept_features, wrong)], 3) - 100 * (2 / 3 + 1 / 2) / 2) < 1e-9
