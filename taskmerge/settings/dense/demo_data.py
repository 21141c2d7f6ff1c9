"""Small generated data trees in the real on-disk layouts of ADE20k, NYU depth v2, BEDLAM and MapFree.

Tests read them back through the real readers, and a demo can train decoders on them: the content is
learnable (an ADE class is a colour, an NYU depth is a shading of a room), and everything is a pure
function of the seed. Layouts follow `specs/dense.md` §5; `datasets.LAYOUTS` describes them in words.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image

# raw ADE labels drawn (0 is "other", ignored after reduce_zero_label) and the colour each one is painted in
ADE_DEMO_LABELS = (1, 2, 3, 4, 5, 6)
_ADE_COLOURS = np.array(
    [[128, 128, 128], [200, 40, 40], [40, 170, 40], [40, 60, 200], [210, 190, 40], [170, 40, 190], [40, 190, 190]],
    dtype=np.float32,
)
NYU_SHAPE = (480, 640)
NYU_FOCAL = 518.8579  # the third column of the BTS split files
_NYU_TRAIN_SCENES = ("basement_0001a", "bedroom_0004", "kitchen_0028b")
_NYU_TEST_SCENES = ("bathroom", "living_room")
BEDLAM_SEQUENCE = "20221010_3_1000_batch01hand"
BEDLAM_FRAMES_PER_SEQ = 4
MAPFREE_SCENES = {"train": "s00000", "val": "s00460"}


def _jpeg(path: Path, rgb: np.ndarray) -> None:
    """Save an `[H, W, 3]` float image in 0..255 as a JPEG, making its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").save(path, quality=95)


