"""Merge-method registry and the two-step API: `prepare` (hyperparameter-independent, costly) then
`PreparedMerge.merge` (cheap combination), so a sweep pays the expensive part once.

Every method works on tensors only: `Mapping[str, Tensor]` in, `dict[str, Tensor]` out. Floating-point
tensors are merged; integer buffers (e.g. `num_batches_tracked`) are copied from the pretrained model.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence, Union

import torch

from taskmerge.checkpoints import open_state_dict
from taskmerge.merging._checks import validate_checkpoints

Tensors = Mapping[str, torch.Tensor]
Source = Union[Tensors, str, Path]


@dataclass(frozen=True)
class HParam:
    """One hyperparameter: its default, a validity check, what a valid value looks like and, for the generated
    Hydra schema, its type (`kind`; default: the default's type, `Any` when the default is None)."""

    default: Any
    check: Callable[[Any], bool]
    expected: str
    kind: Any = None

    @property
    def annotation(self) -> Any:
        """The type a config value of this hyperparameter is given at compose time."""
        return self.kind or (Any if self.default is None else type(self.default))


def finite_float(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class PreparedMerge(ABC):
    """The hyperparameter-independent state of a merge; `combine` builds the merged float tensors."""

    @abstractmethod
    def combine(self, **hparams: Any) -> dict[str, torch.Tensor]:
        """Merged tensors for the floating-point keys, given the swept hyperparameters."""


class MergeMethod(ABC):
    """A merge method: its registry name, hyperparameters and the fixed ones `prepare` consumes."""

    name: ClassVar[str]
    hparams: ClassVar[dict[str, HParam]] = {}
    prepare_hparams: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def prepare(self, pretrained: Tensors, finetuned: Sequence[Tensors], **fixed: Any) -> PreparedMerge:
        """Do the costly, hyperparameter-independent work (sums, SVDs, masks)."""


_METHODS: dict[str, type[MergeMethod]] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator adding a merge method to the registry under `cls.name`."""
    if cls.name in _METHODS:
        raise ValueError(f"merge method {cls.name!r} is registered twice")
    _METHODS[cls.name] = cls
    return cls


def available() -> list[str]:
    """Names of the registered merge methods."""
    return sorted(_METHODS)


def get_method(name: str) -> type[MergeMethod]:
    """The method class registered as `name`, or a KeyError listing what exists."""
    if name not in _METHODS:
        raise KeyError(f"unknown merge method {name!r}; available: {available()}")
    return _METHODS[name]


def _check_hparams(cls: type[MergeMethod], hparams: Mapping[str, Any]) -> None:
    for key, value in hparams.items():
        if key not in cls.hparams:
            raise ValueError(f"merge method {cls.name!r} has no hyperparameter {key!r}; known: {sorted(cls.hparams)}")
        if not cls.hparams[key].check(value):
            raise ValueError(f"merge method {cls.name!r}: {key}={value!r} is invalid; expected {cls.hparams[key].expected}")


class Prepared:
    """A prepared merge bound to its pretrained weights; `merge(**swept)` returns full state dicts."""

    def __init__(self, cls: type[MergeMethod], pretrained: Tensors, state: PreparedMerge, fixed: Mapping[str, Any]):
        self.method, self._pretrained, self._state, self._fixed = cls, pretrained, state, dict(fixed)

    def merge(self, **swept: Any) -> dict[str, torch.Tensor]:
        """Every key of the pretrained model: merged float tensors, integer buffers copied unchanged."""
        clash = sorted(set(swept) & set(self._fixed))
        if clash:
            raise ValueError(f"hyperparameters {clash} were fixed at prepare() time and cannot be swept")
        _check_hparams(self.method, swept)
        values = {k: h.default for k, h in self.method.hparams.items() if k not in self.method.prepare_hparams}
        values.update(swept)
        merged = self._state.combine(**values)
        return {key: merged[key] if key in merged else self._pretrained[key] for key in self._pretrained}


def prepare(method: str, pretrained: Source, finetuned: Sequence[Source], **fixed: Any) -> Prepared:
    """Validate the checkpoints and run `method`'s hyperparameter-independent preparation.

    Checkpoints are mappings or paths; `.safetensors` paths are read key by key, never whole.
    """
    cls = get_method(method)
    _check_hparams(cls, fixed)
    if isinstance(finetuned, (str, Path, Mapping)):
        raise TypeError(f"finetuned must be a list of checkpoints (paths or state dicts), one per task; got one "
                        f"{type(finetuned).__name__}: {str(finetuned)[:200]}")
    pretrained = open_state_dict(pretrained)
    finetuned = [open_state_dict(model) for model in finetuned]
    validate_checkpoints(pretrained, finetuned)
    prepare_values = {k: fixed.get(k, cls.hparams[k].default) for k in cls.prepare_hparams}
    state = cls().prepare(pretrained, finetuned, **prepare_values)
    return Prepared(cls, pretrained, state, {k: v for k, v in fixed.items() if k in cls.prepare_hparams})


def split_hparams(method: str, hparams: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(prepare-time, swept) parts of `hparams` for `method`: candidates that share the first part share one
    `prepare()`."""
    cls = get_method(method)
    fixed = {k: v for k, v in hparams.items() if k in cls.prepare_hparams}
    return fixed, {k: v for k, v in hparams.items() if k not in cls.prepare_hparams}


def merge(method: str, pretrained: Source, finetuned: Sequence[Source], **hparams: Any) -> dict[str, torch.Tensor]:
    """Merge `finetuned` into `pretrained` with `method` at `hparams` (one-shot `prepare` + `merge`)."""
    fixed, swept = split_hparams(method, hparams)
    return prepare(method, pretrained, finetuned, **fixed).merge(**swept)
