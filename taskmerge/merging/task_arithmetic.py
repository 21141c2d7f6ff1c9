"""Task arithmetic (`ta`) and weight averaging (`average`).

`ta`:      θ = θ0 + α · Σ_t τ_t, with τ_t = θ_t − θ0 (Ilharco et al.; `sum` in the tall_masks harness).
`average`: θ = θ0 + (1/T) · Σ_t τ_t, i.e. the mean of the fine-tuned weights.
Σ_t is a `[T, block].sum(0)` over blocks of each key, like the reference's flat `[T, d].sum(0)`; float32
results can differ from it by 1 ulp where a key's blocks are not aligned as the flat vector's are.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from taskmerge.merging._checks import key_meta
from taskmerge.merging._helpers import DeltaMethod, ScaledDelta, float_keys, one_thread, task_vector_blocks
from taskmerge.merging._registry import HParam, MergeMethod, finite_float, register


def sum_task_vectors(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Σ_t (θ_t − θ0) for every floating-point key, block by block (memory: 2·(T + 1) blocks, whatever T and key
    size; the next block is read while this one is summed)."""
    keys = float_keys(pretrained)
    total = {key: torch.empty(key_meta(pretrained, key)[1], dtype=key_meta(pretrained, key)[0]) for key in keys}
    with one_thread():
        for key, start, stop, stack in task_vector_blocks(pretrained, finetuned, keys):
            torch.sum(stack, 0, out=total[key].view(-1)[start:stop])
    return total


class _AverageState(ScaledDelta):
    """θ0 + (1/T)·Σ τ_t: the θ0 + α·Δ state with α fixed to 1/T."""

    def __init__(self, pretrained: Mapping[str, torch.Tensor], total: dict[str, torch.Tensor], num_tasks: int) -> None:
        super().__init__(pretrained, total)
        self.num_tasks = num_tasks

    def combine(self, **extra: Any) -> dict[str, torch.Tensor]:
        return super().combine(1.0 / self.num_tasks, **extra)


@register
class TaskArithmetic(DeltaMethod):
    """θ0 + α·Σ τ_t."""

    name = "ta"
    hparams = {"alpha": HParam(0.3, finite_float, "a finite number (scaling coefficient)")}

    def delta(self, pretrained, finetuned, **fixed):
        return sum_task_vectors(pretrained, finetuned)


@register
class Average(MergeMethod):
    """Weight averaging: θ0 + (1/T)·Σ τ_t."""

    name = "average"

    def prepare(self, pretrained, finetuned, **fixed):
        return _AverageState(pretrained, sum_task_vectors(pretrained, finetuned), len(finetuned))
