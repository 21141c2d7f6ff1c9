"""The model zoo: a base encoder and one fine-tuned encoder (plus its head) per task, as safetensors.

For the built-in benchmark the zoo is built here — the base ViT pre-trained on a generic mixture, then
fine-tuned end to end per task — and cached under a key that hashes the encoder config, the recipe,
the task data and this module's source, so a changed recipe rebuilds instead of reusing stale weights.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from taskmerge import checkpoints
from taskmerge.cache import atomic_write_json, content_key
from taskmerge.decoders import LinearClassifier, build_decoder
from taskmerge.decoders import training as decoder_training
from taskmerge.encoders import encoder_from_spec
from taskmerge.encoders import vit as builtin_vit
from taskmerge.tasks import Task
from taskmerge.tasks import builtin_data

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Zoo:
    """Paths of the zoo's checkpoints; `key` identifies its content."""

    key: str
    base: Path
    finetuned: dict[str, Path]
    heads: dict[str, Path]

    def fingerprints(self) -> dict[str, str]:
        """Content fingerprints of every checkpoint (base, fine-tuned and heads), for cache keys."""
        files = {"base": self.base, **{f"ft/{t}": p for t, p in self.finetuned.items()},
                 **{f"head/{t}": p for t, p in self.heads.items()}}
        return {name: checkpoints.fingerprint(path) for name, path in files.items()}


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


def builtin_zoo_key(encoder_cfg: Mapping[str, Any], recipe: Mapping[str, Any], tasks: list[Task], seed: int) -> str:
    """Cache key of a built-in zoo: encoder config, recipe, the tasks' training data, seed and code."""
    data = {t.name: [t.splits["train"].images, t.splits["train"].targets] for t in tasks}
    return content_key(dict(encoder_cfg), dict(recipe), data, seed, _code_version())


def _zoo_at(root: Path, key: str, task_names: list[str]) -> Zoo:
    return Zoo(
        key=key,
        base=root / "base.safetensors",
        finetuned={t: root / "finetuned" / f"{t}.safetensors" for t in task_names},
        heads={t: root / "heads" / f"{t}.safetensors" for t in task_names},
    )


def get_builtin_zoo(
    encoder_cfg: Mapping[str, Any],
    recipe: Mapping[str, Any],
    tasks: list[Task],
    seed: int,
    cache_dir: str | Path,
) -> tuple[Zoo, bool]:
    """Return the cached zoo for this config, building it first if absent; the flag says it was built.

    The zoo is built in a private temporary directory and renamed into place once complete, so an
    interrupted build leaves nothing behind and concurrent builders never see a torn zoo.
    """
    key = builtin_zoo_key(encoder_cfg, recipe, tasks, seed)
    root = Path(cache_dir) / "zoo" / key[:16]
    names = [t.name for t in tasks]
    if (root / MANIFEST).is_file():
        return _zoo_at(root, key, names), False
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        manifest = _build_builtin_zoo(staging, encoder_cfg, recipe, tasks, seed)
        atomic_write_json(staging / MANIFEST, {"key": key, **manifest})
        try:
            os.rename(staging, root)
        except OSError:
            if not (root / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _zoo_at(root, key, names), True


def _build_builtin_zoo(
    root: Path, encoder_cfg: Mapping[str, Any], recipe: Mapping[str, Any], tasks: list[Task], seed: int
) -> dict[str, Any]:
    """Pre-train the base encoder, fine-tune one copy per task, save all weights under `root`."""
    pre, ft = recipe["pretrain"], recipe["finetune"]
    torch.manual_seed(seed)
    encoder = encoder_from_spec(encoder_cfg)
    images, labels = builtin_data.pretrain_mixture(pre["n_images"], encoder_cfg["img_size"], seed)
    start = time.perf_counter()
    model = _EncoderWithHead(encoder, LinearClassifier(encoder.embed_dim, len(builtin_data.PRETRAIN_FAMILIES)))
    losses = decoder_training.train_module(
        model, images, labels, torch.nn.functional.cross_entropy, pre["epochs"], pre["lr"], pre["batch_size"], seed,
        desc="zoo: pre-train base",
    )
    checkpoints.save_state_dict(root / "base.safetensors", encoder.state_dict())
    log: dict[str, Any] = {"pretrain": {"final_loss": losses[-1], "seconds": time.perf_counter() - start}}
    for index, task in enumerate(tasks):
        start = time.perf_counter()
        torch.manual_seed(seed + 1 + index)
        student = copy.deepcopy(encoder)
        head = build_decoder(task.kind, student.embed_dim, task.num_outputs, student.patch_size, student.grid_size)
        train = task.splits["train"]
        losses = decoder_training.train_module(
            _EncoderWithHead(student, head), train.images, train.targets, task.loss, ft["epochs"], ft["lr"],
            ft["batch_size"], seed + 1 + index, desc=f"zoo: fine-tune {task.name}",
        )
        checkpoints.save_state_dict(root / "finetuned" / f"{task.name}.safetensors", student.state_dict())
        checkpoints.save_state_dict(root / "heads" / f"{task.name}.safetensors", head.state_dict())
        log[task.name] = {"final_loss": losses[-1], "seconds": time.perf_counter() - start}
    return {"encoder": dict(encoder_cfg), "recipe": json.loads(json.dumps(dict(recipe))), "log": log}
