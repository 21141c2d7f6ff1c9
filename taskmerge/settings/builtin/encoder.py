"""The built-in small ViT: timm's VisionTransformer with the framework's feature contract."""

from __future__ import annotations

from typing import Mapping

import torch
from timm.models.vision_transformer import VisionTransformer


class BuiltinViT(VisionTransformer):
    """A small ViT for the built-in benchmark; state-dict keys are timm's, so merging sees plain names."""

    def __init__(
        self,
        img_size: int = 32,
        patch_size: int = 4,
        embed_dim: int = 96,
        depth: int = 4,
        num_heads: int = 3,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            num_classes=0,
            global_pool="token",
        )
        self.patch_size = patch_size
        self.grid_size = tuple(self.patch_embed.grid_size)

    def encoder_weights(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every key of the state dict: the built-in checkpoints hold nothing but the encoder."""
        return dict(state_dict)

    def canonical_weights(self) -> dict[str, torch.Tensor]:
        """These weights in the zoo's key space (the inverse of `encoder_weights`): the state dict itself."""
        return {key: value.detach().clone() for key, value in self.state_dict().items()}

    def features(self, images: torch.Tensor, kind: str = "tokens") -> torch.Tensor:
        """Final-norm CLS embedding `[B, D]` (`pooled`) or patch tokens `[B, N, D]` (`tokens`)."""
        tokens = self.forward_features(images)
        if kind == "pooled":
            return tokens[:, 0]
        if kind == "tokens":
            return tokens[:, self.num_prefix_tokens :]
        raise ValueError(f"feature kind must be 'pooled' or 'tokens', got {kind!r}")
