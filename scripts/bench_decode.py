"""Decoding speed of a trained run on a test set: greedy and beam search, median of repeats.

    .venv/bin/python scripts/bench_decode.py runs/multi30k-de-en \\
        --src data/multi30k/test_2016_flickr.de.gz --ref data/multi30k/test_2016_flickr.en.gz

Prints a Markdown table (settings, seconds, sentences/s, target tokens/s, BLEU) for
docs/benchmarks.md. Each setting decodes the whole file once untimed, then `--repeats` times in
this process; the median time is reported. Threads: torch's default (all cores) unless
--threads is given. CPU set-up as `mt translate` (`configure_backends`: glibc keeps freed
memory; linear layers packed by oneDNN, large batches through BLAS where it was timed faster,
mt.packing). `--linear packed,onednn,plain` times the packed model without that hand-off (every
batch through oneDNN) and the unpacked nn.Linear model too. `--reorder in-place,copy` times beam
search's cache reorders as a CPU does them (only the rows that change, in place) and as a GPU
does them (every row selected into new buffers, mt.model.reorders_in_place).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from pathlib import Path
from unittest import mock

import sacrebleu
import torch

import mt.model
from mt.corpora import read_lines
from mt.device import configure_backends, cpu_model
from mt.packing import PackedLinear, pack
from mt.rundir import load_trained
from mt.translate import Translator, decode_settings

Setting = tuple[int, int, str, str]  # beam, decoding batch budget, linear layers, reorders


def bench(
    run: Path,
    src: Path,
    ref: Path,
    beams: list[int],
    budgets: list[int | None],
    repeats: int,
    precision: str,
    linears: list[str],
    reorders: list[str],
) -> None:
    """Time each beam size at each decoding batch budget (and kind of linear layers) and print
    the table. After one untimed pass of each setting, the repeats go round all settings in
    turn, so that a drift of the machine's speed touches them alike."""
    device = torch.device("cpu")
    configure_backends(device)  # as `mt translate` does: glibc keeps freed memory
    config, tokenizer, plain, checkpoint = load_trained(run, device)
    models = {"plain": plain}
    if "packed" in linears:  # as `mt translate` decodes (unchanged where packing does not apply)
        models["packed"] = pack(copy.deepcopy(plain), device, precision)
    if "onednn" in linears:  # packed, but no batch handed to BLAS (mt.packing.calibrate)
        models["onednn"] = pack(copy.deepcopy(plain), device, precision)
        for layer in models["onednn"].modules():
            if isinstance(layer, PackedLinear):
                layer.blas_rows = None
    sources, references = list(read_lines(src)), list(read_lines(ref))
    machine = cpu_model()
    threads = torch.get_num_threads()
    print(f"model: {checkpoint.weights} | {len(sources)} sentences | precision {precision} | "
          f"{threads} threads | {machine}")  # fmt: skip
    print()
    print("| search | batch tokens | linear layers | cache reorders | seconds (median) | "
          "sentences/s | target tokens/s | BLEU |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    settings = [
        (beam, budget or config.decode.max_tokens, linear, reorder)
        for beam in beams
        for budget in budgets
        for linear in linears
        for reorder in reorders
    ]
    times: dict[Setting, list[float]] = {s: [] for s in settings}
    outputs: dict[Setting, list] = {}
    for timed in [False] + [True] * repeats:
        for setting in settings:
            beam, budget, linear, reorder = setting
            decode = decode_settings(config, beam=beam, nbest=1)
            translator = Translator(tokenizer, models[linear], decode, device, precision)
            in_place = mock.patch.object(mt.model, "reorders_in_place", lambda index: False)
            with in_place if reorder == "copy" else contextlib.nullcontext():
                start = time.perf_counter()
                found = translator.translate(sources, max_tokens=budget)
                seconds = time.perf_counter() - start
            if timed:
                times[setting].append(seconds)
            outputs[setting] = found
    for (beam, budget, linear, reorder), found in outputs.items():
        seconds = statistics.median(times[beam, budget, linear, reorder])
        hyps = [o[0].text if o else "" for o in found]
        tokens = sum(len(o[0].tokens) + 1 for o in found if o)
        bleu = sacrebleu.corpus_bleu(hyps, [references]).score
        name = "greedy" if beam == 1 else f"beam {beam}"
        print(f"| {name} | {budget:,} | {linear} | {reorder} | {seconds:.2f} | "
              f"{len(sources) / seconds:.0f} | {tokens / seconds:,.0f} | {bleu:.2f} |")  # fmt: skip


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
    parser.add_argument("--linear", default="packed", help="comma-separated: packed (fp32 on a "
                        "CPU, as mt translate), onednn (packed, no BLAS hand-off), plain "
                        "(nn.Linear)")  # fmt: skip
    parser.add_argument("--reorder", default="in-place", help="comma-separated: in-place (a "
                        "CPU's cache reorders, as mt translate), copy (a GPU's)")  # fmt: skip
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    beams = [int(b) for b in args.beams.split(",")]
    budgets = [int(b) for b in args.max_tokens.split(",")] if args.max_tokens else [None]
    linears = args.linear.split(",")
    if not set(linears) <= {"packed", "onednn", "plain"}:
        parser.error(f"--linear {args.linear}: expected packed, onednn and/or plain")
    reorders = args.reorder.split(",")
    if not set(reorders) <= {"in-place", "copy"}:
        parser.error(f"--reorder {args.reorder}: expected in-place and/or copy")
    bench(args.run, args.src, args.ref, beams, budgets, args.repeats, args.precision, linears,
          reorders)  # fmt: skip


if __name__ == "__main__":
    main()
