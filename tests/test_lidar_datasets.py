"""LiDAR dataset layouts: the writers' tiny trees read back by the real readers (points, train ids, splits), the
class maps against the spec and the reference tables, the layout check, and the PandaSet pickles' safety."""

from __future__ import annotations

import base64
import copyreg
import gzip
import json
import os
import pickle
import sys

import numpy as np
import pandas as pd
import pytest

from taskmerge.errors import UserError
from taskmerge.settings.lidar import classes
from taskmerge.settings.lidar.classes import CLASS_NAMES, IGNORE_INDEX, train_labels
from taskmerge.settings.lidar.datasets import (NUSCENES_TABLES, check_layout, open_split, quaternion_matrix,
                                               read_dataframe)
from taskmerge.settings.lidar.layouts import (PandaSetFrame, PandaSetScene, write_nuscenes, write_pandaset,
                                              write_semantic_kitti)


# Gzipped pickles written by pandas 1.5.3 / numpy 1.26.4 (numpy.core names, Int64Index, protocol 4; RangeIndex and
# `_frombuffer`, protocol 5), as a pre-pandas-3 release holds: x, y, z = (1.5, 0.5, -1), (-2, 4, 0.2), (3.25, -1, 0.3);
# i = 10, 200, 33; t = 1.557e9; d = 0, 0, 1; and class = 13, 7, 41.
PANDAS1_LIDAR = (
    "H4sIAAAAAAAC/21TzWvUQBRPdjerVrEWURcUD+KhHsylxQ9QtloRanAL3sswSWY3Q5PZkEzorlqoh64tzK3Pg/rH6NWb4MGrf4JHb/pmkmC67Y"
    "OZN5O8N+/3ex97nQ+f25YRtZRSEdLcDcYZc4cZTRioc8+opM/N+QjuvINdWFYdkowyUDeb5lxIlgka525CBR2xLAd14Wk8DrZflnd0V1crDxJz"
    "P//vAmqRFCLlwXbMiK99tPEVUSTptHw9KWLJaZbRKb5KMhaMRS6zIpDa0DGGoM7g28bkCDxrH9ZtH97DK1j2bM/x2jOIFpUTymmqmajW8AEcHp"
    "T/28p+BIPB4MVfFLN5lgT/cH1SJuZPv9TW11ItrJX6V/X9UnX//aXWnz5q+dZfMfKjsrtd2fFS761p/f3Nys8n8xowvDrrFxxpC8yPk8c8YIYY"
    "crE1bK+l9+h8dDFa0nSjyzVZ25DtqRZvUIxunEawZ82JXWkNILqFsbrNaDPYwvL3jtc9ZBOWuz7NsVsWiGA7ZEN/Q7DRfeXUZ9M3IfYSnATc3T"
    "dwN49V5O1cRfoasA5vT0DZWG77NS6OS+IKgemUdYRu1EEx06l5qK6fhhS7hWU8QLAbQt5bbQCMHp/E1sbL3Uai6gS1monaLCMyveF0YI/h4Giy"
    "9RCRhElq2G9hMamUOB67oLpkGNOROV6jcTzeyUlYpFhqKhmJqc9wNg7ywnf/ARDDKMCmAwAA"
)
PANDAS1_SEMSEG = (
    "H4sIAAAAAAAC/21STW/UMBDdbHcphSKgErRcuCG2l5w5oCK1CAkigtR7ZU0SZzeq40T+UKlEpXLY0kpzY9qfw1+DsXcrtggfPONk3vi95zkfX/"
    "8aDuLCpz3oCmxadkamtYFWEm68BwcfYv6Tdr/TGU1wJNqpIXy5Wt5oJ40GZdMWNEylsYSb+6orjz8vzgzH50uEUE1h/0IIHwuv+6Y8VlIUAROK"
    "t7Rv+9NFd06laUrCh6I2XVv4uo4dJzc7C+6DR8u4voy7y0g4jn04Vu60Dypw2Lyhq8sfdEiTbA2Tt5Tn+affvOKWDRwVWZKtXRAmB+S4DO8Xvl"
    "Gu0Ux1bFVThjbZgIuS0CUbhn1OR+zNzl1TKvlV2rQAy1Y+EFqeiI/hG8Nnr3B8m0dTKzaa8NmK6tbznWAMMPtNYWTZaeuML12AP8F1vij+DFzm"
    "dJAUtNDEtOY028Lhlzs6v/2j8x3rvDpiRaUCawn4iCMdXjr3FwyavcYX/1NjQE+DnMMQVyTM9nJ2x4FxzAdH1nU98b2cSE6S2FOGjQeIn4JnK0"
    "i+nTPRSgfRg0AJnOMJOiO8J2oF05hug1LdiRWV7/kJwEmhoJA8PpfWF+kfhPZOyskCAAA="
)


