"""Speed and BLEU of one trained mt model decoded by mt and CTranslate2 (fp32, int8; mt bf16).

    .venv/bin/python scripts/bench_ct2.py --run runs/multi30k-de-en           # Markdown on stdout
    .venv/bin/python scripts/bench_ct2.py --run runs/multi30k-de-en --write docs/benchmarks.md
    .venv/bin/python scripts/bench_ct2.py --smoke                       # seconds, for tests

Every system decodes Multi30k's test_2016_flickr (1,000 sentences, in the run's direction) with
beam 5 on the same threads: mt with `mt.translate.Translator.translate` in fp32 (its linear layers
packed, as `mt translate` runs them, and unpacked), with its int8 weights (`mt translate --quantize
int8`, mt.quantize) and in bf16 where `--precision auto` (mt translate's default) picks it on this
CPU, each in a child process of its own set up as `mt translate` sets up (`mt_worker`), and
CTranslate2 exported from the same weights by `mt.export.ct2.save_ct2`, in this process, run by
`mt.export.ct2_search.translate_ct2` (batches of one source length, mt's length limits and a fitted
length penalty; see mt/export/ct2_search.py) and by its own search. Times include tokenising (and
mt's detokenising: CTranslate2's ids are detokenised after the clock stops); each figure is the
median of --repeats passes after an untimed one, the passes going round all systems in turn. This
process applies mt's CPU malloc setting, as `mt translate` does; CTranslate2 at its best batching
runs once more in a child process without torch (scripts/ct2_worker.py), with glibc's default
malloc and its own OpenMP runtime, as CTranslate2's users run it, with one worker and with two.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "scripts"):  # run as a script from anywhere; bench.py sits beside it
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench import (  # noqa: E402
    TEST_PREFIX,
    cpu_model,
    find_data,
    log,
    publish,
    ratio,
    wrap,
)
from ct2_worker import ct2_translator, own_search  # noqa: E402

from mt.config import Config, DecodeConfig, load_config  # noqa: E402
from mt.corpora import read_lines  # noqa: E402
from mt.device import keep_freed_memory  # noqa: E402
from mt.errors import MtError  # noqa: E402
from mt.export.ct2 import save_ct2  # noqa: E402
from mt.export.ct2_search import translate_ct2  # noqa: E402
from mt.files import atomic_directory  # noqa: E402
from mt.model import Transformer  # noqa: E402
from mt.packing import pack  # noqa: E402
from mt.quantize import quantize  # noqa: E402
from mt.rundir import load_trained  # noqa: E402
from mt.tokenizer import Tokenizer  # noqa: E402
from mt.translate import (  # noqa: E402
    Translator,
    decode_settings,
    encode_sources,
    resolve_runtime,
)

SECTION = "## Speed: mt vs CTranslate2"
CT2_TYPES = {"CT2 float32": "float32", "CT2 int8": "int8"}  # system name -> weight type
# CTranslate2 as a new user calls it: its own length penalty and limits, the whole file in one
# call, in one batch (its default) or in batches of 4,096 tokens: {system name: max_batch_size}.
CT2_OWN = {"CT2 float32, its defaults": 0, "CT2 float32, its defaults, 4,096-token batches": 4096}
# The 4,096-token batches again, in a process of their own: without the malloc setting that this
# process applies for mt, as CTranslate2's users run it.
SHIPPED = "CT2 float32, its defaults, 4,096-token batches, own process"
WORKERS = "CT2 float32, its defaults, 4,096-token batches, 2 workers, own process"
TINY_DATA = ROOT / "tests" / "data" / "tiny"
Decoder = Callable[[list[str]], list[list[int]]]


def smoke_run(workdir: Path) -> Path:
    """A tiny run (configs/tiny.yaml, 30 steps), trained once into the workdir."""
    from mt.train import train

    run = workdir / "tiny-run"
    if not (run / "checkpoints").is_dir():
        overrides = [
            f"run_dir={run}",
            f"data.train={TINY_DATA / 'train'}",
            f"data.valid={TINY_DATA / 'valid'}",
            f"data.test={TINY_DATA / 'valid'}",
        ]
        train(load_config(ROOT / "configs" / "tiny.yaml", overrides))
    return run


READY = "ready"  # an mt worker's first line: set up, packing calibrated


def mt_process(run: str, variant: str, threads: int, **overrides: Any) -> Child:
    """mt decoding in a child process of its own (`mt_worker`): ids per line.

    Not in this process: CTranslate2 calls OpenMP through the same runtime as torch once both
    are loaded, and a CTranslate2 Translator sets the calling thread's OpenMP threads to its
    own `intra_threads` (1 for the two-worker rows), which torch's operators then use.
    Returns once the child is set up: its packing times BLAS against packed products
    (mt.packing.calibrate), which other start-up work on the cores would skew.
    """
    child = Child([__file__, "--mt-worker", json.dumps([run, variant, threads, overrides])])
    if child.answer() != READY:
        raise MtError(f"the mt worker for {variant} did not start")
    return child


def mt_decoder(
    model: Transformer, tokenizer: Tokenizer, decode: DecodeConfig, precision: str = "fp32"
) -> Decoder:
    """mt's own search on the CPU (int8 where the model is quantised): ids per line."""

    def run(lines: list[str]) -> list[list[int]]:
        outs = Translator(tokenizer, model, decode, torch.device("cpu"), precision).translate(lines)
        return [hyps[0].tokens if hyps else [] for hyps in outs]

    return run


