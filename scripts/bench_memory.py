"""Resident memory of `mt train` on a CPU, validation by validation, with and without the heap
trim after each validation (mt.device.give_back_freed_memory).

    .venv/bin/python scripts/bench_memory.py --data ../shared/data/multi30k --steps 600 \\
        --valid-every 100

Trains configs/multi30k.yaml (or --config) twice for --steps updates in a temporary directory,
once as `mt train` runs and once with the trim turned off, one run after the other, sampling
the process's resident set (VmRSS) every 0.2 s. Prints a Markdown table: the resident memory
once training goes on after each validation (at the next log line, 10 steps on at most) and
its peak over the run. Arguments after `--` go to `mt train`.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "scripts") not in sys.path:  # run as a script from anywhere; bench.py sits beside it
    sys.path.insert(0, str(ROOT / "scripts"))

from bench import cpu_model  # noqa: E402

# `mt train` with the trim after validation replaced by nothing.
UNTRIMMED = (
    "import sys, mt.train; mt.train.give_back_freed_memory = lambda: False; "
    "from mt.cli import main; sys.argv[0] = 'mt'; main()"
)
VALIDATION = re.compile(r"\| valid step (\d+) \|")
TRAINING = re.compile(r"\| step (\d+) \|")


def resident_mib(pid: int) -> float:
    """The process's VmRSS in MiB (0 once it has exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    found = re.search(r"VmRSS:\s+(\d+) kB", status)
    return int(found[1]) / 1024 if found else 0.0


def run(trim: bool, args: argparse.Namespace, directory: Path) -> dict[str, object]:
    """One training run: resident MiB before each validation (by step) and the peak."""
    command = [sys.executable, "-m", "mt"] if trim else [sys.executable, "-c", UNTRIMMED]
    data = args.data.rstrip("/")
    overrides = [
        f"run_dir={directory / ('trim' if trim else 'untrimmed')}",
        f"data.train={data}/train", f"data.valid={data}/val", f"data.test={data}/{args.test}",
        f"train.max_steps={args.steps}", "train.max_minutes=0", "train.report=false",
        f"train.valid_every={args.valid_every}", "train.log_every=10",
        f"data.cache_dir={directory / 'cache'}",
        *args.extra,
    ]  # fmt: skip
    proc = subprocess.Popen(
        [*command, "train", "--config", args.config, *overrides],
        cwd=ROOT, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(resident_mib(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    after: dict[int, float] = {}
    validated = None
    assert proc.stderr is not None
    for line in proc.stderr:  # the first training log line after a validation: steps go on
        if found := VALIDATION.search(line):
            validated = int(found[1])
        elif (found := TRAINING.search(line)) and validated is not None:
            after[validated], validated = samples[-1], None
    done.set()
    if proc.wait():
        raise SystemExit(f"mt train failed ({proc.returncode})")
    return {"after_validation": after, "peak": max(samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/multi30k.yaml")
    parser.add_argument("--data", default="data/multi30k", help="Multi30k directory")
    parser.add_argument("--test", default="test_2016_flickr", help="test set's prefix in --data")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--valid-every", type=int, default=100)
    parser.add_argument("extra", nargs="*", help="more mt train overrides (after --)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trimmed, untrimmed = (run(trim, args, Path(tmp)) for trim in (True, False))
    print(f"`python scripts/bench_memory.py {' '.join(sys.argv[1:])}` ({cpu_model()})\n")
    print("| after validation at step | resident MiB, trimmed | not trimmed |")
    print("|---:|---:|---:|")
    for step, mib in trimmed["after_validation"].items():
        other = untrimmed["after_validation"].get(step, 0.0)
        print(f"| {step:,} | {mib:,.0f} | {other:,.0f} |")
    print(f"| peak over the run | {trimmed['peak']:,.0f} | {untrimmed['peak']:,.0f} |")


if __name__ == "__main__":
    main()
