import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_OVERRIDES
from taskmerge.task_vectors import layer_of, task_vector_stats

ROOT = Path(__file__).resolve().parents[1]


def test_layer_names():
    assert layer_of("blocks.3.attn.qkv.weight") == "blocks.3"
    assert layer_of("visual.transformer.resblocks.11.ln_1.weight") == "visual.transformer.resblocks.11"
    assert layer_of("patch_embed.proj.weight") == "patch_embed.proj"
    assert layer_of("visual.class_embedding") == "visual.class_embedding" and layer_of("visual.conv1.weight") == "visual.conv1"
    assert layer_of("cls_token") == "cls_token"


def test_stats_hand_values():
    base = {"blocks.0.w": torch.zeros(2), "head": torch.zeros(1), "steps": torch.tensor(1)}
    fts = [{"blocks.0.w": torch.tensor([3.0, 0.0]), "head": torch.tensor([4.0]), "steps": torch.tensor(5)},
           {"blocks.0.w": torch.tensor([0.0, 1.0]), "head": torch.tensor([0.0]), "steps": torch.tensor(5)}]
    stats = task_vector_stats(base, fts, ["x", "y"])
    assert stats.norms == pytest.approx({"x": 5.0, "y": 1.0})
    assert stats.layer_norms["x"] == pytest.approx({"blocks.0": 3.0, "head": 4.0})
    assert torch.allclose(torch.tensor(stats.cosine, dtype=torch.float64), torch.eye(2, dtype=torch.float64))
    # mean τ = (1.5, 0.5, 2.0): cos(τx, m) = 12.5 / (5 · √6.5)
    assert stats.cosine_with_mean["x"] == pytest.approx(12.5 / (5 * 6.5**0.5))
    assert stats.layers == ["blocks.0", "head"], "integer buffers are not task-vector entries"


def test_analyze_entry_point_writes_json_and_plots(tmp_path, cache_dir):
    cmd = [sys.executable, "-m", "taskmerge.analyze", *TINY_OVERRIDES, f"hydra.run.dir={tmp_path}"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    stats = json.loads((tmp_path / "task_vectors.json").read_text())
    assert stats["tasks"] == ["digits", "textures", "shapes", "scenes"]
    assert all(stats["norms"][t] > 0 for t in stats["tasks"])
    assert len(stats["cosine"]) == 4 and all(abs(stats["cosine"][i][i] - 1) < 1e-9 for i in range(4))
    for name in ("task_vector_norms.png", "task_vector_cosine.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 5_000