def ct2_decoder(
    directory: Path,
    weights: str,
    threads: int,
    tokenizer: Tokenizer,
    decode: DecodeConfig,
    limit: int,
) -> Decoder:
    """CTranslate2 running an export from `directory` with `threads` intra-op threads."""
    translator = ct2_translator(str(directory), threads, weights)
    return lambda lines: translate_ct2(translator, tokenizer, lines, decode, limit)


def ct2_own_decoder(
    directory: Path,
    threads: int,
    tokenizer: Tokenizer,
    beam: int,
    batch: int,
    limit: int,
    length: int = 0,
    own_process: bool = False,
    workers: int = 1,
) -> Decoder:
    """CTranslate2 float32 with its own search settings (`own_search`), ids per line.

    Sources are cut to `limit - 1` pieces, as mt cuts them. own_process: the search runs in a
    child process without torch (scripts/ct2_worker.py), as CTranslate2's users run it. workers:
    see ct2_worker.ct2_translator.
    """
    most = own_most(limit)
    if own_process:
        search = worker_search(directory, threads, beam, batch, length, most, workers)
    else:
        translator = ct2_translator(str(directory), threads, workers=workers)
        search = lambda sources: own_search(translator, sources, beam, batch, length, most)  # noqa: E731

    def run(lines: list[str]) -> list[list[int]]:
        ids = encode_sources(lines, tokenizer, limit - 1)
        sources = [[tokenizer.src.id_to_piece(t) for t in seq] for seq in ids]
        return [[tokenizer.tgt.piece_to_id(p) for p in hyp] for hyp in search(sources)]

    return run


def own_most(positions: int) -> int:
    """The most pieces CTranslate2's own search makes: its default 256, or what positions hold."""
    return min(256, positions - 1)


def worker_search(
    directory: Path, threads: int, beam: int, batch: int, length: int, most: int, workers: int
) -> Child:
    """`own_search` in a child process without torch, started now (scripts/ct2_worker.py)."""
    spec = [str(directory), threads, beam, batch, length, most, workers]
    return Child([str(ROOT / "scripts" / "ct2_worker.py"), json.dumps(spec)])


def fixed_length(settings: dict[str, Any], length: int) -> dict[str, Any]:
    """mt's decode `settings` making every output exactly `length` pieces.

    EOS is banned before `length` pieces and forced after them, in mt and in the CTranslate2
    search that mirrors it (mt.export.ct2_search).
    """
    return {**settings, "min_len": length, "max_len_a": 0, "max_len_b": length + 1}


