"""A torchrun worker that runs `mt` with a fault injected on one rank (for tests only).

MT_FAULT=KIND:RANK:CALL, with KIND `nan` (the loss of that loss call is NaN), `oom` (that call
raises CUDA's out-of-memory error), `oom_backward` (the backward pass of that call's loss
raises it) or `die` (the process exits with status 1 there), e.g.
MT_FAULT=nan:1:3; or MT_FAULT=slow:RANK:SECONDS: that rank's data preparation takes SECONDS
longer; or MT_FAULT=clock:RANK:FACTOR: that rank's time.perf_counter runs FACTOR times as fast;
or MT_FAULT=valid:RANK:CALL: that rank's validation number CALL raises an error; or
MT_FAULT=save:RANK:CALL: that rank's checkpoint number CALL fails as a full disk does; or
MT_FAULT=fits:RANK:1: that rank's start-up check that the model fits the device fails.
Several faults are separated by commas: MT_FAULT=oom:1:3,oom_backward:0:5.
"""

import os
import sys
import time

import torch

import mt.train
from mt.cli import main
from mt.errors import MtError


def inject(fault: str) -> None:
    """Wrap the loss function on the chosen rank."""
    kind, rank, call = fault.split(":")
    if int(os.environ.get("RANK", "0")) != int(rank):
        return
    if kind == "slow":
        slow_prepare(float(call))
        return
    if kind == "clock":
        fast_clock(float(call))
        return
    if kind == "valid":  # as a beam search out of memory would
        failing("record_validation", int(call), RuntimeError("validation on fire (injected)"))
        return
    if kind == "fits":  # as a node with a smaller or busy GPU would
        failing("check_fits", int(call), MtError("the model does not fit (injected)"))
        return
    if kind == "save":  # as a full disk would
        failing("save", int(call), OSError(28, "No space left on device (injected)"))
        return
    real = mt.train.label_smoothed_nll
    calls = {"n": 0}

    def loss(*args, **kwargs):
        calls["n"] += 1
        loss_sum, nll_sum, n = real(*args, **kwargs)
        if calls["n"] == int(call):
            if kind == "oom":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
            if kind == "oom_backward":
                loss_sum.register_hook(raise_oom)
                return loss_sum, nll_sum, n
            if kind == "die":
                sys.stderr.write(f"rank {rank}: dying on purpose\n")
                os._exit(1)
            loss_sum = loss_sum * float("nan")
        return loss_sum, nll_sum, n

    mt.train.label_smoothed_nll = loss


def raise_oom(grad: torch.Tensor) -> torch.Tensor:
    """A backward hook that fails as CUDA does when the backward pass runs out of memory."""
    raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected in backward)")


def slow_prepare(seconds: float) -> None:
    """Make this rank's `mt.train.prepare` (tokenizer and data) take `seconds` longer."""
    real = mt.train.prepare

    def prepare(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)

    mt.train.prepare = prepare


def failing(name: str, call: int, error: Exception) -> None:
    """Make this rank's call number `call` of mt.train's function `name` raise `error`."""
    real = getattr(mt.train, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise error
        return real(*args, **kwargs)

    setattr(mt.train, name, wrapper)


def fast_clock(factor: float) -> None:
    """Make this process's time.perf_counter run `factor` times as fast as the real one."""
    real = time.perf_counter
    start = real()
    time.perf_counter = lambda: start + (real() - start) * factor


if __name__ == "__main__":
    for fault in os.environ["MT_FAULT"].split(","):
        inject(fault)
    main()
