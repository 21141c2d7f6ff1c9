"""TSV-M (`tsv`): Task Singular Vectors — Merge (Gargiulo et al.).

Reference: `AntoAndGar/task_singular_vectors: src/utils/TSVM_utils.py:compute_and_sum_svd_mem_reduction`.

Matrix rule: a tensor is a "matrix" when it is 2-D after dropping its size-1 dimensions and its key does not
match the regex `exclude` (none by default; the CLIP setting supplies `text_projection`, the reference's exclusion). For ViT state dicts that is
the attention/MLP weights (fused `in_proj_weight` as one matrix), `visual.proj`, both positional embeddings and
`token_embedding.weight`; `conv1.weight` (4-D), biases, LayerNorms, `class_embedding`, `logit_scale` and
`text_projection` are not.

Per matrix key, W_t = τ_t[key] ∈ R^{m×n}, r = min(m, n), k = int(r·fraction) (fraction = 1/T by default):
1. the top-k singular triplets of every W_t go to block t ([t·k, (t+1)·k)) of Û (m×T·k), σ̂, V̂ᵀ (the reference's
   buffers are r wide with a zero tail, which changes nothing below);
2. polar factors: U⊥ = Û (ÛᵀÛ)^{-1/2} (the reference's P Q of Û = P Σ Q), V⊥ likewise;
3. Δ[key] = U⊥ diag(σ̂) V⊥.
Non-matrix keys: running mean m ← m + (τ_t − m)/(t+1) in task order. All keys: θ* = θ0 + α·Δ.

The triplets and the polar factors of float32 (and narrower) task matrices come from float64 eigendecompositions
of r×r Gram matrices (`_spectral`), not from float32 SVDs: ~3× faster, and closer to the float64 reference than
float32 SVDs come (tests); float64 task matrices get float64 SVDs (`_spectral.uses_svd`). Task matrices are read one
at a time on the CPU (memory: one matrix, plus k vectors per task), or on `device` (e.g. `cuda`) all T of a key at
once, their eigendecompositions batched. Every decomposition happens in `prepare`; `combine(alpha)` only scales
and adds.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

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
    optional,
    regex_or_none,
    running_mean,
    task_vectors,
)
from taskmerge.merging._registry import HParam, finite_float, register
from taskmerge.merging._spectral import leading_triplets, polar_columns, polar_rows, uses_svd

CPU_BATCH = 1  # task matrices decomposed together on the CPU (one bounds memory; elsewhere all T of a key)


def _batches(matrices: Iterable[torch.Tensor], size: int | None, device: torch.device) -> Iterator[list[torch.Tensor]]:
    """The matrices in task order, moved to `device` one by one as read, `size` at a time (all at once for None)."""
    batch: list[torch.Tensor] = []
    for matrix in matrices:
        batch.append(matrix.to(device))
        if size is not None and len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def tsv_matrix(matrices: Iterable[torch.Tensor], fraction: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """TSV-M of the task matrices (task order): top-int(r·fraction) triplets per task, orthogonalised, recombined;
    exactly 0 (no decomposition) when every task matrix is 0."""
    device = torch.device(device)
    lefts, sigmas, rights = [], [], []
    for batch in _batches(matrices, CPU_BATCH if device.type == "cpu" else None, device):
        stack = torch.stack(batch)
        del batch[:]
        rows, cols = stack.shape[-2:]
        keep = int(min(rows, cols) * fraction)
        left = torch.zeros(len(stack), rows, keep, dtype=torch.float64, device=device)
        sigma = torch.zeros(len(stack), keep, dtype=torch.float64, device=device)
        right = torch.zeros(len(stack), keep, cols, dtype=torch.float64, device=device)
        changed = stack.flatten(1).abs().amax(dim=1) > 0
        if keep and bool(changed.any()):
            left[changed], sigma[changed], right[changed] = leading_triplets(stack[changed], keep, uses_svd(stack.dtype))
        lefts += list(left)
        sigmas += list(sigma)
        rights += list(right)
        dtype, shape = stack.dtype, (rows, cols)
    sigma = torch.cat(sigmas)
    if not bool(sigma.any()):
        return torch.zeros(shape, dtype=dtype)
    svd = uses_svd(dtype)
    delta = (polar_columns(torch.cat(lefts, dim=1), svd) * sigma) @ polar_rows(torch.cat(rights, dim=0), svd)
    return delta.to("cpu", dtype)


@register
class TSVMerge(DeltaMethod):
    """θ0 + α·TSV-M(τ_1..τ_T) (matrices: see the module docstring; others: running mean)."""

    name = "tsv"
    hparams = {
        "alpha": HParam(1.0, finite_float, "a finite number (scaling coefficient)"),
        "fraction": HParam(None, optional(number_in(0, 1, low_open=True)),
                           "null (1/T) or " + interval(0, 1, low_open=True) + " (fraction of singular components kept per task)",
                           kind=float),
        "exclude": HParam(None, regex_or_none, "a regular expression or null (keys never treated as matrices)"),
        "device": DEVICE,
    }
    prepare_hparams = ("fraction", "exclude", "device")

    def delta(self, pretrained, finetuned, *, fraction: float | None, exclude: str | None, device: str, **_: Any):
        vectors = task_vectors(pretrained, finetuned)
        fraction = 1 / len(vectors) if fraction is None else fraction
        delta = {}
        for key in float_keys(pretrained):
            if is_matrix(key, key_meta(pretrained, key)[1], exclude):
                matrices = (as_matrix(vector[key]) for vector in vectors)
                delta[key] = tsv_matrix(matrices, fraction, device).reshape(key_meta(pretrained, key)[1])
            else:
                delta[key] = running_mean(vector[key] for vector in vectors)
        return delta
