"""Multilingual batches of one direction against batches mixing every direction (Multi30k).

    .venv/bin/python scripts/bench_mixed_batches.py --minutes 20 --write docs/benchmarks.md
    .venv/bin/python scripts/bench_mixed_batches.py --smoke                 # for tests

Trains configs/multi30k-multi.yaml twice for the same minutes on this machine, everything alike
but data.mixed_batches: false (each batch from one direction, the directions drawn by
data.temperature) and true (each batch holds sentences of every direction, in the same shares).
Prints a Markdown section for docs/benchmarks.md: each run's updates and median target tokens/s,
its dev BLEU per direction and their mean at the end (which batches train better in the same
time), and the mean dev BLEU at each validation (which train better per update). Dev BLEU is the
runs' own validation (`decode.for_validation`). Runs resume where an earlier invocation with the
same --workdir stopped. --smoke trains tiny models for a few steps: the numbers mean nothing.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "scripts"):  # run as a script from anywhere; its helpers sit beside it
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from bench import cpu_model, publish, wrap  # noqa: E402
from bench_multilingual import (  # noqa: E402
    MULTI_CONFIG,
    common_arguments,
    run_config,
    set_up,
    train_run,
)

from mt.config import load_config  # noqa: E402
from mt.metrics import read_metrics  # noqa: E402

SECTION = "## Multilingual batches: one direction or mixed (Multi30k)"
KINDS = {"one direction": "false", "mixed": "true"}  # name -> data.mixed_batches


def bench(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Train both runs; their numbers and validation records, by kind of batch."""
    timed = [] if args.smoke else [f"train.max_minutes={args.minutes}"]
    runs = {}
    for name, mixed in KINDS.items():
        run_dir = Path(args.workdir) / name.replace(" ", "-")
        extra = [*args.overrides, *timed, f"data.mixed_batches={mixed}"]
        numbers = train_run(run_config(MULTI_CONFIG, run_dir, args.data, extra))
        numbers["valid"] = read_metrics(run_dir, "valid")
        runs[name] = numbers
    return runs


def final_rows(runs: dict[str, dict[str, Any]], directions: list[str]) -> list[str]:
    """Updates, speed and the last validation's dev BLEU of each run."""
    rows = [
        f"| batches | updates | minutes | target tokens/s | mean dev BLEU | "
        f"{' | '.join(directions)} |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(directions),
    ]
    for name, run in runs.items():
        last = run["valid"][-1]
        scores = " | ".join(f"{last[f'{d}/bleu']:.2f}" for d in directions)
        rows.append(
            f"| {name} | {run['steps']:,} | {run['minutes']:.1f} | {run['tok_s']:,.0f} | "
            f"{last['bleu']:.2f} | {scores} |"
        )
    return rows


def curve_rows(runs: dict[str, dict[str, Any]]) -> list[str]:
    """Mean dev BLEU of both runs at every update either validated at."""
    names = list(runs)
    curves = {name: {r["step"]: r["bleu"] for r in run["valid"]} for name, run in runs.items()}
    steps = sorted(set().union(*(curve.keys() for curve in curves.values())))
    rows = [f"| updates | {' | '.join(names)} |", "|---:|" + "---:|" * len(names)]
    for step in steps:
        cells = [f"{curves[n][step]:.2f}" if step in curves[n] else "" for n in names]
        rows.append(f"| {step:,} | {' | '.join(cells)} |")
    return rows


def command(args: argparse.Namespace) -> str:
    """The options that shape the numbers, as they would be typed."""
    words = ["scripts/bench_mixed_batches.py", *(["--smoke"] if args.smoke else [])]
    words += ["--minutes", f"{args.minutes:g}"]
    words += ["--set", *args.set] if args.set else []
    return shlex.join(words)


def report(args: argparse.Namespace, runs: dict[str, dict[str, Any]]) -> str:
    """The Markdown section: machine, the runs' final dev BLEU, their curves."""
    machine = f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()})"
    directions = [c.direction for c in load_config(MULTI_CONFIG).data.directions()]
    lines = [
        SECTION,
        "",
        f"`{command(args)}` on {machine}, {torch.get_num_threads()} threads, "
        f"{time.strftime('%Y-%m-%d')}"
        + (" (smoke run: the numbers mean nothing)." if args.smoke else ".")
        + " configs/multi30k-multi.yaml with data.mixed_batches false (one direction per batch) "
        "and true (every direction in each batch); dev BLEU as the runs validate (sacreBLEU, "
        "cased), at their last validation:",
        "",
        *final_rows(runs, directions),
        "",
        "Mean dev BLEU over the directions at each validation:",
        "",
        *curve_rows(runs),
    ]
    return "\n".join(wrap(line) for line in lines) + "\n"


def main() -> None:
    """Parse arguments, train both runs, print (and maybe write) the section."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, "bench-mixed-batches")
    parser.add_argument("--minutes", type=float, default=20, help="train.max_minutes of each run")
    args = parser.parse_args()
    set_up(args)
    publish(report(args, bench(args)), args.write, SECTION)


if __name__ == "__main__":
    main()
