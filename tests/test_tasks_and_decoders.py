import math

import pytest
import torch

from taskmerge.decoders import DensePatchHead, build_decoder
from taskmerge.settings.builtin.tasks import build_builtin_task, builtin_task_names
from taskmerge.tasks.metrics import RMSE, Accuracy, MeanIoU, normalized


def test_metrics_hand_values():
    acc = Accuracy()
    acc.update(torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 0.0]]), torch.tensor([0, 1, 1]))
    assert acc.compute() == pytest.approx(200 / 3)

    miou = MeanIoU(2)
    logits = torch.zeros(1, 2, 1, 4)
    logits[0, 1, 0, :2] = 1.0  # predicts [1, 1, 0, 0]
    miou.update(logits, torch.tensor([[[1, 0, 0, 0]]]))
    # class 0: inter 2, union 3; class 1: inter 1, union 2
    assert miou.compute() == pytest.approx(100 * (2 / 3 + 1 / 2) / 2)

    rmse = RMSE()
    rmse.update(torch.tensor([[[[1.0, 3.0]]]]), torch.tensor([[[1.0, 1.0]]]))
    assert rmse.compute() == pytest.approx(math.sqrt(2.0))


def test_normalized_direction():
    assert normalized(45.0, 90.0, True) == pytest.approx(0.5)
    assert normalized(4.0, 2.0, False) == pytest.approx(0.5)


def test_dense_head_places_each_patch_prediction_at_its_pixels():
    head = DensePatchHead(embed_dim=4, num_outputs=1, patch_size=2, grid_size=(2, 3))
    with torch.no_grad():
        head.norm.weight.fill_(1.0)
        head.norm.bias.zero_()
        head.linear.weight.zero_()
        head.linear.bias.copy_(torch.arange(4.0))  # pixel (i, j) of every patch gets value 2*i + j
    out = head(torch.randn(1, 6, 4))
    assert out.shape == (1, 1, 4, 6)
    assert torch.equal(out[0, 0, :2, :2], torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
    assert torch.equal(out[0, 0, 2:, 4:], torch.tensor([[0.0, 1.0], [2.0, 3.0]]))


def test_build_decoder_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown task kind 'pose'"):
        build_decoder("pose", 8, 2, 4, (2, 2))


@pytest.mark.parametrize("name", builtin_task_names())
def test_builtin_tasks_are_deterministic_and_well_formed(name):
    a = build_builtin_task(name, 20, 5, 7, 32, seed=3)
    b = build_builtin_task(name, 20, 5, 7, 32, seed=3)
    c = build_builtin_task(name, 20, 5, 7, 32, seed=4)
    assert [len(a.splits[s]) for s in ("train", "val", "test")] == [20, 5, 7]
    assert torch.equal(a.splits["train"].images, b.splits["train"].images)
    assert not torch.equal(a.splits["train"].images, c.splits["train"].images)
    images = a.splits["train"].images
    assert images.shape == (20, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    targets = a.splits["test"].targets
    if a.kind == "depth":
        assert targets.shape == (7, 32, 32) and targets.min() >= 1.0 and targets.max() <= 10.0
    elif a.kind == "segmentation":
        assert targets.shape == (7, 32, 32) and targets.max() < a.num_outputs
    else:
        assert targets.shape == (7,) and targets.max() < a.num_outputs


def test_digits_use_the_real_scikit_learn_scans():
    from sklearn.datasets import load_digits

    task = build_builtin_task("digits", 100, 10, 10, 32, seed=0)
    assert set(task.splits["train"].targets.tolist()) <= set(load_digits().target.tolist())
    assert len(set(task.splits["train"].targets.tolist())) == 10


def test_unlabeled_images_are_seeded_subsets_of_train():
    task = build_builtin_task("textures", 50, 5, 5, 32, seed=0)
    first, again, other = task.unlabeled_images(8, 0), task.unlabeled_images(8, 0), task.unlabeled_images(8, 1)
    assert torch.equal(first, again) and not torch.equal(first, other)
    train = task.splits["train"].images.flatten(1)
    assert all((train == img.flatten()).all(1).any() for img in first)
    with pytest.raises(ValueError, match="51 unlabeled images asked for, it has 50 training images"):
        task.unlabeled_images(51, 0)


def test_protocol_train_subset_is_seeded_and_per_task_overrides_apply():
    from torch.utils.data import TensorDataset

    from taskmerge.selection.evaluation import DecoderProtocol
    from taskmerge.tasks import DatasetSplit, Split

    split = Split(torch.arange(40.0).view(40, 1, 1, 1).expand(40, 3, 2, 2).clone(), torch.arange(40))
    protocol = DecoderProtocol(train_images=10, seed=3, per_task={"digits": {"train_images": None, "lr": 0.5}})
    chosen = protocol.training_split(split).targets
    assert len(chosen) == 10 and torch.equal(chosen, protocol.training_split(split).targets)
    assert not torch.equal(chosen, torch.arange(10)) and torch.equal(chosen, chosen.sort().values), "seeded, not a prefix"
    assert not torch.equal(chosen, DecoderProtocol(train_images=10, seed=4).training_split(split).targets)
    digits = protocol.for_task("digits")
    assert digits.training_split(split) is split and digits.lr == 0.5 and protocol.for_task("shapes") == DecoderProtocol(train_images=10, seed=3)
    on_disk = DatasetSplit(TensorDataset(split.images, split.targets), {"dataset": "t"})
    subset = protocol.training_split(on_disk)
    assert subset.identity()["subset"] == chosen.tolist() and len(subset) == 10
