"""The dense setting (DUNE / DINOv2 ViT-B/14: ADE20k, NYUd, BEDLAM, MapFree) assembled from a config.

Releases in any supported layout are read once into the canonical key space (DINOv2 names, unchunked blocks,
before the cls/pos fold) and cached as checksummed safetensors: merging happens there, and the encoder folds
when it loads. ADE20k and NYUd are evaluated by in-framework decoders trained on the frozen encoder's
intermediate features (validation = a held-out part of train, test = the public val/test split); BEDLAM and
MapFree by an external command (`tasks.external.<task>`), fed the merged encoder in its release layout.
"""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from taskmerge import checkpoints
from taskmerge.cache import content_key, read_tensors_entry, write_tensors_entry
from taskmerge.decoders.training import PairedBatches, predict, train_module
from taskmerge.errors import UserError
from taskmerge.settings.dense import datasets, external
from taskmerge.settings.dense.decoders import FEATURE_SPECS, PackedInput, build_dense_decoder, dense_loss, pack_features
from taskmerge.settings.dense.encoder import DenseViT
from taskmerge.settings.dense.metrics import DepthRMSE, SegmentationMIoU
from taskmerge.settings.dense.releases import check_same_grid, load_canonical, pos_grid
from taskmerge.tasks import DatasetSplit, Task
from taskmerge.zoo import Zoo, release_path, required_path

ENCODERS = {"dense": DenseViT}
MERGE_DEFAULTS: dict[str, Any] = {}
IN_FRAMEWORK = {"ade20k": "segmentation", "nyud": "depth"}  # tasks whose decoders taskmerge trains
DECODER_HEADS = {"ade20k": ("linear_seg",), "nyud": ("linear_depth", "dpt")}  # `decoder.head` choices; first = default
EXTERNAL_ONLY = ("bedlam", "mapfree")  # tasks whose decoders live in another codebase
DATASET_OF = {"ade20k": "ade20k", "nyud": "nyu", "bedlam": "bedlam", "mapfree": "mapfree"}  # task -> data reader
RELEASE_CACHE_VERSION = 1
SPEC_DEPTH = 12  # FEATURE_SPECS count blocks of a 12-block ViT-B; other depths take the same relative blocks
SIGLOSS_WARMUP = 100 / 38_400  # DINOv2's NYU protocol: SigLoss's mean-term warm-up is 100 of 38,400 iterations
FEATURE_CACHE_BYTES = 4 * 2**30  # train features up to this size are computed once; beyond, per step (real ADE20k/NYU)


def create_encoder(name: str, **kwargs: Any) -> nn.Module:
    """A dense encoder with random weights (the release's weights are loaded after)."""
    return ENCODERS[name](**kwargs)


def check_inputs(cfg: Mapping[str, Any]) -> None:
    """Known task names, a decoder for every task (in-framework or an external command), every data folder and
    release file present (all missing ones listed at once); before anything is read or trained."""
    tasks_cfg, method = cfg["tasks"], cfg["method"]["name"]
    names = list(tasks_cfg["names"])
    unknown = [n for n in names if n not in (*IN_FRAMEWORK, *EXTERNAL_ONLY)]
    if unknown:
        raise UserError(f"tasks.names: unknown dense task(s) {unknown}; expected names from {[*IN_FRAMEWORK, *EXTERNAL_ONLY]}")
    for name in names:
        _decoder_of(tasks_cfg, name)
    if method == "adamerging" and cfg["method"]["loss"] == "entropy":
        raise UserError("method.loss=entropy needs frozen classification heads; the dense tasks have trainable decoders: "
                        "use method.loss=tap (AdaMerging-TAP, the paper's Tab. 3/4 row)")
    if tasks_cfg["demo"]:
        demo_tasks = ("ade20k", "nyud")
        if any(n not in demo_tasks for n in names):
            raise UserError(f"tasks.demo=true generates {list(demo_tasks)} only; got tasks.names={names}")
        return  # the demo generates its data and releases when the zoo is loaded
    datasets.check_layout([DATASET_OF[n] for n in names], required_path(tasks_cfg, "data_location", "paths.data=DIR"))
    files = {"tasks.base": tasks_cfg["base"], **{f"tasks.finetuned.{n}": tasks_cfg["finetuned"].get(n) for n in names}}
    missing = [f"{option}={path}" for option, path in files.items()
               if path is None or not release_path(tasks_cfg, option, path).is_file()]
    if missing:
        raise UserError("dense release file(s) missing: " + "; ".join(missing) + " (a DUNE `{model, args, iter}` .pth, a "
                        "DINOv2 state dict, a Multi-HMR checkpoint or safetensors)")


