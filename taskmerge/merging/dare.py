"""DARE (`dare`): drop and rescale every task vector, then merge with a base method (Yu et al.).

Reference (language models only; no vision reference exists): `yule-BUAA/MergeLM:
model_merging_methods/mask_weights_utils.py:mask_input_with_mask_rate` (random strategy, rescale on):

    mask = torch.bernoulli(torch.full_like(τ, p), generator=g)
    τ̃ = τ * (1 − mask) / (1 − p)

per task and per floating-point tensor, with ONE `torch.Generator` seeded with `seed` and drawn in task order ×
key order (state-dict order of the pretrained model). The base method (`ta` or `ties`, with its own
prepare-time hyperparameters `k`, `agg`) then runs on the dropped task vectors: θ* = θ0 + α·Δ_base(τ̃).

Composition: the base is the registered method itself, run on (zeros, τ̃) (`_helpers.base_delta`). The
dropped vectors are lazy: `prepare` records the generator state before every (task, key) draw and replays it
when the base reads that key, so no T × d copy of the task vectors is held.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import torch

from taskmerge.merging._helpers import (
    DeltaMethod,
    TaskVector,
    base_delta,
    float_keys,
    int_at_least,
    interval,
    number_in,
    one_of,
    task_vectors,
    zero_base,
)
from taskmerge.merging.ties import Ties
from taskmerge.merging._registry import HParam, finite_float, register

BASES = ("ta", "ties")


class DroppedTaskVector(Mapping[str, torch.Tensor]):
    """τ̃_t: the task vector with each entry dropped with probability p and survivors rescaled by 1/(1−p).

    Reading a key replays the generator from the state recorded for that (task, key), so every read returns the
    same tensor and the stream equals one generator drawn in task order × key order."""

    def __init__(self, vector: TaskVector, states: Mapping[str, torch.Tensor], p: float, device: torch.device) -> None:
        self._vector, self._states, self._p, self._device = vector, states, p, device

    def __getitem__(self, key: str) -> torch.Tensor:
        tau = self._vector[key]
        generator = torch.Generator(device=self._device)
        generator.set_state(self._states[key])
        mask = torch.bernoulli(torch.full_like(tau, self._p), generator=generator)
        return tau * (1 - mask) / (1 - self._p)

    def __iter__(self) -> Iterator[str]:
        return iter(self._vector)

    def __len__(self) -> int:
        return len(self._vector)


def drop_and_rescale(pretrained: Mapping[str, torch.Tensor], finetuned, p: float, seed: int) -> list[DroppedTaskVector]:
    """The lazy dropped task vectors τ̃_1..τ̃_T of one seeded generator stream (task order × key order)."""
    keys = float_keys(pretrained)
    device = pretrained[keys[0]].device if keys else torch.device("cpu")
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    dropped = []
    for vector in task_vectors(pretrained, finetuned):
        states = {}
        for key in keys:
            states[key] = generator.get_state()
            torch.bernoulli(torch.full_like(pretrained[key], p), generator=generator)  # advance the stream
        dropped.append(DroppedTaskVector(vector, states, p, device))
    return dropped


@register
class Dare(DeltaMethod):
    """θ0 + α·Δ_base(drop_and_rescale(τ_t; p, seed)), base ∈ {ta, ties}."""

    name = "dare"
    hparams = {
        "p": HParam(0.5, number_in(0, 1, high_open=True), interval(0, 1, high_open=True) + " (drop probability)"),
        "base": HParam("ta", one_of(*BASES), f"one of {list(BASES)} (base merge method)"),
        "seed": HParam(0, int_at_least(0), "a non-negative integer (generator seed)"),
        "k": Ties.hparams["k"],
        "agg": Ties.hparams["agg"],
        "alpha": HParam(0.3, finite_float, "a finite number (scaling coefficient)"),
    }
    prepare_hparams = ("p", "base", "seed", "k", "agg")

    def delta(self, pretrained, finetuned, *, p: float, base: str, seed: int, k: float, agg: str, **_: Any):
        dropped = drop_and_rescale(pretrained, finetuned, p, seed)
        return base_delta(base, zero_base(pretrained), dropped, k=k, agg=agg)
