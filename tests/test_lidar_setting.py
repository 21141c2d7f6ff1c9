"""The LiDAR setting end to end: `tasks=lidar_builtin` generates scans in the four real layouts and a zoo written as
ScaLR writes its releases, then merges, scores TAP on probe points and Eval by the linear probe; `tasks=lidar4` checks
its inputs; the BatchNorm-statistics policies."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module

from taskmerge import load_encoder
from taskmerge.checkpoints import load_state_dict
from taskmerge.config import register_configs, to_plain
from taskmerge.errors import UserError
from taskmerge.experiment import run_experiment
from taskmerge.settings.lidar import setting as lidar
from taskmerge.settings.lidar.encoder import is_bn_statistic
from taskmerge.settings.lidar.releases import read_release
from taskmerge.settings.lidar.scans import probe_indices
from taskmerge.validation import check_run

SMALL = ["tasks.synthetic.train_scans=8", "tasks.synthetic.val_scans=4", "tasks.synthetic.pretrain_epochs=1",
         "tasks.synthetic.finetune_epochs=1", "tap.n_samples=4", "decoder.epochs=1", "decoder.per_task={}",
         "tasks.probe_points=64", "logger=none", "device=cpu"]


def _compose(*overrides: str) -> dict:
    register_configs()
    with initialize_config_module(config_module="taskmerge.configs", version_base="1.3"):
        return to_plain(compose(config_name="config", overrides=list(overrides)))


def _small(cache: Path, *overrides: str) -> dict:
    cfg = _compose("tasks=lidar_builtin", *SMALL, *overrides)
    cfg["paths"]["cache_dir"] = str(cache)
    return cfg


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A cache holding the small built-in LiDAR benchmark (built once for the module)."""
    path = tmp_path_factory.mktemp("lidar_cache")
    lidar.load_zoo(_small(path))
    return path


def test_lidar_builtin_end_to_end_in_the_real_layouts_and_release_formats(cache, tmp_path):
    cfg = _small(cache, "selector=both", "method.search.alpha=[0.3,0.6,0.9]")
    selection = run_experiment(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "candidates.jsonl").read_text().splitlines()]
    names = {"nuscenes", "semantic_kitti", "panda64", "pandagt"}
    assert len(rows) == 3 and all(set(r["tap"]) == names | {"mean"} and r["tap"]["mean"] > 0 for r in rows)
    assert all(set(r["eval"]) >= names and 0 <= r["eval"]["nuscenes"] <= 100 for r in rows)
    assert all(math.isfinite(selection["final"][n]) for n in names)

    root = next((cache / "lidar_builtin").iterdir())
    data = root / "data"
    for path in ("nuscenes/v1.0-trainval/sample_data.json", "nuscenes/v1.0-trainval/lidarseg.json",
                 "semantic_kitti/dataset/sequences/08/labels", "pandaset/001/lidar/poses.json", "pandaset/001/meta/gps.json"):
        assert (data / path).exists(), path
    labels = np.fromfile(next((data / "semantic_kitti/dataset/sequences/00/labels").glob("*.label")), dtype=np.uint32)
    assert (labels >> 16).any(), "KITTI labels carry instance ids in the upper bits"
    base = read_release(root / "releases" / "pretraining" / "model.pth")
    assert base.layout == "pretrained" and base.state_key == "model_points" and base.dropped == ("classif.bias", "classif.weight")
    tuned = read_release(root / "releases" / "finetuning" / "nuscenes" / "ckpt_last.pth")
    assert tuned.layout == "finetuned" and tuned.num_classes == 16
    raw = torch.load(root / "releases" / "finetuning" / "nuscenes" / "ckpt_last.pth", weights_only=False)
    assert set(raw) == {"epoch", "net", "optim", "scheduler", "scaler"} and all(k.startswith("module.") for k in raw["net"])
    assert isinstance(raw["scheduler"]["base_lrs"][0], np.float64)
    assert len(list((cache / "lidar_release").glob("*.safetensors"))) == 5, "each release converted once"


def test_tap_compares_the_same_seeded_probe_points_of_every_scan(cache):
    cfg = _small(cache)
    task = lidar.build_tasks(cfg, lidar.load_zoo(cfg))[0]
    batch = task.unlabeled(3, 0).take_all()
    assert batch.probe.shape == (3, 64) and bool((batch.probe < batch.valid.sum(1, keepdim=True)).all())
    encoder = load_encoder(lidar.load_zoo(cfg).base, "waffleiron_tiny")
    assert encoder.features(batch, "tokens").shape == (3, 64, 32)
    assert np.array_equal(probe_indices(100, 64, 0, 5), probe_indices(100, 64, 0, 5))
    short = probe_indices(10, 16, 0, 5)  # fewer kept points than probe points: all of them, then a seeded draw
    assert list(short[:10]) == list(range(10)) and short.max() < 10


