"""LiDAR-setting benchmark (spec lidar §5) on the CPU: WaffleIron forward throughput, per-scan preprocessing with and
without the PreparedScans memo, TAP per candidate against its forward-pass floor, and the wall time and peak RSS of
converting and merging four WI-768 releases written in ScaLR's formats. Prints one markdown table per part.

Inputs are the built-in benchmark's: synthetic scans (`synthetic.scans`) preprocessed by `preprocess_scan`, and for
parts 2 and 3 the four datasets written in their real layouts (`builtin.write_data`) and read by the real readers.
Weights are random (the cost is the same as trained ones). Parts 1, 3 and 4 give one row per torch thread count
(`--threads`; default 1 and torch's default): on cores shared with other jobs, 2 threads can be several times slower
than 1. One WI-768 forward at 2 k points took 13-21 s here (2 loaded cores), the 4-release conversion + TA + TIES
about 2 min, writing the releases 20 s (5 files, 1.8 GB, in a temporary folder removed afterwards).

    PYTHONPATH=. python scripts/bench_lidar.py                           # defaults: about 6 min on 2 busy cores
    PYTHONPATH=. python scripts/bench_lidar.py --skip-768 --skip-merge   # the tiny config only: about 2 min
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import nn
from torch.utils.data import Subset

from _timing import wall_seconds

from taskmerge import checkpoints, merging
from taskmerge.encoders.extract import extract_batches
from taskmerge.selection.tap import compute_tap
from taskmerge.settings.lidar import builtin, classes, datasets, synthetic
from taskmerge.settings.lidar.encoder import ScanBatch, WaffleIronConfig, WaffleIronEncoder, encoder_config, parameter_count
from taskmerge.settings.lidar.preprocess import Preprocessing, cell_indices, input_features, preprocess_scan, voxel_first_points
from taskmerge.settings.lidar.scans import PreparedScans, collate_scans
from taskmerge.settings.lidar.setting import _encoder_file
from taskmerge.tasks import DatasetSplit, Samples, Task
from taskmerge.tasks.metrics import MeanIoU

SENSOR = "semantic_kitti"  # part 1's scans: the 64-beam KITTI-like sensor (~3.3 k points per synthetic scan)
CROP_MARGIN = 1e-4  # preprocess.py's FOV crop margin
MERGE_STEPS = ("write", "convert-base", "convert-finetuned", "ta", "ties")
MB = 2**20
CPU = torch.device("cpu")
WARM_UP_POINTS = 256  # the WI-768 warm-up scan


def load_average() -> str:
    """The 1, 5 and 15 minute load averages."""
    return "/".join(f"{value:.2f}" for value in os.getloadavg())


def machine() -> str:
    """CPU model, cores, torch threads and the load average now."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    return (f"{model}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads; "
            f"load average (1/5/15 min) {load_average()}")


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    """Median wall time of `repeats` calls of `run()`."""
    return statistics.median(wall_seconds(run, CPU) for _ in range(repeats))


def preparation(config: WaffleIronConfig, dataset: str) -> Preprocessing:
    """The eval preprocessing of `config` with `dataset`'s intensity constants."""
    mean, std = classes.INTENSITY[dataset]
    return Preprocessing.for_encoder(config, mean, std)


# ---- part 1: forward throughput ------------------------------------------------------------------------------

class ModuleClock:
    """Wall seconds spent inside the embedding, the spatial mixes and the channel mixes (forward hooks)."""

    def __init__(self, encoder: WaffleIronEncoder) -> None:
        self.seconds: dict[str, float] = {}
        self._entered: dict[int, float] = {}
        kinds = {"embed": [encoder.embed], "spatial mix": list(encoder.waffleiron.spatial_mix),
                 "channel mix": list(encoder.waffleiron.channel_mix)}
        for kind, modules in kinds.items():
            for module in modules:
                module.register_forward_pre_hook(self._enter)
                module.register_forward_hook(self._leaver(kind))

    def _enter(self, module: nn.Module, _: Any) -> None:
        """Note when `module` starts."""
        self._entered[id(module)] = time.perf_counter()

    def _leaver(self, kind: str) -> Callable[..., None]:
        """A hook adding a module's time since it started to `kind`."""
        def leave(module: nn.Module, _: Any, __: Any) -> None:
            """Add the module's time since `_enter` to its kind."""
            self.seconds[kind] = self.seconds.get(kind, 0.0) + time.perf_counter() - self._entered.pop(id(module))
        return leave


