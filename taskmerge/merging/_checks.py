"""Input validation shared by every merge method, with errors that name the key at fault."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from taskmerge.checkpoints import LazyStateDict, check_finite


def key_meta(state_dict: Mapping[str, torch.Tensor], key: str) -> tuple[torch.dtype, tuple[int, ...]]:
    """dtype and shape of one entry; read from the header for lazily loaded checkpoints."""
    if isinstance(state_dict, LazyStateDict):
        return state_dict.meta(key)
    tensor = state_dict[key]
    return tensor.dtype, tuple(tensor.shape)


def mergeable_keys(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys that are merged, in mapping order: floating-point tensors (integer and boolean buffers such as
    `num_batches_tracked` are copied from the pretrained model). Lazily loaded tensors are not read."""
    return [key for key in state_dict if key_meta(state_dict, key)[0].is_floating_point]


def _check_finite(state_dict: Mapping[str, torch.Tensor], keys: Sequence[str], where: str) -> None:
    """In-memory tensors are checked here, up front; a lazily loaded checkpoint checks each block as a method
    reads it (`LazyStateDict`), which spares a whole extra pass over the files."""
    if isinstance(state_dict, LazyStateDict):
        return
    for name in keys:
        check_finite(state_dict[name], name, where)


def validate_checkpoints(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]]) -> None:
    """Raise ValueError unless every fine-tuned model matches the pretrained keys, shapes and dtypes (read from the
    headers of lazily loaded files) and every floating-point tensor is finite (in-memory ones now, files as read)."""
    if len(finetuned) < 1:
        raise ValueError("merging needs at least one fine-tuned model, got none")
    floats = mergeable_keys(pretrained)
    _check_finite(pretrained, floats, "pretrained checkpoint")
    for index, model in enumerate(finetuned):
        missing = sorted(set(pretrained) - set(model))
        extra = sorted(set(model) - set(pretrained))
        if missing or extra:
            raise ValueError(
                f"fine-tuned model {index}: key set differs from the pretrained model "
                f"(missing {missing[:5]}{'…' if len(missing) > 5 else ''}, unexpected {extra[:5]}{'…' if len(extra) > 5 else ''})"
            )
        for name in pretrained:
            (dtype, shape), (base_dtype, base_shape) = key_meta(model, name), key_meta(pretrained, name)
            if shape != base_shape:
                raise ValueError(f"fine-tuned model {index}: {name!r} has shape {shape}, pretrained has {base_shape}")
            if dtype != base_dtype:
                raise ValueError(f"fine-tuned model {index}: {name!r} has dtype {dtype}, pretrained has {base_dtype}")
        _check_finite(model, floats, f"fine-tuned model {index}")
