"""The LiDAR setting (WaffleIron pretrained by ScaLR: nuScenes, SemanticKITTI, Panda64, PandaGT) assembled from a
config.

ScaLR releases in any layout are read once into the Segmenter's encoder keys (`embed.*`, `waffleiron.*`) and cached
as checksummed safetensors; merging happens there. Each task is evaluated by ScaLR's linear probe per point, trained
on the frozen encoder's features of the train scans (validation = a held-out part of train, test = the dataset's
val split, as the paper reports) and scored by mIoU on every original point. TAP compares per-point tokens at a
fixed, seeded subset of each scan's points (`tasks.probe_points`). `tasks.builtin=true` generates the built-in LiDAR
benchmark: synthetic scans in the four real layouts and a zoo trained on them (`builtin.py`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from torch.utils.data import Subset

from taskmerge.cache import content_key, read_tensors_entry, write_tensors_entry
from taskmerge.errors import UserError
from taskmerge.settings.lidar import classes, datasets
from taskmerge.settings import encoder_from_spec
from taskmerge.settings.lidar.encoder import WaffleIronConfig, WaffleIronEncoder, encoder_config, is_bn_statistic, recalibrate_batchnorm
from taskmerge.settings.lidar.preprocess import Preprocessing
from taskmerge.settings.lidar.probe import PointHead, PointLabels, score_probe, train_probe
from taskmerge.settings.lidar.releases import check_architecture, read_release, release_file
from taskmerge.settings.lidar.scans import PreparedScans, collate_scans, holdout
from taskmerge.tasks import DatasetSplit, ReferenceScorer, Task
from taskmerge.tasks.metrics import MeanIoU
from taskmerge.zoo import Zoo, release_path, required_path
from taskmerge import checkpoints

TASKS = ("nuscenes", "semantic_kitti", "panda64", "pandagt")
MERGE_DEFAULTS: dict[str, Any] = {}
DECODER_HEADS = {task: ("linear_probe",) for task in TASKS}  # ScaLR's BN1d + 1x1 conv per point
RELEASE_CACHE_VERSION = 1
PREPROCESSING_OVERRIDES = ("grids", "fov")
FEATURE_CACHE_BYTES = 4 * 2**30  # probe training features kept in memory up to this size; beyond, recomputed per step


def create_encoder(name: str, config: str = "waffleiron_768", **options: Any) -> nn.Module:
    """A WaffleIron encoder with random weights: the named configuration with the non-null options replaced."""
    return WaffleIronEncoder(_configured(config, options))


def _configured(config: str, options: Mapping[str, Any]) -> WaffleIronConfig:
    return encoder_config(config, **{k: v for k, v in options.items() if v is not None})


def _encoder_config(cfg: Mapping[str, Any]) -> WaffleIronConfig:
    """The configured architecture (no module built)."""
    return _configured(cfg["encoder"]["config"], {k: v for k, v in cfg["encoder"].items() if k not in ("name", "config")})


def check_inputs(cfg: Mapping[str, Any]) -> None:
    """Known task names and preprocessing overrides, then (real data) every data path and release file present,
    all missing ones listed at once; before anything is read or trained."""
    tasks_cfg, method = cfg["tasks"], cfg["method"]["name"]
    names = list(tasks_cfg["names"])
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise UserError(f"tasks.names: unknown LiDAR task(s) {unknown}; expected names from {list(TASKS)}")
    try:
        config = _encoder_config(cfg)
    except (TypeError, ValueError) as error:
        raise UserError(f"encoder={cfg['encoder']['config']} with {cfg['encoder']}: {error}") from None
    for task, override in tasks_cfg["preprocessing"].items():
        if task not in TASKS or not isinstance(override, Mapping) or set(override) - set(PREPROCESSING_OVERRIDES):
            raise UserError(f"tasks.preprocessing.{task}={override!r}: expected a task of {list(TASKS)} mapping to some "
                            f"of {list(PREPROCESSING_OVERRIDES)}")
        _check_extent(f"tasks.preprocessing.{task}", override, len(config.projections))
    if method == "adamerging" and cfg["method"]["loss"] == "entropy":
        raise UserError("method.loss=entropy needs frozen classification heads; the LiDAR tasks train a linear probe: "
                        "use method.loss=tap (AdaMerging-TAP, the paper's Tab. 2 row)")
    if any(n.startswith("panda") for n in names):
        datasets.require_pandas()
    if tasks_cfg["builtin"]:
        return  # generated when the zoo is loaded
    problems = []
    try:
        datasets.check_layout(names, required_path(tasks_cfg, "data_location", "paths.data=DIR"))
    except UserError as error:
        problems.append(str(error))
    files = {"tasks.base": tasks_cfg["base"], **{f"tasks.finetuned.{n}": tasks_cfg["finetuned"].get(n) for n in names}}
    missing = [f"{option}={path}" for option, path in files.items()
               if path is None or not release_path(tasks_cfg, option, path).exists()]
    if missing:
        problems.append("LiDAR release file(s) missing: " + "; ".join(missing) + " (ScaLR's pretrained model.pth, a "
                        "fine-tuning or linear-probing ckpt_last.pth, a folder holding one, or safetensors)")
    if problems:
        raise UserError("\n".join(problems))


def _check_extent(option: str, override: Mapping[str, Any], projections: int) -> None:
    """Grids: one [H, W] of positive integers per projection; FOV: [[x, y, z] min, [x, y, z] max] with min < max."""
    grids, fov = override.get("grids"), override.get("fov")
    if grids is not None and (len(grids) != projections or any(
            len(grid) != 2 or not all(isinstance(v, int) and v > 0 for v in grid) for grid in grids)):
        raise UserError(f"{option}.grids={grids!r} is invalid; expected {projections} [H, W] pairs of positive integers")
    if fov is not None and (len(fov) != 2 or any(len(corner) != 3 for corner in fov)
                            or not all(low < high for low, high in zip(*fov))):
        raise UserError(f"{option}.fov={fov!r} is invalid; expected [[x, y, z] minimum, [x, y, z] maximum] in metres, "
                        "each minimum below its maximum")


def _sources(cfg: Mapping[str, Any]) -> tuple[Path, dict[str, Path], Path]:
    """(base release, fine-tuned release per task, data root): configured, or generated for the built-in benchmark."""
    tasks_cfg = cfg["tasks"]
    if tasks_cfg["builtin"]:
        from taskmerge.settings.lidar.builtin import build_benchmark

        bench = build_benchmark(cfg["paths"]["cache_dir"], _encoder_config(cfg), tasks_cfg["synthetic"], tasks_cfg["val_fraction"],
                                cfg["seed"])
        return bench.base, {n: bench.finetuned[n] for n in tasks_cfg["names"]}, bench.data_root
    return (release_path(tasks_cfg, "tasks.base", tasks_cfg["base"]),
            {n: release_path(tasks_cfg, f"tasks.finetuned.{n}", tasks_cfg["finetuned"][n]) for n in tasks_cfg["names"]},
            required_path(tasks_cfg, "data_location", "paths.data=DIR"))


def load_zoo(cfg: Mapping[str, Any]) -> Zoo:
    """Every release's encoder converted once to safetensors (cached by the source file's content) and checked
    against the configured architecture."""
    base, finetuned, _ = _sources(cfg)
    folder = Path(cfg["paths"]["cache_dir"]) / "lidar_release"
    config = _encoder_config(cfg)
    converted = {name: _encoder_file(path, folder, config) for name, path in {"base": base, **finetuned}.items()}
    zoo = Zoo(key="", base=converted["base"], finetuned={n: converted[n] for n in finetuned}, heads={})
    return Zoo(key=content_key("lidar-zoo", zoo.fingerprints()), base=zoo.base, finetuned=zoo.finetuned, heads={})


def _encoder_file(source: Path, folder: Path, config: WaffleIronConfig) -> Path:
    """The encoder of a release as safetensors, converted on first use (keyed by the file's SHA-256, so a later
    run reads only the converted file) and checked against the configured architecture."""
    source = release_file(source)
    path = folder / f"{content_key(RELEASE_CACHE_VERSION, checkpoints.fingerprint(source))[:32]}.safetensors"
    if read_tensors_entry(path) is None:
        release = read_release(source)
        check_architecture(release.encoder, config, source)
        write_tensors_entry(path, release.encoder)
    else:
        check_architecture(checkpoints.LazyStateDict(path), config, source)
    return path


def preprocessing(cfg: Mapping[str, Any], task: str) -> Preprocessing:
    """Task `task`'s preprocessing: the encoder's voxels, grids, FOV and neighbours with the dataset's intensity
    constants, grids and FOV replaced where `tasks.preprocessing.<task>` says (PandaSet's larger extent)."""
    mean, std = classes.INTENSITY[task]
    prep = Preprocessing.for_encoder(_encoder_config(cfg), mean, std)
    override = cfg["tasks"]["preprocessing"].get(task) or {}
    tupled = {k: tuple(tuple(v) for v in value) for k, value in override.items()}
    return replace(prep, **tupled)


def build_tasks(cfg: Mapping[str, Any], zoo: Zoo) -> list[Task]:
    """The configured LiDAR tasks: splits of prepared scans, the mIoU metric, the linear-probe evaluator and, with
    `tasks.reference=own_head`, the fine-tuned releases' own heads as the normalization reference."""
    _, finetuned, root = _sources(cfg)
    tasks = [_build_task(cfg, name, root) for name in cfg["tasks"]["names"]]
    if cfg["tasks"]["reference"] == "own_head":
        folder = Path(cfg["paths"]["cache_dir"]) / "lidar_release"
        for task in tasks:
            task.reference = _own_head(task, _head_file(finetuned[task.name], folder))
    return tasks


def _head_file(source: Path, folder: Path) -> Path:
    """The `classif.*` head of a fine-tuned release as safetensors, extracted on first use."""
    source = release_file(source)
    path = folder / f"head-{content_key(RELEASE_CACHE_VERSION, checkpoints.fingerprint(source))[:32]}.safetensors"
    if read_tensors_entry(path) is None:
        release = read_release(source)
        if not release.head:
            raise UserError(f"{source}: no classif.* head in this {release.layout} file; tasks.reference=own_head needs the "
                            "fine-tuning (or linear-probing) ckpt_last.pth of every task")
        write_tensors_entry(path, release.head)
    return path


def _own_head(task: Task, head_file: Path) -> ReferenceScorer:
    """Scores a fine-tuned encoder with its release's own head (no re-training), by mIoU on every original point."""

    def score(encoder: WaffleIronEncoder, wanted: tuple[str, ...], protocol: Any) -> dict[str, float]:
        head = PointHead(encoder.embed_dim, task.num_outputs)
        try:
            head.load_state_dict(read_tensors_entry(head_file) or {})
        except RuntimeError as error:
            raise UserError(f"{head_file}: the head of task {task.name!r} does not fit a {task.num_outputs}-class probe on "
                            f"{encoder.embed_dim} channels: {error}") from None
        return {split: score_probe(head, scan_features(encoder, task.splits[split], protocol.feature_batch_size),
                                   task.num_outputs) for split in wanted}

    return ReferenceScorer(checkpoints.fingerprint(head_file), score)


def _build_task(cfg: Mapping[str, Any], name: str, root: Path) -> Task:
    tasks_cfg = cfg["tasks"]
    prep = preprocessing(cfg, name)
    train_all = PreparedScans(datasets.open_split(name, root, "train"), prep, tasks_cfg["probe_points"], cfg["seed"])
    test = PreparedScans(datasets.open_split(name, root, "val"), prep, tasks_cfg["probe_points"], cfg["seed"])
    kept, held_out = holdout(len(train_all), tasks_cfg["val_fraction"])
    train_cap, eval_cap = tasks_cfg["max_train_scans"], tasks_cfg["max_eval_scans"]
    parts = {"train": (train_all, kept[:train_cap]), "val": (train_all, held_out[:eval_cap]),
             "test": (test, list(range(len(test)))[:eval_cap])}
    splits = {split: DatasetSplit(Subset(dataset, indices), {**dataset.description(), "indices": indices},
                                  tasks_cfg["num_workers"], collate=collate_scans)
              for split, (dataset, indices) in parts.items()}
    count = classes.num_classes(name)
    metric_factory: Callable[[], MeanIoU] = lambda: MeanIoU(count, ignore_index=classes.IGNORE_INDEX)
    return Task(name, "segmentation", count, splits, metric_factory, evaluator=_probe_evaluator(name, count, splits))


@torch.no_grad()
def scan_features(encoder: WaffleIronEncoder, split: DatasetSplit, batch_size: int) -> Iterator[tuple[torch.Tensor, PointLabels]]:
    """(features `[M, C]` of a scan's kept points, its labels) for every scan of `split`, in order."""
    encoder.eval()
    device = next(encoder.parameters()).device
    for batch, targets in split.batches(batch_size):
        tokens = encoder.features(replace(batch, probe=None).to(device), "tokens").float().cpu()
        for row, target in enumerate(targets):
            yield tokens[row, : len(target.kept)], target


class _TrainFeatures:
    """A probe's training data: the frozen encoder's point features of the train scans and their labels, computed on
    first use and kept while they fit in `FEATURE_CACHE_BYTES`, recomputed per step beyond (real datasets at 768)."""

    def __init__(self, encoder: WaffleIronEncoder, split: DatasetSplit, batch_size: int) -> None:
        self.encoder, self.split, self.batch_size = encoder, split, batch_size
        self.kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.bytes = 0

    def read(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        wanted = [int(i) for i in index]
        missing = [i for i in wanted if i not in self.kept]
        computed = {} if not missing else dict(zip(missing, ((features, target.kept_labels) for features, target in
                                      scan_features(self.encoder, self.split.subset(torch.tensor(missing)), self.batch_size))))
        for i, (features, labels) in computed.items():
            if self.bytes + features.numel() * features.element_size() <= FEATURE_CACHE_BYTES:
                self.kept[i] = (features, labels)
                self.bytes += features.numel() * features.element_size()
        parts = [self.kept.get(i) or computed[i] for i in wanted]
        return torch.cat([f for f, _ in parts]), torch.cat([labels for _, labels in parts])


def _probe_evaluator(name: str, count: int, splits: Mapping[str, DatasetSplit]) -> Callable[..., dict[str, float]]:
    """Eval of a LiDAR task: a linear probe trained on the frozen encoder's features of the protocol's train scans,
    then its mIoU on each split asked for."""

    def evaluate(encoder: WaffleIronEncoder, wanted: tuple[str, ...], protocol: Any) -> dict[str, float]:
        train = _TrainFeatures(encoder, protocol.training_split(splits["train"]), protocol.feature_batch_size)
        head = train_probe(train.read, len(train.split), encoder.embed_dim, count, protocol.epochs, protocol.lr,
                           protocol.batch_size, protocol.weight_decay, protocol.seed, desc=f"{name} linear probe")
        return {split: score_probe(head, scan_features(encoder, splits[split], protocol.feature_batch_size), count)
                for split in wanted}

    return evaluate


def post_merge(cfg: Mapping[str, Any], zoo: Zoo, tasks: list[Task]) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None:
    """The BatchNorm statistics policy (`tasks.bn_stats`; spec lidar §9 Q3): `merge` leaves them merged like weights
    (the encoder clamps a negative variance at 0), `keep_base` puts the base's back, `recalibrate` re-estimates them
    on TAP's unlabeled scans, one plain average per merged encoder."""
    policy = cfg["tasks"]["bn_stats"]
    if policy == "merge":
        return None
    base = {key: value for key, value in checkpoints.load_state_dict(zoo.base).items() if is_bn_statistic(key)}
    if policy == "keep_base":
        return lambda merged: {**merged, **base}
    tap_cfg = cfg["tap"]
    samples = [task.unlabeled(min(tap_cfg["n_samples"], len(task.splits["train"])), tap_cfg["seed"]) for task in tasks]
    spec = dict(cfg["encoder"])

    def recalibrate(merged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        encoder = encoder_from_spec(spec)
        encoder.load_state_dict(encoder.encoder_weights(merged))
        recalibrate_batchnorm(encoder, (scan for sample in samples for scan in sample.batches(1)))
        return {**merged, **{k: v for k, v in encoder.state_dict().items() if is_bn_statistic(k)}}

    return recalibrate


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The encoder of any ScaLR release layout (or safetensors) in the Segmenter's keys."""
    return read_release(path).encoder
