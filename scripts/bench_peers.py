"""Side by side with the peer library: taskmerge against FusionBench 0.2.33's own merge functions on the same
random-init open_clip checkpoints on disk, each merge in a fresh process that reads the checkpoints, merges and
writes the merged safetensors.

The peer is not a dependency: put it in a throw-away folder and pass that folder (README, "Speed against the peer
library"):

    pip install --target /tmp/peer --no-deps fusion-bench==0.2.33 bidict transformers accelerate tokenizers \
        datasets multiprocess pyarrow lightning-utilities lightning torchmetrics
    PYTHONPATH=. python scripts/bench_peers.py --peer /tmp/peer                  # ViT-B-32, T = 3 and 8, 3 repeats
    PYTHONPATH=. python scripts/bench_peers.py --peer /tmp/peer --methods ta ties --tasks 8 --repeats 5

Peer calls: TA `state_dict_sub` / `state_dict_add` / `state_dict_mul`; TIES `ties_merging_utils.state_dict_to_vector`
+ `ties_merging(reset_thresh=20, merge_func="mean")` + `vector_to_state_dict`; TSV
`TSVM_utils.compute_and_sum_svd_mem_reduction`; Iso-C `iso_utils.iso_c`; Iso-CTS `iso_utils.iso_cts`
(common_space_fraction 0.8, our default); all on the CPU, `text_projection` excluded from the SVD methods' matrices
as in the reference. The peer has no STAR. Checkpoints are loaded whole with
`safetensors.torch.load_file`, as a peer user would. Every merge uses α = 1.

Per (method, T) both implementations alternate, `--repeats` times, and the table gives medians of: CPU seconds of
the merge itself (read + merge + write, after the imports, `time.process_time` in the child), CPU seconds and wall
seconds of the whole process (interpreter and `import torch` included: ≈3 CPU-s here for either library), and peak
RSS (`wait4`). A peer configuration whose peak RSS, extrapolated from a smaller T measured in the same run by
(T + 1) / (T_measured + 1), would exceed `--max-gb` is skipped and marked. `cat` of the same T + 1 files gives the
read speed of the page cache, against which TA's and TIES's merge time is put as MB/s. `--baseline DIR` runs an
older taskmerge checkout as a third implementation (`git worktree add DIR <commit>`), for before/after figures from
the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors import safe_open

from bench_merge import make_checkpoints

METHODS = ("ta", "ties", "tsv", "iso_c", "iso_cts")
EXCLUDE = "text_projection"  # the reference's matrix exclusion (CLIP setting)

PRELUDE = """
import json, sys, time, torch
torch.set_num_threads({threads})
"""

OURS = PRELUDE + """
from taskmerge import checkpoints, merging
method, out, base, *fts = sys.argv[1:]
start = time.process_time()
extra = {{"exclude": "{exclude}"}} if method in ("tsv", "iso_c") else {{}}
merged = merging.merge(method, base, fts, alpha=1.0, **extra)
checkpoints.save_state_dict(out, merged)
print(json.dumps({{"merge_cpu": time.process_time() - start}}))
"""

PEER = PRELUDE + """
from safetensors.torch import load_file, save_file
from fusion_bench.utils.state_dict_arithmetic import state_dict_add, state_dict_mul, state_dict_sub
method, out, base, *fts = sys.argv[1:]
start = time.process_time()
pretrained = load_file(base)
vectors = [state_dict_sub(load_file(path), pretrained) for path in fts]
if method == "ta":
    delta = vectors[0]
    for vector in vectors[1:]:
        delta = state_dict_add(delta, vector)
elif method == "ties":
    from fusion_bench.method.ties_merging.ties_merging_utils import state_dict_to_vector, ties_merging, vector_to_state_dict
    flat = torch.vstack([state_dict_to_vector(vector) for vector in vectors])
    del vectors
    delta = vector_to_state_dict(ties_merging(flat, reset_thresh=20, merge_func="mean"), pretrained)
