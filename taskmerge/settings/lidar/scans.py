"""A split of LiDAR scans as encoder inputs: each scan read by its dataset's reader, preprocessed (spec lidar §3,
eval pipeline: deterministic voxels, no point cap, no augmentation) and given TAP's probe points.

Preprocessing is model-independent, so a scan is prepared once per process (a bounded memo) and shared by every
candidate's TAP and every decoder. The probe points are a seeded subset of a scan's kept points, the same for every
encoder, so the teachers' cached features hold `probe_points` tokens per scan instead of every point.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, replace
from typing import Any, Protocol, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .encoder import ScanBatch
from .preprocess import Preprocessing, preprocess_scan
from .probe import PointLabels

MEMO_SCANS = 1024  # prepared scans kept in memory per split (TAP uses 128 per task)


class ScanReader(Protocol):
    """What a dataset reader offers: its scans' raw points `[N, 4]` (x, y, z, intensity) and train ids `[N]`."""

    def __len__(self) -> int: ...

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]: ...

    def description(self) -> dict[str, Any]: ...


def holdout(length: int, fraction: float) -> tuple[list[int], list[int]]:
    """(kept, held out) indices of a train split: every k-th scan held out as validation (k = 1 / fraction)."""
    step = max(round(1 / fraction), 2)
    held = set(range(step - 1, length, step))
    return [i for i in range(length) if i not in held], sorted(held)


def probe_indices(kept: int, size: int, seed: int, scan: int) -> np.ndarray:
    """`size` of a scan's `kept` points drawn with a seed of (seed, scan): without replacement when it has that
    many, else every point then a seeded draw of the rest with replacement (an unbiased per-point mean either way)."""
    rng = np.random.default_rng([seed, scan])
    if kept >= size:
        return np.sort(rng.choice(kept, size, replace=False))
    return np.concatenate([np.arange(kept), rng.integers(0, kept, size - kept)])


class PreparedScans(Dataset):
    """Items `(ScanBatch of one scan, with probe points; PointLabels)` of one split, prepared on first use."""

    def __init__(self, reader: ScanReader, prep: Preprocessing, probe_points: int, seed: int) -> None:
        self.reader, self.prep, self.probe_points, self.seed = reader, prep, probe_points, seed
        self._memo: OrderedDict[int, tuple[ScanBatch, PointLabels]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> tuple[ScanBatch, PointLabels]:
        if index in self._memo:
            self._memo.move_to_end(index)
            return self._memo[index]
        points, labels = self.reader.read(index)
        prepared = preprocess_scan(points, self.prep)
        probe = probe_indices(len(prepared.kept), self.probe_points, self.seed, index)
        item = (replace(prepared.batch, probe=torch.from_numpy(probe)[None]),
                PointLabels(torch.from_numpy(np.asarray(labels, dtype=np.int64)), torch.from_numpy(prepared.kept),
                            torch.from_numpy(prepared.upsample)))
        self._memo[index] = item
        if len(self._memo) > MEMO_SCANS:
            self._memo.popitem(last=False)
        return item

    def description(self) -> dict[str, Any]:
        """What a cache key hashes: the reader's split, the preprocessing and the probe points' size and seed."""
        return {**self.reader.description(), "preprocessing": asdict(self.prep), "probe_points": self.probe_points,
                "probe_seed": self.seed}


def collate_scans(items: Sequence[tuple[ScanBatch, PointLabels]]) -> tuple[ScanBatch, list[PointLabels]]:
    """Scans zero-padded into one batch (the reference's collation), their labels as a list."""
    return ScanBatch.collate([batch for batch, _ in items]), [labels for _, labels in items]
