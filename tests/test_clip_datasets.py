"""The CLIP benchmark's dataset readers, on tiny trees written in the real on-disk layouts."""

from __future__ import annotations

import importlib.util
import pickle

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from torch.utils.data import random_split

from clip_data import seeded_rng, write_cars, write_folder_split, write_idx, write_image, write_mnist_like
from taskmerge.settings.clip import datasets as cd
from taskmerge.settings.clip.templates import TEMPLATES

TINY = T.Compose([T.Resize((16, 16)), T.ToTensor()])


def _check_item(item: tuple, num_classes: int) -> None:
    image, label = item
    assert isinstance(image, torch.Tensor) and image.shape == (3, 16, 16)
    assert type(label) is int and 0 <= label < num_classes


# ---- split rule ---------------------------------------------------------------------------------------------------


def test_train_val_indices_are_random_split_with_seed_0():
    train, val = cd.train_val_indices(60000)
    assert (len(train), len(val)) == (55000, 5000)  # 10 % capped at 5000
    assert train[0] == 36044  # the release asserts this on MNISTVal's train part
    ref_train, ref_val = random_split(range(60000), [55000, 5000], generator=torch.Generator().manual_seed(0))
    assert train == list(ref_train.indices) and val == list(ref_val.indices)
    assert sorted(train + val) == list(range(60000))
    assert [len(part) for part in cd.train_val_indices(1000)] == [900, 100]


def test_train_val_indices_refuse_an_empty_part():
    with pytest.raises(ValueError, match="9 train images"):
        cd.train_val_indices(9)


# ---- ImageFolder datasets -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "folder", "classes", "expected_names"),
    [
        ("DTD", "dtd", ["banded", "polka_dotted"], ["banded", "polka dotted"]),
        ("SUN397", "sun397", ["a_abbey", "b_bus_interior"], ["abbey", "bus interior"]),
    ],
)
def test_image_folder_datasets_test_on_val_folder_and_hold_out_train(tmp_path, name, folder, classes, expected_names):
    write_folder_split(tmp_path / folder / "train", classes, per_class=6)
    write_folder_split(tmp_path / folder / "val", classes, per_class=2)
    sizes = {split: len(cd.load_split(name, split, tmp_path, TINY)) for split in cd.SPLITS}
    assert sizes == {"train": 11, "val": 1, "test": 4}  # val = int(12 * 0.1); test = the val/ folder
    test = cd.load_split(name, "test", tmp_path, TINY)
    for i in range(len(test)):
        _check_item(test[i], len(classes))
    assert sorted(test[i][1] for i in range(len(test))) == [0, 0, 1, 1]
    assert cd.classnames(name, tmp_path) == expected_names


def test_eurosat_val_and_test_are_their_own_folders(tmp_path):
    classes = ["AnnualCrop", "SeaLake"]
    for split, per_class in (("train", 3), ("val", 2), ("test", 1)):
        write_folder_split(tmp_path / "EuroSAT_splits" / split, classes, per_class)
    sizes = {split: len(cd.load_split("EuroSAT", split, tmp_path, TINY)) for split in cd.SPLITS}
    assert sizes == {"train": 6, "val": 4, "test": 2}
    _check_item(cd.load_split("EuroSAT", "val", tmp_path, TINY)[3], 2)
    assert cd.classnames("EuroSAT", tmp_path) == ["annual crop land", "lake or sea"]


def test_resisc45_keeps_the_listed_files_of_each_split(tmp_path):
    base = tmp_path / "resisc45"
    write_folder_split(base / "NWPU-RESISC45", ["airplane", "airport"], per_class=8)
    listed = {c: sorted(p.name for p in (base / "NWPU-RESISC45" / c).iterdir()) for c in ("airplane", "airport")}
    airplane, airport = listed["airplane"], listed["airport"]
    (base / "resisc45-train.txt").write_text("\n".join(airplane[:6] + airport[:6]) + "\n")
    (base / "resisc45-test.txt").write_text("\n".join([airplane[6], airport[6], airport[7]]) + "\n")
    sizes = {split: len(cd.load_split("RESISC45", split, tmp_path, TINY)) for split in cd.SPLITS}
    assert sizes == {"train": 11, "val": 1, "test": 3}
    test = cd.load_split("RESISC45", "test", tmp_path, TINY)
    assert [test[i][1] for i in range(3)] == [0, 1, 1]
    names = cd.classnames("RESISC45", tmp_path)
    assert len(names) == 45 and names[:3] == ["airplane", "airport", "baseball diamond"]


