"""Smoke runs of the scripts under scripts/, so that they cannot rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "tiny"


def test_bench_decode_prints_a_table(trained_run: Path) -> None:
    args = [sys.executable, str(ROOT / "scripts" / "bench_decode.py"), str(trained_run),
            "--src", str(TINY / "valid.de"), "--ref", str(TINY / "valid.en"), "--beams", "1,2",
            "--repeats", "1", "--threads", "1"]  # fmt: skip
    out = subprocess.run(args, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    rows = [
        line
        for line in out.splitlines()
        if line.startswith("| greedy") or line.startswith("| beam")
    ]
    assert [row.split("|")[1].strip() for row in rows] == ["greedy", "beam 2"]
    bleus = [float(row.split("|")[5]) for row in rows]
    assert all(bleu > 50 for bleu in bleus)  # the tiny run has learnt its toy language