@torch.no_grad()
def forward_row(name: str, encoder: WaffleIronEncoder, clock: ModuleClock, batches: list[ScanBatch], repeats: int,
                warm_up: ScanBatch) -> str:
    """One table row: `features(batch, "tokens")` over `batches` at the current thread count after one pass over
    `warm_up`, median seconds per pass, points/s and where the time of the passes went."""
    encoder.eval()
    encoder.features(warm_up, "tokens")
    clock.seconds.clear()
    times = [wall_seconds(lambda: [encoder.features(batch, "tokens") for batch in batches], CPU) for _ in range(repeats)]
    seconds, passed = statistics.median(times), sum(times)
    points = sum(int(batch.valid.sum()) for batch in batches)
    scans = sum(len(batch) for batch in batches)
    shares = " | ".join(f"{100 * clock.seconds.get(kind, 0.0) / passed:.0f} %"
                        for kind in ("embed", "spatial mix", "channel mix"))
    other = 100 * max(passed - sum(clock.seconds.values()), 0.0) / passed
    return (f"| {name} | {torch.get_num_threads()} | {scans} × batch {len(batches[0])} | {points:,} | {seconds:.3f} | "
            f"{points / seconds:,.0f} | {shares} | {other:.0f} % |")


def scan_points(sensor: str, points: int, seed: int) -> np.ndarray:
    """`points` raw points drawn (seeded, without replacement) from as many synthetic scans as needed."""
    count = math.ceil(points / 2500)
    pool = np.concatenate([p for p, _ in synthetic.scans(sensor, count, seed)])
    while len(pool) < points:
        count += 1
        pool = np.concatenate([p for p, _ in synthetic.scans(sensor, count, seed)])
    return pool[np.sort(np.random.default_rng(seed).choice(len(pool), points, replace=False))]


