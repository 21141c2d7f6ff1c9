"""AdaMerging: learn the merge coefficients λ of θ = θ0 + Σ_t λ_t ⊙ τ_t by gradient descent.

`loss="tap"` (specs/tap.md, Appendix G) aligns the merged encoder with every fine-tuned encoder: cosine
dissimilarity per patch token (prefix tokens excluded by the encoder contract), averaged over tokens,
images and tasks, on features normalised by exponential moving averages of their statistics (one for
the student, one per teacher); λ starts at 1/T. It needs no labels and no heads, so it works for any
task set. `loss="entropy"` is the original AdaMerging: prediction entropy of frozen classification heads,
λ initialised to 0.3 and clamped to [0, 1]; only for task sets whose every task has such a head.

`granularity="task"` learns one λ per task; `"layer"` one per task and floating-point parameter tensor.
The merged encoder is a functional combination (`torch.func.functional_call`): one copy of the encoder's
graph, T task vectors held in memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from taskmerge.config_fields import checked, count, positive
from taskmerge.distributed import Distributed
from taskmerge.merging._helpers import number_in, one_of, optional
from taskmerge.merging._registry import finite_float


@dataclass(frozen=True)
class AdaMergingConfig:
    """What AdaMerging learns and how (also the source of the `method=adamerging` schema)."""

    granularity: str = checked("layer", one_of("layer", "task"), "'layer' or 'task'")
    loss: str = checked("tap", one_of("tap", "entropy"), "'tap' or 'entropy'")
    iterations: int = count(500)
    lr: float = positive(1e-3)
    batch_size: int = count(16)
    init: Optional[float] = checked(None, optional(finite_float), "null or a finite number")
    ema_momentum: float = checked(0.99, number_in(0, 1, high_open=True), "a number in [0, 1)")
    seed: int = 0


class EMANorm:
    """Per-dimension feature normalisation with exponential moving averages of mean and variance."""

    def __init__(self, momentum: float) -> None:
        self.momentum = momentum
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        flat = features.detach().reshape(-1, features.shape[-1])
        mean, var = flat.mean(0), flat.var(0, unbiased=False)
        if self.mean is None:
            self.mean, self.var = mean, var
        else:
            self.mean = self.momentum * self.mean + (1 - self.momentum) * mean
            self.var = self.momentum * self.var + (1 - self.momentum) * var
        return (features - self.mean) / (self.var + 1e-6).sqrt()


class _Features(nn.Module):
    """Wraps an encoder so that `forward` is its feature contract (what functional_call invokes)."""

    def __init__(self, encoder: nn.Module, kind: str) -> None:
        super().__init__()
        self.encoder, self.kind = encoder, kind

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.features(images, self.kind)


@dataclass
class AdaMergingResult:
    merged: dict[str, torch.Tensor]
    coefficients: torch.Tensor  # [K, T] (layer) or [1, T] (task), after clamping where it applies
    keys: list[str]
    losses: list[float]
    seconds: float
    peak_bytes: int


def _task_vector_stack(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]],
                       keys: Sequence[str]) -> list[torch.Tensor]:
    return [torch.stack([model[key] - pretrained[key] for model in finetuned]) for key in keys]


def learn(
    encoder: nn.Module,
    pretrained: Mapping[str, torch.Tensor],
    finetuned: Sequence[Mapping[str, torch.Tensor]],
    images: Sequence[torch.Tensor],
    config: AdaMergingConfig,
    teachers: Sequence[torch.Tensor] | None = None,
    heads: Sequence[nn.Module] | None = None,
    distributed: Distributed = Distributed(),
) -> AdaMergingResult:
    """Learn λ on `images[t]` (unlabeled, per task) and return the merged weights.

    For `loss="tap"`, `teachers[t]` holds the fine-tuned encoder's token features of `images[t]`; for
    `loss="entropy"`, `heads[t]` is task t's frozen classification head on pooled features. With several
    processes each rank computes the loss of its share of the tasks and the gradients of λ are summed, so
    every rank takes the same steps; batches are drawn from one seeded stream on every rank.
    """
    if config.granularity not in ("task", "layer"):
        raise ValueError(f"adamerging granularity must be 'task' or 'layer', got {config.granularity!r}")
    if config.loss not in ("tap", "entropy"):
        raise ValueError(f"adamerging loss must be 'tap' or 'entropy', got {config.loss!r}")
    num_tasks = len(finetuned)
    device = next(encoder.parameters()).device  # everything below lives where the encoder does
    keys = [k for k, v in pretrained.items() if v.is_floating_point()]
    taus = [tau.to(device) for tau in _task_vector_stack(pretrained, finetuned, keys)]
    base = [pretrained[k].to(device) for k in keys]
    fixed = {k: v.to(device) for k, v in pretrained.items() if not v.is_floating_point()}
    teachers = [t.to(device) for t in teachers] if teachers is not None else None
    heads = [h.to(device) for h in heads] if heads is not None else None
    init = config.init if config.init is not None else (1.0 / num_tasks if config.loss == "tap" else 0.3)
    rows = len(keys) if config.granularity == "layer" else 1
    raw = torch.full((rows, num_tasks), float(init), device=device, requires_grad=True)
    optimizer = torch.optim.Adam([raw], lr=config.lr)
    clamp = config.loss == "entropy"
    kind = "tokens" if config.loss == "tap" else "pooled"
    model = _Features(encoder, kind).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    student_norm = EMANorm(config.ema_momentum)
    teacher_norms = [EMANorm(config.ema_momentum) for _ in range(num_tasks)]
    generator = torch.Generator().manual_seed(config.seed)

    buffers = {name for name, _ in encoder.named_buffers()}  # BatchNorm statistics: merged with λ, no gradient through them

    def merged_params(lam: torch.Tensor) -> dict[str, torch.Tensor]:
        params = {}
        for index, (key, theta0, tau) in enumerate(zip(keys, base, taus)):
            weights = lam[index if rows > 1 else 0].view(-1, *([1] * theta0.dim()))
            merged = theta0 + (weights * tau).sum(0)
            params[f"encoder.{key}"] = merged.detach() if key in buffers else merged
        params.update({f"encoder.{k}": v for k, v in fixed.items()})
        return params

    def coefficients() -> torch.Tensor:
        return raw.clamp(0.0, 1.0) if clamp else raw

    start, losses = time.perf_counter(), []
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for _ in tqdm(range(config.iterations), desc=f"adamerging ({config.granularity}, {config.loss})", leave=False):
        params = merged_params(coefficients())
        total = torch.zeros((), device=device)
        for t in range(num_tasks):
            index = torch.randint(len(images[t]), (config.batch_size,), generator=generator)
            if not distributed.owns(t):
                continue
            outputs = functional_call(model, params, (images[t][index].to(device),), strict=False)
            if config.loss == "tap":
                student = student_norm(outputs)
                teacher = teacher_norms[t](teachers[t][index.to(device)])
                total = total + (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()
            else:
                probs = heads[t](outputs).softmax(-1)
                total = total - (probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
        loss = total / num_tasks
        if not torch.isfinite(loss):
            raise FloatingPointError(f"adamerging loss became {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
        if raw.grad is None:
            raw.grad = torch.zeros_like(raw)
        distributed.all_reduce_sum_(raw.grad)
        optimizer.step()
        value = loss.detach().clone()
        distributed.all_reduce_sum_(value)
        losses.append(value.item())
    with torch.no_grad():
        lam = coefficients().detach().cpu()
        merged = {key: value.detach().cpu() for key, value in merged_params(lam.to(device)).items()}
    merged = {key.removeprefix("encoder."): value for key, value in merged.items()}
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    return AdaMergingResult(merged={k: merged[k] for k in pretrained}, coefficients=lam, keys=keys, losses=losses,
                            seconds=time.perf_counter() - start, peak_bytes=peak)


def frozen_heads_or_error(tasks: Sequence[str], kinds: Sequence[str], load_head: Callable[[str], nn.Module]) -> list[nn.Module]:
    """The frozen classification heads entropy AdaMerging needs; a clear error naming the tasks that have none."""
    missing = [t for t, k in zip(tasks, kinds) if k != "classification"]
    if missing:
        raise ValueError(f"adamerging loss=entropy needs a frozen classification head for every task; "
                         f"{missing} have none (use loss=tap, which works for any task)")
    heads = [load_head(t) for t in tasks]
    for head in heads:
        head.eval().requires_grad_(False)
    return heads
