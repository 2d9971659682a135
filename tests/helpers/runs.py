"""Copies of the tiny trained run with other settings."""

from __future__ import annotations

import shutil
from pathlib import Path

from mt.config import CONFIG_FILE, load_config, save_config


def run_with(trained_run: Path, run: Path, overrides: list[str]) -> Path:
    """A copy of the tiny run at `run` whose config has `overrides` applied."""
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("cache", "tensorboard"))
    save_config(load_config(run / CONFIG_FILE, overrides), run / CONFIG_FILE)
    return run
