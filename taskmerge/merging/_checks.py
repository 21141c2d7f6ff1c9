"""Input validation shared by every merge method, with errors that name the key at fault."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch


def is_mergeable(tensor: torch.Tensor) -> bool:
    """Floating-point tensors are merged; integer and boolean buffers are copied from the base."""
    return tensor.is_floating_point()


def validate_checkpoints(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]]) -> None:
    """Raise ValueError unless every fine-tuned model matches the pretrained keys, shapes and dtypes and
    every floating-point tensor is finite."""
    if len(finetuned) < 1:
        raise ValueError("merging needs at least one fine-tuned model, got none")
    for name, tensor in pretrained.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"pretrained checkpoint: tensor {name!r} contains NaN or Inf")
    for index, model in enumerate(finetuned):
        missing = sorted(set(pretrained) - set(model))
        extra = sorted(set(model) - set(pretrained))
        if missing or extra:
            raise ValueError(
                f"fine-tuned model {index}: key set differs from the pretrained model "
                f"(missing {missing[:5]}{'…' if len(missing) > 5 else ''}, unexpected {extra[:5]}{'…' if len(extra) > 5 else ''})"
            )
        for name, base in pretrained.items():
            tensor = model[name]
            if tensor.shape != base.shape:
                raise ValueError(f"fine-tuned model {index}: {name!r} has shape {tuple(tensor.shape)}, pretrained has {tuple(base.shape)}")
            if tensor.dtype != base.dtype:
                raise ValueError(f"fine-tuned model {index}: {name!r} has dtype {tensor.dtype}, pretrained has {base.dtype}")
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ValueError(f"fine-tuned model {index}: tensor {name!r} contains NaN or Inf")
