"""A generated dense demo zoo: data trees, a label-free base and one fine-tuned encoder per task (issue 10 §4).

Nothing can be downloaded, so everything is generated and trained here, deterministically from the seed:

1. ADE20k and NYU trees in their release layouts (`demo_data`), under `data/`.
2. The base: a small `DenseViT` trained without labels, by masked-patch reconstruction (half the patches
   blanked, every blanked patch's per-patch-normalised pixels predicted linearly from the last normed tokens),
   on the train images of both tasks plus generic generated images: a useful but generic starting point.
3. One fine-tune per task from the base, LP-FT (a fresh decoder first trained on the frozen features, then
   everything end to end with a per-task learning rate), through the real readers (`target="input"`) and the
   decoder's features (`FEATURE_SPECS`, its layers counted from the end): ADE20k with `LinearSegHead` and
   `segmentation_loss`, NYU with `LinearDepthHead` and `SigLoss`. The heads are sized for the demo data (its 6
   classes, 64 depth bins; see `demo_decoder`) and discarded: only the encoders are kept.

With the default config each fine-tuned encoder beats the base on its own task under a fresh linear decoder on
frozen features, and task arithmetic at α 0.3-0.8 lands between on average: a real merging problem.

Every encoder is written in canonical space as a DUNE release (`releases.export(..., "dune")`), so the real
reader reads it back. The whole demo is cached under `<cache_dir>/dense_demo/<key>/` (key = the config and
the source of the modules that build it), built in a hidden staging folder renamed into place; each release
and the manifest are sealed cache entries, the manifest records the SHA-256 of every data file, and a damaged
file of either kind is reported, the folder removed and rebuilt:

    <cache_dir>/dense_demo/<key>/base.pth, ade20k.pth, nyud.pth, manifest.json, data/{ADEChallengeData2016,nyu}/
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from taskmerge.cache import content_key, discard, entry_problem, seal, write_json_entry
from taskmerge.checkpoints import fingerprint, temporary_dir
from taskmerge.decoders import training
from taskmerge.settings.dense import datasets, decoders, demo_data, encoder, releases
from taskmerge.settings.dense.datasets import ADE20k, NYUDepth, collate_dense, preprocess
from taskmerge.settings.dense.decoders import (FEATURE_SPECS, LinearDepthHead, LinearSegHead, PackedInput, SigLoss,
                                               pack_features, segmentation_loss)
from taskmerge.settings.dense.encoder import PATCH_SIZE, DenseViT

MANIFEST, BASE, DATA = "manifest.json", "base.pth", "data"
TASKS = {"ade20k": "linear_seg", "nyud": "linear_depth"}  # task -> its decoder in FEATURE_SPECS
DEMO_DEPTH_BINS = 64
SPEC_DEPTH = 12  # FEATURE_SPECS count layers of a 12-block ViT-B; the demo encoder takes them from its end
# The default config's first build (6200 image-epochs of training) took 50-60 s on 2 shared CPU cores: seconds per
# image and epoch, for the estimate announced before a build (scaled by the encoder's compute).
SECONDS_PER_IMAGE_EPOCH = 0.009
_MODULES = (__file__, datasets.__file__, decoders.__file__, demo_data.__file__, encoder.__file__, releases.__file__,
            training.__file__)


@dataclass(frozen=True)
class DemoConfig:
    """Recipe of the demo zoo: data sizes, encoder dimensions and the two training stages."""

    image_size: int = 112
    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 3
    reg_tokens: int = 4
    n_train: int = 200  # generated train images per task
    n_val: int = 50  # generated ADE20k val / NYU test images
    n_generic: int = 200  # generic generated images added to the base's label-free training set
    mask_ratio: float = 0.5
    pretrain_epochs: int = 5
    pretrain_lr: float = 1e-3
    probe_epochs: int = 10  # LP-FT: the fresh decoder first trains on frozen features
    probe_lr: float = 3e-3
    finetune_epochs: int = 8
    finetune_lr: tuple[float, ...] = (2e-4, 2e-3)  # per task, in `TASKS` order (SigLoss gradients are small)
    batch_size: int = 16
    sig_warmup: int = 10  # SigLoss iterations on the mean term only
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.finetune_lr) != len(TASKS):
            raise ValueError(f"finetune_lr needs one learning rate per task {list(TASKS)}, got {self.finetune_lr}")


@dataclass(frozen=True)
class DemoRelease:
    """Where a built demo zoo lies: the data root, the DUNE release files and the demo's cache key."""

    data_root: Path
    base: Path
    finetuned: dict[str, Path]
    key: str


