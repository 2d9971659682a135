"""Data at scale: mt's data pipeline on a synthetic corpus of 0.5 to 5 million sentence pairs.

    .venv/bin/python scripts/bench_data.py                            # prints a Markdown section
    .venv/bin/python scripts/bench_data.py --write docs/benchmarks.md # ... and puts it in the file
    .venv/bin/python scripts/bench_data.py --smoke --workdir /tmp/x   # seconds, for tests

The corpus is generated, never downloaded or committed: plain-text `train.src` / `train.tgt`
files written in chunks of 10,000 pairs, each chunk from its own seeded generator, so the first
N pairs of any size are the same. Words are Zipf-distributed over a 30,000-word synthetic
vocabulary per language (lowercase letters; frequent words short, about 5 letters in running
text); sentences have 5-60 words (log-normal, median 20: about 140 characters, like WMT's news
text); the target translates each source word through a fixed dictionary, with 10% of words
substituted, 5% dropped and 5% doubled, and 1% of pairs are broken (empty target, or one word)
so that the length filter has something to drop.

One joint SentencePiece model is trained once, by `mt.tokenizer.train_tokenizer`, on the first
--sample-pairs pairs (with `input_sentence_size` sampling) and reused for every size. Each size
then runs in a fresh process (`--phase`), so that its peak memory is its own: `encode_corpus`
(filter on, --num-proc workers) into an empty cache, then one epoch of training batches as
`mt train` builds them (`BatchSampler`, `len(sampler)`, then `mt.batching.plan_updates`, which
collates every batch from the memory map).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "scripts"):  # run as a script from anywhere; bench.py sits beside it
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench import cpu_model, log, run_phase, wrap, write_section  # noqa: E402

from mt.batching import BatchSampler, plan_updates  # noqa: E402
from mt.config import DataConfig, TokenizerConfig  # noqa: E402
from mt.corpora import open_corpus  # noqa: E402
from mt.data import encode_corpus  # noqa: E402
from mt.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402

HEADING = "## Data at scale: encoding"  # + " up to N pairs"; a rerun replaces the section
SRC, TGT = "src", "tgt"  # the corpus files are train.src and train.tgt
CHUNK = 10_000  # pairs per generator chunk (and per write)
WORDS = 30_000  # synthetic words per language
ZIPF_S = 1.1  # word frequency ~ 1 / rank ** ZIPF_S
MEDIAN_WORDS, SIGMA, MIN_WORDS, MAX_WORDS = 20, 0.55, 5, 60  # source sentence lengths
SUBSTITUTED, DROPPED, DOUBLED, BROKEN = 0.10, 0.05, 0.05, 0.01  # target noise
SIZES = [500_000, 1_000_000, 2_000_000, 5_000_000]
SMOKE_SIZES = [2000, 4000]
SAMPLE_EVERY = 0.05  # seconds between memory samples


# ---------------------------------------------------------------------------------------------
# The synthetic corpus


def make_vocab(rng: np.random.Generator, size: int) -> np.ndarray:
    """`size` distinct lowercase words, by rank: frequent words are short, as in real text."""
    ranks = np.arange(1, size + 1)
    noisy = 2 + 0.8 * np.log(ranks) + rng.normal(0, 0.7, size)  # about 5 letters in running text
    lengths = np.clip(np.rint(noisy), 1, 14).astype(np.int64)
    words = np.empty(size, dtype=object)
    redraw = ranks - 1
    while redraw.size:
        words[redraw] = random_words(rng, lengths[redraw])
        repeated = np.ones(size, dtype=bool)
        repeated[np.unique(words, return_index=True)[1]] = False
        redraw = np.flatnonzero(repeated)
        lengths[redraw] += 1  # a crowded length (26 one-letter words) moves up a letter
    return words


def random_words(rng: np.random.Generator, lengths: np.ndarray) -> list[str]:
    """Random lowercase words of the given lengths."""
    letters = (rng.integers(0, 26, size=int(lengths.sum())) + ord("a")).astype(np.uint8)
    blob = letters.tobytes().decode("ascii")
    ends = np.cumsum(lengths).tolist()
    return [blob[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]


def vocabularies(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The source and target word lists; the dictionary maps source rank r to target rank r."""
    rng = np.random.default_rng([seed, 0])
    return make_vocab(rng, WORDS), make_vocab(rng, WORDS)


