"""Merge methods over plain tensors: `merge(method, pretrained, finetuned, **hparams)`, `prepare(...)`,
`available()`. Importing this package registers every built-in method."""

from taskmerge.merging import task_arithmetic  # noqa: F401  (registers ta, average)
from taskmerge.merging._registry import HParam, MergeMethod, Prepared, PreparedMerge, available, get_method, merge, prepare, register

__all__ = ["HParam", "MergeMethod", "Prepared", "PreparedMerge", "available", "get_method", "merge", "prepare", "register"]
