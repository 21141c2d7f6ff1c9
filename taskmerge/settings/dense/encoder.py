"""DINOv2-architecture ViT/14 encoders (DUNE, DINOv2, DINOv2-reg) as timm models plus a key fold.

One class serves a tiny test model and ViT-B/14 at 448: timm's `VisionTransformer` configured as
`vit_{small,base}_patch14_dinov2` / `vit_base_patch14_reg4_dinov2` (layer scale, LN eps 1e-6, optional
registers, `num_classes=0`), with explicit dimensions. Two things differ from timm, both for parity
with the source code (spec dense §2):
- position embeddings are resampled with the source rule (`'dinov2'`: bicubic, `scale_factor=(g+0.1)/M`,
  no antialias, as DUNE and DINOv2; `'dinov2_reg'`: bicubic to `size=g` with antialias), cached per grid;
- weights arrive in the canonical (DINOv2-named, unfolded) space and `encoder_weights` folds them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

Interpolation = Literal["dinov2", "dinov2_reg"]
FeatureKind = Literal["pooled", "tokens"]

PATCH_SIZE = 14
_OFFSET = 0.1  # DINOv2's `interpolate_offset`, used by the 'dinov2' rule


@dataclass(frozen=True)
class DenseConfig:
    """Architecture of one named encoder: dimensions, registers, the pos-embed rule and its native size."""

    embed_dim: int
    depth: int
    num_heads: int
    reg_tokens: int
    interpolation: Interpolation
    native_size: int  # the image size the released position embeddings were trained at


CONFIGS: dict[str, DenseConfig] = {
    "dune_vitb14": DenseConfig(768, 12, 12, 4, "dinov2", 448),
    "dune_vits14": DenseConfig(384, 12, 6, 4, "dinov2", 448),
    "dinov2_vitb14": DenseConfig(768, 12, 12, 0, "dinov2", 518),
    "dinov2_vits14": DenseConfig(384, 12, 6, 0, "dinov2", 518),
    "dinov2_vitb14_reg4": DenseConfig(768, 12, 12, 4, "dinov2_reg", 518),
}


def resample_grid(patch_pos: torch.Tensor, grid: tuple[int, int], rule: Interpolation) -> torch.Tensor:
    """Patch position embeddings `[1, M*M, D]` resampled to `grid` `[1, h*w, D]` with the source rule."""
    count, dim = patch_pos.shape[1], patch_pos.shape[2]
    side = math.isqrt(count)
    if side * side != count:
        raise ValueError(f"position embeddings hold {count} patch positions, not a square grid")
    if grid == (side, side):
        return patch_pos
    square = patch_pos.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if rule == "dinov2":
        scale = ((grid[0] + _OFFSET) / side, (grid[1] + _OFFSET) / side)
        out = F.interpolate(square, scale_factor=scale, mode="bicubic", antialias=False)
    elif rule == "dinov2_reg":
        out = F.interpolate(square, size=grid, mode="bicubic", antialias=True)
    else:
        raise ValueError(f"interpolation rule must be 'dinov2' or 'dinov2_reg', got {rule!r}")
    if tuple(out.shape[-2:]) != grid:
        raise RuntimeError(f"resampling {side}x{side} position embeddings gave {tuple(out.shape[-2:])}, not {grid}")
    return out.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim).to(patch_pos.dtype)


class DenseViT(VisionTransformer):
    """A DINOv2-architecture ViT/14 with the framework's feature contract and the source pos-embed rule."""

    def __init__(
        self,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        reg_tokens: int = 4,
        image_size: int = 448,
        native_size: int | None = None,
        interpolation: Interpolation = "dinov2",
        mlp_ratio: float = 4.0,
        init_values: float = 1e-5,
    ) -> None:
        if interpolation not in ("dinov2", "dinov2_reg"):
            raise ValueError(f"interpolation must be 'dinov2' or 'dinov2_reg', got {interpolation!r}")
        native = image_size if native_size is None else native_size
        for name, size in (("image_size", image_size), ("native_size", native)):
            if size % PATCH_SIZE:
                raise ValueError(f"{name} must be a multiple of the patch size {PATCH_SIZE}, got {size}")
        super().__init__(
            img_size=native,
            patch_size=PATCH_SIZE,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            init_values=init_values,
            reg_tokens=reg_tokens,
            no_embed_class=reg_tokens > 0,  # timm folds the CLS position into cls_token when registers exist
            num_classes=0,
            global_pool="token",
            dynamic_img_size=True,
        )
        self.patch_size = PATCH_SIZE
        self.grid_size = (image_size // PATCH_SIZE, image_size // PATCH_SIZE)
        self.interpolation = interpolation
        self._pos_cache: dict[tuple[int, int], tuple[torch.Tensor, int, torch.Tensor]] = {}

    def _patch_positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """Patch position embeddings for `grid`, cached per grid while `pos_embed` is the same tensor at the same
        version (the cache holds it, so a replaced one can never be mistaken for it); not cached under autograd."""
        pos = self.pos_embed
        patch_pos = pos if self.no_embed_class else pos[:, 1:]
        if pos.requires_grad and torch.is_grad_enabled():
            return resample_grid(patch_pos, grid, self.interpolation)
        cached = self._pos_cache.get(grid)
        if cached is None or cached[0] is not pos or cached[1] != pos._version:
            cached = (pos, pos._version, resample_grid(patch_pos.detach(), grid, self.interpolation))
            self._pos_cache[grid] = cached
        return cached[2]

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Add position embeddings to NHWC patch tokens and prepend CLS (and registers), as the source does."""
        batch, height, width, dim = x.shape
        x = x.reshape(batch, height * width, dim) + self._patch_positions((height, width))
        cls = self.cls_token.expand(batch, -1, -1)
        if not self.no_embed_class:
            cls = cls + self.pos_embed[:, :1]
        prefix = [cls] if self.reg_token is None else [cls, self.reg_token.expand(batch, -1, -1)]
        return self.pos_drop(torch.cat(prefix + [x], dim=1))

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens `[B, 1+R+N, D]` entering the first block."""
        return self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(images))))

    def features(self, images: torch.Tensor, kind: FeatureKind = "tokens") -> torch.Tensor:
        """Last-layer normalized patch tokens `[B, N, D]` (`x_norm_patchtokens`) or normalized CLS `[B, D]`."""
        if kind not in ("pooled", "tokens"):
            raise ValueError(f"feature kind must be 'pooled' or 'tokens', got {kind!r}")
        tokens = self.forward_features(images)
        return tokens[:, 0] if kind == "pooled" else tokens[:, self.num_prefix_tokens :]

    def intermediate(
        self, images: torch.Tensor, layers: Sequence[int], norm: bool = False, with_cls: bool = True
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(patch map `[B, D, h, w]`, CLS `[B, D]` or None) after each block in `layers` (negative counts from
        the end), with or without the final norm; registers are always dropped (spec dense §3)."""
        depth = len(self.blocks)
        wanted = [layer + depth if layer < 0 else layer for layer in layers]
        if not wanted or any(not 0 <= layer < depth for layer in wanted):
            raise ValueError(f"layers must be non-empty block indices in [-{depth}, {depth}), got {list(layers)}")
        height, width = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        x = self._embed(images)
        taken: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.blocks[: max(wanted) + 1]):
            x = block(x)
            if index in wanted:
                taken[index] = self.norm(x) if norm else x
        out = []
        for layer in wanted:
            tokens = taken[layer]
            patches = tokens[:, self.num_prefix_tokens :].transpose(1, 2).reshape(len(tokens), -1, height, width)
            out.append((patches, tokens[:, 0] if with_cls else None))
        return out

    def encoder_weights(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The timm state dict this module loads strictly from a canonical one (DINOv2 names, unchunked):
        `mask_token` dropped and, with registers, `cls += pos[:, 0]`, `pos = pos[:, 1:]`, `reg_token = register_tokens`."""
        return fold_canonical(state_dict, with_registers=self.reg_token is not None)

    def canonical_weights(self) -> dict[str, torch.Tensor]:
        """The canonical (DINOv2-named, unfolded) state dict of these weights, the inverse of `encoder_weights`: the
        CLS position is zero (its value is already folded into `cls_token`), which computes the same function."""
        state = {key: value.detach().clone() for key, value in self.state_dict().items()}
        pos = state.pop("pos_embed")
        canonical = {"cls_token": state.pop("cls_token"),
                     "pos_embed": torch.cat([torch.zeros_like(pos[:, :1]), pos], 1) if self.no_embed_class else pos}
        if self.reg_token is not None:
            canonical["register_tokens"] = state.pop("reg_token")
        return {**canonical, **state}


def fold_canonical(state_dict: Mapping[str, torch.Tensor], with_registers: bool) -> dict[str, torch.Tensor]:
    """timm's `_convert_dinov2` fold of a canonical state dict, without copying the untouched tensors."""
    out = {key: value for key, value in state_dict.items() if key != "mask_token"}
    if with_registers:
        if "register_tokens" not in out:
            raise KeyError("the encoder has registers but the state dict has no 'register_tokens'")
        pos = out.pop("pos_embed")
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    elif "register_tokens" in out:
        raise KeyError("the state dict has 'register_tokens' but the encoder has no registers")
    return out


def create_dense_encoder(name: str, image_size: int = 448, native_size: int | None = None) -> DenseViT:
    """A named encoder (`dune_vitb14`, `dinov2_vitb14`, …) with random weights; `native_size` overrides the
    released position grid's size (DUNE 448 or 336, DINOv2 518)."""
    if name not in CONFIGS:
        raise KeyError(f"unknown dense encoder {name!r}; available: {sorted(CONFIGS)}")
    config = CONFIGS[name]
    return DenseViT(
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        reg_tokens=config.reg_tokens,
        image_size=image_size,
        native_size=config.native_size if native_size is None else native_size,
        interpolation=config.interpolation,
    )