def _points(rng: np.random.Generator, n: int, intensity: float = 100.0) -> np.ndarray:
    xyz = rng.uniform(-50, 50, size=(n, 3)) * [1, 1, 0.1]
    return np.concatenate([xyz, rng.uniform(0, intensity, size=(n, 1))], 1).astype(np.float32)


def _train_id(dataset: str, name: str) -> int:
    return CLASS_NAMES[dataset].index(name)


# ---- class maps ----------------------------------------------------------------------------------------------

def test_class_counts_and_intensity_constants():
    assert [classes.num_classes(d) for d in classes.DATASETS] == [16, 19, 17, 17]
    assert classes.INTENSITY["nuscenes"] == (18.742355, 22.04632)
    assert classes.INTENSITY["pandagt"] == (23.06113565, 16.76273235)
    with pytest.raises(UserError, match="unknown LiDAR dataset 'waymo'"):
        classes.num_classes("waymo")


def test_nuscenes_map_is_the_spec_table():
    spec = {9: 1, 14: 2, 15: 3, 16: 3, 17: 4, 18: 5, 21: 6, 2: 7, 3: 7, 4: 7, 6: 7, 12: 8, 22: 9, 23: 10, 24: 11,
            25: 12, 26: 13, 27: 14, 28: 15, 30: 16}
    expected = [spec[i] - 1 if i in spec else IGNORE_INDEX for i in range(32)]
    assert train_labels("nuscenes", np.arange(32, dtype=np.uint8)).tolist() == expected
    assert classes.NUSCENES_FINE_NAMES[17] == "vehicle.car"
    assert train_labels("nuscenes", np.array([17]))[0] == _train_id("nuscenes", "car")
    assert train_labels("nuscenes", np.array([24]))[0] == _train_id("nuscenes", "driveable_surface")


def test_kitti_map_masks_instances_and_folds_moving_classes():
    raw = np.array([10, 252, 40, 60, 0, 1, 99, 81, 300], dtype=np.uint32) | (np.uint32(1234) << 16)
    expected = ["car", "car", "road", "road", None, None, None, "traffic-sign", None]
    ids = [_train_id("semantic_kitti", name) if name else IGNORE_INDEX for name in expected]
    assert train_labels("semantic_kitti", raw).tolist() == ids
    assert train_labels("semantic_kitti", raw).dtype == np.int64


def test_pandaset_map_is_scalr_table():
    assert classes.PANDASET_RAW_NAMES[13] == "Car"
    raw = np.array([13, 7, 41, 30, 1, 22, 0, 43])
    expected = ["car", "road", "manmade", "pedestrian", None, None, None, None]
    for dataset in ("panda64", "pandagt"):
        ids = [_train_id(dataset, name) if name else IGNORE_INDEX for name in expected]
        assert train_labels(dataset, raw).tolist() == ids


def test_nuscenes_scene_lists():
    train, val = set(classes.NUSCENES_TRAIN_SCENES), set(classes.NUSCENES_VAL_SCENES)
    assert (len(train), len(val), len(train & val)) == (700, 150, 0)
    assert set(classes.NUSCENES_MINI_VAL_SCENES) <= val
    assert "scene-0553" in classes.NUSCENES_MINI_TRAIN_SCENES and "scene-0553" in val  # mini has its own split


# ---- round trips ---------------------------------------------------------------------------------------------

def _frames(rng: np.random.Generator, splits: list[str], labels: np.ndarray) -> list[tuple]:
    frames = []
    for split in splits:
        points = _points(rng, int(rng.integers(100, 300)))
        frames.append((split, points, rng.choice(labels, size=len(points))))
    return frames


def _check_round_trip(scans, frames, dataset, atol=0.0):
    assert len(scans) == len(frames)
    for i, (_, points, raw) in enumerate(frames):
        got_points, got_labels = scans.read(i)
        assert got_points.dtype == np.float32 and got_labels.dtype == np.int64
        np.testing.assert_allclose(got_points, points, atol=atol, rtol=0)
        np.testing.assert_array_equal(got_labels, train_labels(dataset, raw))


