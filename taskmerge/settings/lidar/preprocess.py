"""Per-scan preprocessing of ScaLR's evaluation pipeline (spec lidar §3; SC `datasets/pc_dataset.py`), written
from the spec: model-independent, so a TAP scan is prepared once and cached.

points (x, y, z, intensity) -> features [(i - mean) / std, x, y, z, ||xyz||] -> 0.1 m voxels (the first point of
each voxel, voxels counted from the scan's minimum corner, kept in sorted voxel order) -> crop to the open FOV box
(1e-4 margin) -> flat cell index per projection -> K+1 nearest kept points (cKDTree; row 0 the point itself) ->
for every original point its nearest kept point (to carry predictions back).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial import cKDTree

from .encoder import ScanBatch, WaffleIronConfig

_PLANES = {0: (1, 2), 1: (0, 2), 2: (0, 1)}  # the axis a projection drops -> the plane it keeps
_CROP_MARGIN = 1e-4


@dataclass(frozen=True)
class Preprocessing:
    """Everything the preprocessing depends on (hash it to key a cache)."""

    intensity_mean: float
    intensity_std: float
    voxel_size: float = 0.1
    fov: tuple[tuple[float, float, float], tuple[float, float, float]] = ((-64.0, -64.0, -8.0), (64.0, 64.0, 8.0))
    grids: tuple[tuple[int, int], ...] = ((256, 256), (256, 32), (256, 32))
    projections: tuple[int, ...] = (2, 1, 0)
    neighbors: int = 16

    @classmethod
    def for_encoder(cls, config: WaffleIronConfig, intensity_mean: float, intensity_std: float) -> Preprocessing:
        """The preprocessing an encoder configuration was trained with, for one dataset's intensity constants."""
        return cls(intensity_mean, intensity_std, config.voxel_size, config.fov, config.grids, config.projections,
                   config.neighbors)


@dataclass(frozen=True)
class PreparedScan:
    """One preprocessed scan: the encoder's input (B = 1), which original points were kept, and for every
    original point the index of its nearest kept point."""

    batch: ScanBatch
    kept: np.ndarray  # [M] indices into the original points
    upsample: np.ndarray  # [N_original] indices into the kept points


def input_features(points: np.ndarray, intensity_mean: float, intensity_std: float) -> np.ndarray:
    """`[N, 8]`: x, y, z, then the 5 input channels (normalised intensity, x, y, z, radius)."""
    xyz = points[:, :3]
    intensity = (points[:, 3:4] - intensity_mean) / intensity_std
    return np.concatenate([xyz, intensity, xyz, np.linalg.norm(xyz, axis=1, keepdims=True)], 1)


def voxel_first_points(xyz: np.ndarray, voxel_size: float) -> np.ndarray:
    """Indices of the first point of every occupied voxel, in sorted voxel order (deterministic, as at eval)."""
    if voxel_size <= 0:
        return np.arange(len(xyz))
    keys = ((xyz - xyz.min(0, keepdims=True)) / voxel_size).astype(int)
    return np.unique(keys, return_index=True, axis=0)[1]


def cell_indices(xyz: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """`[P, M]` flat cell index `row * W + col` of every point on each projection's grid."""
    low, high = np.asarray(prep.fov, dtype=np.float64)
    out = []
    for axis, grid in zip(prep.projections, prep.grids):
        plane = list(_PLANES[axis])
        shape = np.asarray(grid)
        quant = ((xyz[:, plane] - low[plane]) / ((high[plane] - low[plane]) / shape)).astype(int)
        if len(quant) and (quant.min() < 0 or np.any(quant.max(0) >= shape)):
            raise ValueError(f"points outside the field of view {prep.fov} reached the {grid[0]}x{grid[1]} grid")
        out.append(quant[:, 0] * shape[1] + quant[:, 1])
    return np.stack(out) if out else np.zeros((0, len(xyz)), dtype=int)


def preprocess_scan(points: np.ndarray, prep: Preprocessing) -> PreparedScan:
    """Prepare one scan `[N, >=4]` (x, y, z, intensity, ...) for the encoder."""
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] < 4:
        raise ValueError(f"a scan is an [N, >=4] array of x, y, z, intensity; got shape {points.shape}")
    full = input_features(points[:, :4], prep.intensity_mean, prep.intensity_std)
    kept = voxel_first_points(full[:, :3], prep.voxel_size)
    low, high = np.asarray(prep.fov[0]), np.asarray(prep.fov[1])
    xyz = full[kept, :3]
    inside = np.all((xyz > low + _CROP_MARGIN) & (xyz < high - _CROP_MARGIN), axis=1)
    kept = kept[inside]
    pc = full[kept]
    if len(pc) <= prep.neighbors:
        raise ValueError(f"{len(pc)} points left after voxelisation and the FOV crop; more than {prep.neighbors} "
                         "(the neighbour count) are needed")
    tree = cKDTree(pc[:, :3])
    _, neighbors = tree.query(pc[:, :3], k=prep.neighbors + 1)
    _, upsample = tree.query(points[:, :3], k=1)
    batch = ScanBatch(
        features=torch.from_numpy(np.ascontiguousarray(pc[:, 3:].T, dtype=np.float32))[None],
        cell_ind=torch.from_numpy(cell_indices(pc[:, :3], prep).astype(np.int64))[None],
        neighbors=torch.from_numpy(np.ascontiguousarray(neighbors.T, dtype=np.int64))[None],
        valid=torch.ones(1, len(pc), dtype=torch.bool),
        grids=tuple(tuple(int(v) for v in grid) for grid in prep.grids),
    )
    return PreparedScan(batch, kept, upsample.astype(np.int64))
