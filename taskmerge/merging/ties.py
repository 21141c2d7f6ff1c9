"""TIES-Merging (`ties`): trim, elect sign, disjoint merge (Yadav et al.; vision harness of tall_masks/TSV/LiNeS).

Reference: `tall_masks: src/utils/ties_utils.py:ties_merging` + `src/utils/utils.py:topk_values_mask`, which run
on ONE flat vector per task made of all floating-point keys in Python `sorted()` order (text leftovers,
`logit_scale`, biases, LayerNorms, embeddings included). Per task t with d entries and keep percentage K:

1. Trim: thr_t = kthvalue(|τ_t|, d − int(d·K/100)) (k-th smallest); keep |τ_t| ≥ thr_t (ties at the threshold
   are kept). K = 100 is a no-op.
2. Elect: γ = sign(Σ_t τ̂_t); coordinates with γ = 0 get sign(Σ_j γ_j), one majority sign for the whole model.
3. Disjoint merge: keep τ̂_t[j] iff τ̂_t[j] > 0 where γ_j > 0 and τ̂_t[j] < 0 otherwise;
   `mean` divides the kept sum by max(number kept, 1), `sum` does not.
4. θ* = θ0 + α·merged.

The thresholds are computed one task at a time (one flat d-vector in memory); the sign election and merge run
key by key (T tensors of one key in memory). K is always a percentage here (the reference reads K < 1 as a
fraction).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from taskmerge.merging._helpers import DeltaMethod, flatten, interval, number_in, one_of, sorted_float_keys, task_vectors
from taskmerge.merging._registry import HParam, finite_float, register


def trim_thresholds(vectors: Sequence[Mapping[str, torch.Tensor]], keys: Sequence[str], k: float) -> list[torch.Tensor | None]:
    """Per task, the magnitude threshold of the global top-k% trim over the flat vector of `keys` (None if k = 100)."""
    if k == 100:
        return [None] * len(vectors)
    thresholds = []
    for vector in vectors:
        magnitudes = flatten(vector, keys).abs()
        d = magnitudes.numel()
        kth = max(d - int(d * (k / 100)), 1)
        thresholds.append(magnitudes.kthvalue(kth).values)
        del magnitudes
    return thresholds


def trimmed(tau: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor:
    """τ with the entries below the task's threshold zeroed (`M * (|M| >= thr)`)."""
    return tau if threshold is None else tau * (tau.abs() >= threshold)


def ties_delta(vectors: Sequence[Mapping[str, torch.Tensor]], keys: Sequence[str], k: float, agg: str) -> dict[str, torch.Tensor]:
    """The unscaled TIES update for `keys` (sorted order) from the task vectors `vectors`."""
    thresholds = trim_thresholds(vectors, keys, k)

    def stacked(key: str) -> torch.Tensor:
        return torch.stack([trimmed(vector[key], thr) for vector, thr in zip(vectors, thresholds)])

    signs = {key: torch.sign(stacked(key).sum(dim=0)) for key in keys}
    majority = torch.sign(flatten(signs, keys).sum())
    for sign in signs.values():
        sign[sign == 0] = majority

    delta = {}
    for key in keys:
        tensor = stacked(key)
        keep = torch.where(signs.pop(key).unsqueeze(0) > 0, tensor > 0, tensor < 0)
        selected = tensor * keep
        if agg == "mean":
            counts = (selected != 0).sum(dim=0).float()
            delta[key] = torch.sum(selected, dim=0) / torch.clamp(counts, min=1)
        else:
            delta[key] = torch.sum(selected, dim=0)
    return delta


@register
class Ties(DeltaMethod):
    """θ0 + α·TIES(τ_1..τ_T; global trim to k %, elected sign, disjoint `agg`)."""

    name = "ties"
    hparams = {
        "k": HParam(20, number_in(0, 100, low_open=True),
                    interval(0, 100, low_open=True) + " (percent of entries kept per task; 100 = no trimming)"),
        "agg": HParam("mean", one_of("mean", "sum"), "'mean' or 'sum' (disjoint aggregation)"),
        "alpha": HParam(1.0, finite_float, "a finite number (scaling coefficient)"),
    }
    prepare_hparams = ("k", "agg")

    def delta(self, pretrained, finetuned, *, k: float, agg: str, **_: Any):
        return ties_delta(task_vectors(pretrained, finetuned), sorted_float_keys(pretrained), k, agg)
