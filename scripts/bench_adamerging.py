"""Peak memory and seconds per step of layer-wise AdaMerging (TAP loss) against the number of tasks T.

Each T runs in a fresh process on the built-in ViT with synthetic task vectors, so the peak RSS is that
of one run: the merged encoder is a functional combination, so memory grows with the T task vectors
held (T × model size), not with T copies of the encoder graph.

    python scripts/bench_adamerging.py --tasks 2 4 8 16 --steps 20
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

CHILD = """
import sys, time, torch
from taskmerge.settings import create_encoder
from taskmerge.selection.adamerging import AdaMergingConfig, learn
tasks, steps = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
spec = dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, mlp_ratio=2.0)
encoder = create_encoder("builtin_vit", **spec)
pretrained = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
finetuned = [{k: v + 0.02 * torch.randn_like(v) if v.is_floating_point() else v for k, v in pretrained.items()} for _ in range(tasks)]
images = [torch.rand(64, 3, 32, 32) for _ in range(tasks)]
teachers = []
for model, batch in zip(finetuned, images):
    teacher = create_encoder("builtin_vit", **spec)
    teacher.load_state_dict(model)
    with torch.no_grad():
        teachers.append(teacher.eval().features(batch, "tokens"))
    del teacher
start = time.perf_counter()
learn(encoder, pretrained, finetuned, images, AdaMergingConfig(iterations=steps), teachers)
print((time.perf_counter() - start) / steps)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    print("| T | seconds per step | peak RSS MB |\n|---|---|---|")
    for tasks in args.tasks:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tasks), str(args.steps)], stdout=subprocess.PIPE, text=True)
        output = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"T={tasks} failed")
        print(f"| {tasks} | {float(output.strip().splitlines()[-1]):.3f} | {usage.ru_maxrss / 1024:.0f} |", flush=True)


if __name__ == "__main__":
    main()
