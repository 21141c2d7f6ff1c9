"""Tiny image trees in the real on-disk layouts of the CLIP benchmark's datasets, written by the tests."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image


def seeded_rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def class_colour(label: int) -> np.ndarray:
    """A distinct RGB colour per class, so that images of one class look alike (heads can be fitted)."""
    return np.array([(97 * label + 40) % 256, (57 * label + 200) % 256, (151 * label + 90) % 256], dtype=np.float64)


def write_image(path: Path, size: int = 12, seed: int = 0, label: int | None = None) -> None:
    """A random RGB image in the format its suffix names (png, jpg or ppm); with `label`, mostly its class colour."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = seeded_rng(seed).integers(0, 256, (size, size, 3)).astype(np.float64)
    if label is not None:
        pixels = 0.8 * class_colour(label) + 0.2 * pixels
    Image.fromarray(pixels.astype(np.uint8)).save(path)


def write_folder_split(folder: Path, classes: list[str], per_class: int, ext: str = "jpg") -> None:
    """An ImageFolder split: `per_class` images in one folder per class, tinted by class."""
    for label, c in enumerate(sorted(classes)):
        for i in range(per_class):
            write_image(folder / c / f"{c}_{i}.{ext}", seed=i, label=label)


def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """MNIST-style raw idx files (big-endian header, then uint8 data), as torchvision reads them."""
    folder.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x0803, n, h, w) + images.tobytes())
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x0801, n) + labels.tobytes())


def write_mnist_like(folder: Path, prefixes: tuple[str, str], n_train: int = 20, n_test: int = 5) -> np.ndarray:
    """Train and test idx files of 28×28 digits; returns the train labels."""
    rng = seeded_rng()
    labels = {p: rng.integers(0, 10, n, dtype=np.uint8) for p, n in zip(prefixes, (n_train, n_test))}
    for p, n in zip(prefixes, (n_train, n_test)):
        noise = rng.integers(0, 256, (n, 28, 28))
        write_idx(folder, p, (0.2 * noise + 20.0 * labels[p][:, None, None]).astype(np.uint8), labels[p])
    return labels[prefixes[0]]


def cars_annotations(fnames: list[str], classes: list[int]) -> np.ndarray:
    """The devkit's `annotations` struct array (1-based classes), as scipy writes a MATLAB struct."""
    fields = [(f, object) for f in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]
    rows = [(0, 0, 11, 11, np.uint8(c), f) for f, c in zip(fnames, classes)]
    return np.array(rows, dtype=fields)


def write_cars(root: Path, class_names: list[str], train_classes: list[int], test_classes: list[int]) -> None:
    """Stanford Cars in torchvision's devkit layout: images, `cars_meta.mat`, train and test annotations (1-based)."""
    base = root / "stanford_cars"
    train_names = [f"{i:05d}.jpg" for i in range(1, len(train_classes) + 1)]
    test_names = [f"{i:05d}.jpg" for i in range(1, len(test_classes) + 1)]
    for i, (name, label) in enumerate(zip(train_names, train_classes)):
        write_image(base / "cars_train" / name, seed=i, label=label - 1)
    for i, (name, label) in enumerate(zip(test_names, test_classes)):
        write_image(base / "cars_test" / name, size=20, seed=100 + i, label=label - 1)
    (base / "devkit").mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array(class_names, dtype=object)[None]})
    scipy.io.savemat(base / "devkit" / "cars_train_annos.mat", {"annotations": cars_annotations(train_names, train_classes)[None]})
    scipy.io.savemat(base / "cars_test_annos_withlabels.mat", {"annotations": cars_annotations(test_names, test_classes)[None]})
