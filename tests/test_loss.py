"""Tests for mt.loss.label_smoothed_nll."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mt.loss import label_smoothed_nll

PAD = 0


def sample(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits (2, 5, 11) and targets with some padding."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 5, 11, generator=gen)
    target = torch.randint(1, 11, (2, 5), generator=gen)
    target[0, 3:] = PAD
    target[1, 4:] = PAD
    return logits, target


def test_eps_zero_equals_cross_entropy() -> None:
    logits, target = sample()
    loss, nll, _ = label_smoothed_nll(logits, target, 0.0, PAD)
    reference = F.cross_entropy(
        logits.view(-1, 11), target.view(-1), reduction="sum", ignore_index=PAD
    )
    assert torch.allclose(loss, reference) and torch.allclose(nll, reference)


def test_nll_independent_of_eps_and_token_count() -> None:
    logits, target = sample()
    _, nll0, n = label_smoothed_nll(logits, target, 0.0, PAD)
    loss1, nll1, _ = label_smoothed_nll(logits, target, 0.1, PAD)
    assert torch.allclose(nll0, nll1)
    assert not torch.allclose(loss1, nll1)
    assert int(n) == 3 + 4


def test_uniform_logits_known_value() -> None:
    # With uniform logits every class has -log p = log V, so loss = nll = n * log V for any eps.
    target = torch.tensor([[3, 4, PAD]])
    loss, nll, n = label_smoothed_nll(torch.zeros(1, 3, 8), target, 0.1, PAD)
    assert math.isclose(loss.item(), 2 * math.log(8), rel_tol=1e-6)
    assert math.isclose(nll.item(), 2 * math.log(8), rel_tol=1e-6)
    assert int(n) == 2


def test_hand_computed_smoothing() -> None:
    # V=2, logits (0, log 3): p = (1/4, 3/4), target 1.
    # loss = 0.8 * log(4/3) + 0.2 * mean(log 4, log(4/3)).
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    loss, nll, _ = label_smoothed_nll(logits, torch.tensor([[1]]), 0.2, PAD)
    nll_expected = math.log(4 / 3)
    smooth = (math.log(4) + math.log(4 / 3)) / 2
    assert math.isclose(nll.item(), nll_expected, rel_tol=1e-6)
    assert math.isclose(loss.item(), 0.8 * nll_expected + 0.2 * smooth, rel_tol=1e-6)


def test_bf16_logits_give_float32() -> None:
    logits, target = sample()
    low = logits.bfloat16().requires_grad_()
    loss, nll, _ = label_smoothed_nll(low, target, 0.1, PAD)
    loss.backward()
    high = low.detach().float().requires_grad_()  # the same values, converted up front
    reference, _, _ = label_smoothed_nll(high, target, 0.1, PAD)
    reference.backward()
    assert loss.dtype == torch.float32 and nll.dtype == torch.float32
    assert torch.equal(loss, reference)  # the softmax runs in float32 either way
    assert low.grad.dtype == torch.bfloat16
    assert torch.equal(low.grad, high.grad.bfloat16())
