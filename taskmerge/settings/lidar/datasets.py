"""Readers of the four LiDAR datasets in their release layouts (spec lidar §3), with numpy, json and (PandaSet
only) pandas; no devkit. `open_split(dataset, root, split)` gives a `LidarScans` whose `read(i)` returns
`(points float32 [N, 4]: x, y, z, raw intensity, labels int64 [N]: train ids, 255 ignored)`.

Under the data root:
- `nuscenes/`: the JSON tables of `v1.0-trainval/` (or `v1.0-mini/` when trainval is absent). Frames are the
  records of `lidarseg.json` (one per LIDAR_TOP key frame): `sample_data_token` → `sample_data.json` (its
  `filename` must lie under `samples/LIDAR_TOP/` and `is_key_frame` be true: the v1.0 sample_data table has no
  channel field, the devkit derives it through calibrated_sensor → sensor; the filename prefix gives the same
  answer without two more tables) → `sample.json` → `scene.json` name → split by the devkit's scene lists.
  Points `samples/LIDAR_TOP/*.pcd.bin` (float32 × 5, the 5th column the ring index, dropped), labels
  `lidarseg/<version>/<token>_lidarseg.bin` (uint8 fine index). `category.json` must give the fine classes the
  indices this module's table assumes. Frames are ordered by scene name, then time. The trainval
  `sample_data.json` is large (≈0.4 GB): opening a nuScenes split parses it once (seconds, a few GB of memory).
- `semantic_kitti/dataset/sequences/NN/{velodyne/*.bin (float32 × 4), labels/*.label (uint32)}`: train 00–07, 09,
  10; val 08. Sequences that are absent are skipped (the scan count, part of `description()`, tells).
- `pandaset/<scene>/`: scenes are the folders with `annotations/semseg/`; val when `meta/gps.json[0]["lat"]` ≤ 37.6.
  Frames `lidar/NN.pkl.gz` (gzip-pickled DataFrame x, y, z, i, t, d in world coordinates; rows with d = 0 are the
  Pandar64's, d = 1 the PandarGT's) with `annotations/semseg/NN.pkl.gz` (column `class`, row-aligned) and pose NN of
  `lidar/poses.json`. As ScaLR's `pandaset_for_scalr.py`: points go to the ego frame by the inverse of the pose
  (p_ego = Rᵀ (p_world − position), R from the `heading` quaternion w, x, y, z, normalised), then z −= 1.6 (the
  road about 1.7 m below the origin). ScaLR pairs the k-th sorted frame of a scene with pose k; here frame NN gets
  pose NN, the same for the release's 00..79. Pickles are read by a restricted unpickler that rebuilds DataFrames
  and nothing else.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import json
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from torch.utils.data import Dataset

from taskmerge.errors import UserError
from taskmerge.legacy_pickle import NUMPY_SAFE_GLOBALS

from .classes import (KITTI_TRAIN_SEQUENCES, KITTI_VAL_SEQUENCES, NUSCENES_FINE_NAMES,
                      NUSCENES_MINI_TRAIN_SCENES, NUSCENES_MINI_VAL_SCENES, NUSCENES_TRAIN_SCENES, NUSCENES_VAL_SCENES,
                      PANDASET_SENSORS, PANDASET_VAL_MAX_LATITUDE, check_dataset, train_labels)

SPLITS = ("train", "val")
READER_VERSION = 1  # part of `description()`: bump when what `read` returns changes
PANDASET_Z_SHIFT = 1.6  # metres subtracted from z after the inverse pose (ScaLR)
NUSCENES_VERSIONS = ("v1.0-trainval", "v1.0-mini")
NUSCENES_TABLES = ("sample_data", "sample", "scene", "lidarseg", "category")
_NUSCENES_SPLITS = {
    "v1.0-trainval": {"train": frozenset(NUSCENES_TRAIN_SCENES), "val": frozenset(NUSCENES_VAL_SCENES)},
    "v1.0-mini": {"train": frozenset(NUSCENES_MINI_TRAIN_SCENES), "val": frozenset(NUSCENES_MINI_VAL_SCENES)},
}
_LIDAR_TOP_PREFIX = "samples/LIDAR_TOP/"


@dataclass(frozen=True)
class Scan:
    """The files of one scan and, for PandaSet, its sensor id and pose (rotation [3, 3], position [3])."""

    points: Path
    labels: Path
    sensor: int | None = None
    rotation: np.ndarray | None = None
    position: np.ndarray | None = None


class LidarScans(Dataset):
    """One split of one LiDAR dataset: `read(i)` (also `self[i]`) gives the scan's points and train ids."""

    def __init__(self, name: str, split: str, root: Path, scans: Sequence[Scan], read_raw: Callable[[Scan], tuple],
                 tables: Sequence[Path] = ()) -> None:
        if not scans:
            raise UserError(f"no {split} scans of {name} under {root}; expected {_LAYOUTS[name]}")
        self.name, self.split, self.root = name, split, root
        self.scans, self.tables, self._read_raw = list(scans), list(tables), read_raw

    def __len__(self) -> int:
        return len(self.scans)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.read(i)

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(points float32 [N, 4] x, y, z, raw intensity; labels int64 [N] train ids, 255 ignored) of scan `i`."""
        scan = self.scans[i]
        points, raw = self._read_raw(scan)
        if len(raw) != len(points):
            raise UserError(f"{scan.labels}: {len(raw)} labels for the {len(points)} points of {scan.points}; "
                            "expected one label per point")
        return points, train_labels(self.name, raw)

    def description(self) -> dict[str, Any]:
        """What a cache key hashes for this split: dataset, split, root, scan count and a hash of every file read
        (relative name, size, mtime; stated afresh at each call), plus the reader's version."""
        return {"dataset": self.name, "split": self.split, "root": str(self.root), "scans": len(self.scans),
                "files": self._files_hash(), "reader": READER_VERSION}

    def _files_hash(self) -> str:
        """SHA-256 over the tables and every scan's point and label files, in order."""
        digest = hashlib.sha256()
        for path in [*self.tables, *(p for scan in self.scans for p in (scan.points, scan.labels))]:
            stat = path.stat()
            digest.update(f"{path.relative_to(self.root)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()


def open_split(dataset: str, root: str | Path, split: str) -> LidarScans:
    """The `train` or `val` split of `dataset` (nuscenes, semantic_kitti, panda64, pandagt) under the data root."""
    check_dataset(dataset)
    if split not in SPLITS:
        raise UserError(f"LiDAR split must be one of {list(SPLITS)}, got {split!r}")
    root = Path(root).expanduser().resolve()
    check_layout([dataset], root)
    if dataset == "nuscenes":
        return _nuscenes_split(root, split)
    if dataset == "semantic_kitti":
        return _kitti_split(root, split)
    return _pandaset_split(dataset, root, split)


# ---- layout check --------------------------------------------------------------------------------------------

_LAYOUTS = {
    "nuscenes": "nuscenes/v1.0-trainval/{sample_data,sample,scene,lidarseg,category}.json, "
                "nuscenes/samples/LIDAR_TOP/*.pcd.bin and nuscenes/lidarseg/v1.0-trainval/<token>_lidarseg.bin "
                "(or v1.0-mini in place of v1.0-trainval)",
    "semantic_kitti": "semantic_kitti/dataset/sequences/NN/velodyne/*.bin and labels/*.label (train 00-07, 09, 10; "
                      "val 08)",
    "panda64": "pandaset/<scene>/{lidar/NN.pkl.gz, lidar/poses.json, annotations/semseg/NN.pkl.gz, meta/gps.json}",
}
_LAYOUTS["pandagt"] = _LAYOUTS["panda64"]


def nuscenes_version(root: Path) -> str:
    """`v1.0-trainval` when its tables folder exists, else `v1.0-mini` when that one does, else `v1.0-trainval`."""
    present = [v for v in NUSCENES_VERSIONS if (root / "nuscenes" / v).is_dir()]
    return present[0] if present else NUSCENES_VERSIONS[0]


def _nuscenes_missing(root: Path) -> list[str]:
    """The nuScenes tables and folders absent under the data root (tables of trainval, or of mini when present)."""
    version = nuscenes_version(root)
    files = [(f"nuscenes/{version}/{table}.json", f"the nuScenes {table} table") for table in NUSCENES_TABLES]
    folders = [("nuscenes/samples/LIDAR_TOP/", "the key-frame point clouds, *.pcd.bin"),
               (f"nuscenes/lidarseg/{version}/", "the lidarseg labels, <token>_lidarseg.bin")]
    return ([f"{path} ({what})" for path, what in files if not (root / path).is_file()]
            + [f"{path} ({what})" for path, what in folders if not (root / path).is_dir()])


def _kitti_missing(root: Path) -> list[str]:
    """SemanticKITTI's val sequence, any train sequence, and the labels of every sequence present, when absent."""
    sequences = root / "semantic_kitti" / "dataset" / "sequences"
    missing = []
    if not any((sequences / seq / "velodyne").is_dir() for seq in KITTI_TRAIN_SEQUENCES):
        missing.append("semantic_kitti/dataset/sequences/{00..07,09,10}/velodyne/ (at least one train sequence's "
                       "scans, *.bin)")
    for seq in KITTI_TRAIN_SEQUENCES + KITTI_VAL_SEQUENCES:
        if seq in KITTI_VAL_SEQUENCES or (sequences / seq).is_dir():
            missing += [f"semantic_kitti/dataset/sequences/{seq}/{folder}/ ({what})"
                        for folder, what in (("velodyne", "scans, *.bin"), ("labels", "labels, *.label"))
                        if not (sequences / seq / folder).is_dir()]
    return missing


def _pandaset_missing(root: Path) -> list[str]:
    """An annotated scene, and each annotated scene's poses and GPS, when absent."""
    scenes = _pandaset_scene_dirs(root)
    if not scenes:
        return ["pandaset/<scene>/annotations/semseg/ (at least one annotated scene)"]
    return [f"{path.relative_to(root)} ({what})" for scene in scenes
            for path, what in ((scene / "lidar" / "poses.json", "the frames' poses"),
                               (scene / "meta" / "gps.json", "the scene's GPS, which decides its split"))
            if not path.is_file()]


_MISSING: dict[str, Callable[[Path], list[str]]] = {"nuscenes": _nuscenes_missing, "semantic_kitti": _kitti_missing,
                                                   "panda64": _pandaset_missing, "pandagt": _pandaset_missing}


def check_layout(datasets: Sequence[str], root: str | Path) -> None:
    """Fail once, listing every missing path of every named dataset with the layout it belongs to."""
    root = Path(root).expanduser()
    problems = []
    for dataset in dict.fromkeys(check_dataset(name) for name in datasets):
        missing = _MISSING[dataset](root)
        if missing:
            problems.append(f"- {dataset}: missing " + "; ".join(missing) + f"\n    expected {_LAYOUTS[dataset]}")
    if problems:
        raise UserError(f"LiDAR data incomplete under {root}:\n" + "\n".join(problems))


def _missing_files(scans: Sequence[Scan], what: str) -> None:
    """Fail naming how many, and a few, of the scans' point or label files are absent."""
    missing = [str(p) for scan in scans for p in (scan.points, scan.labels) if not p.is_file()]
    if missing:
        raise UserError(f"{what}: {len(missing)} point or label file(s) missing, e.g. {missing[:3]}")


def _load_json(path: Path) -> Any:
    """A JSON file's content, a `UserError` naming the file when it is unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: cannot read it as JSON ({error})") from error


def _fromfile(path: Path, dtype: type, columns: int) -> np.ndarray:
    """A raw binary array of `columns` values per row (1: flat), failing with the file when its size does not fit."""
    data = np.fromfile(path, dtype=dtype)
    if data.size % columns:
        raise UserError(f"{path}: {data.size} {np.dtype(dtype).name} values, not a multiple of {columns} per point")
    return data.reshape(-1, columns) if columns > 1 else data


# ---- nuScenes ------------------------------------------------------------------------------------------------

def _nuscenes_table(tables: Path, name: str, fields: Sequence[str]) -> list[dict[str, Any]]:
    """The records of one JSON table, each checked for the fields this reader uses."""
    path = tables / f"{name}.json"
    records = _load_json(path)
    if not isinstance(records, list) or not all(isinstance(r, dict) and all(f in r for f in fields) for r in records):
        raise UserError(f"{path}: expected a list of records with fields {list(fields)} (the nuScenes {name} table)")
    return records


def _check_categories(tables: Path) -> None:
    """`category.json` must number the lidarseg fine classes as `NUSCENES_FINE_NAMES` does."""
    found = {r["index"]: r["name"] for r in _nuscenes_table(tables, "category", ("name",)) if "index" in r}
    expected = dict(enumerate(NUSCENES_FINE_NAMES))
    if found != expected:
        wrong = sorted(set(found.items()) ^ set(expected.items()), key=str)[:4]
        raise UserError(f"{tables / 'category.json'}: the lidarseg fine classes (records with an `index`) differ "
                        f"from nuScenes-lidarseg's 32 classes, e.g. {wrong}")


def _nuscenes_split(root: Path, split: str) -> LidarScans:
    """Key-frame LIDAR_TOP scans of the scenes the devkit puts in `split`."""
    base, version = root / "nuscenes", nuscenes_version(root)
    tables = base / version
    _check_categories(tables)
    fields = ("token", "sample_token", "filename", "is_key_frame", "timestamp")
    sample_data = {r["token"]: r for r in _nuscenes_table(tables, "sample_data", fields)
                   if r["is_key_frame"] and r["filename"].startswith(_LIDAR_TOP_PREFIX)}
    samples = {r["token"]: r["scene_token"] for r in _nuscenes_table(tables, "sample", ("token", "scene_token"))}
    scene_names = {r["token"]: r["name"] for r in _nuscenes_table(tables, "scene", ("token", "name"))}
    frames = []
    for record in _nuscenes_table(tables, "lidarseg", ("sample_data_token", "filename")):
        data = sample_data.get(record["sample_data_token"])
        if data is None:
            raise UserError(f"{tables / 'lidarseg.json'}: sample_data {record['sample_data_token']} is not a "
                            f"LIDAR_TOP key frame of sample_data.json (filename under {_LIDAR_TOP_PREFIX})")
        scene = scene_names.get(samples.get(data["sample_token"]))
        if scene is None:
            raise UserError(f"{tables}: sample_data {data['token']} has no sample / scene record")
        if scene in _NUSCENES_SPLITS[version][split]:
            frames.append((scene, data["timestamp"], Scan(base / data["filename"], base / record["filename"])))
        elif not any(scene in names for names in _NUSCENES_SPLITS[version].values()):
            raise UserError(f"{tables / 'scene.json'}: scene {scene!r} is in neither the devkit's train nor val "
                            f"list of {version}")
    scans = [scan for _, _, scan in sorted(frames, key=lambda f: (f[0], f[1]))]
    _missing_files(scans, f"nuScenes {version} {split}")
    tables_read = [tables / f"{name}.json" for name in NUSCENES_TABLES]
    return LidarScans("nuscenes", split, root, scans, _read_nuscenes, tables_read)


def _read_nuscenes(scan: Scan) -> tuple[np.ndarray, np.ndarray]:
    """x, y, z, intensity of a `.pcd.bin` (the ring column dropped) and its uint8 fine labels."""
    return _fromfile(scan.points, np.float32, 5)[:, :4].copy(), _fromfile(scan.labels, np.uint8, 1)


# ---- SemanticKITTI -------------------------------------------------------------------------------------------

def _kitti_split(root: Path, split: str) -> LidarScans:
    """Every scan of the split's sequences (train 00-07, 09, 10; val 08), in sequence then file order."""
    sequences = root / "semantic_kitti" / "dataset" / "sequences"
    names = KITTI_TRAIN_SEQUENCES if split == "train" else KITTI_VAL_SEQUENCES
    scans = [Scan(path, sequences / seq / "labels" / f"{path.stem}.label")
             for seq in names for path in sorted((sequences / seq / "velodyne").glob("*.bin"))]
    _missing_files(scans, f"SemanticKITTI {split}")
    return LidarScans("semantic_kitti", split, root, scans, _read_kitti)


def _read_kitti(scan: Scan) -> tuple[np.ndarray, np.ndarray]:
    """x, y, z, remission of a velodyne `.bin` and its raw uint32 labels (instance bits included)."""
    return _fromfile(scan.points, np.float32, 4), _fromfile(scan.labels, np.uint32, 1)


# ---- PandaSet ------------------------------------------------------------------------------------------------

def _pandaset_scene_dirs(root: Path) -> list[Path]:
    """Scene folders with semantic annotations, sorted by name."""
    return sorted(path.parent.parent for path in (root / "pandaset").glob("*/annotations/semseg") if path.is_dir())


def _scene_latitude(scene: Path) -> float:
    """The first GPS latitude of a scene, which decides its split."""
    path = scene / "meta" / "gps.json"
    gps = _load_json(path)
    try:
        return float(gps[0]["lat"])
    except (LookupError, TypeError, ValueError) as error:
        raise UserError(f"{path}: expected a list of GPS records, the first with a numeric 'lat'") from error


def quaternion_matrix(w: float, x: float, y: float, z: float) -> np.ndarray:
    """Rotation matrix of a quaternion (normalised first, as transforms3d's `quat2mat`)."""
    q = np.array([w, x, y, z], dtype=np.float64)
    norm = float(q @ q)
    if norm < np.finfo(np.float64).eps:
        return np.eye(3)
    w, x, y, z = q * np.sqrt(2.0 / norm)
    return np.array([[1 - y * y - z * z, x * y - w * z, x * z + w * y],
                     [x * y + w * z, 1 - x * x - z * z, y * z - w * x],
                     [x * z - w * y, y * z + w * x, 1 - x * x - y * y]])


def _pose(poses: Any, index: int, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(rotation, position) of frame `index` of a `poses.json`."""
    try:
        pose = poses[index]
        heading, position = pose["heading"], pose["position"]
        rotation = quaternion_matrix(heading["w"], heading["x"], heading["y"], heading["z"])
        return rotation, np.array([position["x"], position["y"], position["z"]], dtype=np.float64)
    except (LookupError, TypeError, ValueError) as error:
        raise UserError(f"{path}: no pose for frame {index}; expected a list of {{position: {{x, y, z}}, "
                        "heading: {w, x, y, z}}} records, one per lidar frame") from error


def _pandaset_scans(scene: Path, sensor: int) -> list[Scan]:
    """The frames of one scene: `lidar/NN.pkl.gz`, its semseg twin and pose NN."""
    poses_path = scene / "lidar" / "poses.json"
    poses = _load_json(poses_path)
    scans = []
    for path in sorted((scene / "lidar").glob("*.pkl.gz")):
        stem = path.name.removesuffix(".pkl.gz")
        if not stem.isdigit():
            raise UserError(f"{path}: expected lidar frames named NN.pkl.gz")
        rotation, position = _pose(poses, int(stem), poses_path)
        scans.append(Scan(path, scene / "annotations" / "semseg" / path.name, sensor, rotation, position))
    return scans


def _pandaset_split(dataset: str, root: Path, split: str) -> LidarScans:
    """Frames of the scenes south (val, latitude ≤ 37.6) or north (train) of the split line, one sensor's rows."""
    val = split == "val"
    scenes = [s for s in _pandaset_scene_dirs(root) if (_scene_latitude(s) <= PANDASET_VAL_MAX_LATITUDE) == val]
    scans = [scan for scene in scenes for scan in _pandaset_scans(scene, PANDASET_SENSORS[dataset])]
    _missing_files(scans, f"PandaSet {split}")
    tables = [scene / name for scene in scenes for name in ("lidar/poses.json", "meta/gps.json")]
    return LidarScans(dataset, split, root, scans, _read_pandaset, tables)


def _column(frame: Any, name: str, path: Path) -> np.ndarray:
    """One column of a DataFrame as numpy, failing with the file when it is absent."""
    if name not in frame.columns:
        raise UserError(f"{path}: no column {name!r}; found {list(frame.columns)}")
    return frame[name].to_numpy()


def _read_pandaset(scan: Scan) -> tuple[np.ndarray, np.ndarray]:
    """One sensor's rows of a frame, moved to the ego frame (inverse pose, then z −= 1.6), and their raw classes."""
    frame, semseg = read_dataframe(scan.points), read_dataframe(scan.labels)
    if len(semseg) != len(frame):
        raise UserError(f"{scan.labels}: {len(semseg)} rows for the {len(frame)} rows of {scan.points}; expected "
                        "row-aligned semantic labels")
    rows = _column(frame, "d", scan.points) == scan.sensor
    world = np.stack([_column(frame, c, scan.points)[rows] for c in "xyz"], 1).astype(np.float64)
    ego = (world - scan.position) @ scan.rotation  # row form of Rᵀ (p − position)
    ego[:, 2] -= PANDASET_Z_SHIFT
    intensity = _column(frame, "i", scan.points)[rows].astype(np.float64)
    points = np.concatenate([ego, intensity[:, None]], 1).astype(np.float32)
    return points, _column(semseg, "class", scan.labels)[rows]


# ---- restricted unpickling of PandaSet DataFrames ------------------------------------------------------------

# Every global a pickled DataFrame of numeric columns names, as pickled -> where pandas 3 / this numpy keeps it,
# found by tracing `find_class` on DataFrames (float, int, bool columns; RangeIndex, Index; object and str column
# labels; protocols 4 and 5, `to_pickle`'s) pickled by pandas 3.1.1 and 1.5.3. Old spellings are those pandas' own
# `pickle_compat` renames (Int64Index & co. became Index; `new_block`).
_PANDAS_NAMES: dict[tuple[str, str], tuple[str, str]] = {
    ("pandas", "DataFrame"): ("pandas", "DataFrame"),
    ("pandas.core.frame", "DataFrame"): ("pandas", "DataFrame"),
    ("pandas", "Index"): ("pandas", "Index"),
    ("pandas.core.indexes.base", "Index"): ("pandas", "Index"),
    ("pandas.core.indexes.numeric", "Int64Index"): ("pandas", "Index"),
    ("pandas.core.indexes.numeric", "UInt64Index"): ("pandas", "Index"),
    ("pandas.core.indexes.numeric", "Float64Index"): ("pandas", "Index"),
    ("pandas", "RangeIndex"): ("pandas", "RangeIndex"),
    ("pandas.core.indexes.range", "RangeIndex"): ("pandas", "RangeIndex"),
    ("pandas.core.indexes.base", "_new_Index"): ("pandas.core.indexes.base", "_new_Index"),
    ("pandas.core.internals.managers", "BlockManager"): ("pandas.core.internals.managers", "BlockManager"),
    ("pandas._libs.internals", "_unpickle_block"): ("pandas._libs.internals", "_unpickle_block"),
    ("pandas.core.internals.blocks", "new_block"): ("pandas._libs.internals", "_unpickle_block"),
    # pandas 3's default `str` column labels (python storage)
    ("pandas", "StringDtype"): ("pandas", "StringDtype"),
    ("pandas.arrays", "StringArray"): ("pandas.arrays", "StringArray"),
    ("pandas._libs.arrays", "__pyx_unpickle_NDArrayBacked"): ("pandas._libs.arrays", "__pyx_unpickle_NDArrayBacked"),
}
_EMPTY = np.zeros(1)
_NUMPY_GLOBALS: dict[tuple[str, str], Any] = {
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _EMPTY.__reduce_ex__(2)[0] for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _EMPTY.__reduce_ex__(5)[0] for core in ("core", "_core")},
    ("numpy", "ndarray"): np.ndarray,
    ("builtins", "slice"): slice,
    # numpy's dtype and scalar builders, in the checked forms of the legacy-checkpoint unpickler
    **{tuple(name.rsplit(".", 1)): builder for builder, name in
       (entry for entry in NUMPY_SAFE_GLOBALS if isinstance(entry, tuple))},
}


class DataFrameUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the allow-listed pandas / numpy / builtins globals a DataFrame needs and
    refuses every other one with a `UserError` naming the file and the global; nothing else is imported."""

    def __init__(self, file: BinaryIO, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_GLOBALS:
            return _NUMPY_GLOBALS[module, name]
        if (module, name) not in _PANDAS_NAMES:
            raise UserError(f"{self.path}: refusing to unpickle global {module}.{name}; a PandaSet frame is a pandas "
                            "DataFrame of numbers, which needs only pandas' frame, index and block builders, numpy "
                            "arrays and dtypes and builtins.slice")
        where, attribute = _PANDAS_NAMES[module, name]
        return getattr(importlib.import_module(where), attribute)


def require_pandas() -> Any:
    """The pandas module, a `UserError` saying how to install it when it is missing."""
    try:
        return importlib.import_module("pandas")
    except ImportError as error:
        raise UserError("reading PandaSet needs pandas: pip install 'taskmerge[lidar]'") from error


def read_dataframe(path: Path) -> Any:
    """The DataFrame of a PandaSet `.pkl.gz`, unpickled through `DataFrameUnpickler`."""
    pandas = require_pandas()
    try:
        with gzip.open(path, "rb") as handle:
            frame = DataFrameUnpickler(handle, path).load()
    except UserError:
        raise
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError, TypeError, ValueError,
            LookupError) as error:
        raise UserError(f"{path}: cannot read it as a gzip-pickled DataFrame ({error})") from error
    if not isinstance(frame, pandas.DataFrame):
        raise UserError(f"{path}: holds a {type(frame).__name__}, expected a pandas DataFrame")
    return frame
