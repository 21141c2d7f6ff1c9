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


def test_a_run_waiting_on_another_runs_cache_build_leaves_the_share_to_the_builder(registry, tmp_path):
    import threading
    import time

    from taskmerge import cache

    host = socket.gethostname()
    (registry / f"{host}-{os.getppid()}").touch()  # the builder (alive)
    assert threads.configure(None) == 2
    entry = registry / f"{host}-{os.getpid()}"
    started, inside, runs_seen_by_builder = threading.Event(), threading.Event(), []

    def builder_holds_the_lock():
        with cache.building(tmp_path / "zoo" / "piece"):
            started.set()
            deadline = time.monotonic() + 5
            while entry.exists() and time.monotonic() < deadline:  # until the waiting run steps out of the registry
                time.sleep(0.01)
            runs_seen_by_builder.append(threads.live_runs())

    holder = threading.Thread(target=builder_holds_the_lock)
    holder.start()
    started.wait(5)
    with cache.building(tmp_path / "zoo" / "piece"):
        inside.set()
        assert entry.exists() and torch.get_num_threads() == 2  # back in the registry, share re-sized
    holder.join(5)
    assert runs_seen_by_builder == [1]  # while the other waited, the builder was alone: its share is every core
    assert inside.is_set() and not holder.is_alive()
