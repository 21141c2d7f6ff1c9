"""Helpers shared by the merge methods: key orders, flattening, lazy task vectors, the "matrix" rule,
SVD block assembly, polar orthogonalisation, running means, composition with a base method, the
θ0 + α·Δ prepared state and hyperparameter checks.

Key orders. Two orders are used, never mixed up:
* state-dict order (`float_keys`): the order of the pretrained mapping, used wherever the reference
  iterates a state dict key by key (DARE's RNG stream, running means);
* Python `sorted()` order (`sorted_float_keys`): the tall_masks-lineage flat vector (`state_dict_to_vector`),
  used wherever a method reduces over the whole flattened model (TIES trimming and majority sign, LiNeS norms,
  NormAvg norms).

Memory. Task vectors are never materialised all at once: `TaskVector` computes `θ_t[key] − θ0[key]` when a
key is read, so besides its d-sized results a method holds at most one key's T tensors (or one task's flat
d-vector) at a time.
"""

from __future__ import annotations

import math
import re
from itertools import compress
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from abc import abstractmethod
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch

from taskmerge.checkpoints import LazyStateDict
from taskmerge.merging._checks import key_meta, mergeable_keys
from taskmerge.merging._registry import HParam, MergeMethod, PreparedMerge, finite_float, get_method

Tensors = Mapping[str, torch.Tensor]

# ----------------------------------------------------------------------------------------------- keys


def float_keys(pretrained: Tensors) -> list[str]:
    """The floating-point (merged) keys in state-dict order."""
    return mergeable_keys(pretrained)


def sorted_float_keys(pretrained: Tensors) -> list[str]:
    """The floating-point keys in Python `sorted()` order, the order of the reference's flat vector."""
    return sorted(float_keys(pretrained))


def flatten(tensors: Tensors, keys: Sequence[str]) -> torch.Tensor:
    """One flat vector of `tensors[key]` for `keys` in that order (`state_dict_to_vector` with sorted keys)."""
    return torch.cat([tensors[key].reshape(-1) for key in keys])


# ------------------------------------------------------------------------------------- task vectors


