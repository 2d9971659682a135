"""Decoding speed of a trained run on a test set: greedy and beam search, median of repeats.

    .venv/bin/python scripts/bench_decode.py runs/multi30k-de-en \\
        --src data/multi30k/test_2016_flickr.de.gz --ref data/multi30k/test_2016_flickr.en.gz

Prints a Markdown table (settings, seconds, sentences/s, target tokens/s, BLEU) for
docs/benchmarks.md. Each setting decodes the whole file `--repeats` times in this process;
the median time is reported. Threads: torch's default (all cores) unless --threads is given.
CPU set-up as `mt translate` (`configure_backends`: glibc keeps freed memory).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import sacrebleu
import torch

from mt.corpora import read_lines
from mt.device import configure_backends
from mt.packing import pack
from mt.rundir import load_trained
from mt.translate import decode_settings, translate_lines


def bench(
    run: Path,
    src: Path,
    ref: Path,
    beams: list[int],
    budgets: list[int | None],
    repeats: int,
    precision: str,
) -> None:
    """Time each beam size at each decoding batch budget and print the table. The repeats go
    round all settings in turn, so that a drift of the machine's speed touches them alike."""
    device = torch.device("cpu")
    configure_backends(device)  # as `mt translate` does: glibc keeps freed memory
    config, tokenizer, model, checkpoint = load_trained(run, device)
    pack(model, device, precision)  # as `mt translate` decodes
    sources, references = list(read_lines(src)), list(read_lines(ref))
    machine = platform.processor() or platform.machine()
    threads = torch.get_num_threads()
    print(f"model: {checkpoint.weights} | {len(sources)} sentences | precision {precision} | "
          f"{threads} threads | {machine}")  # fmt: skip
    print()
    print("| search | batch tokens | seconds (median) | sentences/s | target tokens/s | BLEU |")
    print("|---|---|---|---|---|---|")
    settings = [(beam, budget or config.decode.max_tokens) for beam in beams for budget in budgets]
    times: dict[tuple[int, int], list[float]] = {s: [] for s in settings}
    outputs: dict[tuple[int, int], list] = {}
    for _ in range(repeats):
        for beam, budget in settings:
            decode = decode_settings(config, beam=beam, nbest=1)
            start = time.perf_counter()
            found = translate_lines(sources, tokenizer, model, decode, device, precision, budget)
            times[beam, budget].append(time.perf_counter() - start)
            outputs[beam, budget] = found
    for (beam, budget), found in outputs.items():
        seconds = statistics.median(times[beam, budget])
        hyps = [o[0].text if o else "" for o in found]
        tokens = sum(len(o[0].tokens) + 1 for o in found if o)
        bleu = sacrebleu.corpus_bleu(hyps, [references]).score
        name = "greedy" if beam == 1 else f"beam {beam}"
        print(f"| {name} | {budget:,} | {seconds:.2f} | {len(sources) / seconds:.0f} | "
              f"{tokens / seconds:,.0f} | {bleu:.2f} |")  # fmt: skip


def main() -> None:
    """Parse arguments and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--src", type=Path, required=True)
    parser.add_argument("--ref", type=Path, required=True)
    parser.add_argument("--beams", default="1,5", help="comma-separated beam sizes")
    parser.add_argument("--max-tokens", default="", help="comma-separated decoding batch "
                        "budgets (default: the run's decode.max_tokens)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    beams = [int(b) for b in args.beams.split(",")]
    budgets = [int(b) for b in args.max_tokens.split(",")] if args.max_tokens else [None]
    bench(args.run, args.src, args.ref, beams, budgets, args.repeats, args.precision)


if __name__ == "__main__":
    main()
