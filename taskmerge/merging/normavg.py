"""Norm-equalised averaging (`normavg`): rescale every task vector to the smallest norm, then average.

θ* = θ0 + α·(1/T)·Σ_t τ_t·(min_s ‖τ_s‖ / ‖τ_t‖), with ‖·‖ the global L2 norm of a task vector over all
floating-point keys (flattened in sorted order, one task at a time). The sum runs left to right in task order,
then is divided by T. A task vector of norm 0 contributes zeros (and then every task is scaled to norm 0).
"""

from __future__ import annotations

from typing import Any

import torch

from taskmerge.merging._helpers import DeltaMethod, flatten, float_keys, python_sum, sorted_float_keys, task_vectors
from taskmerge.merging._registry import HParam, finite_float, register


def task_norms(vectors, keys) -> list[float]:
    """‖τ_t‖₂ over the flat vector of `keys`, one task at a time."""
    return [torch.linalg.vector_norm(flatten(vector, keys)).item() for vector in vectors]


@register
class NormAverage(DeltaMethod):
    """θ0 + α·mean_t(τ_t·min_norm/‖τ_t‖)."""

    name = "normavg"
    hparams = {"alpha": HParam(1.0, finite_float, "a finite number (scaling coefficient)")}

    def delta(self, pretrained, finetuned, **_: Any):
        vectors = task_vectors(pretrained, finetuned)
        norms = task_norms(vectors, sorted_float_keys(pretrained))
        smallest = min(norms)
        scales = [smallest / norm if norm > 0 else 0.0 for norm in norms]
        return {
            key: python_sum(vector[key] * scale for vector, scale in zip(vectors, scales)) / len(vectors)
            for key in float_keys(pretrained)
        }
