"""WaffleIron encoder: parity with the reference code (golden fixtures of scripts/parity/make_lidar_fixtures.py:
valeoai/WaffleIron v0.3.1 and the ScaLR+ copy with GELU), the feature contract on padded batches, and the
full-size WI-48-768 key set of spec lidar §1 (built on the meta device)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from taskmerge.settings.lidar.encoder import (
    CONFIGS,
    ScanBatch,
    WaffleIronConfig,
    WaffleIronEncoder,
    create_lidar_encoder,
    encoder_config,
    parameter_count,
)

FIXTURES = Path(__file__).parent / "fixtures" / "lidar"
TOLERANCE = 1e-5


def _fixture(name: str) -> tuple[WaffleIronEncoder, dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """Our encoder loaded strictly with the reference weights, the fixture's tensors and its configuration."""
    weights = load_file(str(FIXTURES / f"{name}_weights.safetensors"))
    io = load_file(str(FIXTURES / f"{name}_io.safetensors"))
    with safe_open(str(FIXTURES / f"{name}_io.safetensors"), "pt") as handle:
        meta = json.loads(handle.metadata()["config"])
    config = WaffleIronConfig(input_channels=meta["input_channels"], channels=meta["channels"], depth=meta["depth"],
                              grids=tuple(tuple(grid) for grid in meta["grids"]), projections=tuple(meta["projections"]),
                              fov=tuple(tuple(bound) for bound in meta["fov"]), neighbors=meta["neighbors"],
                              activation=meta["activation"])
    encoder = WaffleIronEncoder(config)
    encoder.load_state_dict(encoder.encoder_weights(weights), strict=True)
    return encoder.eval(), weights, io, meta


def _batch(io: dict[str, torch.Tensor]) -> ScanBatch:
    return ScanBatch(io["batch.feat"], io["batch.cell_ind"].long(), io["batch.neighbors"].long(), io["batch.occupied"])


@pytest.mark.parametrize("name", ["wi_tiny", "scalr_plus_tiny"])
def test_tokens_match_reference(name: str) -> None:
    """Per-point backbone tokens equal the reference's to <= 1e-5 on every real point; padded points are 0."""
    encoder, _, io, _ = _fixture(name)
    batch = _batch(io)
    with torch.no_grad():
        tokens = encoder.features(batch, "tokens")
    expected = io["out.tokens"].transpose(1, 2)
    assert tokens.shape == expected.shape
    valid = batch.valid
    assert (tokens[valid] - expected[valid]).abs().max() <= TOLERANCE
    assert expected[valid].abs().max() > 1.0  # the fixture is not trivially small
    assert torch.all(tokens[~valid] == 0)


def test_pooled_and_head_match_reference() -> None:
    """`pooled` is the mean over each scan's real points; the reference's `classif` on our tokens gives its logits."""
    encoder, weights, io, _ = _fixture("wi_tiny")
    batch = _batch(io)
    with torch.no_grad():
        pooled = encoder.features(batch, "pooled")
        tokens = encoder.features(batch, "tokens")
    expected = io["out.tokens"].transpose(1, 2)
    for index in range(len(batch)):
        real = expected[index][batch.valid[index]]
        assert (pooled[index] - real.mean(0)).abs().max() <= TOLERANCE
    logits = torch.nn.functional.conv1d(tokens.transpose(1, 2), weights["classif.weight"], weights["classif.bias"])
    valid = batch.valid.unsqueeze(1).expand_as(logits)
    assert (logits[valid] - io["out.logits"][valid]).abs().max() <= TOLERANCE


def test_collate_matches_reference_padding_and_padding_changes_nothing() -> None:
    """`ScanBatch.collate` pads as the reference's `Collate`; a scan alone gives the tokens it gets in the batch."""
    encoder, _, io, _ = _fixture("wi_tiny")
    scans = [ScanBatch(io[f"scan{i}.feat"][None], io[f"scan{i}.cell_ind"][None].long(), io[f"scan{i}.neighbors"][None].long(),
                       torch.ones(1, io[f"scan{i}.feat"].shape[-1], dtype=torch.bool)) for i in range(2)]
    collated, reference = ScanBatch.collate(scans), _batch(io)
    for field in ("features", "cell_ind", "neighbors", "valid"):
        assert torch.equal(getattr(collated, field), getattr(reference, field)), field
    with torch.no_grad():
        together = encoder.features(collated, "tokens")
        for index, scan in enumerate(scans):
            alone = encoder.features(scan, "tokens")[0]
            assert (alone - together[index, : alone.shape[0]]).abs().max() <= TOLERANCE
    with pytest.raises(ValueError, match="num_points"):
        ScanBatch.collate(scans, num_points=10)


