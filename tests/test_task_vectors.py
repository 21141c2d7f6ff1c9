import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_OVERRIDES
from taskmerge import checkpoints
from taskmerge.task_vectors import layer_of, task_vector_stats

ROOT = Path(__file__).resolve().parents[1]


def test_layer_names():
    assert layer_of("blocks.3.attn.qkv.weight") == "blocks.3"
    assert layer_of("blocks.10.ls1.gamma") == "blocks.10"
    assert layer_of("visual.transformer.resblocks.11.ln_1.weight") == "visual.transformer.resblocks.11"
    for key in ("patch_embed.proj.weight", "cls_token", "pos_embed", "register_tokens", "mask_token", "reg_token"):
        assert layer_of(key) == "embeddings", key
    for key in ("visual.class_embedding", "visual.positional_embedding", "visual.conv1.weight", "visual.ln_pre.bias"):
        assert layer_of(key) == "visual.embeddings", key
    assert layer_of("blocks.0.attn.rel_pos_embed") == "blocks.0", "the block comes first in the key"
    assert layer_of("norm.weight") == "norm" and layer_of("visual.proj") == "visual.proj" and layer_of("head") == "head"


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


def _zoo(tasks=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    base = {"cls_token": torch.randn(1, 1, 8, generator=generator), "pos_embed": torch.randn(1, 5, 8, generator=generator),
            **{f"blocks.{i}.mlp.fc1.weight": torch.randn(16, 8, generator=generator) for i in range(11)},
            "norm.weight": torch.ones(8), "norm.bias": torch.zeros(8).half(), "steps": torch.tensor(3)}
    fts = [{k: v + (t + 1) * torch.randn(v.shape, generator=generator).to(v.dtype) if v.is_floating_point() else v
            for k, v in base.items()} for t in range(tasks)]
    return base, fts


def test_lazy_checkpoints_are_read_slice_by_slice(tmp_path, monkeypatch):
    """Safetensors checkpoints are streamed: the fine-tuned models are never read whole, no slice exceeds the
    chunk, and the statistics equal those of the in-memory state dicts."""
    base, fts = _zoo()
    names = ["a", "b", "c"]
    paths = [checkpoints.save_state_dict(tmp_path / f"{n}.safetensors", sd) for n, sd in zip(["base", *names], [base, *fts])]
    expected = task_vector_stats(base, fts, names)
    largest = []
    monkeypatch.setattr(checkpoints.LazyStateDict, "__getitem__", lambda self, key: pytest.fail(f"{key} read whole"))
    read_flat = checkpoints.LazyStateDict.read_flat
    monkeypatch.setattr(checkpoints.LazyStateDict, "read_flat",
                        lambda self, key, start, stop: largest.append(stop - start) or read_flat(self, key, start, stop))
    lazy = [checkpoints.open_state_dict(p) for p in paths]
    streamed = task_vector_stats(lazy[0], lazy[1:], names, chunk=50)
    assert max(largest) == 50
    assert streamed.layers == expected.layers == ["embeddings", *[f"blocks.{i}" for i in range(11)], "norm"]
    assert streamed.blocks == [f"blocks.{i}" for i in range(11)], "blocks.10 after blocks.9"
    for task in names:
        assert streamed.layer_norms[task] == pytest.approx(expected.layer_norms[task], rel=1e-12)
    assert torch.allclose(torch.tensor(streamed.cosine), torch.tensor(expected.cosine), rtol=1e-9, atol=1e-12)
    blocks = streamed.to_dict()["block_norms"]
    assert list(blocks) == names and all(len(v) == 11 for v in blocks.values())
    assert blocks["c"][0] > 2 * blocks["a"][0]


def test_missing_or_reshaped_keys_are_named():
    base, fts = _zoo(tasks=2)
    del fts[1]["blocks.3.mlp.fc1.weight"]
    with pytest.raises(ValueError, match="'y' has no 'blocks.3.mlp.fc1.weight'"):
        task_vector_stats(base, fts, ["x", "y"])
    base, fts = _zoo(tasks=2)
    fts[0]["pos_embed"] = torch.zeros(1, 7, 8)
    with pytest.raises(ValueError, match=r"'pos_embed': shape \[1, 7, 8\] in the fine-tuned model of 'x'"):
        task_vector_stats(base, fts, ["x", "y"])


def test_generic_analysis_names_no_setting():
    """Grouping comes from the key structure: the analysis code has no setting-specific branch."""
    for module in ("analyze.py", "task_vectors.py", "plots.py"):
        text = (ROOT / "taskmerge" / module).read_text().lower()
        assert not [w for w in ("dense", "dune", "dinov2", "clip", "builtin") if w in text], module