def zipf_ranks(rng: np.random.Generator, n: int) -> np.ndarray:
    """n word ranks drawn from the Zipf law over WORDS words: (n,) int64."""
    cdf = np.cumsum(1.0 / np.arange(1, WORDS + 1) ** ZIPF_S)
    return np.minimum(np.searchsorted(cdf / cdf[-1], rng.random(n), side="right"), WORDS - 1)


def join_lines(vocab: np.ndarray, ranks: np.ndarray, lengths: np.ndarray) -> list[str]:
    """One line of space-separated words per sentence of `lengths` words."""
    words = vocab[ranks].tolist()
    ends = np.cumsum(lengths).tolist()
    return [" ".join(words[a:b]) for a, b in zip([0, *ends[:-1]], ends, strict=True)]


def chunk_pairs(seed: int, k: int, vocabs: tuple[np.ndarray, np.ndarray]) -> tuple[list, list]:
    """Chunk k of the corpus: CHUNK source lines and their noisy translations."""
    rng = np.random.default_rng([seed, 1, k])
    lognormal = rng.lognormal(np.log(MEDIAN_WORDS), SIGMA, CHUNK)
    lengths = np.clip(np.rint(lognormal), MIN_WORDS, MAX_WORDS).astype(np.int64)  # (CHUNK,)
    src = zipf_ranks(rng, int(lengths.sum()))  # (W,) all words of the chunk
    tgt = np.where(rng.random(src.size) < SUBSTITUTED, zipf_ranks(rng, src.size), src)
    copies = rng.choice(3, size=src.size, p=[DROPPED, 1 - DROPPED - DOUBLED, DOUBLED])  # (W,)
    starts = np.cumsum(lengths) - lengths
    src_lines = join_lines(vocabs[0], src, lengths)
    tgt_lines = join_lines(vocabs[1], np.repeat(tgt, copies), np.add.reduceat(copies, starts))
    for i in np.flatnonzero(rng.random(CHUNK) < BROKEN).tolist():
        tgt_lines[i] = tgt_lines[i].split(" ")[0] if i % 2 else ""
    return src_lines, tgt_lines


def write_corpus(prefix: Path, pairs: int, seed: int) -> None:
    """Write `prefix`.src and `prefix`.tgt with the first `pairs` pairs, chunk by chunk."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    vocabs = vocabularies(seed)
    with (
        open(f"{prefix}.{SRC}", "w", encoding="utf-8") as src,
        open(f"{prefix}.{TGT}", "w", encoding="utf-8") as tgt,
    ):
        for k in range(-(-pairs // CHUNK)):
            keep = min(CHUNK, pairs - k * CHUNK)
            src_lines, tgt_lines = chunk_pairs(seed, k, vocabs)
            src.write("\n".join(src_lines[:keep]) + "\n")
            tgt.write("\n".join(tgt_lines[:keep]) + "\n")


# ---------------------------------------------------------------------------------------------
# Child phase: encode one corpus and build one epoch of batches, watching memory


def proc_status() -> dict[str, float]:
    """This process's memory counters from /proc/self/status, MiB (Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) / 1024  # the kernel writes kB
    return out


