"""The generated dense demo zoo: a tiny config builds, reads back as DUNE releases, is cached and self-heals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from taskmerge.cache import DamagedCacheEntry
from taskmerge.settings.dense.datasets import ADE20k, NYUDepth
from taskmerge.settings.dense.demo import TASKS, DemoConfig, DemoRelease, build_demo, from_canonical
from taskmerge.settings.dense.encoder import DenseViT
from taskmerge.settings.dense.releases import read_release

TINY = DemoConfig(image_size=28, embed_dim=32, depth=2, num_heads=2, n_train=6, n_val=2, n_generic=4,
                  pretrain_epochs=1, probe_epochs=1, finetune_epochs=1, finetune_lr=(1e-3, 1e-3), batch_size=4, sig_warmup=1)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DemoRelease]:
    """A tiny demo built once for the module's tests."""
    cache = tmp_path_factory.mktemp("cache")
    return cache, build_demo(cache, TINY)


def _mtimes(release: DemoRelease) -> dict[Path, int]:
    """Modification times of a demo's release files."""
    return {path: path.stat().st_mtime_ns for path in (release.base, *release.finetuned.values())}


def test_releases_read_back_as_dune_and_data_as_the_real_layouts(built: tuple[Path, DemoRelease]) -> None:
    _, release = built
    assert set(release.finetuned) == set(TASKS) == {"ade20k", "nyud"}
    for path in (release.base, *release.finetuned.values()):
        read = read_release(path)
        assert read.layout == "dune" and read.canonical["pos_embed"].shape == (1, 1 + 2 * 2, 32)
        assert "register_tokens" in read.canonical and "mask_token" not in read.canonical
    assert len(ADE20k(release.data_root, "train", 28)) == 6 and len(ADE20k(release.data_root, "val", 28)) == 2
    assert len(NYUDepth(release.data_root, "train", 28)) == 6 and len(NYUDepth(release.data_root, "test", 28)) == 2


def test_finetuned_encoders_differ_from_the_base(built: tuple[Path, DemoRelease]) -> None:
    _, release = built
    base = read_release(release.base).canonical
    for path in release.finetuned.values():
        tuned = read_release(path).canonical
        assert tuned.keys() == base.keys()
        assert any(not torch.equal(tuned[key], base[key]) for key in base if key.startswith("blocks."))


def test_canonical_round_trip_is_exact() -> None:
    torch.manual_seed(3)
    model = DenseViT(32, 2, 2, 4, image_size=28, native_size=28)
    canonical = model.canonical_weights()
    back = from_canonical(canonical, TINY)
    images = torch.randn(2, 3, 28, 28)
    assert torch.equal(back.features(images), model.features(images))
    assert all(torch.equal(value, canonical[key]) for key, value in back.canonical_weights().items())


def test_second_call_reuses_the_cache(built: tuple[Path, DemoRelease], capsys: pytest.CaptureFixture[str]) -> None:
    cache, release = built
    before = _mtimes(release)
    again = build_demo(cache, TINY)
    assert again == release and _mtimes(again) == before
    assert "building" not in capsys.readouterr().out


def test_a_damaged_file_is_detected_and_rebuilt(built: tuple[Path, DemoRelease], capsys: pytest.CaptureFixture[str]) -> None:
    cache, release = built
    reference = read_release(release.finetuned["nyud"]).canonical
    with release.finetuned["nyud"].open("r+b") as handle:
        handle.seek(100)
        handle.write(b"\0" * 64)
    with pytest.warns(DamagedCacheEntry, match="nyud.pth"):
        again = build_demo(cache, TINY)
    assert "building the dense demo zoo" in capsys.readouterr().out
    assert again.key == release.key
    rebuilt = read_release(again.finetuned["nyud"]).canonical
    assert all(torch.equal(rebuilt[key], reference[key]) for key in reference)  # deterministic given the seed


def test_a_damaged_data_file_is_detected(built: tuple[Path, DemoRelease]) -> None:
    cache, release = built
    split = release.data_root / "nyu" / "nyu_train.txt"
    split.write_text(split.read_text() + "\n")
    with pytest.warns(DamagedCacheEntry, match="nyu_train.txt"):
        again = build_demo(cache, TINY)
    assert (again.data_root / "nyu" / "nyu_train.txt").read_text().count("\n") == 6