def test_nuscenes_round_trip_and_splits(tmp_path):
    rng = np.random.default_rng(0)
    frames = _frames(rng, ["train", "val", "train", "val", "val"], np.arange(32, dtype=np.uint8))
    base = write_nuscenes(tmp_path, frames, frames_per_scene=2)
    for split in ("train", "val"):
        scans = open_split("nuscenes", tmp_path, split)
        _check_round_trip(scans, [f for f in frames if f[0] == split], "nuscenes")
        assert scans.name == "nuscenes" and scans.description()["scans"] == len(scans)
    tables = base / "v1.0-trainval"
    scenes = {r["name"] for r in json.loads((tables / "scene.json").read_text())}
    assert scenes == {"scene-0001", "scene-0003", "scene-0012"}  # first train scene; first two val scenes
    tokens = [r["token"] for r in json.loads((tables / "sample_data.json").read_text())]
    assert all(len(t) == 32 and int(t, 16) >= 0 for t in tokens) and len(set(tokens)) == len(tokens)
    categories = json.loads((tables / "category.json").read_text())
    assert {c["index"]: c["name"] for c in categories}[17] == "vehicle.car"


def test_nuscenes_mini_uses_its_own_split(tmp_path):
    rng = np.random.default_rng(1)
    frames = _frames(rng, ["train", "train", "val"], np.arange(32, dtype=np.uint8))
    write_nuscenes(tmp_path, frames, frames_per_scene=1, version="v1.0-mini")
    scans = open_split("nuscenes", tmp_path, "train")  # scene-0061 and scene-0553 (a trainval val scene)
    _check_round_trip(scans, frames[:2], "nuscenes")
    assert len(open_split("nuscenes", tmp_path, "val")) == 1


def test_nuscenes_refuses_other_fine_class_numbering(tmp_path):
    rng = np.random.default_rng(2)
    base = write_nuscenes(tmp_path, _frames(rng, ["train"], np.arange(32, dtype=np.uint8)))
    path = base / "v1.0-trainval" / "category.json"
    records = json.loads(path.read_text())
    records[0]["index"], records[1]["index"] = 1, 0
    path.write_text(json.dumps(records))
    with pytest.raises(UserError, match="category.json"):
        open_split("nuscenes", tmp_path, "train")


def test_semantic_kitti_round_trip_with_instance_bits(tmp_path):
    rng = np.random.default_rng(3)
    raw = np.array(sorted(classes.KITTI_RAW_NAMES), dtype=np.uint32)
    frames = _frames(rng, ["train", "val", "train", "val"], raw)
    base = write_semantic_kitti(tmp_path, frames)
    assert sorted(p.name for p in base.iterdir()) == ["00", "01", "08"]
    stored = np.fromfile(base / "08" / "labels" / "000000.label", dtype=np.uint32)
    assert (stored >> 16).min() > 0 and np.array_equal(stored & 0xFFFF, frames[1][2])
    for split in ("train", "val"):
        _check_round_trip(open_split("semantic_kitti", tmp_path, split), [f for f in frames if f[0] == split],
                          "semantic_kitti")
    car = np.array([10 | (77 << 16), 252 | (5 << 16)], dtype=np.uint32)
    assert train_labels("semantic_kitti", car).tolist() == [_train_id("semantic_kitti", "car")] * 2


def _pandaset_scenes(rng: np.random.Generator) -> list[PandaSetScene]:
    def frame() -> PandaSetFrame:
        n64, ngt = int(rng.integers(150, 400)), int(rng.integers(100, 200))
        return PandaSetFrame(_points(rng, n64, 255), rng.integers(1, 43, n64), _points(rng, ngt, 255),
                             rng.integers(1, 43, ngt))
    return [PandaSetScene("val", [frame(), frame()]), PandaSetScene("train", [frame()])]


def test_pandaset_round_trip_per_sensor_and_split(tmp_path):
    rng = np.random.default_rng(4)
    scenes = _pandaset_scenes(rng)
    base = write_pandaset(tmp_path, scenes)
    assert json.loads((base / "001" / "meta" / "gps.json").read_text())[0]["lat"] == 37.5
    for dataset, points_field, classes_field in (("panda64", 0, 1), ("pandagt", 2, 3)):
        for split in ("train", "val"):
            frames = [(split, f[points_field], f[classes_field]) for s in scenes if s.split == split for f in s.frames]
            _check_round_trip(open_split(dataset, tmp_path, split), frames, dataset, atol=1e-4)
    world = read_dataframe(base / "001" / "lidar" / "00.pkl.gz")
    assert list(world.columns) == ["x", "y", "z", "i", "t", "d"] and set(world["d"]) == {0, 1}
    assert not np.allclose(world[["x", "y", "z"]].to_numpy()[:10], scenes[0].frames[0].panda64_points[:10, :3], atol=1)
    car = np.array([13])
    assert train_labels("panda64", car)[0] == _train_id("panda64", "car")


