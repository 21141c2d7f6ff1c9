"""The 20 datasets of the CLIP merging benchmark, read lazily from the task_vectors on-disk layout.

Splits follow the release (task_vectors, TALL masks, TSV): "test" is the split the release evaluates as `{D}`,
"val" is its `{D}Val` (10 % of the official train set, at most 5000 images, drawn as
`random_split(train, [n - v, v], generator=torch.Generator().manual_seed(0))`; EuroSAT has its own val folder)
and "train" is the rest of the train set, where TAP takes its unlabeled images. Items are
`(transform(rgb_pil_image), int label)`; EMNIST additionally gets the release's rotate-and-flip after `transform`.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch
import torchvision.datasets as tvd
import torchvision.transforms.functional as TF
from torch.utils.data import Dataset, random_split
from torchvision.datasets.folder import find_classes

CLIP8 = ("Cars", "DTD", "EuroSAT", "GTSRB", "MNIST", "RESISC45", "SVHN", "SUN397")
CLIP14 = CLIP8 + ("STL10", "OxfordIIITPet", "Flowers102", "CIFAR100", "PCAM", "FER2013")
CLIP20 = CLIP14 + ("CIFAR10", "Food101", "FashionMNIST", "RenderedSST2", "EMNIST", "KMNIST")
SPLITS = ("train", "val", "test")

Transform = Callable[[PIL.Image.Image], torch.Tensor]
# (data root, "train" | "test", or "val" where the dataset has its own) -> dataset of (PIL image, label) items
Builder = Callable[[Path, str], Dataset]


@dataclass(frozen=True)
class _Source:
    """Where one dataset lives under the data root and how the release reads it."""

    layout: str
    required: tuple[str, ...]  # paths under the root; a trailing "/" marks a folder, "a|b" accepts either
    build: Builder
    names: tuple[str, ...] | Callable[[Path], list[str]]  # fixed in the release, or read from the data
    own_val: bool = False  # the val split is a folder of its own rather than a part of train
    finish: Callable[[torch.Tensor], torch.Tensor] | None = None  # the release's step after preprocessing


class _ClipView(Dataset):
    """`(transform(rgb image), int label)` items of a `(PIL image, label)` dataset, restricted to `indices`."""

    def __init__(self, base: Dataset, transform: Transform, finish: Callable | None, indices: Sequence[int]) -> None:
        self.base, self.transform, self.finish, self.indices = base, transform, finish, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[self.indices[i]]
        out = self.transform(image.convert("RGB"))
        return (self.finish(out) if self.finish is not None else out), int(label)


def train_val_indices(n: int, fraction: float = 0.1, cap: int = 5000, seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices of the release's `{D}Val` split of `n` train images: (remaining train part, val part).

    Exactly `torch.utils.data.random_split` with a generator seeded by `seed`, val being the second part of
    `min(int(n * fraction), cap)` images (task_vectors `split_train_into_train_val`).
    """
    n_val = min(int(n * fraction), cap)
    if not 0.0 < fraction < 1.0 or not 0 < n_val < n:
        raise ValueError(
            f"cannot hold out val_fraction={fraction} (at most {cap}) of {n} train images: "
            "both the val and the remaining train part must be non-empty"
        )
    train, val = random_split(range(n), [n - n_val, n_val], generator=torch.Generator().manual_seed(seed))
    return list(train.indices), list(val.indices)


