"""What the benchmark scripts write into docs/benchmarks.md (scripts/bench.py's write_section)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def load_bench() -> ModuleType:
    """scripts/bench.py as a module."""
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def written_file(section: str) -> str:
    """A new Markdown file as a script's --write leaves it: its section, then the end mark."""
    return f"# Benchmarks\n\n{section}{load_bench().END_MARK}\n"
