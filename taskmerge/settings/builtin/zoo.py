"""The model zoo: a base encoder and one fine-tuned encoder (plus its head) per task, as safetensors.

For the built-in benchmark the zoo is built here — the base ViT pre-trained on a generic mixture, then
fine-tuned end to end per task — piece by piece: the base is cached under a key of the encoder config, the
pre-training recipe, the seed and this module's source; each task's fine-tuned encoder and head under a key of
the base's key, the task's training data, the fine-tuning recipe, its seed and the source, inside the base's
folder. A changed recipe rebuilds what it affects, and any subset of tasks reuses what exists:

    <cache_dir>/zoo/<base key>/base.safetensors, manifest.json
    <cache_dir>/zoo/<base key>/tasks/<task>-<task key>/finetuned.safetensors, head.safetensors, manifest.json

Every file is a checksummed cache entry; a damaged piece is reported, removed and rebuilt.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from taskmerge import checkpoints
from taskmerge.cache import building, content_key, discard, entry_problem, write_json_entry, write_tensors_entry
from taskmerge.decoders import LinearClassifier, build_decoder
from taskmerge.decoders import training as decoder_training
from taskmerge.settings import encoder_from_spec
from taskmerge.settings.builtin import encoder as builtin_vit
from taskmerge.settings.builtin import data as builtin_data
from taskmerge.settings.builtin.tasks import builtin_task_names
from taskmerge.tasks import Task
from taskmerge.zoo import Zoo

MANIFEST = "manifest.json"
BASE, FINETUNED, HEAD = "base.safetensors", "finetuned.safetensors", "head.safetensors"
# The default zoo (pre-training 8000 images × 5 epochs, fine-tuning 4 × 1200 images × 20 epochs, width 96,
# depth 4, 64 patches) takes about 3 minutes on 2 CPU cores: seconds per image and epoch, for estimates.
SECONDS_PER_IMAGE_EPOCH = 180 / (8000 * 5 + 4 * 1200 * 20)


class _EncoderWithHead(nn.Module):
    """Encoder followed by a decoder, trained end to end."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.features(images, self.head.feature_kind))




def _code_version() -> str:
    """Hash of the source files that define the zoo: any edit to the recipe or model rebuilds it."""
    modules = (__file__, builtin_vit.__file__, builtin_data.__file__, decoder_training.__file__)
    return content_key([Path(m).read_text() for m in modules])


def base_key(encoder_cfg: Mapping[str, Any], pretrain: Mapping[str, Any], seed: int) -> str:
    """Cache key of the built-in base encoder: encoder config, pre-training recipe, seed and code."""
    return content_key("base", dict(encoder_cfg), dict(pretrain), seed, _code_version())


def finetune_seed(task_name: str, seed: int) -> int:
    """Seed of a task's fine-tuning, from its place in the built-in registry (not in the run's task list), so
    any subset of tasks gets the same fine-tuned models as the full benchmark."""
    return seed + 1 + builtin_task_names().index(task_name)


def task_key(base: str, task: Task, finetune: Mapping[str, Any], seed: int) -> str:
    """Cache key of one task's fine-tuned encoder and head: base key, task and training data, recipe, seed, code."""
    train = task.splits["train"]
    return content_key("finetune", base, task.name, train.identity(), dict(finetune), finetune_seed(task.name, seed),
                       _code_version())


def get_builtin_zoo(
    encoder_cfg: Mapping[str, Any],
    recipe: Mapping[str, Any],
    tasks: list[Task],
    seed: int,
    cache_dir: str | Path,
) -> tuple[Zoo, bool]:
    """The cached zoo for this config, building its missing pieces first; the flag says something was built.

    Each piece (the base, each task) is built in a hidden staging folder and renamed into place once complete,
    so an interrupted build (an error, or SIGTERM turned into SystemExit) leaves nothing behind and concurrent
    builders never see a torn piece.
    """
    base = base_key(encoder_cfg, recipe["pretrain"], seed)
    root = Path(cache_dir) / "zoo" / base[:16]
    keys = {t.name: task_key(base, t, recipe["finetune"], seed) for t in tasks}
    pieces = {name: root / "tasks" / f"{name}-{key[:16]}" for name, key in keys.items()}
    build_base = not _piece_ready(root, (BASE,))
    todo = [t for t in tasks if build_base or not _piece_ready(pieces[t.name], (FINETUNED, HEAD))]
    if build_base or todo:
        _announce(root, encoder_cfg, recipe, tasks, build_base, todo)
    if build_base:
        _build_piece(root, (BASE,), functools.partial(_pretrain, encoder_cfg=encoder_cfg, pretrain=recipe["pretrain"],
                                                      seed=seed, key=base), "base")
    for task in todo:
        _build_piece(pieces[task.name], (FINETUNED, HEAD),
                     functools.partial(_finetune, base_path=root / BASE, encoder_cfg=encoder_cfg, task=task,
                                       finetune=recipe["finetune"], seed=seed, key=keys[task.name]), task.name)
    zoo = Zoo(key=content_key("builtin", base, keys), base=root / BASE,
              finetuned={name: piece / FINETUNED for name, piece in pieces.items()},
              heads={name: piece / HEAD for name, piece in pieces.items()})
    return zoo, bool(build_base or todo)


