"""Seeded synthetic street scenes ray-cast by four simulated LiDAR sensors (spec lidar §6 "Toy benchmark"), numpy only.

A scene is a ground plane split into road / sidewalk / terrain bands plus primitives: oriented boxes (car, truck,
building), vertical cylinders (pole, trunk, pedestrian) and axis-aligned ellipsoids (vegetation: tree crowns, bushes).
`cast` shoots one sensor's rays from its mount point and keeps the nearest hit of each ray, so all sensors see the same
world distribution through their own beams, field of view, range, mount height, noise and intensity scale: a model
fine-tuned on one sensor is specialised to it.

Frames. A `Scene` lives in a ground frame (ground at z = 0, the sensor above the origin). `cast` returns points in the
sensor frame: origin at the sensor, x forward (along the road), y left, z up, so the ground lies at z = -mount_height.
That is how each dataset stores its points up to axes: SemanticKITTI's velodyne frame is exactly this one; nuScenes'
LIDAR_TOP frame has x right, y forward (store (-y, x, z)); PandaSet stores world coordinates (apply the frame's pose,
e.g. the identity). Writers convert.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

SCENE_CLASSES: tuple[str, ...] = ("road", "sidewalk", "terrain", "car", "truck", "building", "pole", "trunk",
                                  "pedestrian", "vegetation")
_CLASS = {name: index for index, name in enumerate(SCENE_CLASSES)}
# Mean reflectivity per class (KITTI-like remission in [0, 1]); each object draws its own around it.
_REFLECTIVITY = np.array([0.24, 0.32, 0.41, 0.48, 0.53, 0.37, 0.59, 0.32, 0.30, 0.45])
_EPS = 1e-6  # the smallest accepted ray parameter (m)
_CLEARANCE = 2.0  # free space (m) around the sensor between it and any primitive's footprint


@dataclass(frozen=True)
class Sensor:
    """One simulated LiDAR: beam pattern, field of view, range, mount height, intensity scale and imperfections."""

    name: str
    elevations_deg: tuple[float, ...]  # one per beam
    azimuths: int  # rays per beam over the horizontal field of view
    azimuth_range_deg: tuple[float, float]  # (-180, 180) for 360°; azimuth 0 is forward (+x), positive to the left
    max_range: float  # returns beyond it are lost (m)
    mount_height: float  # sensor above the ground (m): points come back in the sensor frame, ground at -mount_height
    intensity_scale: float  # intensity = clipped reflectivity in [0, 1] times this
    range_noise: float  # std of the range noise (m)
    dropout: float  # probability that a return is lost


def _beams(top: float, bottom: float, count: int) -> tuple[float, ...]:
    """`count` evenly spaced beam elevations (degrees) from `top` down to `bottom`."""
    return tuple(round(float(e), 4) for e in np.linspace(top, bottom, count))


# Real beam layouts, but 10-40x fewer azimuths than the real sensors so that a scan has ~2-4 k points (the benchmark
# runs on 2 CPU cores), and ranges scaled to the ±30 m world. Intensity scales put each dataset's mean intensity near
# its ScaLR normalisation mean (spec lidar §1: nuScenes 18.7, KITTI 0.29, Pandar64 18.2, PandarGT 23.1).
SENSORS: dict[str, Sensor] = {
    "nuscenes": Sensor("nuscenes", _beams(10.67, -30.67, 32), 140, (-180.0, 180.0), 35.0, 1.84, 67.0, 0.03, 0.10),
    "semantic_kitti": Sensor("semantic_kitti", _beams(2.0, -24.8, 64), 56, (-180.0, 180.0), 40.0, 1.73, 1.0, 0.02,
                             0.05),
    "panda64": Sensor("panda64", _beams(15.0, 3.0, 6) + _beams(2.0, -6.0, 42) + _beams(-7.0, -25.0, 16), 72,
                      (-180.0, 180.0), 45.0, 1.9, 58.0, 0.03, 0.08),
    "pandagt": Sensor("pandagt", _beams(6.0, -14.0, 100), 40, (-60.0, 60.0), 50.0, 1.7, 71.0, 0.01, 0.03),
}


@dataclass(frozen=True)
class Primitives:
    """Primitives of one kind: a parameter row, a class index and a reflectivity each."""

    params: np.ndarray  # [P, k] float64, columns per kind (see `Scene`)
    labels: np.ndarray  # [P] int64 indices into SCENE_CLASSES
    reflectivity: np.ndarray  # [P] in [0, 1]


@dataclass(frozen=True)
class Scene:
    """One street scene in the ground frame: ground bands (road along x, a sidewalk on each side, terrain beyond)
    within ±extent, boxes, vertical cylinders and ellipsoids."""

    extent: float  # ground and primitives lie within |x|, |y| <= extent
    road_y: float  # the road's centre line (y)
    road_half_width: float
    sidewalk_width: float
    boxes: Primitives  # x, y, yaw, half length (along yaw), half width, z low, z high
    cylinders: Primitives  # x, y, radius, z low, z high
    ellipsoids: Primitives  # x, y, z, radius x, radius y, radius z


Row = tuple[str, tuple[float, ...]]  # a primitive under construction: class name, parameters


def _place(rng: np.random.Generator, taken: list[tuple[float, float, float]], extent: float, radius: float,
           x_range: tuple[float, float], y_range: tuple[float, float]) -> tuple[float, float] | None:
    """A footprint centre in the ranges whose circle stays inside the extent, clear of the sensor and of the
    footprints already taken (recorded), or None after 30 tries: scenes without overlapping objects."""
    x_low, x_high = max(min(x_range), radius - extent), min(max(x_range), extent - radius)
    y_low, y_high = max(min(y_range), radius - extent), min(max(y_range), extent - radius)
    for _ in range(30):
        x, y = rng.uniform(x_low, x_high), rng.uniform(y_low, y_high)
        if np.hypot(x, y) > radius + _CLEARANCE and all(np.hypot(x - a, y - b) > radius + r for a, b, r in taken):
            taken.append((x, y, radius))
            return x, y
    return None


def _vehicles(rng: np.random.Generator, taken: list, extent: float, road_y: float, half: float) -> list[Row]:
    """2-6 cars and 0-2 trucks on the road, along it either way."""
    rows = []
    kinds = (("car", rng.integers(2, 7), (3.8, 4.8), (1.7, 2.0), (1.4, 1.7)),
             ("truck", rng.integers(0, 3), (6.5, 10.0), (2.3, 2.6), (2.8, 3.8)))
    for name, count, length, width, height in kinds:
        for _ in range(count):
            half_length, half_width = rng.uniform(*length) / 2, rng.uniform(*width) / 2
            margin = half - half_width - 0.3
            spot = _place(rng, taken, extent, np.hypot(half_length, half_width), (-extent, extent),
                          (road_y - margin, road_y + margin))
            yaw = rng.choice([0.0, np.pi]) + rng.normal(0.0, 0.08)
            if spot:
                rows.append((name, (*spot, yaw, half_length, half_width, 0.2, rng.uniform(*height))))
    return rows


def _buildings(rng: np.random.Generator, extent: float, fronts: dict[int, float]) -> list[Row]:
    """A row of buildings with gaps along each built-up side, from its front line to the extent."""
    rows = []
    for side, front in fronts.items():
        x = -extent + rng.uniform(0.0, 4.0)
        while x < extent - 3.0:
            length = min(rng.uniform(6.0, 15.0), extent - x)
            depth = min(rng.uniform(5.0, 10.0), extent - abs(front))
            rows.append(("building", (x + length / 2, front + side * depth / 2, 0.0, length / 2, depth / 2, 0.0,
                                      rng.uniform(4.0, 12.0))))
            x += length + rng.uniform(1.0, 5.0)
    return rows


def _sidewalk_things(rng: np.random.Generator, taken: list, extent: float, curbs: dict[int, float],
                     walk: float) -> list[Row]:
    """1-4 poles at the curbs and 0-4 pedestrians on the sidewalks."""
    rows = []
    for _ in range(rng.integers(1, 5)):
        side, radius = rng.choice([-1, 1]), rng.uniform(0.08, 0.18)
        y = curbs[side] + side * rng.uniform(0.3, 0.7)
        spot = _place(rng, taken, extent, radius, (-extent, extent), (y, y))
        if spot:
            rows.append(("pole", (*spot, radius, 0.0, rng.uniform(4.0, 9.0))))
    for _ in range(rng.integers(0, 5)):
        side, radius = rng.choice([-1, 1]), rng.uniform(0.22, 0.32)
        spot = _place(rng, taken, extent, radius, (-extent, extent),
                      (curbs[side] + side * 0.4, curbs[side] + side * (walk - 0.4)))
        if spot:
            rows.append(("pedestrian", (*spot, radius, 0.0, rng.uniform(1.5, 1.9))))
    return rows


def _vegetation(rng: np.random.Generator, taken: list, extent: float, curbs: dict[int, float], walk: float,
                fronts: dict[int, float]) -> tuple[list[Row], list[Row]]:
    """2-6 trees (a trunk cylinder under a crown ellipsoid) behind the curbs and 1-5 bushes on the terrain:
    (cylinder rows, ellipsoid rows)."""
    trunks, crowns = [], []
    for _ in range(rng.integers(2, 7)):
        side, crown, height = rng.choice([-1, 1]), rng.uniform(1.2, 2.8, 2), rng.uniform(1.2, 2.5)
        near = curbs[side] + side * 0.6 * walk
        spot = _place(rng, taken, extent, crown.max(), (-extent, extent),
                      (near, fronts.get(side, near + side * 8.0) - side * 0.5))
        if spot:
            trunk = rng.uniform(1.8, 3.2)
            trunks.append(("trunk", (*spot, rng.uniform(0.12, 0.3), 0.0, trunk)))
            crowns.append(("vegetation", (*spot, trunk + 0.6 * height, *crown, height)))
    for _ in range(rng.integers(1, 6)):
        side, radii, height = rng.choice([-1, 1]), rng.uniform(0.5, 1.4, 2), rng.uniform(0.4, 0.9)
        near = curbs[side] + side * (walk + radii.max())
        spot = _place(rng, taken, extent, radii.max(), (-extent, extent), (near, fronts.get(side, side * extent)))
        if spot:
            crowns.append(("vegetation", (*spot, 0.5 * height, *radii, height)))
    return trunks, crowns


def _primitives(rng: np.random.Generator, rows: list[Row], columns: int) -> Primitives:
    """Stack rows of one kind, each primitive drawing its reflectivity around its class mean."""
    labels = np.array([_CLASS[name] for name, _ in rows], dtype=np.int64)
    reflectivity = np.clip(_REFLECTIVITY[labels] * rng.uniform(0.75, 1.25, len(rows)), 0.0, 1.0)
    return Primitives(np.array([p for _, p in rows], dtype=np.float64).reshape(-1, columns), labels, reflectivity)


def generate_scene(rng: np.random.Generator, extent: float = 30.0) -> Scene:
    """A random street scene: the sensor on a road along x, sidewalks, terrain, vehicles, buildings on 0-2 sides,
    poles, pedestrians, trees and bushes, all within ±extent and clear of the sensor."""
    if extent < 20.0:
        raise ValueError(f"extent {extent} < 20 m: the street, sidewalks, setbacks and buildings need the room")
    road_y, half, walk = rng.uniform(-1.5, 1.5), rng.uniform(3.5, 6.0), rng.uniform(1.5, 3.0)
    curbs = {side: road_y + side * half for side in (-1, 1)}
    fronts = {side: curbs[side] + side * (walk + rng.uniform(2.0, 8.0)) for side in (-1, 1) if rng.random() < 0.8}
    taken: list[tuple[float, float, float]] = []
    boxes = _vehicles(rng, taken, extent, road_y, half) + _buildings(rng, extent, fronts)
    cylinders = _sidewalk_things(rng, taken, extent, curbs, walk)
    trunks, ellipsoids = _vegetation(rng, taken, extent, curbs, walk, fronts)
    return Scene(extent, road_y, half, walk, _primitives(rng, boxes, 7), _primitives(rng, cylinders + trunks, 5),
                 _primitives(rng, ellipsoids, 6))


def _directions(sensor: Sensor, rng: np.random.Generator) -> np.ndarray:
    """Unit ray directions [beams * azimuths, 3]; the azimuth grid turns by a random fraction of a step per scan,
    so thin objects are not always missed the same way."""
    low, high = np.radians(sensor.azimuth_range_deg)
    azimuth = low + (np.arange(sensor.azimuths) + rng.random()) * (high - low) / sensor.azimuths
    elevation = np.radians(np.array(sensor.elevations_deg))[:, None]
    horizontal = np.cos(elevation)
    return np.stack(np.broadcast_arrays(horizontal * np.cos(azimuth), horizontal * np.sin(azimuth), np.sin(elevation)),
                    -1).reshape(-1, 3)


def _ground_hits(origin: np.ndarray, d: np.ndarray, extent: float) -> np.ndarray:
    """[R] ray parameter of the ground plane z = 0 within ±extent (inf where missed)."""
    t = -origin[2] / np.minimum(d[:, 2], -1e-9)  # rays that do not go down reach it absurdly far
    inside = np.all(np.abs(origin[:2] + t[:, None] * d[:, :2]) <= extent, 1)
    return np.where(inside, t, np.inf)


def _slab(o: np.ndarray, d: np.ndarray, low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Entry and exit ray parameters of the slab low <= o + t d <= high."""
    inverse = 1.0 / np.where(np.abs(d) < 1e-12, 1e-12, d)
    t1, t2 = (low - o) * inverse, (high - o) * inverse
    return np.minimum(t1, t2), np.maximum(t1, t2)


