"""The built-in benchmark's four tasks, generated from a seed: names, decoder kinds, metrics and splits."""

from __future__ import annotations

import zlib

from taskmerge.settings.builtin import data as builtin_data
from taskmerge.tasks import Split, Task
from taskmerge.tasks.metrics import RMSE, Accuracy, MeanIoU

_BUILTIN = {
    "digits": (builtin_data.digits, "classification", 10, Accuracy),
    "textures": (builtin_data.textures, "classification", len(builtin_data.TEXTURE_CLASSES), Accuracy),
    "shapes": (builtin_data.shapes, "segmentation", len(builtin_data.SHAPE_CLASSES), None),
    "scenes": (builtin_data.scenes, "depth", 1, RMSE),
}


def builtin_task_names() -> list[str]:
    """Names of the tasks of the built-in benchmark."""
    return list(_BUILTIN)


def builtin_task_kind(name: str) -> str:
    """The decoder kind of a built-in task (classification, segmentation or depth), without generating it."""
    return _BUILTIN[name][1]


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
