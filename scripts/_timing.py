"""Wall-clock timing shared by the benchmark scripts (run them as `python scripts/bench_*.py`)."""

from __future__ import annotations

import time
from typing import Callable

import torch


def wall_seconds(run: Callable[[], object], device: torch.device) -> float:
    """Wall time of `run()`, synchronising CUDA before and after so queued kernels are counted."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start