elif method == "tsv":
    from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction
    delta = compute_and_sum_svd_mem_reduction(vectors, exclude_keys=[k for k in pretrained if "{exclude}" in k],
                                              accelerator="cpu")
elif method == "iso_c":
    from fusion_bench.method.isotropic_merging.iso_utils import iso_c
    delta = iso_c(vectors, accelerator="cpu", exclude_keys=[k for k in pretrained if "{exclude}" in k])
elif method == "iso_cts":
    from fusion_bench.method.isotropic_merging.iso_utils import iso_cts
    delta = iso_cts(vectors, common_space_fraction=0.8, accelerator="cpu",
                    exclude_keys=[k for k in pretrained if "{exclude}" in k])
merged = state_dict_add(pretrained, state_dict_mul(delta, 1.0))
save_file({{k: v.contiguous() for k, v in merged.items()}}, out)
print(json.dumps({{"merge_cpu": time.process_time() - start}}))
"""


def run_child(code: str, args: list[str], env: dict[str, str]) -> dict[str, float]:
    """Wall seconds, CPU seconds and peak RSS (GB) of the whole child process, and its own merge CPU seconds."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as errors:  # a file, not a pipe: the child is reaped by wait4 below, not Popen
        proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, stderr=errors,
                                text=True)
        output = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            errors.seek(0)
            raise RuntimeError(f"{args[0]} child failed (exit {proc.returncode}):\n{errors.read()[-3000:]}")
    reported = json.loads(output.strip().splitlines()[-1])
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "merge_cpu": reported["merge_cpu"],
            "rss": usage.ru_maxrss / 1024**2}


def differences(a: Path, b: Path, base: Path) -> tuple[float, float]:
    """(largest |a − b| over every float tensor, largest per-key ‖a − b‖ / ‖b − θ0‖): the second is merging.md §4's
    relative error of the update, the meaningful one for the SVD methods."""
    worst = relative = 0.0
    with safe_open(str(a), "pt") as left, safe_open(str(b), "pt") as right, safe_open(str(base), "pt") as zero:
        for key in left.keys():
            x, y = left.get_tensor(key).double(), right.get_tensor(key).double()
            if x.is_floating_point() and x.numel():
                worst = max(worst, float((x - y).abs().max()))
                change = float((y - zero.get_tensor(key).double()).norm())
                if change > 0:
                    relative = max(relative, float((x - y).norm()) / change)
    return worst, relative


