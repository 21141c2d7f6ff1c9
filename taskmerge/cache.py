"""Content-addressed cache keys and atomic text/JSON writes.

A key is the SHA-256 of everything a cached value depends on (configs, fingerprints, tensor bytes),
serialised canonically, so a stale cache entry cannot be hit: any change gives a different key.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from taskmerge.checkpoints import atomic_path


def _feed(digest: "hashlib._Hash", value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"tensor:{tensor.dtype}:{tuple(tensor.shape)}:".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    elif isinstance(value, dict):
        digest.update(b"dict:")
        for key in sorted(value, key=str):
            _feed(digest, str(key))
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"list:{len(value)}:".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(json.dumps(value).encode() + b";")


def content_key(*parts: Any) -> str:
    """Hex SHA-256 of `parts` (nested dicts, lists, JSON scalars and tensors)."""
    digest = hashlib.sha256()
    for part in parts:
        _feed(digest, part)
    return digest.hexdigest()


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file and a rename."""
    path = Path(path)
    tmp = atomic_path(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """Write `data` as indented JSON atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
