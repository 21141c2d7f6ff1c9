"""Writers of the four LiDAR datasets' release layouts (the ones `datasets.py` reads, spec lidar §3), for tests and
the built-in synthetic benchmark: given points and raw labels, they write what the real releases hold, so the real
readers are exercised end to end.

Deterministic given the inputs and `seed` (tokens, instance ids and poses come from a seeded generator); every
file is written through a temporary file and a rename, so an interrupted writer leaves no half-written file.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from taskmerge.checkpoints import atomic_write
from taskmerge.errors import UserError

from .classes import (KITTI_TRAIN_SEQUENCES, KITTI_VAL_SEQUENCES, NUSCENES_FINE_NAMES, NUSCENES_MINI_TRAIN_SCENES,
                      NUSCENES_MINI_VAL_SCENES, NUSCENES_TRAIN_SCENES, NUSCENES_VAL_SCENES, PANDASET_RAW_NAMES,
                      PANDASET_SENSORS)
from .datasets import PANDASET_Z_SHIFT, SPLITS, quaternion_matrix, require_pandas

Frame = tuple[str, np.ndarray, np.ndarray]  # (split, points float32 [N, 4] x, y, z, intensity, raw labels [N])
_NUSCENES_LOG = "n015-2018-07-18-11-07-57+0800"
_NUSCENES_START_US = 1531883530449377
_SCENES = {"v1.0-trainval": {"train": NUSCENES_TRAIN_SCENES, "val": NUSCENES_VAL_SCENES},
           "v1.0-mini": {"train": NUSCENES_MINI_TRAIN_SCENES, "val": NUSCENES_MINI_VAL_SCENES}}
_PANDASET_LATITUDE = {"val": 37.5, "train": 37.7}  # either side of the split line, 37.6


class PandaSetFrame(NamedTuple):
    """One PandaSet frame in the ego frame the reader returns: each sensor's points [N, 4] and raw classes 1–42."""

    panda64_points: np.ndarray
    panda64_classes: np.ndarray
    pandagt_points: np.ndarray
    pandagt_classes: np.ndarray


class PandaSetScene(NamedTuple):
    """A scene: its split (which decides its GPS latitude) and its frames."""

    split: str
    frames: Sequence[PandaSetFrame]


def _write(path: Path, write: Callable[[Path], Any]) -> None:
    """Create the parent folders and write `path` atomically with `write(temporary_path)`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        write(tmp)


def _write_json(path: Path, data: Any) -> None:
    """Write `data` as JSON, atomically."""
    _write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1) + "\n"))


def _write_array(path: Path, array: np.ndarray) -> None:
    """Write an array's raw bytes (C order, no header), atomically, as the datasets' `.bin` / `.label` files are."""
    _write(path, lambda tmp: np.ascontiguousarray(array).tofile(tmp))


def _check_split(split: str) -> None:
    """Fail unless the split is train or val."""
    if split not in SPLITS:
        raise UserError(f"frame split must be one of {list(SPLITS)}, got {split!r}")


def _check_points(points: np.ndarray, labels: np.ndarray) -> None:
    """Fail unless there is one label per x, y, z, intensity row."""
    if points.ndim != 2 or points.shape[1] != 4 or labels.shape != (len(points),):
        raise UserError(f"a frame needs points [N, 4] and labels [N], got {points.shape} and {labels.shape}")


def _token(rng: np.random.Generator) -> str:
    """A 32-hex-digit token, as nuScenes' (uuid4 hex)."""
    return rng.bytes(16).hex()


# ---- nuScenes ------------------------------------------------------------------------------------------------

def _scene_slots(frames: Sequence[Frame], frames_per_scene: int, version: str) -> list[tuple[str, int]]:
    """(scene name, position in the scene) of every frame: each split fills its devkit scenes in order."""
    names = _SCENES[version]
    seen = {"train": 0, "val": 0}
    slots = []
    for split, points, labels in frames:
        _check_split(split)
        _check_points(points, labels)
        scene, position = divmod(seen[split], frames_per_scene)
        if scene >= len(names[split]):
            raise UserError(f"{seen[split] + 1} nuScenes {split} frames do not fit in the devkit's "
                            f"{len(names[split])} {split} scenes at frames_per_scene={frames_per_scene}")
        slots.append((names[split][scene], position))
        seen[split] += 1
    return slots


