"""Candidates of a search space and selection among scored candidates (tap | eval | both).

A candidate row is the dict written to `candidates.jsonl`: `method`, `hparams`, `tap` (per task and
`mean`), optionally `eval` (per task metric and `normalized`), `seconds`.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Mapping, Sequence

from scipy import stats

from taskmerge.merging import get_method


def grid_candidates(method: str, fixed: Mapping[str, Any], search: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The product of the search lists; a hyperparameter given a fixed value is not searched.

    Prepare-time hyperparameters vary slowest, so candidates sharing a preparation are contiguous.
    Hyperparameters neither fixed nor searched keep the method's defaults (they are not listed).
    """
    known = get_method(method).hparams
    for name in [*fixed, *search]:
        if name not in known:
            raise ValueError(f"method {method!r} has no hyperparameter {name!r}; known: {sorted(known)}")
    prepare_time = get_method(method).prepare_hparams
    order = sorted((name for name in search if name not in fixed), key=lambda name: name not in prepare_time)
    axes = {name: list(search[name]) for name in order}
    for name, values in axes.items():
        if not values:
            raise ValueError(f"method.search.{name} is empty; give at least one value or fix method.{name}")
    return [{**dict(fixed), **dict(zip(axes, combo))} for combo in itertools.product(*axes.values())]


def _valid(rows: Sequence[Mapping[str, Any]], key: str) -> list[Mapping[str, Any]]:
    return [r for r in rows if key in r and r[key] is not None and math.isfinite(r[key].get("mean" if key == "tap" else "normalized", math.nan))]


def pick_by_tap(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The candidate with the lowest mean TAP (the first one on ties, in search order)."""
    scored = _valid(rows, "tap")
    if not scored:
        raise ValueError("no candidate has a finite TAP score; nothing to select")
    return min(scored, key=lambda r: r["tap"]["mean"])


def pick_by_eval(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The candidate with the highest mean normalized validation performance (first on ties)."""
    scored = _valid(rows, "eval")
    if not scored:
        raise ValueError("no candidate has an Eval score; run with selector=eval or selector=both")
    return max(scored, key=lambda r: r["eval"]["normalized"])


def agreement(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Rank agreement of mean TAP and mean normalized Eval, and the regret of the TAP pick.

    Spearman and Kendall are computed on (TAP, Eval) pairs: negative values mean agreement, since lower
    TAP is better. Regret = best normalized Eval − normalized Eval of the TAP pick (0 is perfect).
    """
    scored = [r for r in _valid(rows, "eval") if r in _valid(rows, "tap")]
    taps = [r["tap"]["mean"] for r in scored]
    evals = [r["eval"]["normalized"] for r in scored]
    enough = len(scored) >= 3 and len(set(taps)) > 1 and len(set(evals)) > 1
    return {
        "spearman": float(stats.spearmanr(taps, evals).statistic) if enough else math.nan,
        "kendall": float(stats.kendalltau(taps, evals).statistic) if enough else math.nan,
        "regret": pick_by_eval(scored)["eval"]["normalized"] - pick_by_tap(scored)["eval"]["normalized"],
        "n_candidates": len(scored),
    }
