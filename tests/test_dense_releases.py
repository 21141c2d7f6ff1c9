"""Dense releases: every layout of spec dense §1 read into canonical space and loaded strictly, refusals naming
the file, exact round trips release -> canonical -> release, and the position-grid check."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from taskmerge.errors import UserError
from taskmerge.legacy_pickle import Placeholder
from taskmerge.settings.dense.encoder import DenseViT
from taskmerge.settings.dense.releases import check_same_grid, export, load_canonical, read_release

DIM = 64


@dataclass
class TrainOptions:
    """A non-allow-listed class in a checkpoint's args: weights-only loading refuses it, the fallback reads it."""

    lr: float = 1e-3


def _tiny_canonical(registers: bool = True, grid: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Canonical weights of the spec's tiny ViT/14 (dim 64, depth 3, 56 px), random values."""
    model = DenseViT(embed_dim=DIM, depth=3, num_heads=4, reg_tokens=4 if registers else 0, image_size=grid * 14)
    generator = torch.Generator().manual_seed(seed)
    state = {key: torch.randn(value.shape, generator=generator) for key, value in model.state_dict().items()}
    if registers:
        state["register_tokens"] = state.pop("reg_token")
        state["pos_embed"] = torch.randn(1, 1 + grid * grid, DIM, generator=generator)
    return state


def _chunked(key: str) -> str:
    """DUNE's block_chunks=1 name of a canonical key."""
    return key.replace("blocks.", "blocks.0.", 1) if key.startswith("blocks.") else key


def _dune_file(path: Path, canonical: dict[str, torch.Tensor], prefix: str = "module.") -> Path:
    """A DUNE training checkpoint: chunked encoder, projectors, teacher norms, Namespace args, iter."""
    model = {f"{prefix}encoder.{_chunked(k)}": v for k, v in canonical.items()}
    model[f"{prefix}encoder.mask_token"] = torch.randn(1, DIM)
    model[f"{prefix}projectors.dino2reg_vitlarge_14.fc.weight"] = torch.randn(8, DIM)
    model[f"{prefix}teacher_norms.mast3r_vitlarge_16.mean"] = torch.randn(8)
    args = argparse.Namespace(image_size=56, enc_args={"arch": "vit_base", "num_register_tokens": 4}, seed=0)
    torch.save({"model": model, "args": args, "iter": 1234}, path)
    return path


def _dinov2_file(path: Path, canonical: dict[str, torch.Tensor]) -> Path:
    """A DINOv2 hub state dict (mask_token included)."""
    torch.save({**canonical, "mask_token": torch.randn(1, DIM)}, path)
    return path


def _multihmr_file(path: Path, canonical: dict[str, torch.Tensor], options: Any = None) -> Path:
    """A Multi-HMR checkpoint: encoder under backbone.encoder., a head, Namespace args (holding `options`)."""
    state = {f"backbone.encoder.{k}": v for k, v in {**canonical, "mask_token": torch.randn(1, DIM)}.items()}
    state["mlp_classif.0.weight"] = torch.randn(4, DIM)
    args = argparse.Namespace(backbone="dinov2_vitb14", options=options)
    torch.save({"epoch": 3, "iter": 99, "model_state_dict": state, "args": args}, path)
    return path


def _assert_same(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    """Same names, same tensors, bit for bit."""
    assert left.keys() == right.keys()
    for key in left:
        assert left[key].dtype == right[key].dtype and torch.equal(left[key], right[key]), key


@pytest.mark.parametrize("layout", ["dune", "dune_compiled", "dinov2", "dinov2_noreg", "multihmr",
                                    "multihmr_legacy", "safetensors", "safetensors_dune_keys"])
def test_every_layout_reads_and_loads(tmp_path: Path, layout: str) -> None:
    """Unpickle (weights-only, or the restricted unpickler for a non-allow-listed class) -> detect -> map ->
    strict load into the encoder; the canonical tensors are the saved ones."""
    registers = layout != "dinov2_noreg"
    canonical = _tiny_canonical(registers)
    writers = {
        "dune": lambda: _dune_file(tmp_path / "dune.pth", canonical),
        "dune_compiled": lambda: _dune_file(tmp_path / "dune.pth", canonical, prefix="module._orig_mod."),
        "dinov2": lambda: _dinov2_file(tmp_path / "dinov2_reg4.pth", canonical),
        "dinov2_noreg": lambda: _dinov2_file(tmp_path / "dinov2.pth", canonical),
        "multihmr": lambda: _multihmr_file(tmp_path / "multihmr.pt", canonical),
        "multihmr_legacy": lambda: _multihmr_file(tmp_path / "multihmr.pt", canonical, TrainOptions()),
        "safetensors": lambda: save_file(canonical, str(tmp_path / "w.safetensors")) or tmp_path / "w.safetensors",
        "safetensors_dune_keys": lambda: save_file({f"encoder.{_chunked(k)}": v for k, v in canonical.items()},
                                                   str(tmp_path / "d.safetensors")) or tmp_path / "d.safetensors",
    }
    release = read_release(writers[layout]())
    expected = {"dune_compiled": "dune", "dinov2_noreg": "dinov2", "multihmr_legacy": "multihmr",
                "safetensors_dune_keys": "safetensors"}
    assert release.layout == expected.get(layout, layout)
    _assert_same(release.canonical, canonical)
    encoder = DenseViT(embed_dim=DIM, depth=3, num_heads=4, reg_tokens=4 if registers else 0, image_size=56)
    encoder.load_state_dict(encoder.encoder_weights(release.canonical), strict=True)


def test_dune_mast3r_file_is_refused(tmp_path: Path) -> None:
    """A DUNE-MASt3R checkpoint holds a decoder only: the error names the file and says so."""
    path = tmp_path / "dune_mast3r_decoder.pth"
    torch.save({"model": {"dec_blocks.0.attn.qkv.weight": torch.randn(3, 3)}, "dune_backbone_name": "dune_vitbase14",
                "mast3r_model_str": "AsymmetricMASt3R(...)"}, path)
    with pytest.raises(UserError, match=rf"{path.name}.*DUNE-MASt3R.*decoder"):
        read_release(path)


@pytest.mark.parametrize("content", ["projectors", "not_a_dict", "timm"])
def test_file_without_encoder_is_refused(tmp_path: Path, content: str) -> None:
    """No encoder (only projectors), a pickled list, or a folded timm state dict: an error naming file and finding."""
    path = tmp_path / f"{content}.pth"
    objects: dict[str, Any] = {
        "projectors": {"model": {"projectors.x.weight": torch.randn(2, 2)}, "args": argparse.Namespace(), "iter": 0},
        "not_a_dict": [torch.randn(2)],
        "timm": {"cls_token": torch.randn(1, 1, DIM), "reg_token": torch.randn(1, 4, DIM),
                 "pos_embed": torch.randn(1, 16, DIM)},
    }
    torch.save(objects[content], path)
    messages = {"projectors": "no encoder found.*projectors.x.weight", "not_a_dict": "found a pickled list",
                "timm": "timm state dict"}
    with pytest.raises(UserError, match=rf"{path.name}.*{messages[content]}"):
        read_release(path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_damaged_file_is_refused(tmp_path: Path, suffix: str) -> None:
    """A truncated checkpoint is a UserError naming the file, not a traceback from the loader."""
    canonical = _tiny_canonical()
    path = tmp_path / f"broken{suffix}"
    if suffix == ".pth":
        _dune_file(path, canonical)
    else:
        save_file(canonical, str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match=rf"{path.name}.*(truncated|damaged|cannot read)"):
        read_release(path)
    with pytest.raises(UserError, match="not found"):
        read_release(tmp_path / "missing.pth")
    (tmp_path / "weights.npz").write_bytes(b"PK")
    with pytest.raises(UserError, match=r"weights\.npz: unsupported checkpoint suffix"):
        read_release(tmp_path / "weights.npz")


def _raw(path: Path) -> Any:
    """A release file's top-level object, loaded as plainly as possible."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    with torch.serialization.safe_globals([argparse.Namespace, TrainOptions]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_object(left: Any, right: Any) -> None:
    """Equal containers, exactly equal tensors, in the same key order."""
    if isinstance(left, torch.Tensor):
        assert torch.equal(left, right) and left.dtype == right.dtype
    elif isinstance(left, dict):
        assert list(left) == list(right)
        for key in left:
            _assert_same_object(left[key], right[key])
    else:
        assert left == right


@pytest.mark.parametrize("layout", ["dune", "dinov2", "multihmr", "safetensors"])
def test_round_trip_through_template_is_exact(tmp_path: Path, layout: str) -> None:
    """release -> canonical -> release with the release as template rewrites the same content; a merged
    encoder replaces only the encoder tensors."""
    canonical = _tiny_canonical()
    writers = {"dune": lambda p: _dune_file(p, canonical), "dinov2": lambda p: _dinov2_file(p, canonical),
               "multihmr": lambda p: _multihmr_file(p, canonical),
               "safetensors": lambda p: save_file(canonical, str(p)) or p}
    suffix = ".safetensors" if layout == "safetensors" else ".pth"
    original = writers[layout](tmp_path / f"original{suffix}")
    release = read_release(original)
    again = export(release.canonical, layout, tmp_path / f"again{suffix}", template=release)
    _assert_same_object(_raw(original), _raw(again))
    merged = {key: value + 1 for key, value in release.canonical.items()}
    rewritten = read_release(export(merged, layout, tmp_path / f"merged{suffix}", template=release))
    _assert_same(rewritten.canonical, merged)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


@pytest.mark.parametrize("layout", ["dune", "dinov2", "multihmr", "safetensors"])
def test_fresh_export_reads_back(tmp_path: Path, layout: str) -> None:
    """Without a template each layout is written in its release form and reads back to the same canonical dict."""
    canonical = _tiny_canonical()
    path = export(canonical, layout, tmp_path / ("out.safetensors" if layout == "safetensors" else "out.pth"))
    release = read_release(path)
    _assert_same(release.canonical, canonical)
    raw = _raw(path)
    if layout == "dune":
        assert raw["args"].image_size == 56 and raw["args"].enc_args["num_register_tokens"] == 4
        assert "encoder.blocks.0.2.mlp.fc1.weight" in raw["model"] and "encoder.mask_token" in raw["model"]
    if layout == "safetensors":
        assert "mask_token" not in raw and set(raw) == set(canonical)
    assert load_canonical(path).keys() == canonical.keys()


def test_export_refuses_bad_requests(tmp_path: Path) -> None:
    """An unknown layout, or weights whose keys differ from the template's, are refused by name."""
    canonical = _tiny_canonical()
    release = read_release(_dune_file(tmp_path / "base.pth", canonical))
    with pytest.raises(UserError, match="unknown release layout 'timm_folded'"):
        export(canonical, "timm_folded", tmp_path / "x.pth")
    without_registers = {k: v for k, v in canonical.items() if k != "register_tokens"}
    with pytest.raises(UserError, match=r"base\.pth.*lack \['register_tokens'\]"):
        export(without_registers, "dune", tmp_path / "x.pth", template=release)


def test_template_with_placeholders_is_refused(tmp_path: Path) -> None:
    """A template read through the restricted unpickler holds inert placeholders: exporting into it is refused."""
    release = read_release(_multihmr_file(tmp_path / "multihmr.pt", _tiny_canonical(), TrainOptions()))
    assert isinstance(release.container["args"].options, Placeholder)
    with pytest.raises(UserError, match=r"multihmr\.pt: cannot write this release.*placeholders"):
        export(release.canonical, "multihmr", tmp_path / "out.pt", template=release)
    assert not (tmp_path / "out.pt").exists()


def test_position_grids_must_match(tmp_path: Path) -> None:
    """Checkpoints on different position grids (448 vs 336 px) are refused, naming each grid; equal grids pass."""
    base, other = _tiny_canonical(grid=4), _tiny_canonical(grid=5, seed=1)
    assert check_same_grid({"base.pth": base, "ft.pth": _tiny_canonical(seed=2)}) == 4
    with pytest.raises(UserError, match=r"base\.pth: 4x4 \(56 px\), ft\.pth: 5x5 \(70 px\)"):
        check_same_grid({"base.pth": base, "ft.pth": other})
    with pytest.raises(UserError, match=r"odd\.pth: pos_embed holds 15 patch positions"):
        check_same_grid({"base.pth": base, "odd.pth": {**base, "pos_embed": torch.randn(1, 16, DIM)}})