def _box_hits(origin: np.ndarray, d: np.ndarray, params: np.ndarray) -> np.ndarray:
    """[R, B] nearest ray parameters of boxes turned about z (slab method in each box's frame; inf where missed)."""
    x, y, yaw, half_length, half_width, z_low, z_high = params.T
    cos, sin = np.cos(yaw), np.sin(yaw)
    ox, oy = origin[0] - x, origin[1] - y
    dx, dy = d[:, 0:1], d[:, 1:2]
    near_x, far_x = _slab(cos * ox + sin * oy, cos * dx + sin * dy, -half_length, half_length)
    near_y, far_y = _slab(cos * oy - sin * ox, cos * dy - sin * dx, -half_width, half_width)
    near_z, far_z = _slab(origin[2], d[:, 2:3], z_low, z_high)
    near = np.maximum(np.maximum(near_x, near_y), near_z)
    far = np.minimum(np.minimum(far_x, far_y), far_z)
    return np.where((near <= far) & (near > _EPS), near, np.inf)


def _cylinder_hits(origin: np.ndarray, d: np.ndarray, params: np.ndarray) -> np.ndarray:
    """[R, C] nearest ray parameters of vertical cylinders: the side between the z-limits (quadratic in xy) or the
    top cap (pedestrians are seen from above); inf where missed."""
    x, y, radius, z_low, z_high = params.T
    ox, oy = origin[0] - x, origin[1] - y
    dx, dy, dz = d[:, 0:1], d[:, 1:2], d[:, 2:3]
    a = np.maximum(dx**2 + dy**2, 1e-12)
    b = dx * ox + dy * oy  # half the linear coefficient
    disc = b**2 - a * (ox**2 + oy**2 - radius**2)
    side = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
    z = origin[2] + side * dz
    side = np.where((disc >= 0) & (side > _EPS) & (z >= z_low) & (z <= z_high), side, np.inf)
    top = (z_high - origin[2]) / np.minimum(dz, -1e-9)
    on_cap = (ox + top * dx) ** 2 + (oy + top * dy) ** 2 <= radius**2
    return np.minimum(side, np.where(on_cap & (top > _EPS), top, np.inf))


