"""Class maps of the four LiDAR tasks (spec lidar §1, §3): raw label ids as the datasets store them, the training
classes ScaLR segments, the raw → train id lookup (255 = ignored) and the intensity normalisation constants.

Sources, checked against the reference code (tables copied as data only):
- nuScenes: the lidarseg fine classes 0–31 (`category.json` `index`), their challenge classes as nuscenes-devkit
  `eval/lidarseg/utils.py` `LidarsegClassMapper` (fine → 1..16, everything else → 0), the scene splits of
  `utils/splits.py` (val: 150 scenes; train: 700 scenes, kept as runs of scene numbers; mini_train / mini_val);
- SemanticKITTI: `semantic-kitti.yaml` (`labels`, `learning_map` → 0..19, `split`), as shipped by WaffleIron/ScaLR;
- PandaSet: the 42 semseg classes of the dataset's `classes.json` and ScaLR `datasets/pandaset_for_scalr.py`
  `MAPPING_CLASS` (raw → 1..17, 0 = ignored) and `CLASS_NAME`; Panda64 and PandaGT share them.
Every dataset then subtracts 1 and ignores −1 (255), as ScaLR's readers do.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from taskmerge.errors import UserError

IGNORE_INDEX = 255
DATASETS = ("nuscenes", "semantic_kitti", "panda64", "pandagt")
KITTI_SEMANTIC_MASK = 0xFFFF  # the lower 16 bits of a `.label` entry; the upper 16 hold the instance id

# ---- nuScenes ------------------------------------------------------------------------------------------------
NUSCENES_FINE_NAMES: tuple[str, ...] = (
    "noise", "animal", "human.pedestrian.adult", "human.pedestrian.child", "human.pedestrian.construction_worker",
    "human.pedestrian.personal_mobility", "human.pedestrian.police_officer", "human.pedestrian.stroller",
    "human.pedestrian.wheelchair", "movable_object.barrier", "movable_object.debris",
    "movable_object.pushable_pullable", "movable_object.trafficcone", "static_object.bicycle_rack", "vehicle.bicycle",
    "vehicle.bus.bendy", "vehicle.bus.rigid", "vehicle.car", "vehicle.construction", "vehicle.emergency.ambulance",
    "vehicle.emergency.police", "vehicle.motorcycle", "vehicle.trailer", "vehicle.truck", "flat.driveable_surface",
    "flat.other", "flat.sidewalk", "flat.terrain", "static.manmade", "static.other", "static.vegetation",
    "vehicle.ego",
)  # position = the fine index stored in `*_lidarseg.bin`
# challenge class (train id + 1, in this order) -> the fine classes it gathers; the other fine classes are ignored
_NUSCENES_COARSE: dict[str, tuple[str, ...]] = {
    "barrier": ("movable_object.barrier",),
    "bicycle": ("vehicle.bicycle",),
    "bus": ("vehicle.bus.bendy", "vehicle.bus.rigid"),
    "car": ("vehicle.car",),
    "construction_vehicle": ("vehicle.construction",),
    "motorcycle": ("vehicle.motorcycle",),
    "pedestrian": ("human.pedestrian.adult", "human.pedestrian.child", "human.pedestrian.construction_worker",
                   "human.pedestrian.police_officer"),
    "traffic_cone": ("movable_object.trafficcone",),
    "trailer": ("vehicle.trailer",),
    "truck": ("vehicle.truck",),
    "driveable_surface": ("flat.driveable_surface",),
    "other_flat": ("flat.other",),
    "sidewalk": ("flat.sidewalk",),
    "terrain": ("flat.terrain",),
    "manmade": ("static.manmade",),
    "vegetation": ("static.vegetation",),
}

NUSCENES_VAL_SCENES: tuple[str, ...] = (
    "scene-0003", "scene-0012", "scene-0013", "scene-0014", "scene-0015", "scene-0016", "scene-0017", "scene-0018",
    "scene-0035", "scene-0036", "scene-0038", "scene-0039", "scene-0092", "scene-0093", "scene-0094", "scene-0095",
    "scene-0096", "scene-0097", "scene-0098", "scene-0099", "scene-0100", "scene-0101", "scene-0102", "scene-0103",
    "scene-0104", "scene-0105", "scene-0106", "scene-0107", "scene-0108", "scene-0109", "scene-0110", "scene-0221",
    "scene-0268", "scene-0269", "scene-0270", "scene-0271", "scene-0272", "scene-0273", "scene-0274", "scene-0275",
    "scene-0276", "scene-0277", "scene-0278", "scene-0329", "scene-0330", "scene-0331", "scene-0332", "scene-0344",
    "scene-0345", "scene-0346", "scene-0519", "scene-0520", "scene-0521", "scene-0522", "scene-0523", "scene-0524",
    "scene-0552", "scene-0553", "scene-0554", "scene-0555", "scene-0556", "scene-0557", "scene-0558", "scene-0559",
    "scene-0560", "scene-0561", "scene-0562", "scene-0563", "scene-0564", "scene-0565", "scene-0625", "scene-0626",
    "scene-0627", "scene-0629", "scene-0630", "scene-0632", "scene-0633", "scene-0634", "scene-0635", "scene-0636",
    "scene-0637", "scene-0638", "scene-0770", "scene-0771", "scene-0775", "scene-0777", "scene-0778", "scene-0780",
    "scene-0781", "scene-0782", "scene-0783", "scene-0784", "scene-0794", "scene-0795", "scene-0796", "scene-0797",
    "scene-0798", "scene-0799", "scene-0800", "scene-0802", "scene-0904", "scene-0905", "scene-0906", "scene-0907",
    "scene-0908", "scene-0909", "scene-0910", "scene-0911", "scene-0912", "scene-0913", "scene-0914", "scene-0915",
    "scene-0916", "scene-0917", "scene-0919", "scene-0920", "scene-0921", "scene-0922", "scene-0923", "scene-0924",
    "scene-0925", "scene-0926", "scene-0927", "scene-0928", "scene-0929", "scene-0930", "scene-0931", "scene-0962",
    "scene-0963", "scene-0966", "scene-0967", "scene-0968", "scene-0969", "scene-0971", "scene-0972", "scene-1059",
    "scene-1060", "scene-1061", "scene-1062", "scene-1063", "scene-1064", "scene-1065", "scene-1066", "scene-1067",
    "scene-1068", "scene-1069", "scene-1070", "scene-1071", "scene-1072", "scene-1073",
)
# the devkit's 700 train scenes as inclusive runs of scene numbers (`scene-%04d`)
_NUSCENES_TRAIN_RUNS = (
    (1, 2), (4, 11), (19, 34), (41, 76), (120, 135), (138, 139), (149, 152), (154, 155), (157, 168), (170, 185),
    (187, 188), (190, 196), (199, 200), (202, 204), (206, 214), (218, 220), (222, 222), (224, 264), (283, 306),
    (315, 318), (321, 321), (323, 324), (328, 328), (347, 386), (388, 403), (405, 408), (410, 459), (461, 465),
    (467, 469), (471, 472), (474, 480), (499, 502), (504, 515), (517, 518), (525, 539), (541, 546), (566, 566),
    (568, 568), (570, 578), (580, 580), (582, 600), (639, 679), (681, 681), (683, 689), (695, 698), (700, 701),
    (703, 719), (726, 728), (730, 731), (733, 741), (744, 744), (746, 747), (749, 752), (757, 765), (767, 769),
    (786, 787), (789, 792), (803, 806), (808, 813), (815, 817), (819, 822), (847, 856), (858, 858), (860, 866),
    (868, 873), (875, 878), (880, 880), (882, 903), (945, 945), (947, 947), (949, 949), (952, 953), (955, 961),
    (975, 984), (988, 992), (994, 1025), (1044, 1058), (1074, 1102), (1104, 1110),
)
NUSCENES_TRAIN_SCENES: tuple[str, ...] = tuple(f"scene-{n:04d}" for first, last in _NUSCENES_TRAIN_RUNS
                                               for n in range(first, last + 1))
NUSCENES_MINI_TRAIN_SCENES: tuple[str, ...] = ("scene-0061", "scene-0553", "scene-0655", "scene-0757", "scene-0796",
                                               "scene-1077", "scene-1094", "scene-1100")
NUSCENES_MINI_VAL_SCENES: tuple[str, ...] = ("scene-0103", "scene-0916")

# ---- SemanticKITTI -------------------------------------------------------------------------------------------
KITTI_RAW_NAMES: dict[int, str] = {
    0: "unlabeled", 1: "outlier", 10: "car", 11: "bicycle", 13: "bus", 15: "motorcycle", 16: "on-rails", 18: "truck",
    20: "other-vehicle", 30: "person", 31: "bicyclist", 32: "motorcyclist", 40: "road", 44: "parking", 48: "sidewalk",
    49: "other-ground", 50: "building", 51: "fence", 52: "other-structure", 60: "lane-marking", 70: "vegetation",
    71: "trunk", 72: "terrain", 80: "pole", 81: "traffic-sign", 99: "other-object", 252: "moving-car",
    253: "moving-bicyclist", 254: "moving-person", 255: "moving-motorcyclist", 256: "moving-on-rails",
    257: "moving-bus", 258: "moving-truck", 259: "moving-other-vehicle",
}
_KITTI_LEARNING_MAP: dict[int, int] = {
    0: 0, 1: 0, 10: 1, 11: 2, 13: 5, 15: 3, 16: 5, 18: 4, 20: 5, 30: 6, 31: 7, 32: 8, 40: 9, 44: 10, 48: 11, 49: 12,
    50: 13, 51: 14, 52: 0, 60: 9, 70: 15, 71: 16, 72: 17, 80: 18, 81: 19, 99: 0, 252: 1, 253: 7, 254: 6, 255: 8,
    256: 5, 257: 5, 258: 4, 259: 5,
}
KITTI_TRAIN_SEQUENCES: tuple[str, ...] = ("00", "01", "02", "03", "04", "05", "06", "07", "09", "10")
KITTI_VAL_SEQUENCES: tuple[str, ...] = ("08",)

# ---- PandaSet ------------------------------------------------------------------------------------------------
PANDASET_RAW_NAMES: dict[int, str] = {
    1: "Smoke", 2: "Exhaust", 3: "Spray or rain", 4: "Reflection", 5: "Vegetation", 6: "Ground", 7: "Road",
    8: "Lane Line Marking", 9: "Stop Line Marking", 10: "Other Road Marking", 11: "Sidewalk", 12: "Driveway",
    13: "Car", 14: "Pickup Truck", 15: "Medium-sized Truck", 16: "Semi-truck", 17: "Towed Object", 18: "Motorcycle",
    19: "Other Vehicle - Construction Vehicle", 20: "Other Vehicle - Uncommon", 21: "Other Vehicle - Pedicab",
    22: "Emergency Vehicle", 23: "Bus", 24: "Personal Mobility Device", 25: "Motorized Scooter", 26: "Bicycle",
    27: "Train", 28: "Trolley", 29: "Tram / Subway", 30: "Pedestrian", 31: "Pedestrian with Object",
    32: "Animals - Bird", 33: "Animals - Other", 34: "Pylons", 35: "Road Barriers", 36: "Signs", 37: "Cones",
    38: "Construction Signs", 39: "Temporary Construction Barriers", 40: "Rolling Containers", 41: "Building",
    42: "Other Static Object",
}
_PANDASET_MAPPING: dict[int, int] = {
    0: 0, 1: 0, 2: 0, 3: 0, 4: 0, 5: 5, 6: 16, 7: 1, 8: 6, 9: 6, 10: 6, 11: 7, 12: 17, 13: 10, 14: 12, 15: 12,
    16: 12, 17: 15, 18: 11, 19: 15, 20: 15, 21: 15, 22: 0, 23: 13, 24: 0, 25: 0, 26: 14, 27: 15, 28: 15, 29: 15,
    30: 4, 31: 4, 32: 0, 33: 0, 34: 9, 35: 3, 36: 2, 37: 9, 38: 2, 39: 3, 40: 0, 41: 8, 42: 8,
}
PANDASET_SENSORS: dict[str, int] = {"panda64": 0, "pandagt": 1}  # the `d` column of the lidar DataFrames
PANDASET_VAL_MAX_LATITUDE = 37.6  # scenes whose first GPS latitude is at most this are val (27 of 76)

# ---- per dataset ---------------------------------------------------------------------------------------------
_PANDASET_CLASSES = ("road", "traffic sign", "barrier", "pedestrian", "vegetation", "road marking", "sidewalk",
                     "manmade", "traffic cone", "car", "motorcycle", "truck", "bus", "bicycle", "oth. vehicle",
                     "ground", "driveway")
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "nuscenes": tuple(_NUSCENES_COARSE),
    "semantic_kitti": ("car", "bicycle", "motorcycle", "truck", "other-vehicle", "person", "bicyclist",
                       "motorcyclist", "road", "parking", "sidewalk", "other-ground", "building", "fence",
                       "vegetation", "trunk", "terrain", "pole", "traffic-sign"),
    "panda64": _PANDASET_CLASSES,
    "pandagt": _PANDASET_CLASSES,
}
RAW_NAMES: dict[str, Mapping[int, str]] = {
    "nuscenes": dict(enumerate(NUSCENES_FINE_NAMES)),
    "semantic_kitti": KITTI_RAW_NAMES,
    "panda64": PANDASET_RAW_NAMES,
    "pandagt": PANDASET_RAW_NAMES,
}
# (mean, std) of the raw intensity, from ScaLR's `datasets/*_for_scalr.py`
INTENSITY: dict[str, tuple[float, float]] = {
    "nuscenes": (18.742355, 22.04632),
    "semantic_kitti": (0.28613698, 0.14090556),
    "panda64": (18.23640649, 25.86983417),
    "pandagt": (23.06113565, 16.76273235),
}


def _nuscenes_coarse() -> dict[int, int]:
    """nuScenes fine index -> challenge class 1..16 (the fine classes the challenge ignores are left out)."""
    fine_index = {name: index for index, name in enumerate(NUSCENES_FINE_NAMES)}
    return {fine_index[fine]: coarse for coarse, fines in enumerate(_NUSCENES_COARSE.values(), 1) for fine in fines}


_COARSE: dict[str, dict[int, int]] = {
    "nuscenes": _nuscenes_coarse(),
    "semantic_kitti": _KITTI_LEARNING_MAP,
    "panda64": _PANDASET_MAPPING,
    "pandagt": _PANDASET_MAPPING,
}


def check_dataset(dataset: str) -> str:
    """`dataset` if it is one of the four LiDAR datasets, else a `UserError` listing them."""
    if dataset not in DATASETS:
        raise UserError(f"unknown LiDAR dataset {dataset!r}; expected one of {list(DATASETS)}")
    return dataset


def num_classes(dataset: str) -> int:
    """How many training classes the dataset's segmentation head predicts (16 / 19 / 17 / 17)."""
    return len(CLASS_NAMES[check_dataset(dataset)])


def lookup_table(dataset: str) -> np.ndarray:
    """int64 array indexed by raw id (after KITTI's instance mask) giving the train id, 255 where ignored: the
    coarse class minus 1, as ScaLR's readers compute it."""
    coarse = _COARSE[check_dataset(dataset)]
    table = np.full(max(coarse) + 1, IGNORE_INDEX, dtype=np.int64)
    for raw, label in coarse.items():
        if label:
            table[raw] = label - 1
    return table


_LOOKUPS = {dataset: lookup_table(dataset) for dataset in DATASETS}


def train_labels(dataset: str, raw: np.ndarray) -> np.ndarray:
    """Train ids (int64, 255 = ignored) of raw label ids; KITTI's instance bits are masked off first and ids the
    table does not know (beyond it, or negative) are ignored."""
    table = _LOOKUPS[check_dataset(dataset)]
    ids = np.asarray(raw).astype(np.int64)
    if dataset == "semantic_kitti":
        ids = ids & KITTI_SEMANTIC_MASK
    known = (ids >= 0) & (ids < len(table))
    return np.where(known, table[np.where(known, ids, 0)], IGNORE_INDEX)
