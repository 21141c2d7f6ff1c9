"""Benchmark merge methods on random-init open_clip checkpoints saved on disk with the release key set.

Each (model, T, method) runs in a fresh child process that memory-maps the checkpoints, merges and
writes the merged safetensors, so wall seconds, CPU seconds and peak RSS are those of a real run.

    python scripts/bench_merge.py                                   # ViT-B-32, T = 8 and 20, ta ties tsv iso_cts
    python scripts/bench_merge.py --model ViT-L-14 --tasks 20 --methods ta ties
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from taskmerge import checkpoints, merging

CHILD = """
import sys, torch
from taskmerge import checkpoints, merging
method, out, base, *fts = sys.argv[1:]
torch.set_num_threads({threads})
merged = merging.merge(method, checkpoints.open_state_dict(base), [checkpoints.open_state_dict(p) for p in fts])
checkpoints.save_state_dict(out, merged)
"""


def release_state_dict(model: str, seed: int) -> dict[str, torch.Tensor]:
    """A random-init open_clip `model` as the task_vectors/TSV releases save it: `model.` prefix, text
    transformer removed, the six text leftovers kept."""
    import open_clip

    torch.manual_seed(seed)
    clip = open_clip.create_model(model, pretrained=None)
    return {f"model.{k}": v.detach().clone() for k, v in clip.state_dict().items()
            if not k.startswith("transformer.") and k != "attn_mask"}


def make_checkpoints(model: str, tasks: int, root: Path) -> tuple[Path, list[Path]]:
    """θ0 and T fine-tuned checkpoints (θ0 + small random τ on the visual keys only), cached in `root`."""
    folder = root / model
    base_path = folder / "zeroshot.safetensors"
    if not base_path.is_file():
        checkpoints.save_state_dict(base_path, release_state_dict(model, seed=0))
    base = checkpoints.open_state_dict(base_path)
    paths = []
    for t in range(tasks):
        path = folder / f"task{t:02d}.safetensors"
        if not path.is_file():
            gen = torch.Generator().manual_seed(1000 + t)
            finetuned = {}
            for key in base:
                tensor = base[key]
                if key.startswith("model.visual.") and tensor.is_floating_point():
                    tensor = tensor + 1e-3 * torch.randn(tensor.shape, generator=gen, dtype=tensor.dtype)
                finetuned[key] = tensor
            checkpoints.save_state_dict(path, finetuned)
        paths.append(path)
    return base_path, paths


def run_child(method: str, base: Path, finetuned: list[Path], out: Path, threads: int) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and peak RSS (GB) of one merge in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(threads=threads), method, str(out), str(base), *map(str, finetuned)])
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"merge {method} failed (exit {os.waitstatus_to_exitcode(status)})")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024**2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--tasks", type=int, nargs="+", default=[8, 20])
    parser.add_argument("--methods", nargs="+", default=["ta", "ties", "tsv", "iso_cts"])
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TASKMERGE_BENCH_DIR", "/tmp/taskmerge-bench")))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    unknown = sorted(set(args.methods) - set(merging.available()))
    if unknown:
        parser.error(f"unknown methods {unknown}; available: {merging.available()}")
    rows = []
    for tasks in args.tasks:
        base, finetuned = make_checkpoints(args.model, tasks, args.workdir)
        size = sum(p.stat().st_size for p in [base, *finetuned]) / 1024**3
        for method in args.methods:
            out = args.workdir / f"merged-{args.model}-{tasks}-{method}.safetensors"
            wall, cpu, rss = run_child(method, base, finetuned, out, args.threads)
            out.unlink()
            rows.append((args.model, tasks, f"{size:.1f}", method, f"{wall:.1f}", f"{cpu:.1f}", f"{rss:.2f}"))
            print(f"{args.model} T={tasks} {method}: {wall:.1f} s wall, {cpu:.1f} s CPU, {rss:.2f} GB peak RSS", flush=True)
    header = ("model", "T", "checkpoints GB", "method", "wall s", "CPU s", "peak RSS GB")
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")


if __name__ == "__main__":
    main()