class TaskVector(Mapping[str, torch.Tensor]):
    """τ_t = θ_t − θ0 over the floating-point keys, computed lazily each time a key is read."""

    def __init__(self, pretrained: Tensors, finetuned: Tensors) -> None:
        self._pretrained, self._finetuned = pretrained, finetuned
        self._keys = float_keys(pretrained)
        self._keyset = set(self._keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keyset:
            raise KeyError(key)
        with whole_tensor(self._finetuned, key) as finetuned, whole_tensor(self._pretrained, key) as pretrained:
            return finetuned - pretrained  # files are subtracted from their pages: no copy of either

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


CHUNK = 1 << 17  # elements per block: T + 1 blocks of 512 KB stay in the CPU caches across a block's ~10 passes


@contextmanager
def one_thread() -> Iterator[None]:
    """Run block streams at one torch thread, then restore the count. Their elementwise ops on cache-sized blocks
    gain little from a second thread, whose OpenMP spinning between the many small ops costs more CPU than it
    saves (measured, ViT-B/32 T = 8 TIES: 22.6 CPU-s at 2 threads, 16.2 at 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def flat_block(state_dict: Tensors, key: str, start: int, stop: int, checked: bool = True) -> Iterator[torch.Tensor]:
    """Elements [start, stop) of the flattened `state_dict[key]`, valid inside the block: for a lazily loaded
    checkpoint a view of its file's pages (`LazyStateDict.mapped_block`, `checked` finite), else of the tensor."""
    if isinstance(state_dict, LazyStateDict):
        with state_dict.mapped_block(key, start, stop, checked) as view:
            yield view
    else:
        yield state_dict[key].reshape(-1)[start:stop]


@contextmanager
def whole_tensor(state_dict: Tensors, key: str) -> Iterator[torch.Tensor]:
    """`state_dict[key]`, valid inside the block: for a lazily loaded checkpoint a view of its file's pages (checked
    finite, no copy), else the tensor itself (broadcast views such as `zero_base`'s stay unmaterialised)."""
    if isinstance(state_dict, LazyStateDict):
        shape = state_dict.meta(key)[1]
        with state_dict.mapped_block(key, 0, math.prod(shape)) as view:
            yield view.view(shape)
    else:
        yield state_dict[key]


def chunk_bounds(numel: int) -> list[tuple[int, int]]:
    """[start, stop) blocks of at most `CHUNK` elements covering `numel` (one empty block for numel = 0)."""
    return [(start, min(start + CHUNK, numel)) for start in range(0, numel, CHUNK)] or [(0, 0)]


class Workspace:
    """Reusable block buffers, one per dtype, of `rows` × CHUNK elements: blocks read into them touch no fresh pages
    (fresh memory costs about as much in page faults as reading the same bytes from the page cache)."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self._buffers: dict[torch.dtype, torch.Tensor] = {}

    def stack(self, dtype: torch.dtype, width: int) -> torch.Tensor:
        """A contiguous `[rows, width]` view (width ≤ CHUNK) of the buffer for `dtype`; its content is garbage."""
        if dtype not in self._buffers:
            self._buffers[dtype] = torch.empty(self.rows * CHUNK, dtype=dtype)
        return self._buffers[dtype][: self.rows * width].view(self.rows, width)


def stacked_task_vector_chunk(pretrained: Tensors, finetuned: Sequence[Tensors], key: str, start: int, stop: int,
                              workspace: Workspace | None = None) -> torch.Tensor:
    """`[T, stop − start]`: elements [start, stop) of τ_t[key] flattened, for every task, each fine-tuned block
    subtracted from the base block straight into the stack; files are read as views of their pages (memory: T
    blocks whatever the key size). With a `workspace` of T rows the stack is a view of it, valid until the next call.
    NaN/Inf in a file is found through the stack's sum (it reaches it) and then named by file and key."""
    dtype, width = key_meta(pretrained, key)[0], stop - start
    rows = len(finetuned)
    if workspace is not None and workspace.rows != rows:
        raise ValueError(f"workspace has {workspace.rows} rows, {rows} needed (one per fine-tuned model)")
    stack = workspace.stack(dtype, width) if workspace is not None else torch.empty((rows, width), dtype=dtype)
    lazy = [isinstance(model, LazyStateDict) for model in finetuned]
    with flat_block(pretrained, key, start, stop) as base:
        for index, model in enumerate(finetuned):
            with flat_block(model, key, start, stop, checked=False) as block:  # checked below, through the stack
                torch.sub(block, base, out=stack[index])
    if any(lazy) and width and not math.isfinite(float(stack.sum())):
        for model in compress(finetuned, lazy):
            with model.mapped_block(key, start, stop):  # checked: raises naming the file and key
                pass
    return stack


def task_vector_blocks(pretrained: Tensors, finetuned: Sequence[Tensors],
                       keys: Sequence[str]) -> Iterator[tuple[str, int, int, torch.Tensor]]:
    """(key, start, stop, `[T, stop − start]` stack of τ blocks) for every block of `keys`, in order. The next block
    is read in a background thread while the caller works on this one (file reads and torch ops release the GIL),
    so a stream runs at the speed of the slower of reading and computing; two workspaces alternate, and a stack is
    valid until the caller asks for the next one."""
    plan = [(key, start, stop) for key in keys for start, stop in chunk_bounds(math.prod(key_meta(pretrained, key)[1]))]
    spaces = (Workspace(len(finetuned)), Workspace(len(finetuned)))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="taskmerge-read") as reader:
        def read(index: int) -> Future:
            return reader.submit(stacked_task_vector_chunk, pretrained, finetuned, *plan[index], spaces[index % 2])

        pending = read(0) if plan else None
        for index, (key, start, stop) in enumerate(plan):
            stack = pending.result()
            if index + 1 < len(plan):
                pending = read(index + 1)
            yield key, start, stop, stack


def task_vectors(pretrained: Tensors, finetuned: Sequence[Tensors]) -> list[TaskVector]:
    """The lazy task vectors τ_1..τ_T, in task order."""
    return [TaskVector(pretrained, model) for model in finetuned]


def zero_base(pretrained: Tensors) -> dict[str, torch.Tensor]:
    """Zeros shaped like every floating-point key of `pretrained` (broadcast views, no memory).

    Running a method on (zero_base, task vectors) gives its update Δ exactly: τ − 0 = τ and 0 + 1.0·Δ = Δ bitwise.
    """
    return {key: torch.zeros((), dtype=key_meta(pretrained, key)[0]).expand(key_meta(pretrained, key)[1]) for key in float_keys(pretrained)}


# ------------------------------------------------------------------------------------ matrix rule


def is_matrix(key: str, shape: Sequence[int], exclude: str | None = None) -> bool:
    """A tensor of `shape` is a "matrix" when it is 2-D after dropping its size-1 dimensions and its key does not
    match the regex `exclude` (`re.search`; None or "" excludes nothing; a setting supplies its own rule, e.g. CLIP's
    `text_projection`, the reference's exclusion). 4-D `conv1.weight`, 1-D and 0-D tensors are not matrices."""
    if exclude and re.search(exclude, key):
        return False
    return sum(1 for size in shape if size != 1) == 2


def as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    """The 2-D view of a tensor that `is_matrix` accepted (size-1 dimensions dropped)."""
    return tensor.reshape([size for size in tensor.shape if size != 1])


