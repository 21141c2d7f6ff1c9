"""Tasks of the CLIP benchmark: a dataset of the task_vectors layout read from disk, with its frozen head.

Splits follow the TSV protocol (`clip_datasets`): `train` (train minus the held-out part, where TAP's
unlabeled images come from), `val` (`{D}Val`, used for selection) and `test`. `max_eval_images` caps val
and test with a seeded random subset, for quick looks; leave it null for the paper's protocol.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import Subset

from taskmerge import checkpoints
from taskmerge.cache import content_key, verified, write_tensors_entry
from taskmerge.settings.clip.encoder import ClipClassificationHead, zeroshot_weights
from taskmerge.settings.clip import datasets as clip_datasets
from taskmerge.tasks import SPLITS, DatasetSplit, Task
from taskmerge.settings.clip.templates import TEMPLATES
from taskmerge.tasks.metrics import Accuracy

ZEROSHOT_CACHE_VERSION = 2  # 2: cached heads carry a checksum


def _capped(dataset: torch.utils.data.Dataset, cap: int | None, seed: int) -> torch.utils.data.Dataset:
    if cap is None or len(dataset) <= cap:  # type: ignore[arg-type]
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))  # type: ignore[arg-type]
    return Subset(dataset, order[:cap].sort().values.tolist())


def build_clip_task(name: str, root: str | Path, transform: Callable, head: nn.Module, max_eval_images: int | None = None,
                    num_workers: int = 0, seed: int = 0) -> Task:
    """Dataset `name` under `root` with the release's splits and preprocessing, evaluated by `head` (frozen)."""
    num_classes = len(clip_datasets.classnames(name, root))
    if head.weight.shape[0] != num_classes:
        raise ValueError(f"{name}: its head has {head.weight.shape[0]} classes, the dataset under {root} has {num_classes}")
    splits = {}
    for split in SPLITS:
        dataset = clip_datasets.load_split(name, split, root, transform)
        cap = None if split == "train" else max_eval_images
        description = {"dataset": name, "split": split, "root": str(Path(root).resolve()), "transform": repr(transform),
                       "cap": cap, "seed": seed}
        splits[split] = DatasetSplit(_capped(dataset, cap, seed), description, num_workers)
    return Task(name=name, kind="classification", num_outputs=num_classes, splits=splits, metric_factory=Accuracy, head=head)


def load_head(path: str | Path, embed_dim: int) -> ClipClassificationHead:
    """A frozen head from a converted (safetensors) or release head file, for image embeddings of `embed_dim`."""
    head = ClipClassificationHead.from_state_dict(checkpoints.load_state_dict(path), str(path))
    if head.weight.shape[1] != embed_dim:
        raise ValueError(f"{path}: head for {head.weight.shape[1]}-d image embeddings, the encoder gives {embed_dim}-d "
                         "(a head of another CLIP model?)")
    return head


def zeroshot_heads(load_clip: Callable[[], tuple[nn.Module, Callable]], names: Sequence[str], root: str | Path,
                   cache_dir: str | Path, model_id: Mapping[str, Any]) -> dict[str, Path]:
    """Zero-shot heads built from the text tower of the CLIP that `load_clip` returns (with its tokenizer), from
    each dataset's class names and templates; cached as safetensors keyed by `model_id` (weights fingerprint,
    architecture, QuickGELU, open_clip version), the class names and the templates, with a checksum (a damaged
    head is reported and rebuilt). `load_clip` runs only if some head is not cached."""
    paths: dict[str, Path] = {}
    clip: tuple[nn.Module, Callable] | None = None
    for name in names:
        classnames = clip_datasets.classnames(name, root)
        key = content_key("zeroshot", ZEROSHOT_CACHE_VERSION, dict(model_id), name, classnames, list(TEMPLATES[name]))
        path = Path(cache_dir) / "heads" / f"{key[:32]}.safetensors"
        if not verified(path):
            clip = clip or load_clip()
            weight = zeroshot_weights(*clip, classnames, TEMPLATES[name])
            write_tensors_entry(path, {"weight": weight, "bias": torch.zeros(len(weight))})
        paths[name] = path
    return paths