def demo_key(config: DemoConfig) -> str:
    """Cache key of a demo zoo: its config and the source of every module that builds it."""
    return content_key("dense_demo", dataclasses.asdict(config), [Path(m).read_text() for m in _MODULES])


def build_demo(cache_dir: str | Path, config: DemoConfig = DemoConfig()) -> DemoRelease:
    """The cached demo zoo for `config`, built first (announced on stdout) if absent or damaged."""
    key = demo_key(config)
    root = Path(cache_dir) / "dense_demo" / key[:16]
    if not _ready(root):
        _announce(root, config)
        _build(root, config, key)
    return DemoRelease(root / DATA, root / BASE, {task: root / f"{task}.pth" for task in TASKS}, key)


def _release_files() -> tuple[str, ...]:
    """Names of the demo's release files."""
    return (BASE, *(f"{task}.pth" for task in TASKS))


def _ready(root: Path) -> bool:
    """True if `root` holds an intact demo; a damaged one is reported (what is wrong with which file) and removed."""
    if not root.is_dir():
        return False
    problems = {name: entry_problem(root / name) for name in (MANIFEST, *_release_files())}
    if problems[MANIFEST] is None:
        problems.update(_data_problems(root))
    wrong = "; ".join(f"{name}: {problem}" for name, problem in problems.items() if problem)
    if wrong:
        discard(root, wrong)
    return not wrong


def _data_problems(root: Path) -> dict[str, str]:
    """Data files whose bytes differ from the SHA-256 the manifest recorded, with what is wrong."""
    recorded = read_manifest(root)["data"]
    problems = {}
    for name, digest in recorded.items():
        path = root / DATA / name
        if not path.is_file():
            problems[f"{DATA}/{name}"] = "it is missing"
        elif fingerprint(path) != digest:
            problems[f"{DATA}/{name}"] = "its bytes do not match the SHA-256 recorded in the manifest"
    return problems


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of a built demo (key, config, data checksums, final losses, build time)."""
    return json.loads((root / MANIFEST).read_text())


def _announce(root: Path, config: DemoConfig) -> None:
    """Say on stdout what is built, where, and roughly how long it takes."""
    work = {"base": (2 * config.n_train + config.n_generic, config.pretrain_epochs),
            **{task: (config.n_train, config.finetune_epochs) for task in TASKS}}
    scale = config.depth * config.embed_dim**2 * (config.image_size // PATCH_SIZE) ** 2 / (4 * 96**2 * 64)
    seconds = scale * SECONDS_PER_IMAGE_EPOCH * sum(images * epochs for images, epochs in work.values())
    duration = f"about {seconds / 60:.0f} minutes" if seconds >= 90 else f"about {max(seconds, 1):.0f} s"
    tqdm.write(f"building the dense demo zoo (generated ADE20k/NYU data, a base and {len(TASKS)} fine-tuned DUNE-format "
               f"encoders) in {root} (first run only; {duration} on 2 CPU cores)")
    for part, (images, epochs) in work.items():
        tqdm.write(f"  {part}: training on {images} images × {epochs} epochs")


def _build(root: Path, config: DemoConfig, key: str) -> None:
    """Build the demo in a hidden folder beside `root` and rename it into place; a concurrent builder's demo is kept."""
    start = time.perf_counter()
    root.parent.mkdir(parents=True, exist_ok=True)
    with temporary_dir(root) as staging:
        manifest = _build_into(staging, config, key)
        manifest["seconds"] = time.perf_counter() - start
        write_json_entry(staging / MANIFEST, manifest)
        try:
            os.rename(staging, root)
        except OSError:
            if not _ready(root):
                raise
    tqdm.write(f"  dense demo zoo built in {time.perf_counter() - start:.0f} s")


