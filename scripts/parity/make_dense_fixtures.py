"""Golden fixtures for the dense encoders, computed by the reference code (run once, outside the package).

Builds tiny random ViT/14 models with the authors' own classes — DUNE's (naver/dune, 4 registers, chunked
blocks, offset-0.1 bicubic), DINOv2's (facebookresearch/dinov2, no registers, offset 0.1) and DINOv2-reg's
(4 registers, antialiased `size=` resampling) — runs them on fixed random images at the native size, a
resampled size and a non-square size, and writes under the output folder, per model:
  <name>_weights.safetensors  the reference state dict in its native layout (DUNE keys under `encoder.`);
  <name>_io.safetensors       inputs (fp16, exact) and expected outputs: x_norm_patchtokens, x_norm_clstoken, and
                              get_intermediate_layers([0, 1, 2], reshape=True, return_class_token=True)
                              with norm off and on; the architecture in the metadata.
No reference code is copied: the checkouts are imported from the paths given on the command line.

    python scripts/parity/make_dense_fixtures.py --dune-root /tmp/dune_ref --dinov2-root /tmp/dinov2_ref
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file
from torch import nn

ARCH = {"embed_dim": 16, "depth": 3, "num_heads": 2, "mlp_ratio": 4.0, "patch_size": 14, "image_size": 56}
SIZES = {"native": (56, 56), "resampled": (70, 70), "nonsquare": (56, 84)}
LAYERS = [0, 1, 2]
BATCH = 1


def _import_references(dune_root: Path, dinov2_root: Path) -> tuple[Any, Any]:
    """DUNE's and DINOv2's vision_transformer modules, imported from their checkouts (xFormers disabled)."""
    os.environ["XFORMERS_DISABLED"] = "1"  # DINOv2's own switch; DUNE's copy uses SDPA only
    sys.path[:0] = [str(dune_root), str(dinov2_root)]
    from dinov2.models import vision_transformer as dinov2_vit
    from model.encoder import vision_transformer as dune_vit

    return dune_vit, dinov2_vit


def _dune_model(dune_vit: Any) -> nn.Module:
    """A tiny DUNE encoder as `model/dune.py::build_encoder` makes one (options.py defaults, block_chunks=1)."""
    from model.common.attention import MemEffAttention
    from model.common.block import Block

    return dune_vit.DinoVisionTransformer(
        image_size=ARCH["image_size"], patch_size=ARCH["patch_size"], embed_dim=ARCH["embed_dim"],
        depth=ARCH["depth"], num_heads=ARCH["num_heads"], mlp_ratio=ARCH["mlp_ratio"],
        block_fn=partial(Block, attn_class=MemEffAttention), num_register_tokens=4, layerscale_init=1e-4,
        qkv_bias=True, ln_affine=True)


def _dinov2_model(dinov2_vit: Any, registers: bool) -> nn.Module:
    """A tiny DINOv2 backbone as `hub/backbones.py::_make_dinov2_model` makes one (with or without registers)."""
    from dinov2.layers import MemEffAttention, NestedTensorBlock

    return dinov2_vit.DinoVisionTransformer(
        img_size=ARCH["image_size"], patch_size=ARCH["patch_size"], embed_dim=ARCH["embed_dim"],
        depth=ARCH["depth"], num_heads=ARCH["num_heads"], mlp_ratio=ARCH["mlp_ratio"],
        block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention), init_values=1.0, block_chunks=0,
        num_register_tokens=4 if registers else 0, interpolate_antialias=registers,
        interpolate_offset=0.0 if registers else 0.1)


def _randomize(model: nn.Module, generator: torch.Generator) -> None:
    """Give every tensor a random, well-scaled value so each one matters (norms near 1, gammas in [0.2, 1])."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("gamma"):
                param.copy_(0.2 + 0.8 * torch.rand(param.shape, generator=generator))
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.2 * noise)
            elif param.dim() >= 2 and "token" not in name and "pos_embed" not in name:
                param.copy_(noise / math.sqrt(param[0].numel()))
            else:
                param.copy_(0.5 * noise)


def _run(model: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Inputs and the reference outputs at every size of SIZES."""
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for size_name, (height, width) in SIZES.items():
            # fp16-representable values stored as fp16: half the bytes, the same float32 input once cast back
            images = torch.randn(BATCH, 3, height, width, generator=generator).half().float()
            feats = model.forward_features(images)
            out[f"{size_name}.images"] = images.half()
            out[f"{size_name}.x_norm_patchtokens"] = feats["x_norm_patchtokens"]
            out[f"{size_name}.x_norm_clstoken"] = feats["x_norm_clstoken"]
            for norm in (False, True):
                layers = model.get_intermediate_layers(images, LAYERS, reshape=True, return_class_token=True, norm=norm)
                for layer, (patches, cls) in zip(LAYERS, layers):
                    out[f"{size_name}.layer{layer}.norm{int(norm)}.patches"] = patches
                    out[f"{size_name}.layer{layer}.norm{int(norm)}.cls"] = cls
    return out


def _write(out_dir: Path, name: str, model: nn.Module, io: dict[str, torch.Tensor], meta: dict[str, Any],
           key_of: Callable[[str], str]) -> None:
    """Save the native-layout weights and the inputs/outputs of one model."""
    weights = {key_of(key): value.contiguous() for key, value in model.state_dict().items()}
    save_file(weights, str(out_dir / f"{name}_weights.safetensors"))
    save_file({k: v.contiguous() for k, v in io.items()}, str(out_dir / f"{name}_io.safetensors"),
              metadata={"config": json.dumps(meta), "sizes": json.dumps(SIZES), "layers": json.dumps(LAYERS)})


def main() -> None:
    """Parse the checkout paths, build the three tiny references and write their fixtures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dune-root", type=Path, required=True, help="checkout of naver/dune (afad549)")
    parser.add_argument("--dinov2-root", type=Path, required=True, help="checkout of facebookresearch/dinov2 (b8931f7)")
    parser.add_argument("--dune-rev", default="afad549")
    parser.add_argument("--dinov2-rev", default="b8931f7")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[2] / "tests/fixtures/dense")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dune_vit, dinov2_vit = _import_references(args.dune_root, args.dinov2_root)
    args.out.mkdir(parents=True, exist_ok=True)
    dims = {k: ARCH[k] for k in ("embed_dim", "depth", "num_heads", "mlp_ratio", "image_size")}
    cases = [
        ("dune_tiny", _dune_model(dune_vit), {"reg_tokens": 4, "interpolation": "dinov2",
                                              "reference": f"naver/dune@{args.dune_rev}"}, lambda k: f"encoder.{k}"),
        ("dinov2_tiny", _dinov2_model(dinov2_vit, registers=False),
         {"reg_tokens": 0, "interpolation": "dinov2", "reference": f"facebookresearch/dinov2@{args.dinov2_rev}"},
         lambda k: k),
        ("dinov2_reg_tiny", _dinov2_model(dinov2_vit, registers=True),
         {"reg_tokens": 4, "interpolation": "dinov2_reg", "reference": f"facebookresearch/dinov2@{args.dinov2_rev}"},
         lambda k: k),
    ]
    for seed, (name, model, meta, key_of) in enumerate(cases):
        generator = torch.Generator().manual_seed(seed)
        _randomize(model, generator)
        model.eval()
        _write(args.out, name, model, _run(model, generator), {**dims, **meta}, key_of)
        print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters -> {args.out}")


if __name__ == "__main__":
    main()
