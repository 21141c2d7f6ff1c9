"""The built-in benchmark as a setting: its input checks, its zoo (trained once, cached) and its tasks."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from taskmerge import checkpoints

from taskmerge.errors import UserError
from taskmerge.settings.builtin.encoder import BuiltinViT
from taskmerge.settings.builtin.tasks import build_builtin_task, builtin_task_kind, builtin_task_names
from taskmerge.settings.builtin.zoo import get_builtin_zoo
from taskmerge.tasks import Task
from taskmerge.zoo import Zoo

ENCODERS = {"builtin_vit": BuiltinViT}
MERGE_DEFAULTS: dict[str, Any] = {}
DECODER_HEADS: dict[str, tuple[str, ...]] = {}  # every built-in task has one decoder (its kind's linear head)


def check_inputs(cfg: Mapping[str, Any]) -> None:
    """Known task names, enough training images for TAP's and AdaMerging's unlabeled sets, an encoder whose
    patches tile the image, and frozen classification heads for entropy AdaMerging."""
    tasks_cfg, encoder_cfg, method_cfg = cfg["tasks"], cfg["encoder"], cfg["method"]
    unknown = [n for n in tasks_cfg["names"] if n not in builtin_task_names()]
    if unknown:
        raise UserError(f"tasks.names: unknown task(s) {unknown}; the built-in benchmark has {builtin_task_names()}")
    if cfg["tap"]["n_samples"] > tasks_cfg["n_train"]:
        raise UserError(f"tap.n_samples={cfg['tap']['n_samples']} is more than the {tasks_cfg['n_train']} training images "
                        f"per task (tasks.n_train); expected at most tasks.n_train")
    if encoder_cfg["img_size"] % encoder_cfg["patch_size"]:
        raise UserError(f"encoder.img_size={encoder_cfg['img_size']} is not a multiple of encoder.patch_size="
                        f"{encoder_cfg['patch_size']}")
    if encoder_cfg["embed_dim"] % encoder_cfg["num_heads"]:
        raise UserError(f"encoder.embed_dim={encoder_cfg['embed_dim']} is not a multiple of encoder.num_heads="
                        f"{encoder_cfg['num_heads']}")
    if method_cfg["name"] == "adamerging" and method_cfg["loss"] == "entropy":
        headless = [n for n in tasks_cfg["names"] if builtin_task_kind(n) != "classification"]
        if headless:
            raise UserError(f"method.loss=entropy needs a frozen classification head for every task; {headless} have "
                            f"none (dense tasks): use method.loss=tap, or tasks.names without them")


@functools.lru_cache(maxsize=2)
def _generate(tasks_json: str) -> tuple[Task, ...]:
    """The built-in tasks of a tasks config (as JSON), generated once per process."""
    tasks_cfg = json.loads(tasks_json)
    sizes = (tasks_cfg["n_train"], tasks_cfg["n_val"], tasks_cfg["n_test"])
    return tuple(build_builtin_task(name, *sizes, tasks_cfg["image_size"], tasks_cfg["seed"]) for name in tasks_cfg["names"])


def _tasks(cfg: Mapping[str, Any]) -> list[Task]:
    return list(_generate(json.dumps(dict(cfg["tasks"]), sort_keys=True)))


def load_zoo(cfg: Mapping[str, Any]) -> Zoo:
    """The built-in zoo for the configured encoder, recipe and tasks: the missing pieces are trained first."""
    zoo, _ = get_builtin_zoo(cfg["encoder"], cfg["tasks"]["zoo"], _tasks(cfg), cfg["seed"], cfg["paths"]["cache_dir"])
    return zoo


def build_tasks(cfg: Mapping[str, Any], zoo: Zoo) -> list[Task]:
    """The built-in tasks named in the config, generated from its sizes and seed."""
    return _tasks(cfg)


def create_encoder(name: str, **kwargs: Any) -> nn.Module:
    """A built-in encoder of family `name` with random weights."""
    return ENCODERS[name](**kwargs)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A built-in encoder file (safetensors or a tensor-only `.pt`), e.g. a run's `merged_encoder.safetensors`."""
    return checkpoints.load_state_dict(path)
