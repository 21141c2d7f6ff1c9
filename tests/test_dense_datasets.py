"""Generated dense-task trees in the real layouts, read back through the readers; layout checks; held-out splits."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import PIL.Image
import pytest
import torch

from taskmerge.errors import UserError
from taskmerge.settings.dense import datasets as ds
from taskmerge.settings.dense import demo_data

SIZE = 28


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """One tree with all four datasets."""
    path = tmp_path_factory.mktemp("dense")
    demo_data.write_ade20k_tree(path, n_train=4, n_val=3, seed=0)
    demo_data.write_nyu_tree(path, n_train=2, n_test=2, seed=0)
    demo_data.write_bedlam_tree(path, n_train=5, n_val=2, seed=0)
    demo_data.write_mapfree_tree(path, n_queries=3, seed=0)
    return path


def test_ade20k_reads_back_with_reduce_zero_label(root):
    train, val = ds.ADE20k(root, "train", SIZE), ds.ADE20k(root, "val", SIZE)
    assert (len(train), len(val)) == (4, 3)
    assert train.images[0].name == "ADE_train_00000001.jpg" and val.images[-1].name == "ADE_val_00000003.jpg"
    raw = np.asarray(PIL.Image.open(train.labels[1]))
    image, labels = train[1]
    assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
    side = min(raw.shape)
    top, left = (raw.shape[0] - side) // 2, (raw.shape[1] - side) // 2
    crop = torch.from_numpy(raw[top : top + side, left : left + side].astype(np.int64))
    assert labels.shape == (side, side) and labels.dtype == torch.int64
    assert torch.equal(labels == ds.IGNORE_INDEX, crop == 0) and (crop == 0).any()
    assert torch.equal(labels[crop > 0], crop[crop > 0] - 1)
    assert set(labels.unique().tolist()) <= {label - 1 for label in demo_data.ADE_DEMO_LABELS} | {255}
    _, on_grid = ds.ADE20k(root, "train", SIZE, target="input")[1]
    assert on_grid.shape == (SIZE, SIZE) and set(on_grid.unique().tolist()) <= set(labels.unique().tolist())


def test_nyu_reads_back_metres_and_eval_box(root):
    lines = (root / "nyu" / "nyu_test.txt").read_text().splitlines()
    assert lines[0].split() == ["/bathroom/rgb_00002.jpg", "/bathroom/sync_depth_00002.png", "518.8579"]
    full = ds.NYUDepth(root, "test", SIZE, crop=False)
    assert len(full) == 2 and len(ds.NYUDepth(root, "train", SIZE)) == 2
    image, depth = full[0]
    raw = np.asarray(PIL.Image.open(root / "nyu" / "bathroom" / "sync_depth_00002.png"))
    assert raw.dtype == np.uint16 and raw.shape == (480, 640)
    assert image.shape == (3, SIZE, int(SIZE * 640 / 480))
    assert depth.dtype == torch.float32 and torch.equal(depth, torch.from_numpy(raw.astype(np.float32) / 1000))
    assert depth[:10].eq(0).all() and 1.0 < depth[240, 320] < 10.0 and depth.max() < 10.0
    assert full.eval_box() == ds.EIGEN_CROP
    cropped = ds.NYUDepth(root, "test", SIZE)
    assert cropped[0][1].shape == (480, 480) and torch.equal(cropped[0][1], depth[:, 80:560])
    assert cropped.eval_box() == (45, 471, 0, 480)
    assert ds.NYUDepth(root, "test", SIZE, target="input")[0][1].shape == (SIZE, SIZE)


def test_image_only_readers(root):
    assert (len(ds.bedlam_images(root, "train", SIZE)), len(ds.bedlam_images(root, "val", SIZE))) == (5, 2)
    image, index = ds.bedlam_images(root, "train", SIZE)[4]
    assert image.shape == (3, SIZE, SIZE) and index == 4
    assert (root / "BEDLAM" / "all_npz_12_training" / f"{demo_data.BEDLAM_SEQUENCE}.npz").is_file()
    mapfree = ds.mapfree_images(root, "train", SIZE)
    assert len(mapfree) == 4 and mapfree.paths[0].parts[-3:] == ("s00000", "seq0", "frame_00000.jpg")
    scene = root / "mapfree" / "val" / "s00460"
    assert len((scene / "intrinsics.txt").read_text().split("\n")[0].split()) == 7
    assert len((scene / "poses.txt").read_text().split("\n")[0].split()) == 8


def test_check_layout_lists_every_missing_path_once(tmp_path, root):
    ds.check_layout(ds.dataset_names(), root)
    with pytest.raises(UserError) as error:
        ds.check_layout(ds.dataset_names(), tmp_path)
    message = str(error.value)
    for required in ("ADEChallengeData2016/images/training", "ADEChallengeData2016/annotations/validation",
                     "nyu/nyu_train.txt", "nyu/nyu_test.txt", "BEDLAM/validation", "mapfree/val"):
        assert str(tmp_path / required) in message
    assert all(ds.LAYOUTS[name] in message for name in ds.dataset_names())
    partial = tmp_path / "partial"
    shutil.copytree(root / "nyu", partial / "nyu")
    (partial / "nyu" / "nyu_test.txt").unlink()
    with pytest.raises(UserError, match="nyu_test.txt") as error:
        ds.check_layout(["nyu"], partial)
    assert "nyu_train.txt" not in str(error.value)
    with pytest.raises(UserError, match="unknown dense dataset"):
        ds.check_layout(["kitti"], root)


def test_missing_file_named_at_read_time(tmp_path):
    demo_data.write_nyu_tree(tmp_path, n_train=1, n_test=1, seed=1)
    (tmp_path / "nyu" / "bathroom" / "sync_depth_00001.png").unlink()
    with pytest.raises(UserError, match="sync_depth_00001.png"):
        ds.NYUDepth(tmp_path, "test", SIZE)[0]


def test_holdout_indices_are_seeded_disjoint_and_complete():
    kept, held = ds.holdout_indices(20, 0.25, seed=3)
    assert len(held) == 5 and sorted(kept + held) == list(range(20)) and held == sorted(held)
    assert ds.holdout_indices(20, 0.25, seed=3) == (kept, held) and ds.holdout_indices(20, 0.25, seed=4)[1] != held
    with pytest.raises(UserError):
        ds.holdout_indices(3, 0.1, seed=0)


def test_collate_keeps_original_sizes_apart(root):
    ade = ds.ADE20k(root, "val", SIZE)
    images, targets = ds.collate_dense([ade[0], ade[1]])
    assert images.shape == (2, 3, SIZE, SIZE) and isinstance(targets, list) and len(targets) == 2
    images, depths = ds.collate_dense([ds.NYUDepth(root, "train", SIZE)[i] for i in range(2)])
    assert depths.shape == (2, 480, 480)


def test_demo_trees_are_deterministic(tmp_path):
    def digest(path):
        return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file())).hexdigest()

    first = digest(demo_data.write_ade20k_tree(tmp_path / "a", 2, 1, seed=5))
    assert digest(demo_data.write_ade20k_tree(tmp_path / "b", 2, 1, seed=5)) == first
    assert digest(demo_data.write_ade20k_tree(tmp_path / "c", 2, 1, seed=6)) != first


def test_bad_options_are_user_errors(root):
    with pytest.raises(UserError, match="split"):
        ds.ADE20k(root, "test", SIZE)
    with pytest.raises(UserError, match="target"):
        ds.NYUDepth(root, "test", SIZE, target="full")


def test_preprocess_is_dunes_test_transform():
    from torchvision.transforms import v2 as T

    dune = T.Compose([T.ToImage(), T.Resize(SIZE, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                      T.CenterCrop(SIZE), T.ToDtype(torch.float32, scale=True),
                      T.Normalize(mean=list(ds.IMAGENET_MEAN), std=list(ds.IMAGENET_STD))])
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8))
    out = ds.preprocess(image, SIZE)
    assert type(out) is torch.Tensor and torch.equal(out, dune(image).as_subclass(torch.Tensor))
    assert ds.preprocess(image, SIZE, crop=False).shape == (3, SIZE, 43)  # torchvision truncates 43.6


def test_reduce_zero_label_as_mmseg():
    raw = np.array([[0, 1, 2], [150, 255, 7]], dtype=np.uint8)
    assert ds._reduce_zero_label(raw).tolist() == [[255, 0, 1], [149, 255, 6]]


def test_nyu_split_lines_without_depth_are_skipped_and_bad_lines_named(tmp_path):
    base = demo_data.write_nyu_tree(tmp_path, n_train=2, n_test=1, seed=2)
    split = base / "nyu_train.txt"
    split.write_text(split.read_text() + "/kitchen_0028b/rgb_00099.jpg None 518.8579\n")
    assert len(ds.NYUDepth(tmp_path, "train", SIZE)) == 2
    split.write_text("/kitchen_0028b/rgb_00099.jpg\n")
    with pytest.raises(UserError, match="nyu_train.txt"):
        ds.NYUDepth(tmp_path, "train", SIZE)


def test_bedlam_closeups_are_turned_upright(tmp_path):
    folder = tmp_path / "BEDLAM" / "training" / "20221011_1_250_batch01hand_closeup_suburb_a" / "png" / "seq_000000"
    folder.mkdir(parents=True)
    (tmp_path / "BEDLAM" / "validation").mkdir()
    pixels = np.zeros((40, 20, 3), dtype=np.uint8)
    pixels[:, :10] = 255  # left half white: upright, the top half is white
    PIL.Image.fromarray(pixels).save(folder / "seq_000000_0000.png")
    image, _ = ds.bedlam_images(tmp_path, "train", SIZE)[0]
    assert image.shape == (3, SIZE, SIZE) and image[:, : SIZE // 2 - 2].mean() > image[:, SIZE // 2 + 2 :].mean()
