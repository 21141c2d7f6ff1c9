"""scripts/study_selection.py: tables over seeds from the runs' rows, resumption, one set of overrides per study."""

import importlib.util
import json
from pathlib import Path

import pytest

from taskmerge.selection.aggregate import AGGREGATES

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "study_selection.py"
spec = importlib.util.spec_from_file_location("study_selection", SCRIPT)
study_selection = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study_selection)

BASE = {"a": 4.0, "b": 4.0, "mean": 4.0}


def _write_run(study, seed, method, candidates):
    """A complete run: rows of (alpha, TAP on a, TAP on b, normalized Eval) and the selection with θ0's TAP."""
    path = study_selection.run_dir(study, seed, method)
    path.mkdir(parents=True)
    rows = [{"method": method, "hparams": {"alpha": alpha}, "tap": {"a": a, "b": b, "mean": (a + b) / 2},
             "eval": {"normalized": e}} for alpha, a, b, e in candidates]
    (path / "candidates.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "selection.json").write_text(json.dumps({"tap_base": BASE}))


def test_tables_per_aggregation_method_and_across_methods(tmp_path):
    # seed 0: TAP ranks both methods perfectly; seed 1: ta's mean TAP picks the worst candidate (regret 0.2)
    _write_run(tmp_path, 0, "ta", [(0.1, 1.0, 1.0, 0.9), (0.2, 2.0, 2.0, 0.8), (0.3, 3.0, 3.0, 0.7)])
    _write_run(tmp_path, 0, "ties", [(0.1, 1.5, 1.5, 0.85), (0.2, 2.5, 2.5, 0.75), (0.3, 3.5, 3.5, 0.65)])
    _write_run(tmp_path, 1, "ta", [(0.1, 1.0, 3.0, 0.9), (0.2, 2.0, 3.5, 0.8), (0.3, 3.0, 0.5, 0.7)])
    text = study_selection.report(tmp_path, [0, 1], ["ta", "ties"], 0.01)

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["summary"]) == set(AGGREGATES)
    ta = summary["summary"]["mean"]["ta"]
    assert ta["seeds"] == 2 and ta["within_tolerance"] == 0.5
    assert ta["regret"] == {"median": pytest.approx(0.1), "min": 0.0, "max": pytest.approx(0.2)}
    assert ta["spearman"]["min"] == pytest.approx(-1.0) and ta["spearman"]["max"] == pytest.approx(0.5)
    # seed 1 lacks ties: it enters the per-method table of ta only, not the cross-method one
    across = summary["summary"]["mean"][study_selection.ACROSS]
    assert across["seeds"] == 1 and across["spearman"]["median"] == pytest.approx(-1.0) and across["regret"]["median"] == 0.0
    assert summary["per_seed"]["rank"]["ta"]["1"]["regret"] == pytest.approx(0.0), "mean ranks 1.5, 2.5, 2: the best candidate"
    for name in AGGREGATES:
        assert f"## `tap.aggregate={name}`" in text
    assert "| ta | 2 | −0.250 [−1.000, +0.500]" in text and "seed 1: Spearman / regret" in text


def test_complete_runs_are_skipped_and_a_study_keeps_its_overrides(tmp_path):
    _write_run(tmp_path, 0, "ta", [(0.1, 1.0, 1.0, 0.9)])
    _write_run(tmp_path, 0, "ties", [(0.1, 1.0, 1.0, 0.9)])
    none = {"wall": 0.0, "cpu": 0.0}
    assert study_selection.run_all(tmp_path, [0], ["ta", "ties"], [], jobs=2) == {"seed0/ta": none, "seed0/ties": none}
    study_selection.check_study(tmp_path, ["tap.n_samples=64"])
    study_selection.check_study(tmp_path, ["tap.n_samples=64"])
    with pytest.raises(SystemExit, match="was started with --set"):
        study_selection.check_study(tmp_path, [])
