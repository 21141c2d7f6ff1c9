"""Task arithmetic (`ta`) and weight averaging (`average`).

`ta`:      θ = θ0 + α · Σ_t τ_t, with τ_t = θ_t − θ0 (Ilharco et al.; `sum` in the tall_masks harness).
`average`: θ = θ0 + (1/T) · Σ_t τ_t, i.e. the mean of the fine-tuned weights.
Σ_t is `torch.stack(...).sum(0)` per key, the per-element order of the reference's flat `sum(dim=0)`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from taskmerge.merging._checks import is_mergeable
from taskmerge.merging._registry import HParam, MergeMethod, PreparedMerge, finite_float, register


def stacked_task_vectors(key: str, base: torch.Tensor, finetuned: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """τ_t[key] for every task as one `[T, *shape]` tensor, filled in place: peak memory is the stack
    plus one checkpoint tensor, whatever T."""
    stack = torch.empty((len(finetuned), *base.shape), dtype=base.dtype)
    for index, model in enumerate(finetuned):
        torch.sub(model[key], base, out=stack[index])
    return stack


def sum_task_vectors(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Σ_t (θ_t − θ0) for every floating-point key, computed key by key."""
    total = {}
    for key in pretrained:
        base = pretrained[key]
        if is_mergeable(base):
            total[key] = stacked_task_vectors(key, base, finetuned).sum(0)
    return total


class _ScaledSum(PreparedMerge):
    def __init__(self, pretrained: Mapping[str, torch.Tensor], total: dict[str, torch.Tensor]) -> None:
        self.pretrained, self.total = pretrained, total

    def scaled(self, alpha: float) -> dict[str, torch.Tensor]:
        return {key: self.pretrained[key] + alpha * tau for key, tau in self.total.items()}


class _TaskArithmeticState(_ScaledSum):
    def combine(self, alpha: float, **_: Any) -> dict[str, torch.Tensor]:
        return self.scaled(alpha)


class _AverageState(_ScaledSum):
    def __init__(self, pretrained: Mapping[str, torch.Tensor], total: dict[str, torch.Tensor], num_tasks: int) -> None:
        super().__init__(pretrained, total)
        self.num_tasks = num_tasks

    def combine(self, **_: Any) -> dict[str, torch.Tensor]:
        return self.scaled(1.0 / self.num_tasks)


@register
class TaskArithmetic(MergeMethod):
    """θ0 + α·Σ τ_t."""

    name = "ta"
    hparams = {"alpha": HParam(0.3, finite_float, "a finite number (scaling coefficient)")}

    def prepare(self, pretrained, finetuned, **fixed):
        return _TaskArithmeticState(pretrained, sum_task_vectors(pretrained, finetuned))


@register
class Average(MergeMethod):
    """Weight averaging: θ0 + (1/T)·Σ τ_t."""

    name = "average"

    def prepare(self, pretrained, finetuned, **fixed):
        return _AverageState(pretrained, sum_task_vectors(pretrained, finetuned), len(finetuned))
