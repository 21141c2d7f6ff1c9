"""Image generators of the built-in benchmark: real digits from scikit-learn plus procedural domains.

Every generator is a pure function of its arguments (sizes and a seed) and returns float32 images in
[0, 1] of shape [N, 3, S, S] with their targets, so the same seed always gives the same benchmark.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

TEXTURE_CLASSES = ("horizontal", "vertical", "diagonal", "antidiagonal", "checker", "dots", "rings")
SHAPE_CLASSES = ("background", "disc", "square", "triangle")
PRETRAIN_FAMILIES = ("blobs", "lines", "smooth_noise", "gradient", "polygons", "speckle", "waves", "rects")
DEPTH_NEAR, DEPTH_FAR = 1.0, 10.0


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1), as (y, x) arrays of shape [S, S]."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(coords, coords, indexing="ij")


def _colors(rng: np.random.Generator, n: int) -> np.ndarray:
    """`n` random RGB colours of shape [n, 3, 1, 1]."""
    return rng.uniform(0.0, 1.0, size=(n, 3, 1, 1)).astype(np.float32)


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.clip(images, 0.0, 1.0).astype(np.float32))


def _smooth_noise(rng: np.random.Generator, n: int, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise [n, 1, S, S]: random values on a `cells`² grid, bilinearly upsampled."""
    coarse = torch.from_numpy(rng.uniform(0, 1, size=(n, 1, cells, cells)).astype(np.float32))
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False).numpy()


