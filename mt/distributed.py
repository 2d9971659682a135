"""torch.distributed for `torchrun`: process groups, rank-0 duties and cross-rank agreement.

`mt train` started by torchrun (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...)
trains with DistributedDataParallel; started plainly, it is a world of one and nothing here
talks to the network. The model file knows nothing of this module.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mt.device import resolve_device
from mt.errors import MtError


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: dist.ProcessGroup | None = None  # collectives of the training loop (shorter timeout)

    @property
    def distributed(self) -> bool:
        """True when there are other ranks to talk to."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, metrics, progress bars and checkpoints."""
        return self.rank == 0


def setup(
    device_name: str, timeout_s: float, startup_timeout_s: float
) -> tuple[World, torch.device]:
    """Join the process group torchrun describes (if any) and pick this rank's device.

    The default group gets the long start-up timeout (rendezvous, first collectives while rank 0
    trains the tokenizer); the training loop uses a second group with the shorter timeout, so a
    dead rank ends the job within `timeout_s` instead of hanging.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return World(), resolve_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=startup_timeout_s))
    group = dist.new_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return World(rank, world_size, local_rank, group), device


def teardown(world: World) -> None:
    """Leave the process group."""
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World, startup: bool = False) -> None:
    """Wait for every rank (on the start-up group when rank 0 may be busy for long)."""
    if world.distributed:
        guarded(world, lambda: dist.barrier(group=None if startup else world.group))


def all_reduce(
    world: World,
    values: Sequence[float],
    device: torch.device,
    op: str = "sum",
    startup: bool = False,
) -> list[float]:
    """Sum (or max) a few numbers over all ranks in one small collective.

    `startup` uses the default group and its long timeout, for a wait while rank 0 prepares.
    """
    if not world.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
    group = None if startup else world.group
    guarded(world, lambda: dist.all_reduce(tensor, op=reduce_op, group=group))
    return tensor.tolist()


def guarded(world: World, collective: Callable[[], object]) -> None:
    """Run a collective; a lost peer or a timeout becomes a one-line error naming this rank."""
    try:
        collective()
    except (RuntimeError, dist.DistError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MtError(
            f"rank {world.rank} of {world.world_size}: lost contact with the other ranks "
            f"(a rank died or timed out): {reason}"
        ) from None


def broadcast_parameters(world: World, model: nn.Module) -> None:
    """Give every rank rank 0's parameters (and buffers)."""
    if not world.distributed:
        return
    for tensor in model.state_dict().values():
        guarded(world, lambda tensor=tensor: dist.broadcast(tensor, src=0, group=world.group))


def sum_gradients(world: World, params: Sequence[Tensor], flags: Tensor) -> Tensor:
    """Sum the gradients of `params` over all ranks, in place, with `flags` in the same collective.

    Returns the summed flags (a few float32 numbers on the gradients' device). A parameter
    without a gradient (a rank that had no batch, or dropped its gradients after running out
    of memory) takes part with zeros. Runs once per update, after every backward pass, so the
    flags can tell every rank at once that one of them failed.
    """
    if not world.distributed:
        return flags
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([*(g.reshape(-1) for g in grads), flags.to(grads[0].dtype)])  # (P + F,)
    guarded(world, lambda: dist.all_reduce(flat, group=world.group))
    sizes = [p.numel() for p in params]
    for param, grad in zip(params, flat[: sum(sizes)].split(sizes), strict=True):
        param.grad = grad.view_as(param)
    return flat[sum(sizes) :].to(flags.dtype)
