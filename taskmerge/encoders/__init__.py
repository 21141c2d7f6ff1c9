"""Encoders: the one feature contract, `features(images, kind)`, every setting's encoders follow (they are
built by name through `taskmerge.settings.encoder_from_spec`).

`kind="pooled"` gives `[B, D]` (the image embedding); `kind="tokens"` gives `[B, N, D]` patch tokens
with CLS and register tokens already removed, so TAP and dense decoders never see prefix tokens.
`encoder_weights(state_dict)` picks what the module loads from a checkpoint's (or a merge's) state dict.
"""

from __future__ import annotations

from typing import Literal, Mapping, Protocol

import torch

FeatureKind = Literal["pooled", "tokens"]


class Encoder(Protocol):
    """What the rest of the framework may rely on from an encoder."""

    embed_dim: int
    patch_size: int
    grid_size: tuple[int, int]

    def features(self, images: torch.Tensor, kind: FeatureKind) -> torch.Tensor: ...

    def encoder_weights(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...
