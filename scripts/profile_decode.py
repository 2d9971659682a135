"""Where decoding's time goes in mt and in CTranslate2: each one's own process, sampled by perf.

    .venv/bin/python scripts/profile_decode.py --run runs/multi30k-de-en --data data/multi30k
    .venv/bin/python scripts/profile_decode.py --smoke          # seconds, for tests

Both decode Multi30k's test_2016_flickr (German → English) with beam 5 on the same threads, as
scripts/bench_ct2.py runs them: mt in a child process set up as `mt translate` sets up (fp32,
linear layers packed, its own batches), CTranslate2 float32 (`mt export --format ct2` of the same
weights) with its own search in 4,096-token batches, in a child process without torch
(scripts/ct2_worker.py). Each child decodes the file once unsampled; then `perf record` attaches
to it for a second pass only, so that start-up, imports and the first pass stay out. perf's
samples are grouped by what the code does (GROUPS, matched on shared object and symbol) into a
Markdown table, with each side's top symbols after it. `--fixed-length L` makes every output of
both exactly L pieces (as bench_ct2.py's fixed-length protocol), so that both do the same work.
Needs perf (Debian's linux-perf) allowed to sample this user's processes.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "scripts"):  # run as a script from anywhere; bench.py sits beside it
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench import TEST_PREFIX, cpu_model, find_data, log, publish, wrap  # noqa: E402
from bench_ct2 import (  # noqa: E402
    TINY_DATA,
    Child,
    add_system_arguments,
    export_all,
    fixed_length,
    mt_process,
    own_most,
    smoke_run,
    worker_search,
)

from mt.corpora import read_lines  # noqa: E402
from mt.errors import MtError  # noqa: E402
from mt.rundir import load_run_config, load_trained  # noqa: E402
from mt.translate import encode_sources  # noqa: E402

SECTION = "### Where a decoding pass goes: mt and CTranslate2 sampled by perf"
FREQUENCY = 999  # samples per second and thread
BATCH = 4096  # CTranslate2's tokens per batch: its best batching in scripts/bench_ct2.py
ATTACH_SECONDS = 1.0  # perf prints no sign that it is attached; the child idles meanwhile

# What each sample's code does, by its shared object and symbol: the first match wins (an MKL
# copy inside a matrix product counts as the product).
GROUPS: list[tuple[str, Callable[[str, str], bool]]] = [
    ("matrix products (BLAS, oneDNN, JIT kernels)",
     lambda dso, sym: dso.startswith("[JIT]") or bool(re.search(r"gemm|gemv|dnnl|bmm", sym))),
    ("softmax, log-softmax and exp",
     lambda dso, sym: bool(re.search(r"softmax|Sleef_\w*exp|exp256", sym))),
    ("top-k and maxima", lambda dso, sym: bool(re.search(r"topk|TopK|introselect|max", sym))),
    ("copies and gathers",
     lambda dso, sym: bool(re.search(r"mem(move|cpy)|copy|index_select|gather|Gather|concat|"
                                     r"Concat", sym))),
    ("layer norm", lambda dso, sym: bool(re.search(r"layer_?norm|LayerNorm|RowwiseMoments", sym))),
    ("memory allocation", lambda dso, sym: bool(re.search(r"malloc|_int_free|cfree", sym))),
    ("OpenMP runtime (threads waiting)", lambda dso, sym: "gomp" in dso or "iomp" in dso),
    ("Python interpreter", lambda dso, sym: "libpython" in dso),
    ("operating system kernel", lambda dso, sym: dso.startswith("[kernel")),
]  # fmt: skip
OTHER = "other"
NO_SYMBOL = "(no symbol)"


@dataclass
class Profile:
    """One system's sampled pass: seconds, samples, and the share of each (dso, symbol)."""

    name: str
    seconds: float
    samples: int
    symbols: list[tuple[float, str, str]]  # (share of samples, shared object, symbol)

    def groups(self) -> dict[str, float]:
        """Each group's share of the samples, GROUPS' order, then OTHER."""
        shares = {name: 0.0 for name, _ in GROUPS} | {OTHER: 0.0}
        for share, dso, sym in self.symbols:
            shares[group_of(dso, sym)] += share
        return shares


