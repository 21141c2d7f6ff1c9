"""`python -m taskmerge.analyze` on the dense setting: four tiny 12-block ViT/14 releases in DUNE's `{model, args, iter}`
format, read through the setting's release reader into canonical safetensors (DINOv2 names), analysed per block
(paper Fig. 6/14, App. F) with the embeddings as one group and the final norm last."""

from __future__ import annotations

import json
import re

import pytest
import torch
from hydra import compose, initialize_config_module

from dense_trees import write_dense_trees
from taskmerge.analyze import analyze
from taskmerge.config import register_configs, to_plain
from taskmerge.settings.dense.encoder import DenseViT
from taskmerge.settings.dense.releases import export

TINY = dict(embed_dim=32, depth=12, num_heads=2, reg_tokens=4, image_size=56, native_size=56)
# Task-vector scales in the ratios of the paper's per-block norms (App. F: NYUd ≈ 2, ADE20k ≈ 5, MapFree ≈ 24, BEDLAM ≈ 58).
SCALES = {"ade20k": 5.0, "nyud": 2.0, "bedlam": 58.0, "mapfree": 24.0}


@pytest.fixture(scope="module")
def dune_zoo(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dune_analyze")
    data = root / "data"
    write_dense_trees(data, 4, 2, 2, 2)
    torch.manual_seed(0)
    base = DenseViT(**TINY).canonical_weights()
    paths = {"base": export(base, "dune", root / "base.pth")}
    for i, (name, scale) in enumerate(SCALES.items()):
        generator = torch.Generator().manual_seed(i + 1)
        blocks = [k for k in base if k.startswith("blocks.")]
        size = sum(base[k].numel() for k in blocks) / 12  # parameters per block: each block's τ norm ≈ scale
        moved = {k: v + scale / size**0.5 * torch.randn(v.shape, generator=generator) if k.startswith(("blocks.", "pos_embed")) else v
                 for k, v in base.items()}
        paths[name] = export(moved, "dune", root / f"{name}.pth")
    return {"data": data, "paths": paths}


def _config(zoo: dict, cache) -> dict:
    register_configs()
    overrides = ["tasks=dune4", *[f"encoder.{k}={v}" for k, v in TINY.items()], f"paths.data={zoo['data']}", "logger=none", "device=cpu"]
    with initialize_config_module(config_module="taskmerge.configs", version_base="1.3"):
        cfg = to_plain(compose(config_name="config", overrides=overrides))
    cfg["paths"]["cache_dir"] = str(cache)
    cfg["tasks"]["base"] = str(zoo["paths"]["base"])
    cfg["tasks"]["finetuned"] = {n: str(zoo["paths"][n]) for n in SCALES}
    cfg["tasks"]["external"] = {n: {"command": "true {encoder} {out_dir}", "layout": "dune", "timeout_s": 60} for n in ("bedlam", "mapfree")}
    return cfg


def test_dense_analysis_per_block(dune_zoo, tmp_path, capsys):
    stats = analyze(_config(dune_zoo, tmp_path / "cache"), tmp_path / "run")
    blocks = [f"blocks.{i}" for i in range(12)]
    assert stats["blocks"] == blocks, "12 blocks in numeric order (blocks.10 after blocks.9)"
    assert stats["layers"] == ["embeddings", *blocks, "norm"], "embeddings as one group, then the blocks, then the final norm"
    written = json.loads((tmp_path / "run" / "task_vectors.json").read_text())
    assert written["blocks"] == blocks and list(written["block_norms"]) == list(SCALES)
    for name, scale in SCALES.items():
        per_block = written["block_norms"][name]
        assert len(per_block) == 12 and all(0.8 * scale < v < 1.2 * scale for v in per_block), (name, per_block)
        assert per_block == [written["layer_norms"][name][b] for b in blocks]
        assert written["layer_norms"][name]["norm"] == 0.0 and written["layer_norms"][name]["embeddings"] > 0
    for png in ("task_vector_norms.png", "task_vector_cosine.png"):
        assert (tmp_path / "run" / "plots" / png).stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "per block (12): min–max" in printed and re.search(r"bedlam\s*│[^\n]*│\s*5\d\.\d – [56]\d\.\d", printed), printed
    rows = [line.split("│")[1].strip() for line in printed.splitlines() if line.startswith("│") and "blocks." in line]
    assert rows == blocks, "the per-layer table lists the blocks by depth"
    assert "unchanged by every task: norm" in printed and "cosine similarities" in printed
