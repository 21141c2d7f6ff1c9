"""Reading and writing weights safely: safetensors out (atomically), safetensors or tensor-only pickles in."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file

_FINGERPRINTS: dict[tuple[str, int, int], str] = {}


def atomic_path(path: Path) -> Path:
    """A fresh temporary path beside `path`, so that `os.replace` onto `path` is atomic."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def save_state_dict(path: str | Path, state_dict: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write `state_dict` as safetensors via a temporary file and a rename: never a half-written file."""
    path = Path(path)
    tmp = atomic_path(path)
    try:
        save_file({k: v.detach().contiguous().cpu().clone() for k, v in state_dict.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read weights from safetensors (memory-mapped) or a tensor-only `.pt/.pth` state dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix in (".pt", ".pth", ".bin"):
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(loaded).__name__}")
        return dict(loaded)
    raise ValueError(f"{path}: unsupported checkpoint suffix {path.suffix!r}; expected .safetensors, .pt, .pth or .bin")


def fingerprint(path: str | Path) -> str:
    """SHA-256 of a file's bytes, memoised per (path, size, mtime) within the process."""
    path = Path(path).resolve()
    stat = path.stat()
    memo = (str(path), stat.st_size, stat.st_mtime_ns)
    if memo not in _FINGERPRINTS:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
        _FINGERPRINTS[memo] = digest.hexdigest()
    return _FINGERPRINTS[memo]
