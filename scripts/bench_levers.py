"""Recipe levers at a fixed number of updates: configs/multi30k.yaml with one change at a time.

    .venv/bin/python scripts/bench_levers.py --steps 1200 --baseline runs/s30-de-en \\
        --variant dropout-0.1 model.dropout=0.1 --variant lr-3e-3 train.lr=3e-3 \\
        --write docs/benchmarks.md
    .venv/bin/python scripts/bench_levers.py --smoke --variant heads-1 model.heads=1  # for tests

Trains the Multi30k recipe (de->en unless --set says otherwise) for --steps updates once per
--variant, each with its own overrides, and once unchanged as the baseline (or reads the
validations of an existing run of the unchanged recipe given by --baseline, up to --steps).
Prints a Markdown section for docs/benchmarks.md: each run's dev BLEU at every validation (the
runs' own greedy validation, so the comparison is per update, whatever the machine's speed), its
median target tokens/s and the target tokens it trained on (which differ per update when a lever
changes the batch; --by-tokens adds every validation by the target tokens trained on, to compare
such levers at equal tokens). Runs resume where an earlier invocation with the same --workdir
stopped.
--smoke trains tiny models for a few steps: the numbers mean nothing.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
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
    BILINGUAL_CONFIG,
    common_arguments,
    run_config,
    set_up,
    train_run,
)

from mt.config import diff  # noqa: E402
from mt.metrics import read_metrics  # noqa: E402
from mt.rundir import load_run_config  # noqa: E402

SECTION = "## Recipe levers at a fixed number of updates (Multi30k)"
BASELINE = "recipe"  # the name of the unchanged run


def run_record(run: Path, steps: int, changes: list[str]) -> dict[str, Any]:
    """A run's numbers up to update `steps`: validations, median speed, target tokens seen."""
    records = read_metrics(run, "train")
    train = [r for r in records if r["step"] <= steps]
    valid = [r for r in read_metrics(run, "valid") if r["step"] <= steps]
    last = train[-1]["step"] if train else 0
    return {
        "run": run,
        "changes": changes,
        "steps": last,
        "tok_s": statistics.median(r["tgt_tok_s"] for r in train) if train else 0.0,
        "tokens": tokens_at(records, last),
        "bleu": {r["step"]: r["bleu"] for r in valid},
        "seen": {r["step"]: tokens_at(records, r["step"]) for r in valid},
    }


def tokens_at(train: list[dict[str, Any]], step: int) -> float:
    """Target tokens trained on up to update `step`, from the train records' windows.

    Each record averages tokens_per_update over the updates since the one before it; a step
    inside a window counts that window's average for its updates so far, and a step after the
    last record (a run stopped between two records) the last record's average.
    """
    tokens, last, mean = 0.0, 0, 0.0
    for record in train:
        mean = record["tokens_per_update"]
        tokens += mean * (min(record["step"], step) - last)
        last = record["step"]
        if last >= step:
            return tokens
    return tokens + mean * (step - last)


