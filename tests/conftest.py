"""Shared fixtures: a shrunken built-in benchmark that builds its zoo in seconds."""

from __future__ import annotations

import os

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
