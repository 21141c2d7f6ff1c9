"""Settings: one benchmark family each, a folder holding its encoders, releases, data readers, tasks and
config schemas. The pipeline reaches a setting only through `get_setting(tasks.setting)` and builds encoders
only through `encoder_from_spec`; a setting's module is imported when a run needs it (open_clip only for
CLIP). Adding a setting adds a folder and one line to each table below.

A setting module (`taskmerge/settings/<name>/setting.py`) exports:
`check_inputs(cfg)` (cheap, before any work), `load_zoo(cfg) -> Zoo`, `build_tasks(cfg, zoo) -> list[Task]`,
`create_encoder(family, **kwargs) -> nn.Module`, `read_weights(path) -> state dict` (one encoder file in any layout
the setting reads, in the zoo's key space that the encoder's `encoder_weights` maps), `DECODER_HEADS` (task →
the decoder heads a protocol may choose through `decoder.head`, default first), and `MERGE_DEFAULTS` (merge hyperparameters the setting
supplies unless the user sets them, e.g. CLIP's `exclude`); optionally `post_merge(cfg, zoo, tasks)`, a rule applied to
every merged state dict (None: none), for what merging leaves undecided (LiDAR's BatchNorm statistics). Its schemas live in a light `schemas.py`
(`SCHEMAS`: (group, name) → dataclass) so composing a config imports no heavy dependency.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Mapping

from torch import nn

from taskmerge.errors import UserError

SETTINGS = {"builtin": "taskmerge.settings.builtin", "clip": "taskmerge.settings.clip", "dense": "taskmerge.settings.dense",
            "lidar": "taskmerge.settings.lidar"}
ENCODER_FAMILIES = {"builtin_vit": "builtin", "clip": "clip", "dense": "dense", "waffleiron": "lidar"}


def get_setting(name: str) -> ModuleType:
    """The setting module registered as `name` (imported on first use)."""
    if name not in SETTINGS:
        raise UserError(f"tasks.setting={name!r} is not a setting; available: {sorted(SETTINGS)}")
    return importlib.import_module(f"{SETTINGS[name]}.setting")


def schemas() -> dict[tuple[str | None, str], Any]:
    """Every setting's config schemas, for Hydra's ConfigStore."""
    out: dict[tuple[str | None, str], Any] = {}
    for package in SETTINGS.values():
        out.update(importlib.import_module(f"{package}.schemas").SCHEMAS)
    return out


def available_encoders() -> list[str]:
    """Encoder families accepted by `create_encoder`."""
    return sorted(ENCODER_FAMILIES)


def create_encoder(name: str, **kwargs: Any) -> nn.Module:
    """An encoder of family `name` (a config's `encoder.name`) with random weights, built by its setting."""
    if name not in ENCODER_FAMILIES:
        raise KeyError(f"unknown encoder {name!r}; available: {available_encoders()}")
    return get_setting(ENCODER_FAMILIES[name]).create_encoder(name, **kwargs)


def encoder_from_spec(spec: Mapping[str, Any]) -> nn.Module:
    """Build an encoder from a config mapping: its `name` plus the factory's keyword arguments."""
    kwargs = dict(spec)
    return create_encoder(kwargs.pop("name"), **kwargs)
