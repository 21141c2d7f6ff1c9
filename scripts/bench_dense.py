"""Dense-setting benchmark: TAP throughput of a ViT-B/14 at 448 px against a plain forward loop, and the peak
memory of merging four ViT-B/14 releases read from disk (streamed from the canonical safetensors the setting
converts them to) against loading every state dict whole. Prints two markdown tables.

    python scripts/bench_dense.py --images 8 --tasks 2           # CPU-sized; use --device cuda on a GPU
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _timing import wall_seconds

from taskmerge.settings.dense.encoder import create_dense_encoder
from taskmerge.selection.tap import compute_tap
from taskmerge.tasks import Samples

MERGE_CHILD = """
import json, resource, sys, time
from pathlib import Path
from taskmerge import checkpoints, merging
from taskmerge.settings.dense.releases import load_canonical
mode, folder = sys.argv[1], Path(sys.argv[2])
start = time.perf_counter()
names = ["base", "t0", "t1", "t2", "t3"]
if mode == "streamed":  # the setting's path: canonical safetensors (converted once), merged key by key
    paths = {n: folder / f"{n}.safetensors" for n in names}
    merged = merging.merge("ties", paths["base"], [paths[n] for n in names[1:]], k=20, alpha=1.0)
else:  # every release unpickled and held whole
    states = {n: load_canonical(folder / f"{n}.pth") for n in names}
    merged = merging.merge("ties", states["base"], [states[n] for n in names[1:]], k=20, alpha=1.0)
print(json.dumps({"seconds": time.perf_counter() - start, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "tensors": len(merged)}))
"""



def tap_throughput(images: int, tasks: int, batch: int, device: torch.device) -> None:
    """TAP (tokens, l2) of a student against cached teacher features vs a plain `features` loop, images/s."""
    torch.manual_seed(0)
    student = create_dense_encoder("dune_vitb14", image_size=448).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    unlabeled = {f"task{t}": Samples.of(torch.randn(images, 3, 448, 448, generator=generator)) for t in range(tasks)}
    with torch.no_grad():
        student.features(unlabeled["task0"].take_all()[:1].to(device), "tokens")  # warm-up
        teachers = {name: torch.cat([student.features(b.to(device), "tokens").float().cpu() for b in s.batches(batch)])
                    for name, s in unlabeled.items()}

    def plain() -> None:
        with torch.no_grad():
            for samples in unlabeled.values():
                for batch_images in samples.batches(batch):
                    student.features(batch_images.to(device), "tokens").float().cpu()

    total = images * tasks
    plain_rate = total / wall_seconds(plain, device)
    tap_rate = total / wall_seconds(lambda: compute_tap(student, unlabeled, teachers, "tokens", "l2", batch), device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"ViT-B/14 (DUNE) at 448 px, {tasks} tasks × {images} images, batch {batch}; {where}\n")
    print("| plain features loop | TAP (tokens, l2) | TAP / plain |\n|---|---|---|")
    print(f"| {plain_rate:.2f} images/s | {tap_rate:.2f} images/s | {tap_rate / plain_rate:.2f} |\n")


def merge_memory(folder: Path) -> None:
    """Peak RSS of a TIES merge of four ViT-B/14 releases, streamed vs loaded whole, each in a fresh process."""
    from taskmerge import checkpoints
    from taskmerge.settings.dense.releases import export

    torch.manual_seed(0)
    base = create_dense_encoder("dune_vitb14").canonical_weights()
    for index, name in enumerate(["base", "t0", "t1", "t2", "t3"]):
        state = base if name == "base" else {k: v + 0.01 * torch.randn_like(v) for k, v in base.items()}
        export(state, "dune", folder / f"{name}.pth")
        checkpoints.save_state_dict(folder / f"{name}.safetensors", state)
    size_mb = (folder / "base.safetensors").stat().st_size / 2**20
    print(f"TIES (k=20) over 4 ViT-B/14 releases of {size_mb:.0f} MB each (+ the base), one fresh process per row\n")
    print("| how | peak RSS MB | seconds |\n|---|---|---|")
    for mode in ("streamed", "loaded whole"):
        out = subprocess.run([sys.executable, "-c", MERGE_CHILD, mode.split()[0], str(folder)], capture_output=True, text=True,
                             check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {mode} | {result['peak_mb']:.0f} | {result['seconds']:.1f} |")
    print(f"\n(this process: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB while writing the files)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="unlabeled images per task")
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-merge", action="store_true", help="only the TAP throughput table")
    args = parser.parse_args()
    tap_throughput(args.images, args.tasks, args.batch, torch.device(args.device))
    if not args.skip_merge:
        with tempfile.TemporaryDirectory() as folder:
            merge_memory(Path(folder))


if __name__ == "__main__":
    main()