def bench(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Train (or read) the baseline and every variant; their records, by name."""
    fixed = [f"train.max_steps={args.steps}", "train.max_minutes=0"]
    runs: dict[str, dict[str, Any]] = {}
    variants = [] if args.baseline else [[BASELINE]]
    for name, *changes in [*variants, *args.variant]:
        run_dir = Path(args.workdir) / name
        extra = [*args.overrides, *fixed, *changes]
        train_run(run_config(BILINGUAL_CONFIG, run_dir, args.data, extra))
        runs[name] = run_record(run_dir, args.steps, changes)
    if args.baseline:
        runs = {BASELINE: run_record(Path(args.baseline), args.steps, []), **runs}
    return runs


# Settings that do not change the updates (where and how often a run logs, validates, keeps).
UNCOMPARED = {
    f"train.{key}"
    for key in ("keep_last", "log_every", "valid_every", "valid_max_tokens", "report",
                "average_last", "device", "dist_timeout", "dist_startup_timeout")
}  # fmt: skip


def check_baseline(args: argparse.Namespace) -> None:
    """SystemExit unless --baseline trained what the variants change: the recipe, with --set.

    With a cool-down, also to --steps updates and no minutes (its lr falls over the last share
    of the run: a longer run's is still high at --steps).
    """
    fixed = [f"train.max_steps={args.steps}", "train.max_minutes=0"]
    run = Path(args.baseline)
    ours = run_config(BILINGUAL_CONFIG, run, args.data, [*args.overrides, *fixed])
    ignored = UNCOMPARED | (
        set() if ours.train.cooldown else {"train.max_steps", "train.max_minutes"}
    )
    changed = [
        line
        for line in diff(load_run_config(run), ours, ("model", "tokenizer", "train"))
        if line.split(":")[0] not in ignored
    ]
    if changed:
        raise SystemExit(
            f"bench_levers: --baseline {run} did not train the recipe the variants change "
            f"({'; '.join(changed)}); leave --baseline out to train it here"
        )


def rows(runs: dict[str, dict[str, Any]]) -> list[str]:
    """One row per run: its changes, speed, tokens and dev BLEU at every validation step."""
    steps = sorted(set().union(*(run["bleu"].keys() for run in runs.values())))
    head = " | ".join(f"dev BLEU @ {s:,}" for s in steps)
    lines = [
        f"| run | change | updates | target tokens/s | target tokens | {head} |",
        "|---|---|---:|---:|---:|" + "---:|" * len(steps),
    ]
    for name, run in runs.items():
        change = ", ".join(f"`{c}`" for c in run["changes"]) or "none"
        cells = " | ".join(f"{run['bleu'][s]:.2f}" if s in run["bleu"] else "" for s in steps)
        lines.append(
            f"| {name} | {change} | {run['steps']:,} | {run['tok_s']:,.0f} | "
            f"{run['tokens'] / 1e6:.2f} M | {cells} |"
        )
    return lines


def rows_by_tokens(runs: dict[str, dict[str, Any]]) -> list[str]:
    """One row per validation of each run: the target tokens it had trained on, its dev BLEU."""
    lines = ["| run | updates | target tokens | dev BLEU |", "|---|---:|---:|---:|"]
    for name, run in runs.items():
        for step, bleu in sorted(run["bleu"].items()):
            lines.append(f"| {name} | {step:,} | {run['seen'][step] / 1e6:.2f} M | {bleu:.2f} |")
    return lines


def command(args: argparse.Namespace) -> str:
    """The options that shape the numbers, as they would be typed."""
    words = ["scripts/bench_levers.py", *(["--smoke"] if args.smoke else [])]
    words += ["--steps", str(args.steps), *(["--by-tokens"] if args.by_tokens else [])]
    words += ["--baseline", args.baseline] if args.baseline else []
    for variant in args.variant:
        words += ["--variant", *variant]
    words += ["--set", *args.set] if args.set else []
    return shlex.join(words)


def report(args: argparse.Namespace, runs: dict[str, dict[str, Any]]) -> str:
    """The Markdown section: command, machine, one row per run."""
    machine = f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()})"
    baseline = (
        f"the baseline is the existing run {args.baseline} (the unchanged recipe), read up to "
        f"update {args.steps:,}"
        if args.baseline
        else "the baseline is the unchanged recipe, trained in the same invocation"
    )
    lines = [
        SECTION,
        "",
        f"`{command(args)}` on {machine}, {torch.get_num_threads()} threads, "
        f"{time.strftime('%Y-%m-%d')}"
        + (" (smoke run: the numbers mean nothing)." if args.smoke else ".")
        + f" configs/multi30k.yaml, one change per run; {baseline}. Dev BLEU is each run's own "
        "validation (greedy, sacreBLEU cased) at the updates it validated at:",
        "",
        *rows(runs),
    ]
    if args.by_tokens:
        lines += [
            "",
            "The same validations by the target tokens each run had trained on (runs whose "
            "batches differ compare at equal tokens here, not at equal updates):",
            "",
            *rows_by_tokens(runs),
        ]
    return "\n".join(wrap(line) for line in lines) + "\n"


def main() -> None:
    """Parse arguments, train the runs, print (and maybe write) the section."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, "bench-levers")
    parser.add_argument("--steps", type=int, default=1200, help="updates of each run")
    parser.add_argument("--variant", nargs="+", action="append", default=[],
                        metavar="NAME [KEY=VALUE ...]",
                        help="a run named NAME with these overrides (repeat)")  # fmt: skip
    parser.add_argument("--by-tokens", action="store_true", help="also list every "
                        "validation by the target tokens trained on (for levers that change "
                        "the batch)")  # fmt: skip
    parser.add_argument("--baseline", help="an existing run of the unchanged recipe to read "
                        "instead of training one")  # fmt: skip
    args = parser.parse_args()
    names = [v[0] for v in args.variant]
    if BASELINE in names or len(set(names)) < len(names):
        parser.error(f"--variant names must be unique and not {BASELINE!r}")
    set_up(args)
    if args.smoke:
        args.steps = 10  # the smoke overrides' max_steps
    if args.baseline:
        check_baseline(args)
    publish(report(args, bench(args)), args.write, SECTION)


if __name__ == "__main__":
    main()
