import math

import pytest

from taskmerge.selection import search


def _row(alpha, tap, evaluation=None):
    row = {"method": "ta", "hparams": {"alpha": alpha}, "tap": {"task": tap, "mean": tap}}
    if evaluation is not None:
        row["eval"] = {"normalized": evaluation}
    return row


def test_grid_candidates_product_fixed_and_errors():
    assert search.grid_candidates("ta", {}, {"alpha": [0.1, 0.2]}) == [{"alpha": 0.1}, {"alpha": 0.2}]
    assert search.grid_candidates("ta", {"alpha": 0.3}, {"alpha": [0.1, 0.2]}) == [{"alpha": 0.3}]
    assert search.grid_candidates("average", {}, {}) == [{}]
    with pytest.raises(ValueError, match="no hyperparameter 'beta'"):
        search.grid_candidates("ta", {}, {"beta": [1.0]})
    with pytest.raises(ValueError, match="method.search.alpha is empty"):
        search.grid_candidates("ta", {}, {"alpha": []})


def test_picks_and_agreement_hand_values():
    rows = [_row(0.1, 3.0, 0.70), _row(0.2, 1.0, 0.80), _row(0.3, 2.0, 0.90), _row(0.4, 4.0, 0.60)]
    assert search.pick_by_tap(rows)["hparams"] == {"alpha": 0.2}
    assert search.pick_by_eval(rows)["hparams"] == {"alpha": 0.3}
    agreement = search.agreement(rows)
    # TAP ranks (1..4): 3,1,2,4 ; Eval ranks: 2,3,4,1 -> d = 1,-2,-2,3 -> rho = 1 - 6*18/(4*15) = -0.8
    assert agreement["spearman"] == pytest.approx(-0.8)
    # pairs: 6; concordant (same order) 1, discordant 5 -> tau = (1 - 5)/6
    assert agreement["kendall"] == pytest.approx(-4 / 6)
    assert agreement["regret"] == pytest.approx(0.10)
    assert agreement["n_candidates"] == 4


def test_failed_candidates_are_ignored_by_selection():
    rows = [_row(0.1, math.nan, 0.9), _row(0.2, 2.0, 0.5), {"method": "ta", "hparams": {"alpha": 0.3}, "error": "boom"}]
    assert search.pick_by_tap(rows)["hparams"] == {"alpha": 0.2}
    with pytest.raises(ValueError, match="no candidate has a finite TAP"):
        search.pick_by_tap([rows[0]])


def test_random_search_is_a_seeded_subset_of_the_grid():
    grid = search.grid_candidates("ta", {}, {"alpha": [0.1 * i for i in range(1, 11)]})
    first = list(search.RandomSearch(grid, 4, seed=3))
    assert first == list(search.RandomSearch(grid, 4, seed=3)) and len(first) == 4
    assert all(c in grid for c in first) and len({c["alpha"] for c in first}) == 4
    assert list(search.RandomSearch(grid, 50, seed=0)) == grid


def _drive(strategy, objective):
    seen = []
    for hparams in strategy:
        seen.append(hparams)
        strategy.report(hparams, objective(hparams))
    return seen


def test_optuna_search_minimises_persists_and_resumes(tmp_path):
    space = {"alpha": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], "k": [10, 20]}
    objective = lambda hp: (hp["alpha"] - 0.4) ** 2 + (0.0 if hp["k"] == 20 else 0.1)  # noqa: E731
    storage = tmp_path / "optuna.db"
    first = _drive(search.OptunaSearch({}, space, 6, seed=0, storage=storage, study_name="s"), objective)
    assert len(first) == 6 and all(hp["alpha"] in space["alpha"] and hp["k"] in space["k"] for hp in first)

    resumed = search.OptunaSearch({}, space, 9, seed=0, storage=storage, study_name="s")
    second = _drive(resumed, objective)
    assert second[:6] == first, "a resumed study replays its finished trials first"
    assert len(second) == 9 and len(resumed.study.trials) == 9


def test_optuna_failed_trials_count_and_fixed_values_pass_through(tmp_path):
    strategy = search.OptunaSearch({"agg": "sum"}, {"alpha": [0.1, 0.2]}, 3, seed=0, storage=tmp_path / "o.db", study_name="f")
    seen = _drive(strategy, lambda hp: None)
    assert len(seen) == 3 and all(hp["agg"] == "sum" for hp in seen)
    assert [t.state.name for t in strategy.study.trials] == ["FAIL"] * 3
