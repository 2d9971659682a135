"""torch.distributed for `torchrun`: process groups, rank-0 duties and cross-rank agreement.

`mt train` started by torchrun, or one per srun task by scripts/slurm/train.sbatch (either sets
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...) trains data-parallel: rank 0's parameters are
broadcast, gradients are summed once per update. Started plainly, it is a world of one and
nothing here talks to the network. The model file knows nothing of this module.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mt.device import resolve_device
from mt.errors import MtError

log = logging.getLogger("mt")
T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: dist.ProcessGroup | None = None  # collectives of the training loop (shorter timeout)
    timeout_s: float = 600.0  # of `group`
    startup_timeout_s: float = 1800.0  # of the default group

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
    set_cpu_threads()
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "1")
    if "WORLD_SIZE" not in os.environ and tasks != "1":  # each task would train alone
        raise MtError(
            f"srun started {tasks} tasks but WORLD_SIZE is not set: run them with "
            "scripts/slurm/train.sbatch (or torchrun)"
        )
    world_size = env_int("WORLD_SIZE", "1")
    if world_size == 1:
        return World(), resolve_device(device_name)
    rank, local_rank = env_int("RANK"), env_int("LOCAL_RANK", "0")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise MtError(f"WORLD_SIZE={world_size} but {name} is not set (start with torchrun)")
    device = resolve_device(device_name)
    if device.type == "cuda":
        # A launcher may show each rank all the node's GPUs, or (Slurm's --gpu-bind) its own.
        count = torch.cuda.device_count()
        if count > 1 and local_rank >= count:  # two ranks would share a GPU
            raise MtError(
                f"rank {rank}: LOCAL_RANK={local_rank} but this node shows {count} GPUs: start "
                "one rank per GPU (e.g. --ntasks-per-node equal to --gpus-per-node)"
            )
        device = torch.device("cuda", local_rank % count)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    nccl_errors_raise()  # read by each NCCL process group when it is created
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=startup_timeout_s))
        group = dist.new_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    # A peer or a port, not a bug: gloo's mesh raises a bare RuntimeError ("connectFullMesh
    # failed"), e.g. when torchrun restarts ranks against a static --master_port.
    except (dist.DistStoreError, dist.DistNetworkError, RuntimeError) as exc:
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        first = str(exc).strip().splitlines()[0]
        raise MtError(
            f"rank {rank}: cannot join the {world_size} ranks at {where} "
            f"(train.dist_startup_timeout={startup_timeout_s:g}): {first}"
        ) from None
    threads = torch.get_num_threads()
    log.info("rank %d of %d on %s: %d intra-op threads", rank, world_size, device, threads)
    return World(rank, world_size, local_rank, group, timeout_s, startup_timeout_s), device


def env_int(name: str, default: str | None = None) -> int:
    """The integer a launcher put in environment variable `name`; MtError if missing or not one."""
    value = os.environ.get(name, default)
    if value is None:
        raise MtError(f"{name} is not set, but WORLD_SIZE is (start with torchrun)")
    try:
        return int(value)
    except ValueError:
        raise MtError(f"{name}={value!r} is not an integer") from None


def set_cpu_threads() -> None:
    """One intra-op thread per CPU that Slurm gave this task, unless OMP_NUM_THREADS is set.

    Capped by the CPUs the task may run on: an srun without --cpus-per-task binds each task to
    one CPU but passes on the SLURM_CPUS_PER_TASK it inherited from sbatch.
    """
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(min(int(cpus), len(os.sched_getaffinity(0))))


NCCL_ERROR_HANDLING = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
NCCL_CLEAN_UP_ONLY = "2"


def nccl_errors_raise() -> None:
    """Make a NCCL timeout or error abort the communicators but leave the process alive.

    By default (3, and 1 where torchrun sets it) NCCL's watchdog thread kills the process when
    a collective times out, so no rank says why in one line. With 2, the watchdog aborts the
    communicators, the collective that `guarded` waits for raises in the training loop's thread,
    and so does any later one (the communicator was aborted). A value the user set is kept;
    under torchrun, 1 is torchrun's own default for every worker, not the user's choice.
    TORCH_NCCL_BLOCKING_WAIT stays off: `guarded` gives each of its collectives the timeout
    that makes NCCL block and raise, and no other collective.
    """
    value = os.environ.get(NCCL_ERROR_HANDLING)
    if value is None or (value == "1" and "TORCHELASTIC_RUN_ID" in os.environ):
        os.environ[NCCL_ERROR_HANDLING] = NCCL_CLEAN_UP_ONLY


def teardown(world: World) -> None:
    """Leave the process group."""
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World, startup: bool = False) -> None:
    """Wait for every rank (on the start-up group when rank 0 may be busy for long)."""
    if world.distributed:
        group = None if startup else world.group
        guarded(world, lambda: dist.barrier(group=group, async_op=True), startup)


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
    guarded(
        world, lambda: dist.all_reduce(tensor, op=reduce_op, group=group, async_op=True), startup
    )
    return tensor.tolist()


def gather_values(world: World, values: Sequence[float], device: torch.device) -> list[list[float]]:
    """Every rank's `values`, by rank: one sum of vectors holding each rank's in its own slot."""
    n = len(values)
    slots = [0.0] * (n * world.world_size)
    slots[world.rank * n : (world.rank + 1) * n] = values
    flat = all_reduce(world, slots, device)  # exact: each slot adds zeros to one rank's value
    return [flat[r * n : (r + 1) * n] for r in range(world.world_size)]


def guarded(world: World, collective: Callable[[], dist.Work], startup: bool = False) -> None:
    """Run a collective and wait for it, within its group's timeout.

    A lost peer or a timeout becomes a one-line error naming this rank. Waiting with a timeout
    makes the wait block this thread and raise here, also with NCCL, whose collectives
    otherwise return at once and leave the timeout to its watchdog thread: results are never
    read from an aborted collective. Training-loop callers read the result on the host right
    after anyway; NCCL's blocking wait adds at most its 1 ms polling interval.
    """
    timeout_s = world.startup_timeout_s if startup else world.timeout_s
    try:
        collective().wait(timedelta(seconds=timeout_s))
    except (RuntimeError, dist.DistError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MtError(
            f"rank {world.rank} of {world.world_size}: lost contact with the other ranks "
            f"(a rank died or timed out): {reason}"
        ) from None


RESTART_COUNTS = ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT")  # set in restarted jobs


def restarted() -> bool:
    """Whether this process is a scheduler's restart of its job: Slurm requeued it, or torchrun
    restarted its workers. It runs the same command as the first one did."""
    return any(os.environ.get(name, "0").strip() not in ("", "0") for name in RESTART_COUNTS)


@contextlib.contextmanager
def together(world: World, device: torch.device, doing: str) -> Iterator[None]:
    """Run a block on every rank, then agree on the start-up group whether it failed anywhere.

    A rank whose block raises (an error, or the CLI's SystemExit on a stop signal) tells the
    others before raising; they raise an MtError naming `doing` instead of going on to wait in
    the next collective until its timeout (NCCL notices no dead rank before). The block must
    hold no collective of its own: a rank that failed before it would leave the others waiting.
    """
    try:
        yield
    except BaseException:
        with contextlib.suppress(MtError):  # this rank's own error is the one to report
            all_reduce(world, [1.0], device, op="max", startup=True)
        raise
    if all_reduce(world, [0.0], device, op="max", startup=True)[0]:
        raise MtError(f"rank {world.rank}: another rank failed while {doing} (see its error)")


def main_first(world: World, device: torch.device, prepare: Callable[[], T]) -> T:
    """Run `prepare` on rank 0, then on the others (which then find its files and caches).

    The others wait on the start-up group (`train.dist_startup_timeout`): preparing a large
    corpus can take longer than the training group's timeout; then rank 0 waits for them (they
    load what it wrote). A rank that fails in either turn, with any error or stopped by a signal
    (the CLI's SystemExit), tells the others before raising, so that they stop at once instead
    of waiting that long: with NCCL a rank that died is not noticed before the timeout, and a
    job whose ranks wait out its notice is not requeued. `device` must suit the backend (CUDA
    tensors for NCCL).
    """
    if not world.distributed:
        return prepare()
    result = None
    with together(world, device, "preparing the run"):
        if world.is_main:
            result = prepare()
    with together(world, device, "loading the prepared run"):
        if not world.is_main:
            result = prepare()
    return cast(T, result)


def broadcast_parameters(world: World, model: nn.Module) -> None:
    """Give every rank rank 0's parameters (and buffers)."""
    if not world.distributed:
        return
    for tensor in model.state_dict().values():
        guarded(
            world,
            lambda tensor=tensor: dist.broadcast(tensor, src=0, group=world.group, async_op=True),
        )


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
    guarded(world, lambda: dist.all_reduce(flat, group=world.group, async_op=True))
    sizes = [p.numel() for p in params]
    for param, grad in zip(params, flat[: sum(sizes)].split(sizes), strict=True):
        param.grad = grad.view_as(param)
    return flat[sum(sizes) :].to(flags.dtype)
