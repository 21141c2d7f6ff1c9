"""Torch's intra-op threads sized to this machine's share: the cores this process may use (its CPU affinity,
e.g. a SLURM allocation) divided among the taskmerge runs alive on this host, so jobs that share a machine (joblib
or submitit_local multiruns, two runs started by hand) do not each run one thread per core and thrash.

Runs find each other through a machine-wide registry of process files, `<tmp>/taskmerge-running/<host>-<pid>` (the
system's temporary folder, node-local on clusters; files of dead processes are removed). A run re-sizes its threads at every stage (`rebalance`), so one started
alone shrinks when a second one starts; a run blocked on another's cache build steps out of the registry (`waiting`),
so the builder gets the cores. `threads=N` (or an exported OMP_NUM_THREADS) fixes the count instead.
Forward passes (TAP) give the same bits at any thread count; training (zoo, decoders) does only at a fixed one.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import tempfile
from pathlib import Path
from typing import Iterator

import torch

_state: dict[str, object] = {}


def registry() -> Path:
    """The folder where runs on this machine register (world-writable and sticky, like the temporary folder)."""
    folder = Path(tempfile.gettempdir()) / "taskmerge-running"
    if not folder.is_dir():
        folder.mkdir(exist_ok=True)
        try:
            folder.chmod(0o1777)
        except PermissionError:
            pass  # created meanwhile by another user
    return folder


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def live_runs() -> int:
    """Taskmerge runs registered on this host that are alive (files of dead ones removed)."""
    host, count = socket.gethostname(), 0
    for entry in registry().glob(f"{host}-*"):
        pid = entry.name.rsplit("-", 1)[-1]
        if pid.isdigit() and _alive(int(pid)):
            count += 1
        else:
            try:
                entry.unlink(missing_ok=True)
            except PermissionError:
                pass  # another user's stale file: the sticky folder keeps it theirs
    return count


def configure(threads: int | None) -> int:
    """Register this run and set torch's threads: `threads`, else OMP_NUM_THREADS, else this run's share of the
    cores (`rebalance`); returns the count."""
    exported = os.environ.get("OMP_NUM_THREADS", "")
    fixed = threads if threads is not None else int(exported) if exported.isdigit() and int(exported) > 0 else None
    if "entry" not in _state:
        entry = registry() / f"{socket.gethostname()}-{os.getpid()}"
        entry.touch()
        atexit.register(entry.unlink, missing_ok=True)
        _state["entry"] = entry
    _state["fixed"] = fixed
    return rebalance()


def rebalance() -> int:
    """Re-size torch's threads to this run's current share of the cores (a no-op for a fixed count or before
    `configure`); returns the count in use."""
    if "entry" not in _state:
        return torch.get_num_threads()
    fixed = _state["fixed"]
    wanted = fixed if isinstance(fixed, int) else max(1, cores() // max(live_runs(), 1))
    if wanted != torch.get_num_threads():
        torch.set_num_threads(wanted)
    return wanted


@contextlib.contextmanager
def waiting() -> Iterator[None]:
    """Leave the registry while this run only waits (e.g. on another run's cache build), so the runs at work share
    the cores without it; re-register and re-size on the way out."""
    entry = _state.get("entry")
    if not isinstance(entry, Path):
        yield
        return
    entry.unlink(missing_ok=True)
    try:
        yield
    finally:
        entry.touch()
        rebalance()
