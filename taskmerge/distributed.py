"""Several processes (GPUs) on one run, started by torchrun or by submitit with `tasks_per_node > 1`.

The work that scales with the number of tasks is split by task across ranks (decoder re-training for
Eval and the final metrics, the AdaMerging loss), the results are gathered on every rank, and rank 0
alone writes files and W&B. With one process everything here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Distributed:
    """This process's rank among `world_size` processes (0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Whether item `index` of a task-ordered list is this rank's work (round robin)."""
        return index % self.world_size == self.rank

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's items of `items` (round robin)."""
        return [item for index, item in enumerate(items) if self.owns(index)]

    def gather_dict(self, part: dict[str, Any]) -> dict[str, Any]:
        """The union of every rank's `part` (keys are disjoint across ranks), on every rank."""
        if self.world_size == 1:
            return part
        parts: list[dict[str, Any] | None] = [None] * self.world_size
        dist.all_gather_object(parts, part)
        return {key: value for piece in parts for key, value in (piece or {}).items()}

    def broadcast(self, value: T) -> T:
        """Rank 0's `value`, on every rank."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` over ranks, in place."""
        if self.world_size > 1:
            dist.all_reduce(tensor)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group once every rank is done (an undestroyed gloo group can abort at exit)."""
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def from_environment() -> Distributed:
    """Join the process group described by the environment: torchrun's `WORLD_SIZE`/`RANK`, or a submitit
    job with several tasks (whose environment is exported to the same variables first)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and "SUBMITIT_EXECUTOR" in os.environ:
        import submitit

        if submitit.JobEnvironment().num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size())
