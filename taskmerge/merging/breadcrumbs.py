"""Model Breadcrumbs (`breadcrumbs`): per-row "middle keep" masks (Davari & Belilovsky).

Reference: `rezazzr/breadcrumbs: src/task_vectors.py:TaskVectorMiddleKeep` (`mask_remove_top` then
`mask_keep_top`). Per task and per floating-point key (no key excluded):

* 0-D tensors (`logit_scale`) are left untouched;
* otherwise masks run along the LAST dimension (n = shape[-1]), each row independently: zero the int(n·γ)
  largest-|·| entries, then keep only the int(n·β) largest-|·| entries of what remains (`torch.topk`);
* Δ = τ̃_1 + τ̃_2 + … (left to right, the reference's Python `sum`), θ* = θ0 + α·Δ.

β (`beta`) is the kept fraction of a row, γ (`gamma`) the removed top fraction.
"""

from __future__ import annotations

from typing import Any

import torch

from taskmerge.merging._helpers import DeltaMethod, float_keys, interval, number_in, python_sum, task_vectors
from taskmerge.merging._registry import HParam, finite_float, register


def _mask_top(tensor: torch.Tensor, fraction: float, keep: bool) -> torch.Tensor:
    """Keep (keep=True) or zero (keep=False) the int(n·fraction) largest-|·| entries of every last-dim row."""
    count = int(tensor.shape[-1] * fraction)
    _, indices = torch.topk(tensor.abs(), count)
    mask = torch.zeros_like(tensor) if keep else torch.ones_like(tensor)
    mask.scatter_(tensor.dim() - 1, indices, 1.0 if keep else 0.0)
    return mask * tensor


def breadcrumb(tau: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """τ masked per last-dim row: remove the top γ, then keep the top β of the rest (0-D untouched)."""
    if tau.dim() == 0:
        return tau
    return _mask_top(_mask_top(tau, gamma, keep=False), beta, keep=True)


@register
class Breadcrumbs(DeltaMethod):
    """θ0 + α·Σ_t breadcrumb(τ_t; β, γ)."""

    name = "breadcrumbs"
    hparams = {
        "beta": HParam(0.2, number_in(0, 1), interval(0, 1) + " (kept fraction of each row)"),
        "gamma": HParam(0.1, number_in(0, 1), interval(0, 1) + " (removed top fraction of each row)"),
        "alpha": HParam(0.4, finite_float, "a finite number (scaling coefficient)"),
    }
    prepare_hparams = ("beta", "gamma")

    def delta(self, pretrained, finetuned, *, beta: float, gamma: float, **_: Any):
        vectors = task_vectors(pretrained, finetuned)
        return {key: python_sum(breadcrumb(vector[key], beta, gamma) for vector in vectors) for key in float_keys(pretrained)}
