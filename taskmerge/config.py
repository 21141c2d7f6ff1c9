"""Typed schemas of every Hydra config group, registered in Hydra's ConfigStore.

Each YAML option under `taskmerge/configs/<group>/` extends its group's schema (`defaults:
[/<group>_<schema>@_here_, _self_]`), so a misspelled key, a wrong type or a value outside an enum fails at compose time, before
any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Callable, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from taskmerge.merging import HParam
from taskmerge.merging._helpers import int_at_least, number_in, one_of, optional
from taskmerge.method_schemas import METHOD_SCHEMAS


def checked(default: Any, check: Callable[[Any], bool], expected: str) -> Any:
    """A schema field with a range check, run on the composed config before any work
    (`taskmerge.validation`); `expected` words the error."""
    return field(default=default, metadata={"check": HParam(default, check, expected)})


def count(default: int, low: int = 1) -> Any:
    """An integer field that must be at least `low`."""
    return checked(default, int_at_least(low), f"an integer >= {low}")


def positive(default: float) -> Any:
    """A finite number field that must be > 0 (learning rates)."""
    return checked(default, number_in(0, float("inf"), low_open=True, high_open=True), "a finite number > 0")


def non_negative(default: float) -> Any:
    """A finite number field that must be >= 0 (weight decay)."""
    return checked(default, number_in(0, float("inf"), high_open=True), "a finite number >= 0")


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


@dataclass
class BuiltinViTConfig:
    """The built-in small ViT (timm VisionTransformer)."""

    name: str = "builtin_vit"
    img_size: int = count(32)
    patch_size: int = count(4)
    embed_dim: int = count(96)
    depth: int = count(4)
    num_heads: int = count(3)
    mlp_ratio: float = positive(2.0)


@dataclass
class ClipEncoderConfig:
    """An open_clip CLIP image encoder (`pretrained=None`: weights come from the release checkpoints)."""

    name: str = "clip"
    model: str = "ViT-B-32"
    quick_gelu: bool = True


@dataclass
class PretrainConfig:
    n_images: int = count(8000)
    epochs: int = count(5)
    lr: float = positive(1e-3)
    batch_size: int = count(128)


@dataclass
class FinetuneConfig:
    epochs: int = count(20)
    lr: float = positive(1e-3)
    batch_size: int = count(64)


@dataclass
class ZooRecipeConfig:
    """How the built-in zoo is trained: base pre-training, then end-to-end fine-tuning per task."""

    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


@dataclass
class BuiltinTasksConfig:
    """The built-in benchmark: generated/real images split into train/val/test per task."""

    name: str = "builtin"
    setting: str = "builtin"
    encoder_family: str = "builtin_vit"
    names: list[str] = field(default_factory=lambda: ["digits", "textures", "shapes", "scenes"])
    n_train: int = count(1200)
    n_val: int = count(300)
    n_test: int = count(600)
    image_size: int = "${encoder.img_size}"  # type: ignore[assignment]
    seed: int = 0
    zoo: ZooRecipeConfig = field(default_factory=ZooRecipeConfig)


class ReleaseFormat(StrEnum):
    A = "A"
    B = "B"


class HeadSource(StrEnum):
    release = "release"
    zeroshot = "zeroshot"


@dataclass
class ClipTasksConfig:
    """Datasets of the CLIP benchmark (task_vectors layout under `data_location`) and the release that holds
    their fine-tuned encoders and heads (`checkpoints`, format A or B)."""

    name: str = "clip8"
    setting: str = "clip"
    encoder_family: str = "clip"
    names: list[str] = MISSING
    data_location: Optional[str] = "${paths.data}"
    checkpoints: Optional[str] = "${paths.checkpoints}"
    format: ReleaseFormat = ReleaseFormat.B
    heads: HeadSource = HeadSource.release
    zeroshot_weights: Optional[str] = None
    max_eval_images: Optional[int] = checked(None, optional(int_at_least(1)), "null or an integer >= 1")
    num_workers: int = count(4, low=0)


@dataclass
class AverageConfig:
    name: str = "average"
    search: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class TASearch:
    alpha: list[float] = field(default_factory=lambda: [round(0.1 * i, 2) for i in range(1, 11)])


@dataclass
class TAConfig:
    """Task arithmetic; a fixed `alpha` runs one candidate, otherwise `search.alpha` is swept."""

    name: str = "ta"
    alpha: Optional[float] = None
    search: TASearch = field(default_factory=TASearch)


@dataclass
class AdaMergingMethodConfig:
    """AdaMerging: learn λ (per task, or per task and parameter tensor) with the TAP or entropy loss."""

    name: str = "adamerging"
    granularity: str = checked("layer", one_of("layer", "task"), "'layer' or 'task'")
    loss: str = checked("tap", one_of("tap", "entropy"), "'tap' or 'entropy'")
    iterations: int = count(500)
    lr: float = positive(1e-3)
    batch_size: int = count(16)
    init: Optional[float] = checked(None, optional(number_in(float("-inf"), float("inf"))), "null or a finite number")
    ema_momentum: float = checked(0.99, number_in(0, 1, high_open=True), "a number in [0, 1)")
    n_images: int = count(256)
    search: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class TAPConfig:
    n_samples: int = count(128)
    distance: Distance = Distance.l2
    features: FeatureKind = FeatureKind.pooled
    seed: int = 0
    batch_size: int = count(256)


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


@dataclass
class DecoderConfig:
    """Decoder re-training protocol on a frozen encoder (Eval and final numbers)."""

    name: str = "linear"
    epochs: int = count(30)
    lr: float = positive(3e-3)
    batch_size: int = count(128)
    weight_decay: float = non_negative(0.01)


@dataclass
class FrozenHeadDecoderConfig:
    """Eval with the setting's frozen heads (CLIP): no decoder training; `batch_size` of the forward passes."""

    name: str = "frozen_head"
    batch_size: int = count(256)


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


SCHEMAS: dict[tuple[Optional[str], str], Any] = {
    (None, "config_schema"): Config,
    ("encoder", "builtin_vit_schema"): BuiltinViTConfig,
    ("encoder", "clip_schema"): ClipEncoderConfig,
    ("tasks", "builtin_schema"): BuiltinTasksConfig,
    ("tasks", "clip_schema"): ClipTasksConfig,
    ("method", "average_schema"): AverageConfig,
    ("method", "ta_schema"): TAConfig,
    ("method", "adamerging_schema"): AdaMergingMethodConfig,
    ("selector", "selector_schema"): SelectorConfig,
    ("search", "grid_schema"): GridSearchConfig,
    ("search", "random_schema"): RandomSearchConfig,
    ("search", "optuna_schema"): OptunaSearchConfig,
    ("decoder", "decoder_schema"): DecoderConfig,
    ("decoder", "frozen_head_schema"): FrozenHeadDecoderConfig,
    ("logger", "logger_schema"): LoggerConfig,
    ("paths", "paths_schema"): PathsConfig,
    **METHOD_SCHEMAS,
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