class MemoryPeaks:
    """Samples RssAnon and RssFile in a background thread; keeps their maxima per phase.

    RSS counts the pages of the memory-mapped Arrow cache that the process has touched
    (RssFile): they are page cache, dropped under memory pressure. RssAnon is heap and
    other private memory, which must fit. Sampling can miss a peak shorter than the period.
    """

    def __init__(self, every: float = SAMPLE_EVERY) -> None:
        self.every = every
        self.phases: dict[str, dict[str, float]] = {}
        self._current = {"RssAnon": 0.0, "RssFile": 0.0}
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemoryPeaks:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._done.wait(self.every):
            self._sample()

    def _sample(self) -> None:
        status = proc_status()
        with self._lock:
            for key in self._current:
                self._current[key] = max(self._current[key], status[key])

    def end_phase(self, name: str) -> None:
        """Record the maxima since the previous phase ended under `name`; start a new phase."""
        self._sample()
        with self._lock:
            self.phases[name] = dict(self._current)
            self._current = dict.fromkeys(self._current, 0.0)


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (encoding workers)."""
    own, kids = (
        resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure_phase(spec: dict[str, Any]) -> dict[str, Any]:
    """Encode the corpus into an empty cache, then build and collate one epoch of batches."""
    tokenizer = load_tokenizer(Path(spec["tokenizer"]))
    corpus = open_corpus(spec["corpus"], SRC, TGT)
    res: dict[str, Any] = {"start": proc_status()}
    with MemoryPeaks() as peaks:
        t0, c0 = time.perf_counter(), cpu_seconds()
        settings = DataConfig(num_proc=spec["num_proc"])
        data = encode_corpus(corpus, tokenizer, Path(spec["cache"]), settings, filter_lengths=True)
        t1, c1 = time.perf_counter(), cpu_seconds()
        peaks.end_phase("encode")
        sampler = BatchSampler(data.src_lens, data.tgt_lens, spec["max_tokens"], spec["seed"])
        res["batches"] = len(sampler)  # what mt train logs first: epoch 1's batch index
        t2 = time.perf_counter()
        peaks.end_phase("index")
        batched = tokens = 0
        for update in plan_updates(sampler, data, (1, 0), 1, 1):
            for batch in update.batches:
                batched += len(batch.indices)
                tokens += batch.src_tokens + batch.tgt_tokens  # non-pad, EOS included
        t3 = time.perf_counter()
        peaks.end_phase("epoch")
    res.update(
        total=data.stats.total, kept=data.stats.kept, batched=batched, tokens=tokens,
        encode_s=t1 - t0, encode_cpu_s=c1 - c0, index_s=t2 - t1, epoch_s=t3 - t2,
        phases=peaks.phases, end=proc_status(),
        peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        workers_peak_rss=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        cache_bytes=sum(f.stat().st_size for f in Path(spec["cache"]).rglob("*") if f.is_file()),
    )  # fmt: skip
    res["peak_anon"] = max(p["RssAnon"] for p in res["phases"].values())
    res["peak_file"] = max(p["RssFile"] for p in res["phases"].values())
    return res


# ---------------------------------------------------------------------------------------------
# Parent: corpus, tokenizer, one child per size, report


def child(spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Run the measure phase in a fresh interpreter; its JSON result."""
    return run_phase(__file__, "measure", f"pairs-{spec['pairs']}", spec, workdir)


def train_sample_tokenizer(args: argparse.Namespace, workdir: Path) -> float:
    """Train the joint tokenizer on the first --sample-pairs pairs; its training seconds."""
    prefix = workdir / "sample" / "train"
    write_corpus(prefix, args.sample_pairs, args.seed)
    start = time.perf_counter()
    # input_sentence_size: half of the sample's sentences
    config = TokenizerConfig(vocab_size=args.vocab_size, input_sentence_size=args.sample_pairs)
    train_tokenizer(open_corpus(str(prefix), SRC, TGT), workdir / "tokenizer", config, args.seed)
    return time.perf_counter() - start


def measure_size(args: argparse.Namespace, workdir: Path, pairs: int) -> dict[str, Any]:
    """Generate the first `pairs` pairs, measure them in a child, clean up unless --keep."""
    directory = workdir / f"pairs-{pairs}"
    shutil.rmtree(directory, ignore_errors=True)  # an old cache would be reused, not measured
    start = time.perf_counter()
    write_corpus(directory / "train", pairs, args.seed)
    log(f"{pairs:,} pairs: generated in {time.perf_counter() - start:.0f} s; measuring")
    text_bytes = sum((directory / f"train.{lang}").stat().st_size for lang in (SRC, TGT))
    spec = {
        "pairs": pairs,
        "corpus": str(directory / "train"),
        "cache": str(directory / "cache"),
        "tokenizer": str(workdir / "tokenizer"),
        "num_proc": args.num_proc,
        "max_tokens": args.max_tokens,
        "seed": args.seed,
    }
    res = {**child(spec, workdir), "pairs": pairs, "num_proc": args.num_proc}
    res["text_bytes"] = text_bytes
    log(
        f"  {pairs / res['encode_s']:,.0f} pairs/s, peak RSS {res['peak_rss']:,.0f} MiB, "
        f"peak anon {res['peak_anon']:,.0f} MiB"
    )
    if not args.keep:
        shutil.rmtree(directory)
    return res


