"""Terminology constraints on a test set: constraints met, BLEU with and without, speed cost.

    .venv/bin/python scripts/bench_constraints.py runs/multi30k-de-en \\
        --src data/multi30k/test_2016_flickr.de.gz --ref data/multi30k/test_2016_flickr.en.gz

Each sentence's constraints are content words of its reference (words of 4 letters or more)
that the unconstrained beam search output missed: the first one or two, in reference order.
Prints a Markdown table for docs/benchmarks.md: sentences constrained, constraints met (in
pieces, as search checks them), BLEU without and with constraints, and the time of constrained
beam search over the whole file against unconstrained beam search's (median of repeats).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import sacrebleu
import torch

from mt.corpora import read_lines
from mt.device import configure_backends, cpu_model
from mt.rundir import load_trained
from mt.search import contains
from mt.translate import Translation, Translator, decode_settings


def missed_words(hypothesis: str, reference: str, count: int) -> list[str]:
    """The first `count` content words of the reference (4+ letters) absent from the hypothesis."""
    present = set(hypothesis.lower().split())
    words = [w for w in reference.split() if len(w) >= 4 and w.isalpha()]
    return [w for w in dict.fromkeys(words) if w.lower() not in present][:count]


def timed(run: Callable[[], list[list[Translation]]], repeats: int) -> tuple[float, list]:
    """The median seconds of `repeats` runs, and the last run's result."""
    times, out = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def bench(args: argparse.Namespace) -> None:
    """Translate without and with constraints for each count per sentence; print the table."""
    device = torch.device("cpu")
    configure_backends(device)  # as `mt translate` does
    config, tokenizer, model, checkpoint = load_trained(args.run, device)
    sources, refs = list(read_lines(args.src)), list(read_lines(args.ref))
    settings = decode_settings(config, beam=args.beam, nbest=1)

    def translate(constraints: list | None = None) -> list[list[Translation]]:
        return Translator(tokenizer, model, settings, device).translate(
            sources, constraints=constraints
        )

    plain_seconds, plain = timed(translate, args.repeats)
    plain_texts = [hyps[0].text for hyps in plain]
    plain_bleu = sacrebleu.corpus_bleu(plain_texts, [refs]).score
    machine = cpu_model()
    print(f"model: {checkpoint.weights} | {len(sources)} sentences | beam {args.beam} | fp32 | "
          f"{torch.get_num_threads()} threads | {machine}")  # fmt: skip
    print()
    print("| constraints per sentence | sentences constrained | constraints met | BLEU without "
          "| BLEU with | seconds without | seconds with | time ratio |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for count in args.counts:
        words = [missed_words(h, r, count) for h, r in zip(plain_texts, refs, strict=True)]
        phrases = [tokenizer.encode_tgt(w) if w else [] for w in words]
        seconds, out = timed(lambda phrases=phrases: translate(phrases), args.repeats)
        wanted = [(hyps[0].tokens, p) for hyps, ps in zip(out, phrases, strict=True) for p in ps]
        met = 100 * sum(contains(t, p) for t, p in wanted) / max(len(wanted), 1)
        bleu = sacrebleu.corpus_bleu([hyps[0].text for hyps in out], [refs]).score
        ratio = seconds / plain_seconds
        print(f"| {count} | {sum(map(bool, words))} | {met:.1f}% | {plain_bleu:.2f} | {bleu:.2f} "
              f"| {plain_seconds:.2f} | {seconds:.2f} | {ratio:.2f} |")  # fmt: skip


def main() -> None:
    """Parse arguments and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--src", type=Path, required=True)
    parser.add_argument("--ref", type=Path, required=True)
    parser.add_argument("--counts", default="1,2", help="constraints per sentence, e.g. 1,2")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    args.counts = [int(c) for c in args.counts.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    bench(args)


if __name__ == "__main__":
    main()
