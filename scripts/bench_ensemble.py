"""Ensembles on a test set: BLEU and speed of each model alone and of their log-linear ensemble.

    .venv/bin/python scripts/bench_ensemble.py --model runs/a --model runs/b \\
        --src data/multi30k/test_2016_flickr.de.gz --ref data/multi30k/test_2016_flickr.en.gz

Each --model (a run directory, a checkpoints directory or a .safetensors file) translates the
file alone, then all of them together as `mt translate --model A --model B` does
(`mt.translate.load_models`: equal weights unless --weights), all in this one process, in fp32,
on the same threads, with beam and length penalty from the first model's run unless --beam.
Prints a Markdown table for docs/benchmarks.md: cased BLEU, seconds for the whole file and
sentences/s (median of --repeats passes), and the ensemble's gain over its best member.
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
from mt.translate import Translator, decode_settings, load_models


def timed_bleu(
    paths: list[Path],
    weights: list[float] | None,
    sources: list[str],
    refs: list[str],
    args: argparse.Namespace,
) -> tuple[float, float]:
    """BLEU of the model (or ensemble) at `paths` on the file, and its median seconds."""
    device = torch.device("cpu")
    config, tokenizer, model, _ = load_models(paths, device, weights)
    settings = decode_settings(config, beam=args.beam, nbest=1)
    times, hyps = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = Translator(tokenizer, model, settings, device).translate(sources)
        times.append(time.perf_counter() - start)
        hyps = [best[0].text if best else "" for best in out]
    return sacrebleu.corpus_bleu(hyps, [refs]).score, statistics.median(times)


def bench(args: argparse.Namespace) -> list[str]:
    """The table's lines: each model alone, then the ensemble of all of them."""
    configure_backends(torch.device("cpu"))  # as `mt translate` does
    if args.threads:
        torch.set_num_threads(args.threads)
    sources, refs = list(read_lines(args.src)), list(read_lines(args.ref))
    systems = [(str(path), [path], None) for path in args.model]
    weights = f" (weights {', '.join(map(str, args.weights))})" if args.weights else ""
    systems.append((f"ensemble of {len(args.model)}{weights}", args.model, args.weights))
    machine = platform.processor() or platform.machine()
    lines = [
        f"{len(sources)} sentences of {args.src} | beam {args.beam or 'of the run'} | fp32 | "
        f"{torch.get_num_threads()} threads | {machine}",
        "",
        "| model | BLEU | seconds | sentences/s | BLEU over best member |",
        "|---|---:|---:|---:|---:|",
    ]
    best = None
    for name, paths, weight in systems:
        bleu, seconds = timed_bleu(paths, weight, sources, refs, args)
        gain = "" if best is None or len(paths) == 1 else f"{bleu - best:+.2f}"
        if len(paths) == 1:
            best = bleu if best is None else max(best, bleu)
        lines.append(
            f"| {name} | {bleu:.2f} | {seconds:.2f} | {len(sources) / seconds:.1f} | {gain} |"
        )
    return lines


def main() -> None:
    """Parse arguments, run the benchmark, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, action="append", required=True)
    parser.add_argument("--weights", type=float, action="append", help="one per --model")
    parser.add_argument("--src", type=Path, required=True)
    parser.add_argument("--ref", type=Path, required=True)
    parser.add_argument("--beam", type=int, help="default: the first run's decode.beam")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="default: torch's")
    args = parser.parse_args()
    if len(args.model) < 2:
        parser.error("give two --model or more")
    print("\n".join(bench(args)))


if __name__ == "__main__":
    main()
