"""A damaged cache entry (truncated, zeroed in place, checksum missing) is named in a warning, removed and
recomputed, never used; a damaged file the user supplied is named in the error and never rebuilt."""

import json

import pytest
import torch
from torch import nn

from taskmerge import cache, checkpoints
from taskmerge.settings.clip import release as release_zoo
from taskmerge.cache import DamagedCacheEntry
from taskmerge.selection.tap import teacher_features
from taskmerge.tasks import Samples
from taskmerge.settings.builtin.tasks import build_builtin_task
from taskmerge.settings.clip import tasks as clip_tasks
from taskmerge.settings.builtin.zoo import get_builtin_zoo

ENCODER = {"name": "builtin_vit", "img_size": 32, "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0}
RECIPE = {"pretrain": {"n_images": 64, "epochs": 1, "lr": 1e-3, "batch_size": 32},
          "finetune": {"epochs": 1, "lr": 1e-3, "batch_size": 32}}


def truncate(path):
    """Keep the first half of the file, as a full disk or a killed copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def zero(path, offset=-256, length=128):
    """Overwrite `length` bytes at `offset` (from the end if negative) with zeros, keeping the size."""
    size = path.stat().st_size
    with path.open("r+b") as handle:
        handle.seek(offset % size)
        handle.write(bytes(length))
    assert path.stat().st_size == size


@pytest.fixture()
def new_process(monkeypatch):
    """Forget the fingerprints this process memoised, as a later run starts without them."""
    return lambda: monkeypatch.setattr(checkpoints, "_FINGERPRINTS", {})


def test_json_entry_round_trip_and_every_kind_of_damage(tmp_path, new_process):
    path = tmp_path / "refs" / "entry.json"
    assert cache.read_json_entry(path) is None, "absent: None, and no warning"
    cache.write_json_entry(path, {"a": [1, 2.5]})
    assert cache.checksum_path(path).read_text().strip() == checkpoints.fingerprint(path)
    assert cache.read_json_entry(path) == {"a": [1, 2.5]}

    for damage, reason in [(truncate, "do not match"), (lambda p: zero(p, 2, 3), "do not match"),
                           (lambda p: cache.checksum_path(p).unlink(), "no checksum")]:
        cache.write_json_entry(path, {"a": [1, 2.5]})
        damage(path)
        new_process()
        with pytest.warns(DamagedCacheEntry, match=rf"{path}: .*{reason}") as caught:
            assert cache.read_json_entry(path) is None
        assert "recomputed" in str(caught[0].message)
        assert not path.exists() and not cache.checksum_path(path).exists()

    cache.write_text_entry(path, "{not json")
    with pytest.warns(DamagedCacheEntry, match=rf"{path}: it cannot be parsed \(JSONDecodeError"):
        assert cache.read_json_entry(path) is None


def test_text_and_tensor_entries(tmp_path, new_process):
    text = cache.write_text_entry(tmp_path / "key.txt", "abc")
    tensors = cache.write_tensors_entry(tmp_path / "t.safetensors", {"x": torch.arange(4.0)})
    assert cache.read_text_entry(text) == "abc" and torch.equal(cache.read_tensors_entry(tensors)["x"], torch.arange(4.0))
    truncate(tensors)
    new_process()
    with pytest.warns(DamagedCacheEntry, match="t.safetensors"):
        assert cache.read_tensors_entry(tensors) is None


class _Scale(nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))

    def features(self, images, kind):
        return images.flatten(1) * self.scale


@pytest.mark.parametrize("damage", [truncate, zero], ids=["truncated", "zeroed-same-size"])
def test_damaged_teacher_features_are_recomputed(tmp_path, new_process, damage):
    calls = []

    def load(path):
        calls.append(path)
        return _Scale(2.0)

    checkpoint = checkpoints.save_state_dict(tmp_path / "ft.safetensors", {"scale": torch.tensor(2.0)})
    images = Samples.of(torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    first = teacher_features(load, checkpoint, images, "pooled", {"name": "toy"}, tmp_path / "cache")
    (entry,) = (tmp_path / "cache" / "teacher").glob("*.safetensors")
    damage(entry)
    new_process()
    with pytest.warns(DamagedCacheEntry, match=str(entry)):
        again = teacher_features(load, checkpoint, images, "pooled", {"name": "toy"}, tmp_path / "cache")
    assert len(calls) == 2 and torch.equal(again, first), "recomputed, not read from the damaged file"
    assert teacher_features(load, checkpoint, images, "pooled", {"name": "toy"}, tmp_path / "cache").equal(first)
    assert len(calls) == 2, "the recomputed entry is cached again"


def test_damaged_zoo_piece_is_named_and_only_it_is_rebuilt(tmp_path, new_process):
    tasks = [build_builtin_task(n, 32, 8, 8, 32, seed=0) for n in ("digits", "textures")]
    zoo, _ = get_builtin_zoo(ENCODER, RECIPE, tasks, 0, tmp_path)
    original = {p: p.read_bytes() for p in [zoo.base, *zoo.finetuned.values(), *zoo.heads.values()]}
    base_mtime = zoo.base.stat().st_mtime_ns
    truncate(zoo.finetuned["digits"])
    new_process()
    with pytest.warns(DamagedCacheEntry, match=rf"{zoo.finetuned['digits'].parent}: finetuned.safetensors: .*do not match"):
        again, built = get_builtin_zoo(ENCODER, RECIPE, tasks, 0, tmp_path)
    assert built and again == zoo
    assert zoo.base.stat().st_mtime_ns == base_mtime, "the intact base is reused"
    assert all(p.read_bytes() == data for p, data in original.items()), "rebuilt bit for bit"

    zero(zoo.base)
    new_process()
    with pytest.warns(DamagedCacheEntry, match=rf"{zoo.base.parent}: base.safetensors"):
        again, built = get_builtin_zoo(ENCODER, RECIPE, tasks, 0, tmp_path)
    assert built and all(p.read_bytes() == data for p, data in original.items())


def _identity(state, source):
    return state


def test_release_conversions_and_index_are_verified(tmp_path, new_process):
    source = tmp_path / "release" / "finetuned.pt"
    source.parent.mkdir()
    torch.save({"w": torch.randn(64, 64)}, source)
    converted = release_zoo.convert(source, tmp_path / "cache", _identity)
    index = tmp_path / "cache" / "release" / release_zoo.INDEX
    assert converted.stem == checkpoints.fingerprint(converted) and cache.read_json_entry(index)

    truncate(converted)
    new_process()
    with pytest.warns(DamagedCacheEntry, match=str(converted)):
        assert release_zoo.convert(source, tmp_path / "cache", _identity) == converted
    assert cache.entry_problem(converted) is None

    index.write_text("{")
    new_process()
    with pytest.warns(DamagedCacheEntry, match=str(index)):
        assert release_zoo.convert(source, tmp_path / "cache", _identity) == converted
    assert json.loads(index.read_text()) == cache.read_json_entry(index)


def test_a_damaged_user_checkpoint_is_named_and_never_rebuilt(tmp_path):
    source = tmp_path / "finetuned.pt"
    torch.save({"w": torch.randn(64, 64)}, source)
    truncate(source)
    with pytest.raises(checkpoints.UnreadableCheckpoint, match=rf"{source}: cannot read this checkpoint"):
        release_zoo.convert(source, tmp_path / "cache", _identity)
    assert source.stat().st_size > 0 and not list((tmp_path / "cache").rglob("*.safetensors"))
    weights = checkpoints.save_state_dict(tmp_path / "w.safetensors", {"w": torch.randn(64, 64)})
    truncate(weights)
    with pytest.raises(checkpoints.UnreadableCheckpoint, match=rf"{weights}: .*SafetensorError"):
        checkpoints.load_state_dict(weights)


def test_damaged_zeroshot_head_is_rebuilt(tmp_path, monkeypatch, new_process):
    monkeypatch.setattr(clip_tasks.clip_datasets, "classnames", lambda name, root: ["banded", "dotted"])
    monkeypatch.setattr(clip_tasks, "zeroshot_weights", lambda model, tokenizer, names, templates: torch.ones(len(names), 4))
    loads = []
    load_clip = lambda: loads.append(1) or (None, None)  # noqa: E731
    (head,) = clip_tasks.zeroshot_heads(load_clip, ["DTD"], tmp_path, tmp_path / "cache", {"model": "toy"}).values()
    truncate(head)
    new_process()
    with pytest.warns(DamagedCacheEntry, match=str(head)):
        assert clip_tasks.zeroshot_heads(load_clip, ["DTD"], tmp_path, tmp_path / "cache", {"model": "toy"}) == {"DTD": head}
    assert len(loads) == 2 and torch.equal(checkpoints.load_state_dict(head)["weight"], torch.ones(2, 4))
