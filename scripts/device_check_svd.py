"""Device check for the SVD methods' GPU path (`device=cuda`): TSV-M, Iso-C, Iso-CTS and STAR on ViT-shaped random
task vectors, prepared on the CPU and on the GPU, with the wall time of each and the largest per-key relative Frobenius
difference of the merged update (merging.md §4: ≤ 1e-4 expected for Iso-C, Iso-CTS and STAR, ≤ 1e-3 for TSV-M).

    PYTHONPATH=. python scripts/device_check_svd.py                       # ViT-B/32-shaped, T = 8: ~1 min on a GPU machine
    PYTHONPATH=. python scripts/device_check_svd.py --width 1024 --layers 24 --tasks 20   # ViT-L/14-shaped

Without a GPU it runs the CPU side only and says so.
"""

from __future__ import annotations

import argparse
import time

import torch

from taskmerge import merging


def vit_like(width: int, layers: int, tasks: int, seed: int) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """θ0 and T fine-tunes of a ViT's transformer matrices and biases (random, τ = 1e-3·N(0, 1))."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {}
    for layer in range(layers):
        prefix = f"visual.transformer.resblocks.{layer}."
        shapes.update({prefix + "attn.in_proj_weight": (3 * width, width), prefix + "attn.out_proj.weight": (width, width),
                       prefix + "mlp.c_fc.weight": (4 * width, width), prefix + "mlp.c_proj.weight": (width, 4 * width),
                       prefix + "ln_1.bias": (width,)})
    base = {key: 0.02 * torch.randn(shape, generator=gen) for key, shape in shapes.items()}
    fts = [{key: value + 1e-3 * torch.randn(value.shape, generator=gen) for key, value in base.items()} for _ in range(tasks)]
    return base, fts


def timed_delta(method: str, base, fts, device: str) -> tuple[float, dict[str, torch.Tensor]]:
    """Wall seconds of `prepare` on `device` and the merged update Δ (α = 1)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    merged = merging.merge(method, base, fts, alpha=1.0, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, {key: merged[key] - base[key] for key in base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, fts = vit_like(args.width, args.layers, args.tasks, seed=0)
    gpu = torch.cuda.is_available()
    print(f"# width {args.width}, {args.layers} layers, T = {args.tasks}; CPU threads {args.threads}; "
          f"GPU: {torch.cuda.get_device_name(0) if gpu else 'none'}\n")
    print("| method | CPU s | GPU s (first call) | GPU s (second) | max per-key relative difference |\n|---|---|---|---|---|")
    for method in ("tsv", "iso_c", "iso_cts", "star"):
        cpu_s, cpu_delta = timed_delta(method, base, fts, "cpu")
        if not gpu:
            print(f"| {method} | {cpu_s:.2f} | no GPU | | |")
            continue
        first_s, _ = timed_delta(method, base, fts, "cuda")
        second_s, gpu_delta = timed_delta(method, base, fts, "cuda")
        worst = max(float((gpu_delta[k] - cpu_delta[k]).norm() / cpu_delta[k].norm().clamp(min=1e-30)) for k in cpu_delta)
        print(f"| {method} | {cpu_s:.2f} | {first_s:.2f} | {second_s:.2f} | {worst:.1e} |")


if __name__ == "__main__":
    main()
