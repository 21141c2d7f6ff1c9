"""STAR (`star`): Spectral Truncation And Rescale (Lee et al.).

Reference (LoRA LLMs only, no vision implementation exists): `IBM/STAR: merger/STAR.py:star`, merge
`merger/simple_avg.py:weighted_merge`. Per task and per matrix key (matrix rule as `tsv`: 2-D after dropping
size-1 dimensions, key not matching `exclude`, none by default):

1. thin SVD (here: float64 triplets from `_spectral`, as TSV-M); r* = searchsorted(cumsum(σ), Σσ·η/100) + 1
   (left side), i.e. the smallest r with Σ_{i≤r} σ_i ≥ η/100·Σσ;
2. rescale the kept σ by Σσ / Σ_{i≤r*} σ_i (nuclear norm preserved);
3. W'_t = (U_{r*} diag(σ')) V_{r*}ᵀ. An all-zero matrix gives zeros (the reference would give NaN, 0/0).

Merge: Δ = clone(W'_1)·(1/T), then Δ += W'_t·(1/T) in task order; non-matrix keys (no reference rule) use the
same 1/T average of τ_t. θ* = θ0 + α·Δ; α = 1 is the reference (which has no scaling factor).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from taskmerge.merging._checks import key_meta
from taskmerge.merging._helpers import (
    DEVICE,
    DeltaMethod,
    as_matrix,
    float_keys,
    interval,
    is_matrix,
    number_in,
    regex_or_none,
    task_vectors,
)
from taskmerge.merging._registry import HParam, finite_float, register
from taskmerge.merging._spectral import leading_triplets, uses_svd


def star_rank(singular_values: torch.Tensor, eta: float) -> int:
    """r*: the number of leading singular values whose cumulative sum first reaches η % of their total."""
    total = torch.sum(singular_values)
    return torch.searchsorted(torch.cumsum(singular_values, dim=0), total * eta / 100).item() + 1


def star_matrix(matrix: torch.Tensor, eta: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Spectral truncation to r* (η %) and rescaling to the original nuclear norm; zeros stay zeros. The triplets
    come from `_spectral` in float64 on `device` (through the Gram matrix unless `matrix` is float64), as for TSV-M."""
    if not bool(matrix.any()):
        return torch.zeros_like(matrix)
    u, s, vh = leading_triplets(matrix.to(device), min(matrix.shape), uses_svd(matrix.dtype))
    total = torch.sum(s)
    rank = star_rank(s, eta)
    kept = s[:rank]
    scaled = (total / torch.sum(kept)) * kept
    return ((u[:, :rank] * scaled) @ vh[:rank, :]).to("cpu", matrix.dtype)


def uniform_average(tensors: Iterable[torch.Tensor], count: int) -> torch.Tensor:
    """clone(x_1)·(1/T), then += x_t·(1/T) (`weighted_merge` with equal weights)."""
    weight = 1 / count
    total = None
    for tensor in tensors:
        if total is None:
            total = tensor.clone() * weight
        else:
            total += tensor * weight
    return total


@register
class Star(DeltaMethod):
    """θ0 + α·(1/T)·Σ_t STAR(τ_t; η) (matrices; other keys: 1/T average)."""

    name = "star"
    hparams = {
        "eta": HParam(40, number_in(0, 100, low_open=True), interval(0, 100, low_open=True) + " (percent of the nuclear norm kept)", kind=float),
        "alpha": HParam(1.0, finite_float, "a finite number (scaling coefficient; 1.0 is the reference)"),
        "exclude": HParam(None, regex_or_none, "a regular expression or null (keys never treated as matrices)"),
        "device": DEVICE,
    }
    prepare_hparams = ("eta", "exclude", "device")

    def delta(self, pretrained, finetuned, *, eta: float, exclude: str | None, device: str, **_: Any):
        vectors = task_vectors(pretrained, finetuned)
        delta = {}
        for key in float_keys(pretrained):
            shape = key_meta(pretrained, key)[1]
            if is_matrix(key, shape, exclude):
                parts = (star_matrix(as_matrix(vector[key]), eta, device).reshape(shape) for vector in vectors)
            else:
                parts = (vector[key] for vector in vectors)
            delta[key] = uniform_average(parts, len(vectors))
        return delta
