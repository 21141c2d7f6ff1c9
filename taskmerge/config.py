"""Typed schemas of every Hydra config group, registered in Hydra's ConfigStore.

Each YAML option under `taskmerge/configs/<group>/` extends its group's schema (`defaults: [<schema>,
_self_]`), so a misspelled key, a wrong type or a value outside an enum fails at compose time, before
any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from taskmerge.method_schemas import METHOD_SCHEMAS


class Distance(str, Enum):
    l2 = "l2"
    cosine = "cosine"


class FeatureKind(str, Enum):
    tokens = "tokens"
    pooled = "pooled"


class SelectorName(str, Enum):
    tap = "tap"
    eval = "eval"
    both = "both"
    frozen_decoder = "frozen_decoder"


@dataclass
class BuiltinViTConfig:
    """The built-in small ViT (timm VisionTransformer)."""

    name: str = "builtin_vit"
    img_size: int = 32
    patch_size: int = 4
    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 3
    mlp_ratio: float = 2.0


@dataclass
class ClipEncoderConfig:
    """An open_clip CLIP image encoder (`pretrained=None`: weights come from the release checkpoints)."""

    name: str = "clip"
    model: str = "ViT-B-32"
    quick_gelu: bool = True


@dataclass
class PretrainConfig:
    n_images: int = 8000
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 128


@dataclass
class FinetuneConfig:
    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 64


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
    names: list[str] = field(default_factory=lambda: ["digits", "textures", "shapes", "scenes"])
    n_train: int = 1200
    n_val: int = 300
    n_test: int = 600
    image_size: int = "${encoder.img_size}"  # type: ignore[assignment]
    seed: int = 0
    zoo: ZooRecipeConfig = field(default_factory=ZooRecipeConfig)


class ReleaseFormat(str, Enum):
    A = "A"
    B = "B"


class HeadSource(str, Enum):
    release = "release"
    zeroshot = "zeroshot"


@dataclass
class ClipTasksConfig:
    """Datasets of the CLIP benchmark (task_vectors layout under `data_location`) and the release that holds
    their fine-tuned encoders and heads (`checkpoints`, format A or B)."""

    name: str = "clip8"
    setting: str = "clip"
    names: list[str] = MISSING
    data_location: Optional[str] = "${paths.data}"
    checkpoints: Optional[str] = "${paths.checkpoints}"
    format: ReleaseFormat = ReleaseFormat.B
    heads: HeadSource = HeadSource.release
    zeroshot_weights: Optional[str] = None
    max_eval_images: Optional[int] = None
    num_workers: int = 4


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
    granularity: str = "layer"
    loss: str = "tap"
    iterations: int = 500
    lr: float = 1e-3
    batch_size: int = 16
    init: Optional[float] = None
    ema_momentum: float = 0.99
    n_images: int = 256
    search: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class TAPConfig:
    n_samples: int = 128
    distance: Distance = Distance.l2
    features: FeatureKind = FeatureKind.pooled
    seed: int = 0
    batch_size: int = 256


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
    n_trials: int = 8
    seed: int = "${seed}"  # type: ignore[assignment]


@dataclass
class OptunaSearchConfig:
    """Optuna TPE over the search lists; the study persists in `optuna.db` of the run directory."""

    name: str = "optuna"
    n_trials: int = 12
    seed: int = "${seed}"  # type: ignore[assignment]
    study_name: Optional[str] = None


@dataclass
class DecoderConfig:
    """Decoder re-training protocol on a frozen encoder (Eval and final numbers)."""

    name: str = "linear"
    epochs: int = 30
    lr: float = 3e-3
    batch_size: int = 128
    weight_decay: float = 0.01


@dataclass
class FrozenHeadDecoderConfig:
    """Eval with the setting's frozen heads (CLIP): no decoder training; `batch_size` of the forward passes."""

    name: str = "frozen_head"
    batch_size: int = 256


@dataclass
class LoggerConfig:
    name: str = "wandb"
    mode: str = "offline"
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


def register_configs() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent)."""
    store = ConfigStore.instance()
    for (group, name), node in SCHEMAS.items():
        store.store(group=group, name=name, node=node)
