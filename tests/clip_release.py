"""Random-init CLIP checkpoints saved exactly as the releases save them (checkpoints.md §1), for the tests.

Format A pickles a whole `src.modeling.ImageEncoder` with the attributes the release's class sets: the CLIP
as open_clip builds it (text transformer deleted), `train_preprocess` / `val_preprocess` transforms of real
torchvision classes and open_clip's `_convert_to_rgb` function, and `cache_dir`. Its CLIP uses open_clip
2.0.2 class paths (`open_clip.model.VisualTransformer`, …): the real open_clip 3.x classes are given those
old names only while saving, so the files name classes that no longer exist. Format B is a plain state dict.
Heads are pickled `ClassificationHead(torch.nn.Linear)` objects with a `normalize` attribute.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import types
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transform import _convert_to_rgb
from torch import nn
from torchvision import transforms

from taskmerge.settings.clip.encoder import random_init_clip

OLD_NAMES = {"VisionTransformer": "VisualTransformer"}


def release_preprocess(train: bool, image_size: int = 224) -> transforms.Compose:
    """The transform open_clip 2.0.2's `create_model_and_transforms` gave the releases: a random resized crop
    (train) or a resize and centre crop (val), bicubic, then RGB, tensor and OpenAI mean/std."""
    bicubic = transforms.InterpolationMode.BICUBIC
    crop = ([transforms.RandomResizedCrop(image_size, scale=(0.9, 1.0), interpolation=bicubic)] if train else
            [transforms.Resize(image_size, interpolation=bicubic), transforms.CenterCrop(image_size)])
    return transforms.Compose([*crop, _convert_to_rgb, transforms.ToTensor(),
                               transforms.Normalize(mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD)])


class ImageEncoder(nn.Module):
    """Stand-in for the releases' `src.modeling.ImageEncoder`: a CLIP without its text transformer, and the
    attributes the release's `__init__` sets (its transforms and `cache_dir`), which a format A pickle holds."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.model = clip
        self.train_preprocess, self.val_preprocess = release_preprocess(True), release_preprocess(False)
        self.cache_dir = "/data/cache"


class ClassificationHead(nn.Linear):
    """Stand-in for the releases' `ClassificationHead`."""

    def __init__(self, normalize: bool, weights: torch.Tensor) -> None:
        out_features, in_features = weights.shape
        super().__init__(in_features, out_features)
        self.normalize = normalize
        self.weight = nn.Parameter(weights.clone())
        self.bias = nn.Parameter(torch.zeros_like(self.bias))


def random_clip(model: str, seed: int) -> nn.Module:
    """A random-init open_clip CLIP with QuickGELU, text transformer deleted as ImageEncoder does."""
    torch.manual_seed(seed)
    clip = random_init_clip(model)
    del clip.transformer
    return clip


@contextlib.contextmanager
def old_class_paths(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Give open_clip classes their 2.0.2 paths (`open_clip.model.<Old>`) and expose the stand-ins at
    `src.modeling` / `src.models.modeling`, only while saving."""
    classes = {type(m) for root in modules for m in root.modules() if type(m).__module__.startswith("open_clip")}
    renamed = {cls: ("open_clip.model", OLD_NAMES.get(cls.__name__, cls.__name__)) for cls in classes}
    renamed |= {ImageEncoder: ("src.modeling", "ImageEncoder"), ClassificationHead: ("src.models.modeling", "ClassificationHead")}
    original = {cls: (cls.__module__, cls.__qualname__) for cls in renamed}
    with pytest.MonkeyPatch.context() as patch:
        for cls, (module_name, name) in renamed.items():
            parts = module_name.split(".")
            for parent in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):
                if parent not in sys.modules:
                    patch.setitem(sys.modules, parent, types.ModuleType(parent))
            patch.setattr(sys.modules[module_name], name, cls, raising=False)
            cls.__module__, cls.__qualname__ = module_name, name
        try:
            yield
        finally:
            for cls, (module_name, name) in original.items():
                cls.__module__, cls.__qualname__ = module_name, name


def finetune_like(base: nn.Module, seed: int, scale: float = 0.02) -> nn.Module:
    """A copy of `base` whose image-tower weights moved as fine-tuning moves them (text leftovers untouched)."""
    clip = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in clip.visual.parameters():
            param.add_(scale * param.abs().mean() * torch.randn(param.shape, generator=generator))
    return clip


def release_state_dict(clip: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict an `ImageEncoder` wrapping `clip` has (`model.` prefix)."""
    return ImageEncoder(clip).state_dict()


def save_release(root: Path, model: str, names: Sequence[str], fmt: str, num_classes: dict[str, int], seed: int = 0,
                 fit_head: Callable[[str, nn.Module], torch.Tensor] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Write a random-init release of `model` for datasets `names` in format A or B under `root`; returns the
    saved state dicts (`base`, each name, `head/<name>`) in release key names for comparisons. Heads are random
    unit rows × 100, or `fit_head(name, finetuned_clip)` (e.g. class centroids, so accuracies are not zero)."""
    folder = Path(root) / model
    base = random_clip(model, seed)
    encoders = {"base": base, **{n: finetune_like(base, seed + 1 + i) for i, n in enumerate(names)}}
    generator = torch.Generator().manual_seed(seed)
    heads = {n: ClassificationHead(True, fit_head(n, encoders[n]) if fit_head else
                                   100 * nn.functional.normalize(torch.randn(c, base.visual.output_dim, generator=generator), dim=-1))
             for n, c in num_classes.items()}
    if fmt == "A":
        paths = {"base": folder / "zeroshot.pt", **{n: folder / n / "finetuned.pt" for n in names}}
        head_paths = {n: folder / f"head_{n}.pt" for n in names}
    else:
        paths = {"base": folder / "MNISTVal" / "nonlinear_zeroshot.pt", **{n: folder / f"{n}Val" / "nonlinear_finetuned.pt" for n in names}}
        head_paths = {n: folder / f"head_{n}Val.pt" for n in names}
    with old_class_paths(list(encoders.values())):
        for key, path in paths.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            encoder = ImageEncoder(encoders[key])
            torch.save(encoder if fmt == "A" else encoder.state_dict(), path)
        for name, path in head_paths.items():
            torch.save(heads[name], path)
    return {key: release_state_dict(clip) for key, clip in encoders.items()} | {f"head/{n}": h.state_dict() for n, h in heads.items()}


@torch.no_grad()
def centroid_head(clip: nn.Module, data: Path, name: str, num_classes: int) -> torch.Tensor:
    """A head fitted like the release's: unit class centroids of the fine-tuned encoder's train embeddings, × 100."""
    from taskmerge.settings.clip.encoder import preprocess
    from taskmerge.settings.clip import datasets as clip_datasets

    train = clip_datasets.load_split(name, "train", data, preprocess(224))
    images, labels = zip(*(train[i] for i in range(len(train))))
    embeddings = nn.functional.normalize(clip.eval().encode_image(torch.stack(images)), dim=-1)
    labels = torch.tensor(labels)
    rows = [embeddings[labels == c].mean(0) if (labels == c).any() else torch.zeros(embeddings.shape[1]) for c in range(num_classes)]
    return 100 * nn.functional.normalize(torch.stack(rows), dim=-1)
