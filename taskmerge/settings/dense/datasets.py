"""Readers of the dense tasks' datasets in their release layouts (ADE20k, NYU depth v2, BEDLAM, MapFree).

Every item is `(image, target)`: the image preprocessed as DUNE's test transform (short side → S bicubic with
antialias, centre crop S, ImageNet mean/std; `crop=False` keeps the whole frame), the target either at the
original resolution (`target="original"`: what the metrics score; with `crop=True` it is the region the image
shows, cut without resampling) or resampled to the image grid with nearest neighbours (`target="input"`: what
decoders train on). ADE20k targets are int64 labels 0..149 with 255 ignored (`reduce_zero_label`); NYU
targets are float32 metres with 0 where the sensor has no depth. BEDLAM and MapFree are read as images only
(TAP needs no labels); their target is the item's index.

Held-out validation subsets of a train split (the ablation protocol's model selection data) come from
`holdout_indices`: a seeded permutation, the first `fraction` of it held out, both parts sorted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import Dataset

from taskmerge.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255
ADE_NUM_CLASSES = 150
NYU_DEPTH_RANGE = (1e-3, 10.0)
EIGEN_CROP = (45, 471, 41, 601)  # rows top:bottom, cols left:right of the 480×640 NYU frame

# paths under the data root each dataset needs (a trailing "/" marks a folder) and its layout in words
_REQUIRED = {
    "ade20k": ("ADEChallengeData2016/images/training/", "ADEChallengeData2016/images/validation/",
               "ADEChallengeData2016/annotations/training/", "ADEChallengeData2016/annotations/validation/"),
    "nyu": ("nyu/nyu_train.txt", "nyu/nyu_test.txt"),
    "bedlam": ("BEDLAM/training/", "BEDLAM/validation/"),
    "mapfree": ("mapfree/train/", "mapfree/val/"),
}
LAYOUTS = {
    "ade20k": "ADEChallengeData2016/images/{training,validation}/ADE_{train,val}_%08d.jpg and "
              "ADEChallengeData2016/annotations/{training,validation}/ADE_{train,val}_%08d.png (uint8, 0..150)",
    "nyu": "nyu/nyu_{train,test}.txt (BTS split files, lines '/scene/rgb_00045.jpg /scene/sync_depth_00045.png "
           "518.8579', paths relative to nyu/) and the files they name (480x640 JPEG, uint16 depth PNG in mm)",
    "bedlam": "BEDLAM/{training,validation}/<seq>/png/seq_%06d/seq_%06d_%04d.png",
    "mapfree": "mapfree/{train,val,test}/s%05d/seq{0,1}/frame_%05d.jpg with intrinsics.txt and poses.txt per scene",
}


def dataset_names() -> list[str]:
    """Names `check_layout` and the readers accept."""
    return list(_REQUIRED)


def check_layout(names: Sequence[str], root: str | Path) -> None:
    """Fail once, listing every missing path of every named dataset with its expected layout."""
    unknown = [name for name in names if name not in _REQUIRED]
    if unknown:
        raise UserError(f"unknown dense dataset(s) {unknown}; available: {dataset_names()}")
    root = Path(root).expanduser()
    problems = []
    for name in names:
        missing = [p for p in _REQUIRED[name] if not _exists(root / p, folder=p.endswith("/"))]
        if missing:
            problems.append(f"- {name}: missing {', '.join(str(root / p) for p in missing)}\n"
                            f"    expected under the data root: {LAYOUTS[name]}")
    if problems:
        raise UserError(f"dense task data incomplete under {root}:\n" + "\n".join(problems))


def _exists(path: Path, folder: bool) -> bool:
    """Whether `path` is an existing folder (`folder=True`) or file."""
    return path.is_dir() if folder else path.is_file()


def holdout_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(kept train, held-out val) indices of `n` train items: a `seed`ed permutation's first `fraction` is held out."""
    n_val = int(n * fraction)
    if not 0 < n_val < n:
        raise UserError(f"cannot hold out fraction={fraction} of {n} train items: both parts must be non-empty")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


def _open(path: Path) -> PIL.Image.Image:
    """Open an image file, failing with its path when it is missing."""
    if not path.is_file():
        raise UserError(f"missing data file {path}")
    return PIL.Image.open(path)


