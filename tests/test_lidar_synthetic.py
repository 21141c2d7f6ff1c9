"""The synthetic LiDAR benchmark's scenes and scans: shapes, determinism, class coverage, per-sensor differences
(field of view, intensity scale, beam spans, far-range sparsity), geometry (ground height, hits on primitive
surfaces) and speed."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest

from taskmerge.settings.lidar.synthetic import (SCENE_CLASSES, SENSORS, Primitives, Scene, cast, generate_scene,
                                                scans)

COUNT = 40


@pytest.fixture(scope="module")
def batches() -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    return {name: scans(name, COUNT, seed=0) for name in SENSORS}


def _elevation_deg(points: np.ndarray) -> np.ndarray:
    return np.degrees(np.arctan2(points[:, 2], np.hypot(points[:, 0], points[:, 1])))


def _primitives(labels: list[str], params: list[tuple[float, ...]], columns: int) -> Primitives:
    return Primitives(np.array(params, dtype=np.float64).reshape(-1, columns),
                      np.array([SCENE_CLASSES.index(name) for name in labels], dtype=np.int64),
                      np.full(len(labels), 0.5))


def _scene(boxes=(), cylinders=(), ellipsoids=()) -> Scene:
    """A hand-made scene: a 7 m road centred on the sensor, 2 m sidewalks, the given (label, params) primitives."""
    kinds = [_primitives([k for k, _ in rows], [p for _, p in rows], columns)
             for rows, columns in ((boxes, 7), (cylinders, 5), (ellipsoids, 6))]
    return Scene(30.0, 0.0, 3.5, 2.0, *kinds)


def _exact(sensor: str):
    return replace(SENSORS[sensor], range_noise=0.0, dropout=0.0)


def test_api() -> None:
    assert len(SCENE_CLASSES) == 10 and SCENE_CLASSES[0] == "road" and SCENE_CLASSES[-1] == "vegetation"
    assert set(SENSORS) == {"nuscenes", "semantic_kitti", "panda64", "pandagt"}
    assert [len(SENSORS[s].elevations_deg) for s in ("nuscenes", "semantic_kitti", "panda64")] == [32, 64, 64]
    assert all(SENSORS[name].name == name for name in SENSORS)


def test_scans_are_well_formed(batches) -> None:
    for name, batch in batches.items():
        assert len(batch) == COUNT
        for points, labels in batch:
            assert points.dtype == np.float32 and points.ndim == 2 and points.shape[1] == 4
            assert labels.dtype == np.int64 and labels.shape == (len(points),)
            assert 1500 <= len(points) <= 5000, (name, len(points))
            assert np.isfinite(points).all()
            assert labels.min() >= 0 and labels.max() < len(SCENE_CLASSES)
            assert (points[:, 3] >= 0).all()
            assert np.hypot(points[:, 0], points[:, 1]).max() <= SENSORS[name].max_range + 0.2


def test_every_class_appears(batches) -> None:
    for name, batch in batches.items():
        counts = np.bincount(np.concatenate([labels for _, labels in batch]), minlength=len(SCENE_CLASSES))
        share = counts / counts.sum()
        assert (share >= 0.002).all(), (name, dict(zip(SCENE_CLASSES, share.round(4))))


def test_deterministic_in_sensor_and_seed() -> None:
    first, again, other = scans("nuscenes", 3, seed=5), scans("nuscenes", 3, seed=5), scans("nuscenes", 3, seed=6)
    for (p, l), (q, m) in zip(first, again):
        np.testing.assert_array_equal(p, q)
        np.testing.assert_array_equal(l, m)
    assert all(not np.array_equal(p, q) for (p, _), (q, _) in zip(first, other))
    np.testing.assert_array_equal(scans("nuscenes", 1, seed=5)[0][0], first[0][0])  # a prefix of the longer run
    kitti = scans("semantic_kitti", 1, seed=5)[0][1]
    assert not np.array_equal(kitti, first[0][1])


def test_front_only_sensor(batches) -> None:
    for name, batch in batches.items():
        azimuth = np.degrees(np.arctan2(*np.concatenate([p[:, [1, 0]] for p, _ in batch]).T))
        if name == "pandagt":
            assert np.abs(azimuth).max() <= 60.0 + 1e-3
        else:
            assert np.abs(azimuth).max() > 170.0 and (azimuth < -120).mean() > 0.05


def test_intensity_scales(batches) -> None:
    kitti = np.concatenate([p[:, 3] for p, _ in batches["semantic_kitti"]])
    assert kitti.min() >= 0.0 and kitti.max() <= 1.0
    assert all(max(p[:, 3].max() for p, _ in batches[name]) > 20.0 for name in ("nuscenes", "panda64", "pandagt"))
    scalr_means = {"nuscenes": 18.742355, "semantic_kitti": 0.28613698, "panda64": 18.23640649, "pandagt": 23.06113565}
    for name, batch in batches.items():  # near the dataset's normalisation mean (spec lidar §1)
        mean = np.concatenate([p[:, 3] for p, _ in batch]).mean()
        assert abs(mean / scalr_means[name] - 1.0) < 0.15, (name, mean)


def test_beam_spans(batches) -> None:
    for name, batch in batches.items():
        beams = SENSORS[name].elevations_deg
        elevation = np.concatenate([_elevation_deg(p) for p, _ in batch])
        assert min(beams) - 1e-2 <= elevation.min() and elevation.max() <= max(beams) + 1e-2
    highest = {name: max(_elevation_deg(p).max() for p, _ in batch) for name, batch in batches.items()}
    assert highest["panda64"] > max(SENSORS["nuscenes"].elevations_deg) + 1.0  # Pandar64 reaches +15°
    assert highest["semantic_kitti"] <= 2.0 + 1e-2


def test_nuscenes_is_sparser_far_away(batches) -> None:
    def far_rings(name: str) -> float:
        """Mean number of beams per scan that reach the ground beyond 15 m."""
        beams = np.array(SENSORS[name].elevations_deg)
        rings = []
        for points, labels in batches[name]:
            far = points[(np.hypot(points[:, 0], points[:, 1]) > 15.0) & (labels <= SCENE_CLASSES.index("terrain"))]
            rings.append(len(np.unique(np.abs(_elevation_deg(far)[:, None] - beams).argmin(1))))
        return float(np.mean(rings))

    assert far_rings("nuscenes") < 0.6 * far_rings("semantic_kitti")


def test_ground_at_minus_mount_height(batches) -> None:
    for name, batch in batches.items():
        sensor = SENSORS[name]
        for points, labels in batch[:5]:
            z = points[labels <= SCENE_CLASSES.index("terrain"), 2]
            assert np.abs(z + sensor.mount_height).max() <= 5 * sensor.range_noise + 1e-4


def test_ground_classes_follow_the_bands() -> None:
    points, labels = cast(_scene(), _exact("semantic_kitti"), np.random.default_rng(0))
    offset = np.abs(points[:, 1])
    assert (labels[offset < 3.4] == 0).all() and (labels[(offset > 3.6) & (offset < 5.4)] == 1).all()
    assert (labels[offset > 5.6] == 2).all() and np.isin([0, 1, 2], labels).all()


def test_hits_lie_on_primitive_surfaces() -> None:
    box = (10.0, 2.0, 0.3, 2.2, 0.9, 0.2, 1.6)
    column, bush = (-4.0, 3.0, 0.5, 0.0, 1.0), (3.0, -8.0, 0.5, 1.5, 1.0, 0.8)
    scene = _scene(boxes=[("car", box)], cylinders=[("pedestrian", column)], ellipsoids=[("vegetation", bush)])
    points, labels = cast(scene, _exact("nuscenes"), np.random.default_rng(0))
    xyz = points[:, :3].astype(np.float64) + [0.0, 0.0, SENSORS["nuscenes"].mount_height]  # back to the ground frame
    car, person, plant = (xyz[labels == SCENE_CLASSES.index(k)] for k in ("car", "pedestrian", "vegetation"))
    assert min(len(car), len(person), len(plant)) >= 10

    x, y, yaw, half_length, half_width, z_low, z_high = box
    u = np.cos(yaw) * (car[:, 0] - x) + np.sin(yaw) * (car[:, 1] - y)
    v = np.cos(yaw) * (car[:, 1] - y) - np.sin(yaw) * (car[:, 0] - x)
    middle, half_height = (z_low + z_high) / 2, (z_high - z_low) / 2
    outside = np.stack([np.abs(u) - half_length, np.abs(v) - half_width, np.abs(car[:, 2] - middle) - half_height])
    np.testing.assert_allclose(outside.max(0), 0.0, atol=1e-3)

    radial = np.hypot(person[:, 0] - column[0], person[:, 1] - column[1])
    on_side = np.abs(radial - column[2]) < 1e-3
    on_top = (np.abs(person[:, 2] - column[4]) < 1e-3) & (radial <= column[2] + 1e-3)
    assert (on_side | on_top).all() and on_top.any()

    form = np.sum(((plant - bush[:3]) / bush[3:]) ** 2, 1)
    np.testing.assert_allclose(form, 1.0, atol=1e-3)
    assert (plant[:, 2] >= -1e-3).all()  # the buried half is hidden by the ground


def test_scenes_stay_inside_and_clear_of_the_sensor() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        scene = generate_scene(rng)
        x, y, yaw, half_length, half_width = scene.boxes.params[:, :5].T
        for a, b in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
            corners = [x + a * half_length * np.cos(yaw) - b * half_width * np.sin(yaw),
                       y + a * half_length * np.sin(yaw) + b * half_width * np.cos(yaw)]
            assert (np.abs(corners) <= scene.extent + 1e-9).all()
        reach = np.hypot(half_length, half_width)
        vehicles = scene.boxes.labels <= SCENE_CLASSES.index("truck")
        assert 2 <= (scene.boxes.labels == SCENE_CLASSES.index("car")).sum() <= 6
        assert (np.hypot(x, y)[vehicles] > reach[vehicles]).all()
        cx, cy, radius = scene.cylinders.params[:, :3].T
        assert (np.hypot(cx, cy) > radius).all() and (np.abs(scene.cylinders.params[:, :2]) <= scene.extent).all()
        ex, ey, _, rx, ry, _ = scene.ellipsoids.params.T
        assert (np.hypot(ex, ey) > np.maximum(rx, ry)).all()
        assert (np.abs(ex) + rx <= scene.extent + 1e-9).all() and (np.abs(ey) + ry <= scene.extent + 1e-9).all()


def test_scenes_need_room() -> None:
    with pytest.raises(ValueError, match="extent"):
        generate_scene(np.random.default_rng(0), extent=10.0)


def test_a_scan_takes_well_under_50_ms() -> None:
    rng = np.random.default_rng(0)
    scenes = [generate_scene(rng) for _ in range(5)]
    for sensor in SENSORS.values():
        start = time.process_time()
        for scene in scenes:
            cast(scene, sensor, rng)
        assert (time.process_time() - start) / len(scenes) < 0.05, sensor.name