# ---- torchvision layouts ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "raw"),
    [("MNIST", "MNIST/raw"), ("FashionMNIST", "FashionMNIST/FashionMNIST/raw"), ("KMNIST", "KMNIST/KMNIST/raw")],
)
def test_mnist_family_reads_idx_files_as_rgb(tmp_path, name, raw):
    train_labels = write_mnist_like(tmp_path / raw, ("train", "t10k"))
    sizes = {split: len(cd.load_split(name, split, tmp_path, TINY)) for split in cd.SPLITS}
    assert sizes == {"train": 18, "val": 2, "test": 5}
    val = cd.load_split(name, "val", tmp_path, TINY)
    _check_item(val[0], 10)
    image, label = val[1]
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])  # grayscale copied to RGB
    assert label == int(train_labels[cd.train_val_indices(20)[1][1]])
    assert len(cd.classnames(name, tmp_path)) == 10
    assert cd.classnames("MNIST", tmp_path) == [str(d) for d in range(10)]


def test_emnist_digits_are_turned_upright_after_the_transform(tmp_path):
    upright = np.zeros((28, 28), dtype=np.uint8)
    upright[2:20, 4] = 255  # a vertical bar at the left ...
    upright[2, 4:16] = 200  # ... with a top bar to its right: no symmetry maps this onto itself
    stored = np.stack([upright.T] * 12)  # EMNIST stores glyphs transposed
    raw = tmp_path / "EMNIST" / "raw"
    for prefix, n in (("emnist-digits-train", 12), ("emnist-digits-test", 3)):
        write_idx(raw, prefix, stored[:n], np.arange(n, dtype=np.uint8) % 10)
    image, label = cd.load_split("EMNIST", "test", tmp_path, T.ToTensor())[2]
    expected = torch.from_numpy(upright / 255.0).float().expand(3, 28, 28)
    assert label == 2 and torch.equal(image, expected)
    ramp = torch.linspace(0.0, 1.0, 28)  # added along the width by the transform ...
    marked, _ = cd.load_split("EMNIST", "test", tmp_path, lambda img: T.functional.to_tensor(img) + ramp)[2]
    assert torch.allclose(marked, expected + ramp[:, None])  # ... runs along the height: the turn comes after it
    assert len(cd.load_split("EMNIST", "val", tmp_path, TINY)) == 1
    assert cd.classnames("EMNIST", tmp_path) == [str(d) for d in range(10)]


def test_cars_reads_the_devkit(tmp_path):
    write_cars(tmp_path, ["AM General Hummer SUV 2000", "Acura_RL Sedan 2012"], [1, 2] * 5, [2, 1, 2])
    sizes = {split: len(cd.load_split("Cars", split, tmp_path, TINY)) for split in cd.SPLITS}
    assert sizes == {"train": 9, "val": 1, "test": 3}
    test = cd.load_split("Cars", "test", tmp_path, TINY)
    assert [test[i][1] for i in range(3)] == [1, 0, 1]
    _check_item(test[0], 2)
    assert cd.classnames("Cars", tmp_path) == ["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]


def test_gtsrb_reads_training_folders_and_the_test_csv(tmp_path):
    base = tmp_path / "gtsrb"
    for c in ("00000", "00001"):
        for i in range(5):
            write_image(base / "GTSRB" / "Training" / c / f"00000_{i:05d}.ppm", seed=i)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i, c in enumerate((1, 0, 1)):
        write_image(base / "GTSRB" / "Final_Test" / "Images" / f"{i:05d}.ppm", seed=i)
        rows.append(f"{i:05d}.ppm;12;12;1;1;10;10;{c}")
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    sizes = {split: len(cd.load_split("GTSRB", split, tmp_path, TINY)) for split in cd.SPLITS}
    assert sizes == {"train": 9, "val": 1, "test": 3}
    test = cd.load_split("GTSRB", "test", tmp_path, TINY)
    assert [test[i][1] for i in range(3)] == [1, 0, 1]
    _check_item(test[0], 43)
    assert len(cd.classnames("GTSRB", tmp_path)) == 43


def test_cifar10_reads_pickled_batches(tmp_path, monkeypatch):
    # torchvision checks the md5 of the real batches; these tiny ones only need to be read.
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args, **kwargs: True)
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = seeded_rng()
    for name, n in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", 3)]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}
        (base / name).write_bytes(pickle.dumps(batch))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    sizes = {split: len(cd.load_split("CIFAR10", split, tmp_path, TINY)) for split in cd.SPLITS}
    assert sizes == {"train": 18, "val": 2, "test": 3}
    _check_item(cd.load_split("CIFAR10", "val", tmp_path, TINY)[0], 10)
    assert cd.classnames("CIFAR10", tmp_path) == names


