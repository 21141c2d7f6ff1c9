"""Iso-C (`iso_c`) and Iso-CTS (`iso_cts`): isotropic merging (Marczak et al.).

Reference: `danielm1405/iso-merging: src/utils/iso.py:iso_c, iso_cts`. Matrix rule as `tsv` (2-D after dropping
size-1 dimensions, key not matching `exclude`, none by default). θ* = θ0 + α·Δ for all keys.

Iso-C, per matrix key: M = (Σ_t τ_t / T)·T (the reference divides then multiplies), M = U diag(σ) Vᵀ,
Δ = U diag(mean(σ)·1) Vᵀ (all r = min(m, n) singular values, no truncation), computed as mean(σ)·M(MᵀM)^{+1/2}
from a float64 eigendecomposition of the Gram matrix (`_spectral.isotropic`, on `device`), not an SVD; the task
matrices are summed one at a time. Non-matrices: Σ_t τ_t / T (left-to-right sum, then divide — not the running
mean).

Iso-CTS, per matrix key, r = min(m, n), f = `common_fraction`:
1. k_c = r − round((r − int(r·f))/T)·T (Python `round`, banker's rounding), n = (r − k_c)/T per task;
2. W = Σ_t τ_t, U, σ, Vᵀ = svd(W); the common subspace is its first k_c triplets;
3. per task: W_t^ts = W_t − (U_c U_cᵀ) W_t, svd, its top-n triplets go to block t ([t·n, (t+1)·n)) of zero
   buffers Û (m×r), σ̂ (r), V̂ᵀ (r×n);
4. the k_c common triplets go AFTER the task blocks, at [T·n, T·n + k_c);
5. polar factors: U⊥ = P Q of Û, V⊥ = R S of V̂ᵀ;
6. σ̂ ← mean(σ̂)·1, the mean over the task-specific AND the common singular values;
7. Δ = multi_dot((U⊥, diag(σ̂), V⊥)).
Non-matrices: running mean in task order (as TSV-M). With n = 0 (e.g. r = 50, T = 20) Iso-CTS is Iso-C on the
top-r subspace. Every decomposition happens in `prepare`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from taskmerge.merging._checks import key_meta
from taskmerge.merging._helpers import (
    DEVICE,
    DeltaMethod,
    SVDBlocks,
    as_matrix,
    float_keys,
    merged_matrix,
    interval,
    is_matrix,
    number_in,
    polar_factors,
    python_sum,
    regex_or_none,
    running_mean,
    task_vectors,
)
from taskmerge.merging._registry import HParam, finite_float, register
from taskmerge.merging._spectral import isotropic

_ALPHA = HParam(1.0, finite_float, "a finite number (scaling coefficient)")
_EXCLUDE = HParam(None, regex_or_none, "a regular expression or null (keys never treated as matrices)")


def iso_c_matrix(total: torch.Tensor, num_tasks: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Iso-C of task matrices summing to `total`: (total / T)·T (as the reference) with all its singular values replaced
    by their mean, from a float64 eigendecomposition of its Gram matrix (`_spectral.isotropic`); 0 for a zero sum."""
    merged = total / num_tasks
    merged *= num_tasks
    if not bool(merged.any()):
        return torch.zeros_like(merged)
    return isotropic(merged.to(device)).to("cpu", merged.dtype)


def iso_cts_split(rank: int, num_tasks: int, common_fraction: float) -> tuple[int, int]:
    """(k_c, n): size of the common subspace and task-specific components per task (banker's `round`)."""
    common = int(rank * common_fraction)
    common = rank - round((rank - common) / num_tasks) * num_tasks
    if common < 0:
        raise ValueError(
            f"common_fraction={common_fraction!r} leaves a negative common subspace for rank {rank} and {num_tasks} tasks; "
            "use a larger common_fraction"
        )
    return common, int((rank - common) / num_tasks)


PROJECTOR_LIMIT = 1 << 26


