"""The built-in LiDAR benchmark (`tasks=lidar_builtin`): a real merging problem that runs on 2 CPU cores.

Data: seeded synthetic street scenes ray-cast by four simulated sensors (`synthetic.py`), written in the four real
layouts (nuScenes tables and lidarseg files, SemanticKITTI sequences with instance bits, PandaSet pickles in world
coordinates with both sensors in one frame) with each dataset's real raw label ids, so the real readers run.
Zoo: a small WaffleIron pretrained without labels on every sensor's train scans (it distils a fixed per-point
target of local geometry, as ScaLR distils DINOv2 features), then fine-tuned end to end per sensor with ScaLR's
head and loss. Releases are written as ScaLR writes them (`model.pth` with `model_points`, `ckpt_last.pth` with
`{epoch, net, optim, scheduler, scaler}`, `module.` prefixes, numpy scalars in the scheduler), so the release
readers run too. Everything is cached under a key of the recipe, the architecture, the seed and this code.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from taskmerge.cache import building, content_key
from taskmerge.decoders.training import PairedBatches, train_module
from taskmerge.settings.lidar import classes, datasets, layouts, synthetic
from taskmerge.settings.lidar.encoder import ScanBatch, WaffleIronConfig, WaffleIronEncoder
from taskmerge.settings.lidar.preprocess import Preprocessing
from taskmerge.settings.lidar.probe import PointHead, probe_loss
from taskmerge.settings.lidar.scans import PreparedScans, collate_scans, holdout

BENCH_VERSION = 1
TASKS = ("nuscenes", "semantic_kitti", "panda64", "pandagt")
# each synthetic class as a raw label of each dataset (nuScenes lidarseg fine index, SemanticKITTI raw id, PandaSet
# class id), chosen by the raw class names of `classes.RAW_NAMES`
RAW_CLASS_NAMES: dict[str, dict[str, str]] = {
    "nuscenes": {"road": "flat.driveable_surface", "sidewalk": "flat.sidewalk", "terrain": "flat.terrain",
                 "car": "vehicle.car", "truck": "vehicle.truck", "building": "static.manmade", "pole": "static.manmade",
                 "trunk": "static.vegetation", "pedestrian": "human.pedestrian.adult", "vegetation": "static.vegetation"},
    "semantic_kitti": {"road": "road", "sidewalk": "sidewalk", "terrain": "terrain", "car": "car", "truck": "truck",
                       "building": "building", "pole": "pole", "trunk": "trunk", "pedestrian": "person",
                       "vegetation": "vegetation"},
    "pandaset": {"road": "Road", "sidewalk": "Sidewalk", "terrain": "Ground", "car": "Car", "truck": "Semi-truck",
                 "building": "Building", "pole": "Pylons", "trunk": "Vegetation", "pedestrian": "Pedestrian",
                 "vegetation": "Vegetation"},
}
PANDASET_FRAMES_PER_SCENE = 8
DISTILL_DIMS = 6  # the pretraining target per point: linearity, planarity, scattering, verticality, height, density
_TARGET_NEIGHBORS = 16


@dataclass(frozen=True)
class Benchmark:
    """Where the generated benchmark lies: the data root (real layouts) and the ScaLR-format release files."""

    data_root: Path
    base: Path
    finetuned: dict[str, Path]


def raw_ids(dataset: str) -> np.ndarray:
    """Raw label id of each synthetic class (indexed like `synthetic.SCENE_CLASSES`) in `dataset`'s raw id space."""
    family = "pandaset" if dataset.startswith("panda") else dataset
    by_name = {name: raw for raw, name in classes.RAW_NAMES[dataset].items()}
    missing = [n for n in RAW_CLASS_NAMES[family].values() if n not in by_name]
    if missing:
        raise KeyError(f"{dataset}: raw classes {missing} not in classes.RAW_NAMES")
    return np.array([by_name[RAW_CLASS_NAMES[family][c]] for c in synthetic.SCENE_CLASSES], dtype=np.int64)


def build_benchmark(cache_dir: str | Path, config: WaffleIronConfig, recipe: Mapping[str, Any], val_fraction: float,
                    seed: int) -> Benchmark:
    """The benchmark for this architecture, recipe and seed: read from the cache, or generated and trained first
    (under a build lock, in a temporary folder renamed into place when complete). The fine-tunes train on the scans
    the setting keeps for training (`holdout(…, val_fraction)`), so its validation scans stay unseen."""
    sources = [Path(module.__file__).read_text() for module in (synthetic, layouts, datasets, classes)]
    sources.append(Path(__file__).read_text())
    key = content_key("lidar-builtin", BENCH_VERSION, asdict(config), dict(recipe), val_fraction, seed, sources)
    root = Path(cache_dir) / "lidar_builtin" / key[:24]
    if not (root / "complete.json").is_file():
        with building(root):
            if not (root / "complete.json").is_file():
                _build(root, config, recipe, val_fraction, seed)
    return _benchmark_at(root)