def _decoder_of(tasks_cfg: Mapping[str, Any], name: str) -> str | external.ExternalDecoder:
    """Task `name`'s decoder: an external command if `tasks.external.<name>` is set, else "in-framework" (its head
    is the decoder protocol's choice, `decoder.head`)."""
    spec = tasks_cfg["external"].get(name)
    if spec is not None:
        allowed = {f.name for f in fields(external.ExternalDecoder)} | {"metric", "higher_is_better"}
        unknown = sorted(set(spec) - allowed) if isinstance(spec, Mapping) else None
        if unknown is None or unknown or "command" not in spec:
            raise UserError(f"tasks.external.{name}={spec!r}: expected a mapping with `command` and optionally "
                            f"{sorted(allowed - {'command'})}" + (f"; unknown keys {unknown}" if unknown else ""))
        return external.ExternalDecoder(**{k: v for k, v in spec.items() if k not in ("metric", "higher_is_better")})
    if name not in IN_FRAMEWORK:
        raise UserError(f"task {name!r} has no in-framework decoder: set tasks.external.{name}.command (see the README's "
                        "external decoder templates) or leave it out of tasks.names")
    return "in-framework"


def _release_paths(cfg: Mapping[str, Any]) -> tuple[Path, dict[str, Path], Path]:
    """(base, fine-tuned per task, data root) of the configured release, or of the generated demo."""
    tasks_cfg = cfg["tasks"]
    if tasks_cfg["demo"]:
        from taskmerge.settings.dense.demo import DemoConfig, build_demo

        encoder_cfg = cfg["encoder"]  # the demo zoo is trained for the configured architecture
        architecture = {k: encoder_cfg[k] for k in ("embed_dim", "depth", "num_heads", "reg_tokens", "image_size")}
        demo = build_demo(cfg["paths"]["cache_dir"], DemoConfig(**architecture, seed=cfg["seed"]))
        return demo.base, {n: demo.finetuned[n] for n in tasks_cfg["names"]}, demo.data_root
    return (release_path(tasks_cfg, "tasks.base", tasks_cfg["base"]),
            {n: release_path(tasks_cfg, f"tasks.finetuned.{n}", tasks_cfg["finetuned"][n]) for n in tasks_cfg["names"]},
            required_path(tasks_cfg, "data_location", "paths.data=DIR"))


def load_zoo(cfg: Mapping[str, Any]) -> Zoo:
    """The releases converted once to canonical safetensors (cached by the source file's content), their
    position grids checked against each other and against the encoder's `native_size`."""
    base, finetuned, _ = _release_paths(cfg)
    folder = Path(cfg["paths"]["cache_dir"]) / "dense_release"
    converted = {name: _canonical_file(path, folder) for name, path in {"base": base, **finetuned}.items()}
    grid = check_same_grid({name: checkpoints.LazyStateDict(path) for name, path in converted.items()})
    encoder_cfg = cfg["encoder"]
    native = encoder_cfg["native_size"] or encoder_cfg["image_size"]
    if native != grid * 14:
        raise UserError(f"the releases' position grid is {grid}x{grid} ({grid * 14} px) but encoder.native_size resolves to "
                        f"{native} px: set encoder.native_size={grid * 14}")
    zoo = Zoo(key="", base=converted["base"], finetuned={n: converted[n] for n in finetuned}, heads={})
    return Zoo(key=content_key("dense-zoo", zoo.fingerprints()), base=zoo.base, finetuned=zoo.finetuned, heads={})