class Child:
    """A Python child process started with `args`, called with one JSON line each way."""

    def __init__(self, args: list[str]) -> None:
        self.args = args
        self.process = subprocess.Popen(
            [sys.executable, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def __call__(self, request: Any) -> Any:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self.answer()

    def answer(self) -> Any:
        """The child's next JSON line."""
        assert self.process.stdout is not None
        answer = self.process.stdout.readline()
        if not answer:
            raise MtError(f"the child {self.args[0]} exited ({self.process.wait()})")
        return json.loads(answer)

    def close(self) -> None:
        """End the child: its input closes."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait()


def mt_worker(spec: str) -> None:
    """The child of `mt_process`: lines in, mt's output ids out, a JSON line each.

    It sets up as `mt translate` does on a CPU: threads, glibc keeping freed memory, the run's
    model as `variant` asks (packed: fp32 as `mt translate` decodes it; plain: nn.Linear;
    int8: `--quantize int8`; bf16: packed in bf16).
    """
    run, variant, threads, overrides = json.loads(spec)
    torch.set_num_threads(threads)
    keep_freed_memory()
    cpu = torch.device("cpu")
    config, tokenizer, model, _ = load_trained(Path(run), cpu)
    precision = "bf16" if variant == "bf16" else "fp32"
    if variant == "int8":
        model = quantize(model, "int8")
    elif variant != "plain":
        model = pack(model, cpu, precision)
    decoder = mt_decoder(model, tokenizer, decode_settings(config, **overrides), precision)
    print(json.dumps(READY), flush=True)
    for line in sys.stdin:
        print(json.dumps(decoder(json.loads(line))), flush=True)


def export_all(model: Transformer, tokenizer: Tokenizer, workdir: Path) -> dict[str, Path]:
    """The model exported once per CTranslate2 weight type: {system name: directory}."""
    dirs = {}
    for name, weights in CT2_TYPES.items():
        dirs[name] = workdir / f"ct2-{weights}"
        with atomic_directory(dirs[name], replace=True) as temp:
            save_ct2(model, tokenizer, temp, None if weights == "float32" else weights)
    return dirs


def timed(decoder: Decoder, lines: list[str]) -> tuple[float, list[list[int]]]:
    """Seconds of one pass over `lines`, and its outputs."""
    start = time.perf_counter()
    outputs = decoder(lines)
    return time.perf_counter() - start, outputs


def bench(
    config: Config, tokenizer: Tokenizer, model: Transformer, args: argparse.Namespace
) -> dict[str, Any]:
    """Decode the test set with every system; seconds, outputs and BLEU per system.

    With --fixed-length L, the fixed-length protocol too: mt, CTranslate2 at mt's batching and
    CTranslate2 at its best, each made to output exactly L pieces per sentence.
    """
    data = find_data(args.data)
    n = args.sentences or None
    src, tgt = config.data.src_lang, config.data.tgt_lang  # the run's direction
    sources = list(read_lines(data / f"{TEST_PREFIX}.{src}.gz"))[:n]
    references = list(read_lines(data / f"{TEST_PREFIX}.{tgt}.gz"))[:n]
    decode = decode_settings(config, beam=args.beam, nbest=1)
    limit = model.max_positions
    settings = {"beam": args.beam, "nbest": 1}
    # What `mt translate` runs by default: --precision auto times fp32 against bf16 here, before
    # the mt processes start (their start-up would share the cores with the timing).
    _, auto = resolve_runtime("cpu", "auto", Path(args.run))
    decoders = {
        "mt": mt_process(args.run, "packed", args.threads, **settings),
        "mt, nn.Linear (unpacked)": mt_process(args.run, "plain", args.threads, **settings),
        "mt int8": mt_process(args.run, "int8", args.threads, **settings),
    }
    if auto != "fp32":
        name = f"mt {auto} (--precision auto here)"
        decoders[name] = mt_process(args.run, auto, args.threads, **settings)
    dirs = export_all(model, tokenizer, Path(args.workdir))
    for name, directory in dirs.items():
        weights = CT2_TYPES[name]
        decoders[name] = ct2_decoder(directory, weights, args.threads, tokenizer, decode, limit)
    for name, batch in CT2_OWN.items():
        decoders[name] = ct2_own_decoder(
            dirs["CT2 float32"], args.threads, tokenizer, decode.beam, batch, limit
        )
    decoders[SHIPPED] = ct2_own_decoder(
        dirs["CT2 float32"], args.threads, tokenizer, decode.beam, 4096, limit, own_process=True
    )
    if args.threads >= 2:
        decoders[WORKERS] = ct2_own_decoder(
            dirs["CT2 float32"], args.threads, tokenizer, decode.beam, 4096, limit,
            own_process=True, workers=2,
        )  # fmt: skip
    res = {"sentences": len(sources), "decode": decode}
    res["systems"] = run_systems(decoders, sources, references, tokenizer, args.repeats)
    if args.fixed_length:
        L, float32 = args.fixed_length, dirs["CT2 float32"]
        fixing = fixed_length(settings, L)
        exact = decode_settings(config, **fixing)
        fixed = {
            "mt": mt_process(args.run, "packed", args.threads, **fixing),
            "CT2 float32": ct2_decoder(float32, "float32", args.threads, tokenizer, exact, limit),
            "CT2 float32, 4,096-token batches": ct2_own_decoder(
                float32, args.threads, tokenizer, exact.beam, 4096, limit, length=L
            ),
            "CT2 float32, 4,096-token batches, own process": ct2_own_decoder(
                float32, args.threads, tokenizer, exact.beam, 4096, limit, L, own_process=True
            ),
        }
        if args.threads >= 2:
            fixed["CT2 float32, 4,096-token batches, 2 workers, own process"] = ct2_own_decoder(
                float32, args.threads, tokenizer, exact.beam, 4096, limit, L,
                own_process=True, workers=2,
            )  # fmt: skip
        res["fixed"] = run_systems(fixed, sources, references, tokenizer, args.repeats)
    return res


def run_systems(
    decoders: dict[str, Decoder],
    sources: list[str],
    references: list[str],
    tokenizer: Tokenizer,
    repeats: int,
) -> dict[str, dict[str, Any]]:
    """Each decoder's median seconds, outputs of its last pass and BLEU: {system: results}.

    After an untimed pass of each, the timed passes go round all systems `repeats` times.
    """
    import sacrebleu

    outputs: dict[str, list[list[int]]] = {}
    for name, decoder in decoders.items():
        log(f"{name}: an untimed pass over {len(sources):,} sentences")
        # A whole untimed pass first: the heap's growth and oneDNN's kernels for each new
        # batch shape stay out of the timing, whichever system runs first.
        decoder(sources)
    times: dict[str, list[float]] = {name: [] for name in decoders}
    for repeat in range(repeats):
        # Each pass goes round every system, so that the machine's drift touches them alike.
        for name, decoder in decoders.items():
            seconds, outputs[name] = timed(decoder, sources)
            times[name].append(seconds)
        passes = ", ".join(f"{name} {seconds[-1]:.2f} s" for name, seconds in times.items())
        log(f"pass {repeat + 1}/{repeats}: {passes}")
    results = {}
    for name in decoders:
        texts = tokenizer.decode_tgt(outputs[name])
        bleu = sacrebleu.corpus_bleu(texts, [references]).score
        seconds = statistics.median(times[name])
        results[name] = {"seconds": seconds, "outputs": outputs[name], "bleu": bleu}
        log(f"{name}: {seconds:.2f} s, BLEU {bleu:.2f}")
    return results


def report(args: argparse.Namespace, weights: Path, res: dict[str, Any]) -> str:
    """The Markdown section."""
    import ctranslate2

    now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cmd = "python scripts/bench_ct2.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    d, n, systems = res["decode"], res["sentences"], res["systems"]
    base = systems["mt"]
    lines = [
        SECTION,
        "",
        f"Measured {now} on {cpu_model()}, {args.threads} threads for every system; torch "
        f"{torch.__version__}, ctranslate2 {ctranslate2.__version__}, Python "
        f"{platform.python_version()}. Command: `{cmd.strip()}`"
        + (" (smoke run: the numbers mean nothing)" if args.smoke else ""),
        "",
        f"Weights: {weights}. {n:,} sentences of {TEST_PREFIX}, beam {d.beam}, limit "
        f"{d.max_len_a} x source length + {d.max_len_b}, {d.length_penalty} length penalty "
        f"(alpha {d.alpha}); median of {args.repeats} passes in one process after an untimed "
        "one, each pass going round all systems in turn, tokenising included (and for mt, whose "
        "search returns text, detokenising; CTranslate2 returns ids, detokenised after the "
        "clock stops). "
        "mt: `mt.translate.Translator.translate` in a child process per row, set up as `mt "
        "translate` sets up (CTranslate2, loaded here, would share torch's OpenMP runtime and "
        "set its thread count), fp32, "
        f"batches of {d.max_tokens:,} source tokens, linear layers packed by oneDNN as `mt "
        "translate` runs them on a CPU (mt.packing; the unpacked nn.Linear model as the row "
        "after it); mt int8: the same with `--quantize int8` (int8 weights per output row, "
        "activations quantised per batch); a row for `mt translate`'s default `--precision "
        "auto` where it picks bf16 over fp32 on this CPU (packed too). CTranslate2: `mt export "
        "--format ct2` of the same weights (int8: `--quantization int8`), decoded by "
        "`mt.export.ct2_search.translate_ct2`: one batch per source length, so each sentence "
        "gets mt's length limit, and a length penalty fitted to mt's (see "
        'mt/export/ct2_search.py). "Its defaults": `translate_batch(sources, beam_size=5)` '
        "as a new user calls it (length penalty 1, up to 256 pieces), in one batch or with "
        '`max_batch_size=4096, batch_type="tokens"`; sources encoded as mt encodes them. '
        '"Own process": the 4,096-token batches again in a child process without torch '
        "(scripts/ct2_worker.py), which keeps glibc's default malloc settings and CTranslate2's "
        "own OpenMP runtime, as its users run it (this process applies mt's malloc setting, "
        "`mt.device.keep_freed_memory`, and has torch's OpenMP runtime serve CTranslate2's "
        'calls, as the other CTranslate2 rows have). "2 workers": the same with '
        "`inter_threads=2` and the threads shared out, two batches decoded at once "
        "(CTranslate2's other way to use the cores; mt decodes one batch at a time on all of "
        "them).",
        "",
        "| system | seconds | sentences/s | vs mt | BLEU | outputs identical to mt |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in systems.items():
        same = sum(a == b for a, b in zip(r["outputs"], base["outputs"], strict=True))
        lines.append(
            f"| {name} | {r['seconds']:.2f} | {n / r['seconds']:.1f} | "
            f"{ratio(base['seconds'], r['seconds'])} | {r['bleu']:.2f} | {same:,} of {n:,} |"
        )
    if "fixed" in res:
        lines += ["", *fixed_rows(res["fixed"], args.fixed_length, n)]
    return "\n".join(wrap(line) for line in lines) + "\n"


def fixed_rows(systems: dict[str, dict[str, Any]], length: int, n: int) -> list[str]:
    """The fixed-length protocol's paragraph and table: the same work for every system."""
    base = systems["mt"]
    lines = [
        f"Fixed-length protocol (`--fixed-length {length}`): the same sentences and beam, every "
        f"system made to output exactly {length} pieces per sentence (mt: `min_len` {length} "
        f"and a limit of {length} pieces before EOS; CTranslate2: min and max decoding length "
        f"{length}; mt makes one decoder step more, scoring the end token after the last "
        "piece), so no system gains by ending sentences early; BLEU means nothing here. "
        "CTranslate2 at mt's batching (one batch per source length) and at its best "
        "(4,096-token batches), also in a process of its own without torch, with one worker "
        "and with two (inter_threads=2).",
        "",
        f"| system | seconds | sentences/s | vs mt | outputs of {length} pieces |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in systems.items():
        exact = sum(len(out) == length for out in r["outputs"])
        lines.append(
            f"| {name} | {r['seconds']:.2f} | {n / r['seconds']:.1f} | "
            f"{ratio(base['seconds'], r['seconds'])} | {exact:,} of {n:,} |"
        )
    return lines


def add_system_arguments(parser: argparse.ArgumentParser) -> None:
    """The run, test sentences, threads and beam that mt and CTranslate2 decode with."""
    parser.add_argument("--run", help="trained mt run, checkpoints dir or .safetensors file")
    parser.add_argument("--data", help="Multi30k directory (default data/multi30k or "
                        "../shared/data/multi30k)")  # fmt: skip
    parser.add_argument("--sentences", type=int, default=0, help="test sentences (0 = all)")
    parser.add_argument("--threads", type=int, default=2, help="threads for every system")
    parser.add_argument("--beam", type=int, default=5)


def main() -> None:
    """Parse arguments, decode with every system, print (and maybe write) the section."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_system_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per system")
    parser.add_argument("--fixed-length", type=int, default=0, metavar="L",
                        help="also time each system making L pieces a sentence")  # fmt: skip
    parser.add_argument("--workdir", help="exports (default runs/bench-ct2[-smoke])")
    parser.add_argument("--smoke", action="store_true", help="seconds-long run for tests")
    parser.add_argument("--write", help="Markdown file whose section to replace")
    parser.add_argument("--mt-worker", help=argparse.SUPPRESS)  # mt_process's child
    args = parser.parse_args()
    if args.mt_worker:
        return mt_worker(args.mt_worker)
    args.workdir = args.workdir or ("runs/bench-ct2-smoke" if args.smoke else "runs/bench-ct2")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.sentences, args.repeats = args.sentences or 8, 1
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as `mt translate` does on CPU (it applies to the whole process)
    run = Path(args.run) if args.run else smoke_run(Path(args.workdir)) if args.smoke else None
    if run is None:
        parser.error("--run is required (or --smoke)")
    args.run = str(run)
    try:
        config, tokenizer, model, checkpoint = load_trained(run, torch.device("cpu"))
        res = bench(config, tokenizer, model, args)
    except MtError as exc:  # e.g. no ctranslate2, or not a run
        raise SystemExit(f"bench_ct2: {exc}") from None
    section = report(args, checkpoint.weights, res)
    publish(section, args.write, SECTION)


if __name__ == "__main__":
    main()