def _shown_box(height: int, width: int, crop: bool) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the original frame the preprocessed image shows: its centre square, or all."""
    if not crop:
        return 0, height, 0, width
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return top, top + side, left, left + side


def preprocess(image: PIL.Image.Image, size: int, crop: bool = True) -> torch.Tensor:
    """DUNE's test transform (`data/transform.py`, torchvision v2 on the uint8 image): short side → `size`
    (bicubic, antialias), centre crop `size` unless `crop=False`, ImageNet mean/std; returns `[3, H, W]` float32."""
    pixels = TF.resize(TF.to_image(image.convert("RGB")), size, interpolation=TF.InterpolationMode.BICUBIC,
                       antialias=True)
    if crop:
        pixels = TF.center_crop(pixels, size)
    return TF.normalize(TF.to_dtype(pixels, torch.float32, scale=True), IMAGENET_MEAN, IMAGENET_STD).as_subclass(
        torch.Tensor)


def _target(array: np.ndarray, size: int, crop: bool, mode: str) -> np.ndarray:
    """A dense target matching the preprocessed image: original resolution (cut to the shown region) or its grid
    (nearest neighbours, the same resize and crop as the image)."""
    if mode == "original":
        top, bottom, left, right = _shown_box(*array.shape, crop)
        return array[top:bottom, left:right]
    grid = TF.resize(torch.from_numpy(np.ascontiguousarray(array))[None], size,
                     interpolation=TF.InterpolationMode.NEAREST)
    return (TF.center_crop(grid, size) if crop else grid)[0].numpy()


def _check_options(image_size: int, target: str) -> None:
    """Reject a bad image size or target mode with the accepted values."""
    if image_size < 1:
        raise UserError(f"image_size must be positive, got {image_size}")
    if target not in ("original", "input"):
        raise UserError(f"target must be 'original' or 'input', got {target!r}")


def _reduce_zero_label(raw: np.ndarray) -> np.ndarray:
    """mmseg's `reduce_zero_label`: 0 ("other") → 255 ignored, every other label − 1, 255 stays ignored."""
    labels = raw - np.uint8(1)  # 0 wraps to 255
    labels[labels == 254] = IGNORE_INDEX
    return labels


class ADE20k(Dataset):
    """ADE20k (SceneParsing) `train` or `val` items `(image, int64 labels)` with `reduce_zero_label` applied."""

    def __init__(self, root: str | Path, split: str, image_size: int = 448, crop: bool = True,
                 target: str = "original") -> None:
        _check_options(image_size, target)
        folder = {"train": "training", "val": "validation"}.get(split)
        if folder is None:
            raise UserError(f"ADE20k split must be 'train' or 'val', got {split!r}")
        check_layout(["ade20k"], root)
        base = Path(root).expanduser() / "ADEChallengeData2016"
        self.images = sorted((base / "images" / folder).glob("*.jpg"))
        self.labels = [base / "annotations" / folder / f"{p.stem}.png" for p in self.images]
        missing = [str(p) for p in self.labels if not p.is_file()]
        if missing:
            raise UserError(f"ADE20k {split}: {len(missing)} annotation(s) missing, e.g. {missing[:3]}")
        self.split, self.root, self.image_size, self.crop, self.target = split, base, image_size, crop, target

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = _reduce_zero_label(np.asarray(_open(self.labels[i]), dtype=np.uint8))
        labels = _target(labels, self.image_size, self.crop, self.target)
        return preprocess(_open(self.images[i]), self.image_size, self.crop), torch.from_numpy(labels.astype(np.int64))

    def description(self) -> dict[str, Any]:
        """What a cache key hashes for this split."""
        return {"dataset": "ade20k", "split": self.split, "root": str(self.root), "image_size": self.image_size,
                "crop": self.crop, "target": self.target}


class NYUDepth(Dataset):
    """NYU depth v2 `train` or `test` items `(image, float32 depth in metres)` from the BTS split files.

    As the Monocular-Depth-Estimation-Toolbox: lines whose depth is `None` are skipped, items sorted by image path.
    """

    def __init__(self, root: str | Path, split: str, image_size: int = 448, crop: bool = True,
                 target: str = "original") -> None:
        _check_options(image_size, target)
        if split not in ("train", "test"):
            raise UserError(f"NYU split must be 'train' or 'test', got {split!r}")
        check_layout(["nyu"], root)
        base = Path(root).expanduser() / "nyu"
        split_file = base / f"nyu_{split}.txt"
        pairs = [_split_line(line, base, split_file) for line in split_file.read_text().splitlines() if line.strip()]
        self.pairs = sorted(pair for pair in pairs if pair is not None)
        self.split, self.root, self.image_size, self.crop, self.target = split, base, image_size, crop, target

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, depth_path = self.pairs[i]
        depth = np.asarray(_open(depth_path), dtype=np.float32) / 1000.0
        depth = _target(depth, self.image_size, self.crop, self.target)
        return preprocess(_open(image_path), self.image_size, self.crop), torch.from_numpy(depth.copy())

    def eval_box(self, height: int = 480, width: int = 640) -> tuple[int, int, int, int]:
        """The Eigen crop in the coordinates of an original-resolution target of this reader."""
        top, bottom, left, right = _shown_box(height, width, self.crop)
        r0, r1, c0, c1 = EIGEN_CROP
        return max(r0, top) - top, min(r1, bottom) - top, max(c0, left) - left, min(c1, right) - left

    def description(self) -> dict[str, Any]:
        """What a cache key hashes for this split."""
        return {"dataset": "nyu", "split": self.split, "root": str(self.root), "image_size": self.image_size,
                "crop": self.crop, "target": self.target}