def group_of(dso: str, sym: str) -> str:
    """The GROUPS name of code in shared object `dso` and symbol `sym`, else OTHER."""
    return next((name for name, match in GROUPS if match(dso, sym)), OTHER)


def parse_report(text: str) -> tuple[int, list[tuple[float, str, str]]]:
    """Samples and (share, dso, symbol) rows of `perf report -n -t '|' --sort dso,sym` output.

    Rows best first. Code without a symbol (JIT-compiled kernels, a stripped library's addresses)
    is one row per shared object, JIT code of every thread one row: "[JIT]", NO_SYMBOL.
    """
    merged: dict[tuple[str, str], float] = {}
    samples = 0
    for line in text.splitlines():
        fields = [f.strip() for f in line.split("|", 3)]
        if line.startswith("#") or len(fields) != 4 or not fields[0].endswith("%"):
            continue
        share, count, dso, sym = fields
        samples += int(count)
        sym = re.sub(r"^\[.\]\s*", "", sym)
        if dso.startswith("[JIT]") or re.fullmatch(r"0x[0-9a-f]+", sym):
            dso, sym = ("[JIT]" if dso.startswith("[JIT]") else dso), NO_SYMBOL
        merged[dso, sym] = merged.get((dso, sym), 0.0) + float(share[:-1]) / 100
    rows = sorted(((share, dso, sym) for (dso, sym), share in merged.items()), reverse=True)
    return samples, rows


def perf_usable() -> str | None:
    """Why perf cannot sample this user's processes here, or None where it can."""
    if shutil.which("perf") is None:
        return "perf is not installed (Debian: apt-get install linux-perf)"
    with tempfile.TemporaryDirectory() as tmp:
        probe = subprocess.run(
            ["perf", "record", "-e", "cpu-clock", "-o", f"{tmp}/probe", "--quiet", "true"],
            capture_output=True,
            text=True,
        )
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or ["no output"])[0]
        return f"perf record fails here ({reason})"
    return None


