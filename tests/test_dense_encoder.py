"""Dense encoders: parity with the reference DUNE / DINOv2 code (golden fixtures), the feature contract,
position-embedding resampling, the canonical fold and the full ViT-B/14 key sets on the meta device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from taskmerge.merging import merge
from taskmerge.settings.dense.encoder import CONFIGS, DenseViT, create_dense_encoder, fold_canonical, resample_grid
from taskmerge.settings.dense.releases import canonicalize, read_release

FIXTURES = Path(__file__).parent / "fixtures" / "dense"
MODELS = ["dune_tiny", "dinov2_tiny", "dinov2_reg_tiny"]
SIZES = ["native", "resampled", "nonsquare"]
TOLERANCE = 1e-5


def _fixture(name: str) -> tuple[DenseViT, dict[str, torch.Tensor]]:
    """The encoder loaded from a reference model's native-layout weights, and that model's inputs/outputs."""
    io_path = FIXTURES / f"{name}_io.safetensors"
    with safe_open(str(io_path), "pt") as handle:
        config = json.loads(handle.metadata()["config"])
    encoder = DenseViT(embed_dim=config["embed_dim"], depth=config["depth"], num_heads=config["num_heads"],
                       reg_tokens=config["reg_tokens"], image_size=config["image_size"],
                       interpolation=config["interpolation"], mlp_ratio=config["mlp_ratio"]).eval()
    canonical = read_release(FIXTURES / f"{name}_weights.safetensors").canonical
    encoder.load_state_dict(encoder.encoder_weights(canonical), strict=True)
    return encoder, {key: value.float() for key, value in load_file(str(io_path)).items()}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("size", SIZES)
def test_matches_reference_code(name: str, size: str) -> None:
    """Patch tokens, CLS and intermediates (norm off and on) equal the reference at native, resampled and
    non-square sizes."""
    encoder, io = _fixture(name)
    images = io[f"{size}.images"]
    with torch.no_grad():
        torch.testing.assert_close(encoder.features(images, "tokens"), io[f"{size}.x_norm_patchtokens"],
                                   atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(encoder.features(images, "pooled"), io[f"{size}.x_norm_clstoken"],
                                   atol=TOLERANCE, rtol=0)
        for norm in (False, True):
            for layer, (patches, cls) in zip([0, 1, 2], encoder.intermediate(images, [0, 1, 2], norm=norm)):
                torch.testing.assert_close(patches, io[f"{size}.layer{layer}.norm{int(norm)}.patches"],
                                           atol=TOLERANCE, rtol=0)
                torch.testing.assert_close(cls, io[f"{size}.layer{layer}.norm{int(norm)}.cls"], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("name, timm_name, prefix, timm_rule_differs", [
    ("dune_tiny", "vit_base_patch14_reg4_dinov2", 5, True),
    ("dinov2_tiny", "vit_base_patch14_dinov2", 1, True),
    ("dinov2_reg_tiny", "vit_base_patch14_reg4_dinov2", 5, False),  # timm's rule is DINOv2-reg's
])
def test_fixtures_tell_rules_apart(name: str, timm_name: str, prefix: int, timm_rule_differs: bool) -> None:
    """timm's own dynamic resampling matches the reference at the native size, and off it only for DINOv2-reg."""
    encoder, io = _fixture(name)
    timm_model = timm.create_model(timm_name, img_size=56, embed_dim=16, depth=3, num_heads=2,
                                   num_classes=0, dynamic_img_size=True).eval()
    timm_model.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        native = timm_model.forward_features(io["native.images"])[:, prefix:]
        resampled = timm_model.forward_features(io["resampled.images"])[:, prefix:]
    torch.testing.assert_close(native, io["native.x_norm_patchtokens"], atol=TOLERANCE, rtol=0)
    assert ((resampled - io["resampled.x_norm_patchtokens"]).abs().max() > 1e-3) == timm_rule_differs


def _tiny(reg_tokens: int = 4, **kwargs) -> DenseViT:
    """The spec's tiny test model: dim 64, depth 3, 56 px."""
    torch.manual_seed(0)
    return DenseViT(embed_dim=64, depth=3, num_heads=4, reg_tokens=reg_tokens, image_size=56, **kwargs).eval()


