"""Typed schemas of every Hydra config group, registered in Hydra's ConfigStore.

Each YAML option under `taskmerge/configs/<group>/` extends its group's schema (`defaults:
[/<group>_<schema>@_here_, _self_]`), so a misspelled key, a wrong type or a value outside an enum fails at compose time, before
any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from taskmerge.config_fields import checked, count, schema_from
from taskmerge.selection.adamerging import AdaMergingConfig
from taskmerge.selection.aggregate import AGGREGATES, MEAN
from taskmerge.selection.evaluation import DecoderProtocol
from taskmerge.merging._helpers import int_at_least, one_of, optional
from taskmerge import settings
from taskmerge.method_schemas import METHOD_SCHEMAS


class Distance(StrEnum):
    l2 = "l2"
    cosine = "cosine"


class FeatureKind(StrEnum):
    tokens = "tokens"
    pooled = "pooled"


class SelectorName(StrEnum):
    tap = "tap"
    eval = "eval"
    both = "both"
    frozen_decoder = "frozen_decoder"


# AdaMerging's schema: its `AdaMergingConfig` (the run supplies `seed`), plus the unlabeled images per task.
AdaMergingMethodConfig = schema_from(AdaMergingConfig, "adamerging", drop=("seed",), extra=[
    ("n_images", int, count(256)), ("search", dict[str, list[float]], field(default_factory=dict))])


@dataclass
class TAPConfig:
    n_samples: int = count(128)
    distance: Distance = Distance.l2
    features: FeatureKind = FeatureKind.pooled
    seed: int = 0
    batch_size: int = count(256)
    # how per-task TAP becomes one score (taskmerge/selection/aggregate.py); a task set may choose its own default
    aggregate: str = checked(MEAN, one_of(*AGGREGATES), "one of " + ", ".join(map(repr, AGGREGATES)))


@dataclass
class SelectorConfig:
    name: SelectorName = SelectorName.tap


@dataclass
class GridSearchConfig:
    name: str = "grid"


@dataclass
class RandomSearchConfig:
    """`n_trials` candidates of the grid, drawn without replacement."""

    name: str = "random"
    n_trials: int = count(8)
    seed: int = "${seed}"  # type: ignore[assignment]


@dataclass
class OptunaSearchConfig:
    """Optuna TPE over the search lists; the study persists in `optuna.db` of the run directory."""

    name: str = "optuna"
    n_trials: int = count(12)
    seed: int = "${seed}"  # type: ignore[assignment]
    study_name: Optional[str] = None


# Decoder re-training's schema: `DecoderProtocol` (the run supplies `seed`).
DecoderConfig = schema_from(DecoderProtocol, "linear", drop=("seed",))


@dataclass
class FrozenHeadDecoderConfig:
    """Eval with the setting's frozen heads (CLIP): no decoder training; `batch_size` of the forward passes."""

    name: str = "frozen_head"
    batch_size: int = count(256)


@dataclass
class AutoMethodConfig:
    """`method=auto`: the default grid of every method in `candidates` scored in one run, selected across them."""

    name: str = "auto"
    candidates: list[str] = field(default_factory=lambda: ["ta", "ties", "tsv", "iso_c"])


@dataclass
class LoggerConfig:
    name: str = "wandb"
    mode: str = checked("offline", one_of("offline", "online", "disabled"), "'offline', 'online' or 'disabled'")
    project: str = "taskmerge"
    entity: Optional[str] = None
    group: Optional[str] = None


@dataclass
class PathsConfig:
    cache_dir: str = "${oc.env:TASKMERGE_CACHE_DIR,${oc.env:HOME,.}/.cache/taskmerge}"
    data: Optional[str] = "${oc.env:TASKMERGE_DATA_DIR,null}"
    checkpoints: Optional[str] = "${oc.env:TASKMERGE_CHECKPOINTS_DIR,null}"


@dataclass
class Config:
    """Top-level config; `device: auto` picks CUDA when available."""

    encoder: Any = MISSING
    tasks: Any = MISSING
    method: Any = MISSING
    selector: Any = MISSING
    search: Any = MISSING
    decoder: Any = MISSING
    logger: Any = MISSING
    paths: Any = MISSING
    tap: TAPConfig = field(default_factory=TAPConfig)
    seed: int = 0
    device: str = "auto"
    save_merged: bool = False
    sweep_name: Optional[str] = None
    threads: Optional[int] = checked(None, optional(int_at_least(1)), "null (this run's share of the cores) or an integer >= 1")


SCHEMAS: dict[tuple[Optional[str], str], Any] = {
    (None, "config_schema"): Config,
    ("method", "adamerging_schema"): AdaMergingMethodConfig,
    ("method", "auto_schema"): AutoMethodConfig,
    ("selector", "selector_schema"): SelectorConfig,
    ("search", "grid_schema"): GridSearchConfig,
    ("search", "random_schema"): RandomSearchConfig,
    ("search", "optuna_schema"): OptunaSearchConfig,
    ("decoder", "decoder_schema"): DecoderConfig,
    ("decoder", "frozen_head_schema"): FrozenHeadDecoderConfig,
    ("logger", "logger_schema"): LoggerConfig,
    ("paths", "paths_schema"): PathsConfig,
    **METHOD_SCHEMAS,
    **settings.schemas(),
}


def schema_name(group: Optional[str], name: str) -> str:
    """The root-level ConfigStore name of a group's schema (`method_ta_schema`): kept out of the groups, so a
    schema is not selectable as an option (`method=ta_schema`) nor listed by `--help`."""
    return f"{group}_{name}" if group else name


def register_configs() -> None:
    """Store every schema in Hydra's ConfigStore at the root (idempotent); options extend it through
    `defaults: [/<group>_<schema>@_here_, _self_]`."""
    store = ConfigStore.instance()
    for (group, name), node in SCHEMAS.items():
        store.store(name=schema_name(group, name), node=node)


def to_plain(cfg: DictConfig) -> dict:
    """The resolved config as plain Python values (enums as strings), unchecked (`validation.resolve` checks)."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]