def load_split(name: str, split: str, root: str | Path, transform: Transform) -> Dataset:
    """One split of a benchmark dataset as `(transform(rgb image), int label)` items, read lazily from `root`."""
    source = _source(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for {name}; expected one of {SPLITS}")
    root = Path(root).expanduser()
    check_layout([name], root)
    if split == "test" or (split == "val" and source.own_val):
        base = _base(name, root, split)
        return _ClipView(base, transform, source.finish, range(len(base)))
    base = _base(name, root, "train")
    if source.own_val:
        return _ClipView(base, transform, source.finish, range(len(base)))
    try:
        train, val = train_val_indices(len(base))
    except ValueError as error:
        raise ValueError(f"{name} under {root}: {error}") from error
    return _ClipView(base, transform, source.finish, train if split == "train" else val)


@functools.lru_cache(maxsize=None)
def _base(name: str, root: Path, split: str) -> Dataset:
    """The (PIL image, label) dataset of one folder or file set, built once per process: train and val views
    share it, so a large folder (SUN397, Food101) is scanned once."""
    return _source(name).build(root, split)


def classnames(name: str, root: str | Path) -> list[str]:
    """Class names in label order, as the release's zero-shot heads put them into the prompt templates."""
    source = _source(name)
    if isinstance(source.names, tuple):
        return list(source.names)
    root = Path(root).expanduser()
    check_layout([name], root)
    return source.names(root)


def expected_layout(name: str) -> str:
    """What the dataset's files look like under the data root, for error messages and docs."""
    return _source(name).layout


def check_layout(names: Sequence[str], root: str | Path) -> None:
    """Fail once, listing every missing file or folder of every named dataset with its expected layout."""
    root = Path(root).expanduser()
    problems = []
    for name in names:
        missing = [entry for entry in _source(name).required if not any(_exists(root, p) for p in entry.split("|"))]
        if missing:
            problems.append(f"- {name}: missing {', '.join(m.replace('|', ' or ') for m in missing)}\n"
                            f"    expected under the data root: {expected_layout(name)}")
    if problems:
        raise FileNotFoundError(f"CLIP benchmark data incomplete under {root}:\n" + "\n".join(problems))


def _source(name: str) -> _Source:
    """The named dataset's source, or a KeyError listing the benchmark's names."""
    if name not in _SOURCES:
        raise KeyError(f"unknown CLIP benchmark dataset {name!r}; expected one of {CLIP20}")
    return _SOURCES[name]


def _exists(root: Path, relative: str) -> bool:
    """Whether `relative` exists under `root` as a folder (trailing "/") or as a file."""
    path = root / relative
    return path.is_dir() if relative.endswith("/") else path.is_file()


def _emnist_upright(image: torch.Tensor) -> torch.Tensor:
    """The release's step after EMNIST's preprocessing: rotate by -90° then flip left-right, i.e. transpose back."""
    return TF.hflip(TF.rotate(image, -90))


def _folders(**split_dirs: str) -> Builder:
    """ImageFolders, one folder per split (the release's DTD, SUN397 and EuroSAT readers)."""
    return lambda root, split: tvd.ImageFolder(root / split_dirs[split])


def _folder_names(folder: str, clean: Callable[[str], str]) -> Callable[[Path], list[str]]:
    """Class names from an ImageFolder's sorted class folders, cleaned like the release does."""
    return lambda root: [clean(c) for c in find_classes(root / folder)[0]]


def _by_split(cls: type, sub: str = "", train_split: str = "train", **kwargs) -> Builder:
    """A torchvision dataset taking `split=`, rooted at `sub` under the data root."""
    return lambda root, split: cls(root / sub, split=train_split if split == "train" else split, **kwargs)


def _by_flag(cls: type, sub: str = "", **kwargs) -> Builder:
    """A torchvision dataset taking `train=`, rooted at `sub` under the data root."""
    return lambda root, split: cls(root / sub, train=split == "train", **kwargs)


def _resisc45(root: Path, split: str) -> Dataset:
    """The release's RESISC45 reader: an ImageFolder over NWPU-RESISC45 keeping the files of resisc45-{split}.txt."""
    listed = {line.strip() for line in (root / "resisc45" / f"resisc45-{split}.txt").read_text().splitlines()}
    return tvd.ImageFolder(root / "resisc45" / "NWPU-RESISC45", is_valid_file=lambda path: Path(path).name in listed)


def _pcam(root: Path, split: str) -> Dataset:
    """torchvision's PCAM, which needs h5py."""
    if importlib.util.find_spec("h5py") is None:
        raise ImportError("PCAM is read from PCAM/pcam/*.h5 with h5py, which is not installed: pip install h5py")
    return tvd.PCAM(root / "PCAM", split=split)


def _idx_files(folder: str, prefixes: Sequence[str]) -> tuple[str, ...]:
    """The raw idx files torchvision's MNIST-style readers need."""
    return tuple(f"{folder}/{p}-{kind}-ubyte" for p in prefixes for kind in ("images-idx3", "labels-idx1"))


_DIGITS = tuple("0123456789")
_MNIST_FILES = ("train", "t10k")
_EUROSAT_NAMES = {  # folder -> the OpenAI prompt name the release maps it to
    "AnnualCrop": "annual crop land",
    "Forest": "forest",
    "HerbaceousVegetation": "brushland or shrubland",
    "Highway": "highway or road",
    "Industrial": "industrial buildings or commercial buildings",
    "Pasture": "pasture land",
    "PermanentCrop": "permanent crop land",
    "Residential": "residential buildings or homes or apartments",
    "River": "river",
    "SeaLake": "lake or sea",
}
# The release formats its FER2013 synonym lists straight into the prompts, so the text is each list's str().
_FER2013_SYNONYMS = (
    ["angry"],
    ["disgusted"],
    ["fearful"],
    ["happy", "smiling"],
    ["sad", "depressed"],
    ["surprised", "shocked", "spooked"],
    ["neutral", "bored"],
)
_GTSRB_NAMES = (
    "red and white circle 20 kph speed limit", "red and white circle 30 kph speed limit",
    "red and white circle 50 kph speed limit", "red and white circle 60 kph speed limit",
    "red and white circle 70 kph speed limit", "red and white circle 80 kph speed limit",
    "end / de-restriction of 80 kph speed limit", "red and white circle 100 kph speed limit",
    "red and white circle 120 kph speed limit", "red and white circle red car and black car no passing",
    "red and white circle red truck and black car no passing", "red and white triangle road intersection warning",
    "white and yellow diamond priority road", "red and white upside down triangle yield right-of-way", "stop",
    "empty red and white circle", "red and white circle no truck entry",
    "red circle with white horizonal stripe no entry", "red and white triangle with exclamation mark warning",
    "red and white triangle with black left curve approaching warning",
    "red and white triangle with black right curve approaching warning",
    "red and white triangle with black double curve approaching warning",
    "red and white triangle rough / bumpy road warning", "red and white triangle car skidding / slipping warning",
    "red and white triangle with merging / narrow lanes warning",
    "red and white triangle with person digging / construction / road work warning",
    "red and white triangle with traffic light approaching warning",
    "red and white triangle with person walking warning",
    "red and white triangle with child and person walking warning", "red and white triangle with bicyle warning",
    "red and white triangle with snowflake / ice warning", "red and white triangle with deer warning",
    "white circle with gray strike bar no speed limit", "blue circle with white right turn arrow mandatory",
    "blue circle with white left turn arrow mandatory", "blue circle with white forward arrow mandatory",
    "blue circle with white forward or right turn arrow mandatory",
    "blue circle with white forward or left turn arrow mandatory",
    "blue circle with white keep right arrow mandatory",
    "blue circle with white keep left arrow mandatory", "blue circle with white arrows indicating a traffic circle",
    "white circle with gray strike bar indicating no passing for cars has ended",
    "white circle with gray strike bar indicating no passing for trucks has ended",
)
_RESISC45_NAMES = tuple(c.replace("_", " ") for c in (
    "airplane", "airport", "baseball_diamond", "basketball_court", "beach", "bridge", "chaparral", "church",
    "circular_farmland", "cloud", "commercial_area", "dense_residential", "desert", "forest", "freeway",
    "golf_course", "ground_track_field", "harbor", "industrial_area", "intersection", "island", "lake", "meadow",
    "medium_residential", "mobile_home_park", "mountain", "overpass", "palace", "parking_lot", "railway",
    "railway_station", "rectangular_farmland", "river", "roundabout", "runway", "sea_ice", "ship", "snowberg",
    "sparse_residential", "stadium", "storage_tank", "tennis_court", "terrace", "thermal_power_station", "wetland",
))
_FLOWERS102_NAMES = (  # the release's list; torchvision's Flowers102.classes differs in three names
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold", "tiger lily",
    "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon", "colt's foot", "king protea",
    "spear thistle", "yellow iris", "globe flower", "purple coneflower", "peruvian lily", "balloon flower",
    "giant white arum lily", "fire lily", "pincushion flower", "fritillary", "red ginger", "grape hyacinth",
    "corn poppy", "prince of wales feathers", "stemless gentian", "artichoke", "sweet william", "carnation",
    "garden phlox", "love in the mist", "mexican aster", "alpine sea holly", "ruby-lipped cattleya", "cape flower",
    "great masterwort", "siam tulip", "lenten rose", "barbeton daisy", "daffodil", "sword lily", "poinsettia",
    "bolero deep blue", "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion", "petunia",
    "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura", "geranium", "orange dahlia",
    "pink and yellow dahlia", "cautleya spicata", "japanese anemone", "black-eyed susan", "silverbush",
    "californian poppy", "osteospermum", "spring crocus", "bearded iris", "windflower", "tree poppy", "gazania",
    "azalea", "water lily", "rose", "thorn apple", "morning glory", "passion flower", "lotus", "toad lily",
    "anthurium", "frangipani", "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow", "magnolia",
    "cyclamen", "watercress", "canna lily", "hippeastrum", "bee balm", "air plant", "foxglove", "bougainvillea",
    "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower", "trumpet creeper", "blackberry lily",
)


def _eurosat_name(folder: str) -> str:
    if folder not in _EUROSAT_NAMES:
        raise ValueError(
            f"EuroSAT_splits/train/{folder}: not a EuroSAT class folder; expected one of {list(_EUROSAT_NAMES)}"
        )
    return _EUROSAT_NAMES[folder]


_SOURCES: dict[str, _Source] = {
    "Cars": _Source(
        "stanford_cars/{devkit/{cars_meta.mat, cars_train_annos.mat}, cars_train/*.jpg, cars_test/*.jpg, "
        "cars_test_annos_withlabels.mat} (torchvision StanfordCars layout)",
        ("stanford_cars/devkit/cars_meta.mat", "stanford_cars/devkit/cars_train_annos.mat",
         "stanford_cars/cars_train/", "stanford_cars/cars_test/", "stanford_cars/cars_test_annos_withlabels.mat"),
        _by_split(tvd.StanfordCars),
        lambda root: [c.replace("_", " ") for c in tvd.StanfordCars(root).classes],
    ),
    "DTD": _Source(
        "dtd/{train,val}/<class>/*.jpg (ImageFolders; val/ is the test split, as in the release)",
        ("dtd/train/", "dtd/val/"),
        _folders(train="dtd/train", test="dtd/val"),
        _folder_names("dtd/train", lambda c: c.replace("_", " ")),
    ),
    "EuroSAT": _Source(
        "EuroSAT_splits/{train,val,test}/<class>/*.jpg (ImageFolders; val/ is EuroSATVal, test/ the test split)",
        ("EuroSAT_splits/train/", "EuroSAT_splits/val/", "EuroSAT_splits/test/"),
        _folders(train="EuroSAT_splits/train", val="EuroSAT_splits/val", test="EuroSAT_splits/test"),
        _folder_names("EuroSAT_splits/train", _eurosat_name),
        own_val=True,
    ),
    "GTSRB": _Source(
        "gtsrb/{GTSRB/Training/<class id>/*.ppm, GTSRB/Final_Test/Images/*.ppm, GT-final_test.csv} "
        "(torchvision GTSRB layout)",
        ("gtsrb/GTSRB/Training/", "gtsrb/GTSRB/Final_Test/Images/", "gtsrb/GT-final_test.csv"),
        _by_split(tvd.GTSRB),
        _GTSRB_NAMES,
    ),
    "MNIST": _Source(
        "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (torchvision MNIST layout at the root)",
        _idx_files("MNIST/raw", _MNIST_FILES),
        _by_flag(tvd.MNIST),
        _DIGITS,
    ),
    "RESISC45": _Source(
        "resisc45/{NWPU-RESISC45/<class>/*.jpg, resisc45-train.txt, resisc45-test.txt} (lists of file names)",
        ("resisc45/NWPU-RESISC45/", "resisc45/resisc45-train.txt", "resisc45/resisc45-test.txt"),
        _resisc45,
        _RESISC45_NAMES,
    ),
    "SVHN": _Source(
        "svhn/{train,test}_32x32.mat (torchvision SVHN layout)",
        ("svhn/train_32x32.mat", "svhn/test_32x32.mat"),
        _by_split(tvd.SVHN, "svhn"),
        _DIGITS,
    ),
    "SUN397": _Source(
        "sun397/{train,val}/<letter>_<class>/*.jpg (ImageFolders; val/ is the test split, as in the release)",
        ("sun397/train/", "sun397/val/"),
        _folders(train="sun397/train", test="sun397/val"),
        _folder_names("sun397/train", lambda c: c[2:].replace("_", " ")),
    ),
    "STL10": _Source(
        "stl10/stl10_binary/{train_X,train_y,unlabeled_X,test_X,test_y}.bin + class_names.txt "
        "(torchvision STL10 layout; it checks unlabeled_X.bin too)",
        tuple(f"stl10/stl10_binary/{f}" for f in
              ("train_X.bin", "train_y.bin", "unlabeled_X.bin", "test_X.bin", "test_y.bin", "class_names.txt")),
        _by_split(tvd.STL10, "stl10"),
        lambda root: (root / "stl10/stl10_binary/class_names.txt").read_text().splitlines(),
    ),
    "OxfordIIITPet": _Source(
        "OxfordIIITPet/oxford-iiit-pet/{images/*.jpg, annotations/{trainval,test}.txt} "
        "(torchvision OxfordIIITPet layout; train is trainval)",
        ("OxfordIIITPet/oxford-iiit-pet/images/", "OxfordIIITPet/oxford-iiit-pet/annotations/trainval.txt",
         "OxfordIIITPet/oxford-iiit-pet/annotations/test.txt"),
        _by_split(tvd.OxfordIIITPet, "OxfordIIITPet", train_split="trainval"),
        lambda root: tvd.OxfordIIITPet(root / "OxfordIIITPet", split="trainval").classes,
    ),
    "Flowers102": _Source(
        "flowers102/flowers-102/{jpg/*.jpg, imagelabels.mat, setid.mat} (torchvision Flowers102 layout)",
        ("flowers102/flowers-102/jpg/", "flowers102/flowers-102/imagelabels.mat", "flowers102/flowers-102/setid.mat"),
        _by_split(tvd.Flowers102, "flowers102"),
        _FLOWERS102_NAMES,
    ),
    "CIFAR100": _Source(
        "cifar-100-python/{train,test,meta} (torchvision CIFAR100 layout at the root)",
        tuple(f"cifar-100-python/{f}" for f in ("train", "test", "meta")),
        _by_flag(tvd.CIFAR100),
        lambda root: tvd.CIFAR100(root, train=False).classes,
    ),
    "PCAM": _Source(
        "PCAM/pcam/camelyonpatch_level_2_split_{train,test}_{x,y}.h5 (torchvision PCAM layout; needs h5py)",
        tuple(f"PCAM/pcam/camelyonpatch_level_2_split_{s}_{v}.h5" for s in ("train", "test") for v in ("x", "y")),
        _pcam,
        ("lymph node", "lymph node containing metastatic tumor tissue"),
    ),
    "FER2013": _Source(
        "FER2013/fer2013/fer2013.csv or icml_face_data.csv (torchvision FER2013 layout; the release read the "
        "Hugging Face copy Jeneral/fer-2013, and Kaggle's train.csv/test.csv lack test labels)",
        ("FER2013/fer2013/fer2013.csv|FER2013/fer2013/icml_face_data.csv",),
        _by_split(tvd.FER2013, "FER2013"),
        tuple(str(synonyms) for synonyms in _FER2013_SYNONYMS),
    ),
    "CIFAR10": _Source(
        "cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} (torchvision CIFAR10 layout at the root)",
        tuple(f"cifar-10-batches-py/{f}" for f in
              (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")),
        _by_flag(tvd.CIFAR10),
        lambda root: tvd.CIFAR10(root, train=False).classes,
    ),
    "Food101": _Source(
        "food101/food-101/{images/<class>/*.jpg, meta/{train,test}.json} (torchvision Food101 layout)",
        ("food101/food-101/images/", "food101/food-101/meta/train.json", "food101/food-101/meta/test.json"),
        _by_split(tvd.Food101, "food101"),
        lambda root: tvd.Food101(root / "food101", split="train").classes,
    ),
    "FashionMNIST": _Source(
        "FashionMNIST/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte "
        "(torchvision FashionMNIST layout under FashionMNIST/)",
        _idx_files("FashionMNIST/FashionMNIST/raw", _MNIST_FILES),
        _by_flag(tvd.FashionMNIST, "FashionMNIST"),
        tuple(tvd.FashionMNIST.classes),
    ),
    "RenderedSST2": _Source(
        "RenderedSST2/rendered-sst2/{train,test}/{negative,positive}/*.png (torchvision RenderedSST2 layout)",
        tuple(f"RenderedSST2/rendered-sst2/{s}/{c}/" for s in ("train", "test") for c in ("negative", "positive")),
        _by_split(tvd.RenderedSST2, "RenderedSST2"),
        ("negative", "positive"),  # torchvision's RenderedSST2.classes, which the release uses
    ),
    "EMNIST": _Source(
        "EMNIST/raw/emnist-digits-{train,test}-{images-idx3,labels-idx1}-ubyte "
        "(torchvision EMNIST layout at the root, split 'digits')",
        _idx_files("EMNIST/raw", ("emnist-digits-train", "emnist-digits-test")),
        _by_flag(tvd.EMNIST, split="digits"),
        tuple(tvd.EMNIST.classes_split_dict["digits"]),
        finish=_emnist_upright,
    ),
    "KMNIST": _Source(
        "KMNIST/KMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (torchvision KMNIST layout under KMNIST/)",
        _idx_files("KMNIST/KMNIST/raw", _MNIST_FILES),
        _by_flag(tvd.KMNIST, "KMNIST"),
        tuple(tvd.KMNIST.classes),
    ),
}
