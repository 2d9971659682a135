"""Shared fixtures: one torch thread everywhere, the Multi30k data, one tiny trained run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers.corpus import MULTI30K_DE_EN

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = ROOT / "tests" / "data" / "tiny"
MULTI30K_ENV = "MT_TEST_MULTI30K"
# `make data` fetches into the checkout; the development machines keep a copy beside it.
MULTI30K_PLACES = (ROOT / "data" / "multi30k", ROOT.parent / "shared" / "data" / "multi30k")


@pytest.fixture(scope="session", autouse=True)
def one_thread() -> Iterator[None]:
    """Every test, and every process a test starts, runs torch on one intra-op thread.

    The test models are tiny: more threads only fight over (often shared) cores, which made
    training and decoding tests many times slower on a loaded machine. Subprocesses inherit
    OMP_NUM_THREADS, so results computed in-process and in a subprocess use the same count.
    """
    before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def multi30k() -> Path:
    """The directory of the gzipped Multi30k de/en files: $MT_TEST_MULTI30K, or where they are.

    Tests that use it are skipped where there is none (a fresh clone before `make data`).
    """
    override = os.environ.get(MULTI30K_ENV)
    places = [Path(override)] if override else MULTI30K_PLACES
    for place in places:
        if all((place / name).is_file() for name in MULTI30K_DE_EN):
            return place
    pytest.skip(f"no Multi30k de/en files in {' or '.join(map(str, places))} ({MULTI30K_ENV})")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained for 300 steps on the tiny config (dev BLEU ~98; checkpoints 200 and 300).

    Training ends by writing its report.md and curves.png.

    Do not modify it.

    Data paths are absolute, so commands using the run's test set work from any directory.
    """
    from mt.config import load_config
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
    train(load_config(ROOT / "configs" / "tiny.yaml", overrides))
    return run_dir
