"""Where results go: the append-only candidates log of a run directory, and the W&B run (or none).

`candidates.jsonl` gets one complete line per finished candidate (flush + fsync), so a killed run
loses at most the candidate in flight and a restart can skip every finished one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import secrets
import socket
from pathlib import Path
from typing import IO, Any, Iterator, Mapping, Protocol, Sequence

from taskmerge.cache import atomic_write_text
from taskmerge.errors import UserError

CANDIDATES = "candidates.jsonl"
LOCK = ".taskmerge.lock"


def _try_lock(run_dir: Path) -> IO[str]:
    """The open, exclusively locked lock file of `run_dir`, or a `UserError` naming the run that holds it."""
    path = Path(run_dir) / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(f"hydra.run.dir={run_dir} is in use by another run ({holder}); wait for it to finish or "
                        f"choose another hydra.run.dir") from None
    return handle


@contextlib.contextmanager
def run_directory_lock(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir`'s lock for the block: a second run on the same directory is refused instead of
    appending duplicate rows. The lock is released by the OS if the process dies."""
    handle = _try_lock(run_dir)
    try:
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def check_unlocked(run_dir: Path) -> None:
    """Refuse early (before Hydra writes into it) a run directory that another run holds."""
    if (Path(run_dir) / LOCK).is_file():
        _try_lock(run_dir).close()


def candidate_id(method: str, hparams: Mapping[str, Any]) -> str:
    """A stable identity of a candidate, used to recognise finished candidates on restart."""
    return json.dumps({"method": method, "hparams": dict(hparams)}, sort_keys=True)


class CandidateLog:
    """Append-only JSON-lines log of candidate rows."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def rows(self) -> list[dict[str, Any]]:
        """Every complete row already written; a torn last line (from a kill mid-write) is ignored."""
        if not self.path.is_file():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows

    def drop_torn_tail(self) -> None:
        """Cut a last line left unfinished by a kill, so the next row starts on a line of its own."""
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with self.path.open("r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)

    def append(self, row: Mapping[str, Any]) -> None:
        """Write one row as a single line and force it to disk."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.drop_torn_tail()
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


class RunLogger(Protocol):
    def log_candidate(self, row: Mapping[str, Any]) -> None: ...

    def log_summary(self, rows: Sequence[Mapping[str, Any]], selection: Mapping[str, Any], images: Mapping[str, Path]) -> None: ...

    def finish(self) -> None: ...


class NullLogger:
    """`logger=none`: results only in the run directory."""

    def log_candidate(self, row: Mapping[str, Any]) -> None:
        return None

    def log_summary(self, rows: Sequence[Mapping[str, Any]], selection: Mapping[str, Any], images: Mapping[str, Path]) -> None:
        return None

    def finish(self) -> None:
        return None


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}/"))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            flat[name] = value
    return flat


class WandbLogger:
    """A W&B run whose files live under the run directory; offline unless `mode=online`.

    The environment variable `WANDB_MODE` (e.g. `disabled` in tests) takes precedence over `mode`. A restarted
    run keeps the run id saved in its directory (resumed online) and replaces its earlier offline copy, so
    `wandb sync` uploads one complete run; the restarted run logs every candidate row again.
    """

    def __init__(self, run_dir: Path, config: Mapping[str, Any], project: str, mode: str,
                 entity: str | None, group: str | None, job_type: str, name: str) -> None:
        wandb_root = Path(run_dir) / "wandb"
        for var, sub in (("WANDB_DIR", ""), ("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config")):
            (wandb_root / sub).mkdir(parents=True, exist_ok=True)
            os.environ[var] = str(wandb_root / sub)
        import wandb

        self._wandb = wandb
        mode = os.environ.get("WANDB_MODE", mode)
        id_file = wandb_root / "run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(6)
        if mode == "offline":
            for stale in (wandb_root / "wandb").glob(f"offline-run-*-{run_id}"):
                shutil.rmtree(stale, ignore_errors=True)
        self.run = wandb.init(
            project=project, entity=entity, group=group, job_type=job_type, name=name, id=run_id, resume="allow",
            mode=mode, dir=str(wandb_root), config=dict(config),
        )
        if mode != "disabled":
            atomic_write_text(id_file, run_id + "\n")

    def log_candidate(self, row: Mapping[str, Any]) -> None:
        self.run.log(_flatten(row))

    def log_summary(self, rows: Sequence[Mapping[str, Any]], selection: Mapping[str, Any], images: Mapping[str, Path]) -> None:
        flat_rows = [_flatten(r) for r in rows]
        columns = sorted({k for r in flat_rows for k in r})
        table = self._wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in flat_rows])
        payload: dict[str, Any] = {"candidates": table}
        payload.update({name: self._wandb.Image(str(path)) for name, path in images.items()})
        self.run.log(payload)
        self.run.summary.update(_flatten(selection))

    def finish(self) -> None:
        self.run.finish()


def create_logger(logger_cfg: Mapping[str, Any], run_dir: Path, config: Mapping[str, Any], group: str, job_type: str) -> RunLogger:
    """The logger named by `logger_cfg["name"]` (`wandb` or `none`); `group` applies unless the config sets one."""
    kind = logger_cfg["name"]
    if kind == "none":
        return NullLogger()
    if kind == "wandb":
        return WandbLogger(run_dir, config, project=logger_cfg["project"], mode=logger_cfg["mode"], entity=logger_cfg["entity"],
                           group=logger_cfg["group"] or group, job_type=job_type, name=Path(run_dir).name)
    raise ValueError(f"unknown logger {kind!r}; expected 'wandb' or 'none'")
