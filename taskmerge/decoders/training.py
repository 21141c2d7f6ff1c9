"""One minibatch training loop (AdamW, cosine schedule, seeded shuffling) for decoders and fine-tuning."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from taskmerge import threads


def warmup_cosine(step: int, total_steps: int, warmup: float, floor: float = 0.0) -> float:
    """Learning-rate factor: linear warm-up over the first `warmup` fraction of steps, then cosine down to `floor`
    (0 here; ScaLR's probes end at 1e-5 / 1e-3)."""
    warmup_steps = int(warmup * total_steps)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def train_module(
    module: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    weight_decay: float = 0.05,
    warmup: float = 0.1,
    desc: str | None = None,
    floor: float = 0.0,
) -> list[float]:
    """Train `module` on `(inputs, targets)`; returns the mean loss of every epoch.

    Raises FloatingPointError as soon as the loss is not finite, so a diverging run fails loudly
    instead of producing a silently broken model.
    """
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total_steps = max(epochs * math.ceil(len(inputs) / batch_size), 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, total_steps, warmup, floor))
    module.train()
    history = []
    for _ in tqdm(range(epochs), desc=desc, disable=desc is None, leave=False):
        threads.rebalance()  # long trainings (the zoo) follow other runs starting or ending on this machine
        order = torch.randperm(len(inputs), generator=generator)
        total = 0.0
        for start in range(0, len(inputs), batch_size):
            index = order[start : start + batch_size]
            loss = loss_fn(module(inputs[index]), targets[index])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()} ({desc or 'decoder'})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(index)
        history.append(total / len(inputs))
    module.eval()
    return history


@torch.no_grad()
def predict(module: nn.Module, inputs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Outputs of `module` on `inputs`, batched, in eval mode, on the module's device; returned on the CPU."""
    module.eval()
    device = next(module.parameters()).device
    return torch.cat([module(inputs[i : i + batch_size].to(device)).cpu() for i in range(0, len(inputs), batch_size)])


class PairedBatches:
    """Training data read per step: `read(index) -> (inputs, targets)` for a tensor of sample indices, offered as
    the two indexable sides `train_module` asks for (`inputs[index]`, then `targets[index]`), read once per batch.
    For data that does not fit in memory as one tensor (features per step, scans of varying sizes)."""

    def __init__(self, read: Callable[[torch.Tensor], tuple[Any, Any]], length: int) -> None:
        self.read, self.length = read, length
        self._last: tuple[torch.Tensor, Any, Any] | None = None

    def __len__(self) -> int:
        return self.length

    def _side(self, index: torch.Tensor, side: int) -> Any:
        if self._last is None or not torch.equal(self._last[0], index):
            self._last = (index.clone(), *self.read(index))
        return self._last[1 + side]

    @property
    def inputs(self) -> _Side:
        return _Side(self, 0)

    @property
    def targets(self) -> _Side:
        return _Side(self, 1)


class _Side:
    """One side (inputs or targets) of `PairedBatches`, indexable like a tensor."""

    def __init__(self, source: PairedBatches, side: int) -> None:
        self.source, self.side = source, side

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: torch.Tensor) -> Any:
        return self.source._side(index, self.side)