def test_batch_checks_and_device_move() -> None:
    encoder, _, io, _ = _fixture("wi_tiny")
    batch = _batch(io)
    moved = batch.to("cpu")
    assert moved.cell_ind.dtype == torch.long and moved.valid.dtype == torch.bool and len(moved) == 2
    with pytest.raises(ValueError, match="cell_ind"):
        ScanBatch(batch.features, batch.cell_ind[:, :, :-1], batch.neighbors, batch.valid)
    wrong_grid = ScanBatch(batch.features, batch.cell_ind * 100, batch.neighbors, batch.valid)
    with pytest.raises(ValueError, match="outside the 16x16 grid"):
        encoder.features(wrong_grid, "tokens")
    with pytest.raises(ValueError, match="projections"):
        encoder.features(ScanBatch(batch.features, batch.cell_ind[:, :2], batch.neighbors, batch.valid), "tokens")
    with pytest.raises(ValueError, match="feature kind"):
        encoder.features(batch, "cls")


def test_drop_path_only_in_training() -> None:
    _, weights, io, _ = _fixture("wi_tiny")
    encoder = create_lidar_encoder("waffleiron_tiny", channels=16, grids=[[16, 16], [16, 4], [16, 4]], neighbors=6,
                                   drop_path=0.5)
    encoder.load_state_dict(encoder.encoder_weights(weights), strict=True)
    batch = _batch(io)
    with torch.no_grad():
        evaluated = encoder.eval().features(batch, "tokens")
        torch.manual_seed(0)
        trained = encoder.train().features(batch, "tokens")
    valid = batch.valid
    assert (evaluated[valid] - io["out.tokens"].transpose(1, 2)[valid]).abs().max() <= TOLERANCE
    assert not torch.allclose(trained, evaluated)


def test_weights_round_trip_and_gelu_option() -> None:
    """`encoder_weights` drops the `classif` head and `canonical_weights` is its inverse; GELU changes the output."""
    encoder, weights, io, _ = _fixture("wi_tiny")
    kept = encoder.encoder_weights(weights)
    assert sorted(set(weights) - set(kept)) == ["classif.bias", "classif.weight"]
    canonical = encoder.canonical_weights()
    assert set(canonical) == set(kept) and all(torch.equal(canonical[key], kept[key]) for key in kept)
    gelu = WaffleIronEncoder(encoder_config("waffleiron_tiny", channels=16, grids=[[16, 16], [16, 4], [16, 4]],
                                            neighbors=6, activation="gelu")).eval()
    gelu.load_state_dict(kept, strict=True)
    with torch.no_grad():
        assert not torch.allclose(gelu.features(_batch(io)), encoder.features(_batch(io)))
    with pytest.raises(ValueError, match="activation"):
        encoder_config("waffleiron_tiny", activation="silu")
    with pytest.raises(TypeError, match="unknown WaffleIron options"):
        encoder_config("waffleiron_tiny", width=3)


def test_full_size_key_set_on_meta() -> None:
    """WI-48-768 (spec lidar §1): 693 encoder keys (700 with the downstream head), 59,435,540 parameters
    (embedding 1,780,244; per layer 1,183,488 + 17,664), BatchNorms only in the embedding."""
    assert CONFIGS["waffleiron_768"].grids == ((256, 256), (256, 32), (256, 32))
    with torch.device("meta"):
        encoder = create_lidar_encoder("waffleiron_768")
    state = encoder.state_dict()
    assert len(state) == 693
    params = dict(encoder.named_parameters())
    assert sum(p.numel() for p in params.values()) == 59_435_540 == parameter_count(encoder.config)["total"]
    assert sum(p.numel() for key, p in params.items() if key.startswith("embed.")) == 1_780_244
    layer = {mix: sum(p.numel() for key, p in params.items() if key.startswith(f"waffleiron.{mix}.7."))
             for mix in ("channel_mix", "spatial_mix")}
    assert layer == {"channel_mix": 1_183_488, "spatial_mix": 17_664}
    buffers = [key for key, _ in encoder.named_buffers()]
    assert len(buffers) == 9 and all(key.startswith("embed.") for key in buffers)
    assert state["embed.norm.num_batches_tracked"].dtype == torch.int64
    shapes = {
        "embed.norm.weight": (5,), "embed.conv1.weight": (768, 5, 1), "embed.conv2.0.running_var": (5,),
        "embed.conv2.1.weight": (768, 5, 1, 1), "embed.conv2.2.weight": (768,), "embed.conv2.4.weight": (768, 768, 1, 1),
        "embed.final.weight": (768, 1536, 1), "embed.final.bias": (768,),
        "waffleiron.channel_mix.47.norm.weight": (768,), "waffleiron.channel_mix.47.mlp.0.weight": (768, 768, 1),
        "waffleiron.channel_mix.47.mlp.2.bias": (768,), "waffleiron.channel_mix.47.scale.weight": (768, 1, 1),
        "waffleiron.spatial_mix.47.ffn.0.weight": (768, 1, 3, 3), "waffleiron.spatial_mix.47.ffn.2.bias": (768,),
        "waffleiron.spatial_mix.47.scale.weight": (768, 1, 1),
    }
    assert {key: tuple(state[key].shape) for key in shapes} == shapes
    assert "waffleiron.spatial_mix.48.norm.weight" not in state and not any(key.startswith("classif.") for key in state)
    assert [encoder.waffleiron.spatial_mix[d].grid for d in range(4)] == [(256, 256), (256, 32), (256, 32), (256, 256)]
