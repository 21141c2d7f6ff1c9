"""Task-vector statistics (paper Fig. 6, 12–14): norms per layer and overall, cosine similarities
between task vectors and of each with their mean. Tensors only, computed key by key.

Everything comes from per-key squared norms and the T×T Gram matrix G = Σ_keys τ_k τ_kᵀ accumulated
in float64, so checkpoints can be streamed one key at a time and no flat T×d stack is built.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

_LAYER = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def natural_key(name: str) -> list:
    """Sort key that orders `blocks.2` before `blocks.10`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def layer_of(key: str) -> str:
    """The layer a parameter belongs to: the key up to its first numeric component
    (`blocks.3.attn.qkv.weight` → `blocks.3`), else its module (`visual.conv1.weight` → `visual.conv1`), so
    parameters held directly by a container (`visual.class_embedding`, `visual.proj`) stay apart."""
    match = _LAYER.match(key)
    return match.group(1) if match else re.sub(r"\.(weight|bias)$", "", key)


@dataclass(frozen=True)
class TaskVectorStats:
    """Norms and similarities of T task vectors."""

    tasks: list[str]
    layers: list[str]
    layer_norms: dict[str, dict[str, float]]
    norms: dict[str, float]
    cosine: list[list[float]]
    cosine_with_mean: dict[str, float]

    def to_dict(self) -> dict:
        return {"tasks": self.tasks, "layers": self.layers, "norms": self.norms, "layer_norms": self.layer_norms,
                "cosine": self.cosine, "cosine_with_mean": self.cosine_with_mean}


def task_vector_stats(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]],
                      tasks: Sequence[str]) -> TaskVectorStats:
    """Statistics of τ_t = θ_t − θ0 over the floating-point keys of `pretrained`, in key order."""
    if len(finetuned) != len(tasks):
        raise ValueError(f"{len(finetuned)} fine-tuned models but {len(tasks)} task names")
    count = len(tasks)
    gram = torch.zeros(count, count, dtype=torch.float64)
    squared: dict[str, torch.Tensor] = {}
    for key, base in pretrained.items():
        if not base.is_floating_point():
            continue
        taus = torch.stack([(model[key].double() - base.double()).flatten() for model in finetuned])
        gram += taus @ taus.T
        layer = layer_of(key)
        squared[layer] = squared.get(layer, torch.zeros(count, dtype=torch.float64)) + taus.pow(2).sum(1)
    norms = gram.diag().sqrt()
    outer = norms[:, None] * norms[None, :]
    cosine = torch.where(outer > 0, gram / outer.clamp_min(1e-300), torch.zeros_like(gram))
    mean_dot = gram.mean(1)
    mean_norm = gram.mean().clamp_min(0).sqrt()
    with_mean = torch.where(norms * mean_norm > 0, mean_dot / (norms * mean_norm).clamp_min(1e-300), torch.zeros_like(norms))
    return TaskVectorStats(
        tasks=list(tasks),
        layers=sorted(squared, key=natural_key),
        layer_norms={t: {layer: float(v[i].sqrt()) for layer, v in squared.items()} for i, t in enumerate(tasks)},
        norms={t: float(norms[i]) for i, t in enumerate(tasks)},
        cosine=cosine.tolist(),
        cosine_with_mean={t: float(with_mean[i]) for i, t in enumerate(tasks)},
    )