def _build_into(staging: Path, config: DemoConfig, key: str) -> dict[str, Any]:
    """Write the data, train and export the base and the fine-tuned encoders into `staging`; returns the manifest."""
    data_root = staging / DATA
    demo_data.write_ade20k_tree(data_root, config.n_train, config.n_val, config.seed)
    demo_data.write_nyu_tree(data_root, config.n_train, config.n_val, config.seed + 1)
    splits = {"ade20k": _load(ADE20k(data_root, "train", config.image_size, target="input")),
              "nyud": _load(NYUDepth(data_root, "train", config.image_size, target="input"))}
    unlabeled = torch.cat([images for images, _ in splits.values()] + [_generic_images(config)])
    base, base_loss = _pretrain(unlabeled, config)
    seal(releases.export(base, "dune", staging / BASE))
    losses = {"base": base_loss}
    for index, (task, (images, targets)) in enumerate(splits.items()):
        tuned, losses[task] = _finetune(base, task, images, targets, config, seed=config.seed + 1 + index)
        seal(releases.export(tuned, "dune", staging / f"{task}.pth"))
    data = {str(p.relative_to(data_root)): fingerprint(p) for p in sorted(data_root.rglob("*")) if p.is_file()}
    return {"key": key, "config": dataclasses.asdict(config), "final_losses": losses, "data": data}


