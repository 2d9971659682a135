"""Adam and the learning-rate schedule: Vaswani et al.'s inverse square root, then a cool-down.

The cool-down (a linear decay to zero over a run's last updates, as in the warm-up-stable-decay
schedules of Hägele et al. 2024) lets a run that stops while still improving end on weights that
have settled, instead of on those of its last high-learning-rate update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


def inverse_sqrt(step: int, peak_lr: float, warmup_steps: int) -> float:
    """Learning rate of update `step` (1-based): linear warm-up, then peak * sqrt(warmup / step)."""
    if warmup_steps and step < warmup_steps:
        return peak_lr * step / warmup_steps
    return peak_lr * math.sqrt(max(warmup_steps, 1) / max(step, 1))


@dataclass
class Schedule:
    """The learning rate by update: warm-up, inverse square root and, once begun, the cool-down.

    The cool-down begins when training decides it (after a share of the steps or of the
    minutes): from update `cooldown_start` + 1 on, the rate falls linearly from that of update
    `cooldown_start` to zero, reached one update after the last of the `cooldown_steps`.
    """

    peak_lr: float
    warmup_steps: int
    cooldown_start: int = 0  # updates done when the cool-down began
    cooldown_steps: int = 0  # updates of the cool-down (0: not begun)

    def __call__(self, step: int) -> float:
        """The learning rate of update `step` (1-based)."""
        if not self.cooldown_steps or step <= self.cooldown_start:
            return inverse_sqrt(step, self.peak_lr, self.warmup_steps)
        left = max(self.cooldown_start + self.cooldown_steps + 1 - step, 0)
        start_lr = inverse_sqrt(self.cooldown_start, self.peak_lr, self.warmup_steps)
        return start_lr * left / (self.cooldown_steps + 1)

    @property
    def cooldown_end(self) -> int | None:
        """The last update of the cool-down, once it has begun."""
        return self.cooldown_start + self.cooldown_steps if self.cooldown_steps else None


def make_optimizer(
    model: nn.Module,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    device: torch.device,
) -> torch.optim.Optimizer:
    """AdamW over the unique parameters, fused where this torch supports it on `device`."""
    params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
    fused = device.type in ("cuda", "cpu")  # fused Adam kernels exist for both in torch >= 2.4
    return torch.optim.AdamW(
        params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused
    )


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: Schedule
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR (stepped once per update) that makes the lr follow `schedule`.

    The schedule is read at every step, so a cool-down begun on it applies from the next one.
    """
    peak_lr = schedule.peak_lr
    for group in optimizer.param_groups:
        group["lr"] = peak_lr
        group["initial_lr"] = peak_lr
    # LambdaLR calls the function with the number of scheduler steps so far (0 at construction):
    # the lr used for update n (1-based) is computed at scheduler step n - 1.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda n: schedule(n + 1) / peak_lr)
