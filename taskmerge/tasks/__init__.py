"""Tasks: a name, labelled splits, a decoder kind, a loss and a metric with its direction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from taskmerge.errors import UserError
from taskmerge.tasks.metrics import Metric

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    """In-memory images `[N, 3, S, S]` in [0, 1] and their targets."""

    images: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)

    def take(self, indices: torch.Tensor) -> torch.Tensor:
        """The images at `indices`, stacked."""
        return self.images[indices]

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, targets) in order, `batch_size` at a time."""
        for start in range(0, len(self), batch_size):
            yield self.images[start : start + batch_size], self.targets[start : start + batch_size]

    def identity(self) -> list[torch.Tensor]:
        """What a cache key must hash to tell this split's data apart: its bytes."""
        return [self.images, self.targets]

    def subset(self, indices: torch.Tensor) -> Split:
        """The samples at `indices`, as a split."""
        return Split(self.images[indices], self.targets[indices])


@dataclass(frozen=True)
class DatasetSplit:
    """A split read lazily from disk through a `Dataset` of (image tensor, label) items."""

    dataset: Dataset
    description: dict[str, Any]
    num_workers: int = 0
    collate: Callable[[list[Any]], Any] | None = field(default=None, repr=False)  # e.g. targets of varying sizes

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def take(self, indices: torch.Tensor) -> Any:
        """The inputs at `indices`, read and batched: by the split's `collate` where it has one (scans of varying
        sizes), else stacked."""
        items = [self.dataset[int(i)] for i in indices]
        if self.collate is not None:
            return self.collate(items)[0]
        return torch.stack([item[0] for item in items])

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, targets) in order through a DataLoader with `num_workers` reader processes."""
        loader = DataLoader(self.dataset, batch_size=batch_size, shuffle=False, num_workers=self.num_workers,
                            collate_fn=self.collate)
        for images, targets in loader:
            yield images, targets if isinstance(targets, list) else torch.as_tensor(targets)

    def identity(self) -> dict[str, Any]:
        """What a cache key hashes for on-disk data: dataset, split, location, size and preprocessing."""
        return {**self.description, "len": len(self)}

    def subset(self, indices: torch.Tensor) -> DatasetSplit:
        """The samples at `indices`, as a split read from the same dataset (its identity names them)."""
        chosen = [int(i) for i in indices]
        return DatasetSplit(Subset(self.dataset, chosen), {**self.description, "subset": chosen}, self.num_workers, self.collate)


@dataclass(frozen=True)
class Samples:
    """Some samples of a split, named by the split's identity and their indices: what cache keys hash (no bytes
    of the samples themselves are assumed), read in the split's own batching, so generic code never assumes a
    sample is an image."""

    split: Split | DatasetSplit
    indices: torch.Tensor

    def __len__(self) -> int:
        return len(self.indices)

    def identity(self) -> dict[str, Any]:
        """The split's identity and the indices taken from it."""
        return {"split": self.split.identity(), "indices": self.indices.tolist()}

    def batches(self, batch_size: int) -> Iterator[Any]:
        """The samples in order, `batch_size` at a time, as the split stacks them."""
        for start in range(0, len(self), batch_size):
            yield self.split.take(self.indices[start : start + batch_size])

    def take_all(self) -> Any:
        """Every sample, stacked."""
        return self.split.take(self.indices)

    @classmethod
    def of(cls, images: torch.Tensor) -> Samples:
        """All of an in-memory batch (tests, benchmarks)."""
        return cls(Split(images, torch.zeros(len(images))), torch.arange(len(images)))


@dataclass(frozen=True)
class ReferenceScorer:
    """A task's own way to score its fine-tuned encoder for normalization: `score(encoder, splits, protocol)` → metric
    per split; `identity` names what it depends on (e.g. the head file's fingerprint), for the references' cache key."""

    identity: str
    score: Callable[[nn.Module, tuple[str, ...], Any], dict[str, float]] = field(repr=False)


@dataclass
class Task:
    """One downstream task; `kind` picks the decoder (classification, segmentation or depth); `head` is the
    frozen head of settings that ship one (CLIP), evaluated without re-training; `evaluator` replaces the
    generic decoder re-training for tasks whose decoders the setting owns."""

    name: str
    kind: str
    num_outputs: int
    splits: dict[str, Split | DatasetSplit]
    metric_factory: Callable[[], Metric] = field(repr=False)
    head: nn.Module | None = field(default=None, repr=False)
    # a setting whose decoders are not the generic linear ones supplies its own Eval: (encoder, splits, protocol)
    # → metric per split (dense decoders on intermediate features, an external command)
    evaluator: Callable[[nn.Module, tuple[str, ...], Any], dict[str, float]] | None = field(default=None, repr=False)
    # how the task's fine-tuned encoder is scored as the normalization reference when not like a candidate (e.g. with
    # the release's own head, no re-training); None: like a candidate
    reference: ReferenceScorer | None = field(default=None, repr=False)

    @property
    def higher_is_better(self) -> bool:
        return self.metric_factory().higher_is_better

    @property
    def metric_name(self) -> str:
        return self.metric_factory().name

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Training loss of the task's decoder: cross-entropy, or L1 for depth."""
        if self.kind == "depth":
            return F.l1_loss(output[:, 0], target)
        return F.cross_entropy(output, target)

    def unlabeled(self, n: int, seed: int) -> Samples:
        """`n` training samples drawn without replacement with `seed` (TAP's unlabeled set), read on demand."""
        train = self.splits["train"]
        if n > len(train):
            raise UserError(f"task {self.name!r}: {n} unlabeled images asked for, it has {len(train)} training images "
                            f"(lower tap.n_samples or method.n_images)")
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
        return Samples(train, order[:n].sort().values)

    def unlabeled_images(self, n: int, seed: int) -> torch.Tensor:
        """The same `n` samples, read and stacked (AdaMerging draws its minibatches from them)."""
        return self.unlabeled(n, seed).take_all()