def test_feature_contract_shapes() -> None:
    """tokens [B, N, D] without CLS and registers, pooled [B, D], intermediate maps [B, D, h, w]; grid attributes."""
    encoder = _tiny()
    assert (encoder.embed_dim, encoder.patch_size, encoder.grid_size) == (64, 14, (4, 4))
    images = torch.randn(2, 3, 42, 70)
    with torch.no_grad():
        assert encoder.features(images, "tokens").shape == (2, 15, 64)
        assert encoder.features(images, "pooled").shape == (2, 64)
        (patches, cls), = encoder.intermediate(images, [-1], norm=True, with_cls=False)
        tokens = encoder.features(images, "tokens")
    assert patches.shape == (2, 64, 3, 5) and cls is None
    torch.testing.assert_close(patches.flatten(2).transpose(1, 2), tokens)
    with pytest.raises(ValueError, match="feature kind"):
        encoder.features(images, "cls")
    with pytest.raises(ValueError, match="layers"):
        encoder.intermediate(images, [3])


def test_position_cache_follows_weights() -> None:
    """The per-grid cache is reused, refreshed when pos_embed is overwritten or replaced (a new merge loaded),
    and bypassed when gradients flow to pos_embed."""
    encoder = _tiny()
    images = torch.randn(1, 3, 70, 70)
    with torch.no_grad():
        first = encoder.features(images)
        assert (5, 5) in encoder._pos_cache
        encoder.pos_embed.mul_(2)
        doubled = encoder.features(images)
        encoder.pos_embed.div_(2)
        torch.testing.assert_close(encoder.features(images), first)
        encoder.pos_embed = torch.nn.Parameter(encoder.pos_embed * 2)
        torch.testing.assert_close(encoder.features(images), doubled)
    assert not torch.allclose(first, doubled)
    encoder.features(images).sum().backward()
    assert encoder.pos_embed.grad is not None and encoder.pos_embed.grad.abs().sum() > 0


def test_resample_rules() -> None:
    """Identity at the native grid; the 'dinov2' rule differs from 'dinov2_reg' elsewhere; non-square grids."""
    patch_pos = torch.randn(1, 16, 8)
    assert resample_grid(patch_pos, (4, 4), "dinov2") is patch_pos
    offset, antialias = resample_grid(patch_pos, (3, 5), "dinov2"), resample_grid(patch_pos, (3, 5), "dinov2_reg")
    assert offset.shape == antialias.shape == (1, 15, 8)
    assert not torch.allclose(offset, antialias)
    with pytest.raises(ValueError, match="interpolation"):
        DenseViT(embed_dim=64, depth=1, num_heads=4, image_size=56, interpolation="timm")


def _canonical_like(model: torch.nn.Module, reg_tokens: int) -> dict[str, torch.Tensor]:
    """A canonical (unfolded, DINOv2-named) state dict with random values for a DenseViT's architecture."""
    state = {key: torch.randn_like(value) for key, value in model.state_dict().items()}
    if reg_tokens:
        state["register_tokens"] = state.pop("reg_token")
        dim = state["pos_embed"].shape[-1]
        state["pos_embed"] = torch.randn(1, state["pos_embed"].shape[1] + 1, dim)
    return state


def test_fold_matches_timm_converter() -> None:
    """encoder_weights equals timm's own DINOv2 converter (`_convert_dinov2`) and loads strictly."""
    from timm.models.vision_transformer import _convert_dinov2

    encoder = _tiny()
    canonical = _canonical_like(encoder, 4)
    canonical_with_mask = {**canonical, "mask_token": torch.zeros(1, 64)}
    ours = encoder.encoder_weights(canonical_with_mask)
    theirs = _convert_dinov2(dict(canonical_with_mask), encoder)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    encoder.load_state_dict(ours, strict=True)
    with pytest.raises(KeyError, match="register_tokens"):
        fold_canonical(canonical, with_registers=False)


