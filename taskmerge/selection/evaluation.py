"""Eval: re-train each task's decoder on a frozen encoder and measure its metric on a split, or, where the
setting ships frozen heads (CLIP), apply those heads as they are.

The encoder is frozen, so its features are extracted once per split and the decoder is trained on
those tensors: the same result as training through the frozen encoder, at a fraction of the cost.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch
from torch import nn

from taskmerge.config_fields import checked, count, non_negative, positive
from taskmerge.decoders import build_decoder
from taskmerge.distributed import Distributed
from taskmerge.decoders.training import predict, train_module
from taskmerge.encoders.extract import extract_split
from taskmerge.merging._helpers import int_at_least, optional
from taskmerge.tasks import DatasetSplit, Split, Task
from taskmerge.tasks.metrics import normalized


@dataclass(frozen=True)
class DecoderProtocol:
    """How decoders are re-trained on a frozen encoder (also the source of the `decoder=linear` schema)."""

    epochs: int = count(30)
    lr: float = positive(3e-3)
    batch_size: int = count(128)
    weight_decay: float = non_negative(0.01)
    # decoders train on this many train samples (a seeded subset), all of them when null: the reduced protocols
    train_images: Optional[int] = checked(None, optional(int_at_least(1)), "null or an integer >= 1")
    # the decoder head, for tasks that offer several (their setting's `DECODER_HEADS`); null: each task's default
    head: Optional[str] = None
    # task -> overrides of the fields above for that task's decoder (e.g. {nyud: {head: dpt, lr: 1.0e-4}})
    per_task: dict[str, dict[str, Any]] = field(default_factory=dict)
    seed: int = 0
    feature_batch_size: int = count(256)  # samples per forward pass of the frozen encoder (a few scans for LiDAR)

    def for_task(self, task: str) -> DecoderProtocol:
        """The protocol of `task`'s decoder: these fields with its `per_task` overrides."""
        return dataclasses.replace(self, **self.per_task.get(task, {}), per_task={})

    def training_split(self, split: Split | DatasetSplit) -> Split | DatasetSplit:
        """The part of a train split decoders train on: `train_images` samples drawn with the protocol's seed."""
        if self.train_images is None or self.train_images >= len(split):
            return split
        generator = torch.Generator().manual_seed(self.seed)
        return split.subset(torch.randperm(len(split), generator=generator)[: self.train_images].sort().values)


@dataclass(frozen=True)
class FrozenHeadProtocol:
    """Eval with every task's own frozen head (the CLIP benchmark's zero-shot-style heads): no training."""

    feature_batch_size: int = 256


EvalProtocol = DecoderProtocol | FrozenHeadProtocol


def _score(decoder: nn.Module, encoder: nn.Module, task: Task, split: str, batch_size: int) -> float:
    """`task`'s metric on `split` of `decoder` applied to the frozen encoder's features."""
    features, targets = extract_split(encoder, task.splits[split].batches(batch_size), decoder.feature_kind)
    metric = task.metric_factory()
    metric.update(predict(decoder, features), targets)
    return metric.compute()


def evaluate_task_splits(encoder: nn.Module, task: Task, splits: tuple[str, ...], protocol: EvalProtocol) -> dict[str, float]:
    """Train `task`'s decoder once on the frozen encoder's train features (or take its frozen head under
    FrozenHeadProtocol); its metric on each of `splits`."""
    if isinstance(protocol, DecoderProtocol):
        protocol = protocol.for_task(task.name)
    if task.evaluator is not None and isinstance(protocol, DecoderProtocol):
        return task.evaluator(encoder, splits, protocol)
    if isinstance(protocol, FrozenHeadProtocol):
        if task.head is None:
            raise ValueError(f"task {task.name!r} has no frozen head; decoder=frozen_head needs a setting that ships heads (CLIP)")
        return {split: _score(task.head, encoder, task, split, protocol.feature_batch_size) for split in splits}
    torch.manual_seed(protocol.seed)
    decoder = build_decoder(task.kind, encoder.embed_dim, task.num_outputs, encoder.patch_size, encoder.grid_size)
    train_features, train_targets = extract_split(encoder, protocol.training_split(task.splits["train"]).batches(protocol.feature_batch_size),
                                                  decoder.feature_kind)
    train_module(
        decoder, train_features, train_targets, task.loss, protocol.epochs, protocol.lr, protocol.batch_size,
        protocol.seed, protocol.weight_decay,
    )
    return {split: _score(decoder, encoder, task, split, protocol.feature_batch_size) for split in splits}


def evaluate_task(encoder: nn.Module, task: Task, split: str, protocol: EvalProtocol) -> float:
    """`task`'s metric on `split` under `protocol`: a decoder trained on the frozen encoder, or its frozen head."""
    return evaluate_task_splits(encoder, task, (split,), protocol)[split]


def evaluate_encoder(encoder: nn.Module, tasks: list[Task], split: str, protocol: EvalProtocol,
                     distributed: Distributed = Distributed()) -> dict[str, float]:
    """Metric per task on `split` under `protocol` (decoders trained afresh, or frozen heads); with several
    processes each rank evaluates its share of the tasks and every rank gets all metrics."""
    part = {task.name: evaluate_task(encoder, task, split, protocol) for task in distributed.shard(tasks)}
    metrics = distributed.gather_dict(part)
    return {task.name: metrics[task.name] for task in tasks}


def normalize_scores(metrics: Mapping[str, float], finetuned: Mapping[str, float], tasks: list[Task]) -> dict[str, float]:
    """Per-task normalized performance against the fine-tuned metrics, plus their mean under `"normalized"`."""
    per_task = {t.name: normalized(metrics[t.name], finetuned[t.name], t.higher_is_better) for t in tasks}
    return {**per_task, "normalized": sum(per_task.values()) / len(per_task)}


def evaluate_frozen(encoder: nn.Module, task: Task, head: nn.Module, split: str, protocol: EvalProtocol) -> float:
    """The metric on `split` of a decoder kept frozen (the fine-tuned model's own head) on top of `encoder`:
    the paper's Appendix E baseline, no re-training."""
    return _score(head, encoder, task, split, protocol.feature_batch_size)