def _load(dataset: torch.utils.data.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Every item of a reader, batched: images `[N, 3, S, S]` and targets `[N, S, S]`."""
    return collate_dense([dataset[i] for i in range(len(dataset))])


def _generic_images(config: DemoConfig) -> torch.Tensor:
    """Generic images (smooth colour fields with a few random bars), preprocessed as the task images."""
    rng = np.random.default_rng(config.seed + 2)
    images = []
    for _ in range(config.n_generic):
        h, w = (int(v) for v in rng.integers(64, 161, size=2))
        grid = rng.uniform(0, 255, size=(int(rng.integers(2, 7)), int(rng.integers(2, 7)), 3)).astype(np.uint8)
        pixels = np.asarray(PIL.Image.fromarray(grid, "RGB").resize((w, h), PIL.Image.BICUBIC), dtype=np.float64)
        for _ in range(int(rng.integers(0, 4))):
            y, x = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
            pixels[y : y + int(rng.integers(4, h // 2)), x : x + int(rng.integers(4, w // 2))] = rng.uniform(0, 255, 3)
        pixels += rng.normal(0.0, 8.0, size=pixels.shape)
        images.append(preprocess(PIL.Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB"),
                                 config.image_size))
    return torch.stack(images)


def _new_encoder(config: DemoConfig) -> DenseViT:
    """A randomly initialised demo encoder whose position grid is the demo's image size."""
    return DenseViT(config.embed_dim, config.depth, config.num_heads, config.reg_tokens, image_size=config.image_size,
                    native_size=config.image_size)


def from_canonical(canonical: dict[str, torch.Tensor], config: DemoConfig) -> DenseViT:
    """A demo encoder holding canonical weights."""
    model = _new_encoder(config)
    model.load_state_dict(model.encoder_weights(canonical))
    return model


class _MaskedReconstruction(nn.Module):
    """Blank a random `ratio` of the patches and predict their per-patch-normalised pixels from the last normed
    tokens; returns (predictions `[B, N, 3·p²]`, mask `[B, N]`) for `_reconstruction_loss`."""

    def __init__(self, model: DenseViT, ratio: float, seed: int) -> None:
        super().__init__()
        self.model, self.ratio = model, ratio
        self.pixels = nn.Linear(model.embed_dim, 3 * PATCH_SIZE**2)
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, _, height, width = images.shape
        grid = (height // PATCH_SIZE, width // PATCH_SIZE)
        mask = torch.rand(batch, grid[0] * grid[1], generator=self.generator) < self.ratio
        keep = (~mask).float().view(batch, 1, *grid)
        keep = keep.repeat_interleave(PATCH_SIZE, 2).repeat_interleave(PATCH_SIZE, 3)
        return self.pixels(self.model.features(images * keep)), mask


def _reconstruction_loss(output: tuple[torch.Tensor, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """Mean squared error on the blanked patches against their pixels normalised per patch (MAE's norm_pix_loss)."""
    predictions, mask = output
    patches = F.unfold(images, PATCH_SIZE, stride=PATCH_SIZE).transpose(1, 2)
    patches = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6).sqrt()
    return ((predictions - patches) ** 2).mean(-1)[mask].mean()


def _pretrain(images: torch.Tensor, config: DemoConfig) -> tuple[dict[str, torch.Tensor], float]:
    """Train the base without labels on `images`; returns its canonical weights and the last epoch's loss."""
    torch.manual_seed(config.seed)
    model = _new_encoder(config)
    losses = training.train_module(
        _MaskedReconstruction(model, config.mask_ratio, config.seed), images, images, _reconstruction_loss,
        config.pretrain_epochs, config.pretrain_lr, config.batch_size, config.seed, desc="dense demo: base")
    return model.canonical_weights(), losses[-1]


def demo_decoder(name: str, embed_dim: int) -> nn.Module:
    """A fresh `FEATURE_SPECS` decoder sized for the demo data: the segmentation head predicts the demo's
    classes only, the depth head `DEMO_DEPTH_BINS` bins (the full 150 classes and 256 bins cost 10× and 2×)."""
    if name == "linear_seg":
        return LinearSegHead(embed_dim, num_classes=len(demo_data.ADE_DEMO_LABELS))
    return LinearDepthHead(embed_dim, n_bins=DEMO_DEPTH_BINS)


class _EncoderWithDecoder(nn.Module):
    """The encoder's features for a `FEATURE_SPECS` decoder, fed to that decoder: trained end to end."""

    def __init__(self, model: DenseViT, decoder_name: str) -> None:
        super().__init__()
        self.model, self.decoder = model, demo_decoder(decoder_name, model.embed_dim)
        spec = FEATURE_SPECS[decoder_name]
        self.layers = tuple(layer - SPEC_DEPTH for layer in spec["layers"])
        self.norm, self.with_cls = spec["norm"], spec["with_cls"]

    def features(self, images: torch.Tensor, with_cls: bool) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """The encoder's features of `images` as the decoder reads them, with the CLS token if `with_cls`."""
        return self.model.intermediate(images, self.layers, norm=self.norm, with_cls=with_cls)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.features(images, self.with_cls))


def task_loss(task: str, config: DemoConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A task's training loss: cross-entropy ignoring 255 (ADE20k), a fresh `SigLoss` with the config's warm-up (NYU)."""
    return segmentation_loss if TASKS[task] == "linear_seg" else SigLoss(warm_iter=config.sig_warmup)


def _finetune(base: dict[str, torch.Tensor], task: str, images: torch.Tensor, targets: torch.Tensor,
              config: DemoConfig, seed: int) -> tuple[dict[str, torch.Tensor], float]:
    """Fine-tune the base on one task as LP-FT: a fresh decoder first trained on the frozen features, then
    everything end to end; returns the encoder's canonical weights (the decoder is discarded) and the last loss."""
    model = from_canonical(base, config)
    torch.manual_seed(seed)
    tuned = _EncoderWithDecoder(model, TASKS[task])
    with torch.no_grad():
        frozen = torch.cat([pack_features(tuned.features(images[i : i + 64], with_cls=True)) for i in range(0, len(images), 64)])
    training.train_module(
        PackedInput(tuned.decoder, _grid(config)), frozen, targets, task_loss(task, config), config.probe_epochs,
        config.probe_lr, config.batch_size, seed, desc=f"dense demo: probe {task}")
    losses = training.train_module(
        tuned, images, targets, task_loss(task, config), config.finetune_epochs, config.finetune_lr[list(TASKS).index(task)],
        config.batch_size, seed, desc=f"dense demo: fine-tune {task}")
    return model.canonical_weights(), losses[-1]


def _grid(config: DemoConfig) -> tuple[int, int]:
    """The patch grid of the demo's images."""
    return config.image_size // PATCH_SIZE, config.image_size // PATCH_SIZE
