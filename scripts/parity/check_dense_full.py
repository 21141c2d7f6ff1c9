"""Full-size parity check (manual, ~2 min on one CPU thread): random ViT-B/14 DUNE, DINOv2 and DINOv2-reg4
reference models against the dense encoder, at the native size, 448, 336 and 336x448.

Prints the max abs difference of the normalized patch tokens, the CLS token and the intermediates
(blocks 2, 5, 8, 11, norm off, as DINOv2's depth heads take them); the reference checkouts are imported
from the paths given, as in make_dense_fixtures.py.

    python scripts/parity/check_dense_full.py --dune-root /tmp/dune_ref --dinov2-root /tmp/dinov2_ref
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from make_dense_fixtures import _import_references, _randomize
from taskmerge.settings.dense.encoder import create_dense_encoder
from taskmerge.settings.dense.releases import canonicalize

LAYERS = [2, 5, 8, 11]


def _references(dune_vit: Any, dinov2_vit: Any) -> list[tuple[str, nn.Module, str, int]]:
    """(encoder name, reference ViT-B/14, release key prefix, native size) for the three families."""
    from dinov2.layers import MemEffAttention, NestedTensorBlock
    from model.common.attention import MemEffAttention as DuneAttention
    from model.common.block import Block as DuneBlock

    dinov2 = partial(dinov2_vit.DinoVisionTransformer, img_size=518, patch_size=14, init_values=1.0, block_chunks=0,
                     block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention))
    return [
        ("dune_vitb14", dune_vit.DinoVisionTransformer(image_size=448, patch_size=14, num_register_tokens=4,
                                                       layerscale_init=1e-4,
                                                       block_fn=partial(DuneBlock, attn_class=DuneAttention)),
         "encoder.", 448),
        ("dinov2_vitb14", dinov2(), "", 518),
        ("dinov2_vitb14_reg4", dinov2(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0), "", 518),
    ]


def _max_diffs(name: str, reference: nn.Module, canonical: dict[str, torch.Tensor], size: tuple[int, int],
               generator: torch.Generator) -> tuple[float, float, float]:
    """Max abs differences (tokens, CLS, intermediates) between the reference and the encoder at `size`."""
    encoder = create_dense_encoder(name, image_size=size[0]).eval()
    encoder.load_state_dict(encoder.encoder_weights(canonical), strict=True)
    images = torch.randn(1, 3, *size, generator=generator)
    with torch.no_grad():
        expected = reference.forward_features(images)
        layers = reference.get_intermediate_layers(images, LAYERS, reshape=True, return_class_token=True, norm=False)
        tokens = (encoder.features(images, "tokens") - expected["x_norm_patchtokens"]).abs().max().item()
        cls = (encoder.features(images, "pooled") - expected["x_norm_clstoken"]).abs().max().item()
        inter = max(max((p - rp).abs().max().item(), (c - rc).abs().max().item())
                    for (p, c), (rp, rc) in zip(encoder.intermediate(images, LAYERS), layers))
    return tokens, cls, inter


def main() -> None:
    """Build the references, read their state dicts as releases and print the differences per size."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dune-root", type=Path, required=True)
    parser.add_argument("--dinov2-root", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    for name, reference, prefix, native in _references(*_import_references(args.dune_root, args.dinov2_root)):
        _randomize(reference, generator)
        reference.eval()
        release = {prefix + key: value for key, value in reference.state_dict().items()}
        canonical, _, _ = canonicalize(release, name)
        print(f"{name}: {len(release)} release tensors")
        for size in dict.fromkeys([(native, native), (448, 448), (336, 336), (336, 448)]):
            tokens, cls, inter = _max_diffs(name, reference, canonical, size, generator)
            print(f"  {size[0]}x{size[1]}: tokens {tokens:.2e}  cls {cls:.2e}  intermediates {inter:.2e}")


if __name__ == "__main__":
    main()
