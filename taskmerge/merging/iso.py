"""Iso-C (`iso_c`) and Iso-CTS (`iso_cts`): isotropic merging (Marczak et al.).

Reference: `danielm1405/iso-merging: src/utils/iso.py:iso_c, iso_cts`. Matrix rule as `tsv` (2-D after dropping
size-1 dimensions, key not matching `exclude`, none by default). θ* = θ0 + α·Δ for all keys.

Iso-C, per matrix key: M = (Σ_t τ_t / T)·T (the reference divides then multiplies), M = U diag(σ) Vᵀ,
Δ = U diag(mean(σ)·1) Vᵀ (all r = min(m, n) singular values, no truncation), computed as mean(σ)·M(MᵀM)^{+1/2}
from a float64 eigendecomposition of the Gram matrix (`_spectral.isotropic`, on `device`; float64 matrices: an
SVD, `_spectral.uses_svd`); the task matrices are summed one at a time. Non-matrices: Σ_t τ_t / T (left-to-right
sum, then divide — not the running mean).

Iso-CTS, per matrix key, r = min(m, n), f = `common_fraction`:
1. k_c = r − round((r − int(r·f))/T)·T (Python `round`, banker's rounding), n = (r − k_c)/T per task;
2. W = Σ_t τ_t (left to right), its first k_c singular triplets are the common subspace U_c, σ_c, V_cᵀ;
3. per task: W_t^ts = W_t − U_c U_cᵀ W_t, its top-n triplets go to block t ([t·n, (t+1)·n)) of Û (m×r), σ̂ (r),
   V̂ᵀ (r×n);
4. the k_c common triplets go AFTER the task blocks, at [T·n, T·n + k_c);
5. polar factors: U⊥ of Û, V⊥ of V̂ᵀ;
6. σ̂ ← mean(σ̂)·1, the mean over the task-specific AND the common singular values;
7. Δ = U⊥ diag(σ̂) V⊥.
Non-matrices: running mean in task order (as TSV-M). With n = 0 (e.g. r = 50, T = 20) Iso-CTS is Iso-C on the
top-r subspace. Every decomposition happens in `prepare`.

As for TSV-M, the triplets and polar factors come from float64 eigendecompositions of r×r Gram matrices
(`_spectral`; float64 matrices: SVDs), not float32 SVDs, on `device`. The reference's projector (U_c U_cᵀ) W is
applied as U_c (U_cᵀ W), equal up to rounding without the m×m matrix (9.8 GB for the token embedding). Task
matrices are read one at a time, twice (for the sum, then for the task-specific parts). One difference, where Û or V̂ᵀ is rank-deficient (a task
matrix of rank below n): the reference's polar factor completes the missing directions arbitrarily (whatever its
SVD returns) and step 6 gives them weight mean(σ̂); here they are zero.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

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
    python_sum,
    regex_or_none,
    running_mean,
    task_vectors,
)
from taskmerge.merging._registry import HParam, finite_float, register
from taskmerge.merging._spectral import isotropic, leading_triplets, polar_columns, polar_rows, uses_svd

_ALPHA = HParam(1.0, finite_float, "a finite number (scaling coefficient)")
_EXCLUDE = HParam(None, regex_or_none, "a regular expression or null (keys never treated as matrices)")


def iso_c_matrix(total: torch.Tensor, num_tasks: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Iso-C of task matrices summing to `total`: (total / T)·T (as the reference) with all its singular values replaced
    by their mean, from a float64 eigendecomposition of its Gram matrix (`_spectral.isotropic`); 0 for a zero sum."""
    merged = total / num_tasks
    merged *= num_tasks
    if not bool(merged.any()):
        return torch.zeros_like(merged)
    return isotropic(merged.to(device), uses_svd(merged.dtype)).to("cpu", merged.dtype)


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


def iso_cts_matrix(matrices: Callable[[], Iterable[torch.Tensor]], common_fraction: float,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Iso-CTS of the task matrices that `matrices()` yields in task order (called twice, one matrix held at a time);
    exactly 0 (no decomposition) when every task matrix is 0."""
    device = torch.device(device)
    total, changed, num_tasks = None, False, 0
    for matrix in matrices():
        total = matrix.clone() if total is None else total.add_(matrix)
        changed, num_tasks = changed or bool(matrix.any()), num_tasks + 1
    if total is None:
        raise ValueError("iso_cts_matrix of no task matrices")
    if not changed:
        return torch.zeros_like(total)
    common, per_task = iso_cts_split(min(total.shape), num_tasks, common_fraction)
    svd = uses_svd(total.dtype)
    u_c, s_c, vh_c = leading_triplets(total.to(device), common, svd)
    blocks = [(u_c, s_c, vh_c)]  # the task blocks go before the common one
    for matrix in matrices() if per_task > 0 else ():
        task = matrix.to(device, torch.float64)
        blocks.insert(-1, leading_triplets(task - u_c @ (u_c.T @ task), per_task, svd))
    lefts, sigmas, rights = zip(*blocks)
    delta = torch.cat(sigmas).mean() * polar_columns(torch.cat(lefts, dim=1), svd) @ polar_rows(torch.cat(rights), svd)
    return delta.to("cpu", total.dtype)


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
        "device": DEVICE,
    }
    prepare_hparams = ("common_fraction", "exclude", "device")

    def delta(self, pretrained, finetuned, *, common_fraction: float, exclude: str | None, device: str, **_: Any):
        vectors = task_vectors(pretrained, finetuned)
        delta = {}
        for key in float_keys(pretrained):
            shape = key_meta(pretrained, key)[1]
            if is_matrix(key, shape, exclude):
                delta[key] = iso_cts_matrix(lambda: (as_matrix(vector[key]) for vector in vectors), common_fraction,
                                            device).reshape(shape)
            else:
                delta[key] = running_mean(vector[key] for vector in vectors)
        return delta