def test_merge_before_fold() -> None:
    """TIES in canonical space differs from TIES after the fold; task arithmetic commutes with it."""
    encoder = _tiny()
    base = _canonical_like(encoder, 4)
    tuned = [{key: value + 0.1 * torch.randn_like(value) for key, value in base.items()} for _ in range(3)]
    fold = encoder.encoder_weights
    ties_before = fold(merge("ties", base, tuned, k=20, alpha=1.0))
    ties_after = merge("ties", fold(base), [fold(t) for t in tuned], k=20, alpha=1.0)
    assert not torch.allclose(ties_before["cls_token"], ties_after["cls_token"])
    ta_before = fold(merge("ta", base, tuned, alpha=0.3))
    ta_after = merge("ta", fold(base), [fold(t) for t in tuned], alpha=0.3)
    for key in ta_before:
        torch.testing.assert_close(ta_before[key], ta_after[key], atol=1e-6, rtol=0)


def _meta_canonical(layout: str) -> dict[str, torch.Tensor]:
    """Full ViT-B/14 release key sets on the meta device: DUNE 448 (176 `encoder.*`, chunked) or DINOv2 518 (175)."""
    grid, blocks = (32, "blocks.0.{i}.") if layout == "dune" else (37, "blocks.{i}.")
    dim, meta = 768, torch.device("meta")
    state = {"cls_token": (1, 1, dim), "pos_embed": (1, 1 + grid * grid, dim), "mask_token": (1, dim),
             "patch_embed.proj.weight": (dim, 3, 14, 14), "patch_embed.proj.bias": (dim,),
             "norm.weight": (dim,), "norm.bias": (dim,)}
    if layout == "dune":
        state["register_tokens"] = (1, 4, dim)
    block = {"norm1.weight": (dim,), "norm1.bias": (dim,), "attn.qkv.weight": (3 * dim, dim), "attn.qkv.bias": (3 * dim,),
             "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,), "ls1.gamma": (dim,), "norm2.weight": (dim,),
             "norm2.bias": (dim,), "mlp.fc1.weight": (4 * dim, dim), "mlp.fc1.bias": (4 * dim,),
             "mlp.fc2.weight": (dim, 4 * dim), "mlp.fc2.bias": (dim,), "ls2.gamma": (dim,)}
    for i in range(12):
        state.update({blocks.format(i=i) + key: shape for key, shape in block.items()})
    prefix = "encoder." if layout == "dune" else ""
    return {prefix + key: torch.empty(shape, device=meta) for key, shape in state.items()}


@pytest.mark.parametrize("layout, name, timm_name, size", [
    ("dune", "dune_vitb14", "vit_base_patch14_reg4_dinov2", 448),
    ("dinov2", "dinov2_vitb14", "vit_base_patch14_dinov2", 518),
])
def test_full_key_sets_on_meta(layout: str, name: str, timm_name: str, size: int) -> None:
    """176 DUNE / 175 DINOv2 release tensors map and fold onto exactly timm's model (keys and shapes), and onto ours."""
    release = _meta_canonical(layout)
    assert len(release) == (176 if layout == "dune" else 175)
    canonical, _, found = canonicalize(release, f"{name}.pth")
    assert found == layout and "mask_token" not in canonical
    with torch.device("meta"):
        reference = timm.create_model(timm_name, img_size=size, num_classes=0)
        ours = create_dense_encoder(name, image_size=448)
    folded = ours.encoder_weights(canonical)
    for model in (reference, ours):
        expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
        assert {key: tuple(value.shape) for key, value in folded.items()} == expected
    assert ours.grid_size == (32, 32)


def test_named_configs() -> None:
    """Every named config builds on the meta device with its registers and pos-embed rule."""
    with torch.device("meta"):
        for name, config in CONFIGS.items():
            encoder = create_dense_encoder(name, image_size=336)
            assert encoder.num_reg_tokens == config.reg_tokens and encoder.interpolation == config.interpolation
            assert encoder.grid_size == (24, 24)
    with pytest.raises(KeyError, match="unknown dense encoder"):
        create_dense_encoder("dune_vitl14")
