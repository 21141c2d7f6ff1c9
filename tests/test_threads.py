"""Torch's threads follow this run's share of the cores: cores / taskmerge runs alive on this machine."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from taskmerge import threads


@pytest.fixture
def registry(tmp_path, monkeypatch):
    monkeypatch.setattr(threads.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(threads, "cores", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "_state", {})
    before = torch.get_num_threads()
    yield threads.registry()
    torch.set_num_threads(before)


def test_share_of_the_cores_follows_the_runs_alive_on_this_host(registry):
    host = socket.gethostname()
    assert threads.configure(None) == 4 and (registry / f"{host}-{os.getpid()}").exists()
    (registry / f"{host}-{os.getppid()}").touch()  # a second run (alive)
    (registry / "other-host-1").touch()  # a run on another machine sharing the folder does not count
    dead = registry / f"{host}-999999999"
    dead.touch()
    assert threads.rebalance() == 2 and torch.get_num_threads() == 2 and not dead.exists()
    (registry / f"{host}-{os.getppid()}").unlink()
    assert threads.rebalance() == 4


def test_a_fixed_count_wins(registry, monkeypatch):
    (registry / f"{socket.gethostname()}-{os.getppid()}").touch()
    assert threads.configure(3) == 3 and threads.rebalance() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.configure(None) == 1 and torch.get_num_threads() == 1
