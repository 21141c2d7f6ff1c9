"""TALL masks (helper `tall_masks`) and Consensus Merging (`consensus`) (Wang et al., tall_masks).

Reference: `nik-dim/tall_masks: src/utils/tallmask_utils.py:generate_task_masks, construct_consensus_mask`,
`src/eval/aggregation.py:create_task_vector`.

* Multi-task vector τ_MTL (unscaled): base `ta` → Σ_t τ_t; base `ties` → TIES with k = 20, `sum` aggregation
  (the reference's hard-coded `ties_merging(reset_thresh=20, merge_func="dis-sum")`). Both come from the
  registered methods (`_helpers.base_delta`).
* TALL mask of task t: m_t = |θ0 − θ_t| > λ_t·|(θ0 + τ_MTL) − θ_t| (strict `>`, element-wise), λ_t =
  `tall_lambda` (one value for every task or one per task, e.g. the per-task values chosen on validation).
* Consensus: Δ = τ_MTL ⊙ 1[Σ_t m_t ≥ min_agree]; θ* = θ0 + α·Δ. min_agree = 0 gives the base method, a value
  above T gives the pretrained model.

The reference evaluates each TALL mask separately (θ0 + τ_MTL ⊙ m_t for task t, which needs the task identity
at inference), so `tall_masks` is a helper returning the masks, not a merge method; the OR of all masks is
`consensus` with `min_agree=1`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from taskmerge.merging._checks import validate_checkpoints
from taskmerge.merging._helpers import (
    DeltaMethod,
    base_delta,
    float_keys,
    int_at_least,
    number_in,
    one_of,
    scalar_or_sequence,
)
from taskmerge.merging._registry import HParam, finite_float, register

BASES = ("ta", "ties")
_TIES_BASE = {"k": 20, "agg": "sum"}
_lambda_ok = number_in(0, float("inf"))
_lambda_check = scalar_or_sequence(_lambda_ok)


def multitask_vector(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]],
                     base: str) -> dict[str, torch.Tensor]:
    """τ_MTL: Σ_t τ_t (`ta`) or TIES(k=20, sum) (`ties`), unscaled."""
    if base not in BASES:
        raise ValueError(f"base={base!r} is invalid; expected one of {list(BASES)}")
    return base_delta(base, pretrained, finetuned, **(_TIES_BASE if base == "ties" else {}))


def task_lambdas(tall_lambda: Any, num_tasks: int) -> list[float]:
    """One λ per task from a scalar or a per-task list (ValueError naming `tall_lambda` otherwise)."""
    if not _lambda_check(tall_lambda):
        raise ValueError(f"tall_lambda={tall_lambda!r} is invalid; expected a number >= 0 or a list of them, one per task")
    if _lambda_ok(tall_lambda):
        return [tall_lambda] * num_tasks
    if len(tall_lambda) != num_tasks:
        raise ValueError(f"tall_lambda has {len(tall_lambda)} values but there are {num_tasks} tasks")
    return list(tall_lambda)


def task_mask(theta0: torch.Tensor, theta_t: torch.Tensor, tau_mtl: torch.Tensor, lam: float) -> torch.Tensor:
    """m_t = |θ0 − θ_t| > λ·|(θ0 + τ_MTL) − θ_t| (the reference's operation order)."""
    return (theta0 - theta_t).abs() > ((theta0 + tau_mtl) - theta_t).abs() * lam


def tall_masks(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]],
               tall_lambda: float | Sequence[float] = 0.4, base: str = "ta") -> list[dict[str, torch.Tensor]]:
    """Per-task boolean TALL masks {key: mask} over the floating-point keys, in task order."""
    validate_checkpoints(pretrained, finetuned)
    lambdas = task_lambdas(tall_lambda, len(finetuned))
    tau_mtl = multitask_vector(pretrained, finetuned, base)
    return [
        {key: task_mask(pretrained[key], model[key], tau_mtl[key], lam) for key in float_keys(pretrained)}
        for model, lam in zip(finetuned, lambdas)
    ]


def consensus_delta(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]],
                    tall_lambda: Any, min_agree: int, base: str) -> dict[str, torch.Tensor]:
    """τ_MTL ⊙ 1[Σ_t m_t ≥ min_agree], key by key (no T masks held at once)."""
    lambdas = task_lambdas(tall_lambda, len(finetuned))
    tau_mtl = multitask_vector(pretrained, finetuned, base)
    delta = {}
    for key in float_keys(pretrained):
        count = torch.zeros_like(pretrained[key])
        for model, lam in zip(finetuned, lambdas):
            count = count + task_mask(pretrained[key], model[key], tau_mtl[key], lam).float()
        delta[key] = tau_mtl.pop(key) * (count >= min_agree)
    return delta


@register
class Consensus(DeltaMethod):
    """θ0 + α·(τ_MTL ⊙ 1[#tasks whose TALL mask keeps the weight ≥ min_agree])."""

    name = "consensus"
    hparams = {
        "tall_lambda": HParam(0.4, _lambda_check, "a number >= 0 or a list of them, one per task (TALL mask λ)", kind=Any),
        "min_agree": HParam(2, int_at_least(0), "an integer >= 0 (number of agreeing TALL masks)"),
        "base": HParam("ta", one_of(*BASES), f"one of {list(BASES)} (multi-task vector)"),
        "alpha": HParam(0.3, finite_float, "a finite number (scaling coefficient)"),
    }
    prepare_hparams = ("tall_lambda", "min_agree", "base")

    def delta(self, pretrained, finetuned, *, tall_lambda: Any, min_agree: int, base: str, **_: Any):
        return consensus_delta(pretrained, finetuned, tall_lambda, min_agree, base)