def test_batchnorm_statistics_policies(cache):
    cfg = _small(cache)
    zoo = lidar.load_zoo(cfg)
    tasks = lidar.build_tasks(cfg, zoo)
    base = load_state_dict(zoo.base)
    tuned = load_state_dict(zoo.finetuned["nuscenes"])
    extrapolated = {k: base[k] + 3.0 * (tuned[k] - base[k]) if v.is_floating_point() else v for k, v in base.items()}
    extrapolated["embed.norm.running_var"] = -extrapolated["embed.norm.running_var"].abs()  # a merge can do this
    assert lidar.post_merge(cfg, zoo, tasks) is None  # bn_stats=merge: merged like weights ...
    encoder = load_encoder(zoo.base, "waffleiron_tiny")
    assert bool((encoder.encoder_weights(extrapolated)["embed.norm.running_var"] >= 0).all())  # ... variance clamped

    cfg["tasks"]["bn_stats"] = "keep_base"
    kept = lidar.post_merge(cfg, zoo, tasks)(extrapolated)
    assert all(torch.equal(kept[k], base[k]) for k in base if is_bn_statistic(k))
    assert torch.equal(kept["embed.conv1.weight"], extrapolated["embed.conv1.weight"])

    cfg["tasks"]["bn_stats"] = "recalibrate"
    recalibrated = lidar.post_merge(cfg, zoo, tasks)(extrapolated)
    scans = [scan for task in tasks for scan in task.unlabeled(4, cfg["tap"]["seed"]).batches(1)]
    expected = torch.stack([scan.features[0].mean(1) for scan in scans]).mean(0)  # the first BN sees the raw inputs
    assert torch.allclose(recalibrated["embed.norm.running_mean"], expected, atol=1e-5)
    assert bool((recalibrated["embed.conv2.0.running_var"] > 0).all())


def test_lidar4_checks_every_input_before_any_work(tmp_path):
    cfg = _compose("tasks=lidar4", f"paths.data={tmp_path}", "tasks.base=missing/model.pth",
                   f"paths.checkpoints={tmp_path}", "logger=none")
    with pytest.raises(UserError) as error:
        check_run(cfg)
    message = str(error.value)
    assert "nuscenes/v1.0-trainval" in message and "semantic_kitti/dataset/sequences" in message and "pandaset" in message
    assert "tasks.base=missing/model.pth" in message and "tasks.finetuned.pandagt=None" in message  # one error, all of it
    with pytest.raises(UserError, match="unknown LiDAR task"):
        check_run(_compose("tasks=lidar4", "tasks.names=[nuscenes,waymo]", "logger=none"))
    with pytest.raises(UserError, match="tasks.preprocessing.nuscenes"):
        check_run(_compose("tasks=lidar4", "+tasks.preprocessing.nuscenes.voxel_size=0.2", "logger=none"))
    with pytest.raises(UserError, match=r"tasks.preprocessing.panda64.grids=\[\[1, 2\]\] is invalid"):
        check_run(_compose("tasks=lidar4", "tasks.preprocessing.panda64.grids=[[1,2]]", "logger=none"))
    with pytest.raises(UserError, match="one grid per projection"):
        check_run(_compose("tasks=lidar_builtin", "encoder.grids=[[64,64]]", "logger=none"))
    with pytest.raises(UserError, match="method.loss=entropy"):
        check_run(_compose("tasks=lidar4", "method=adamerging", "method.loss=entropy", "logger=none"))


@pytest.mark.parametrize("recipe, selector, jobs", [("lidar_table2", "tap", 6), ("lidar_table7", "both", 3)])
def test_paper_recipes_compose_sweep_and_name_the_scalr_files(recipe, selector, jobs, tmp_path):
    """Tab. 2 / Tab. 7: ScaLR's release paths under paths.checkpoints, the linear probe, the selector, the sweep."""
    import math as _math

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    register_configs()
    with initialize_config_module(config_module="taskmerge.configs", version_base="1.3"):
        raw = compose(config_name="config", overrides=[f"experiment={recipe}", f"paths.checkpoints={tmp_path}",
                                                       f"paths.data={tmp_path}"], return_hydra_config=True)
    cfg = to_plain(OmegaConf.masked_copy(raw, [k for k in raw if k != "hydra"]))
    assert cfg["decoder"]["name"] == "lidar_linprob" and cfg["decoder"]["per_task"]["pandagt"]["epochs"] == 50
    assert cfg["selector"]["name"] == selector and cfg["encoder"]["config"] == "waffleiron_768"
    assert cfg["tap"]["features"] == "tokens" and cfg["tasks"]["probe_points"] == 2048
    sweep = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in raw.hydra.sweeper.params.items()])
    assert _math.prod(len(list(o.sweep_iterator())) for o in sweep) == jobs
    with pytest.raises(UserError, match=r"tasks.base=WI_768-DINOv2_ViT_L_14-NS_KI_PD/pretraining/model.pth"):
        lidar.check_inputs(cfg)


