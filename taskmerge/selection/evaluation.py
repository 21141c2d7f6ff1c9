"""Eval: re-train each task's decoder on a frozen encoder and measure its metric on a split.

The encoder is frozen, so its features are extracted once per split and the decoder is trained on
those tensors: the same result as training through the frozen encoder, at a fraction of the cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from taskmerge.decoders import build_decoder
from taskmerge.distributed import Distributed
from taskmerge.decoders.training import predict, train_module
from taskmerge.encoders.extract import extract_features
from taskmerge.tasks import Task
from taskmerge.tasks.metrics import normalized


@dataclass(frozen=True)
class DecoderProtocol:
    """How decoders are re-trained on a frozen encoder."""

    epochs: int = 30
    lr: float = 3e-3
    batch_size: int = 128
    weight_decay: float = 0.01
    seed: int = 0
    feature_batch_size: int = 256


def evaluate_task_splits(encoder: nn.Module, task: Task, splits: tuple[str, ...], protocol: DecoderProtocol) -> dict[str, float]:
    """Train `task`'s decoder once on the frozen encoder's train features; its metric on each of `splits`."""
    torch.manual_seed(protocol.seed)
    decoder = build_decoder(task.kind, encoder.embed_dim, task.num_outputs, encoder.patch_size, encoder.grid_size)
    kind = decoder.feature_kind
    train = task.splits["train"]
    train_features = extract_features(encoder, train.images, kind, protocol.feature_batch_size)
    train_module(
        decoder, train_features, train.targets, task.loss, protocol.epochs, protocol.lr, protocol.batch_size,
        protocol.seed, protocol.weight_decay,
    )
    scores = {}
    for split in splits:
        held_out = task.splits[split]
        metric = task.metric_factory()
        metric.update(predict(decoder, extract_features(encoder, held_out.images, kind, protocol.feature_batch_size)), held_out.targets)
        scores[split] = metric.compute()
    return scores


def evaluate_task(encoder: nn.Module, task: Task, split: str, protocol: DecoderProtocol) -> float:
    """Train `task`'s decoder on the frozen encoder's train features and return its metric on `split`."""
    return evaluate_task_splits(encoder, task, (split,), protocol)[split]


def evaluate_encoder(encoder: nn.Module, tasks: list[Task], split: str, protocol: DecoderProtocol,
                     distributed: Distributed = Distributed()) -> dict[str, float]:
    """Metric per task on `split` with freshly trained decoders; with several processes each rank trains its
    share of the tasks' decoders and every rank gets all metrics."""
    part = {task.name: evaluate_task(encoder, task, split, protocol) for task in distributed.shard(tasks)}
    metrics = distributed.gather_dict(part)
    return {task.name: metrics[task.name] for task in tasks}


def normalize_scores(metrics: Mapping[str, float], finetuned: Mapping[str, float], tasks: list[Task]) -> dict[str, float]:
    """Per-task normalized performance against the fine-tuned metrics, plus their mean under `"normalized"`."""
    per_task = {t.name: normalized(metrics[t.name], finetuned[t.name], t.higher_is_better) for t in tasks}
    return {**per_task, "normalized": sum(per_task.values()) / len(per_task)}


def evaluate_frozen(encoder: nn.Module, task: Task, head: nn.Module, split: str, protocol: DecoderProtocol) -> float:
    """The metric on `split` of a decoder kept frozen (the fine-tuned model's own head) on top of `encoder`:
    the paper's Appendix E baseline, no re-training."""
    held_out = task.splits[split]
    outputs = predict(head, extract_features(encoder, held_out.images, head.feature_kind, protocol.feature_batch_size))
    metric = task.metric_factory()
    metric.update(outputs, held_out.targets)
    return metric.compute()