def write_nuscenes(root: str | Path, frames: Sequence[Frame], frames_per_scene: int = 2, seed: int = 0,
                   version: str = "v1.0-trainval") -> Path:
    """Write `root/nuscenes/` (`version` v1.0-trainval or v1.0-mini): scene, sample, sample_data, lidarseg and
    category tables, one key frame per input frame in the devkit's scenes of its split (filled in list order),
    `.pcd.bin` points (ring column 0) and uint8 fine labels (0–31). Returns the dataset folder."""
    if version not in _SCENES:
        raise UserError(f"nuScenes version must be one of {list(_SCENES)}, got {version!r}")
    base, rng = Path(root) / "nuscenes", np.random.default_rng(seed)
    slots = _scene_slots(frames, frames_per_scene, version)
    scenes: dict[str, dict[str, Any]] = {}
    last: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}  # scene name -> its latest (sample, sample_data)
    samples, sample_data, lidarseg = [], [], []
    for (name, position), (_, points, labels) in zip(slots, frames):
        scene = scenes.setdefault(name, {"token": _token(rng), "log_token": _token(rng), "nbr_samples": 0,
                                         "first_sample_token": "", "last_sample_token": "", "name": name,
                                         "description": "synthetic scene"})
        timestamp = _NUSCENES_START_US + int(name[6:]) * 20_000_000 + position * 500_000
        sample = {"token": _token(rng), "timestamp": timestamp, "prev": "", "next": "", "scene_token": scene["token"]}
        data = {"token": _token(rng), "sample_token": sample["token"], "ego_pose_token": _token(rng),
                "calibrated_sensor_token": _token(rng), "timestamp": timestamp, "fileformat": "pcd",
                "is_key_frame": True, "height": 0, "width": 0,
                "filename": f"samples/LIDAR_TOP/{_NUSCENES_LOG}__LIDAR_TOP__{timestamp}.pcd.bin", "prev": "",
                "next": ""}
        if name in last:
            for previous, current in zip(last[name], (sample, data)):
                previous["next"], current["prev"] = current["token"], previous["token"]
        last[name] = sample, data
        scene["first_sample_token"] = scene["first_sample_token"] or sample["token"]
        scene["last_sample_token"], scene["nbr_samples"] = sample["token"], scene["nbr_samples"] + 1
        label_file = f"lidarseg/{version}/{data['token']}_lidarseg.bin"
        samples.append(sample)
        sample_data.append(data)
        lidarseg.append({"token": _token(rng), "sample_data_token": data["token"], "filename": label_file})
        ring = np.zeros((len(points), 1), dtype=np.float32)
        _write_array(base / data["filename"], np.concatenate([points.astype(np.float32), ring], 1))
        _write_array(base / label_file, labels.astype(np.uint8))
    categories = [{"token": _token(rng), "name": name, "description": name, "index": index}
                  for index, name in enumerate(NUSCENES_FINE_NAMES)]
    tables = {"scene": list(scenes.values()), "sample": samples, "sample_data": sample_data, "lidarseg": lidarseg,
              "category": categories}
    for table, records in tables.items():
        _write_json(base / version / f"{table}.json", records)
    return base


# ---- SemanticKITTI -------------------------------------------------------------------------------------------

def write_semantic_kitti(root: str | Path, frames: Sequence[Frame], seed: int = 0) -> Path:
    """Write `root/semantic_kitti/dataset/sequences/`: val frames in 08, train frames dealt over the train
    sequences in turn (00, 01, …; the reader lists them sequence by sequence), each a velodyne `.bin` and a `.label`
    whose upper 16 bits hold a random instance id (so a reader must mask them off). Returns the sequences folder."""
    base, rng = Path(root) / "semantic_kitti" / "dataset" / "sequences", np.random.default_rng(seed)
    counts: dict[str, int] = {}
    for k, (split, points, labels) in enumerate(frames):
        _check_split(split)
        _check_points(points, labels)
        sequences = KITTI_TRAIN_SEQUENCES if split == "train" else KITTI_VAL_SEQUENCES
        seen = sum(counts.get(s, 0) for s in sequences)
        sequence = sequences[seen % len(sequences)]
        stem = f"{counts.get(sequence, 0):06d}"
        counts[sequence] = counts.get(sequence, 0) + 1
        instances = rng.integers(1, 1 << 16, size=len(labels), dtype=np.uint32)
        _write_array(base / sequence / "velodyne" / f"{stem}.bin", points.astype(np.float32))
        _write_array(base / sequence / "labels" / f"{stem}.label", labels.astype(np.uint32) | (instances << 16))
    return base