def forward_throughput(args: argparse.Namespace) -> None:
    """Part 1: points/s of the tiny config (batched and scan by scan) and of WI-768 on one scan, per thread count."""
    print("## 1. WaffleIron forward throughput on the CPU (`features(batch, \"tokens\")`, eval, no grad)\n")
    print("| config | threads | scans | kept points | s / pass | points/s | embed | spatial mix | channel mix | other |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    torch.manual_seed(args.seed)
    tiny = encoder_config("waffleiron_tiny")
    prep = preparation(tiny, SENSOR)
    single = [preprocess_scan(points, prep).batch for points, _ in synthetic.scans(SENSOR, args.tiny_scans, args.seed)]
    batched = [ScanBatch.collate(single[i : i + args.batch]) for i in range(0, len(single), args.batch)]
    encoder = WaffleIronEncoder(tiny)
    clock = ModuleClock(encoder)
    big = None if args.skip_768 else WaffleIronEncoder(encoder_config("waffleiron_768"))
    big_clock = None if big is None else ModuleClock(big)
    big_prep = preparation(encoder_config("waffleiron_768"), SENSOR)
    big_scans = [] if big is None else [preprocess_scan(scan_points(SENSOR, n, args.seed), big_prep).batch
                                        for n in [WARM_UP_POINTS, *args.wi768_points]]
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batches in (batched, single):
            print(forward_row("waffleiron_tiny", encoder, clock, batches, args.repeats, batches[0]), flush=True)
        for scan in big_scans[1:]:
            print(forward_row("waffleiron_768", big, big_clock, [scan], 1, big_scans[0]), flush=True)
    print(f"\nTiny: median of {args.repeats} passes after a warm-up pass over {args.tiny_scans} synthetic {SENSOR} scans. "
          f"WI-768: one pass after a warm-up pass on {WARM_UP_POINTS} points (the grids cost the same at any point count), on {' / '.join(map(str, args.wi768_points))} raw points drawn from synthetic "
          f"{SENSOR} scans. Module shares are of the timed passes' wall time; other = projections (cell counts), "
          f"padding mask, probe gather, Python. Load average {load_average()}.\n")


# ---- part 2: preprocessing -----------------------------------------------------------------------------------

def preprocess_stages(points: np.ndarray, prep: Preprocessing) -> dict[str, float]:
    """Seconds of each step `preprocess_scan` takes, done the same way one after the other."""
    marks = [time.perf_counter()]
    full = input_features(points[:, :4], prep.intensity_mean, prep.intensity_std)
    kept = voxel_first_points(full[:, :3], prep.voxel_size)
    marks.append(time.perf_counter())
    low, high = np.asarray(prep.fov[0]), np.asarray(prep.fov[1])
    xyz = full[kept, :3]
    pc = full[kept[np.all((xyz > low + CROP_MARGIN) & (xyz < high - CROP_MARGIN), axis=1)]]
    marks.append(time.perf_counter())
    cell_indices(pc[:, :3], prep)
    marks.append(time.perf_counter())
    tree = cKDTree(pc[:, :3])
    tree.query(pc[:, :3], k=prep.neighbors + 1)
    marks.append(time.perf_counter())
    tree.query(points[:, :3], k=1)
    marks.append(time.perf_counter())
    names = ("features + voxels", "crop", "cells", "kNN", "upsample")
    return {name: marks[i + 1] - marks[i] for i, name in enumerate(names)}


def preprocessing_cost(root: Path, scans: int, seed: int) -> None:
    """Part 2: per scan, the reader, `preprocess_scan` (and its stages), a first `PreparedScans` access (read +
    preprocess + probe points) and a second one (the memo), for every dataset and both configs."""
    print("## 2. Preprocessing per scan (real readers on the generated layouts), without and with the memo\n")
    print("| dataset | config (K, FOV) | raw points | kept | read ms | preprocess ms | features+voxels / crop / cells / "
          "kNN / upsample ms | 1st PreparedScans access ms | 2nd access µs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dataset in builtin.TASKS:
        reader = datasets.open_split(dataset, root, "train")
        indices = range(min(scans, len(reader)))
        for name in ("waffleiron_tiny", "waffleiron_768"):
            config = encoder_config(name)
            prep = preparation(config, dataset)
            read = [reader.read(i)[0] for i in indices]
            read_s = wall_seconds(lambda: [reader.read(i) for i in indices], CPU) / len(read)
            prep_s = wall_seconds(lambda: [preprocess_scan(points, prep) for points in read], CPU) / len(read)
            stages = [preprocess_stages(points, prep) for points in read]
            split = " / ".join(f"{1e3 * statistics.mean(s[k] for s in stages):.2f}" for k in stages[0])
            memo = PreparedScans(reader, prep, 512, seed)
            first = wall_seconds(lambda: [memo[i] for i in indices], CPU) / len(read)
            second = median_seconds(lambda: [memo[i] for i in indices], 3) / len(read)
            kept = statistics.mean(int(memo[i][0].valid.sum()) for i in indices)
            raw = statistics.mean(len(points) for points in read)
            print(f"| {dataset} | {name.split('_')[1]} (K={config.neighbors}, ±{config.fov[1][0]:.0f} m) | {raw:,.0f} | "
                  f"{kept:,.0f} | {1e3 * read_s:.2f} | {1e3 * prep_s:.2f} | {split} | {1e3 * first:.2f} | "
                  f"{1e6 * second:.2f} |", flush=True)
    print(f"\nMeans over {scans} train scans per dataset (first pass over each file: page cache warm, the files were just "
          f"written). Load average {load_average()}.\n")


# ---- part 3: TAP vs its forward floor ------------------------------------------------------------------------

def unlabeled_samples(root: Path, dataset: str, config: WaffleIronConfig, n: int, probe_points: int, seed: int) -> Samples:
    """TAP's unlabeled scans of one task, built as the setting builds them: a `DatasetSplit` of `PreparedScans`
    collated by `collate_scans`, and `Task.unlabeled`."""
    scans = PreparedScans(datasets.open_split(dataset, root, "train"), preparation(config, dataset), probe_points, seed)
    indices = list(range(len(scans)))
    split = DatasetSplit(Subset(scans, indices), {**scans.description(), "indices": indices}, 0, collate=collate_scans)
    count = classes.num_classes(dataset)
    task = Task(dataset, "segmentation", count, {"train": split}, lambda: MeanIoU(count, ignore_index=classes.IGNORE_INDEX))
    return task.unlabeled(n, seed)


def tap_cost(root: Path, args: argparse.Namespace) -> None:
    """Part 3: one candidate's TAP (tokens, l2) against a plain loop of `features` over the same, already collated
    batches, for the tiny config on the four tasks."""
    config = encoder_config("waffleiron_tiny")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads[0])
    student = WaffleIronEncoder(config).eval()
    start = time.perf_counter()
    unlabeled = {task: unlabeled_samples(root, task, config, args.tap_scans, args.probe_points, args.seed)
                 for task in builtin.TASKS}
    teachers = {task: extract_batches(WaffleIronEncoder(config), samples.batches(args.batch), "tokens")
                for task, samples in unlabeled.items()}  # the first pass also fills each split's memo
    teacher_s = time.perf_counter() - start
    batches = [batch for samples in unlabeled.values() for batch in samples.batches(args.batch)]

    @torch.no_grad()
    def plain() -> None:
        """The forward-pass floor: `features` over the pre-collated batches."""
        for batch in batches:
            student.features(batch, "tokens").float().cpu()

    def tap() -> None:
        """One candidate's TAP, batches read from the memo and collated as the selector does."""
        compute_tap(student, unlabeled, teachers, "tokens", "l2", args.batch)

    def collate() -> None:
        """The memo reads and `collate_scans` of TAP's batches, without the encoder."""
        for samples in unlabeled.values():
            list(samples.batches(args.batch))

    total = len(builtin.TASKS) * args.tap_scans
    print(f"## 3. TAP per candidate vs its forward-pass floor (waffleiron_tiny, T = {len(builtin.TASKS)} tasks × "
          f"{args.tap_scans} scans, {args.probe_points} probe points per scan, batch {args.batch})\n")
    print("| threads | plain `features` loop (pre-collated) | TAP (tokens, l2) | TAP / plain (medians) | TAP / plain (fastest "
          "runs) | memo read + `collate_scans` alone |\n|---|---|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        plain(), tap()  # warm-up
        times: dict[str, list[float]] = {"plain": [], "tap": [], "collate": []}
        for _ in range(args.repeats):  # interleaved, so load drift hits both alike
            for name, run in (("plain", plain), ("tap", tap), ("collate", collate)):
                times[name].append(wall_seconds(run, CPU))
        plain_s, tap_s, collate_s = (statistics.median(times[name]) for name in ("plain", "tap", "collate"))
        print(f"| {threads} | {total / plain_s:.1f} scans/s ({plain_s:.2f} s) | {total / tap_s:.1f} scans/s ({tap_s:.2f} s) "
              f"| {plain_s / tap_s:.2f} | {min(times['plain']) / min(times['tap']):.2f} "
              f"| {collate_s:.3f} s ({100 * collate_s / tap_s:.1f} % of TAP) |", flush=True)
    print(f"\nMedians of {args.repeats} interleaved runs after a warm-up. Target TAP / plain ≥ 0.95. Teacher features "
          f"(4 teachers' passes at {args.threads[0]} thread(s), incl. reading + preprocessing every scan once): "
          f"{teacher_s:.1f} s. Load average {load_average()}.\n")


# ---- part 4: merging four WI-768 releases from disk ----------------------------------------------------------

def memory_mb(field: str) -> float:
    """A `/proc/self/status` memory field (VmRSS, VmHWM) in MB."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def segmenter(encoder: WaffleIronEncoder, classes_out: int) -> nn.ModuleDict:
    """ScaLR's downstream Segmenter: the encoder and a `classif` head BN1d(C) + Conv1d(C, classes, 1)."""
    head = nn.Sequential(nn.BatchNorm1d(encoder.embed_dim), nn.Conv1d(encoder.embed_dim, classes_out, 1))
    return nn.ModuleDict({"embed": encoder.embed, "waffleiron": encoder.waffleiron, "classif": head})


def perturbed(key: str, value: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`value + 0.01·randn` for a float tensor (BatchNorm running variances kept positive); integers unchanged."""
    if not value.is_floating_point():
        return value.clone()
    out = value + 0.01 * torch.randn(value.shape, generator=generator)
    return out.abs() if key.endswith("running_var") else out


def write_releases(folder: Path, tasks: int) -> dict[str, Any]:
    """The pretrained `model.pth` and `tasks` fine-tuning `ckpt_last.pth` files, random WI-768 weights."""
    config = encoder_config("waffleiron_768")
    torch.manual_seed(0)
    encoder = WaffleIronEncoder(config)
    base = {key: value.detach().clone() for key, value in encoder.state_dict().items()}
    distill = nn.Conv1d(config.channels, 1024, 1).state_dict()
    model_points = {f"module.{k}": v for k, v in {**base, **{f"classif.{k}": v for k, v in distill.items()}}.items()}
    (folder / "pretraining").mkdir(parents=True)
    torch.save({"model_points": model_points}, folder / "pretraining" / "model.pth")
    del model_points
    model = segmenter(encoder, 16)
    for t in range(tasks):
        generator = torch.Generator().manual_seed(1000 + t)
        encoder.load_state_dict({key: perturbed(key, value, generator) for key, value in base.items()})
        for layer in model["classif"]:
            layer.reset_parameters()  # a fresh head per task
        optim = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.003)
        for parameter in model.parameters():
            parameter.grad = parameter.detach() * 1e-3
        optim.step()  # lr 0: fills exp_avg / exp_avg_sq per parameter, leaves the weights
        for group in optim.param_groups:
            group["lr"] = 1e-5  # the cosine schedule's last rate
        optim.zero_grad(set_to_none=True)
        net = {f"module.{k}": v.detach().clone() for k, v in model.state_dict().items()}
        scheduler = {"base_lrs": [np.float64(1e-3)], "last_epoch": 20 * 3516, "_step_count": 20 * 3516 + 1,
                     "_last_lr": [np.float64(1e-5)], "verbose": False, "_get_lr_called_within_step": False}
        path = folder / "finetuning" / f"task{t}" / "ckpt_last.pth"
        path.parent.mkdir(parents=True)
        torch.save({"epoch": 20, "net": net, "optim": optim.state_dict(), "scheduler": scheduler,
                    "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                               "_growth_tracker": 0}}, path)
        keys = len(net)
        del net, optim
    return {"net keys": keys}


def merge_step(step: str, folder: Path, tasks: int) -> None:
    """One step of part 4 in this (fresh) process; prints a JSON line: seconds, RSS after imports, peak RSS, notes.
    Conversions go to (and merges read from) `converted<threads>`, so each thread count converts afresh."""
    rss_start = memory_mb("VmRSS")
    start = time.perf_counter()
    config = encoder_config("waffleiron_768")
    names = [f"task{t}" for t in range(tasks)]
    converted = folder / f"converted{torch.get_num_threads()}"
    notes: dict[str, Any] = {}
    if step == "write":
        notes = write_releases(folder, tasks)
    elif step.startswith("convert"):
        sources = ({"base": folder / "pretraining" / "model.pth"} if step == "convert-base" else
                   {name: folder / "finetuning" / name / "ckpt_last.pth" for name in names})
        for name, source in sources.items():
            begin = time.perf_counter()
            notes[name] = str(_encoder_file(source, converted, config))
            notes[f"{name} s"] = round(time.perf_counter() - begin, 1)
    else:
        paths = json.loads((converted / "paths.json").read_text())
        fixed, swept = ({}, {"alpha": 0.3}) if step == "ta" else ({"k": 20}, {})
        prepared = merging.prepare(step, paths["base"], [paths[name] for name in names], **fixed)
        notes["prepare s"] = round(time.perf_counter() - start, 1)
        merged = prepared.merge(**swept)
        notes["merge s"] = round(time.perf_counter() - start - notes["prepare s"], 1)
        checkpoints.save_state_dict(converted / f"merged_{step}.safetensors", merged)
    print(json.dumps({"seconds": time.perf_counter() - start, "rss_start": rss_start, "peak": memory_mb("VmHWM"),
                      "notes": notes}))


def run_step(step: str, folder: Path, tasks: int, threads: int) -> dict[str, Any]:
    """`merge_step` in a fresh process with `threads` torch threads; its result plus the process's wall time."""
    begin = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--merge-step", step, "--folder", str(folder), "--merge-tasks",
                           str(tasks), "--threads", str(threads)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"part 4, step {step} with {threads} thread(s) failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**result, "process": time.perf_counter() - begin}


def merge_memory(folder: Path, tasks: int, thread_counts: list[int]) -> None:
    """Part 4, each step in a fresh process: write the releases (once), then per thread count convert them as the
    setting does (`_encoder_file`: read, fingerprint, safetensors) and merge the converted files with TA (α = 0.3)
    and TIES (k = 20)."""
    rows = [("write", thread_counts[0], run_step("write", folder, tasks, thread_counts[0]))]
    for threads in thread_counts:
        paths: dict[str, str] = {}
        for step in MERGE_STEPS[1:]:
            result = run_step(step, folder, tasks, threads)
            rows.append((step, threads, result))
            if step.startswith("convert"):
                paths.update({k: v for k, v in result["notes"].items() if not k.endswith(" s")})
                (folder / f"converted{threads}" / "paths.json").write_text(json.dumps(paths))
    config = encoder_config("waffleiron_768")
    encoder = WaffleIronEncoder(config)
    params = sum(p.numel() for p in encoder.parameters())
    merged = sorted(folder.glob("converted*/merged_*.safetensors"))
    for path in merged:  # every merged file loads strictly into WI-768
        encoder.load_state_dict(encoder.encoder_weights(checkpoints.load_state_dict(path)))
    print(f"## 4. Converting and merging {tasks} WI-768 releases from disk, each step in a fresh process\n")
    print(f"WI-768 encoder: {params:,} parameters (spec: 59,435,540; from the dimensions: "
          f"{parameter_count(config)['total']:,}); {len(encoder.state_dict())} encoder keys, "
          f"{rows[0][2]['notes']['net keys']} in a fine-tuned `net` (spec: 700). All {len(merged)} merged files load "
          "strictly.\n")
    print("| step | threads | wall s (in process) | process wall s (with imports) | RSS after imports MB | peak RSS MB | "
          "notes |\n|---|---|---|---|---|---|---|")
    labels = {"write": f"write base + {tasks} fine-tuned releases (random init, torch.save)",
              "convert-base": "convert base `model.pth` → safetensors",
              "convert-finetuned": f"convert {tasks} `ckpt_last.pth` → safetensors, one after another",
              "ta": f"TA α=0.3 over {tasks} (prepare, merge, save)", "ties": f"TIES k=20 over {tasks} (prepare, merge, save)"}
    for step, threads, result in rows:
        notes = ", ".join(f"{k} {v}" for k, v in result["notes"].items() if k.endswith(" s"))
        print(f"| {labels[step]} | {threads} | {result['seconds']:.1f} | {result['process']:.1f} | "
              f"{result['rss_start']:.0f} | {result['peak']:.0f} | {notes} |")
    sizes = {"base `model.pth`": folder / "pretraining" / "model.pth",
             "one fine-tuned `ckpt_last.pth`": folder / "finetuning" / "task0" / "ckpt_last.pth",
             "one converted encoder (safetensors)": Path(rows[2][2]["notes"]["task0"]),
             "merged TA (safetensors)": merged[0]}
    print("\n| file | MB |\n|---|---|")
    for name, path in sizes.items():
        print(f"| {name} | {path.stat().st_size / MB:.0f} |")
    print(f"\nWeights: 4 B × {params:,} = {4 * params / MB:.0f} MB. The releases are read back from the page cache "
          f"(just written; {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM). "
          f"Load average {load_average()}.\n")


def main() -> None:
    """Parse the options and run the parts asked for (or one step of part 4, in a child process)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny-scans", type=int, default=8, help="scans for the tiny config's forward throughput")
    parser.add_argument("--batch", type=int, default=8, help="scans per batch (forward throughput and TAP)")
    parser.add_argument("--wi768-points", type=int, nargs="+", default=[2000], help="raw points of WI-768 forward scans")
    parser.add_argument("--skip-768", action="store_true", help="no WI-768 forward (it takes minutes on the CPU)")
    parser.add_argument("--prep-scans", type=int, default=16, help="scans per dataset for the preprocessing table")
    parser.add_argument("--tap-scans", type=int, default=16, help="TAP's unlabeled scans per task (lidar_builtin: 32)")
    parser.add_argument("--probe-points", type=int, default=512, help="TAP probe points per scan (lidar_builtin: 512)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (medians are reported)")
    parser.add_argument("--merge-tasks", type=int, default=4, help="fine-tuned WI-768 releases to merge")
    parser.add_argument("--skip-merge", action="store_true", help="no WI-768 release writing / converting / merging")
    parser.add_argument("--threads", type=int, nargs="+", help="torch thread counts of parts 1, 3 and 4, one row each "
                        f"(default: 1 and torch's default, {torch.get_num_threads()})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--merge-step", choices=MERGE_STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.threads = list(dict.fromkeys(args.threads or [1, torch.get_num_threads()]))
    if args.merge_step:
        torch.set_num_threads(args.threads[0])
        merge_step(args.merge_step, args.folder, args.merge_tasks)
        return
    print(f"# LiDAR benchmark\n\n{machine()} (start; torch's default thread count)\n")
    forward_throughput(args)
    torch.set_num_threads(args.threads[-1])
    with tempfile.TemporaryDirectory(prefix="bench_lidar_") as folder:
        root = Path(folder) / "data"
        builtin.write_data(root, max(args.prep_scans, args.tap_scans), 1, args.seed)
        preprocessing_cost(root, args.prep_scans, args.seed)
        tap_cost(root, args)
    if not args.skip_merge:
        with tempfile.TemporaryDirectory(prefix="bench_lidar_releases_") as folder:
            merge_memory(Path(folder), args.merge_tasks, args.threads)
    print(f"Load average (1/5/15 min) at the end: {load_average()}")


if __name__ == "__main__":
    main()