def _ellipsoid_hits(origin: np.ndarray, d: np.ndarray, params: np.ndarray) -> np.ndarray:
    """[R, E] nearest ray parameters of axis-aligned ellipsoids (quadratic in the unit-sphere frame; inf where
    missed)."""
    o = (origin - params[:, :3]) / params[:, 3:]  # [E, 3]
    scaled = d[:, None, :] / params[:, 3:]  # [R, E, 3]
    a = np.sum(scaled**2, -1)
    b = np.sum(scaled * o, -1)
    disc = b**2 - a * (np.sum(o**2, -1) - 1.0)
    t = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
    return np.where((disc >= 0) & (t > _EPS), t, np.inf)


def _ground_labels(scene: Scene, y: np.ndarray) -> np.ndarray:
    """Ground class of hit points by their y: road, sidewalk, then terrain away from the road's centre line."""
    offset = np.abs(y - scene.road_y)
    return np.where(offset <= scene.road_half_width, _CLASS["road"],
                    np.where(offset <= scene.road_half_width + scene.sidewalk_width, _CLASS["sidewalk"],
                             _CLASS["terrain"]))


def cast(scene: Scene, sensor: Sensor, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One scan of the scene by the sensor at the origin of x/y: (points float32 [N, 4] = x, y, z in the sensor
    frame and intensity in the sensor's scale, labels int64 [N] indexing SCENE_CLASSES); only kept returns."""
    d = _directions(sensor, rng)
    origin = np.array([0.0, 0.0, sensor.mount_height])
    hits = np.concatenate([_ground_hits(origin, d, scene.extent)[:, None],
                           _box_hits(origin, d, scene.boxes.params),
                           _cylinder_hits(origin, d, scene.cylinders.params),
                           _ellipsoid_hits(origin, d, scene.ellipsoids.params)], 1)
    first = np.argmin(hits, 1)
    t = hits[np.arange(len(d)), first]
    kinds = (scene.boxes, scene.cylinders, scene.ellipsoids)
    labels = np.concatenate([[-1]] + [k.labels for k in kinds])[first]
    reflectivity = np.concatenate([[0.0]] + [k.reflectivity for k in kinds])[first]
    noise, lost, speckle = rng.normal(size=len(d)), rng.random(len(d)), rng.normal(size=len(d))
    keep = (t <= sensor.max_range) & (lost >= sensor.dropout)
    d, t, labels, reflectivity = d[keep], t[keep], labels[keep], reflectivity[keep]
    ground = labels < 0
    labels[ground] = _ground_labels(scene, t[ground] * d[ground, 1])
    reflectivity[ground] = _REFLECTIVITY[labels[ground]]
    falloff = 1.0 - 0.5 * t / sensor.max_range
    intensity = np.clip(reflectivity * falloff + 0.03 * speckle[keep], 0.0, 1.0) * sensor.intensity_scale
    xyz = (t + sensor.range_noise * noise[keep])[:, None] * d  # origin at the sensor: range times direction
    return np.column_stack([xyz, intensity]).astype(np.float32), labels.astype(np.int64)


def scans(sensor: str, count: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """`count` scans of fresh scenes by one sensor, deterministic in (sensor, seed); sensors draw different scenes
    from the same distribution."""
    rng = np.random.default_rng([seed, zlib.crc32(sensor.encode())])
    return [cast(generate_scene(rng), SENSORS[sensor], rng) for _ in range(count)]
