"""Two (or N) `python -m taskmerge.run` at once on one machine: wall and CPU seconds per run with `threads=null`
(each run's share of the cores) against every run using one thread per core, the thrashing case.

    python scripts/bench_concurrency.py --jobs 2 --repeats 2 -- selector=tap   # overrides go to every run
    python scripts/bench_concurrency.py --jobs 2 --repeats 1 --fresh-cache     # first runs: the zoo built too

Runs the cached default job (build the zoo first with one `python -m taskmerge.run`), or with `--fresh-cache` the
first run on an empty cache shared by the runs of a batch; prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _batch(jobs: int, threads: str, overrides: list[str], fresh_cache: bool) -> list[tuple[float, float]]:
    """Start `jobs` runs together; (wall s, CPU s) of each."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        if fresh_cache:
            env["TASKMERGE_CACHE_DIR"] = f"{tmp}/cache"
        start = time.perf_counter()
        processes = [subprocess.Popen([sys.executable, "-m", "taskmerge.run", "logger=none", f"threads={threads}",
                                       f"hydra.run.dir={tmp}/run{i}", *overrides], cwd=ROOT, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(jobs)]
        results = []
        for process in processes:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            _, err = process.communicate()
            if process.returncode:
                raise SystemExit(err[-2000:])
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            results.append((time.perf_counter() - start, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime))
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--fresh-cache", action="store_true", help="each batch starts on an empty shared cache")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    settings = {"one run alone, threads=null (reference)": (1, "null"),
                f"{args.jobs} at once, threads=null (share of the cores)": (args.jobs, "null"),
                f"{args.jobs} at once, threads={cores} each (one per core)": (args.jobs, str(cores))}
    cache = "an empty cache (zoo built)" if args.fresh_cache else "the cached zoo"
    print(f"{args.jobs} runs at once on {cores} cores from {cache}, {args.repeats} repeats (median), "
          f"overrides {args.overrides}\n")
    print("| setting | wall s, slowest run | CPU s per run |\n|---|---|---|")
    for label, (jobs, threads) in settings.items():
        walls, cpus = [], []
        for _ in range(args.repeats):
            batch = _batch(jobs, threads, args.overrides, args.fresh_cache)
            walls.append(max(wall for wall, _ in batch))
            cpus.append(statistics.mean(cpu for _, cpu in batch))
        print(f"| {label} | {statistics.median(walls):.1f} | {statistics.median(cpus):.1f} |")


if __name__ == "__main__":
    main()
