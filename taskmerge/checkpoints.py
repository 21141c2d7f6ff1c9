"""Reading and writing weights safely: safetensors out (atomically), safetensors or tensor-only pickles in."""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import pickle
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from taskmerge.errors import UserError
from taskmerge.legacy_pickle import load_legacy, load_legacy_object

_FINGERPRINTS: dict[tuple[str, int, int], str] = {}


def _hidden_sibling(path: str | Path) -> Path:
    """A fresh hidden name `.NAME.<random>.tmp` beside `path` (its folder created), so a rename onto `path` is
    atomic; the name is chosen before anything is created, so cleanup code always knows what to remove."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"


@contextmanager
def temporary_path(beside: str | Path) -> Iterator[Path]:
    """A new empty file beside `beside`, created as `open` would (mode 0o666 less the umask, unlike mkstemp's
    0600), removed on leaving the block unless it was renamed away, whatever ends the block (an error, or
    SIGTERM turned into SystemExit)."""
    tmp = _hidden_sibling(beside)
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def temporary_dir(beside: str | Path) -> Iterator[Path]:
    """A new hidden folder beside `beside`, created as `mkdir` would (mode 0o777 less the umask, unlike mkdtemp's
    0700), removed with its content on leaving the block unless it was renamed away."""
    tmp = _hidden_sibling(beside)
    try:
        tmp.mkdir(0o777)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def umask() -> int:
    """The process's umask, read from /proc/self/status; elsewhere set and restored (which could race with a
    thread creating files meanwhile, hence the last resort)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """A temporary path to write `path`'s new content to; when the block ends normally it gets the mode a new
    file gets (0o666 less the umask, whatever mode the writer gave it: safetensors writes 0600) and is renamed
    onto `path`, otherwise it is removed, so readers never see a half-written file."""
    with temporary_path(path) as tmp:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)


