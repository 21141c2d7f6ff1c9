"""Config schemas of the dense setting: the DINOv2-architecture encoder (DUNE, DINOv2) and the dense task sets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from taskmerge.config_fields import checked, count
from taskmerge.merging._helpers import int_at_least, number_in, one_of, optional


@dataclass
class DenseEncoderConfig:
    """A DINOv2-architecture ViT/14 (timm) with the source's position-embedding rule; `native_size` is the pixel
    size its release's position grid was trained at (null: `image_size`)."""

    name: str = "dense"
    embed_dim: int = count(768)
    depth: int = count(12)
    num_heads: int = count(12)
    reg_tokens: int = count(4, low=0)
    image_size: int = checked(448, lambda v: isinstance(v, int) and v >= 14 and v % 14 == 0, "a multiple of 14 (pixels)")
    native_size: Optional[int] = checked(None, optional(int_at_least(14)), "null or a size in pixels")
    interpolation: str = checked("dinov2", one_of("dinov2", "dinov2_reg"), "'dinov2' (DUNE, DINOv2) or 'dinov2_reg'")


@dataclass
class DenseTasksConfig:
    """Dense tasks (ADE20k, NYUd with in-framework decoders; BEDLAM, MapFree through external commands), their
    data under `data_location`, and the release files of the base and of each fine-tuned encoder (relative paths
    are under `checkpoints`)."""

    name: str = "dune4"
    setting: str = "dense"
    encoder_family: str = "dense"
    names: list[str] = field(default_factory=lambda: ["ade20k", "nyud", "bedlam", "mapfree"])
    data_location: Optional[str] = "${paths.data}"
    checkpoints: Optional[str] = "${paths.checkpoints}"  # root of relative `base` / `finetuned` paths
    base: Optional[str] = None
    finetuned: dict[str, str] = field(default_factory=dict)
    external: dict[str, Any] = field(default_factory=dict)
    seg_classes: int = count(150, low=2)  # classes the ADE20k head predicts (150; the generated demo tree uses 6)
    val_fraction: float = checked(0.1, number_in(0, 1, low_open=True, high_open=True), "a number in (0, 1)")
    max_train_images: Optional[int] = checked(None, optional(int_at_least(2)), "null or an integer >= 2")
    max_eval_images: Optional[int] = checked(None, optional(int_at_least(1)), "null or an integer >= 1")
    num_workers: int = count(0, low=0)
    demo: bool = False


SCHEMAS = {("encoder", "dense_schema"): DenseEncoderConfig, ("tasks", "dense_schema"): DenseTasksConfig}
