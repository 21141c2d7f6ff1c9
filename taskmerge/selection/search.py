"""Search strategies over a method's search space (grid, random, Optuna TPE) and selection among scored
candidates (tap | eval | both).

A candidate row is the dict written to `candidates.jsonl`: `method`, `hparams`, `tap` (per task and
`mean`), optionally `eval` (per task metric and `normalized`), `seconds`, or `error` when it failed.
A strategy yields hyperparameter dicts and is told each one's objective (lower is better; None if the
candidate failed), so adaptive searches can steer and every strategy runs through the same loop.
"""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol, Sequence

from scipy import stats

from taskmerge.merging import get_method
from taskmerge.selection import aggregate as aggregation
from taskmerge.selection.aggregate import MEAN, POINTWISE


def grid_candidates(method: str, fixed: Mapping[str, Any], search: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The product of the search lists; a hyperparameter given a fixed value is not searched.

    Prepare-time hyperparameters vary slowest, so candidates sharing a preparation are contiguous.
    Hyperparameters neither fixed nor searched (a None list) keep the method's defaults (they are not listed).
    """
    known = get_method(method).hparams
    search = {name: values for name, values in search.items() if values is not None}  # None: not searched
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


class SearchStrategy(Protocol):
    name: str

    def __iter__(self) -> Iterator[dict[str, Any]]: ...

    def __len__(self) -> int: ...

    def report(self, hparams: Mapping[str, Any], objective: float | None) -> None: ...


class GridSearch:
    """Every candidate of the grid, in grid order."""

    name = "grid"

    def __init__(self, candidates: list[dict[str, Any]]) -> None:
        self.candidates = candidates

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.candidates)

    def __len__(self) -> int:
        return len(self.candidates)

    def report(self, hparams: Mapping[str, Any], objective: float | None) -> None:
        return None


class RandomSearch(GridSearch):
    """`n_trials` grid candidates drawn without replacement with `seed` (the whole grid if it is smaller)."""

    name = "random"

    def __init__(self, candidates: list[dict[str, Any]], n_trials: int, seed: int) -> None:
        picked = sorted(random.Random(seed).sample(range(len(candidates)), min(n_trials, len(candidates))))
        super().__init__([candidates[i] for i in picked])


class OptunaSearch:
    """Optuna's TPE sampler over the search lists (categorical axes), `n_trials` finished trials in all.

    The study lives in an SQLite file of the run directory: a restarted run loads it and only runs the
    trials still missing; a candidate already scored in `candidates.jsonl` is told without recomputation.
    """

    name = "optuna"

    def __init__(self, fixed: Mapping[str, Any], space: Mapping[str, Sequence[Any]], n_trials: int, seed: int,
                 storage: Path, study_name: str) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.fixed, self.space, self.n_trials = dict(fixed), {k: list(v) for k, v in space.items()}, n_trials
        storage.parent.mkdir(parents=True, exist_ok=True)
        self.study = optuna.create_study(
            study_name=study_name, storage=f"sqlite:///{storage}", load_if_exists=True, direction="minimize",
            sampler=optuna.samplers.TPESampler(seed=seed),
        )
        self._trial: Any = None

    def __len__(self) -> int:
        """Trials in all (a replayed trial counts): the progress bar's total."""
        return self.n_trials

    def _finished(self) -> int:
        import optuna

        return sum(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL) for t in self.study.trials)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import optuna

        self._trial = None
        for trial in self.study.trials:  # a resumed study first replays its finished trials (no new tell)
            if trial.state == optuna.trial.TrialState.COMPLETE:
                yield {**self.fixed, **trial.params}
        while self._finished() < self.n_trials:
            self._trial = self.study.ask()
            yield {**self.fixed, **{name: self._trial.suggest_categorical(name, values) for name, values in self.space.items()}}

    def report(self, hparams: Mapping[str, Any], objective: float | None) -> None:
        import optuna

        if self._trial is None:
            return
        if objective is None:
            self.study.tell(self._trial, state=optuna.trial.TrialState.FAIL)
        else:
            self.study.tell(self._trial, objective)


