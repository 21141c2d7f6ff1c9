"""The CLIP setting end to end on the CPU: a random-init ViT-B/32 release (format A and B) and tiny dataset trees
in the real layouts (Cars' devkit, DTD's ImageFolders, MNIST's idx files); `tasks=clip8` restricted to them."""

import json
import math
from pathlib import Path

import open_clip
import pytest
import torch
from hydra import compose, initialize_config_module

from conftest import CLIP_CLASSES, CLIP_NAMES
from taskmerge import checkpoints
from taskmerge.config import register_configs, to_plain
from taskmerge.settings import create_encoder
from taskmerge.settings.clip.encoder import ClipClassificationHead, preprocess, random_init_clip, zeroshot_weights
from taskmerge.analyze import analyze
from taskmerge.settings.clip.setting import load_zoo
from taskmerge.errors import UserError
from taskmerge.experiment import StageTimer, open_pipeline, run_experiment
from taskmerge.settings.clip import datasets as clip_datasets
from taskmerge.settings.clip.templates import TEMPLATES

def _config(data: Path, checkpoints_root: Path, cache: Path, fmt: str, *overrides: str) -> dict:
    register_configs()
    with initialize_config_module(config_module="taskmerge.configs", version_base="1.3"):
        return to_plain(compose(config_name="config", overrides=[
            "tasks=clip8", f"tasks.names=[{','.join(CLIP_NAMES)}]", f"tasks.format={fmt}", "tasks.num_workers=0",
            f"paths.data={data}", f"paths.checkpoints={checkpoints_root}", f"paths.cache_dir={cache}",
            "tap.n_samples=4", "tap.batch_size=8", "decoder.batch_size=8", "logger=none", "device=cpu", *overrides,
        ]))


@pytest.mark.parametrize("fmt", ["A", "B"])
def test_clip_run_with_both_selectors(clip_data, clip_releases, clip_cache, tmp_path, fmt):
    data, (root, saved) = clip_data, clip_releases[fmt]
    cfg = _config(data, root, clip_cache, fmt, "selector=both", "method=ta", "method.search.alpha=[0.3,1.0]")
    selection = run_experiment(cfg, tmp_path / "run")

    refs = open_pipeline(cfg, StageTimer()).refs  # cached by the run
    assert all(refs["finetuned"]["val"][n] > 0 for n in CLIP_NAMES)
    rows = [json.loads(line) for line in (tmp_path / "run" / "candidates.jsonl").read_text().splitlines()]
    assert [r["hparams"] for r in rows] == [{"alpha": 0.3}, {"alpha": 1.0}]
    for row in rows:
        assert set(row["tap"]) == {*CLIP_NAMES, "mean"} and set(row["eval"]) == {*CLIP_NAMES, "normalized"}
    assert selection["selected"]["tap"] == min(rows, key=lambda r: r["tap"]["mean"])["hparams"]
    assert set(selection["final"]) == {*CLIP_NAMES, "normalized"}
    assert "agreement" in selection
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| mean | accuracy ↑ |" in report and "the frozen heads of the release" in report

    # the reference accuracy of a fine-tuned model is its own encoder + frozen head on the val split, by hand
    encoder = create_encoder("clip", model="ViT-B-32").eval()
    encoder.load_state_dict(encoder.encoder_weights(saved["DTD"]))
    head = ClipClassificationHead(saved["head/DTD"]["weight"], saved["head/DTD"]["bias"])
    val = clip_datasets.load_split("DTD", "val", data, preprocess(224))
    images, labels = zip(*(val[i] for i in range(len(val))))
    with torch.no_grad():
        predictions = head(encoder.features(torch.stack(images), "pooled")).argmax(-1)
    expected = 100.0 * (predictions == torch.tensor(labels)).float().mean().item()
    assert refs["finetuned"]["val"]["DTD"] == pytest.approx(expected)
    assert refs["finetuned_frozen"] == refs["finetuned"], "with frozen heads there is nothing to re-train"

    converted = sorted((clip_cache / "release").glob("*.safetensors"))
    assert len(converted) == 1 + 2 * len(CLIP_NAMES), "formats A and B of equal weights share their conversions"
    assert all(p.stem == checkpoints.fingerprint(p) for p in converted)


