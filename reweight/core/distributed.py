"""Data-parallel training on ``torch.distributed``, exact against one process.

What is global and what is local, for a world of W ranks and a global batch of B examples:

- **Training batch: sharded.** Every rank draws the same global batch (same seed) and keeps its
  contiguous B/W slice; only that slice is loaded.
- **Meta batch: replicated.** Every rank uses the same clean batch, so ∇θL_meta and everything
  derived from it are identical on every rank without communication.
- **Weights: normalised globally.** L2RW divides by Σ max(−g, 0) over the global batch (one
  all-reduce of a scalar); ERM and MW-Net's ``none`` use 1/B for the global B.
- **L2RW's ε-gradient: local, exactly.** At ε = 0 the virtual step is the identity, so
  ∂L_meta/∂εᵢ depends only on example i and the (replicated) meta gradient.
- **MW-Net's virtual step: global.** θ′ = θ − lr·Σ_global wᵢ∇θℓᵢ needs the global weighted
  gradient, summed by a differentiable all-reduce; the weighting net's gradients are summed
  across ranks, so its Adam step is identical everywhere.
- **Real update: gradients summed.** Each rank backpropagates Σ_local wᵢℓᵢ and the gradients are
  all-reduced (SUM, one flat buffer), which is exactly the single-process gradient of
  Σ_global wᵢℓᵢ. We do this instead of wrapping the model in DistributedDataParallel, whose
  reducer supports neither ``torch.autograd.grad``/double backward on the wrapped module nor a
  forward that happened outside it (ours is shared with the meta step).
- **BatchNorm: per rank.** Batch statistics are those of the local shard, and each rank keeps
  its own running statistics (rank 0's are saved and evaluated), unless the model uses
  ``nn.SyncBatchNorm`` for the real step; a virtual step always uses local batch statistics.
- **Outputs: rank 0.** Only rank 0 writes checkpoints and run outputs; every rank reads the
  checkpoint when resuming.
- **Stopping: together.** Each step ends with an all-reduce (MAX) of one int, the signal number
  a rank has received (SIGINT/SIGTERM; 0 for none), so a signal to any rank stops every rank
  after the same step; rank 0 writes the checkpoint and the others wait for it (a barrier)
  before raising ``TrainingInterrupted``. torchrun starts each worker in a session of its own
  (the terminal's Ctrl-C reaches only torchrun) and forwards SIGINT/SIGTERM to every worker,
  then kills those still running after ``--shutdown-timeout`` seconds (30).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["DistContext", "check_batch_split", "env_rank", "env_world_size", "init_from_env"]


@dataclass
class DistContext:
    """A process group and this process's place in it."""

    group: Any  # dist.ProcessGroup | None (None: the default group)
    rank: int
    world_size: int

    @classmethod
    def from_group(cls, group: Any = None) -> DistContext:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialised: call init_process_group "
                "first, or start with torchrun"
            )
        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    @classmethod
    def for_training(cls, group: Any = None) -> DistContext | None:
        """Data-parallel when given a process group, or when torch.distributed runs with W > 1;
        None for one process."""
        if group is None and not (dist.is_available() and dist.is_initialized()):
            return None
        ctx = cls.from_group(group)
        return ctx if ctx.world_size > 1 else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: Tensor, differentiable: bool = False) -> Tensor:
        """Σ over ranks. With ``differentiable``, backward sums the incoming gradients too."""
        if differentiable:
            import torch.distributed.nn.functional as dist_nn

            return dist_nn.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        out = tensor.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out

    def max_int(self, value: int, device: torch.device) -> int:
        """The max of a small integer over ranks: one int64 all-reduce (on ``device``, which
        must be a GPU for NCCL). The Trainer's stop request (a signal number, or 0) each step."""
        out = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self.group)
        return int(out.item())

    def all_gather_cat(self, tensor: Tensor) -> Tensor:
        """Concatenate equal-shaped tensors from every rank, in rank order."""
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts)

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """All-reduce (SUM) the ``.grad`` of ``params`` in one flat buffer."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def barrier(self) -> None:
        dist.barrier(group=self.group)


def env_world_size() -> int:
    """The number of processes torchrun started (``WORLD_SIZE``; 1 without torchrun).

    Read before the process group exists, so that a run can be refused on every rank alike
    (e.g. a batch that does not split) without joining the group first.
    """
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    """This process's global rank under torchrun (``RANK``; 0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


def init_from_env(backend: str | None = None) -> DistContext | None:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1), or return None.

    The backend defaults to NCCL when CUDA is available and gloo otherwise. Each rank uses
    the GPU of its ``LOCAL_RANK``.
    """
    world = env_world_size()
    if world <= 1:
        return None
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return DistContext.from_group(None)


def check_batch_split(batch_size: int, world_size: int) -> None:
    """Refuse a global batch that ``world_size`` processes cannot share equally.

    The CLI calls this before joining the process group (``reweight.cli.schema``), the Trainer
    again for a group it is given, so both say the same thing.
    """
    if batch_size % world_size:
        raise ValueError(
            f"trainer.batch_size ({batch_size}) must be divisible by the number of "
            f"processes ({world_size}): each takes an equal shard of every batch"
        )
