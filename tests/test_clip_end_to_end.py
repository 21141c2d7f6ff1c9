"""The CLIP setting end to end on the CPU: a random-init ViT-B/32 release (format A and B) and tiny dataset trees
in the real layouts (Cars' devkit, DTD's ImageFolders, MNIST's idx files); `tasks=clip8` restricted to them."""

import json
from pathlib import Path

import open_clip
import pytest
import torch
from hydra import compose, initialize_config_module

from clip_data import write_cars, write_folder_split, write_mnist_like
from clip_release import save_release
from taskmerge import checkpoints
from taskmerge.config import register_configs
from taskmerge.encoders import create_encoder
from taskmerge.encoders.clip import ClipClassificationHead, preprocess, zeroshot_weights
from taskmerge.experiment import load_clip_zoo, run_experiment
from taskmerge.run import to_plain
from taskmerge.tasks import clip_datasets
from taskmerge.tasks.clip_templates import TEMPLATES

NAMES = ["Cars", "DTD", "MNIST"]
CLASSES = {"Cars": 2, "DTD": 3, "MNIST": 10}


@pytest.fixture(scope="module")
def clip_setup(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    write_cars(data, ["AM General Hummer SUV 2000", "Acura RL Sedan 2012"], [1, 2] * 6, [2, 1, 2, 1])
    write_folder_split(data / "dtd" / "train", ["banded", "dotted", "striped"], 4)
    write_folder_split(data / "dtd" / "val", ["banded", "dotted", "striped"], 2)
    write_mnist_like(data / "MNIST" / "raw", ("train", "t10k"), n_train=20, n_test=6)
    releases = {}
    for fmt in ("A", "B"):
        root = tmp_path_factory.mktemp(f"release{fmt}")
        releases[fmt] = (root, save_release(root, "ViT-B-32", NAMES, fmt, CLASSES, fit_head=lambda n, clip: _centroids(n, clip, data)))
    return data, releases


@torch.no_grad()
def _centroids(name: str, clip: torch.nn.Module, data: Path) -> torch.Tensor:
    """A head fitted like the release's: unit class centroids of the fine-tuned encoder's train embeddings, × 100."""
    train = clip_datasets.load_split(name, "train", data, preprocess(224))
    images, labels = zip(*(train[i] for i in range(len(train))))
    embeddings = torch.nn.functional.normalize(clip.eval().encode_image(torch.stack(images)), dim=-1)
    labels = torch.tensor(labels)
    rows = [embeddings[labels == c].mean(0) if (labels == c).any() else torch.zeros(embeddings.shape[1]) for c in range(CLASSES[name])]
    return 100 * torch.nn.functional.normalize(torch.stack(rows), dim=-1)


def _config(data: Path, checkpoints_root: Path, cache: Path, fmt: str, *overrides: str) -> dict:
    register_configs()
    with initialize_config_module(config_module="taskmerge.configs", version_base="1.3"):
        return to_plain(compose(config_name="config", overrides=[
            "tasks=clip8", f"tasks.names=[{','.join(NAMES)}]", f"tasks.format={fmt}", "tasks.num_workers=0",
            f"paths.data={data}", f"paths.checkpoints={checkpoints_root}", f"paths.cache_dir={cache}",
            "tap.n_samples=4", "tap.batch_size=8", "decoder.batch_size=8", "logger=none", "device=cpu", *overrides,
        ]))


@pytest.mark.parametrize("fmt", ["A", "B"])
def test_clip_run_with_both_selectors(clip_setup, tmp_path, fmt):
    data, releases = clip_setup
    root, saved = releases[fmt]
    cfg = _config(data, root, tmp_path / "cache", fmt, "selector=both", "method=ta", "method.search.alpha=[0.3,1.0]")
    selection = run_experiment(cfg, tmp_path / "run")

    refs = json.loads(next((tmp_path / "cache" / "references").iterdir()).read_text())
    assert all(refs["finetuned"]["val"][n] > 0 for n in NAMES)
    rows = [json.loads(line) for line in (tmp_path / "run" / "candidates.jsonl").read_text().splitlines()]
    assert [r["hparams"] for r in rows] == [{"alpha": 0.3}, {"alpha": 1.0}]
    for row in rows:
        assert set(row["tap"]) == {*NAMES, "mean"} and set(row["eval"]) == {*NAMES, "normalized"}
        assert all(0.0 <= row["eval"][n] <= 100.0 for n in NAMES)
    assert selection["selected"]["tap"] == min(rows, key=lambda r: r["tap"]["mean"])["hparams"]
    assert set(selection["final"]) == {*NAMES, "normalized"}
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

    converted = sorted((tmp_path / "cache" / "release").glob("*.safetensors"))
    assert len(converted) == 1 + 2 * len(NAMES)
    assert all(p.stem == checkpoints.fingerprint(p) for p in converted)


def test_clip_entropy_adamerging_uses_the_frozen_heads(clip_setup, tmp_path):
    data, releases = clip_setup
    root, _ = releases["B"]
    cfg = _config(data, root, tmp_path / "cache", "B", "method=adamerging", "method.loss=entropy", "method.granularity=task",
                  "method.iterations=2", "method.batch_size=2", "method.n_images=4")
    selection = run_experiment(cfg, tmp_path / "run")
    learned = json.loads((tmp_path / "run" / "adamerging" / "coefficients.json").read_text())
    assert learned["loss"] == "entropy" and learned["tasks"] == NAMES
    assert len(learned["losses"]) == 2 and all(0.0 <= c <= 1.0 for c in learned["coefficients"][0])
    assert set(selection["final"]) == {*NAMES, "normalized"}


def test_missing_datasets_and_paths_are_reported(clip_setup, tmp_path):
    data, releases = clip_setup
    cfg = _config(tmp_path / "empty", releases["B"][0], tmp_path / "cache", "B")
    with pytest.raises(FileNotFoundError) as error:
        run_experiment(cfg, tmp_path / "run")
    assert all(name in str(error.value) for name in NAMES)
    cfg = _config(data, releases["B"][0], tmp_path / "cache", "B", "paths.data=null")
    with pytest.raises(ValueError, match="paths.data=DIR"):
        run_experiment(cfg, tmp_path / "run")


def test_zeroshot_heads_from_pretrained_weights_replace_the_release_heads(clip_setup, tmp_path):
    data, releases = clip_setup
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True, load_weights=False)
    weights = tmp_path / "openai_vit_b32.pt"
    torch.save(clip.state_dict(), weights)
    cfg = _config(data, releases["B"][0], tmp_path / "cache", "B", "tasks.heads=zeroshot", f"tasks.zeroshot_weights={weights}")
    zoo = load_clip_zoo(cfg)
    heads = {n: checkpoints.load_state_dict(zoo.heads[n]) for n in NAMES}
    assert {n: h["weight"].shape for n, h in heads.items()} == {n: (c, 512) for n, c in CLASSES.items()}
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    expected = zeroshot_weights(clip, tokenizer, clip_datasets.classnames("DTD", data), TEMPLATES["DTD"])
    assert torch.allclose(heads["DTD"]["weight"], expected, atol=1e-5)
    assert load_clip_zoo(cfg).heads == zoo.heads, "zero-shot heads are cached"
    with pytest.raises(ValueError, match="tasks.zeroshot_weights=PATH"):
        load_clip_zoo(_config(data, releases["B"][0], tmp_path / "cache", "B", "tasks.heads=zeroshot"))
