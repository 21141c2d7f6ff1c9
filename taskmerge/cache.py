"""Content-addressed cache keys, atomic text/JSON writes, and cache entries that carry a checksum.

A key is the SHA-256 of everything a cached value depends on (configs, fingerprints, tensor bytes),
serialised canonically, so a stale cache entry cannot be hit: any change gives a different key.

An entry is a file written atomically and then sealed: the SHA-256 of its bytes is recorded beside it
(`NAME.sha256`). Reading verifies it against that record, so a truncated, zeroed or edited entry is named in a
`DamagedCacheEntry` warning, removed and recomputed, never used. The check reuses `checkpoints.fingerprint`,
memoised per process, so each file is hashed at most once per process (the zoo's cache keys hash it anyway).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from taskmerge import checkpoints, threads

T = TypeVar("T")
CHECKSUM_SUFFIX = ".sha256"


class DamagedCacheEntry(UserWarning):
    """A cache entry that failed its checksum or could not be read: it was removed and will be recomputed."""


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
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):  # e.g. a batch of LiDAR scans
        _feed(digest, {"dataclass": type(value).__name__, **{f.name: getattr(value, f.name) for f in dataclasses.fields(value)}})
    else:
        digest.update(json.dumps(value).encode() + b";")


def content_key(*parts: Any) -> str:
    """Hex SHA-256 of `parts` (nested dicts, lists, dataclasses, JSON scalars and tensors)."""
    digest = hashlib.sha256()
    for part in parts:
        _feed(digest, part)
    return digest.hexdigest()


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file and a rename."""
    with checkpoints.atomic_write(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """Write `data` as indented JSON atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def checksum_path(path: str | Path) -> Path:
    """Where the SHA-256 of the cache entry at `path` is recorded."""
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def seal(path: str | Path, digest: str | None = None) -> Path:
    """Record the SHA-256 of the entry just written at `path` beside it (`digest` if the caller already knows
    it), so later reads can verify its bytes; returns `path`."""
    path = Path(path)
    digest = digest or checkpoints.fingerprint(path)
    atomic_write_text(checksum_path(path), digest + "\n")
    checkpoints.remember_fingerprint(path, digest)
    return path


def entry_problem(path: str | Path) -> str | None:
    """None if the entry at `path` matches its recorded SHA-256, else what is wrong with it (for messages)."""
    path = Path(path)
    if not path.is_file():
        return "it is missing"
    try:
        recorded = checksum_path(path).read_text().strip()
    except FileNotFoundError:
        return "no checksum is recorded beside it (its write was interrupted, or an older taskmerge wrote it)"
    except OSError as error:
        return f"its checksum file cannot be read ({error})"
    try:
        actual = checkpoints.fingerprint(path)
    except OSError as error:
        return f"it cannot be read ({error})"
    if actual != recorded:
        return (f"its bytes do not match the checksum recorded when it was written (SHA-256 {actual[:12]}…, "
                f"recorded {recorded[:12]}…): truncated or modified since")
    return None


def discard(path: str | Path, reason: str) -> None:
    """Warn that the cache entry at `path` (a file, or a folder of entries) is damaged because of `reason`, and
    remove it with its checksum so that it is recomputed."""
    path = Path(path)
    warnings.warn(f"damaged cache entry {path}: {reason}; removed, it will be recomputed", DamagedCacheEntry, stacklevel=3)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    checksum_path(path).unlink(missing_ok=True)


def verified(path: str | Path) -> bool:
    """True if the entry at `path` exists and matches its recorded SHA-256; False if it is absent, or if it is
    damaged, which is then warned about (naming it and what is wrong) and removed: the caller recomputes it."""
    path = Path(path)
    if not path.is_file():
        return False
    problem = entry_problem(path)
    if problem is not None:
        discard(path, problem)
    return problem is None


def read_entry(path: str | Path, parse: Callable[[Path], T]) -> T | None:
    """`parse(path)` of an intact entry; None if it is absent or damaged (then already warned about and removed)."""
    path = Path(path)
    if not verified(path):
        return None
    try:
        return parse(path)
    except (OSError, ValueError, SafetensorError) as error:
        discard(path, f"it cannot be parsed ({type(error).__name__}: {error})")
        return None


def read_text_entry(path: str | Path) -> str | None:
    """The text of an intact entry, or None (absent or damaged: warned about and removed)."""
    return read_entry(path, Path.read_text)


def read_json_entry(path: str | Path) -> Any | None:
    """The JSON value of an intact entry, or None (absent or damaged: warned about and removed); so never cache a
    bare `null`."""
    return read_entry(path, lambda p: json.loads(p.read_text()))


def read_tensors_entry(path: str | Path) -> dict[str, torch.Tensor] | None:
    """The tensors of an intact safetensors entry, or None (absent or damaged: warned about and removed)."""
    return read_entry(path, lambda p: load_file(str(p)))


def _write_sealed(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write a cache entry through `write(temporary path)`, record its checksum, then rename it into place: a reader
    sees no entry, or an entry with its checksum, never one without (which it would take for damaged and remove)."""
    path = Path(path)
    with checkpoints.atomic_write(path) as tmp:
        write(tmp)
        digest = checkpoints.fingerprint(tmp)
        atomic_write_text(checksum_path(path), digest + "\n")
    checkpoints.remember_fingerprint(path, digest)
    return path


def write_text_entry(path: str | Path, text: str) -> Path:
    """Write `text` atomically as a sealed cache entry."""
    return _write_sealed(path, lambda tmp: tmp.write_text(text))


def write_json_entry(path: str | Path, data: Any) -> Path:
    """Write `data` as JSON atomically as a sealed cache entry."""
    return write_text_entry(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_tensors_entry(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write `tensors` as safetensors atomically as a sealed cache entry."""
    return _write_sealed(path, lambda tmp: checkpoints.write_safetensors(tmp, tensors, metadata))


@contextlib.contextmanager
def building(path: str | Path) -> Iterator[None]:
    """Hold the build lock of cache entry `path` (blocking): processes on this machine that share a cache build an
    entry once, the others wait, then find it built. Re-check the entry inside the block. Locks live in the system's
    temporary folder, one per entry path, so the cache holds only entries; the OS drops a dead holder's lock.
    Processes on other machines are not excluded: they may build the same entry, and the atomic rename keeps one.
    A process that has to wait leaves the thread registry meanwhile, so the builder runs on every core."""
    folder = Path(tempfile.gettempdir()) / "taskmerge-locks"
    folder.mkdir(exist_ok=True)
    name = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:32]
    with open(folder / f"{name}.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with threads.waiting():
                fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
