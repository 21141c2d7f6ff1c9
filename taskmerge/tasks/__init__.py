"""Tasks: a name, labelled splits, a decoder kind, a loss and a metric with its direction."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from taskmerge.tasks import builtin_data
from taskmerge.tasks.metrics import RMSE, Accuracy, MeanIoU, Metric

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    """In-memory images `[N, 3, S, S]` in [0, 1] and their targets."""

    images: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class Task:
    """One downstream task; `kind` picks the decoder (classification, segmentation or depth)."""

    name: str
    kind: str
    num_outputs: int
    splits: dict[str, Split]
    metric_factory: Callable[[], Metric] = field(repr=False)

    @property
    def higher_is_better(self) -> bool:
        return self.metric_factory().higher_is_better

    @property
    def metric_name(self) -> str:
        return self.metric_factory().name

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Training loss of the task's decoder: cross-entropy, or L1 for depth."""
        if self.kind == "depth":
            return F.l1_loss(output[:, 0], target)
        return F.cross_entropy(output, target)

    def unlabeled_images(self, n: int, seed: int) -> torch.Tensor:
        """`n` training images drawn without replacement with `seed` (TAP's unlabeled set)."""
        train = self.splits["train"].images
        if n > len(train):
            raise ValueError(f"task {self.name!r}: tap.n_samples={n} exceeds its {len(train)} training images")
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
        return train[order[:n].sort().values]


_BUILTIN = {
    "digits": (builtin_data.digits, "classification", 10, Accuracy),
    "textures": (builtin_data.textures, "classification", len(builtin_data.TEXTURE_CLASSES), Accuracy),
    "shapes": (builtin_data.shapes, "segmentation", len(builtin_data.SHAPE_CLASSES), None),
    "scenes": (builtin_data.scenes, "depth", 1, RMSE),
}


def builtin_task_names() -> list[str]:
    """Names of the tasks of the built-in benchmark."""
    return list(_BUILTIN)


def build_builtin_task(name: str, n_train: int, n_val: int, n_test: int, image_size: int, seed: int) -> Task:
    """Generate one built-in task; its data depends only on (name, sizes, image_size, seed)."""
    if name not in _BUILTIN:
        raise KeyError(f"unknown built-in task {name!r}; available: {builtin_task_names()}")
    generate, kind, num_outputs, metric_cls = _BUILTIN[name]
    images, targets = generate(n_train + n_val + n_test, image_size, seed + zlib.crc32(name.encode()))
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, None)}
    splits = {s: Split(images[a:b], targets[a:b]) for s, (a, b) in bounds.items()}
    factory = (lambda: MeanIoU(num_outputs)) if kind == "segmentation" else metric_cls
    return Task(name=name, kind=kind, num_outputs=num_outputs, splits=splits, metric_factory=factory)
