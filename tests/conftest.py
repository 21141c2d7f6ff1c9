"""Shared fixtures: a shrunken built-in benchmark that builds its zoo in seconds."""

from __future__ import annotations

import os
import shutil

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")

TINY_OVERRIDES = [
    "encoder.embed_dim=32",
    "encoder.depth=1",
    "encoder.num_heads=2",
    "tasks.n_train=64",
    "tasks.n_val=32",
    "tasks.n_test=32",
    "tasks.zoo.pretrain.n_images=128",
    "tasks.zoo.pretrain.epochs=1",
    "tasks.zoo.finetune.epochs=2",
    "decoder.epochs=3",
    "tap.n_samples=16",
    "logger=none",
]


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    """A private cache directory, also exported for subprocesses."""
    path = tmp_path / "cache"
    monkeypatch.setenv("TASKMERGE_CACHE_DIR", str(path))
    return path


CLIP_MODEL = "ViT-B-32"
CLIP_NAMES = ["Cars", "DTD", "MNIST"]
CLIP_CLASSES = {"Cars": 2, "DTD": 3, "MNIST": 10}


@pytest.fixture(scope="session")
def clip_data(tmp_path_factory):
    """Tiny trees in the real layouts: Cars (devkit), DTD (ImageFolders), MNIST (idx files)."""
    from clip_data import write_cars, write_folder_split, write_mnist_like

    data = tmp_path_factory.mktemp("clip_data")
    write_cars(data, ["AM General Hummer SUV 2000", "Acura RL Sedan 2012"], [1, 2] * 6, [2, 1, 2, 1])
    write_folder_split(data / "dtd" / "train", ["banded", "dotted", "striped"], 4)
    write_folder_split(data / "dtd" / "val", ["banded", "dotted", "striped"], 2)
    write_mnist_like(data / "MNIST" / "raw", ("train", "t10k"), n_train=20, n_test=6)
    return data


@pytest.fixture(scope="session")
def clip_releases(tmp_path_factory, clip_data):
    """The same random-init ViT-B/32 release saved in format A and in format B, heads fitted to the data;
    {format: (root, saved state dicts)}. About 3.6 GB, deleted at the end of the session."""
    from clip_release import centroid_head, save_release

    releases = {}
    for fmt in ("A", "B"):
        root = tmp_path_factory.mktemp(f"clip_release_{fmt}")
        fit = lambda name, clip: centroid_head(clip, clip_data, name, CLIP_CLASSES[name])  # noqa: E731
        releases[fmt] = (root, save_release(root, CLIP_MODEL, CLIP_NAMES, fmt, CLIP_CLASSES, fit_head=fit))
    yield releases
    for root, _ in releases.values():
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def clip_cache(tmp_path_factory):
    """One cache directory for the CLIP tests: the releases are converted once (A and B hold equal weights,
    so they share their converted files), deleted at the end of the session."""
    path = tmp_path_factory.mktemp("clip_cache")
    yield path
    shutil.rmtree(path, ignore_errors=True)
