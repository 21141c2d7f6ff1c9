"""Sweeps: Hydra multirun through submitit's local launcher + `taskmerge.select`, and a killed run's restart."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_OVERRIDES

ROOT = Path(__file__).resolve().parents[1]


def _python(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_submitit_multirun_then_select_equals_in_process_grid(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    _python("-m", "taskmerge.run", "-m", *TINY_OVERRIDES, "hydra/launcher=submitit_local", "selector=both",
            "method.alpha=0.1,0.4,0.7,1.0", f"hydra.sweep.dir={sweep}")
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()) == ["0", "1", "2", "3"]
    assert all(len((sweep / j / "candidates.jsonl").read_text().splitlines()) == 1 for j in "0123")
    _python("-m", "taskmerge.select", str(sweep))

    in_process = tmp_path / "grid"
    _python("-m", "taskmerge.run", *TINY_OVERRIDES, "selector=both", "method.search.alpha=[0.1,0.4,0.7,1.0]",
            f"hydra.run.dir={in_process}")
    swept = json.loads((sweep / "selection.json").read_text())
    grid = json.loads((in_process / "selection.json").read_text())
    assert swept["selected"] == grid["selected"] and swept["selected_tap"] == grid["selected_tap"], "TAP: the same bits"
    for key in ("final", "agreement"):  # decoders trained with 1 thread per concurrent job vs 2: equal to rounding
        assert swept[key] == pytest.approx(grid[key], rel=1e-6), key
    assert (sweep / "report.md").is_file() and (sweep / "plots" / "tap_vs_eval.png").is_file()


def test_select_refuses_rows_of_different_experiments(tmp_path, cache_dir):
    sweep = tmp_path / "mixed"
    _python("-m", "taskmerge.run", "-m", *TINY_OVERRIDES, "method.alpha=0.3", "tap.n_samples=8,16", f"hydra.sweep.dir={sweep}")
    result = subprocess.run([sys.executable, "-m", "taskmerge.select", str(sweep)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and "different experiments" in result.stderr


def test_killed_run_restarts_where_it_stopped(tmp_path, cache_dir):
    run_dir = tmp_path / "killed"
    overrides = [*TINY_OVERRIDES, "selector=both", "decoder.epochs=40",
                 "method.search.alpha=[0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0]", f"hydra.run.dir={run_dir}"]
    _python("-m", "taskmerge.run", *TINY_OVERRIDES, "method.alpha=0.5", f"hydra.run.dir={tmp_path / 'warm'}")  # build the zoo
    log = run_dir / "candidates.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "taskmerge.run", *overrides], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and (not log.is_file() or len(log.read_text().splitlines()) < 2):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = [json.loads(line) for line in log.read_text().splitlines() if line.endswith("}")]
    assert 2 <= len(before) < 10, "the kill must land mid-sweep"
    assert not (run_dir / "selection.json").exists()

    _python("-m", "taskmerge.run", *overrides)
    after = [json.loads(line) for line in log.read_text().splitlines()]
    assert after[: len(before)] == before, "finished candidates are kept as they were"
    assert [r["hparams"]["alpha"] for r in after] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert json.loads((run_dir / "selection.json").read_text())["agreement"]["n_candidates"] == 10


def test_hydra_optuna_sweeper_minimises_the_candidates_tap_score(tmp_path, cache_dir):
    import yaml

    sweep = tmp_path / "optuna_sweep"
    _python("-m", "taskmerge.run", "-m", *TINY_OVERRIDES, "hydra/sweeper=optuna", "hydra.sweeper.n_trials=4",
            "hydra.sweeper.sampler.seed=0", "method.alpha=choice(0.1,0.3,0.5,0.7,0.9)", f"hydra.sweep.dir={sweep}")
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    _python("-m", "taskmerge.select", str(sweep))
    selection = json.loads((sweep / "selection.json").read_text())
    assert selection["selected"]["tap"] == {"alpha": best["best_params"]["method.alpha"]}
    assert selection["selected_tap_score"] == best["best_value"]