def _canonical_file(source: Path, folder: Path) -> Path:
    """The canonical safetensors of a release file, converted on first use (keyed by the file's SHA-256)."""
    path = folder / f"{content_key(RELEASE_CACHE_VERSION, checkpoints.fingerprint(source))[:32]}.safetensors"
    if read_tensors_entry(path) is None:
        canonical = load_canonical(source)
        pos_grid(canonical, str(source))
        write_tensors_entry(path, canonical)
    return path


def build_tasks(cfg: Mapping[str, Any], zoo: Zoo) -> list[Task]:
    """The configured dense tasks with their splits, metrics and evaluators."""
    _, _, root = _release_paths(cfg)
    return [_build_task(cfg, name, root) for name in cfg["tasks"]["names"]]


def _build_task(cfg: Mapping[str, Any], name: str, root: Path) -> Task:
    tasks_cfg, size = cfg["tasks"], cfg["encoder"]["image_size"]
    decoder = _decoder_of(tasks_cfg, name)
    if name in IN_FRAMEWORK:
        reader = datasets.ADE20k if name == "ade20k" else datasets.NYUDepth
        train_all = reader(root, "train", image_size=size, target="input")
        test = reader(root, "val" if name == "ade20k" else "test", image_size=size, target="original")
    else:
        read_images = datasets.bedlam_images if name == "bedlam" else datasets.mapfree_images
        train_all = read_images(root, "train", image_size=size)
        test = read_images(root, "val", image_size=size)
    kept, held_out = datasets.holdout_indices(len(train_all), tasks_cfg["val_fraction"], seed=0)
    train_cap, eval_cap = tasks_cfg["max_train_images"], tasks_cfg["max_eval_images"]
    parts = {"train": (train_all, kept[:train_cap]), "val": (train_all, held_out[:eval_cap]),
             "test": (test, list(range(len(test)))[:eval_cap])}
    splits = {split: _split(dataset, indices, tasks_cfg["num_workers"]) for split, (dataset, indices) in parts.items()}
    if isinstance(decoder, external.ExternalDecoder):
        spec = tasks_cfg["external"][name]
        metric = _Reported(spec.get("metric", "score"), bool(spec.get("higher_is_better", True)))
        evaluator = _external_evaluator(name, decoder, root, cfg["paths"]["cache_dir"])
        return Task(name, "external", 0, splits, lambda: metric, evaluator=evaluator)
    classes = tasks_cfg["seg_classes"]
    metric_factory: Callable[[], Any] = ((lambda: SegmentationMIoU(classes)) if name == "ade20k"
                                         else lambda: DepthRMSE(eval_box=test.eval_box()))
    kind = IN_FRAMEWORK[name]
    outputs = classes if kind == "segmentation" else 1
    return Task(name, kind, outputs, splits, metric_factory, evaluator=_decoder_evaluator(name, outputs, splits, metric_factory))


def _split(dataset: Dataset, indices: list[int], num_workers: int) -> DatasetSplit:
    description = {**dataset.description(), "indices": indices}  # type: ignore[attr-defined]
    return DatasetSplit(Subset(dataset, indices), description, num_workers, collate=datasets.collate_dense)


class _Reported:
    """The metric an external command reports (name and direction from the config); never accumulated here."""

    def __init__(self, name: str, higher_is_better: bool) -> None:
        self.name, self.higher_is_better = name, higher_is_better


def feature_spec(decoder: str, depth: int) -> dict[str, Any]:
    """The decoder's feature spec (spec §3) for an encoder of `depth` blocks: ViT-B's block indices mapped to the
    same relative depth (block 11 of 12 is always the last one)."""
    spec = dict(FEATURE_SPECS[decoder])
    spec["layers"] = [round((layer + 1) * depth / SPEC_DEPTH) - 1 for layer in spec["layers"]]
    return spec