def test_clip_entropy_adamerging_uses_the_frozen_heads(clip_data, clip_releases, clip_cache, tmp_path):
    cfg = _config(clip_data, clip_releases["B"][0], clip_cache, "B", "method=adamerging", "method.loss=entropy", "method.granularity=task",
                  "method.iterations=2", "method.batch_size=2", "method.n_images=4")
    selection = run_experiment(cfg, tmp_path / "run")
    learned = json.loads((tmp_path / "run" / "adamerging" / "coefficients.json").read_text())
    assert learned["loss"] == "entropy" and learned["tasks"] == CLIP_NAMES
    assert len(learned["losses"]) == 2 and all(0.0 <= c <= 1.0 for c in learned["coefficients"][0])
    bound = sum(math.log(CLIP_CLASSES[n]) for n in CLIP_NAMES) / len(CLIP_NAMES)  # entropy of uniform predictions
    assert all(0.0 < loss <= bound + 1e-6 for loss in learned["losses"]), "the loss is the heads' mean prediction entropy"
    assert set(selection["final"]) == {*CLIP_NAMES, "normalized"}


def test_missing_inputs_are_reported_before_any_work(clip_data, clip_releases, tmp_path):
    data, root = clip_data, clip_releases["B"][0]
    cfg = _config(tmp_path / "empty", root, tmp_path / "cache", "B")
    with pytest.raises(UserError) as error:
        run_experiment(cfg, tmp_path / "run")
    assert all(name in str(error.value) for name in CLIP_NAMES)
    cfg = _config(data, root, tmp_path / "cache", "B", "paths.data=null")
    with pytest.raises(ValueError, match="paths.data=DIR"):
        run_experiment(cfg, tmp_path / "run")
    with pytest.raises(UserError, match=r"7 checkpoint file\(s\) missing"):
        run_experiment(_config(data, root, tmp_path / "cache", "A"), tmp_path / "run")  # B's files, read as format A
    with pytest.raises(UserError, match="needs an encoder of family 'clip'"):
        run_experiment(_config(data, root, tmp_path / "cache", "B", "encoder=builtin_vit"), tmp_path / "run")
    assert not (tmp_path / "cache").exists(), "nothing is converted or cached before the inputs are checked"


def test_zeroshot_heads_from_pretrained_weights_replace_the_release_heads(clip_data, clip_releases, clip_cache, tmp_path):
    data, root = clip_data, clip_releases["B"][0]
    torch.manual_seed(0)
    clip = random_init_clip("ViT-B-32")
    weights = tmp_path / "openai_vit_b32.pt"
    torch.save(clip.state_dict(), weights)
    cfg = _config(data, root, clip_cache, "B", "tasks.heads=zeroshot", f"tasks.zeroshot_weights={weights}")
    zoo = load_zoo(cfg)
    heads = {n: checkpoints.load_state_dict(zoo.heads[n]) for n in CLIP_NAMES}
    assert {n: h["weight"].shape for n, h in heads.items()} == {n: (c, 512) for n, c in CLIP_CLASSES.items()}
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    expected = zeroshot_weights(clip, tokenizer, clip_datasets.classnames("DTD", data), TEMPLATES["DTD"])
    assert torch.allclose(heads["DTD"]["weight"], expected, atol=1e-5)
    assert load_zoo(cfg).heads == zoo.heads, "zero-shot heads are cached"
    release = load_zoo(_config(data, root, clip_cache, "B"))
    assert release.key != zoo.key, "other heads, other zoo: cached references and candidates cannot be reused"
    weights.unlink()
    with pytest.raises(ValueError, match="tasks.zeroshot_weights=PATH"):
        run_experiment(_config(data, root, clip_cache, "B", "tasks.heads=zeroshot"), tmp_path / "run")


def test_task_vector_analysis_of_a_release(clip_data, clip_releases, clip_cache, tmp_path):
    stats = analyze(_config(clip_data, clip_releases["B"][0], clip_cache, "B"), tmp_path)
    blocks = [layer for layer in stats["layers"] if layer.startswith("visual.transformer.resblocks.")]
    assert len(blocks) == 12
    for name in CLIP_NAMES:
        assert stats["norms"][name] > 0 and all(stats["layer_norms"][name][b] > 0 for b in blocks)
        assert stats["layer_norms"][name]["embeddings"] == 0.0, "fine-tuning leaves the text leftovers alone"
        assert stats["layer_norms"][name]["visual.embeddings"] > 0 and stats["block_norms"][name] == [stats["layer_norms"][name][b] for b in blocks]
    assert (tmp_path / "plots" / "task_vector_norms.png").is_file()
