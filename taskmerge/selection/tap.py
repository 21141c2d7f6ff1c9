"""Task Alignment Proxy (specs/tap.md, Eq. 2): mean distance between a candidate encoder's features
and each fine-tuned (teacher) encoder's features on a few unlabeled images of that task.

TAP_t = mean_x d(f_θ(x), f_θt(x)); TAP = mean_t TAP_t. Lower is better. `d` is the Euclidean distance
(`l2`) or the cosine distance 1 − cos (`cosine`); on token features it is computed per patch token and
averaged over tokens (prefix tokens are excluded by the encoder contract). Teacher features are
computed once and cached on disk under a content hash of checkpoint, sample identities and feature spec, as a
checksummed cache entry (a damaged one is reported and recomputed); so is the TAP of the base encoder θ0 per
task, the scale that `tap.aggregate=relative_to_base` divides by.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from taskmerge import checkpoints
from taskmerge.cache import building, content_key, read_json_entry, read_tensors_entry, write_json_entry, write_tensors_entry
from taskmerge.encoders.extract import extract_batches
from taskmerge.tasks import Samples

DISTANCES = ("l2", "cosine")
TEACHER_CACHE_VERSION = 3  # 2: entries carry a checksum; 3: keyed by sample identity (split + indices)
BASE_TAP_CACHE_VERSION = 1


def dissimilarity(student: torch.Tensor, teacher: torch.Tensor, distance: str) -> torch.Tensor:
    """Per-sample dissimilarity `[B]` of `[B, D]` or `[B, N, D]` features (token distances averaged)."""
    if student.shape != teacher.shape:
        raise ValueError(f"student features {tuple(student.shape)} and teacher features {tuple(teacher.shape)} differ in shape")
    if distance == "l2":
        per_item = (student - teacher).norm(dim=-1)
    elif distance == "cosine":
        per_item = 1.0 - F.cosine_similarity(student, teacher, dim=-1)
    else:
        raise ValueError(f"unknown TAP distance {distance!r}; expected one of {DISTANCES}")
    return per_item.mean(dim=-1) if per_item.dim() == 2 else per_item


def tap_task(student_features: torch.Tensor, teacher_features: torch.Tensor, distance: str) -> float:
    """TAP_t: the mean per-sample dissimilarity."""
    return float(dissimilarity(student_features.double(), teacher_features.double(), distance).mean())


def teacher_features(
    load_encoder: Callable[[Path], nn.Module],
    checkpoint: Path,
    samples: Samples,
    kind: str,
    encoder_spec: Mapping,
    cache_dir: Path,
    batch_size: int = 256,
) -> torch.Tensor:
    """Features of the fine-tuned encoder at `checkpoint` on `samples`, read from or written to the cache.

    The key hashes the checkpoint's bytes, the samples' identity (their split's identity and indices), the
    feature kind and the encoder spec, so changing any of them computes fresh features; a cached file that
    fails its checksum is recomputed.
    """
    key = content_key("teacher", TEACHER_CACHE_VERSION, checkpoints.fingerprint(checkpoint), samples.identity(), kind,
                      dict(encoder_spec))
    path = Path(cache_dir) / "teacher" / f"{key[:32]}.safetensors"
    cached = read_tensors_entry(path)
    if cached is None:
        with building(path):  # ranks or jobs sharing the cache compute it once
            cached = read_tensors_entry(path)
            if cached is None:
                cached = {"features": extract_batches(load_encoder(checkpoint), samples.batches(batch_size), kind)}
                write_tensors_entry(path, cached)
    return cached["features"]


def compute_tap(
    student: nn.Module,
    unlabeled: Mapping[str, Samples],
    teachers: Mapping[str, torch.Tensor],
    kind: str,
    distance: str,
    batch_size: int = 256,
) -> dict[str, float]:
    """TAP per task and their mean (`"mean"`) for one candidate encoder: T student passes, no teacher pass."""
    scores = {
        name: tap_task(extract_batches(student, samples.batches(batch_size), kind), teachers[name], distance)
        for name, samples in unlabeled.items()
    }
    scores["mean"] = sum(scores.values()) / len(unlabeled)
    return scores


def base_tap(
    load_encoder: Callable[[Path], nn.Module],
    base: Path,
    finetuned: Mapping[str, Path],
    unlabeled: Mapping[str, Samples],
    kind: str,
    distance: str,
    encoder_spec: Mapping,
    cache_dir: Path,
    batch_size: int = 256,
) -> dict[str, float]:
    """TAP of the base encoder at `base` per task (and `mean`): how far θ0 is from each teacher, computed once.

    Cached like the teacher features, under a key of the base's and every teacher's checkpoint bytes, the
    samples' identities, the feature kind, the distance and the encoder spec.
    """
    key = content_key("base_tap", BASE_TAP_CACHE_VERSION, checkpoints.fingerprint(base),
                      {name: checkpoints.fingerprint(path) for name, path in finetuned.items()},
                      {name: samples.identity() for name, samples in unlabeled.items()}, kind, distance, dict(encoder_spec))
    path = Path(cache_dir) / "base_tap" / f"{key[:32]}.json"
    cached = read_json_entry(path)
    if cached is not None:
        return cached
    teachers = {name: teacher_features(load_encoder, finetuned[name], samples, kind, encoder_spec, cache_dir, batch_size)
                for name, samples in unlabeled.items()}
    scores = compute_tap(load_encoder(base), unlabeled, teachers, kind, distance, batch_size)
    write_json_entry(path, scores)
    return scores
