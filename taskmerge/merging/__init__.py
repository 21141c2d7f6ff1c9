"""Merge methods over plain tensors: `merge(method, pretrained, finetuned, **hparams)`, `prepare(...)`,
`available()`. Importing this package registers every built-in method."""

from taskmerge.merging import task_arithmetic  # noqa: F401  (registers ta, average)
from taskmerge.merging import breadcrumbs, consensus, dare, iso, lines, normavg, star, ties, tsv  # noqa: F401  (register the others)
from taskmerge.merging._registry import HParam, MergeMethod, Prepared, PreparedMerge, available, get_method, merge, prepare, register, split_hparams
from taskmerge.merging.consensus import tall_masks

__all__ = ["HParam", "MergeMethod", "Prepared", "PreparedMerge", "available", "get_method", "merge", "prepare", "register", "split_hparams", "tall_masks"]