def project(basis: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """U_c U_cᵀ W, evaluated as the reference does, `(U_c @ U_c.T) @ W`, unless that m×m projector would
    exceed `PROJECTOR_LIMIT` elements (e.g. the 49408-row token embedding: 9.8 GB): then `U_c @ (U_c.T @ W)`,
    equal up to float rounding."""
    rows = basis.shape[0]
    if rows * rows <= PROJECTOR_LIMIT:
        return basis @ basis.T @ matrix
    return basis @ (basis.T @ matrix)


def iso_cts_matrix(matrices: Sequence[torch.Tensor], common_fraction: float) -> torch.Tensor:
    """Iso-CTS of the task matrices (task order)."""
    num_tasks = len(matrices)
    rows, cols = matrices[0].shape
    rank = min(rows, cols)
    common, per_task = iso_cts_split(rank, num_tasks, common_fraction)
    u, s, vh = torch.linalg.svd(python_sum(matrices), full_matrices=False)
    u_c, s_c, vh_c = u[:, :common], s[:common], vh[:common, :]
    blocks = SVDBlocks(rows, cols, rank, matrices[0])
    if per_task > 0:
        for i, matrix in enumerate(matrices):
            residual = matrix - project(u_c, matrix)
            u_ts, s_ts, vh_ts = torch.linalg.svd(residual, full_matrices=False)
            blocks.put(i * per_task, per_task, u_ts, s_ts, vh_ts)
    blocks.put(num_tasks * per_task, common, u_c, s_c, vh_c)
    p_u, q_u = polar_factors(blocks.u)
    p_v, q_v = polar_factors(blocks.vh)
    sigma = torch.ones_like(blocks.s) * blocks.s.mean()
    return torch.linalg.multi_dot((p_u @ q_u, torch.diag(sigma), p_v @ q_v))


@register
class IsoC(DeltaMethod):
    """θ0 + α·Iso-C(τ_1..τ_T) (matrices: flattened spectrum of Σ τ_t; others: Σ τ_t / T)."""

    name = "iso_c"
    hparams = {"alpha": _ALPHA, "exclude": _EXCLUDE, "device": DEVICE}
    prepare_hparams = ("exclude", "device")

    def delta(self, pretrained, finetuned, *, exclude: str | None, device: str, **_: Any):
        vectors = task_vectors(pretrained, finetuned)
        delta = {}
        for key in float_keys(pretrained):
            shape = key_meta(pretrained, key)[1]
            if is_matrix(key, shape, exclude):
                total = python_sum(as_matrix(vector[key]) for vector in vectors)  # one matrix at a time
                delta[key] = iso_c_matrix(total, len(vectors), device).reshape(shape)
            else:
                delta[key] = python_sum(vector[key] for vector in vectors) / len(vectors)
        return delta


@register
class IsoCTS(DeltaMethod):
    """θ0 + α·Iso-CTS(τ_1..τ_T; common_fraction) (matrices: common + task-specific subspaces; others: running mean)."""

    name = "iso_cts"
    hparams = {
        "alpha": _ALPHA,
        "common_fraction": HParam(0.8, number_in(0, 1), interval(0, 1) + " (fraction of the rank given to the common subspace)"),
        "exclude": _EXCLUDE,
    }
    prepare_hparams = ("common_fraction", "exclude")

    def delta(self, pretrained, finetuned, *, common_fraction: float, exclude: str | None, **_: Any):
        vectors = task_vectors(pretrained, finetuned)
        delta = {}
        for key in float_keys(pretrained):
            if is_matrix(key, key_meta(pretrained, key)[1], exclude):
                matrices = [as_matrix(vector[key]) for vector in vectors]
                delta[key] = merged_matrix(lambda ms: iso_cts_matrix(ms, common_fraction), matrices, key_meta(pretrained, key)[1])
            else:
                delta[key] = running_mean(vector[key] for vector in vectors)
        return delta
