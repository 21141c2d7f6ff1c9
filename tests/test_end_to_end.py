"""`python -m taskmerge.run` on a shrunken built-in benchmark: zoo, TAP, Eval, selection, outputs, resume."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_OVERRIDES
from taskmerge.selection import search
from taskmerge.selection.aggregate import AGGREGATES

ROOT = Path(__file__).resolve().parents[1]


def _run(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "taskmerge.run", *TINY_OVERRIDES, f"hydra.run.dir={run_dir}", *overrides]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "candidates.jsonl").read_text().splitlines()]


def test_selector_both_end_to_end_and_resume(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    first = _run(run_dir, "selector=both", "method.search.alpha=[0.2,0.6,1.0]")

    rows = _rows(run_dir)
    assert [r["hparams"] for r in rows] == [{"alpha": 0.2}, {"alpha": 0.6}, {"alpha": 1.0}]
    for row in rows:
        assert row["method"] == "ta"
        assert set(row["tap"]) == {"digits", "textures", "shapes", "scenes", "mean"}
        assert set(row["eval"]) == {"digits", "textures", "shapes", "scenes", "normalized"}
        assert row["tap"]["mean"] == pytest.approx(sum(row["tap"][t] for t in ("digits", "textures", "shapes", "scenes")) / 4)
        assert row["seconds"]["total"] > 0

    selection = json.loads((run_dir / "selection.json").read_text())
    assert selection["method"] == "ta" and selection["selector"] == "both"
    assert set(selection["tap_base"]) == {"digits", "textures", "shapes", "scenes", "mean"}
    best_tap = search.pick_by_tap(rows, selection["tap_aggregate"], selection["tap_base"])
    best_eval = max(rows, key=lambda r: r["eval"]["normalized"])
    assert selection["selected"] == {"tap": best_tap["hparams"], "eval": best_eval["hparams"]}
    assert set(selection["final"]) == {"digits", "textures", "shapes", "scenes", "normalized"}
    assert -1.0 <= selection["agreement"]["spearman"] <= 1.0 and -1.0 <= selection["agreement"]["kendall"] <= 1.0
    assert selection["agreement"]["regret"] == pytest.approx(best_eval["eval"]["normalized"] - best_tap["eval"]["normalized"])
    assert set(selection["agreement_per_task"]) == {"digits", "textures", "shapes", "scenes"}
    # every TAP aggregation is scored from the same rows, the run's own one among them
    assert list(selection["agreement_by_aggregate"]) == list(AGGREGATES)
    assert selection["agreement_by_aggregate"][selection["tap_aggregate"]] == {**selection["agreement"], "pick": {
        "method": "ta", "hparams": selection["selected"]["tap"]}}
    report_md = (run_dir / "report.md").read_text()
    assert all(f"| {name}" in report_md for name in AGGREGATES) and "every TAP aggregation vs Eval" in first.stdout
    for row in rows:
        assert row["eval"]["normalized"] == pytest.approx(sum(row["eval_normalized"].values()) / 4)
    cost = selection["cost"]
    assert cost["tap_seconds"] == pytest.approx(sum(r["seconds"]["tap"] for r in rows), abs=1e-3)
    assert cost["eval_seconds"] > 0 and cost["speedup"] > 0
    assert (run_dir / "report.md").read_text().startswith("# taskmerge report")
    assert (run_dir / "plots" / "tap_vs_eval.png").stat().st_size > 10_000
    assert "fine-tuned" in first.stdout and "selected" in first.stdout and "merged = ta, tap pick (selector=both)" in first.stdout
    assert selection["final_by"] == "tap"
    if best_eval["hparams"] != best_tap["hparams"]:  # the report shows what the Eval pick gives on test beside it
        assert set(selection["final_eval_pick"]) == set(selection["final"]) and "| Eval pick |" in (run_dir / "report.md").read_text()
    zoos = list((cache_dir / "zoo").iterdir())
    assert len(zoos) == 1

    # a restart of the same run skips every finished candidate and rebuilds nothing, even with another aggregation
    zoo_mtime = (zoos[0] / "base.safetensors").stat().st_mtime_ns
    _run(run_dir, "selector=both", "method.search.alpha=[0.2,0.6,1.0]", "tap.aggregate=rank")
    assert _rows(run_dir) == rows
    reselected = json.loads((run_dir / "selection.json").read_text())
    assert reselected["tap_aggregate"] == "rank" and reselected["selected"]["tap"] == search.pick_by_tap(rows, "rank")["hparams"]
    assert (zoos[0] / "base.safetensors").stat().st_mtime_ns == zoo_mtime

    # a run killed after its first candidate: the restart computes only the missing two, identically
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "candidates.jsonl").write_text(json.dumps(rows[0]) + "\n" + '{"method": "ta", "hpar')
    _run(resumed, "selector=both", "method.search.alpha=[0.2,0.6,1.0]")
    again = _rows(resumed)
    assert [r["hparams"] for r in again] == [r["hparams"] for r in rows]
    assert [r["tap"] for r in again] == [r["tap"] for r in rows], "same config, same TAP numbers"


def test_fixed_alpha_runs_one_candidate_with_tap(tmp_path, cache_dir):
    run_dir = tmp_path / "single"
    _run(run_dir, "method.alpha=0.3")
    rows = _rows(run_dir)
    assert len(rows) == 1 and rows[0]["hparams"] == {"alpha": 0.3} and "eval" not in rows[0]
    selection = json.loads((run_dir / "selection.json").read_text())
    assert selection["selected"] == {"tap": {"alpha": 0.3}} and "agreement" not in selection
    assert not (run_dir / "plots" / "tap_vs_eval.png").exists()


def test_missing_task_name_fails_with_clear_error(tmp_path, cache_dir):
    cmd = [sys.executable, "-m", "taskmerge.run", *TINY_OVERRIDES, f"hydra.run.dir={tmp_path}", "tasks.names=[digits,nosuchtask]"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "tasks.names: unknown task(s) ['nosuchtask']" in result.stderr


def test_failed_candidate_is_recorded_and_ignored(tmp_path, cache_dir):
    run_dir = tmp_path / "fail"
    result = _run(run_dir, "method.search.alpha=[0.5,1e30]")
    rows = _rows(run_dir)
    assert "error" not in rows[0] and "non-finite TAP" in rows[1]["error"]
    selection = json.loads((run_dir / "selection.json").read_text())
    assert selection["selected"] == {"tap": {"alpha": 0.5}}
    assert selection["failed_candidates"] == [{"hparams": {"alpha": 1e30}, "error": rows[1]["error"]}]
    assert "ignored failed candidate" in result.stdout


def test_frozen_decoder_selector_scores_with_the_fine_tuned_heads(tmp_path, cache_dir):
    run_dir = tmp_path / "frozen"
    _run(run_dir, "selector=frozen_decoder", "method.search.alpha=[0.2,0.6,1.0]")
    rows = _rows(run_dir)
    assert all(set(r["frozen"]) == {"digits", "textures", "shapes", "scenes", "normalized"} and "eval" in r for r in rows)
    selection = json.loads((run_dir / "selection.json").read_text())
    best = max(rows, key=lambda r: r["frozen"]["normalized"])
    assert selection["selected"]["frozen_decoder"] == best["hparams"]
    assert set(selection["frozen_agreement"]) == {"spearman", "kendall", "regret", "n_candidates"}
    assert "Appendix E" in (run_dir / "report.md").read_text()


def test_method_auto_scores_every_default_grid_and_runs_are_deterministic(tmp_path, cache_dir):
    """`method=auto` scores the default grids of its candidates in one run and picks across them, showing each
    method's own pick; a second run on the same cache computes bit-identical TAP values."""
    run_dir = tmp_path / "auto"
    out = _run(run_dir, "method=auto", "method.candidates=[ta,average]", "selector=both").stdout
    rows = _rows(run_dir)
    ta_grid = [{"alpha": a} for a in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)]
    assert [r["hparams"] for r in rows if r["method"] == "ta"] == ta_grid
    assert {r["method"] for r in rows} == {"ta", "average"} and not any(r.get("error") for r in rows)
    selection = json.loads((run_dir / "selection.json").read_text())
    best = search.pick_by_tap(rows, selection["tap_aggregate"], selection["tap_base"])
    assert selection["method"] == best["method"] == selection["selected_methods"]["tap"]
    assert selection["selected"]["tap"] == best["hparams"] and selection["agreement"]["n_candidates"] == len(rows)
    assert set(selection["per_method"]) == {"ta", "average"}
    for method, picks in selection["per_method"].items():
        own = [r for r in rows if r["method"] == method]
        assert picks["tap_pick"] == search.pick_by_tap(own, selection["tap_aggregate"], selection["tap_base"])["hparams"]
    assert "each method's own TAP pick" in out and "## Each method's own TAP pick" in (run_dir / "report.md").read_text()

    again = tmp_path / "again"
    _run(again, "method=ta", "selector=tap")
    assert [r["tap"] for r in _rows(again)] == [r["tap"] for r in rows if r["method"] == "ta"], "same config, same TAP"
