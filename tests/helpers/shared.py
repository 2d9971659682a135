"""Test data built once per test session, however many pytest-xdist workers run it."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock


def built_once(
    tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]
) -> Path:
    """The directory `name`, built by `build` once for the whole test session.

    With pytest-xdist, every worker process has its own session fixtures: a tiny training run
    would be trained once per worker. The workers share the parent of their temp directories,
    so the first to ask builds it there, under a file lock, and the others wait and reuse it.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    target, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(target, ignore_errors=True)  # a worker that failed half-way
            target.mkdir(parents=True)
            build(target)
            done.touch()
    return target
