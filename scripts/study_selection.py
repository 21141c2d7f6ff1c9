"""How robust is TAP selection? Rebuild the built-in zoo for several seeds and measure, per TAP aggregation,
how well TAP ranks the default grids of several merge methods like Eval does.

For every seed s (zoo seed `seed=s`, data seed `tasks.seed=s`) and method m it runs

    python -m taskmerge.run method=m seed=s tasks.seed=s selector=both logger=none hydra.run.dir=STUDY/runs/seed<s>/<m>

(the first method of a seed builds that seed's zoo, the others wait for it), `--jobs` runs at a time with
cores ÷ jobs torch threads each. A run whose `selection.json` exists is complete and skipped, and a run
killed midway resumes from its `candidates.jsonl`, so a killed study resumes where it stopped. Every
aggregation is scored from the same candidate rows (no extra forward pass). Then it writes, per
aggregation, the median [min, max] over seeds of Spearman and Kendall (aggregated TAP vs mean normalized
Eval; negative = agreement), the regret (Eval's best − Eval of the TAP pick) and the fraction of seeds
whose regret ≤ `--tolerance`, per method and across methods (every candidate of every method ranked
together), as `STUDY/summary.md` and `STUDY/summary.json`, and prints them.

    python scripts/study_selection.py outputs/study                          # 5 seeds, ta ties tsv iso_c
    python scripts/study_selection.py outputs/study --seeds 0 1 2 --jobs 1   # extend or shrink it later
    python scripts/study_selection.py outputs/study --set tap.features=tokens  # any run override (fixed per study)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Mapping, Sequence

from rich.console import Console
from rich.markdown import Markdown

import taskmerge
from taskmerge.cache import atomic_write_json, atomic_write_text
from taskmerge.selection import search
from taskmerge.selection.aggregate import AGGREGATES
from taskmerge.tracking import CANDIDATES, CandidateLog, candidate_id

PACKAGE_ROOT = Path(taskmerge.__file__).resolve().parents[1]  # the runs use the taskmerge this script imports
ACROSS = "all methods"
METRICS = ("spearman", "kendall", "regret")


def run_dir(study: Path, seed: int, method: str) -> Path:
    """Where the run of `method` on the zoo of `seed` lives."""
    return study / "runs" / f"seed{seed}" / method


def is_complete(path: Path) -> bool:
    """A run is complete once it wrote its selection."""
    return (path / "selection.json").is_file()


def run_one(study: Path, seed: int, method: str, overrides: Sequence[str], threads: int) -> dict[str, float]:
    """Run (or resume) one seed × method; its output goes to `STUDY/logs/`; returns its wall and CPU seconds (the
    CPU time does not grow when other work shares the machine), zeros if it was already complete. Raises
    `RuntimeError` naming the log if the run fails."""
    path = run_dir(study, seed, method)
    if is_complete(path):
        return {"wall": 0.0, "cpu": 0.0}
    log = study / "logs" / f"seed{seed}-{method}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "taskmerge.run", f"method={method}", f"seed={seed}", f"tasks.seed={seed}", "selector=both",
           "logger=none", f"hydra.run.dir={path}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"seed {seed} {method} failed (exit {process.returncode}); see {log}")
    return {"wall": time.perf_counter() - start, "cpu": usage.ru_utime + usage.ru_stime}


def run_all(study: Path, seeds: Sequence[int], methods: Sequence[str], overrides: Sequence[str],
            jobs: int) -> dict[str, dict[str, float]]:
    """Run every seed × method, `jobs` at a time; a seed's first method builds its zoo before its other methods
    start. Returns each finished job's wall and CPU seconds; failed jobs are reported and the others go on."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    seconds: dict[str, dict[str, float]] = {}
    failures = []
    with ThreadPoolExecutor(jobs) as pool:
        pending: dict[Future, tuple[int, str]] = {
            pool.submit(run_one, study, seed, methods[0], overrides, threads): (seed, methods[0]) for seed in seeds}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                seed, method = pending.pop(future)
                try:
                    seconds[f"seed{seed}/{method}"] = future.result()
                except RuntimeError as error:
                    failures.append(str(error))
                    print(error, file=sys.stderr, flush=True)
                    continue
                print(f"done: seed {seed} {method} ({seconds[f'seed{seed}/{method}']['wall']:.0f} s)", flush=True)
                if method == methods[0]:
                    pending.update({pool.submit(run_one, study, seed, m, overrides, threads): (seed, m) for m in methods[1:]})
    if failures:
        raise SystemExit("study incomplete: " + "; ".join(failures))
    return seconds


def load_run(path: Path) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The scored candidate rows of a complete run (one per candidate, the last written) and θ0's TAP per task."""
    rows = {candidate_id(r["method"], r["hparams"]): r for r in CandidateLog(path / CANDIDATES).rows()
            if r.get("eval") and not r.get("error")}
    return list(rows.values()), json.loads((path / "selection.json").read_text())["tap_base"]


def scores(study: Path, seeds: Sequence[int], methods: Sequence[str]) -> dict[str, dict[str, dict[int, dict[str, float]]]]:
    """aggregation → method (and `ACROSS`) → seed → agreement, over the complete runs; a seed enters `ACROSS` only
    when all its methods are complete."""
    out: dict[str, dict[str, dict[int, dict[str, float]]]] = {name: {m: {} for m in [*methods, ACROSS]} for name in AGGREGATES}
    for seed in seeds:
        runs = {m: load_run(run_dir(study, seed, m)) for m in methods if is_complete(run_dir(study, seed, m))}
        groups = {m: rows for m, (rows, _) in runs.items()}
        if len(runs) == len(methods):
            groups[ACROSS] = [row for rows in groups.values() for row in rows]
        base = next(iter(runs.values()))[1] if runs else {}  # one zoo per seed: its runs share θ0's TAP
        for group, rows in groups.items():
            for name in AGGREGATES:
                out[name][group][seed] = search.agreement(rows, name, base)
    return out


