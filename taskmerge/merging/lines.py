"""LiNeS (`lines`): Layer-increasing Network Scaling of a merged update (Wang et al.).

Reference: `wang-kee/LiNeS: src/eval/eval.py:LiNeS_scaling, evaluate` (multi-task branch), norms in
`src/eval/aggregation.py:create_task_vector`.

1. Δ = the base method's unscaled update: `ta` Σ_t τ_t; `ties` TIES(k, agg) (reference k = 20, `mean`);
   `consensus` Σ_t τ_t ⊙ consensus mask (TA-based, with `tall_lambda`, `min_agree`). Obtained from the
   registered method itself (`_helpers.base_delta`).
2. α = (‖Σ_t τ_t‖₁ / ‖Δ‖₁) / T (L1 norms over the flat vector of all floating-point keys in sorted order), unless
   `alpha` is given; for `ta` the automatic α is exactly 1/T.
3. Block of a key: the first ℓ in 0..L−1 whose substring `.{ℓ}.` occurs in the key (L = `num_blocks`, by
   default the number of distinct integers i with `.{i}.` in some key, e.g. `resblocks.{i}.` / `blocks.{i}.`).
   Scale s = α + β·ℓ/(L−1) (Python double; s = α when L = 1), keys in no block get s = α.
4. θ* = θ0 + s(key)·Δ[key].
β (`beta`) and `alpha` are swept; everything else is prepared once.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import torch

from taskmerge.merging._helpers import (
    base_delta,
    flatten,
    int_at_least,
    number_in,
    one_of,
    optional,
    reject_extra,
    scalar_or_sequence,
    sorted_float_keys,
)
from taskmerge.merging.ties import Ties
from taskmerge.merging._registry import HParam, MergeMethod, PreparedMerge, finite_float, register

BASES = ("ta", "ties", "consensus")
_BLOCK = re.compile(r"(?=\.(\d+)\.)")


def infer_num_blocks(keys: Sequence[str]) -> int:
    """The number of distinct integers i such that `.{i}.` occurs in some key."""
    return len({int(match.group(1)) for key in keys for match in _BLOCK.finditer(key)})


def block_index(key: str, num_blocks: int) -> int | None:
    """The first ℓ in 0..num_blocks−1 with `.{ℓ}.` in `key` (substring match, as the reference), else None."""
    for layer in range(num_blocks):
        if f".{layer}." in key:
            return layer
    return None


def l1_norm(tensors: Mapping[str, torch.Tensor], keys: Sequence[str]) -> float:
    """‖·‖₁ of the flat vector of `keys` (one torch reduction, then a Python float)."""
    return flatten(tensors, keys).abs().sum().item()


class _LinesState(PreparedMerge):
    def __init__(self, pretrained, delta: dict[str, torch.Tensor], auto_alpha: float, blocks: dict[str, int | None], num_blocks: int):
        self.pretrained, self.delta, self.auto_alpha, self.blocks, self.num_blocks = pretrained, delta, auto_alpha, blocks, num_blocks

    def scale(self, key: str, beta: float, alpha: float) -> float:
        layer = self.blocks[key]
        if layer is None or self.num_blocks < 2:
            return alpha
        return alpha + beta * (layer / (self.num_blocks - 1))

    def combine(self, beta: float, alpha: float | None = None, **extra: Any) -> dict[str, torch.Tensor]:
        reject_extra(extra)
        alpha = self.auto_alpha if alpha is None else alpha
        return {key: self.pretrained[key] + delta * self.scale(key, beta, alpha) for key, delta in self.delta.items()}


@register
class Lines(MergeMethod):
    """θ0 + (α + β·ℓ(key)/(L−1))·Δ_base."""

    name = "lines"
    hparams = {
        "beta": HParam(0.5, finite_float, "a finite number (scale increase from the first to the last block)"),
        "alpha": HParam(None, optional(finite_float),
                        "null (automatic (‖Στ‖₁/‖Δ‖₁)/T) or a finite number (scale of the first block)", kind=float),
        "base": HParam("ta", one_of(*BASES), f"one of {list(BASES)} (base merge method)"),
        "num_blocks": HParam(None, optional(int_at_least(1)), "null (inferred from the keys) or an integer >= 1", kind=int),
        "k": Ties.hparams["k"],
        "agg": Ties.hparams["agg"],
        "tall_lambda": HParam(0.4, scalar_or_sequence(number_in(0, float("inf"))), "a number >= 0 or a list of them (consensus base)",
                              kind=Any),
        "min_agree": HParam(2, int_at_least(0), "an integer >= 0 (consensus base)"),
    }
    prepare_hparams = ("base", "num_blocks", "k", "agg", "tall_lambda", "min_agree")

    def prepare(self, pretrained, finetuned, *, base: str, num_blocks: int | None, k: float, agg: str,
                tall_lambda: Any, min_agree: int, **_: Any):
        fixed = {
            "ta": {},
            "ties": {"k": k, "agg": agg},
            "consensus": {"tall_lambda": tall_lambda, "min_agree": min_agree, "base": "ta"},
        }[base]
        delta = base_delta(base, pretrained, finetuned, **fixed)
        summed = delta if base == "ta" else base_delta("ta", pretrained, finetuned)
        keys = sorted_float_keys(pretrained)
        norm_summed, norm_merged = l1_norm(summed, keys), l1_norm(delta, keys)
        del summed
        num_tasks = len(finetuned)
        auto_alpha = (norm_summed / norm_merged) * 1 / num_tasks if norm_merged > 0 else 1 / num_tasks
        num_blocks = infer_num_blocks(keys) if num_blocks is None else num_blocks
        blocks = {key: block_index(key, num_blocks) for key in keys}
        return _LinesState(pretrained, delta, auto_alpha, blocks, num_blocks)