def _benchmark_at(root: Path) -> Benchmark:
    return Benchmark(root / "data", root / "releases" / "pretraining" / "model.pth",
                     {task: root / "releases" / "finetuning" / task / "ckpt_last.pth" for task in TASKS})


def _build(root: Path, config: WaffleIronConfig, recipe: Mapping[str, Any], val_fraction: float, seed: int) -> None:
    root.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        print(f"building the built-in LiDAR benchmark under {root} (synthetic scans, label-free pretraining, "
              f"{len(TASKS)} fine-tunes; a few minutes on 2 CPU cores, cached afterwards)", flush=True)
        write_data(work / "data", recipe["train_scans"], recipe["val_scans"], seed)
        bench = _benchmark_at(work)
        train = {task: _prepared(bench.data_root, task, config, seed) for task in TASKS}
        torch.manual_seed(seed)
        base = WaffleIronEncoder(config)
        distill = nn.Conv1d(config.channels, DISTILL_DIMS, 1)
        _pretrain(base, distill, list(train.values()), recipe, seed)
        _save_pretrained(bench.base, base, distill, recipe["pretrain_epochs"])
        for index, task in enumerate(TASKS):
            encoder = WaffleIronEncoder(config)
            encoder.load_state_dict(base.state_dict())
            head = PointHead(config.channels, classes.num_classes(task))
            kept, _ = holdout(len(train[task]), val_fraction)
            optim = _finetune(encoder, head, [train[task][i] for i in kept], recipe, seed + 1 + index, task)
            _save_finetuned(bench.finetuned[task], encoder, head, optim, recipe["finetune_epochs"])
        (work / "complete.json").write_text(json.dumps({"recipe": dict(recipe), "seed": seed, "config": asdict(config)}))
        if root.exists():
            shutil.rmtree(root)  # an incomplete earlier attempt
        work.rename(root)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_data(data_root: Path, train_scans: int, val_scans: int, seed: int) -> None:
    """Every sensor's train and val scans in its dataset's real layout, with that dataset's raw label ids (nuScenes
    points turned into its LIDAR_TOP axes: x right, y forward)."""
    generated = {sensor: {split: synthetic.scans(sensor, count, seed * 1000 + 2 * i + (split == "val"))
                          for split, count in (("train", train_scans), ("val", val_scans))}
                 for i, sensor in enumerate(TASKS)}
    ids = {dataset: raw_ids(dataset) for dataset in ("nuscenes", "semantic_kitti", "panda64")}
    layouts.write_nuscenes(data_root, [(split, _nuscenes_axes(points), ids["nuscenes"][labels])
                                       for split, scans in generated["nuscenes"].items() for points, labels in scans], seed=seed)
    layouts.write_semantic_kitti(data_root, [(split, points, ids["semantic_kitti"][labels])
                                             for split, scans in generated["semantic_kitti"].items() for points, labels in scans],
                                 seed=seed)
    pandaset = []
    for split in ("train", "val"):
        frames = [layouts.PandaSetFrame(p64, ids["panda64"][l64], pgt, ids["panda64"][lgt])
                  for (p64, l64), (pgt, lgt) in zip(generated["panda64"][split], generated["pandagt"][split])]
        pandaset += [layouts.PandaSetScene(split, frames[i : i + PANDASET_FRAMES_PER_SCENE])
                     for i in range(0, len(frames), PANDASET_FRAMES_PER_SCENE)]
    layouts.write_pandaset(data_root, pandaset, seed=seed)


def _nuscenes_axes(points: np.ndarray) -> np.ndarray:
    """Synthetic points (x forward, y left) in nuScenes' LIDAR_TOP axes (x right, y forward)."""
    out = points.copy()
    out[:, 0], out[:, 1] = -points[:, 1], points[:, 0]
    return out


def _prepared(data_root: Path, task: str, config: WaffleIronConfig, seed: int) -> PreparedScans:
    """A task's train scans through the real reader and the eval preprocessing."""
    mean, std = classes.INTENSITY[task]
    return PreparedScans(datasets.open_split(task, data_root, "train"), Preprocessing.for_encoder(config, mean, std),
                         1, seed)