def build_strategy(search_cfg: Mapping[str, Any], method: str, fixed: Mapping[str, Any],
                   space: Mapping[str, Sequence[Any]], run_dir: Path) -> SearchStrategy:
    """The strategy named by `search_cfg["name"]` over `method`'s search space."""
    candidates = grid_candidates(method, fixed, space)
    kind = search_cfg["name"]
    if kind == "grid":
        return GridSearch(candidates)
    if kind == "random":
        return RandomSearch(candidates, search_cfg["n_trials"], search_cfg["seed"])
    if kind == "optuna":
        searched = {name: values for name, values in space.items() if name not in fixed}
        return OptunaSearch(fixed, searched, search_cfg["n_trials"], search_cfg["seed"],
                            Path(run_dir) / "optuna.db", search_cfg["study_name"] or method)
    raise ValueError(f"unknown search {kind!r}; expected grid, random or optuna")


def _valid(rows: Sequence[Mapping[str, Any]], key: str) -> list[Mapping[str, Any]]:
    return [r for r in rows if key in r and r[key] is not None and math.isfinite(r[key].get("mean" if key == "tap" else "normalized", math.nan))]


def tap_scores(rows: Sequence[Mapping[str, Any]], aggregate: str = MEAN,
               base: Mapping[str, float] | None = None) -> list[tuple[Mapping[str, Any], float]]:
    """(row, aggregated TAP) of every row with a finite TAP, in search order; the set-relative aggregations are
    taken over exactly these rows."""
    scored = _valid(rows, "tap")
    return list(zip(scored, aggregation.aggregate(aggregate, [r["tap"] for r in scored], base)))


def tap_objective(row: Mapping[str, Any], aggregate: str, base: Mapping[str, float] | None) -> float:
    """One candidate's own TAP score, what an adaptive search or a Hydra sweeper minimises: its `aggregate` score
    where that scores a candidate alone, else its mean TAP (the set-relative aggregations need every candidate)."""
    return tap_scores([row], aggregate if aggregate in POINTWISE else MEAN, base)[0][1]


def pick_by_tap(rows: Sequence[Mapping[str, Any]], aggregate: str = MEAN,
                base: Mapping[str, float] | None = None) -> Mapping[str, Any]:
    """The candidate with the lowest TAP aggregated by `aggregate` (`base`: θ0's TAP per task, for the
    aggregations relative to it); the first one on ties, in search order."""
    scored = tap_scores(rows, aggregate, base)
    if not scored:
        raise ValueError("no candidate has a finite TAP score; nothing to select")
    return min(scored, key=lambda pair: pair[1])[0]


