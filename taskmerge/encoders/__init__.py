"""Encoders: architectures with one feature contract, `features(images, kind)`, and a name registry.

`kind="pooled"` gives `[B, D]` (the image embedding); `kind="tokens"` gives `[B, N, D]` patch tokens
with CLS and register tokens already removed, so TAP and dense decoders never see prefix tokens.
`encoder_weights(state_dict)` picks what the module loads from a checkpoint's (or a merge's) state dict.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Mapping, Protocol

import torch
from torch import nn

from taskmerge.encoders.vit import BuiltinViT

FeatureKind = Literal["pooled", "tokens"]


class Encoder(Protocol):
    """What the rest of the framework may rely on from an encoder."""

    embed_dim: int
    patch_size: int
    grid_size: tuple[int, int]

    def features(self, images: torch.Tensor, kind: FeatureKind) -> torch.Tensor: ...

    def encoder_weights(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


def _clip(**kwargs: Any) -> nn.Module:
    """open_clip's CLIP image encoder; open_clip (2 s to import) is imported only when one is built."""
    from taskmerge.encoders.clip import ClipImageEncoder

    return ClipImageEncoder(**kwargs)


_FACTORIES: dict[str, Callable[..., nn.Module]] = {"builtin_vit": BuiltinViT, "clip": _clip}


def available() -> list[str]:
    """Names accepted by `create_encoder`."""
    return sorted(_FACTORIES)


def create_encoder(name: str, **kwargs: Any) -> nn.Module:
    """Build an encoder by registry name with randomly initialised weights."""
    if name not in _FACTORIES:
        raise KeyError(f"unknown encoder {name!r}; available: {available()}")
    return _FACTORIES[name](**kwargs)


def encoder_from_spec(spec: Mapping[str, Any]) -> nn.Module:
    """Build an encoder from a config mapping: its `name` plus the factory's keyword arguments."""
    kwargs = dict(spec)
    return create_encoder(kwargs.pop("name"), **kwargs)