def test_dataframe_with_an_index_and_float32_column_is_read(tmp_path):
    frame = pd.DataFrame({"x": np.arange(5, dtype=np.float32), "class": np.arange(5)}, index=pd.Index([3, 1, 4, 1, 5]))
    path = tmp_path / "frame.pkl.gz"
    frame.to_pickle(path, compression="gzip")
    pd.testing.assert_frame_equal(read_dataframe(path), frame)


def test_dataframes_pickled_by_pandas_1_are_read(tmp_path):
    for name, data in (("lidar", PANDAS1_LIDAR), ("semseg", PANDAS1_SEMSEG)):
        (tmp_path / f"{name}.pkl.gz").write_bytes(base64.b64decode("".join(data)))
    lidar, semseg = read_dataframe(tmp_path / "lidar.pkl.gz"), read_dataframe(tmp_path / "semseg.pkl.gz")
    assert list(lidar.columns) == ["x", "y", "z", "i", "t", "d"] and lidar.index.tolist() == [0, 1, 2]
    xyz = [[1.5, 0.5, -1.0], [-2.0, 4.0, 0.2], [3.25, -1.0, 0.3]]
    np.testing.assert_array_equal(lidar[["x", "y", "z"]].to_numpy(), xyz)
    assert lidar["d"].tolist() == [0, 0, 1] and semseg["class"].tolist() == [13, 7, 41]


def test_pandas_before_2_block_manager_pickle_is_read(tmp_path):
    """pandas < 2 pickled the BlockManager as NEWOBJ(BlockManager, ()) then BUILD with its `0.14.1` state."""
    frame = pd.DataFrame({"x": np.arange(4.0), "d": np.arange(4)})

    class OldPickler(pickle.Pickler):
        def reducer_override(self, obj):
            if type(obj).__name__ != "BlockManager":
                return NotImplemented
            axes, blocks = list(obj.axes), [{"values": b.values, "mgr_locs": b.mgr_locs.indexer} for b in obj.blocks]
            state = (axes, [b["values"] for b in blocks], [obj.items[b["mgr_locs"]] for b in blocks],
                     {"0.14.1": {"axes": axes, "blocks": blocks}})
            return copyreg.__newobj__, (type(obj),), state

    path = tmp_path / "old.pkl.gz"
    with gzip.open(path, "wb") as handle:
        OldPickler(handle, protocol=4).dump(frame)
    pd.testing.assert_frame_equal(read_dataframe(path), frame)


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Eval(_System):
    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w')",)


@pytest.mark.parametrize("attack, refused", [(_System, r"(posix|os)\.system"), (_Eval, r"builtins\.eval")])
def test_malicious_pandaset_pickle_is_refused_and_nothing_runs(tmp_path, attack, refused):
    write_pandaset(tmp_path, _pandaset_scenes(np.random.default_rng(5)))
    marker = tmp_path / "pwned"
    path = tmp_path / "pandaset" / "001" / "lidar" / "00.pkl.gz"
    with gzip.open(path, "wb") as handle:
        pickle.dump(attack(marker), handle)
    scans = open_split("panda64", tmp_path, "val")
    with pytest.raises(UserError, match=rf"00\.pkl\.gz: refusing to unpickle global {refused}"):
        scans.read(0)
    assert not marker.exists()


