"""The zoo a run merges: paths of the base checkpoint and of one fine-tuned checkpoint (and decoder head) per
task, as every setting hands it to the pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from taskmerge import checkpoints
from taskmerge.errors import UserError


@dataclass(frozen=True)
class Zoo:
    """Paths of the zoo's checkpoints; `key` identifies its content."""

    key: str
    base: Path
    finetuned: dict[str, Path]
    heads: dict[str, Path]

    def fingerprints(self) -> dict[str, str]:
        """Content fingerprints of every checkpoint (base, fine-tuned and heads), for cache keys."""
        files = {"base": self.base, **{f"ft/{t}": p for t, p in self.finetuned.items()},
                 **{f"head/{t}": p for t, p in self.heads.items()}}
        return {name: checkpoints.fingerprint(path) for name, path in files.items()}


def release_path(tasks_cfg: Mapping[str, Any], option: str, path: str) -> Path:
    """A release file option's path (`tasks.base`, `tasks.finetuned.<task>`): as given when absolute, else under
    `tasks.checkpoints`."""
    given = Path(path).expanduser()
    if given.is_absolute():
        return given
    if tasks_cfg["checkpoints"] is None:
        raise UserError(f"{option}={path} is a relative path but tasks.checkpoints is not set: pass paths.checkpoints=DIR "
                        "(or export TASKMERGE_CHECKPOINTS_DIR), or give an absolute path")
    return Path(tasks_cfg["checkpoints"]).expanduser() / given


def required_path(tasks_cfg: Mapping[str, Any], key: str, how: str) -> Path:
    """The folder `tasks.<key>` names; an error saying `how` to set it when it is not set."""
    if tasks_cfg[key] is None:
        raise UserError(f"tasks.{key} is not set: pass {how}")
    return Path(tasks_cfg[key]).expanduser()
