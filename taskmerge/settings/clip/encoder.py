"""CLIP image encoders built with open_clip, in the layout of the task_vectors / TSV checkpoints.

The releases save open_clip 2.x `ImageEncoder` objects: keys `model.visual.X` plus six text leftovers
(`model.token_embedding.weight`, …) that fine-tuning never changes. `to_open_clip_keys` maps them to
open_clip 3.x names (`visual.X`, `token_embedding.weight`, …); merges keep the leftovers (global
methods such as TIES count them, `specs/merging.md` §1.1) and `ClipImageEncoder.encoder_weights` drops
them when the encoder is built. OpenAI CLIP uses QuickGELU, so `quick_gelu` defaults to True.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator, Mapping, Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

RELEASE_PREFIX = "model."
VISUAL_PREFIX = "visual."
TEXT_LEFTOVERS = frozenset(
    {"positional_embedding", "text_projection", "logit_scale", "token_embedding.weight", "ln_final.weight", "ln_final.bias"}
)
OPENAI_MEAN = open_clip.OPENAI_DATASET_MEAN
OPENAI_STD = open_clip.OPENAI_DATASET_STD


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init() -> Iterator[None]:
    """Mute open_clip's "initialized randomly" warning (random weights are wanted there)."""
    warning = _DropRandomInitWarning()
    logging.getLogger().addFilter(warning)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(warning)


def random_init_clip(model: str, quick_gelu: bool = True) -> nn.Module:
    """A whole open_clip CLIP (text tower included) with random weights, without open_clip's warning about it:
    the encoder loads checkpoint weights right after, benchmarks and tests want random ones."""
    image_size(model)
    with _quiet_random_init():
        return open_clip.create_model(model, pretrained=None, force_quick_gelu=quick_gelu, load_weights=False)


def to_open_clip_keys(state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Release keys (`model.visual.X`, `model.<text leftover>`) → open_clip 3.x keys; 3.x keys pass through.

    Anything else (a text transformer, an unknown prefix) is an error naming `source` and the keys.
    """
    out, unexpected = {}, []
    for key, value in state_dict.items():
        name = key[len(RELEASE_PREFIX):] if key.startswith(RELEASE_PREFIX) else key
        if name.startswith(VISUAL_PREFIX) or name in TEXT_LEFTOVERS:
            out[name] = value
        else:
            unexpected.append(key)
    if unexpected:
        raise ValueError(f"{source}: keys that are neither CLIP image-encoder weights (model.visual.*) nor the known "
                         f"text leftovers {sorted(TEXT_LEFTOVERS)}: {unexpected[:8]}{' …' if len(unexpected) > 8 else ''}")
    if not any(name.startswith(VISUAL_PREFIX) for name in out):
        raise ValueError(f"{source}: no CLIP image-encoder weights (expected keys model.visual.* or visual.*)")
    return out


class ClipImageEncoder(nn.Module):
    """open_clip's vision tower with the framework's feature contract; `pretrained=None`, weights come
    from the user's checkpoints."""

    def __init__(self, model: str = "ViT-B-32", quick_gelu: bool = True) -> None:
        super().__init__()
        self.visual = random_init_clip(model, quick_gelu).visual
        self.visual.output_tokens = True
        self.embed_dim = self.visual.output_dim
        self.patch_size = self.visual.patch_size[0]
        self.grid_size = tuple(self.visual.grid_size)

    def encoder_weights(self, state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> dict[str, torch.Tensor]:
        """The image-tower subset of a (merged) release state dict: text leftovers dropped, keys mapped."""
        return {k: v for k, v in to_open_clip_keys(state_dict, source).items() if k.startswith(VISUAL_PREFIX)}

    def canonical_weights(self) -> dict[str, torch.Tensor]:
        """These weights in a key space `encoder_weights` reads back (open_clip 3.x `visual.*` keys)."""
        return {key: value.detach().clone() for key, value in self.state_dict().items()}

    def features(self, images: torch.Tensor, kind: str = "pooled") -> torch.Tensor:
        """Image embedding `[B, E]` (`pooled`, = `encode_image`) or post-`ln_post` patch tokens `[B, N, W]` (`tokens`)."""
        pooled, tokens = self.visual(images)
        if kind == "pooled":
            return pooled
        if kind == "tokens":
            return tokens
        raise ValueError(f"feature kind must be 'pooled' or 'tokens', got {kind!r}")


def image_size(model: str) -> int:
    """Input resolution of an open_clip architecture, from its config (no weights built)."""
    config = open_clip.get_model_config(model)
    if config is None:
        raise ValueError(f"encoder.model={model!r} is not an open_clip architecture; e.g. ViT-B-32, ViT-B-16, ViT-L-14")
    size = config["vision_cfg"]["image_size"]
    return size if isinstance(size, int) else size[0]


def output_dim(model: str) -> int:
    """Size of the image embedding of an open_clip architecture, from its config."""
    image_size(model)
    return open_clip.get_model_config(model)["embed_dim"]


def preprocess(image_size: int = 224) -> nn.Module:
    """open_clip's validation transform (bicubic resize, centre crop, RGB, tensor, OpenAI mean/std)."""
    return open_clip.image_transform(image_size, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD)


class ClipClassificationHead(nn.Module):
    """The releases' frozen head: logits = normalize(image embedding) @ Wᵀ + b, W = logit scale × class embeddings."""

    feature_kind = "pooled"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, normalize: bool = True) -> None:
        super().__init__()
        self.normalize = normalize
        self.weight = nn.Parameter(weight.clone(), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(len(weight)) if bias is None else bias.clone(), requires_grad=False)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], source: str = "head") -> "ClipClassificationHead":
        """A head from its `weight` [C, E] (and optional `bias`); an error naming `source` otherwise."""
        if "weight" not in state_dict or state_dict["weight"].dim() != 2:
            raise ValueError(f"{source}: a classification head needs a 2-D 'weight' [classes, embed_dim]; "
                             f"found keys {sorted(state_dict)}")
        return cls(state_dict["weight"], state_dict.get("bias"))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits `[B, C]` of image embeddings `[B, E]`."""
        if self.normalize:
            features = F.normalize(features, dim=-1)
        return F.linear(features, self.weight, self.bias)


@torch.no_grad()
def zeroshot_weights(model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor], classnames: Sequence[str], templates: Sequence[str],
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Zero-shot head weights as the releases build them: per class, encode every template, L2-normalise,
    average, normalise again; scaled by `logit_scale.exp()`. Returns `[classes, embed_dim]`."""
    model = model.to(device).eval()
    rows = []
    for name in classnames:
        texts = tokenizer([template.format(name) for template in templates]).to(device)
        embeddings = F.normalize(model.encode_text(texts).float(), dim=-1).mean(0)
        rows.append(F.normalize(embeddings, dim=-1))
    return (torch.stack(rows) * model.logit_scale.exp().float()).cpu()


def pretrained_clip(model: str, path: str, quick_gelu: bool = True) -> tuple[nn.Module, Callable]:
    """The full open_clip CLIP (text tower included) from pretrained weights at `path`, and its tokenizer."""
    clip = open_clip.create_model(model, pretrained=path, force_quick_gelu=quick_gelu)
    return clip, open_clip.get_tokenizer(model)