@pytest.mark.skipif(importlib.util.find_spec("h5py") is not None, reason="h5py is installed")
def test_pcam_without_h5py_says_what_to_install(tmp_path):
    for split in ("train", "test"):
        for part in ("x", "y"):
            path = tmp_path / "PCAM" / "pcam" / f"camelyonpatch_level_2_split_{split}_{part}.h5"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    with pytest.raises(ImportError, match="pip install h5py"):
        cd.load_split("PCAM", "test", tmp_path, TINY)


# ---- layout checks, names and templates ---------------------------------------------------------------------------


def test_check_layout_lists_every_missing_dataset_at_once(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        cd.check_layout(cd.CLIP20, tmp_path)
    message = str(error.value)
    for name in cd.CLIP20:
        assert f"- {name}: missing" in message and cd.expected_layout(name) in message
    assert "FER2013/fer2013/fer2013.csv or FER2013/fer2013/icml_face_data.csv" in message


def test_check_layout_names_the_missing_part_of_a_partial_dataset(tmp_path):
    write_folder_split(tmp_path / "dtd" / "train", ["banded"], per_class=1)
    write_folder_split(tmp_path / "EuroSAT_splits" / "train", ["Forest"], per_class=1)
    cd.check_layout([], tmp_path)  # nothing named, nothing to miss
    with pytest.raises(FileNotFoundError) as error:
        cd.check_layout(["DTD", "EuroSAT"], tmp_path)
    message = str(error.value)
    assert "- DTD: missing dtd/val/\n" in message and "dtd/train/," not in message
    assert "- EuroSAT: missing EuroSAT_splits/val/, EuroSAT_splits/test/\n" in message
    with pytest.raises(FileNotFoundError, match="dtd/val/"):
        cd.load_split("DTD", "train", tmp_path, TINY)
    write_folder_split(tmp_path / "dtd" / "val", ["banded"], per_class=1)
    with pytest.raises(ValueError, match="DTD under .*1 train images"):  # too few to hold out a val part
        cd.load_split("DTD", "val", tmp_path, TINY)


def test_unknown_dataset_or_split_is_refused(tmp_path):
    with pytest.raises(KeyError, match="ImageNet"):
        cd.load_split("ImageNet", "test", tmp_path, TINY)
    with pytest.raises(ValueError, match="'valid'"):
        cd.load_split("MNIST", "valid", tmp_path, TINY)


def test_benchmark_lists_and_fixed_class_names():
    assert cd.CLIP14[:8] == cd.CLIP8 and cd.CLIP20[:14] == cd.CLIP14 and len(set(cd.CLIP20)) == 20
    fixed = {"GTSRB": 43, "RESISC45": 45, "Flowers102": 102, "PCAM": 2, "FER2013": 7, "SVHN": 10, "RenderedSST2": 2}
    for name, n in fixed.items():
        assert len(cd.classnames(name, "/nonexistent")) == n  # the release hard-codes these: no data needed
    assert cd.classnames("FER2013", "/nonexistent")[3] == "['happy', 'smiling']"  # the release's prompt text


def test_every_dataset_has_templates_with_one_slot():
    assert set(TEMPLATES) == set(cd.CLIP20)
    for name, templates in TEMPLATES.items():
        assert templates and all(t.count("{}") == 1 for t in templates), name
    assert TEMPLATES["MNIST"] == ('a photo of the number: "{}".',)
    assert len(TEMPLATES["CIFAR100"]) == 18 and len(TEMPLATES["RESISC45"]) == 18
