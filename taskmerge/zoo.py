"""The zoo a run merges: paths of the base checkpoint and of one fine-tuned checkpoint (and decoder head) per
task, as every setting hands it to the pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from taskmerge import checkpoints


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