def _piece_ready(root: Path, files: Sequence[str]) -> bool:
    """True if `root` holds `files` and its manifest, each matching its checksum; a piece that does not is
    reported (naming what is wrong with which file) and removed, so that it is rebuilt."""
    if not root.is_dir():
        return False
    problems = {name: entry_problem(root / name) for name in (*files, MANIFEST)}
    wrong = "; ".join(f"{name}: {problem}" for name, problem in problems.items() if problem)
    if wrong:
        discard(root, wrong)
    return not wrong


def _build_piece(root: Path, files: Sequence[str], build: Callable[[Path], dict[str, Any]], label: str) -> None:
    """Run `build(staging)` (it writes the piece's sealed files and returns its manifest) in a hidden folder beside
    `root` and rename it into place, under the piece's build lock: a process that finds another building the same
    piece waits for it and uses its piece, so processes sharing a cache use one zoo and train it once."""
    start = time.perf_counter()
    with building(root):
        if _piece_ready(root, files):
            tqdm.write(f"  {label}: built by another process meanwhile")
            return
        with checkpoints.temporary_dir(root) as staging:
            write_json_entry(staging / MANIFEST, build(staging))
            os.rename(staging, root)
    tqdm.write(f"  {label}: built in {time.perf_counter() - start:.0f} s")


def _announce(root: Path, encoder_cfg: Mapping[str, Any], recipe: Mapping[str, Any], tasks: list[Task], build_base: bool,
              todo: list[Task]) -> None:
    """Say on stdout which pieces of the zoo are built or reused, where, and roughly how long it takes."""
    pre, ft = recipe["pretrain"], recipe["finetune"]
    building = {t.name for t in todo}
    plan = {"base": (pre["n_images"], pre["epochs"]) if build_base else None,
            **{t.name: (len(t.splits["train"]), ft["epochs"]) if t.name in building else None for t in tasks}}
    duration = _duration(encoder_cfg, sum(images * epochs for images, epochs in filter(None, plan.values())))
    what = "the built-in model zoo" if build_base else "the missing pieces of the built-in model zoo"
    when = "first run only; " if build_base else ""
    tqdm.write(f"building {what} in {root} ({when}{duration} on 2 CPU cores)")
    for part, work in plan.items():
        tqdm.write(f"  {part}: " + (f"training on {work[0]} images × {work[1]} epochs" if work else "reused"))


def _duration(encoder_cfg: Mapping[str, Any], image_epochs: int) -> str:
    """Rough training time of the built-in encoder over `image_epochs` images, scaled from the default zoo's by the
    encoder's compute (depth × width² × patches)."""
    patches = (encoder_cfg["img_size"] // encoder_cfg["patch_size"]) ** 2
    scale = encoder_cfg["depth"] * encoder_cfg["embed_dim"] ** 2 * patches / (4 * 96**2 * 64)
    seconds = image_epochs * SECONDS_PER_IMAGE_EPOCH * scale
    return f"about {seconds / 60:.0f} minutes" if seconds >= 90 else f"about {max(seconds, 1):.0f} s"


def _pretrain(staging: Path, encoder_cfg: Mapping[str, Any], pretrain: Mapping[str, Any], seed: int, key: str) -> dict[str, Any]:
    """Pre-train the base encoder on the generic mixture, save it in `staging`; returns its manifest."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    encoder = encoder_from_spec(encoder_cfg)
    images, labels = builtin_data.pretrain_mixture(pretrain["n_images"], encoder_cfg["img_size"], seed)
    model = _EncoderWithHead(encoder, LinearClassifier(encoder.embed_dim, len(builtin_data.PRETRAIN_FAMILIES)))
    losses = decoder_training.train_module(
        model, images, labels, torch.nn.functional.cross_entropy, pretrain["epochs"], pretrain["lr"],
        pretrain["batch_size"], seed, desc="zoo: pre-train base",
    )
    write_tensors_entry(staging / BASE, encoder.state_dict())
    return {"key": key, "encoder": dict(encoder_cfg), "pretrain": dict(pretrain), "seed": seed,
            "final_loss": losses[-1], "seconds": time.perf_counter() - start}


def _finetune(staging: Path, base_path: Path, encoder_cfg: Mapping[str, Any], task: Task, finetune: Mapping[str, Any],
              seed: int, key: str) -> dict[str, Any]:
    """Fine-tune the base at `base_path` end to end with a new head on `task`, save both in `staging`; returns the
    manifest. The encoder is loaded before seeding, so the head's initialisation depends on the task seed only."""
    start = time.perf_counter()
    encoder = encoder_from_spec(encoder_cfg)
    encoder.load_state_dict(checkpoints.load_state_dict(base_path))
    task_seed = finetune_seed(task.name, seed)
    torch.manual_seed(task_seed)
    head = build_decoder(task.kind, encoder.embed_dim, task.num_outputs, encoder.patch_size, encoder.grid_size)
    train = task.splits["train"]
    losses = decoder_training.train_module(
        _EncoderWithHead(encoder, head), train.images, train.targets, task.loss, finetune["epochs"], finetune["lr"],
        finetune["batch_size"], task_seed, desc=f"zoo: fine-tune {task.name}",
    )
    write_tensors_entry(staging / FINETUNED, encoder.state_dict())
    write_tensors_entry(staging / HEAD, head.state_dict())
    return {"key": key, "task": task.name, "finetune": dict(finetune), "seed": task_seed, "final_loss": losses[-1],
            "seconds": time.perf_counter() - start}