def _unshared(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors; a tensor whose storage another one already uses is cloned (safetensors
    refuses shared storage), the others are written without a copy."""
    seen: set[int] = set()
    out = {}
    for key, value in state_dict.items():
        tensor = value.detach().cpu().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if pointer in seen and tensor.numel() else tensor
        seen.add(pointer)
    return out


def write_safetensors(path: str | Path, state_dict: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write `state_dict` as safetensors at `path` itself (no rename): for callers that publish the file themselves."""
    save_file(_unshared(state_dict), str(path), metadata=metadata)


def save_state_dict(path: str | Path, state_dict: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write `state_dict` as safetensors via a temporary file and a rename: never a half-written file."""
    with atomic_write(path) as tmp:
        write_safetensors(tmp, state_dict, metadata)
    return Path(path)


class UnreadableCheckpoint(OSError):
    """A checkpoint file that exists but cannot be read (truncated, damaged, or not what its suffix says)."""


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read weights from safetensors, a tensor-only `.pt/.pth` state dict, or a legacy pickled model object
    (through the restricted unpickler of `taskmerge.legacy_pickle`, which never runs pickled code); a damaged
    file raises UnreadableCheckpoint naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return _load(path)
    except (SafetensorError, RuntimeError, EOFError, OSError) as error:
        raise UnreadableCheckpoint(f"{path}: cannot read this checkpoint ({type(error).__name__}: {error}); "
                                   "is it truncated or damaged?") from error


def _load(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in `path`, by suffix (see `load_state_dict`)."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix in (".pt", ".pth", ".bin"):
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            return load_legacy(path)
        if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(loaded).__name__}")
        return dict(loaded)
    raise ValueError(f"{path}: unsupported checkpoint suffix {path.suffix!r}; expected .safetensors, .pt, .pth or .bin")


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class NonFiniteTensor(ValueError):
    """A checkpoint tensor holding NaN or Inf; the message names the file (or model) and the key."""


def check_finite(tensor: torch.Tensor, key: str, where: str | Path) -> None:
    """Raise NonFiniteTensor naming `where` and `key` if a floating tensor holds NaN or Inf.

    A sum is ~13x cheaper than `isfinite(...).all()` and is NaN or ±Inf whenever an element is; only when it is
    not finite (or overflowed) is the exact test run, so a merge can check every block it reads for free."""
    if tensor.is_floating_point() and tensor.numel() and not math.isfinite(float(tensor.sum())):
        if not bool(torch.isfinite(tensor).all()):
            raise NonFiniteTensor(f"{where}: tensor {key!r} contains NaN or Inf")


class LazyStateDict(Mapping[str, torch.Tensor]):
    """Read-only state dict over a safetensors file: each access reads one tensor (or one block of it) with a
    positioned read, or lends a block as a view of the file's pages (`mapped_block`), and checks that floating
    values are finite (`check_finite`, nearly free).

    Read tensors are fresh process memory, released when dropped; lent pages leave the resident set when their
    block ends. So a merge that walks keys over T of these keeps its peak memory independent of T (the file pages
    live in the OS cache, not in the process's resident set).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {self.path}")
        with self.path.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            try:
                header = json.loads(handle.read(size))
            except ValueError as error:
                raise ValueError(f"{self.path}: not a safetensors file ({error})") from error
        header.pop("__metadata__", None)
        self._offset = 8 + size
        self._entries = header
        self._map: mmap.mmap | None = None

    def _read_into(self, key: str, out: torch.Tensor, start: int) -> torch.Tensor:
        """Fill `out` (contiguous, of `key`'s dtype) with elements [start, start + out.numel()) of `key`."""
        if out.numel():
            nbytes = out.numel() * out.element_size()
            position = self._offset + self._entries[key]["data_offsets"][0] + start * out.element_size()
            descriptor = os.open(self.path, os.O_RDONLY)
            try:
                read = os.preadv(descriptor, [memoryview(out.view(torch.uint8).numpy())], position)
            finally:
                os.close(descriptor)
            if read != nbytes:
                raise OSError(f"{self.path}: truncated tensor {key!r} ({read} of {nbytes} bytes)")
            check_finite(out, key, self.path)
        return out

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._entries:
            raise KeyError(f"{key!r} not in {self.path}")
        dtype, shape = self.meta(key)
        tensor = torch.empty(shape, dtype=dtype)
        self._read_into(key, tensor.view(-1), 0)
        return tensor

    def read_flat(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor `key`, reading only those bytes."""
        dtype, shape = self.meta(key)
        numel = math.prod(shape)
        if not 0 <= start <= stop <= numel:
            raise IndexError(f"{key!r}: range [{start}, {stop}) outside its {numel} elements")
        return self._read_into(key, torch.empty(stop - start, dtype=dtype), start)

    @contextmanager
    def mapped_block(self, key: str, start: int, stop: int, checked: bool = True) -> Iterator[torch.Tensor]:
        """Elements [start, stop) of the flattened tensor `key` as a view of the file's pages (no copy), checked
        finite unless the caller checks what it computes from them (`checked=False`); the pages leave the process's
        resident set when the block ends (the OS keeps them cached).

        Reading through the page cache's own pages spares the copy a positioned read makes (about as costly as the
        arithmetic of a task-arithmetic merge); the view must not outlive the block."""
        dtype, shape = self.meta(key)
        if not 0 <= start <= stop <= math.prod(shape):
            raise IndexError(f"{key!r}: range [{start}, {stop}) outside its {math.prod(shape)} elements")
        width = dtype.itemsize
        begin = self._offset + self._entries[key]["data_offsets"][0] + start * width
        length = (stop - start) * width
        if length == 0:
            yield torch.empty(0, dtype=dtype)
            return
        pages = self._pages()
        if begin + length > len(pages):
            raise OSError(f"{self.path}: truncated tensor {key!r}")
        view = torch.frombuffer(pages, dtype=dtype, count=stop - start, offset=begin)
        try:
            if checked:
                check_finite(view, key, self.path)
            yield view
        finally:
            del view
            first = begin - begin % mmap.PAGESIZE
            pages.madvise(mmap.MADV_DONTNEED, first, begin + length - first)

    def _pages(self) -> mmap.mmap:
        """The whole file mapped privately (copy-on-write, never written: torch wants a writable buffer)."""
        if self._map is None:
            with self.path.open("rb") as handle:
                self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._map

    def meta(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """dtype and shape of `key` from the file header, without reading the tensor."""
        entry = self._entries[key]
        return _SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"])

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __repr__(self) -> str:
        return f"LazyStateDict({str(self.path)!r}, {len(self)} tensors)"


def open_state_dict(source: str | Path | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """A mapping as it is; a `.safetensors` path memory-mapped lazily; other checkpoint paths loaded."""
    if isinstance(source, Mapping):
        return source
    path = Path(source)
    if path.suffix == ".safetensors":
        return LazyStateDict(path)
    return load_state_dict(path)


def _memo_key(path: str | Path) -> tuple[str, int, int]:
    path = Path(path).resolve()
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime_ns


def remember_fingerprint(path: str | Path, digest: str) -> None:
    """Record the known SHA-256 of a file this process wrote or verified (content-addressed caches), so
    `fingerprint` does not read it again while its size and mtime are unchanged."""
    _FINGERPRINTS[_memo_key(path)] = digest


def fingerprint(path: str | Path) -> str:
    """SHA-256 of a file's bytes, memoised per (path, size, mtime) within the process."""
    memo = _memo_key(path)
    if memo not in _FINGERPRINTS:
        digest = hashlib.sha256()
        with Path(path).open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
        _FINGERPRINTS[memo] = digest.hexdigest()
    return _FINGERPRINTS[memo]


def load_container(path: str | Path, safe_globals: Iterable[Any] = (), suffixes: tuple[str, ...] = (".pt", ".pth", ".bin")) -> Any:
    """A release file's top-level object: safetensors as a dict; a pickle through torch's weights-only loader with
    `safe_globals` allowed, else through the restricted unpickler (which never runs pickled code). Every failure is
    one `UserError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise UserError(f"{path}: cannot read this safetensors file ({error}); is it truncated or damaged?") from error
    if path.suffix not in suffixes:
        raise UserError(f"{path}: unsupported checkpoint suffix {path.suffix!r}; expected {', '.join(suffixes)} or .safetensors")
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # a name outside the weights-only allow-list: the restricted unpickler decides below
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise UserError(f"{path}: cannot read this checkpoint ({type(error).__name__}: {error}); "
                        "is it truncated or damaged?") from error
    try:
        return load_legacy_object(path)
    except (ValueError, RuntimeError, EOFError, OSError) as error:
        raise UserError(f"{path}: cannot read this checkpoint ({error})") from error