def _png(path: Path, array: np.ndarray) -> None:
    """Save a uint8 (mode L) or uint16 (16-bit) array as a PNG, making its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(array).save(path)


def _ade_sample(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One ADE-like sample: rectangles of demo classes, each in its colour, and an ignored (label 0) patch."""
    h, w = int(rng.integers(56, 97)), int(rng.integers(56, 129))
    label = np.full((h, w), rng.choice(ADE_DEMO_LABELS), dtype=np.uint8)
    for raw in rng.choice(ADE_DEMO_LABELS, size=3, replace=False):
        y, x = int(rng.integers(0, h - 16)), int(rng.integers(0, w - 16))
        label[y : y + int(rng.integers(16, h // 2 + 17)), x : x + int(rng.integers(16, w // 2 + 17))] = raw
    y, x = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
    label[y : y + 8, x : x + 12] = 0
    image = _ADE_COLOURS[label] + rng.normal(0.0, 12.0, size=(h, w, 3))
    return image, label


def write_ade20k_tree(root: str | Path, n_train: int, n_val: int, seed: int) -> Path:
    """Write `ADEChallengeData2016/{images,annotations}/{training,validation}` under `root`; returns that folder.

    Images are JPEGs of 56–96 × 56–128 pixels; annotations uint8 PNGs with raw labels 0 (ignore) and
    `ADE_DEMO_LABELS`, each label painted in a fixed colour so a linear head can learn it.
    """
    base = Path(root) / "ADEChallengeData2016"
    rng = np.random.default_rng(seed)
    for folder, prefix, count in (("training", "train", n_train), ("validation", "val", n_val)):
        for index in range(1, count + 1):
            image, label = _ade_sample(rng)
            _jpeg(base / "images" / folder / f"ADE_{prefix}_{index:08d}.jpg", image)
            _png(base / "annotations" / folder / f"ADE_{prefix}_{index:08d}.png", label)
    return base


def _nyu_sample(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One room: a back wall at 2–8 m and a floor approaching the camera; brightness falls with depth.

    Returns the RGB image and the depth in metres, 0 on a 10-pixel border (invalid, as NYU's white border).
    """
    h, w = NYU_SHAPE
    wall = rng.uniform(2.0, 8.0)
    horizon = rng.uniform(0.35, 0.6) * h
    camera_height = rng.uniform(1.0, 1.6)
    rows = np.arange(h, dtype=np.float64)[:, None]
    floor = camera_height * NYU_FOCAL / np.maximum(rows - horizon, 1e-6)
    depth = np.where(rows > horizon, np.minimum(floor, wall), wall) * np.ones((1, w))
    depth = np.minimum(depth, 9.5)
    is_floor = (rows > horizon) & (floor < wall)
    tint = np.where(is_floor[..., None], [[[0.9, 0.7, 0.5]]], [[[0.6, 0.7, 0.9]]])
    image = 255.0 * tint * (1.0 - depth[..., None] / 11.0) + rng.normal(0.0, 4.0, size=(h, w, 3))
    depth[:10], depth[-10:], depth[:, :10], depth[:, -10:] = 0.0, 0.0, 0.0, 0.0
    return image, depth


def write_nyu_tree(root: str | Path, n_train: int, n_test: int, seed: int) -> Path:
    """Write `nyu/<scene>/rgb_%05d.jpg`, `sync_depth_%05d.png` (uint16 mm) and `nyu_{train,test}.txt`; returns `nyu/`.

    Split lines read `/scene/rgb_00045.jpg /scene/sync_depth_00045.png 518.8579`, as the BTS split files.
    """
    base = Path(root) / "nyu"
    rng = np.random.default_rng(seed)
    index = 0
    for split, count, scenes in (("train", n_train, _NYU_TRAIN_SCENES), ("test", n_test, _NYU_TEST_SCENES)):
        lines = []
        for i in range(count):
            scene = scenes[i % len(scenes)]
            image, depth = _nyu_sample(rng)
            _jpeg(base / scene / f"rgb_{index:05d}.jpg", image)
            _png(base / scene / f"sync_depth_{index:05d}.png", np.round(depth * 1000.0).astype(np.uint16))
            lines.append(f"/{scene}/rgb_{index:05d}.jpg /{scene}/sync_depth_{index:05d}.png {NYU_FOCAL}")
            index += 1
        base.mkdir(parents=True, exist_ok=True)
        (base / f"nyu_{split}.txt").write_text("\n".join(lines) + "\n")
    return base


def _noise_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth random colour image (a bilinear blow-up of a 4×4 grid) plus pixel noise."""
    grid = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
    smooth = np.asarray(PIL.Image.fromarray(grid, "RGB").resize((w, h), PIL.Image.BILINEAR), dtype=np.float64)
    return smooth + rng.normal(0.0, 8.0, size=(h, w, 3))


def write_bedlam_tree(root: str | Path, n_train: int, n_val: int, seed: int) -> Path:
    """Write `BEDLAM/{training,validation}/<seq>/png/seq_%06d/seq_%06d_%04d.png` and stub annotation npz files.

    Frames are 64×96 PNGs, `BEDLAM_FRAMES_PER_SEQ` per sub-sequence; `BEDLAM/all_npz_12_{split}/<seq>.npz`
    holds the release's keys (imgname, pose_cam, cam_int, cam_ext, shape, trans_cam) with zero humans' values.
    Returns `BEDLAM/`.
    """
    base = Path(root) / "BEDLAM"
    rng = np.random.default_rng(seed)
    for split, count in (("training", n_train), ("validation", n_val)):
        names = []
        for i in range(count):
            seq, frame = divmod(i, BEDLAM_FRAMES_PER_SEQ)
            name = f"seq_{seq:06d}/seq_{seq:06d}_{frame:04d}.png"
            path = base / split / BEDLAM_SEQUENCE / "png" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            PIL.Image.fromarray(np.clip(_noise_image(rng, 64, 96), 0, 255).astype(np.uint8), "RGB").save(path)
            names.append(name)
        npz = base / f"all_npz_12_{split}" / f"{BEDLAM_SEQUENCE}.npz"
        npz.parent.mkdir(parents=True, exist_ok=True)
        n = len(names)
        np.savez(npz, imgname=np.array(names), pose_cam=np.zeros((n, 165)), cam_int=np.tile(np.eye(3), (n, 1, 1)),
                 cam_ext=np.tile(np.eye(4), (n, 1, 1)), shape=np.zeros((n, 11)), trans_cam=np.zeros((n, 3)))
    return base


def write_mapfree_tree(root: str | Path, n_queries: int, seed: int) -> Path:
    """Write two MapFree scenes (`mapfree/train/s00000`, `mapfree/val/s00460`); returns `mapfree/`.

    Each scene has the reference `seq0/frame_00000.jpg`, `n_queries` query frames `seq1/frame_%05d.jpg` (72×96),
    `intrinsics.txt` (`name fx fy cx cy W H`) and `poses.txt` (`name qw qx qy qz tx ty tz`, identity rotation,
    the camera walking along z); the training scene also gets a stub `overlaps.npz`.
    """
    base = Path(root) / "mapfree"
    rng = np.random.default_rng(seed)
    h, w = 72, 96
    for split, scene in MAPFREE_SCENES.items():
        folder = base / split / scene
        names = ["seq0/frame_00000.jpg"] + [f"seq1/frame_{i:05d}.jpg" for i in range(n_queries)]
        for name in names:
            _jpeg(folder / name, _noise_image(rng, h, w))
        intrinsics = [f"{n} 75.0 75.0 {w / 2} {h / 2} {w} {h}" for n in names]
        poses = [f"{n} 1.0 0.0 0.0 0.0 0.0 0.0 {0.1 * i:.1f}" for i, n in enumerate(names)]
        (folder / "intrinsics.txt").write_text("\n".join(intrinsics) + "\n")
        (folder / "poses.txt").write_text("\n".join(poses) + "\n")
        if split == "train":
            np.savez(folder / "overlaps.npz", idxs=np.zeros((0, 2, 2), dtype=np.int64), overlaps=np.zeros(0))
    return base