def _split_line(line: str, base: Path, split_file: Path) -> tuple[Path, Path] | None:
    """(image, depth) paths of one BTS split-file line `/scene/rgb_X.jpg /scene/sync_depth_X.png focal`,
    relative to `nyu/`; None for a line without depth (`... None ...`)."""
    fields = line.split()
    if len(fields) != 3:
        raise UserError(f"{split_file}: expected 'image depth focal' per line, got {line!r}")
    if fields[1] == "None":
        return None
    return base / fields[0].lstrip("/"), base / fields[1].lstrip("/")


class ImageFiles(Dataset):
    """Label-free items `(image, index)` of a sorted list of image files (BEDLAM, MapFree: TAP's images).

    `upright` names the files stored sideways, turned by −90° before preprocessing (BEDLAM's close-ups).
    """

    def __init__(self, name: str, split: str, paths: list[Path], image_size: int, root: Path,
                 upright: Callable[[Path], bool] | None = None) -> None:
        _check_options(image_size, "original")
        if not paths:
            raise UserError(f"{name} {split}: no images under {root} (expected {LAYOUTS[name]})")
        self.name, self.split, self.paths, self.image_size, self.root = name, split, paths, image_size, root
        self.upright = upright

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = _open(self.paths[i])
        if self.upright is not None and self.upright(self.paths[i]):
            image = image.rotate(-90, expand=True)
        return preprocess(image, self.image_size), i

    def description(self) -> dict[str, Any]:
        """What a cache key hashes for this split."""
        return {"dataset": self.name, "split": self.split, "root": str(self.root), "image_size": self.image_size}


def _bedlam_closeup(path: Path) -> bool:
    """Whether a BEDLAM frame is a close-up, stored rotated (Multi-HMR `datasets/bedlam.py` turns it by −90°)."""
    return "closeup" in str(path)


def bedlam_images(root: str | Path, split: str, image_size: int = 448) -> ImageFiles:
    """BEDLAM `train` or `val` frames, sorted by path, close-ups turned upright."""
    folder = {"train": "training", "val": "validation"}.get(split)
    if folder is None:
        raise UserError(f"BEDLAM split must be 'train' or 'val', got {split!r}")
    check_layout(["bedlam"], root)
    base = Path(root).expanduser() / "BEDLAM" / folder
    paths = sorted(base.glob("*/png/seq_*/seq_*.png"))
    return ImageFiles("bedlam", split, paths, image_size, base, upright=_bedlam_closeup)


def mapfree_images(root: str | Path, split: str, image_size: int = 448) -> ImageFiles:
    """MapFree `train`, `val` or `test` frames (reference seq0 and queries seq1 of every scene), sorted by path."""
    if split not in ("train", "val", "test"):
        raise UserError(f"MapFree split must be 'train', 'val' or 'test', got {split!r}")
    check_layout(["mapfree"], root)
    base = Path(root).expanduser() / "mapfree" / split
    if not base.is_dir():
        raise UserError(f"missing {base} (expected {LAYOUTS['mapfree']})")
    return ImageFiles("mapfree", split, sorted(base.glob("s*/seq[01]/frame_*.jpg")), image_size, base)


def collate_dense(items: Sequence[tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, torch.Tensor | list[torch.Tensor]]:
    """Batch items: images stacked; targets stacked when their shapes agree, else a list (ADE20k's original sizes)."""
    images = torch.stack([image for image, _ in items])
    targets = [torch.as_tensor(target) for _, target in items]
    if all(t.shape == targets[0].shape for t in targets):
        return images, torch.stack(targets)
    return images, targets
