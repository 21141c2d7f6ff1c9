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

import itertools
import math
from typing import Any, Mapping, Sequence

import torch

from taskmerge.merging._checks import key_meta
from taskmerge.merging._helpers import DeltaMethod, interval, number_in, one_of, one_thread, sorted_float_keys, task_vector_blocks
from taskmerge.merging._registry import HParam, finite_float, register


def trim_thresholds(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]],
                    keys: Sequence[str], k: float) -> torch.Tensor | None:
    """Per task, the magnitude threshold of the global top-k% trim over the flat vector of `keys` (None if k = 100).

    The value is `kthvalue(|τ_t|, d − int(d·k/100))` of the reference, found with an in-place selection on one
    reusable d-buffer filled block by block (no sort, no index tensor), so peak memory is one flat vector
    whatever T.
    """
    if k == 100:
        return None
    metas = [key_meta(pretrained, key) for key in keys]
    sizes = [math.prod(shape) for _, shape in metas]
    total = sum(sizes)
    kth = max(total - int(total * (k / 100)), 1)
    dtype = torch.float64 if any(dtype == torch.float64 for dtype, _ in metas) else torch.float32
    buffer = torch.empty(total, dtype=dtype)
    thresholds = torch.empty(len(finetuned), dtype=dtype)
    offsets = dict(zip(keys, itertools.accumulate([0, *sizes[:-1]])))
    for index, model in enumerate(finetuned):
        for key, start, stop, block in task_vector_blocks(pretrained, [model], keys):
            torch.abs(block[0], out=buffer[offsets[key] + start:offsets[key] + stop])
        values = buffer.numpy()
        values.partition(kth - 1)
        thresholds[index] = float(values[kth - 1])
    return thresholds


def trim(stack: torch.Tensor, thresholds: torch.Tensor) -> None:
    """Zero, in place, the entries of each row below its threshold in magnitude (|τ| ≥ threshold are kept, as the
    reference's mask). For float32/64, `hardshrink` at the float just below the threshold does it in one pass."""
    if stack.dtype not in (torch.float32, torch.float64):
        stack.mul_(torch.abs(stack) >= thresholds[:, None])
        return
    floors = torch.nextafter(thresholds, torch.tensor(-torch.inf, dtype=thresholds.dtype)).tolist()
    for row, floor in zip(stack, floors):
        torch.ops.aten.hardshrink.out(row, floor, out=row)


def _aggregate(selected: torch.Tensor, agg: str) -> torch.Tensor:
    """Disjoint aggregation over tasks (dim 0): `sum`, or `mean` over the non-zero kept entries (min 1)."""
    total = torch.sum(selected, dim=0)
    if agg == "sum":
        return total
    return total / torch.clamp((selected != 0).sum(dim=0).float(), min=1)


def ties_delta(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]],
               keys: Sequence[str], k: float, agg: str) -> dict[str, torch.Tensor]:
    """The unscaled TIES update for `keys` (sorted order), in one streaming pass over blocks of every key (after
    the thresholds' pass per task).

    The elected sign of a coordinate whose trimmed values sum to exactly 0 is the global majority sign,
    known only at the end: such coordinates are computed for majority +1 and, where the choice matters
    (some trimmed value is non-zero), also for majority ≤ 0, then patched once the majority is known.
    """
    thresholds = trim_thresholds(pretrained, finetuned, keys, k)
    delta: dict[str, torch.Tensor] = {}
    alternatives: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    balance = 0
    for key, start, stop, stack in task_vector_blocks(pretrained, finetuned, keys):
        dtype, shape = key_meta(pretrained, key)
        if key not in delta:
            delta[key] = torch.empty(shape, dtype=dtype)
        flat = delta[key].view(-1)
        if thresholds is not None:
            trim(stack, thresholds.to(dtype))
        sign = torch.sign(stack.sum(dim=0))
        balance += int(sign.sum(dtype=torch.float64))
        # the reference keeps the entries of the elected sign e (+1 where the sum is 0) and sums or averages them;
        # with x·e exact and addition sign-symmetric, that is e·Σ relu(x·e), bit for bit, over count = Σ sign(relu(x·e))
        elected = sign + (sign == 0)
        agreeing = torch.mul(stack, elected).relu_()
        total = agreeing.sum(dim=0)
        if agg == "mean":
            total /= torch.sign(agreeing).sum(dim=0).clamp_(min=1)
        torch.mul(total, elected, out=flat[start:stop])
        undecided = (sign == 0).nonzero().flatten()
        open_sign = undecided[(stack[:, undecided] != 0).any(dim=0)] if undecided.numel() else undecided
        if open_sign.numel():
            negative = stack[:, open_sign]
            alternatives.append((key, open_sign + start, _aggregate(negative * (negative < 0), agg)))
    if balance <= 0:
        for key, positions, values in alternatives:
            delta[key].view(-1)[positions] = values
    return delta


@register
class Ties(DeltaMethod):
    """θ0 + α·TIES(τ_1..τ_T; global trim to k %, elected sign, disjoint `agg`)."""

    name = "ties"
    hparams = {
        "k": HParam(20, number_in(0, 100, low_open=True),
                    interval(0, 100, low_open=True) + " (percent of entries kept per task; 100 = no trimming)", kind=float),
        "agg": HParam("mean", one_of("mean", "sum"), "'mean' or 'sum' (disjoint aggregation)"),
        "alpha": HParam(1.0, finite_float, "a finite number (scaling coefficient)"),
    }
    prepare_hparams = ("k", "agg")

    def delta(self, pretrained, finetuned, *, k: float, agg: str, **_: Any):
        with one_thread():
            return ties_delta(pretrained, finetuned, sorted_float_keys(pretrained), k, agg)