def digits(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Handwritten digits (scikit-learn's 1797 real 8×8 scans) tinted and shifted on a noisy background.

    Images are drawn with replacement from the 1797 scans when `n` exceeds them; each draw gets its own
    colour, offset and background, so repeated scans are still distinct images.
    """
    rng = np.random.default_rng(seed)
    data = load_digits()
    pick = rng.permutation(len(data.images))
    if n > len(pick):
        pick = np.concatenate([pick, rng.integers(0, len(pick), n - len(pick))])
    pick = pick[:n]
    glyphs = torch.from_numpy((data.images[pick] / 16.0).astype(np.float32))[:, None]
    inner = int(size * 0.875)
    glyphs = F.interpolate(glyphs, size=(inner, inner), mode="bilinear", align_corners=False).numpy()
    canvas = np.zeros((n, 1, size, size), dtype=np.float32)
    slack = size - inner
    offsets = rng.integers(slack // 2 - slack // 4, slack // 2 + slack // 4 + 1, size=(n, 2))
    for i, (dy, dx) in enumerate(offsets):
        canvas[i, :, dy : dy + inner, dx : dx + inner] = glyphs[i]
    background = _colors(rng, n) * 0.35 + 0.2 * _smooth_noise(rng, n, size, 4)
    ink = 0.6 + 0.4 * _colors(rng, n)
    images = background * (1 - canvas) + ink * canvas + rng.normal(0, 0.04, size=(n, 3, size, size))
    return _to_tensor(images), torch.from_numpy(data.target[pick].astype(np.int64))


def textures(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Periodic textures of seven kinds (stripes in four orientations, checkers, dots, rings)."""
    rng = np.random.default_rng(seed)
    y, x = _grid(size)
    labels = rng.integers(0, len(TEXTURE_CLASSES), size=n)
    images = np.empty((n, 3, size, size), dtype=np.float32)
    for i, label in enumerate(labels):
        freq = rng.uniform(2.5, 6.0)
        phase = rng.uniform(0, 2 * np.pi)
        kind = TEXTURE_CLASSES[label]
        if kind == "horizontal":
            field = np.sin(2 * np.pi * freq * y + phase)
        elif kind == "vertical":
            field = np.sin(2 * np.pi * freq * x + phase)
        elif kind == "diagonal":
            field = np.sin(2 * np.pi * freq * (x + y) / np.sqrt(2) + phase)
        elif kind == "antidiagonal":
            field = np.sin(2 * np.pi * freq * (x - y) / np.sqrt(2) + phase)
        elif kind == "checker":
            field = np.sin(2 * np.pi * freq * x + phase) * np.sin(2 * np.pi * freq * y + phase)
        elif kind == "dots":
            cell = np.sin(np.pi * freq * x + phase) ** 2 * np.sin(np.pi * freq * y + phase) ** 2
            field = 2 * (cell > 0.5) - 1.0
        else:
            cy, cx = rng.uniform(0.2, 0.8, size=2)
            field = np.sin(2 * np.pi * freq * np.hypot(x - cx, y - cy) + phase)
        weight = (field[None] + 1) / 2
        a, b = _colors(rng, 2)
        images[i] = a * weight + b * (1 - weight)
    images += rng.normal(0, 0.08, size=images.shape)
    return _to_tensor(images), torch.from_numpy(labels.astype(np.int64))


def _shape_mask(kind: str, y: np.ndarray, x: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    """Boolean mask of one disc, square or upward triangle of radius `r` centred at (cy, cx)."""
    if kind == "disc":
        return np.hypot(y - cy, x - cx) <= r
    if kind == "square":
        return (np.abs(y - cy) <= r * 0.85) & (np.abs(x - cx) <= r * 0.85)
    top, bottom = cy - r, cy + r * 0.8
    half_width = (y - top) / (bottom - top) * r * 1.1
    return (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half_width)


def shapes(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scenes of 1–3 coloured discs, squares and triangles; the target is the per-pixel shape class."""
    rng = np.random.default_rng(seed)
    y, x = _grid(size)
    images = _colors(rng, n) * 0.6 + 0.4 * _smooth_noise(rng, n, size, 3)
    images = images.astype(np.float32)
    labels = np.zeros((n, size, size), dtype=np.int64)
    for i in range(n):
        for _ in range(rng.integers(1, 4)):
            cls = int(rng.integers(1, len(SHAPE_CLASSES)))
            cy, cx = rng.uniform(0.2, 0.8, size=2)
            mask = _shape_mask(SHAPE_CLASSES[cls], y, x, cy, cx, rng.uniform(0.12, 0.25))
            images[i][:, mask] = _colors(rng, 1)[0, :, 0]
            labels[i][mask] = cls
    images += rng.normal(0, 0.04, size=images.shape)
    return _to_tensor(images), torch.from_numpy(labels)


def scenes(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground-plane scenes with boxes in fog: the target is per-pixel depth in [1, 10] (metres).

    Depth cues are monocular and learnable: the ground recedes towards a random horizon, boxes stand on
    the ground (their base row fixes their depth), and fog brightens colours with distance.
    """
    rng = np.random.default_rng(seed)
    y, x = _grid(size)
    images = np.empty((n, 3, size, size), dtype=np.float32)
    depth = np.empty((n, size, size), dtype=np.float32)
    for i in range(n):
        horizon = rng.uniform(0.25, 0.5)
        below = np.clip((y - horizon) / (1 - horizon), 1e-3, 1.0)
        d = np.where(y > horizon, np.clip(DEPTH_NEAR / below, DEPTH_NEAR, DEPTH_FAR), DEPTH_FAR)
        ground, sky = _colors(rng, 2)
        texture = 0.15 * np.sin(2 * np.pi * 3 * x / np.maximum(d, 1.0) + rng.uniform(0, 6))
        img = np.where(y > horizon, ground + texture, sky * 0.3 + 0.7)
        for _ in range(rng.integers(1, 4)):
            base = rng.uniform(horizon + 0.08, 1.0)
            box_depth = float(np.clip(DEPTH_NEAR / ((base - horizon) / (1 - horizon)), DEPTH_NEAR, DEPTH_FAR))
            height, width = np.minimum(rng.uniform(0.6, 1.6, size=2) / box_depth * 0.4, 0.6)
            cx = rng.uniform(0.1, 0.9)
            mask = (y <= base) & (y >= base - height) & (np.abs(x - cx) <= width / 2)
            mask &= box_depth < d
            d = np.where(mask, box_depth, d)
            img = np.where(mask, _colors(rng, 1)[0], img)
        fog = (d - DEPTH_NEAR) / (DEPTH_FAR - DEPTH_NEAR)
        images[i] = img * (1 - 0.6 * fog) + 0.6 * fog
        depth[i] = d
    images += rng.normal(0, 0.03, size=images.shape)
    return _to_tensor(images), torch.from_numpy(depth)


def pretrain_mixture(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Generic pre-training images from eight primitive families; the target is the family index.

    The families share no labels with the downstream tasks: the base encoder learns colour, edges,
    frequency and layout, and each task's fine-tuning then has something specific left to learn.
    """
    rng = np.random.default_rng(seed)
    y, x = _grid(size)
    labels = rng.integers(0, len(PRETRAIN_FAMILIES), size=n)
    images = np.empty((n, 3, size, size), dtype=np.float32)
    for i, label in enumerate(labels):
        a, b = _colors(rng, 2)
        family = PRETRAIN_FAMILIES[label]
        if family == "blobs":
            field = np.zeros_like(x)
            for cy, cx, s in rng.uniform([0, 0, 0.05], [1, 1, 0.2], size=(int(rng.integers(2, 6)), 3)):
                field += np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * s**2))
            weight = np.clip(field, 0, 1)
        elif family == "lines":
            weight = np.zeros_like(x)
            for theta, offset in rng.uniform([0, -0.5], [np.pi, 0.5], size=(int(rng.integers(1, 4)), 2)):
                dist = np.abs((x - 0.5) * np.cos(theta) + (y - 0.5) * np.sin(theta) - offset)
                weight = np.maximum(weight, (dist < 0.04).astype(np.float32))
        elif family == "smooth_noise":
            weight = _smooth_noise(rng, 1, size, int(rng.integers(3, 7)))[0, 0]
        elif family == "gradient":
            theta = rng.uniform(0, 2 * np.pi)
            weight = np.clip((x - 0.5) * np.cos(theta) + (y - 0.5) * np.sin(theta) + 0.5, 0, 1)
        elif family == "polygons":
            k = int(rng.integers(3, 8))
            angles = np.sort(rng.uniform(0, 2 * np.pi, size=k))
            radius = rng.uniform(0.2, 0.45)
            cy, cx = rng.uniform(0.35, 0.65, size=2)
            polar = np.arctan2(y - cy, x - cx) % (2 * np.pi)
            bound = radius * (0.6 + 0.4 * np.cos(k * (polar - angles[0])) ** 2)
            weight = (np.hypot(y - cy, x - cx) <= bound).astype(np.float32)
        elif family == "speckle":
            weight = (rng.uniform(0, 1, size=x.shape) < rng.uniform(0.1, 0.5)).astype(np.float32)
        elif family == "waves":
            freq = rng.uniform(1.0, 3.0)
            weight = (np.sin(2 * np.pi * freq * x + 2 * np.sin(2 * np.pi * freq * y)) + 1) / 2
        else:
            weight = np.zeros_like(x)
            for y0, x0, h, w in rng.uniform([0, 0, 0.1, 0.1], [0.8, 0.8, 0.5, 0.5], size=(int(rng.integers(1, 4)), 4)):
                weight = np.maximum(weight, ((y >= y0) & (y <= y0 + h) & (x >= x0) & (x <= x0 + w)).astype(np.float32))
        images[i] = a * weight[None] + b * (1 - weight[None])
    images += rng.normal(0, 0.05, size=images.shape)
    return _to_tensor(images), torch.from_numpy(labels.astype(np.int64))
