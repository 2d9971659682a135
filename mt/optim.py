"""Adam and the inverse-square-root learning-rate schedule of Vaswani et al. 2017."""

from __future__ import annotations

import math

import torch
from torch import nn


def inverse_sqrt(step: int, peak_lr: float, warmup_steps: int) -> float:
    """Learning rate of update `step` (1-based): linear warm-up, then peak * sqrt(warmup / step)."""
    if warmup_steps and step < warmup_steps:
        return peak_lr * step / warmup_steps
    return peak_lr * math.sqrt(max(warmup_steps, 1) / max(step, 1))


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
    optimizer: torch.optim.Optimizer, peak_lr: float, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR (stepped once per update) that makes the lr follow `inverse_sqrt`."""
    for group in optimizer.param_groups:
        group["lr"] = peak_lr
        group["initial_lr"] = peak_lr
    # LambdaLR calls the function with the number of scheduler steps so far (0 at construction):
    # the lr used for update n (1-based) is computed at scheduler step n - 1.
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda n: inverse_sqrt(n + 1, peak_lr, warmup_steps) / peak_lr
    )
