"""Task-vector statistics (paper Fig. 6, 12–14; App. F): norms per layer and overall, cosine similarities
between task vectors and of each with their mean. Tensors only, streamed key by key.

Everything comes from per-layer squared norms and the T×T Gram matrix G = Σ_keys τ_k τ_kᵀ accumulated in
float64 over slices of at most `CHUNK` elements of each key, so the checkpoints can be lazy mappings
(`checkpoints.LazyStateDict`): the peak memory is one slice per model, never T full state dicts.

Layers come from the key structure alone, for any encoder family:
- a block is the key up to its first numeric component (`blocks.3.attn.qkv.weight` → `blocks.3`,
  `visual.transformer.resblocks.11.ln_1.weight` → `visual.transformer.resblocks.11`);
- the embedding parameters (a component naming an embedding or a token, a convolutional stem, a pre-norm:
  `patch_embed`, `cls_token`, `pos_embed`, `register_tokens`, `mask_token`, `class_embedding`, `conv1`,
  `ln_pre`) form one group `<scope>embeddings` per scope (`embeddings`, `visual.embeddings`);
- anything else is its module (`norm.weight` → `norm`, `visual.proj` → `visual.proj`).
Layers are ordered by depth: embedding groups, then the blocks by stack and number (`blocks.9` before
`blocks.10`), then the rest (final norm, heads, projections).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

EMBEDDINGS = "embeddings"
CHUNK = 1 << 20  # elements of one key read at a time per model
_EMBEDDING_PART = re.compile(r"embed|token|^conv1$|^stem$|^(?:ln|norm)_pre$|^pre_(?:ln|norm)$")
_BLOCK = re.compile(r"^(?:(.*)\.)?(\d+)$")
_PARAM_SUFFIX = re.compile(r"\.(weight|bias)$")
DATA_STATISTICS = ("running_mean", "running_var")  # BatchNorm buffers, left out of the statistics


def natural_key(name: str) -> list:
    """Sort key that orders `blocks.2` before `blocks.10`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def layer_of(key: str) -> str:
    """The layer group a parameter belongs to (see the module docstring): the first numeric component or
    embedding component of the key decides, scanning from the left."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
        if _EMBEDDING_PART.search(part):
            return ".".join([*parts[:i], EMBEDDINGS])
    return _PARAM_SUFFIX.sub("", key)


def block_of(layer: str) -> tuple[str, int] | None:
    """(stack, index) of a block layer (`visual.transformer.resblocks.3` → (`visual.transformer.resblocks`, 3)),
    None for the embeddings and the other layers."""
    match = _BLOCK.match(layer)
    return (match.group(1) or "", int(match.group(2))) if match else None


def is_embeddings(layer: str) -> bool:
    """Whether `layer` is an embedding group made by `layer_of`."""
    return layer.rsplit(".", 1)[-1] == EMBEDDINGS


def depth_order(layer: str) -> tuple:
    """Sort key of a layer by depth: embedding groups, then blocks by stack and number, then the rest."""
    block = block_of(layer)
    if block is not None:
        return 1, natural_key(block[0]), block[1], natural_key(layer)
    return (0 if is_embeddings(layer) else 2), [], 0, natural_key(layer)


@dataclass(frozen=True)
class TaskVectorStats:
    """Norms and similarities of T task vectors; `layers` and every per-layer mapping are in depth order,
    `blocks` are the numbered layers among them."""

    tasks: list[str]
    layers: list[str]
    layer_norms: dict[str, dict[str, float]]
    norms: dict[str, float]
    cosine: list[list[float]]
    cosine_with_mean: dict[str, float]
    blocks: list[str] = field(default_factory=list)

    @property
    def block_norms(self) -> dict[str, list[float]]:
        """Per task, the norm of its task vector in every block, in block order."""
        return {t: [self.layer_norms[t][b] for b in self.blocks] for t in self.tasks}

    def to_dict(self) -> dict:
        return {"tasks": self.tasks, "layers": self.layers, "blocks": self.blocks, "norms": self.norms,
                "block_norms": self.block_norms, "layer_norms": self.layer_norms, "cosine": self.cosine,
                "cosine_with_mean": self.cosine_with_mean}


def _shape_dtype(state: Mapping[str, torch.Tensor], key: str) -> tuple[tuple[int, ...], torch.dtype]:
    """Shape and dtype of `state[key]`, from the file header when `state` is lazy (nothing read)."""
    meta = getattr(state, "meta", None)
    if meta is not None:
        dtype, shape = meta(key)
        return tuple(shape), dtype
    tensor = state[key]
    return tuple(tensor.shape), tensor.dtype


def _flat_slice(state: Mapping[str, torch.Tensor], key: str, start: int, stop: int) -> torch.Tensor:
    """Elements [start, stop) of the flattened `state[key]` as float64, reading only them when `state` can."""
    read_flat = getattr(state, "read_flat", None)
    part = read_flat(key, start, stop) if read_flat is not None else state[key].reshape(-1)[start:stop]
    return part.double()


def task_vector_stats(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]],
                      tasks: Sequence[str], chunk: int = CHUNK) -> TaskVectorStats:
    """Statistics of τ_t = θ_t − θ0 over the floating-point keys of `pretrained` except BatchNorm running statistics
    (statistics of each task's data, not trained weights: they would dominate the norms); the mappings may be lazy
    (read slice by slice). A fine-tuned model missing a key or with another shape is an error naming both."""
    if len(finetuned) != len(tasks):
        raise ValueError(f"{len(finetuned)} fine-tuned models but {len(tasks)} task names")
    count = len(tasks)
    gram = torch.zeros(count, count, dtype=torch.float64)
    squared: dict[str, torch.Tensor] = {}
    for key in pretrained:
        shape, dtype = _shape_dtype(pretrained, key)
        if not dtype.is_floating_point or key.rsplit(".", 1)[-1] in DATA_STATISTICS:
            continue
        for task, model in zip(tasks, finetuned):
            if key not in model:
                raise ValueError(f"fine-tuned model of {task!r} has no {key!r}, which the base has")
            if _shape_dtype(model, key)[0] != shape:
                raise ValueError(f"{key!r}: shape {list(_shape_dtype(model, key)[0])} in the fine-tuned model of {task!r}, "
                                 f"{list(shape)} in the base")
        layer = layer_of(key)
        total = squared.setdefault(layer, torch.zeros(count, dtype=torch.float64))
        numel = 1
        for size in shape:
            numel *= size
        for start in range(0, numel, chunk):
            stop = min(start + chunk, numel)
            base = _flat_slice(pretrained, key, start, stop)
            taus = torch.stack([_flat_slice(model, key, start, stop) - base for model in finetuned])
            del base
            gram += taus @ taus.T
            total += taus.pow(2).sum(1)
            del taus
    norms = gram.diag().sqrt()
    outer = norms[:, None] * norms[None, :]
    cosine = torch.where(outer > 0, gram / outer.clamp_min(1e-300), torch.zeros_like(gram))
    mean_dot = gram.mean(1)
    mean_norm = gram.mean().clamp_min(0).sqrt()
    with_mean = torch.where(norms * mean_norm > 0, mean_dot / (norms * mean_norm).clamp_min(1e-300), torch.zeros_like(norms))
    layers = sorted(squared, key=depth_order)
    return TaskVectorStats(
        tasks=list(tasks),
        layers=layers,
        layer_norms={t: {layer: float(squared[layer][i].sqrt()) for layer in layers} for i, t in enumerate(tasks)},
        norms={t: float(norms[i]) for i, t in enumerate(tasks)},
        cosine=cosine.tolist(),
        cosine_with_mean={t: float(with_mean[i]) for i, t in enumerate(tasks)},
        blocks=[layer for layer in layers if block_of(layer) is not None],
    )