def sampled(name: str, child: Child, request: Any, workdir: Path) -> Profile:
    """`name`'s second pass over `request` under perf record (the first one unsampled)."""
    log(f"{name}: an unsampled pass")
    child(request)
    data = workdir / f"{name.replace(' ', '-')}.perf"
    perf = subprocess.Popen(
        ["perf", "record", "-e", "cpu-clock", "-F", str(FREQUENCY), "-p",
         str(child.process.pid), "-o", str(data), "--quiet"],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(ATTACH_SECONDS)
        log(f"{name}: the sampled pass")
        start = time.perf_counter()
        child(request)
        seconds = time.perf_counter() - start
    finally:
        perf.send_signal(signal.SIGINT)
        perf.wait()
        child.close()
    report = subprocess.run(
        ["perf", "report", "-i", str(data), "-n", "--no-children", "--sort", "dso,sym",
         "-g", "none", "--stdio", "-t", "|"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    samples, symbols = parse_report(report)
    return Profile(name, seconds, samples, symbols)


def profile(
    run: Path, sources: list[str], threads: int, beam: int, workdir: Path, length: int = 0
) -> list[Profile]:
    """mt's and CTranslate2's sampled passes over `sources`.

    length > 0: both make every output exactly that many pieces (the same work for both).
    """
    _, tokenizer, model, _ = load_trained(run, torch.device("cpu"))
    settings = {"beam": beam, "nbest": 1}
    settings = fixed_length(settings, length) if length else settings
    mt = mt_process(str(run), "packed", threads, **settings)
    profiles = [sampled("mt", mt, sources, workdir)]
    directory = export_all(model, tokenizer, workdir)["CT2 float32"]
    most = own_most(model.max_positions)
    ct2 = worker_search(directory, threads, beam, BATCH, length, most, workers=1)
    ids = encode_sources(sources, tokenizer, model.max_positions - 1)
    pieces = [[tokenizer.src.id_to_piece(t) for t in seq] for seq in ids]
    profiles.append(sampled("CTranslate2", ct2, pieces, workdir))
    return profiles


def section_heading(length: int) -> str:
    """The section's heading: one for outputs of their own length, one per fixed length."""
    return SECTION + (f", {length} pieces per output" if length else "")


def report(args: argparse.Namespace, profiles: list[Profile], sentences: int) -> str:
    """The Markdown section: group shares side by side, then each side's top symbols."""
    import ctranslate2

    command = "python scripts/profile_decode.py " + " ".join(sys.argv[1:])
    L = args.fixed_length
    exact = (
        f" Every output exactly {L} pieces (mt: `min_len` {L}, limit {L} + EOS; CTranslate2: "
        f"`min_decoding_length` = `max_decoding_length` = {L}), the same work for both."
    )
    lines = [
        section_heading(L),
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {cpu_model()}, "
        f"{args.threads} threads for each; torch {torch.__version__}, ctranslate2 "
        f"{ctranslate2.__version__}. Command: `{command}`. {sentences:,} sentences, beam "
        f"{args.beam}; one pass of each after an unsampled one, perf sampling its process at "
        f"{FREQUENCY} Hz per thread (cpu-clock). mt: fp32, packed, its own batches, as `mt "
        f"translate`; CTranslate2: float32, its own search in {BATCH:,}-token batches, in a "
        "process without torch." + (exact if L else ""),
        "",
        "| where the time goes | " + " | ".join(p.name for p in profiles) + " |",
        "|---|" + "---:|" * len(profiles),
        "| seconds of the pass | " + " | ".join(f"{p.seconds:.2f}" for p in profiles) + " |",
        "| samples | " + " | ".join(f"{p.samples:,}" for p in profiles) + " |",
    ]
    shares = [p.groups() for p in profiles]
    lines += [
        f"| {name} | " + " | ".join(f"{s[name]:.1%}" for s in shares) + " |" for name in shares[0]
    ]
    for p in profiles:
        lines += ["", f"{p.name}'s top symbols:", "", "| share | shared object | symbol |",
                  "|---:|---|---|"]  # fmt: skip
        for share, dso, sym in p.symbols[: args.top]:
            lines.append(f"| {share:.1%} | {dso} | `{sym[:90]}` |")
    return "\n".join(wrap(line) for line in lines) + "\n"


def main() -> None:
    """Parse arguments, sample both systems, print (and maybe write) the section."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_system_arguments(parser)
    parser.add_argument("--fixed-length", type=int, default=0, metavar="L",
                        help="make every output exactly L pieces, in both systems")  # fmt: skip
    parser.add_argument("--top", type=int, default=8, help="top symbols listed per system")
    parser.add_argument("--workdir", help="export and perf data (default runs/profile-decode)")
    parser.add_argument("--smoke", action="store_true", help="seconds-long run for tests")
    parser.add_argument("--write", help="Markdown file whose section to replace")
    args = parser.parse_args()
    unusable = perf_usable()
    if unusable:
        raise SystemExit(f"profile_decode: {unusable}")
    workdir = Path(args.workdir or "runs/profile-decode" + ("-smoke" if args.smoke else ""))
    workdir.mkdir(parents=True, exist_ok=True)
    run = Path(args.run) if args.run else smoke_run(workdir) if args.smoke else None
    if run is None:
        parser.error("--run is required (or --smoke)")
    src = load_run_config(run).data.src_lang  # the run's source language
    test = f"{TEST_PREFIX}.{src}.gz"
    source = TINY_DATA / "valid.de" if args.smoke else find_data(args.data) / test
    sources = list(read_lines(source))[: args.sentences or (16 if args.smoke else None)]
    try:
        profiles = profile(run, sources, args.threads, args.beam, workdir, args.fixed_length)
    except MtError as exc:  # e.g. no ctranslate2, or not a run
        raise SystemExit(f"profile_decode: {exc}") from None
    publish(report(args, profiles, len(sources)), args.write, section_heading(args.fixed_length))


if __name__ == "__main__":
    main()
