"""AdaMerging: the TAP loss learns, entropy clamps, the merge formula holds; end to end through the runner."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_OVERRIDES
from taskmerge.decoders import LinearClassifier
from taskmerge.settings import create_encoder
from taskmerge.selection.adamerging import AdaMergingConfig, learn

ROOT = Path(__file__).resolve().parents[1]


def _setup(num_tasks=2, seed=0):
    torch.manual_seed(seed)
    encoder = create_encoder("builtin_vit", img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2)
    pretrained = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    finetuned = [{k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in pretrained.items()}
                 for _ in range(num_tasks)]
    images = [torch.rand(32, 3, 16, 16) for _ in range(num_tasks)]
    teachers = []
    for model, imgs in zip(finetuned, images):
        teacher = create_encoder("builtin_vit", img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2)
        teacher.load_state_dict(model)
        with torch.no_grad():
            teachers.append(teacher.eval().features(imgs, "tokens"))
    return encoder, pretrained, finetuned, images, teachers


def test_tap_loss_decreases_and_merge_formula_holds():
    encoder, pretrained, finetuned, images, teachers = _setup()
    result = learn(encoder, pretrained, finetuned, images, AdaMergingConfig(iterations=60, lr=2e-2, batch_size=8), teachers)
    assert sum(result.losses[-10:]) < sum(result.losses[:10]), "the TAP loss must go down"
    keys = [k for k, v in pretrained.items() if v.is_floating_point()]
    assert result.coefficients.shape == (len(keys), 2) and result.keys == keys
    for row, key in enumerate(keys):
        lam = result.coefficients[row]
        expected = pretrained[key] + sum(lam[t] * (finetuned[t][key] - pretrained[key]) for t in range(2))
        assert torch.allclose(result.merged[key], expected, atol=1e-6)
    assert list(result.merged) == list(pretrained)


def test_task_granularity_init_and_no_steps():
    encoder, pretrained, finetuned, images, teachers = _setup(num_tasks=3)
    result = learn(encoder, pretrained, finetuned, images, AdaMergingConfig(granularity="task", iterations=0), teachers)
    assert result.coefficients.shape == (1, 3) and torch.allclose(result.coefficients, torch.full((1, 3), 1 / 3))


def test_entropy_loss_uses_frozen_heads_and_clamps():
    encoder, pretrained, finetuned, images, _ = _setup()
    heads = [LinearClassifier(16, 5).eval().requires_grad_(False) for _ in range(2)]
    config = AdaMergingConfig(loss="entropy", iterations=40, lr=0.5, batch_size=8)
    result = learn(encoder, pretrained, finetuned, images, config, heads=heads)
    assert result.coefficients.min() >= 0.0 and result.coefficients.max() <= 1.0
    assert any(abs(v - 0.3) > 1e-3 for v in result.coefficients.flatten().tolist()), "λ starts at 0.3 and moves"
    with pytest.raises(ValueError, match="granularity must be 'task' or 'layer'"):
        learn(encoder, pretrained, finetuned, images, AdaMergingConfig(granularity="block"), heads=heads)


def test_adamerging_end_to_end_is_a_candidate_like_any_other(tmp_path, cache_dir):
    run_dir = tmp_path / "ada"
    cmd = [sys.executable, "-m", "taskmerge.run", *TINY_OVERRIDES, "method=adamerging", "method.iterations=10",
           "selector=both", f"hydra.run.dir={run_dir}"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "candidates.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["method"] == "adamerging"
    assert rows[0]["hparams"] == {"granularity": "layer", "loss": "tap", "iterations": 10} and "eval" in rows[0]
    learned = json.loads((run_dir / "adamerging" / "coefficients.json").read_text())
    assert learned["tasks"] == ["digits", "textures", "shapes", "scenes"] and len(learned["losses"]) == 10
    assert (run_dir / "adamerging" / "coefficients.png").stat().st_size > 5_000

    entropy = subprocess.run([*cmd[:-1], "method.loss=entropy", f"hydra.run.dir={tmp_path / 'entropy'}"], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
    assert entropy.returncode != 0
    assert "needs a frozen classification head for every task; ['shapes', 'scenes'] have none" in entropy.stderr
