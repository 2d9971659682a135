"""Shared fixtures: one tiny trained run per test session; one intra-op thread for decoding."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = ROOT / "tests" / "data" / "tiny"


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for the test, then the previous count back.

    The test models are tiny: several threads only fight over (often shared) cores, which made
    decoding tests ~50x slower on a loaded 2-core machine. Scoped, not global: tests that
    compare in-process results with a subprocess's need the same count in both.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained for 300 steps on the tiny config (dev BLEU ~98; checkpoints 200 and 300).

    Training ends by writing its report.md and curves.png.

    Do not modify it.

    Data paths are absolute, so commands using the run's test set work from any directory.
    """
    from mt.config import load_config
    from mt.finish import finish
    from mt.train import train

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    overrides = [
        f"run_dir={run_dir}",
        "train.max_steps=300",
        "train.valid_every=100",
        f"data.train={TINY_DATA / 'train'}",
        f"data.valid={TINY_DATA / 'valid'}",
        f"data.test={TINY_DATA / 'valid'}",
        "train.report=true",
    ]
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # see one_thread
    try:
        config = load_config(ROOT / "configs" / "tiny.yaml", overrides)
        finish(config, train(config))
    finally:
        torch.set_num_threads(before)
    return run_dir