def test_pandaset_pose_inverse_and_z_shift_by_hand(tmp_path):
    """ScaLR: p_ego = Rᵀ (p_world − position), then z −= 1.6; here a 90° heading about z at (10, 0, 0)."""
    np.testing.assert_allclose(quaternion_matrix(np.cos(np.pi / 4), 0, 0, np.sin(np.pi / 4)),
                               [[0, -1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-12)
    base = write_pandaset(tmp_path, _pandaset_scenes(np.random.default_rng(11)))
    scene = base / "002"  # the train scene, one frame
    pose = {"position": {"x": 10.0, "y": 0.0, "z": 0.0}, "heading": {"w": 2.0, "x": 0.0, "y": 0.0, "z": 2.0}}
    (scene / "lidar" / "poses.json").write_text(json.dumps([pose]))
    world = pd.DataFrame({"x": [10.0, 8.0], "y": [1.0, 0.0], "z": [1.6, 0.0], "i": [5.0, 7.0], "t": [0.0, 0.0],
                          "d": [0, 1]})
    world.to_pickle(scene / "lidar" / "00.pkl.gz", compression="gzip")
    pd.DataFrame({"class": [13, 7]}).to_pickle(scene / "annotations" / "semseg" / "00.pkl.gz", compression="gzip")
    points, labels = open_split("panda64", tmp_path, "train").read(0)
    np.testing.assert_allclose(points, [[1.0, 0.0, 0.0, 5.0]], atol=1e-6)
    assert labels.tolist() == [_train_id("panda64", "car")]
    points, labels = open_split("pandagt", tmp_path, "train").read(0)
    np.testing.assert_allclose(points, [[0.0, 2.0, -1.6, 7.0]], atol=1e-6)
    assert labels.tolist() == [_train_id("pandagt", "road")]


def test_pandaset_split_line_is_inclusive(tmp_path):
    base = write_pandaset(tmp_path, _pandaset_scenes(np.random.default_rng(12)))
    (base / "002" / "meta" / "gps.json").write_text(json.dumps([{"lat": 37.6, "long": -122.4}]))
    assert len(open_split("panda64", tmp_path, "val")) == 3
    with pytest.raises(UserError, match="no train scans of panda64"):
        open_split("panda64", tmp_path, "train")


def test_missing_pandas_gives_the_install_hint(tmp_path, monkeypatch):
    rng = np.random.default_rng(6)
    write_pandaset(tmp_path, _pandaset_scenes(rng))
    scans = open_split("pandagt", tmp_path, "train")
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(UserError, match=r"reading PandaSet needs pandas: pip install 'taskmerge\[lidar\]'"):
        scans.read(0)


# ---- layout check, errors, description -----------------------------------------------------------------------

def test_check_layout_lists_every_missing_path(tmp_path):
    with pytest.raises(UserError) as error:
        check_layout(["nuscenes", "semantic_kitti", "panda64"], tmp_path)
    message = str(error.value)
    for table in NUSCENES_TABLES:
        assert f"nuscenes/v1.0-trainval/{table}.json (the nuScenes {table} table)" in message
    for path in ("nuscenes/samples/LIDAR_TOP/", "nuscenes/lidarseg/v1.0-trainval/",
                 "semantic_kitti/dataset/sequences/{00..07,09,10}/velodyne/", "sequences/08/velodyne/",
                 "sequences/08/labels/", "pandaset/<scene>/annotations/semseg/"):
        assert path in message


def test_check_layout_names_a_pandaset_scene_without_gps(tmp_path):
    rng = np.random.default_rng(7)
    base = write_pandaset(tmp_path, _pandaset_scenes(rng))
    (base / "002" / "meta" / "gps.json").unlink()
    (base / "001" / "lidar" / "poses.json").unlink()
    with pytest.raises(UserError) as error:
        check_layout(["pandagt"], tmp_path)
    assert "pandaset/002/meta/gps.json" in str(error.value) and "pandaset/001/lidar/poses.json" in str(error.value)


def test_label_count_mismatch_and_bad_split_are_user_errors(tmp_path):
    rng = np.random.default_rng(8)
    base = write_semantic_kitti(tmp_path, _frames(rng, ["train", "val"], np.array([10, 40], dtype=np.uint32)))
    label = base / "08" / "labels" / "000000.label"
    label.write_bytes(label.read_bytes()[:-4])
    with pytest.raises(UserError, match="labels for the"):
        open_split("semantic_kitti", tmp_path, "val").read(0)
    with pytest.raises(UserError, match="split must be one of"):
        open_split("semantic_kitti", tmp_path, "test")


def test_description_tracks_files(tmp_path):
    rng = np.random.default_rng(9)
    base = write_semantic_kitti(tmp_path, _frames(rng, ["train", "val"], np.array([10, 40], dtype=np.uint32)))
    before = open_split("semantic_kitti", tmp_path, "train").description()
    assert {"dataset", "split", "root", "scans", "files"} <= set(before)
    velodyne = base / "00" / "velodyne" / "000000.bin"
    velodyne.write_bytes(velodyne.read_bytes()[:-16])
    (base / "00" / "labels" / "000000.label").write_bytes((base / "00" / "labels" / "000000.label").read_bytes()[:-4])
    assert open_split("semantic_kitti", tmp_path, "train").description()["files"] != before["files"]


def test_writers_are_deterministic(tmp_path):
    frames = _frames(np.random.default_rng(10), ["train", "val"], np.arange(32, dtype=np.uint8))
    for name in ("a", "b"):
        write_nuscenes(tmp_path / name, frames, seed=3)
    for table in NUSCENES_TABLES:
        path = f"nuscenes/v1.0-trainval/{table}.json"
        assert (tmp_path / "a" / path).read_text() == (tmp_path / "b" / path).read_text()
