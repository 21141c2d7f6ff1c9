"""TAP aggregations over tasks (`tap.aggregate`): hand-computed values, picks and the agreement of every variant."""

import math

import pytest

from taskmerge.selection import search
from taskmerge.selection.aggregate import AGGREGATES, POINTWISE, aggregate

# three candidates, two tasks; θ0's TAP is 4 on `a` and 20 on `b`
TAPS = [{"a": 1.0, "b": 10.0, "mean": 5.5}, {"a": 2.0, "b": 6.0, "mean": 4.0}, {"a": 3.0, "b": 8.0, "mean": 5.5}]
BASE = {"a": 4.0, "b": 20.0, "mean": 12.0}
Z = math.sqrt(1.5)  # |z| of the extreme values of three equally spaced values (population std)

EXPECTED = {
    "mean": [5.5, 4.0, 5.5],
    "relative_to_base": [(1 / 4 + 10 / 20) / 2, (2 / 4 + 6 / 20) / 2, (3 / 4 + 8 / 20) / 2],
    "standardized": [(-Z + Z) / 2, (0 - Z) / 2, (Z + 0) / 2],
    "min_max": [(0 + 1) / 2, (0.5 + 0) / 2, (1 + 0.5) / 2],
    "rank": [(1 + 3) / 2, (2 + 1) / 2, (3 + 2) / 2],
    "worst_relative": [0.5, 0.5, 0.75],
}


@pytest.mark.parametrize("name", list(AGGREGATES))
def test_hand_computed_values(name):
    assert aggregate(name, TAPS, BASE) == pytest.approx(EXPECTED[name])


def test_every_aggregation_is_tested_and_pointwise_ones_ignore_the_other_candidates():
    assert set(EXPECTED) == set(AGGREGATES)
    for name in POINTWISE:
        assert aggregate(name, TAPS[:1], BASE) == pytest.approx(EXPECTED[name][:1])


def test_ties_share_their_mean_rank_and_a_constant_task_adds_nothing():
    taps = [{"a": 1.0, "b": 5.0}, {"a": 1.0, "b": 5.0}, {"a": 2.0, "b": 5.0}]
    assert aggregate("rank", taps) == pytest.approx([(1.5 + 2) / 2, (1.5 + 2) / 2, (3 + 2) / 2])
    assert aggregate("standardized", taps) == pytest.approx([-math.sqrt(0.5) / 2, -math.sqrt(0.5) / 2, math.sqrt(2) / 2])
    assert aggregate("min_max", taps) == pytest.approx([0.0, 0.0, 0.5])


def test_errors_name_the_aggregation():
    with pytest.raises(ValueError, match="unknown TAP aggregation 'median'"):
        aggregate("median", TAPS, BASE)
    with pytest.raises(ValueError, match="'relative_to_base' needs the base encoder's TAP"):
        aggregate("relative_to_base", TAPS)
    assert aggregate("rank", []) == []


def _rows(evals):
    return [{"method": "ta", "hparams": {"alpha": i / 10}, "tap": tap, "eval": {"normalized": e}}
            for i, (tap, e) in enumerate(zip(TAPS, evals), start=1)]


def test_pick_and_agreement_follow_the_aggregation():
    rows = _rows([0.9, 0.6, 0.5])
    assert search.pick_by_tap(rows)["hparams"] == {"alpha": 0.2}  # the paper's mean
    assert search.pick_by_tap(rows, "relative_to_base", BASE)["hparams"] == {"alpha": 0.1}
    assert search.pick_by_tap(rows, "worst_relative", BASE)["hparams"] == {"alpha": 0.1}, "first on ties"
    assert search.agreement(rows, "mean", BASE)["regret"] == pytest.approx(0.3)
    relative = search.agreement(rows, "relative_to_base", BASE)
    assert relative["regret"] == 0.0 and relative["spearman"] == pytest.approx(-1.0) and relative["kendall"] == pytest.approx(-1.0)


def test_agreement_by_aggregate_reports_every_variant_from_the_same_rows():
    rows = _rows([0.9, 0.6, 0.5])
    every = search.agreement_by_aggregate(rows, BASE)
    assert list(every) == list(AGGREGATES)
    for name, result in every.items():
        assert {k: result[k] for k in ("spearman", "kendall", "regret", "n_candidates")} == pytest.approx(
            search.agreement(rows, name, BASE), nan_ok=True)
        assert result["pick"] == {"method": "ta", "hparams": search.pick_by_tap(rows, name, BASE)["hparams"]}
