"""Config schemas of the CLIP benchmark: the open_clip image encoder and the datasets + release of a task set."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Optional

from omegaconf import MISSING

from taskmerge.config_fields import checked, count
from taskmerge.merging._helpers import int_at_least, optional


@dataclass
class ClipEncoderConfig:
    """An open_clip CLIP image encoder (`pretrained=None`: weights come from the release checkpoints)."""

    name: str = "clip"
    model: str = "ViT-B-32"
    quick_gelu: bool = True


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


SCHEMAS = {("encoder", "clip_schema"): ClipEncoderConfig, ("tasks", "clip_schema"): ClipTasksConfig}