def cat_seconds(paths: list[Path], repeats: int) -> float:
    """Median wall seconds of `cat` of the files into /dev/null (the page-cache read speed)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", type=Path, required=True, help="folder holding fusion_bench 0.2.33 and its light deps")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--tasks", type=int, nargs="+", default=[3, 8])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-gb", type=float, default=16.0, help="skip peer runs predicted to need more peak RSS")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TASKMERGE_BENCH_DIR", "/tmp/taskmerge-bench")))
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    parser.add_argument("--baseline", type=Path, help="an older taskmerge checkout, run as a third implementation "
                        "('before' numbers in the same run)")
    parser.add_argument("--baseline-repeats", type=int, default=1)
    args = parser.parse_args()
    if not (args.peer / "fusion_bench").is_dir():
        parser.error(f"--peer {args.peer}: no fusion_bench package there; install it as the docstring says")

    here = Path(__file__).resolve().parents[1]
    path = lambda folder: {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])}
    envs = {"taskmerge": path(here), "peer": path(args.peer), "before": path(args.baseline)}
    repeats = {"taskmerge": args.repeats, "peer": args.repeats, "before": args.baseline_repeats if args.baseline else 0}
    base, finetuned = make_checkpoints(args.model, max(args.tasks), args.workdir)
    print(f"# {args.model}: {os.cpu_count()} cores, {args.threads} torch threads, load average "
          f"{'/'.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)

    rows, records, peer_peaks = [], [], {}
    for tasks in sorted(args.tasks):
        files = [base, *finetuned[:tasks]]
        megabytes = sum(p.stat().st_size for p in files) / 2**20
        cat_s = cat_seconds(files, args.repeats)
        rows.append(f"| cat of the {tasks + 1} files | {tasks} | {cat_s:.2f} s wall, {megabytes / cat_s:,.0f} MB/s | | | | | |"
                    + (" | |" if args.baseline else ""))
        for method in args.methods:
            runs: dict[str, list[dict[str, float]]] = {"taskmerge": [], "peer": [], "before": []}
            outputs = {name: args.workdir / f"out-{name}-{method}-{tasks}.safetensors" for name in runs}
            predicted = None
            if method in peer_peaks:
                known_tasks, known_peak = peer_peaks[method]
                predicted = known_peak * (tasks + 1) / (known_tasks + 1)
            skip_peer = predicted is not None and predicted > args.max_gb
            failure = None
            for repeat in range(max(repeats.values())):
                order = ["taskmerge", "peer", "before"] if repeat % 2 == 0 else ["before", "peer", "taskmerge"]
                for name in order:
                    if repeat >= repeats[name] or (name == "peer" and (skip_peer or failure)):
                        continue
                    code = (PEER if name == "peer" else OURS).format(threads=args.threads, exclude=EXCLUDE)
                    try:
                        result = run_child(code, [method, str(outputs[name]), *map(str, files)], envs[name])
                    except RuntimeError as error:
                        if name != "peer":
                            raise
                        failure = str(error).strip().splitlines()[-1][:120]
                        print(f"{method} T={tasks} peer failed: {failure}", flush=True)
                        continue
                    runs[name].append(result)
                    records.append({"method": method, "tasks": tasks, "impl": name, **result})
                    print(f"{method} T={tasks} {name}: {json.dumps({k: round(v, 2) for k, v in result.items()})}", flush=True)
            medians = {name: {k: statistics.median(r[k] for r in results) for k in results[0]}
                       for name, results in runs.items() if results}
            ours = medians["taskmerge"]
            speed = f", {megabytes / ours['merge_cpu']:,.0f} MB/s" if method in ("ta", "ties") else ""
            cell = lambda m: f"{m['merge_cpu']:.2f} / {m['cpu']:.2f} / {m['wall']:.2f} / {m['rss']:.2f}"
            before = (f" | {cell(medians['before'])} | {medians['before']['merge_cpu'] / ours['merge_cpu']:.1f}×"
                      if "before" in medians else "")
            if "peer" in medians:
                peer = medians["peer"]
                peer_peaks[method] = (tasks, peer["rss"])
                difference, relative = differences(outputs["taskmerge"], outputs["peer"], base)
                rows.append(f"| {method} | {tasks} | {cell(ours)}{speed} | {cell(peer)} | {peer['merge_cpu'] / ours['merge_cpu']:.1f}× "
                            f"| {peer['cpu'] / ours['cpu']:.1f}× | {peer['rss'] / ours['rss']:.1f}× | {difference:.1e} / {relative:.1e}{before} |")
            else:
                why = (f"failed: {failure}" if failure else
                       f"skipped: predicted {predicted:.1f} GB > {args.max_gb:g} GB")
                rows.append(f"| {method} | {tasks} | {cell(ours)}{speed} | {why} | | | | |{before}")
            for path in outputs.values():
                path.unlink(missing_ok=True)

    print("\n| method | T | taskmerge: merge CPU s / process CPU s / wall s / peak GB | peer: same | merge CPU ratio "
          "| process CPU ratio | RSS ratio | max abs diff / max relative diff of the update |"
          + (" before: same as taskmerge | merge CPU, before / now |" if args.baseline else "")
          + "\n|---|---|---|---|---|---|---|---|" + ("---|---|" if args.baseline else ""))
    print("\n".join(rows))
    print(f"\nMedians of {args.repeats} alternated runs; load average at the end "
          f"{'/'.join(f'{v:.2f}' for v in os.getloadavg())}.")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
