"""What `make demo` gets in its default minutes on this CPU, against the demo it replaced.

    .venv/bin/python scripts/bench_demo.py --data ../shared/data/multi30k --minutes 5 \\
        --out runs/bench-demo --write docs/benchmarks.md

Trains German -> English for the same wall-clock minutes twice, one run after the other:
configs/demo.yaml (the demo's own config, sized for minutes), and the baseline, the one-hour
recipe configs/multi30k.yaml with the short warm-up the demo used before it had a config of its
own. Scores each on test_2016_flickr with its config's beam, and prints a Markdown table:
updates made, median target tokens/s, final dev BLEU, test BLEU. Run it on a quiet machine.
Runs already finished under --out are scored again, not retrained. --set KEY=VALUE ... adds
overrides to every run (the tests make both models tiny with it).
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "scripts"):  # run as a script from anywhere; bench.py sits beside it
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench import cpu_model, find_data, log, wrap, write_section  # noqa: E402

from mt.evaluate import evaluate_run  # noqa: E402
from mt.metrics import read_metrics  # noqa: E402

SECTION = "## make demo: what a newcomer gets in minutes"
# name -> (config, overrides): the demo today, and the demo before configs/demo.yaml.
SYSTEMS = {
    "configs/demo.yaml": ("configs/demo.yaml", []),
    "configs/multi30k.yaml, warm-up 200, lr 2e-3 (the demo before)": (
        "configs/multi30k.yaml",
        # The recipe as it was then: dropout 0.3, no cool-down, no EMA.
        [
            "train.warmup_steps=200",
            "train.lr=2e-3",
            "train.valid_every=100",
            "model.dropout=0.3",
            "train.cooldown=0",
            "train.ema_decay=0",
        ],
    ),
}


def train(config: str, overrides: list[str], run: Path, data: Path, minutes: float) -> None:
    """`mt train` for `minutes` of wall clock on the Multi30k files in `data`; then its report."""
    command = [sys.executable, "-m", "mt", "train", "--config", str(ROOT / config)]
    command += [f"run_dir={run}", f"train.max_minutes={minutes}", "train.log_every=25"]
    command += [f"data.train={data}/train", f"data.valid={data}/val"]
    command += [f"data.test={data}/test_2016_flickr", *overrides]
    subprocess.run(command, check=True)


def measure(run: Path) -> dict[str, float]:
    """Updates, median target tokens/s, last dev BLEU and test BLEU of a finished run."""
    (end,) = read_metrics(run, "end")[-1:]
    speed = statistics.median(r["tgt_tok_s"] for r in read_metrics(run, "train"))
    dev = read_metrics(run, "valid")[-1]["bleu"]
    (scores,) = evaluate_run(run).values()
    return {"updates": end["step"], "tok_s": speed, "dev": dev, "test": scores["bleu"].score}


def bench(args: argparse.Namespace) -> str:
    data = find_data(args.data)
    rows = []
    for index, (name, (config, overrides)) in enumerate(SYSTEMS.items()):
        run = args.out / f"run{index}"
        if not read_metrics(run, "end"):
            log(f"training {name} for {args.minutes} minutes in {run}")
            train(config, [*overrides, *args.set], run, data, args.minutes)
        result = measure(run)
        log(f"{name}: {result}")
        rows.append(
            f"| {name} | {result['updates']:,} | {result['tok_s']:,.0f} "
            f"| {result['dev']:.2f} | {result['test']:.2f} |"
        )
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    isa = torch.backends.cpu.get_cpu_capability()
    command = "python scripts/bench_demo.py " + shlex.join(sys.argv[1:])
    lines = [
        SECTION,
        "",
        f"Measured {now} on {cpu_model()} ({isa}), {torch.get_num_threads()} torch threads, "
        f"quiet machine. Command: `{command}`. German -> English, {args.minutes} minutes of "
        "training (validation included) per run, one run after the other; test_2016_flickr "
        "cased sacreBLEU with each config's beam search, dev BLEU from the run's last validation.",
        "",
        "| config | updates | target tokens/s | dev BLEU | test BLEU |",
        "|---|---:|---:|---:|---:|",
        *rows,
    ]
    return "\n".join(wrap(line) for line in lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="Multi30k directory (default: data/multi30k, shared)")
    parser.add_argument("--minutes", type=float, default=5.0, help="training minutes per run")
    parser.add_argument("--out", type=Path, default=ROOT / "runs/bench-demo")
    parser.add_argument("--write", type=Path, help="put the section into this Markdown file")
    parser.add_argument(
        "--set", nargs="+", default=[], metavar="KEY=VALUE", help="more overrides for every run"
    )
    args = parser.parse_args()
    section = bench(args)
    print(section, end="")
    if args.write:
        write_section(args.write, section, SECTION)


if __name__ == "__main__":
    main()
