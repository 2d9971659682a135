"""Shared fixtures: one tiny trained run per test session; one intra-op thread for decoding."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
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


@pytest.fixture(scope="session")
def diverged_run(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of trained_run whose best weights are finite but overflow in the forward pass.

    The shared embedding is scaled by 1e30: every score of a non-blank line is NaN.
    """
    from mt.checkpoint import resolve_checkpoint, save_weights
    from mt.run import checkpoint_metadata, load_trained

    run_dir = tmp_path_factory.mktemp("diverged") / "run"
    shutil.copytree(trained_run, run_dir, ignore=shutil.ignore_patterns("cache", "tensorboard"))
    _, tokenizer, model, _ = load_trained(run_dir, torch.device("cpu"))
    with torch.no_grad():
        model.tgt_embed.weight.mul_(1e30)
    save_weights(resolve_checkpoint(run_dir).weights, model, checkpoint_metadata(tokenizer))
    return run_dir


class SmallFilesystems:
    """Small tmpfs mounts, to test what a full disk does to the real write paths."""

    def __init__(self) -> None:
        self.mounted: list[Path] = []

    def mount(self, directory: Path, size: str = "4m") -> Path:
        """Mount an empty tmpfs of `size` on `directory` (made if missing); skip if not allowed."""
        directory.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:  # not root, or a container without mount rights
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        self.mounted.append(directory)
        return directory

    def fill(self, directory: Path) -> None:
        """Write a filler file into `directory` until its file system is full."""
        fd = os.open(directory / ".filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            while True:
                os.write(fd, bytes(1 << 16))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        finally:
            os.close(fd)


@pytest.fixture
def small_fs() -> Iterator[SmallFilesystems]:
    """Mounts small tmpfs file systems for one test (root only), unmounted after it."""
    filesystems = SmallFilesystems()
    yield filesystems
    for directory in reversed(filesystems.mounted):
        subprocess.run(["umount", "--lazy", str(directory)], check=True)
