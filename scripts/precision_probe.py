"""What `precision: auto` picks on this CPU for a config, and whether it is the faster choice.

    .venv/bin/python scripts/precision_probe.py --config configs/multi30k.yaml --repeats 10
    .venv/bin/python scripts/precision_probe.py --config configs/multi30k.yaml --reference
    .venv/bin/python scripts/precision_probe.py --config configs/multi30k.yaml \\
        --train 100 --data data/multi30k

Prints the CPU (model name; AVX-512 BF16 and AMX flags) and torch's threads, then `auto`'s
start-up measurement `--repeats` times (the choice should not flap). `--reference` also times
both precisions on every product at all the rows, without a budget: slow where bf16 is slow (a
single bf16 product of thousands of rows can take seconds there). `--train N` settles it: `mt
train` for N updates in fp32 and then in bf16 (no validation), median target tokens/s of each.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from mt.config import load_config
from mt.device import (
    MEASURED,
    Measurement,
    choose_precision,
    configure_backends,
    model_products,
    resolve_precision,
    time_linear,
)
from mt.metrics import read_metrics

CPU = torch.device("cpu")
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_line() -> str:
    """The CPU's model name and which of FLAGS it has (from /proc/cpuinfo where there is one)."""
    info = Path("/proc/cpuinfo")
    text = info.read_text(encoding="utf-8") if info.is_file() else ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    name = fields.get("model name", platform.processor() or platform.machine())
    flags = set(fields.get("flags", "").split())
    have = ", ".join(f"{'+' if flag in flags else '-'}{flag}" for flag in FLAGS)
    return f"{name} ({have}); torch {torch.__version__}, {torch.get_num_threads()} threads"


def reference(products: list[tuple[int, int]], rows: int) -> Measurement:
    """Both precisions on every product at all `rows` rows, as the measurement times a rung."""
    rates = {}
    for precision in MEASURED:
        seconds = 0.0
        for features in products:
            seconds += min(time_linear(precision, rows, features, float("inf"))[1:])
        rates[precision] = 2 * rows * sum(k * n for k, n in products) / seconds / 1e9
    return Measurement(rows, rates, 0.0)


def train_speed(config: Path, precision: str, steps: int, data: Path | None, out: Path) -> float:
    """Median target tokens/s of `mt train` in `precision` for `steps` updates, no validation."""
    run = out / precision
    overrides = [
        f"run_dir={run}", f"train.precision={precision}", f"train.max_steps={steps}",
        "train.max_minutes=0", "train.log_every=10", "train.report=false", "data.valid=",
        "data.test=", f"data.cache_dir={out / 'cache'}",
    ]  # fmt: skip
    if data is not None:
        overrides.append(f"data.train={data.resolve()}/train")
    command = [sys.executable, "-m", "mt", "train", "--config", str(config), *overrides]
    subprocess.run(command, check=True)
    records = read_metrics(run, "train")[1:]  # the first window includes warming up
    return statistics.median(r["tgt_tok_s"] for r in records)


def main() -> None:
    """Parse arguments, measure, print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--vocab", type=int, default=0, help="default: tokenizer.vocab_size")
    parser.add_argument("--rows", type=int, default=0, help="default: train.max_tokens")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reference", action="store_true")
    parser.add_argument("--train", type=int, default=0, help="updates per precision")
    parser.add_argument("--data", type=Path, help="a directory of Multi30k-named files")
    args = parser.parse_args()
    config = load_config(args.config)
    vocab = args.vocab or config.tokenizer.vocab_size
    products = model_products(config.model.dim, config.model.ffn_dim, vocab)
    rows = args.rows or config.train.max_tokens
    configure_backends(CPU)  # as training does
    print(cpu_line())
    print(f"products (in, out): {products}; up to {rows:,} rows")
    for _ in range(args.repeats):
        print(f"auto: {resolve_precision('auto', CPU, products, rows).describe()}")
    if args.reference:
        full = reference(products, rows)
        speeds = ", ".join(f"{p} {rate:,.1f}" for p, rate in full.rates.items())
        print(f"reference at {rows:,} rows: {speeds} GFLOP/s; the rule picks ", end="")
        print(choose_precision(full, rows))
    if args.train:
        with tempfile.TemporaryDirectory() as out:
            for precision in MEASURED:
                speed = train_speed(args.config, precision, args.train, args.data, Path(out))
                print(f"mt train, {args.train} updates in {precision}: {speed:,.0f} tgt tok/s")


if __name__ == "__main__":
    main()
