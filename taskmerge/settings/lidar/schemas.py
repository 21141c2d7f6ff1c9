"""Config schemas of the LiDAR setting: the WaffleIron encoder and the LiDAR task sets (real data, built-in)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from taskmerge.config_fields import checked, count, positive
from taskmerge.merging._helpers import int_at_least, number_in, one_of, optional


@dataclass
class WaffleIronEncoderConfig:
    """A WaffleIron backbone: one of the named configurations (`waffleiron_768`: WI-48-768 as ScaLR pretrains it;
    `waffleiron_tiny`: the CPU-sized one) with `activation` and any architecture field replaced where not null."""

    name: str = "waffleiron"
    config: str = checked("waffleiron_768", one_of("waffleiron_768", "waffleiron_tiny"), "'waffleiron_768' or 'waffleiron_tiny'")
    activation: str = checked("relu", one_of("relu", "gelu"), "'relu' (ScaLR v0.1.0) or 'gelu' (ScaLR+ checkpoints)")
    channels: Optional[int] = checked(None, optional(int_at_least(1)), "null or a positive integer")
    depth: Optional[int] = checked(None, optional(int_at_least(1)), "null or a positive integer")
    neighbors: Optional[int] = checked(None, optional(int_at_least(1)), "null or a positive integer")
    grids: Optional[list[list[int]]] = None  # one [H, W] per projection
    fov: Optional[list[list[float]]] = None  # [[x, y, z] min, [x, y, z] max] in metres


@dataclass
class SyntheticRecipeConfig:
    """How `tasks=lidar_builtin` generates its data and trains its zoo (see `settings/lidar/builtin.py`)."""

    train_scans: int = count(48)
    val_scans: int = count(16)  # the readers' val split: the test split here (val is held out of train)
    pretrain_epochs: int = count(6)
    finetune_epochs: int = count(20)
    lr: float = positive(3e-3)
    batch_size: int = count(4)


@dataclass
class LidarTasksConfig:
    """LiDAR segmentation tasks (nuScenes, SemanticKITTI, Panda64, PandaGT) under `data_location` in the real
    layouts, the ScaLR release files of the base and of each fine-tuned encoder (relative paths under `checkpoints`),
    and TAP's probe points per scan. `builtin: true` generates both (the built-in LiDAR benchmark)."""

    name: str = "lidar4"
    setting: str = "lidar"
    encoder_family: str = "waffleiron"
    names: list[str] = field(default_factory=lambda: ["nuscenes", "semantic_kitti", "panda64", "pandagt"])
    data_location: Optional[str] = "${paths.data}"
    checkpoints: Optional[str] = "${paths.checkpoints}"
    base: Optional[str] = None
    finetuned: dict[str, str] = field(default_factory=dict)
    # task -> preprocessing overrides of the encoder's {grids, fov} (ScaLR enlarges PandaSet's extent)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    probe_points: int = count(2048)  # TAP: tokens per scan compared with the teacher's (a fixed, seeded subset)
    bn_stats: str = checked("merge", one_of("merge", "keep_base", "recalibrate"),
                            "'merge' (like weights, variance clamped at 0), 'keep_base' or 'recalibrate' (on TAP's scans)")
    # normalization reference: the fine-tuned encoders with the same re-trained probe, or with their releases' own heads
    reference: str = checked("probe", one_of("probe", "own_head"),
                             "'probe' (the same linear probe, re-trained) or 'own_head' (each fine-tuned release's head)")
    val_fraction: float = checked(0.1, number_in(0, 1, low_open=True, high_open=True), "a number in (0, 1)")
    max_train_scans: Optional[int] = checked(None, optional(int_at_least(2)), "null or an integer >= 2")
    max_eval_scans: Optional[int] = checked(None, optional(int_at_least(1)), "null or an integer >= 1")
    num_workers: int = count(0, low=0)
    builtin: bool = False
    synthetic: SyntheticRecipeConfig = field(default_factory=SyntheticRecipeConfig)


SCHEMAS = {("encoder", "waffleiron_schema"): WaffleIronEncoderConfig, ("tasks", "lidar_schema"): LidarTasksConfig}
