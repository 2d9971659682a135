"""The learning-rate schedule (inverse square root, cool-down) and the optimizer."""

import pytest
import torch

from mt.optim import Schedule, inverse_sqrt, make_optimizer, make_scheduler


@pytest.mark.parametrize(
    ("step", "lr"),
    [(1, 7e-4 / 4000), (2000, 3.5e-4), (4000, 7e-4), (16000, 3.5e-4), (64000, 1.75e-4)],
)
def test_schedule_at_known_steps(step: int, lr: float) -> None:
    assert inverse_sqrt(step, 7e-4, 4000) == pytest.approx(lr, rel=1e-12)


def test_paper_formula() -> None:
    # Vaswani et al.: d^-0.5 * min(step^-0.5, step * warmup^-1.5), with d = 512, warmup = 4000.
    for step in (1, 100, 3999, 4000, 4001, 50_000):
        paper = 512**-0.5 * min(step**-0.5, step * 4000**-1.5)
        assert inverse_sqrt(step, 512**-0.5 * 4000**-0.5, 4000) == pytest.approx(paper, rel=1e-9)


def test_no_warmup_starts_at_peak() -> None:
    assert inverse_sqrt(1, 1e-3, 0) == 1e-3
    assert inverse_sqrt(4, 1e-3, 0) == pytest.approx(5e-4)


def test_scheduler_drives_the_optimizer() -> None:
    model = torch.nn.Linear(3, 3)
    opt = make_optimizer(model, 7e-4, (0.9, 0.98), 1e-9, 0.0, torch.device("cpu"))
    sched = make_scheduler(opt, Schedule(7e-4, 10))
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])  # the lr this update uses
        opt.step()
        sched.step()
    assert seen == pytest.approx([inverse_sqrt(n, 7e-4, 10) for n in range(1, 21)], rel=1e-12)


def test_cooldown_falls_linearly_to_zero_after_its_last_update() -> None:
    schedule = Schedule(1e-3, 4, cooldown_start=16, cooldown_steps=4)
    at_16 = inverse_sqrt(16, 1e-3, 4)  # 5e-4
    assert [schedule(step) for step in (1, 8, 16)] == [inverse_sqrt(s, 1e-3, 4) for s in (1, 8, 16)]
    assert [schedule(step) / at_16 for step in range(17, 22)] == pytest.approx(
        [4 / 5, 3 / 5, 2 / 5, 1 / 5, 0.0]
    )
    assert schedule.cooldown_end == 20
    assert Schedule(1e-3, 4).cooldown_end is None
    assert Schedule(1e-3, 4, cooldown_start=16)(32) == inverse_sqrt(32, 1e-3, 4)  # not begun


def test_a_cooldown_begun_mid_run_applies_from_the_next_update() -> None:
    model = torch.nn.Linear(3, 3)
    opt = make_optimizer(model, 1e-3, (0.9, 0.98), 1e-9, 0.0, torch.device("cpu"))
    schedule = Schedule(1e-3, 0)
    sched = make_scheduler(opt, schedule)
    seen = []
    for step in range(1, 7):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        if step == 3:
            schedule.cooldown_start, schedule.cooldown_steps = 3, 2
        sched.step()
    lr_3 = 1e-3 * 3**-0.5
    assert seen == pytest.approx([1e-3, 1e-3 * 2**-0.5, lr_3, lr_3 * 2 / 3, lr_3 / 3, 0.0])


def test_tied_parameters_are_optimised_once() -> None:
    model = torch.nn.Module()
    model.a = torch.nn.Linear(2, 2, bias=False)
    model.b = torch.nn.Linear(2, 2, bias=False)
    model.b.weight = model.a.weight
    opt = make_optimizer(model, 1e-3, (0.9, 0.98), 1e-9, 0.0, torch.device("cpu"))
    assert sum(len(g["params"]) for g in opt.param_groups) == 1
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-9
