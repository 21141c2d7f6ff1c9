"""Per-scan preprocessing equals ScaLR's `val`-phase `PCDataset.__getitem__` on the fixtures' raw scans (features,
cell indices, neighbours, upsampling indices), and raw scans -> preprocess -> collate -> encoder gives the
reference's tokens."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from taskmerge.settings.lidar.encoder import ScanBatch, WaffleIronConfig, WaffleIronEncoder
from taskmerge.settings.lidar.preprocess import Preprocessing, preprocess_scan

FIXTURE = Path(__file__).parent / "fixtures" / "lidar" / "wi_tiny"


@pytest.fixture(scope="module")
def reference() -> tuple[dict[str, torch.Tensor], WaffleIronConfig, Preprocessing]:
    io = load_file(f"{FIXTURE}_io.safetensors")
    with safe_open(f"{FIXTURE}_io.safetensors", "pt") as handle:
        meta = json.loads(handle.metadata()["config"])
    config = WaffleIronConfig(input_channels=5, channels=meta["channels"], depth=meta["depth"],
                              grids=tuple(tuple(g) for g in meta["grids"]), projections=tuple(meta["projections"]),
                              fov=tuple(tuple(b) for b in meta["fov"]), neighbors=meta["neighbors"],
                              voxel_size=meta["voxel_size"])
    return io, config, Preprocessing.for_encoder(config, *meta["intensity_mean_std"])


@pytest.mark.parametrize("index", [0, 1])
def test_scan_matches_reference(reference, index: int) -> None:
    io, _, prep = reference
    raw = io[f"scan{index}.raw"].numpy()
    scan = preprocess_scan(raw, prep)
    assert len(scan.kept) < len(raw)  # voxels merged and points cropped
    assert torch.equal(scan.batch.cell_ind[0], io[f"scan{index}.cell_ind"].long())
    assert torch.equal(scan.batch.neighbors[0], io[f"scan{index}.neighbors"].long())
    assert torch.equal(scan.batch.features[0], io[f"scan{index}.feat"])
    assert np.array_equal(scan.upsample, io[f"scan{index}.upsample"].numpy())
    assert np.array_equal(raw[scan.kept, :3], scan.batch.features[0, 1:4].T.numpy())


def test_raw_scans_to_reference_tokens(reference) -> None:
    io, config, prep = reference
    encoder = WaffleIronEncoder(config).eval()
    encoder.load_state_dict(encoder.encoder_weights(load_file(f"{FIXTURE}_weights.safetensors")), strict=True)
    batch = ScanBatch.collate([preprocess_scan(io[f"scan{i}.raw"].numpy(), prep).batch for i in range(2)])
    with torch.no_grad():
        tokens = encoder.features(batch, "tokens")
    valid = batch.valid
    assert (tokens[valid] - io["out.tokens"].transpose(1, 2)[valid]).abs().max() <= 1e-5


def test_too_few_points_and_bad_shapes(reference) -> None:
    _, _, prep = reference
    with pytest.raises(ValueError, match="more than 6"):
        preprocess_scan(np.zeros((3, 4), dtype=np.float32) + [[0.5, 0.5, 0.5, 1.0]], prep)
    with pytest.raises(ValueError, match=r"\[N, >=4\]"):
        preprocess_scan(np.zeros((10, 3), dtype=np.float32), prep)
