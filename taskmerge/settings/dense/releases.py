"""Dense-setting releases (DUNE, DINOv2 with or without registers, Multi-HMR, safetensors) to and from the
canonical merge space, and back.

Canonical = DINOv2 names, unchunked `blocks.N.`, no `mask_token`, CLS position not folded (spec dense §2):
merging happens here, before `encoder.fold_canonical`, because the fold commutes with task arithmetic but
not with TIES, TSV or DARE. `.pt/.pth` files are read with `torch.load(weights_only=True)` with
`argparse.Namespace` allow-listed, falling back to the project's restricted unpickler; the layout is
detected from the container and the key prefixes. Every error names the file and what was found.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

import torch

from taskmerge.checkpoints import atomic_write, load_container, save_state_dict
from taskmerge.errors import UserError

Layout = Literal["dune", "dinov2", "multihmr", "safetensors"]
LAYOUTS: tuple[str, ...] = ("dune", "dinov2", "multihmr", "safetensors")

_PREFIXES = {"multihmr": "backbone.encoder.", "dune": "encoder.", "dinov2": ""}
_WRAPPERS = re.compile(r"(?<![^.])(?:module|_orig_mod)\.")  # DDP and torch.compile prefixes, as DUNE strips them
_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.")  # DUNE's `block_chunks=1` names: blocks.0.i.
_PLAIN_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_REQUIRED = ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight")
_MASTR_KEYS = ("dune_backbone_name", "mast3r_model_str")
_DUNE_ARCHS = {384: "vit_small", 768: "vit_base", 1024: "vit_large"}


@dataclass(frozen=True)
class Release:
    """A release file read into canonical space, with what `export(..., template=)` needs to rewrite it exactly."""

    path: Path
    layout: str
    canonical: dict[str, torch.Tensor]
    container: Any  # the file's top-level object (the state dict itself for plain and safetensors files)
    state_key: str | None  # where the state dict sits in `container` ("model", "model_state_dict") or None
    names: dict[str, str]  # canonical name -> name in the file's state dict


def read_release(path: str | Path) -> Release:
    """Read any layout of spec dense §1 and map its encoder to canonical names; refuse files without one."""
    path = Path(path)
    container = load_container(path, safe_globals=[argparse.Namespace])
    state, state_key = _state_dict_of(container, path)
    canonical, names, layout = canonicalize(state, path)
    if path.suffix == ".safetensors":
        layout = "safetensors"
    return Release(path, layout, canonical, container, state_key, names)


def load_canonical(path: str | Path) -> dict[str, torch.Tensor]:
    """The canonical encoder state dict of a release file."""
    return read_release(path).canonical


def _state_dict_of(container: Any, path: Path) -> tuple[Mapping[str, torch.Tensor], str | None]:
    """The state dict inside a release container and its key; a DUNE-MASt3R file or a keyless object is refused."""
    if not isinstance(container, Mapping):
        raise UserError(f"{path}: expected a checkpoint dict, found a pickled {type(container).__name__}")
    if any(key in container for key in _MASTR_KEYS):
        raise UserError(f"{path}: a DUNE-MASt3R checkpoint (top-level keys {sorted(container)}): it holds the MASt3R "
                        "decoder, not an encoder; give the DUNE encoder release instead")
    for key in ("model_state_dict", "model"):
        if isinstance(container.get(key), Mapping):
            return container[key], key
    if container and all(isinstance(value, torch.Tensor) for value in container.values()):
        return container, None
    raise UserError(f"{path}: no state dict found; top-level keys {sorted(map(str, container))[:12]} "
                    "(expected DUNE's {model, args, iter}, Multi-HMR's {model_state_dict, …} or a plain state dict)")


def canonicalize(state: Mapping[str, torch.Tensor], path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """Canonical tensors, canonical -> original names, and the layout ('dune', 'multihmr', 'dinov2') found from
    the key prefixes of a state dict read from `path` (named in errors)."""
    stripped = {_WRAPPERS.sub("", key): key for key in state}
    layout = _layout_from_keys(stripped, path)
    prefix = _PREFIXES[layout]
    canonical: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    for key, original in stripped.items():
        if not key.startswith(prefix) or key == prefix + "mask_token":
            continue
        name = _CHUNKED.sub(r"blocks.\1.", key[len(prefix):])
        if name in canonical:
            raise UserError(f"{path}: two tensors map to the canonical name {name!r} ({names[name]!r}, {original!r})")
        canonical[name], names[name] = state[original], original
    missing = [key for key in _REQUIRED if key not in canonical]
    if missing:
        raise UserError(f"{path}: the {layout} encoder under {prefix or 'the top level'!r} lacks {missing}")
    return canonical, names, layout


def _layout_from_keys(keys: Mapping[str, str], path: str | Path) -> str:
    """'multihmr', 'dune' or 'dinov2' from where `cls_token` sits; a folded timm dict or no encoder is refused."""
    for layout in ("multihmr", "dune", "dinov2"):
        if _PREFIXES[layout] + "cls_token" in keys:
            if _PREFIXES[layout] + "reg_token" in keys:
                raise UserError(f"{path}: a timm state dict (reg_token, CLS position folded into cls_token); the merge "
                                "space needs the original release (register_tokens, unfolded pos_embed)")
            return layout
    sample = sorted(keys)[:8]
    raise UserError(f"{path}: no encoder found: expected `encoder.*` (DUNE), `backbone.encoder.*` (Multi-HMR) or "
                    f"DINOv2 names (cls_token, pos_embed, blocks.N.*); found {len(keys)} tensors such as {sample}")


def pos_grid(canonical: Mapping[str, torch.Tensor], source: str = "the state dict") -> int:
    """Side M of the square patch-position grid of a canonical state dict (`pos_embed` is `[1, 1+M*M, D]`)."""
    count = canonical["pos_embed"].shape[1] - 1
    side = math.isqrt(count)
    if side * side != count:
        raise UserError(f"{source}: pos_embed holds {count} patch positions, not a square grid")
    return side


def check_same_grid(checkpoints: Mapping[str, Mapping[str, torch.Tensor]]) -> int:
    """The common position grid side of named canonical state dicts; refuse a mismatch, naming each grid."""
    grids = {name: pos_grid(state, name) for name, state in checkpoints.items()}
    if len(set(grids.values())) > 1:
        listed = ", ".join(f"{name}: {side}x{side} ({side * _patch(checkpoints[name])} px)" for name, side in grids.items())
        raise UserError(f"position-embedding grids differ ({listed}); merging needs every checkpoint on the base's "
                        "grid (resample them to it first)")
    return next(iter(grids.values()))


def _patch(canonical: Mapping[str, torch.Tensor]) -> int:
    """Patch size of a canonical state dict, from its patch-embedding kernel."""
    return canonical["patch_embed.proj.weight"].shape[-1]


def export(canonical: Mapping[str, torch.Tensor], layout: str, path: str | Path, template: Release | None = None) -> Path:
    """Write canonical weights as a `dune`, `dinov2`, `multihmr` or `safetensors` release, atomically.

    With a `template` of the same layout (the base's release), every other entry of the template file
    (projectors, teacher norms, mask_token, args, iter, a Multi-HMR head) is kept and only the encoder
    tensors are replaced, so reading a release and exporting it again gives the same file content."""
    if layout not in LAYOUTS:
        raise UserError(f"unknown release layout {layout!r}; expected one of {LAYOUTS}")
    path = Path(path)
    if template is not None and template.layout == layout:
        container = _from_template(canonical, template)
    else:
        container = _fresh(canonical, layout)
    if layout == "safetensors":
        return save_state_dict(path, container, metadata={"format": "pt", "layout": "dinov2-canonical"})
    try:
        with atomic_write(path) as tmp:
            torch.save(container, tmp)
    except pickle.PicklingError as error:
        raise UserError(f"{template.path if template else path}: cannot write this release: its container holds objects "
                        f"read as inert placeholders ({error}); export without a template") from error
    return path


def _from_template(canonical: Mapping[str, torch.Tensor], template: Release) -> Any:
    """The template's container with its encoder tensors replaced by `canonical`, in the file's key order."""
    if set(canonical) != set(template.names):
        extra, lacking = sorted(set(canonical) - set(template.names)), sorted(set(template.names) - set(canonical))
        raise UserError(f"{template.path}: cannot export into this template: the weights add {extra[:5]} and "
                        f"lack {lacking[:5]}")
    state = template.container if template.state_key is None else template.container[template.state_key]
    replaced = {template.names[name]: tensor for name, tensor in canonical.items()}
    new_state = {key: replaced.get(key, value) for key, value in state.items()}
    if template.state_key is None:
        return new_state
    return {**template.container, template.state_key: new_state}


def _fresh(canonical: Mapping[str, torch.Tensor], layout: str) -> Any:
    """A new release container of `layout` holding the encoder only (mask_token zero, as DINOv2 initialises it)."""
    if layout == "safetensors":
        return dict(canonical)
    dim = canonical["cls_token"].shape[-1]
    with_mask = {**canonical, "mask_token": torch.zeros(1, dim, dtype=canonical["cls_token"].dtype)}
    if layout == "dinov2":
        return with_mask
    if layout == "multihmr":
        return {"epoch": 0, "iter": 0, "model_state_dict": {"backbone.encoder." + k: v for k, v in with_mask.items()}}
    model = {"encoder." + _PLAIN_BLOCK.sub(r"blocks.0.\1.", key): value for key, value in with_mask.items()}
    return {"model": model, "args": _dune_args(canonical), "iter": 0}


def _dune_args(canonical: Mapping[str, torch.Tensor]) -> argparse.Namespace:
    """DUNE's `args` for an encoder-only file: image size from the position grid, registers from the weights."""
    patch = _patch(canonical)
    registers = canonical["register_tokens"].shape[1] if "register_tokens" in canonical else 0
    enc_args: dict[str, Any] = {"patch_size": patch, "num_register_tokens": registers}
    arch = _DUNE_ARCHS.get(canonical["cls_token"].shape[-1])
    if arch is not None:
        enc_args["arch"] = arch
    return argparse.Namespace(image_size=pos_grid(canonical) * patch, enc_args=enc_args)