# ---- PandaSet ------------------------------------------------------------------------------------------------

def _random_pose(rng: np.random.Generator) -> dict[str, dict[str, float]]:
    """A pose record: a heading mostly about z (small roll and pitch) and a position within ±100 m."""
    axis = np.array([rng.normal(0, 0.05), rng.normal(0, 0.05), 1.0])
    angle = rng.uniform(-np.pi, np.pi)
    w, (x, y, z) = np.cos(angle / 2), np.sin(angle / 2) * axis / np.linalg.norm(axis)
    position = rng.uniform([-100, -100, -5], [100, 100, 5])
    return {"position": dict(zip("xyz", map(float, position))),
            "heading": {"w": float(w), "x": float(x), "y": float(y), "z": float(z)}}


def _to_world(points: np.ndarray, pose: dict[str, dict[str, float]]) -> np.ndarray:
    """Ego points (as the reader returns them) in world coordinates: undo z −= 1.6, then apply the pose."""
    heading, position = pose["heading"], pose["position"]
    rotation = quaternion_matrix(heading["w"], heading["x"], heading["y"], heading["z"])
    ego = points[:, :3].astype(np.float64) + [0.0, 0.0, PANDASET_Z_SHIFT]
    return ego @ rotation.T + [position["x"], position["y"], position["z"]]


def _pandaset_frames(frame: PandaSetFrame, pose: dict[str, dict[str, float]], time: float) -> tuple[Any, Any]:
    """The lidar DataFrame (x, y, z, i, t, d; Pandar64 rows first) and the row-aligned semseg DataFrame."""
    pandas = require_pandas()
    parts = [(frame.panda64_points, frame.panda64_classes, PANDASET_SENSORS["panda64"]),
             (frame.pandagt_points, frame.pandagt_classes, PANDASET_SENSORS["pandagt"])]
    for points, classes, _ in parts:
        _check_points(points, classes)
    world = np.concatenate([_to_world(points, pose) for points, _, _ in parts])
    intensity = np.concatenate([points[:, 3] for points, _, _ in parts]).astype(np.float64)
    sensor = np.concatenate([np.full(len(points), d, dtype=np.int64) for points, _, d in parts])
    columns = {"x": world[:, 0], "y": world[:, 1], "z": world[:, 2], "i": intensity, "t": np.full(len(world), time),
               "d": sensor}
    semseg = {"class": np.concatenate([classes for _, classes, _ in parts]).astype(np.int64)}
    # object column labels, as the 2020 release's pickles (pandas 3's default `str` labels pickle differently)
    return tuple(pandas.DataFrame(data).set_axis(pandas.Index(list(data), dtype=object), axis=1)
                 for data in (columns, semseg))


def write_pandaset(root: str | Path, scenes: Sequence[PandaSetScene], seed: int = 0) -> Path:
    """Write `root/pandaset/NNN/` per scene (001, 002, …): `lidar/NN.pkl.gz` in world coordinates under a seeded
    pose per frame, `lidar/poses.json`, `annotations/semseg/NN.pkl.gz` and `classes.json`, `meta/gps.json` at
    latitude 37.5 (val) or 37.7 (train). Returns the dataset folder."""
    base, rng = Path(root) / "pandaset", np.random.default_rng(seed)
    for number, scene in enumerate(scenes, 1):
        _check_split(scene.split)
        folder = base / f"{number:03d}"
        poses = [_random_pose(rng) for _ in scene.frames]
        for index, (frame, pose) in enumerate(zip(scene.frames, poses)):
            lidar, semseg = _pandaset_frames(frame, pose, 1.557e9 + 0.1 * index)
            _write(folder / "lidar" / f"{index:02d}.pkl.gz", lambda tmp: lidar.to_pickle(tmp, compression="gzip"))
            _write(folder / "annotations" / "semseg" / f"{index:02d}.pkl.gz",
                   lambda tmp: semseg.to_pickle(tmp, compression="gzip"))
        gps = [{"lat": _PANDASET_LATITUDE[scene.split], "long": -122.4, "height": 10.0, "xvel": 0.0, "yvel": 0.0}
               for _ in scene.frames]
        _write_json(folder / "lidar" / "poses.json", poses)
        _write_json(folder / "meta" / "gps.json", gps)
        names = {str(raw): name for raw, name in PANDASET_RAW_NAMES.items()}
        _write_json(folder / "annotations" / "semseg" / "classes.json", names)
    return base