def versions() -> str:
    """Versions of the libraries the pipeline runs on."""
    import datasets
    import pyarrow
    import sentencepiece
    import torch

    return (
        f"torch {torch.__version__}, datasets {datasets.__version__}, pyarrow "
        f"{pyarrow.__version__}, sentencepiece {sentencepiece.__version__}, numpy "
        f"{np.__version__}, Python {platform.python_version()}"
    )


def table(results: list[dict[str, Any]], num_proc: int) -> list[str]:
    """The Markdown table, one row per size (with the workers' peak RSS when there are any)."""
    workers = num_proc > 1
    rows = [
        "| pairs | kept | encode s | pairs/s | CPU s | batches | index s | epoch s | peak RSS MiB "
        "| peak anon MiB | anon before MiB | cache MiB | cache B/pair |"
        + (" worker peak RSS MiB |" if workers else ""),
        "|---:" * (14 if workers else 13) + "|",
    ]
    for r in results:
        rows.append(
            f"| {r['pairs']:,} | {r['kept']:,} | {r['encode_s']:.1f} | "
            f"{r['pairs'] / r['encode_s']:,.0f} | {r['encode_cpu_s']:.1f} | {r['batches']:,} | "
            f"{r['index_s']:.2f} | {r['epoch_s']:.1f} | {r['peak_rss']:,.0f} | "
            f"{r['peak_anon']:,.0f} | {r['start']['RssAnon']:,.0f} | "
            f"{r['cache_bytes'] / 2**20:,.0f} | {r['cache_bytes'] / r['kept']:.0f} |"
            + (f" {r['workers_peak_rss']:,.0f} |" if workers else "")
        )
    return rows


def growth(results: list[dict[str, Any]]) -> str:
    """How much peak anon memory and peak RSS grow per extra pair, smallest to largest size."""
    first, last = results[0], results[-1]
    extra = last["pairs"] - first["pairs"]
    if extra <= 0:
        return ""
    anon, rss = ((last[k] - first[k]) * 2**20 / extra for k in ("peak_anon", "peak_rss"))
    return (
        f"From {first['pairs']:,} to {last['pairs']:,} pairs, peak anon grows by "
        f"{anon:,.0f} bytes per extra pair and peak RSS by {rss:,.0f} (the cache is "
        f"{last['cache_bytes'] / last['kept']:.0f} bytes per pair)."
    )


def phase_table(results: list[dict[str, Any]]) -> list[str]:
    """Peak RssAnon / RssFile per phase, one row per size."""
    names = list(results[0]["phases"])
    rows = [
        "| pairs | " + " | ".join(f"{n}: anon / file MiB" for n in names) + " |",
        "|---:|" + "---:|" * len(names),
    ]
    for r in results:
        cells = [
            f"{r['phases'][n]['RssAnon']:,.0f} / {r['phases'][n]['RssFile']:,.0f}" for n in names
        ]
        rows.append(f"| {r['pairs']:,} | " + " | ".join(cells) + " |")
    return rows