def running_mean(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Incremental mean in the given order: m ← clone(x_1); m ← m + (x_t − m)/t (TSV-M / Iso-CTS reference)."""
    mean = None
    for i, tensor in enumerate(tensors):
        if i == 0:
            mean = tensor.clone()
        else:
            mean += (tensor - mean) / (i + 1)
    if mean is None:
        raise ValueError("running_mean of no tensors")
    return mean


def python_sum(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Left-to-right sum `((x_1 + x_2) + x_3) + …`, the rounding of the reference's Python `sum(...)`."""
    total = None
    for tensor in tensors:
        total = tensor if total is None else total + tensor
    if total is None:
        raise ValueError("python_sum of no tensors")
    return total


# -------------------------------------------------------------------------------- prepared states


def reject_extra(extra: Mapping[str, Any]) -> None:
    """`combine` receives only swept hyperparameters; anything else was a prepare-time one."""
    if extra:
        raise ValueError(
            f"hyperparameters {sorted(extra)} are fixed at prepare() time; pass them to prepare() instead of sweeping them"
        )


class ScaledDelta(PreparedMerge):
    """A precomputed update Δ; `combine(alpha)` returns θ0 + α·Δ per key (α a Python float, as `apply_to`)."""

    def __init__(self, pretrained: Tensors, delta: dict[str, torch.Tensor]) -> None:
        self.pretrained, self.delta = pretrained, delta

    def combine(self, alpha: float, **extra: Any) -> dict[str, torch.Tensor]:
        reject_extra(extra)
        return {key: self._apply(key, tau, alpha) for key, tau in self.delta.items()}

    def _apply(self, key: str, tau: torch.Tensor, alpha: float) -> torch.Tensor:
        """θ0[key] + α·τ as (α·τ) + θ0 (the same roundings) in one fresh tensor; a lazily loaded θ0 is added
        from its file's pages, not copied first."""
        out = torch.mul(tau, alpha, out=torch.empty(tau.shape, dtype=tau.dtype))
        with whole_tensor(self.pretrained, key) as base:
            return out.add_(base)


class DeltaMethod(MergeMethod):
    """A method of the form θ* = θ0 + α·Δ: subclasses compute the unscaled Δ in `delta` (the costly part, with
    the prepare-time hyperparameters); `prepare` wraps it in `ScaledDelta`, whose `combine(alpha)` is cheap."""

    @abstractmethod
    def delta(self, pretrained: Tensors, finetuned: Sequence[Tensors], **fixed: Any) -> dict[str, torch.Tensor]:
        """Δ for the floating-point keys."""

    def prepare(self, pretrained: Tensors, finetuned: Sequence[Tensors], **fixed: Any) -> ScaledDelta:
        return ScaledDelta(pretrained, self.delta(pretrained, finetuned, **fixed))


def base_delta(method: str, pretrained: Tensors, finetuned: Sequence[Tensors], **fixed: Any) -> dict[str, torch.Tensor]:
    """The unscaled update Δ of the registered method `method` (composition of methods).

    Its prepare-time hyperparameters are taken from `fixed` (others ignored) or its defaults. A `DeltaMethod`
    returns Δ directly; any other method (the spine's `ta`) is prepared on (zeros, task vectors) and combined
    at alpha = 1.0, which is exactly Δ because τ − 0 = τ and 0 + 1.0·Δ = Δ. `finetuned` may itself hold task
    vectors with `pretrained` = `zero_base(...)` (DARE's dropped vectors).
    """
    cls = get_method(method)
    values = {k: fixed.get(k, cls.hparams[k].default) for k in cls.prepare_hparams}
    if issubclass(cls, DeltaMethod):
        return cls().delta(pretrained, finetuned, **values)
    state = cls().prepare(zero_base(pretrained), task_vectors(pretrained, finetuned), **values)
    return state.combine(alpha=1.0)


# ------------------------------------------------------------------------------ hyperparameter checks


def number_in(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Callable[[Any], bool]:
    """Check: a finite number in the interval (open or closed at each end)."""

    def check(value: Any) -> bool:
        if not finite_float(value):
            return False
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        return above and below

    return check


def interval(low: float, high: float, low_open: bool = False, high_open: bool = False) -> str:
    """Text of an interval for `HParam.expected`."""
    return f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def one_of(*choices: str) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, str) and value in choices


def int_at_least(low: int) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= low


def optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def device_name(value: Any) -> bool:
    """Check: a torch device string naming a device this machine has (CUDA ones only where CUDA is available)."""
    if not isinstance(value, str):
        return False
    try:
        device = torch.device(value)
    except RuntimeError:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index is None or device.index < torch.cuda.device_count())
    return device.type == "cpu"


DEVICE = HParam("cpu", device_name, "a torch device this machine has: 'cpu', 'cuda' or 'cuda:N' (where the SVD methods' "
                "decompositions run)")


def regex_or_none(value: Any) -> bool:
    if value is None:
        return True
    if not isinstance(value, str):
        return False
    try:
        re.compile(value)
    except re.error:
        return False
    return True


def sequence_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """Check: a non-empty list/tuple (or omegaconf ListConfig) whose items all pass `check`."""

    def check_all(value: Any) -> bool:
        return isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and len(value) > 0 and all(check(v) for v in value)

    return check_all


def scalar_or_sequence(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    seq = sequence_of(check)
    return lambda value: check(value) or seq(value)