@torch.no_grad()
def _pack(encoder: DenseViT, images: torch.Tensor, spec: Mapping[str, Any]) -> torch.Tensor:
    """Packed intermediate features (`pack_features`, CPU float32) of one batch; the cls token always packed (a
    decoder that does not read it ignores it)."""
    encoder.eval()
    device = next(encoder.parameters()).device
    return pack_features(encoder.intermediate(images.to(device), **{**spec, "with_cls": True})).float().cpu()


def _training_data(encoder: DenseViT, split: DatasetSplit, spec: Mapping[str, Any], batch_size: int) -> tuple[Any, Any]:
    """(inputs, targets) a decoder trains on: the split's packed features computed once when they fit in
    `FEATURE_CACHE_BYTES`, else computed per training step."""
    layers, (height, width) = len(spec["layers"]), encoder.grid_size
    if len(split) * layers * encoder.embed_dim * (height * width + 1) * 4 > FEATURE_CACHE_BYTES:

        def read(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            images, targets = datasets.collate_dense([split.dataset[int(i)] for i in index])
            return _pack(encoder, images, spec), targets

        per_step = PairedBatches(read, len(split))
        return per_step.inputs, per_step.targets
    features, targets = zip(*((_pack(encoder, images, spec), target) for images, target in split.batches(batch_size)))
    return torch.cat(features), torch.cat(targets)


def _decoder_evaluator(name: str, num_outputs: int, splits: Mapping[str, DatasetSplit],
                       metric_factory: Callable[[], Any]) -> Callable[..., dict[str, float]]:
    """Eval of an in-framework dense task: the protocol's head for it (`decoder.head`, else the task's default)
    trained on the frozen encoder's train features (the protocol's epochs, lr, batch, weight decay, train subset
    and seed), then its metric on each split asked for, batch by batch."""

    def evaluate(encoder: DenseViT, wanted: tuple[str, ...], protocol: Any) -> dict[str, float]:
        head = protocol.head or DECODER_HEADS[name][0]
        spec = feature_spec(head, len(encoder.blocks))
        inputs, targets = _training_data(encoder, protocol.training_split(splits["train"]), spec, protocol.feature_batch_size)
        torch.manual_seed(protocol.seed)
        module = PackedInput(build_dense_decoder(head, encoder.embed_dim, num_outputs), encoder.grid_size)
        steps = protocol.epochs * math.ceil(len(inputs) / protocol.batch_size)
        loss = dense_loss(head, warm_iter=round(steps * SIGLOSS_WARMUP))  # the reference's share of the run
        train_module(module, inputs, targets, loss, protocol.epochs, protocol.lr, protocol.batch_size, protocol.seed,
                     protocol.weight_decay, desc=f"{name} {head} decoder")
        scores = {}
        for split in wanted:
            metric = metric_factory()
            for images, target in splits[split].batches(protocol.feature_batch_size):
                metric.update(predict(module, _pack(encoder, images, spec)), target)
            scores[split] = metric.compute()
        return scores

    return evaluate


def _external_evaluator(name: str, decoder: external.ExternalDecoder, root: Path, cache_dir: str) -> Callable[..., dict[str, float]]:
    """Eval of an external task: the merged encoder exported in the decoder's layout and scored by its command."""

    def evaluate(encoder: DenseViT, wanted: tuple[str, ...], protocol: Any) -> dict[str, float]:
        canonical = encoder.canonical_weights()
        results = {split: external.evaluate(decoder, canonical, root, split, protocol.seed, cache_dir, name) for split in wanted}
        return {split: result.value if math.isfinite(result.value) else math.nan for split, result in results.items()}

    return evaluate


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A dense encoder file in any release layout (DUNE, DINOv2, Multi-HMR, safetensors) as canonical weights."""
    return load_canonical(path)