def distillation_target(points: np.ndarray) -> np.ndarray:
    """A fixed label-free target per point `[M, 6]` from its neighbourhood: the covariance eigenvalues' linearity,
    planarity and scattering, verticality (1 - |normal z|), height above the scan's ground level (2nd percentile of
    z, in units of 2 m) and local density (neighbours within 0.5 m, over 16)."""
    from scipy.spatial import cKDTree

    tree = cKDTree(points)
    _, index = tree.query(points, k=_TARGET_NEIGHBORS)
    around = torch.from_numpy(points[index]).double()  # [M, K, 3]
    centred = around - around.mean(1, keepdim=True)
    values, vectors = torch.linalg.eigh(centred.transpose(1, 2) @ centred / _TARGET_NEIGHBORS)
    l3, l2, l1 = (values.clamp_min(1e-12).unbind(-1))
    linearity, planarity, scattering = (l1 - l2) / l1, (l2 - l3) / l1, l3 / l1
    verticality = 1.0 - vectors[:, 2, 0].abs()
    height = torch.from_numpy((points[:, 2] - np.percentile(points[:, 2], 2)) / 2.0)
    density = torch.from_numpy(np.array([len(n) for n in tree.query_ball_point(points, 0.5)]) / _TARGET_NEIGHBORS)
    return torch.stack([linearity, planarity, scattering, verticality, height, density], 1).float().numpy()


class _PointModel(nn.Module):
    """Encoder + a per-point head: logits `[P, K]` of the valid points of a batch, scan after scan."""

    def __init__(self, encoder: WaffleIronEncoder, head: nn.Module) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, batch: ScanBatch) -> torch.Tensor:
        tokens = self.encoder(batch)[batch.valid]  # [P, C]
        return self.head(tokens.T.unsqueeze(0))[0].T if isinstance(self.head, nn.Conv1d) else self.head(tokens)


def _batches(scans: Sequence[tuple[ScanBatch, Any]], targets: Sequence[torch.Tensor]) -> PairedBatches:
    def read(index: torch.Tensor) -> tuple[ScanBatch, torch.Tensor]:
        chosen = [int(i) for i in index]
        return collate_scans([scans[i] for i in chosen])[0], torch.cat([targets[i] for i in chosen])

    return PairedBatches(read, len(scans))


def _pretrain(encoder: WaffleIronEncoder, distill: nn.Conv1d, train: Sequence[PreparedScans], recipe: Mapping[str, Any],
              seed: int) -> list[float]:
    """Label-free pretraining on every sensor's scans: regress the standardised geometric target per point."""
    scans = [dataset[i] for dataset in train for i in range(len(dataset))]
    raw = [torch.from_numpy(distillation_target(batch.features[0, 1:4].T.numpy().astype(np.float64))) for batch, _ in scans]
    stacked = torch.cat(raw)
    mean, std = stacked.mean(0), stacked.std(0).clamp_min(1e-6)
    data = _batches(scans, [(t - mean) / std for t in raw])
    return train_module(_PointModel(encoder, distill), data.inputs, data.targets, F.mse_loss, recipe["pretrain_epochs"],
                        recipe["lr"], recipe["batch_size"], seed, weight_decay=0.01, desc="LiDAR base pretraining")


def _finetune(encoder: WaffleIronEncoder, head: PointHead, scans: Sequence[tuple[ScanBatch, Any]], recipe: Mapping[str, Any],
              seed: int, task: str) -> dict[str, Any]:
    """End-to-end fine-tuning on one sensor's labelled scans (CE + Lovász-softmax); the optimiser's settings."""
    data = _batches(scans, [labels.kept_labels for _, labels in scans])
    train_module(_PointModel(encoder, head), data.inputs, data.targets, probe_loss, recipe["finetune_epochs"],
                 recipe["lr"], recipe["batch_size"], seed, weight_decay=0.003, desc=f"LiDAR fine-tuning on {task}")
    return {"lr": recipe["lr"], "weight_decay": 0.003}


def _ddp_state(modules: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The state dict a DDP-wrapped Segmenter saves: every key `module.`-prefixed."""
    return {f"module.{prefix}.{key}": value.detach().clone() for prefix, module in modules.items()
            for key, value in module.state_dict().items()}


def _save(path: Path, payload: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(payload), path)


def _save_pretrained(path: Path, encoder: WaffleIronEncoder, distill: nn.Conv1d, epochs: int) -> None:
    """ScaLR's pretrained `model.pth`: the model under `model_points` with its distillation head `classif`."""
    _save(path, {"epoch": epochs, "model_points": _ddp_state({"embed": encoder.embed, "waffleiron": encoder.waffleiron,
                                                               "classif": distill})})


def _save_finetuned(path: Path, encoder: WaffleIronEncoder, head: PointHead, optim: Mapping[str, Any], epochs: int) -> None:
    """ScaLR's `ckpt_last.pth`: `{epoch, net, optim, scheduler, scaler}`, the scheduler's numbers numpy scalars."""
    net = _ddp_state({"embed": encoder.embed, "waffleiron": encoder.waffleiron, "classif": head.classif})
    scheduler = {"base_lrs": [np.float64(optim["lr"])], "last_epoch": epochs, "_last_lr": [np.float64(optim["lr"] * 0.01)]}
    _save(path, {"epoch": epochs, "net": net, "optim": {"param_groups": [dict(optim)], "state": {}},
                 "scheduler": scheduler, "scaler": {"scale": 65536.0, "growth_factor": 2.0}})