def pick_by_frozen(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The candidate with the highest mean normalized frozen-decoder performance (first on ties)."""
    scored = _valid(rows, "frozen")
    if not scored:
        raise ValueError("no candidate has a frozen-decoder score; run with selector=frozen_decoder")
    return max(scored, key=lambda r: r["frozen"]["normalized"])


def pick_by_eval(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The candidate with the highest mean normalized validation performance (first on ties)."""
    scored = _valid(rows, "eval")
    if not scored:
        raise ValueError("no candidate has an Eval score; run with selector=eval or selector=both")
    return max(scored, key=lambda r: r["eval"]["normalized"])


def per_method_picks(rows: Sequence[Mapping[str, Any]], aggregate: str = MEAN,
                     base: Mapping[str, float] | None = None) -> dict[str, dict[str, Any]]:
    """Each method's own TAP pick among its rows (aggregated within them), with its mean TAP and, where Eval ran,
    its normalized Eval and the method's Eval-best: what `method=auto` shows side by side."""
    out: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        own = [r for r in rows if r["method"] == method]
        if not tap_scores(own, aggregate, base):
            out[method] = {"error": "no candidate with a finite TAP"}
            continue
        pick = pick_by_tap(own, aggregate, base)
        entry: dict[str, Any] = {"tap_pick": pick["hparams"], "mean_tap": pick["tap"]["mean"]}
        if _valid(own, "eval"):
            entry.update(eval_of_tap_pick=pick["eval"]["normalized"] if pick.get("eval") else None,
                         eval_pick=pick_by_eval(own)["hparams"], eval_best=pick_by_eval(own)["eval"]["normalized"])
        out[method] = entry
    return out


def agreement(rows: Sequence[Mapping[str, Any]], aggregate: str = MEAN,
              base: Mapping[str, float] | None = None) -> dict[str, float]:
    """Rank agreement of the aggregated TAP (`aggregate`, over the rows scored by both) and mean normalized
    Eval, and the regret of the TAP pick.

    Spearman and Kendall are computed on (TAP, Eval) pairs: negative values mean agreement, since lower
    TAP is better. Regret = best normalized Eval − normalized Eval of the TAP pick (0 is perfect).
    """
    scored = [r for r in _valid(rows, "eval") if r in _valid(rows, "tap")]
    pairs = tap_scores(scored, aggregate, base)
    evals = [r["eval"]["normalized"] for r in scored]
    return {
        **_correlations([score for _, score in pairs], evals),
        "regret": pick_by_eval(scored)["eval"]["normalized"] - min(pairs, key=lambda pair: pair[1])[0]["eval"]["normalized"],
        "n_candidates": len(scored),
    }


def agreement_by_aggregate(rows: Sequence[Mapping[str, Any]], base: Mapping[str, float]) -> dict[str, dict[str, Any]]:
    """`agreement` of every TAP aggregation from the same rows (no extra forward pass), each with its pick's
    method and hyperparameters: which aggregation a setting favours."""
    scored = [r for r in _valid(rows, "eval") if r in _valid(rows, "tap")]
    return {name: {**agreement(scored, name, base), "pick": {key: pick_by_tap(scored, name, base)[key] for key in ("method", "hparams")}}
            for name in aggregation.AGGREGATES}


def _correlations(taps: Sequence[float], evals: Sequence[float]) -> dict[str, float]:
    enough = len(taps) >= 3 and len(set(taps)) > 1 and len(set(evals)) > 1
    return {
        "spearman": float(stats.spearmanr(taps, evals).statistic) if enough else math.nan,
        "kendall": float(stats.kendalltau(taps, evals).statistic) if enough else math.nan,
    }


def task_agreement(rows: Sequence[Mapping[str, Any]], task: str) -> dict[str, float]:
    """For one task: rank correlation of TAP_t with the task's normalized Eval (negative = agreement, whatever
    the metric's direction) and the regret of the candidate with the lowest TAP_t on that task."""
    scored = [r for r in _valid(rows, "eval") if r in _valid(rows, "tap") and task in r.get("eval_normalized", {})]
    if not scored:
        return {"spearman": math.nan, "kendall": math.nan, "regret": math.nan}
    taps = [r["tap"][task] for r in scored]
    evals = [r["eval_normalized"][task] for r in scored]
    best_by_tap = evals[taps.index(min(taps))]
    return {**_correlations(taps, evals), "regret": max(evals) - best_by_tap}


def selector_cost(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Seconds spent scoring the candidates with TAP and with Eval, and the speed-up TAP buys."""
    tap = sum(r.get("seconds", {}).get("tap", 0.0) for r in rows)
    evaluation = sum(r.get("seconds", {}).get("eval", 0.0) for r in rows)
    return {"tap_seconds": round(tap, 3), "eval_seconds": round(evaluation, 3),
            "speedup": round(evaluation / tap, 1) if tap > 0 else math.nan}


def frozen_agreement(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """How well the frozen-decoder score ranks the candidates like Eval: correlations of −frozen (so that,
    as for TAP, negative means agreement) with normalized Eval, and the regret of the frozen pick."""
    scored = [r for r in _valid(rows, "eval") if r in _valid(rows, "frozen")]
    frozen = [-r["frozen"]["normalized"] for r in scored]
    evals = [r["eval"]["normalized"] for r in scored]
    return {**_correlations(frozen, evals),
            "regret": pick_by_eval(scored)["eval"]["normalized"] - pick_by_frozen(scored)["eval"]["normalized"],
            "n_candidates": len(scored)}