def report(args: argparse.Namespace, results: list[dict[str, Any]], tokenizer_s: float) -> str:
    """The Markdown section."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python scripts/bench_data.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    largest = max(r["pairs"] for r in results)
    text_per_pair = results[-1]["text_bytes"] / results[-1]["pairs"]
    lines = [
        f"{HEADING} up to {largest:,} pairs",
        "",
        f"Measured {now} on {cpu_model()}, {os.cpu_count()} cores; {versions()}. Command: "
        f"`{cmd.strip()}`" + (" (smoke run: the numbers mean nothing)" if args.smoke else ""),
        "",
        "A synthetic parallel corpus (`scripts/bench_data.py`: Zipf words over 30,000 synthetic "
        "words per language, 5-60 words per sentence, the target a noisy word-by-word "
        f"translation, 1% broken pairs), plain text, {text_per_pair:.0f} bytes per pair. One "
        f"joint {args.vocab_size:,}-piece BPE model trained once by `train_tokenizer` on the "
        f"first {args.sample_pairs:,} pairs (input_sentence_size {args.sample_pairs:,}: half "
        f"their sentences; {tokenizer_s:.0f} s). Each size runs in a fresh "
        f"process: `encode_corpus` (filter on, num_proc {args.num_proc}) into an empty cache, "
        f"then one epoch of training batches as `mt train` makes them (max_tokens "
        f"{args.max_tokens}: `BatchSampler`, `len(sampler)`, `plan_updates`).",
        "",
        *table(results, args.num_proc),
        "",
        growth(results),
        "",
        "encode s: `encode_corpus` wall time (fingerprint, raw Arrow, SentencePiece, lengths, "
        "filter, `save_to_disk`); pairs/s: input pairs / encode s; CPU s: CPU time of the "
        "encoding, its workers included. "
        "index s: epoch 1's batch index (`len(sampler)`); epoch s: `plan_updates` over the "
        "whole epoch (the index again, then every batch read from the memory map and "
        "collated). Peak RSS: the process's ru_maxrss. Peak anon: the highest RssAnon seen "
        f"in /proc/self/status, sampled every {SAMPLE_EVERY * 1000:.0f} ms (a shorter peak can "
        "be missed). The difference is file-backed pages (shared libraries, about 120 MiB "
        "here, and the cache): RSS counts every page of the memory-mapped Arrow cache the "
        "process has read, so it grows with the corpus once an epoch has touched it all, but "
        "those pages belong to the page cache and are dropped under memory pressure; RssAnon "
        "(heap) is what must fit in memory. Anon before: RssAnon after the imports. Cache: the "
        "cache entry on disk (Arrow ids, lengths.npy, stats.json) per kept pair.",
        "",
        "Peak RssAnon / RssFile by phase (encode; epoch 1's index; the epoch's batches):",
        "",
        *phase_table(results),
    ]
    return "\n".join(wrap(line) for line in lines) + "\n"


def existing_heading(path: Path) -> str | None:
    """The heading of this benchmark's section in `path`, whatever its size, if there is one."""
    if not path.exists():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    return next((line for line in lines if line.startswith(HEADING)), None)


def main_bench(args: argparse.Namespace) -> None:
    """Tokenizer once, then every size in its own child; print (and maybe write) the section."""
    with tempfile.TemporaryDirectory(prefix="mt-bench-data-") as tmp:
        workdir = Path(args.workdir or tmp).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        log(f"workdir {workdir}; training the tokenizer on {args.sample_pairs:,} pairs")
        tokenizer_s = train_sample_tokenizer(args, workdir)
        results = [measure_size(args, workdir, n) for n in args.sizes]
        (workdir / "results.json").write_text(json.dumps(results, indent=1))
    section = report(args, results, tokenizer_s)
    print(section, end="")
    if args.write:
        path = Path(args.write)
        write_section(path, section, heading=existing_heading(path) or section.split("\n")[0])
        log(f"wrote {args.write}")


def sizes(text: str) -> list[int]:
    """'500000,1000000' -> [500000, 1000000]."""
    return [int(s) for s in text.split(",") if s.strip()]


def main() -> None:
    """Parse arguments; run the benchmark, or one child phase of it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=sizes, help="corpus sizes in pairs (default 0.5M-5M)")
    parser.add_argument("--num-proc", type=int, default=1, help="encode_corpus worker processes")
    parser.add_argument("--workdir", help="corpora, tokenizer, caches (default: a temporary "
                        "directory, removed at the end)")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep each size's corpus and cache")
    parser.add_argument("--sample-pairs", type=int, default=100_000, help="tokenizer sample")
    parser.add_argument("--vocab-size", type=int, default=8000, help="joint SentencePiece pieces")
    parser.add_argument("--max-tokens", type=int, default=4096, help="batch token budget")
    parser.add_argument("--seed", type=int, default=1, help="corpus and tokenizer seed")
    parser.add_argument("--smoke", action="store_true", help="seconds-long run for tests")
    parser.add_argument("--write", help="Markdown file whose section to replace")
    parser.add_argument("--phase", choices=["measure"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        result = measure_phase(json.loads(Path(args.spec).read_text()))
        Path(args.result).write_text(json.dumps(result))
        return
    args.sizes = args.sizes or (SMOKE_SIZES if args.smoke else SIZES)
    if args.smoke:
        args.sample_pairs, args.vocab_size = 2000, 400
    main_bench(args)


if __name__ == "__main__":
    main()
