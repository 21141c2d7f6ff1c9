"""Config schemas of the built-in benchmark: its ViT and its tasks (sizes, data seed, zoo recipe)."""

from __future__ import annotations

from dataclasses import dataclass, field

from taskmerge.config_fields import count, positive


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


SCHEMAS = {("encoder", "builtin_vit_schema"): BuiltinViTConfig, ("tasks", "builtin_schema"): BuiltinTasksConfig}
