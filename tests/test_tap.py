import math

import pytest
import torch
from torch import nn

from taskmerge import checkpoints
from taskmerge.selection.tap import base_tap, compute_tap, dissimilarity, tap_task, teacher_features
from taskmerge.tasks import Samples


def test_l2_and_cosine_pooled_hand_values():
    student = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    teacher = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(dissimilarity(student, teacher, "l2"), torch.tensor([5.0, math.sqrt(2)]))
    # cosine distance of orthogonal vectors is 1; of a vector with itself 0
    assert torch.allclose(dissimilarity(student[1:], teacher[1:], "cosine"), torch.tensor([1.0]))
    assert abs(tap_task(student, student, "cosine")) < 1e-12
    assert abs(tap_task(student, teacher, "l2") - (5.0 + math.sqrt(2)) / 2) < 1e-12


def test_token_features_average_per_token_distances():
    # one image, two tokens: distances 5 and 0 -> 2.5 (not the distance of the averaged tokens, 2.5 too
    # here by design, so check a case where they differ as well)
    student = torch.tensor([[[3.0, 4.0], [1.0, 1.0]]])
    teacher = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])
    assert abs(tap_task(student, teacher, "l2") - 2.5) < 1e-12
    opposite = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])
    # per-token: |(1,0)-(-1,0)| = 2 and |(-1,0)-(1,0)| = 2 -> 2; pooled-first would give 0
    assert abs(tap_task(opposite, opposite.flip(1), "l2") - 2.0) < 1e-12
    # cosine per token: opposite directions -> distance 2 each
    assert abs(tap_task(opposite, opposite.flip(1), "cosine") - 2.0) < 1e-12


class _Linear(nn.Module):
    embed_dim = 2

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))

    def features(self, images, kind):
        pooled = images.flatten(1)[:, :2] * self.scale
        return pooled if kind == "pooled" else pooled[:, None, :].repeat(1, 3, 1)


def test_compute_tap_per_task_and_mean():
    images = {"a": Samples.of(torch.ones(4, 1, 2, 1)), "b": Samples.of(torch.zeros(4, 1, 2, 1))}
    teachers = {"a": torch.zeros(4, 2), "b": torch.zeros(4, 2)}
    scores = compute_tap(_Linear(3.0), images, teachers, "pooled", "l2")
    assert abs(scores["a"] - 3 * math.sqrt(2)) < 1e-6 and scores["b"] == 0.0
    assert abs(scores["mean"] - 1.5 * math.sqrt(2)) < 1e-6


def test_teacher_cache_hit_and_keys(tmp_path):
    calls = []

    def load(path):
        calls.append(path)
        return _Linear(float(checkpoints.load_state_dict(path)["scale"]))

    ckpt_a = checkpoints.save_state_dict(tmp_path / "a.safetensors", {"scale": torch.tensor(2.0)})
    ckpt_b = checkpoints.save_state_dict(tmp_path / "b.safetensors", {"scale": torch.tensor(5.0)})
    images = Samples.of(torch.arange(8.0).view(4, 1, 2, 1))
    cache = tmp_path / "cache"
    first = teacher_features(load, ckpt_a, images, "pooled", {"name": "toy"}, cache)
    again = teacher_features(load, ckpt_a, images, "pooled", {"name": "toy"}, cache)
    assert torch.equal(first, again) and len(calls) == 1, "second call must be served from the cache"
    assert len(list((cache / "teacher").glob("*.safetensors"))) == 1

    other_images = teacher_features(load, ckpt_a, Samples.of(images.take_all() + 1), "pooled", {"name": "toy"}, cache)
    other_ckpt = teacher_features(load, ckpt_b, images, "pooled", {"name": "toy"}, cache)
    other_kind = teacher_features(load, ckpt_a, images, "tokens", {"name": "toy"}, cache)
    assert len(calls) == 4 and len(list((cache / "teacher").glob("*.safetensors"))) == 4
    assert not torch.equal(other_images, first) and not torch.equal(other_ckpt, first)
    assert other_kind.shape == (4, 3, 2)


def test_teacher_cache_notices_rewritten_checkpoint(tmp_path):
    path = tmp_path / "ft.safetensors"
    checkpoints.save_state_dict(path, {"scale": torch.tensor(2.0)})
    load = lambda p: _Linear(float(checkpoints.load_state_dict(p)["scale"]))  # noqa: E731
    images = Samples.of(torch.ones(2, 1, 2, 1))
    before = teacher_features(load, path, images, "pooled", {}, tmp_path / "cache")
    checkpoints.save_state_dict(path, {"scale": torch.tensor(7.0)})
    after = teacher_features(load, path, images, "pooled", {}, tmp_path / "cache")
    assert torch.allclose(after, before * 3.5)


def test_base_tap_is_computed_once_and_keyed_by_every_checkpoint(tmp_path):
    loads = []

    def load(path):
        loads.append(path.name)
        return _Linear(float(checkpoints.load_state_dict(path)["scale"]))

    save = lambda name, scale: checkpoints.save_state_dict(tmp_path / name, {"scale": torch.tensor(scale)})  # noqa: E731
    base, finetuned = save("base.safetensors", 1.0), {"a": save("a.safetensors", 3.0), "b": save("b.safetensors", 2.0)}
    unlabeled = {"a": Samples.of(torch.ones(4, 1, 2, 1)), "b": Samples.of(2 * torch.ones(4, 1, 2, 1))}
    cache = tmp_path / "cache"
    first = base_tap(load, base, finetuned, unlabeled, "pooled", "l2", {"name": "toy"}, cache)
    # pooled features are (x, x) * scale: θ0 is |3 - 1|·√2 from `a`'s teacher on ones, |2 - 1|·2√2 from `b`'s on twos
    assert first == pytest.approx({"a": 2 * math.sqrt(2), "b": 2 * math.sqrt(2), "mean": 2 * math.sqrt(2)})
    assert sorted(loads) == ["a.safetensors", "b.safetensors", "base.safetensors"]
    assert base_tap(load, base, finetuned, unlabeled, "pooled", "l2", {"name": "toy"}, cache) == first
    assert len(loads) == 3 and len(list((cache / "base_tap").glob("*.json"))) == 1, "the second call is served from the cache"

    cosine = base_tap(load, base, finetuned, unlabeled, "pooled", "cosine", {"name": "toy"}, cache)
    assert cosine == pytest.approx({"a": 0.0, "b": 0.0, "mean": 0.0}), "same direction: cosine distance 0"
    save("base.safetensors", 2.0)  # a rewritten base is noticed
    assert base_tap(load, base, finetuned, unlabeled, "pooled", "l2", {"name": "toy"}, cache)["a"] == pytest.approx(math.sqrt(2))
    assert len(list((cache / "base_tap").glob("*.json"))) == 3
