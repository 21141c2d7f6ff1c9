"""TSV-M (`tsv`): Task Singular Vectors — Merge (Gargiulo et al.).

Reference: `AntoAndGar/task_singular_vectors: src/utils/TSVM_utils.py:compute_and_sum_svd_mem_reduction`.

Matrix rule: a tensor is a "matrix" when it is 2-D after dropping its size-1 dimensions and its key does not
match the regex `exclude` (none by default; the CLIP setting supplies `text_projection`, the reference's exclusion). For ViT state dicts that is
the attention/MLP weights (fused `in_proj_weight` as one matrix), `visual.proj`, both positional embeddings and
`token_embedding.weight`; `conv1.weight` (4-D), biases, LayerNorms, `class_embedding`, `logit_scale` and
`text_projection` are not.

Per matrix key, W_t = τ_t[key] ∈ R^{m×n}, r = min(m, n), k = int(r·fraction) (fraction = 1/T by default):
1. thin SVD of every W_t; its top-k triplets go to block t ([t·k, (t+1)·k)) of zero buffers Û (m×r), σ̂ (r),
   V̂ᵀ (r×n) (when fraction > 1/T makes T·k > r the buffers are T·k wide instead);
2. polar factors Û = P Σ Q → U⊥ = P Q, V̂ᵀ = R Σ S → V⊥ = R S;
3. Δ[key] = multi_dot((P, Q, diag(σ̂), R, S)).
Non-matrix keys: running mean m ← m + (τ_t − m)/(t+1) in task order. All keys: θ* = θ0 + α·Δ.

Every SVD happens in `prepare`; `combine(alpha)` only scales and adds.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from taskmerge.merging._helpers import (
    DeltaMethod,
    SVDBlocks,
    as_matrix,
    float_keys,
    merged_matrix,
    interval,
    is_matrix,
    number_in,
    optional,
    polar_factors,
    regex_or_none,
    running_mean,
    task_vectors,
)
from taskmerge.merging._registry import HParam, finite_float, register


def tsv_matrix(matrices: Sequence[torch.Tensor], fraction: float) -> torch.Tensor:
    """TSV-M of the task matrices (task order): top-int(r·fraction) triplets per task, orthogonalised, recombined."""
    blocks = None
    for i, matrix in enumerate(matrices):
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        if blocks is None:
            rank = s.shape[0]
            keep = int(rank * fraction)
            blocks = SVDBlocks(matrix.shape[0], matrix.shape[1], max(rank, keep * len(matrices)), matrix)
        blocks.put(i * keep, keep, u, s, vh)
        del u, s, vh
    p_u, q_u = polar_factors(blocks.u)
    p_v, q_v = polar_factors(blocks.vh)
    return torch.linalg.multi_dot((p_u, q_u, torch.diag(blocks.s), p_v, q_v))


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
    }
    prepare_hparams = ("fraction", "exclude")

    def delta(self, pretrained, finetuned, *, fraction: float | None, exclude: str | None, **_: Any):
        vectors = task_vectors(pretrained, finetuned)
        fraction = 1 / len(vectors) if fraction is None else fraction
        delta = {}
        for key in float_keys(pretrained):
            if is_matrix(key, pretrained[key], exclude):
                matrices = [as_matrix(vector[key]) for vector in vectors]
                delta[key] = merged_matrix(lambda ms: tsv_matrix(ms, fraction), matrices, pretrained[key].shape)
            else:
                delta[key] = running_mean(vector[key] for vector in vectors)
        return delta
