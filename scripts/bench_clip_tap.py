"""TAP throughput on a CLIP encoder against a plain `model.encode_image` loop at the same batch size.

TAP for one candidate on ViT-B/32 with T = 8 tasks and 128 images per task is 1024 student forward passes
(teacher features are cached), so its images/s should match the plain loop's. Weights are random (same
cost as real ones); both paths use the same weights and batches.

    python scripts/bench_clip_tap.py                               # ViT-B-32, T=8, 128 images, batch 128 and 256
    python scripts/bench_clip_tap.py --model ViT-L-14 --device cuda --batch-sizes 64 256
"""

from __future__ import annotations

import argparse

import torch
from _timing import wall_seconds

from taskmerge.settings import create_encoder
from taskmerge.settings.clip.encoder import random_init_clip
from taskmerge.selection.tap import compute_tap
from taskmerge.tasks import Samples



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--images", type=int, default=128, help="unlabeled images per task")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    torch.manual_seed(0)
    student = create_encoder("clip", model=args.model).to(device).eval()
    clip = random_init_clip(args.model)
    clip.visual.load_state_dict(student.visual.state_dict())
    clip = clip.to(device).eval()
    size = student.visual.image_size[0]
    generator = torch.Generator().manual_seed(0)
    unlabeled = {f"task{t}": Samples.of(torch.randn(args.images, 3, size, size, generator=generator)) for t in range(args.tasks)}
    total = args.tasks * args.images
    dim = student.embed_dim
    teachers = {name: torch.randn(args.images, dim, generator=generator) for name in unlabeled}

    with torch.no_grad():  # warm-up: first calls allocate and pick kernels
        warm = unlabeled["task0"].take_all()[: min(args.batch_sizes)].to(device)
        student.features(warm, "pooled"), clip.encode_image(warm)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model}, T = {args.tasks}, {args.images} images per task = {total} student forward passes; {where}\n")
    print("| batch | plain encode_image loop | TAP (pooled, l2) | TAP / plain |\n|---|---|---|---|")
    for batch in args.batch_sizes:
        def plain() -> None:
            with torch.no_grad():
                for samples in unlabeled.values():
                    for images in samples.batches(batch):
                        clip.encode_image(images.to(device)).float().cpu()

        def tap() -> None:
            compute_tap(student, unlabeled, teachers, "pooled", "l2", batch)

        plain_rate, tap_rate = total / wall_seconds(plain, device), total / wall_seconds(tap, device)
        print(f"| {batch} | {plain_rate:.1f} images/s | {tap_rate:.1f} images/s | {tap_rate / plain_rate:.2f} |")


if __name__ == "__main__":
    main()
