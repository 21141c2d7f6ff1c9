"""Label-free aggregations of per-task TAP into one score per candidate (`tap.aggregate`; lower is better).

The paper's TAP is the plain mean over tasks, which lets the task whose TAP moves most over the candidates
decide the pick. The other aggregations put tasks on a common scale first, from the candidates' TAP and the
base encoder's TAP alone (no labels). With `s[c, t]` the TAP of candidate `c` on task `t` (T tasks, C
candidates) and `b[t]` the TAP of the base encoder θ0 on task `t`:

- `mean`:              A[c] = (1/T) Σ_t s[c, t]                                   (the paper's TAP)
- `relative_to_base`:  A[c] = (1/T) Σ_t s[c, t] / b[t]                  (share of θ0's distance left)
- `standardized`:      A[c] = (1/T) Σ_t (s[c, t] − μ_t) / σ_t     (μ_t, σ_t: mean and std over the candidates)
- `min_max`:           A[c] = (1/T) Σ_t (s[c, t] − min_c s) / (max_c s − min_c s)   (over the candidates)
- `rank`:              A[c] = (1/T) Σ_t rank_t(c)          (1 = lowest TAP on t among the candidates; ties averaged)
- `worst_relative`:    A[c] = max_t s[c, t] / b[t]             (the task left furthest from its teacher, minimax)

`mean`, `relative_to_base` and `worst_relative` score each candidate on its own (`POINTWISE`); the others
score it against the whole candidate set, so adding or removing candidates can change their pick. A task
whose TAP is the same for every candidate (σ_t = 0, max = min) adds 0 to `standardized` and `min_max`.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

MEAN = "mean"
Scorer = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (TAP [C, T], base TAP [T]) -> scores [C]


def _mean(taps: np.ndarray, base: np.ndarray) -> np.ndarray:
    return taps.mean(axis=1)


def _relative_to_base(taps: np.ndarray, base: np.ndarray) -> np.ndarray:
    return (taps / base).mean(axis=1)


def _worst_relative(taps: np.ndarray, base: np.ndarray) -> np.ndarray:
    return (taps / base).max(axis=1)


def _scaled(centred: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """`centred / spread` per task, 0 where a task's spread is 0 (its TAP does not tell candidates apart)."""
    safe = np.where(spread > 0, spread, 1.0)
    return np.where(spread > 0, centred / safe, 0.0).mean(axis=1)


def _standardized(taps: np.ndarray, base: np.ndarray) -> np.ndarray:
    return _scaled(taps - taps.mean(axis=0), taps.std(axis=0))


def _min_max(taps: np.ndarray, base: np.ndarray) -> np.ndarray:
    low = taps.min(axis=0)
    return _scaled(taps - low, taps.max(axis=0) - low)


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of `values` (lowest first), tied values sharing their mean rank."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def _rank(taps: np.ndarray, base: np.ndarray) -> np.ndarray:
    return np.stack([_ranks(column) for column in taps.T], axis=1).mean(axis=1)


AGGREGATES: dict[str, Scorer] = {
    MEAN: _mean,
    "relative_to_base": _relative_to_base,
    "standardized": _standardized,
    "min_max": _min_max,
    "rank": _rank,
    "worst_relative": _worst_relative,
}
POINTWISE = (MEAN, "relative_to_base", "worst_relative")
NEEDS_BASE = ("relative_to_base", "worst_relative")


def task_names(tap: Mapping[str, float]) -> list[str]:
    """The tasks of a candidate's TAP scores (every key but the precomputed `mean`)."""
    return [name for name in tap if name != MEAN]


def aggregate(name: str, taps: Sequence[Mapping[str, float]], base: Mapping[str, float] | None = None) -> list[float]:
    """The `name` aggregation of each candidate's per-task TAP (`taps`: one mapping task → TAP per candidate, the
    candidate set of the set-relative aggregations), given `base` (task → TAP of θ0) where it needs one."""
    if name not in AGGREGATES:
        raise ValueError(f"unknown TAP aggregation {name!r}; expected one of {list(AGGREGATES)}")
    if not taps:
        return []
    tasks = task_names(taps[0])
    if name in NEEDS_BASE and base is None:
        raise ValueError(f"the TAP aggregation {name!r} needs the base encoder's TAP per task")
    matrix = np.array([[float(tap[t]) for t in tasks] for tap in taps], dtype=np.float64)
    reference = np.array([float(base[t]) for t in tasks]) if base is not None else np.ones(len(tasks))
    return [float(v) for v in AGGREGATES[name](matrix, reference)]
