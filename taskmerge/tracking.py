"""Where results go: the append-only candidates log of a run directory, and the W&B run (or none).

`candidates.jsonl` gets one complete line per finished candidate (flush + fsync), so a killed run
loses at most the candidate in flight and a restart can skip every finished one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

CANDIDATES = "candidates.jsonl"


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

    The environment variable `WANDB_MODE` (e.g. `disabled` in tests) takes precedence over `mode`.
    """

    def __init__(self, run_dir: Path, config: Mapping[str, Any], project: str, mode: str,
                 entity: str | None, group: str | None, job_type: str, name: str) -> None:
        wandb_root = Path(run_dir) / "wandb"
        for var, sub in (("WANDB_DIR", ""), ("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config")):
            (wandb_root / sub).mkdir(parents=True, exist_ok=True)
            os.environ[var] = str(wandb_root / sub)
        import wandb

        self._wandb = wandb
        self.run = wandb.init(
            project=project, entity=entity, group=group, job_type=job_type, name=name,
            mode=os.environ.get("WANDB_MODE", mode), dir=str(wandb_root), config=dict(config),
        )

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