def test_adamerging_tap_learns_on_scans_with_batchnorm_statistics(cache, tmp_path):
    """AdaMerging-TAP (Tab. 2's row) on LiDAR: λ learned through the scans' probe tokens; the embedding's BatchNorm
    statistics are merged with λ but carry no gradient (torch refuses one)."""
    cfg = _small(cache, "method=adamerging", "method.iterations=2", "method.batch_size=2", "method.n_images=4",
                 "save_merged=true")
    selection = run_experiment(cfg, tmp_path / "run")
    merged = load_state_dict(tmp_path / "run" / "merged_encoder.safetensors")
    assert "embed.norm.running_var" in merged and bool((merged["embed.norm.running_var"] >= 0).all())
    assert math.isfinite(selection["final"]["normalized"])


@pytest.mark.slow
def test_lidar_builtin_is_a_real_merging_problem(tmp_path):
    """`tasks=lidar_builtin` with its defaults (about 4 minutes on 2 idle cores): base clearly below the fine-tuned
    encoders, the TAP-selected merge in between, on the test split."""
    cfg = _compose("tasks=lidar_builtin", "logger=none")
    cfg["paths"]["cache_dir"] = str(tmp_path / "cache")
    selection = run_experiment(cfg, tmp_path / "run")
    refs = json.loads(next((tmp_path / "cache" / "references").glob("*.json")).read_text())
    names = cfg["tasks"]["names"]
    base_normalized = sum(refs["base"]["test"][t] / refs["finetuned"]["test"][t] for t in names) / len(names)
    assert base_normalized < 0.6 and base_normalized + 0.1 < selection["final"]["normalized"] < 1.0


def test_normalization_against_the_fine_tuned_releases_own_heads(cache, tmp_path):
    """`tasks.reference=own_head`: each fine-tuned encoder is scored with its release's `classif` head (no re-training)
    as the normalization reference; the probe reference stays a separate cache entry."""
    from taskmerge.settings.lidar.probe import PointHead, score_probe

    run_experiment(_small(cache, "method.search.alpha=[0.3]", "tasks.names=[nuscenes]"), tmp_path / "probe")
    cfg = _small(cache, "tasks.reference=own_head", "method.search.alpha=[0.3]", "tasks.names=[nuscenes]")
    run_experiment(cfg, tmp_path / "run")
    root = next((cache / "lidar_builtin").iterdir())
    release = read_release(root / "releases" / "finetuning" / "nuscenes" / "ckpt_last.pth")
    head = PointHead(32, 16)
    head.load_state_dict(release.head)
    zoo = lidar.load_zoo(cfg)
    task = lidar.build_tasks(cfg, zoo)[0]
    encoder = load_encoder(zoo.finetuned["nuscenes"], "waffleiron_tiny")
    expected = score_probe(head, lidar.scan_features(encoder, task.splits["test"], 8), 16)
    entries = [json.loads(p.read_text()) for p in (cache / "references").glob("*.json")]
    assert any(e["finetuned"]["test"].get("nuscenes") == expected for e in entries)
    assert any(e["finetuned"]["test"].get("nuscenes") != expected for e in entries), "the probe reference is kept apart"


def test_probe_features_per_step_train_the_same_probe_as_kept_ones(cache, monkeypatch):
    """Train features beyond `FEATURE_CACHE_BYTES` (real datasets at 768) are recomputed per step: same probe, same mIoU."""
    from taskmerge.experiment import build_protocol
    from taskmerge.selection.evaluation import evaluate_task_splits

    cfg = _small(cache, "decoder.epochs=2")
    zoo = lidar.load_zoo(cfg)
    task = lidar.build_tasks(cfg, zoo)[1]
    encoder = load_encoder(zoo.finetuned[task.name], "waffleiron_tiny")
    protocol = build_protocol(cfg["decoder"], cfg["seed"])
    kept = evaluate_task_splits(encoder, task, ("val",), protocol)
    monkeypatch.setattr(lidar, "FEATURE_CACHE_BYTES", 0)
    per_step = evaluate_task_splits(encoder, task, ("val",), protocol)
    assert kept["val"] > 0 and abs(per_step["val"] - kept["val"]) < 1e-6
