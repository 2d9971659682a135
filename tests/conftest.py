"""Shared fixtures: one torch thread everywhere, the Multi30k data, tiny trained runs."""

from __future__ import annotations

import atexit
import errno
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers.corpus import MULTI30K_DE_EN, multi_config, write_multiway
from helpers.shared import built_once

# Datasets that `load_dataset` builds from local files are cached here, not in the user's
# ~/.cache (every run added one); set before `datasets` is imported, which reads it once.
_HF_CACHE = tempfile.mkdtemp(prefix="mt-tests-hf-")
os.environ["HF_DATASETS_CACHE"] = _HF_CACHE
atexit.register(shutil.rmtree, _HF_CACHE, ignore_errors=True)

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
    from mt.finish import finish
    from mt.train import train

    def build(directory: Path) -> None:
        overrides = [
            f"run_dir={directory / 'run'}",
            "train.max_steps=300",
            "train.valid_every=100",
            f"data.train={TINY_DATA / 'train'}",
            f"data.valid={TINY_DATA / 'valid'}",
            f"data.test={TINY_DATA / 'valid'}",
            "train.report=true",
        ]
        config = load_config(ROOT / "configs" / "tiny.yaml", overrides)
        finish(config, train(config))

    return built_once(tmp_path_factory, "trained", build) / "run"


@pytest.fixture(scope="session")
def multiway(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny de/en corpus and a made-up fr, line-aligned (see write_multiway)."""
    return built_once(tmp_path_factory, "multiway", lambda d: write_multiway(d, TINY_DATA))


@pytest.fixture(scope="session")
def multi_run(multiway: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A four-direction run (helpers.corpus.MULTI_DIRECTIONS) of 60 steps, validated at 30, 60.

    Post-norm, so that both export formats can hold it (it needs 60 steps where pre-norm needs
    30 before the tags steer its output). Do not modify it.
    """
    from mt.train import train

    def build(directory: Path) -> None:
        overrides = ["model.prenorm=false", "train.max_steps=60", "train.valid_every=30"]
        train(multi_config(multiway, directory / "run", *overrides))

    return built_once(tmp_path_factory, "multi", build) / "run"


@pytest.fixture(scope="session")
def diverged_run(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of trained_run whose best weights are finite but overflow in the forward pass.

    The shared embedding is scaled by 1e30: every score of a non-blank line is NaN.
    """
    from mt.checkpoint import resolve_checkpoint, save_weights
    from mt.rundir import checkpoint_metadata, load_trained

    run_dir = tmp_path_factory.mktemp("diverged") / "run"
    shutil.copytree(trained_run, run_dir, ignore=shutil.ignore_patterns("cache", "tensorboard"))
    _, tokenizer, model, _ = load_trained(run_dir, torch.device("cpu"))
    with torch.no_grad():
        model.tgt_embed.weight.mul_(1e30)
    save_weights(resolve_checkpoint(run_dir).weights, model, checkpoint_metadata(tokenizer))
    return run_dir


class SmallFilesystems:
    """Small tmpfs mounts, to test what a full disk (or a read-only one) does to the real write
    paths."""

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

    def make_read_only(self, directory: Path) -> None:
        """Remount the tmpfs mounted on `directory` read-only (root itself cannot write then)."""
        subprocess.run(["mount", "-o", "remount,ro", str(directory)], check=True)

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