def summarize(per_seed: Mapping[int, Mapping[str, float]], tolerance: float) -> dict[str, Any]:
    """Median, min and max over seeds of each agreement metric, and the fraction of seeds with regret ≤ tolerance."""
    summary: dict[str, Any] = {"seeds": len(per_seed)}
    for metric in METRICS:
        values = [v[metric] for v in per_seed.values() if v[metric] == v[metric]]  # NaN: a constant ranking
        summary[metric] = ({"median": statistics.median(values), "min": min(values), "max": max(values)} if values
                           else {"median": float("nan"), "min": float("nan"), "max": float("nan")})
    summary["within_tolerance"] = (sum(v["regret"] <= tolerance for v in per_seed.values()) / len(per_seed)
                                   if per_seed else float("nan"))
    return summary


def _overview(stats: Mapping[str, Any]) -> str:
    """`median Spearman / median regret`, or a dash without a complete seed."""
    if not stats["seeds"]:
        return "–"
    return f"{stats['spearman']['median']:+.3f} / {stats['regret']['median']:.4f}".replace("-", "−")


def _cell(stats: Mapping[str, float], spec: str) -> str:
    return f"{stats['median']:{spec}} [{stats['min']:{spec}}, {stats['max']:{spec}}]".replace("-", "−")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def markdown(summary: Mapping[str, Any], per_seed: Mapping[str, Any], seeds: Sequence[int], tolerance: float) -> str:
    """The study's tables: an overview of every aggregation, then per aggregation its summary and per-seed values."""
    groups = list(next(iter(summary.values())))
    parts = ["## Overview: median Spearman / median regret over seeds",
             _table(["aggregation", *groups], [[name, *(_overview(s[g]) for g in groups)] for name, s in summary.items()])]
    for name, by_group in summary.items():
        parts += [f"## `tap.aggregate={name}`",
                  _table(["method", "seeds", "Spearman median [min, max]", "Kendall median [min, max]",
                          "regret median [min, max]", f"seeds with regret ≤ {tolerance}"],
                         [[g, str(s["seeds"]), _cell(s["spearman"], "+.3f"), _cell(s["kendall"], "+.3f"), _cell(s["regret"], ".4f"),
                           f"{s['within_tolerance']:.0%}"] for g, s in by_group.items() if s["seeds"]]),
                  _table(["method", *(f"seed {seed}: Spearman / regret" for seed in seeds)],
                         [[g, *(f"{v[seed]['spearman']:+.3f} / {v[seed]['regret']:.4f}".replace("-", "−") if seed in v else "–"
                                for seed in seeds)] for g, v in per_seed[name].items()])]
    return "\n\n".join(parts) + "\n"


def report(study: Path, seeds: Sequence[int], methods: Sequence[str], tolerance: float) -> str:
    """Write `summary.json` and `summary.md` from the complete runs and return the markdown."""
    per_seed = scores(study, seeds, methods)
    summary = {name: {g: summarize(v, tolerance) for g, v in groups.items()} for name, groups in per_seed.items()}
    atomic_write_json(study / "summary.json", {"seeds": list(seeds), "methods": list(methods), "tolerance": tolerance,
                                               "summary": summary, "per_seed": per_seed})
    text = markdown(summary, per_seed, seeds, tolerance)
    atomic_write_text(study / "summary.md", text)
    return text


def check_study(study: Path, overrides: Sequence[str]) -> None:
    """Record the study's run overrides on first use; refuse to resume it with others (its runs would mix)."""
    record = study / "study.json"
    if record.is_file():
        recorded = json.loads(record.read_text())["overrides"]
        if recorded != list(overrides):
            raise SystemExit(f"{study} was started with --set {recorded}, not {list(overrides)}; use another study directory")
        return
    study.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, {"overrides": list(overrides)})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python scripts/study_selection.py", description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="the study directory (created; an existing one is resumed)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", default=["ta", "ties", "tsv", "iso_c"])
    parser.add_argument("--jobs", type=int, default=2, help="runs at once; each gets cores ÷ jobs torch threads")
    parser.add_argument("--tolerance", type=float, default=0.01, help="a TAP pick within this regret counts as a hit")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a Hydra override for every run (repeatable; fixed for the life of the study)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the tables from the complete runs")
    args = parser.parse_args(argv)
    args.study = args.study.resolve()
    check_study(args.study, args.overrides)
    start = time.perf_counter()
    if not args.report_only:
        seconds = run_all(args.study, args.seeds, args.methods, args.overrides, args.jobs)
        timings = args.study / "timings.json"
        history = json.loads(timings.read_text()) if timings.is_file() else {"invocations": [], "jobs": {}}
        ran = {job: s for job, s in seconds.items() if s["wall"] > 0}
        history["jobs"].update(ran)
        history["invocations"].append({"wall_seconds": round(time.perf_counter() - start, 1),
                                       "cpu_seconds": round(sum(s["cpu"] for s in ran.values()), 1), "jobs": args.jobs,
                                       "cpus": os.cpu_count(), "ran": sorted(ran)})
        atomic_write_json(timings, history)
    Console().print(Markdown(report(args.study, args.seeds, args.methods, args.tolerance)))
    print(f"tables in {args.study / 'summary.md'} and summary.json; {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
