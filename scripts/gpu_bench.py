"""Throughput and MFU of configs/base.yaml on one device, and of `mt train` itself.

    python3 scripts/gpu_bench.py --no-compile          # eager training steps, beam-5 decoding
    python3 scripts/gpu_bench.py                       # torch.compile'd training steps
    python3 scripts/gpu_bench.py --trainer             # `mt train` against its model's speed
    python3 scripts/gpu_bench.py --device cpu --smoke [--trainer]  # seconds-long CPU checks
    scripts/gpu_bench.sh --write docs/benchmarks.md    # all three, one call on a lent GPU

Model sections: synthetic batches of WMT-like sentence lengths (source ~ N(27, 12) tokens,
clipped to [3, 120], target within 30% of it), random ids from the config's vocabulary size,
bucketed and padded by mt's own BatchSampler and collate under train.max_tokens, and trained
through mt's `train_step`/`optimizer_step` (what `mt train` runs), so kernels see real shapes
and padding. Model FLOPs are counted as in scripts/bench.py, over the padded shapes (the work
done) and over the real tokens alone (the useful part); MFU divides them by two peaks: the best
rate of large matmuls measured on the same device in the same run, and the card's datasheet
dense bf16 peak. Which SDPA kernels one step uses is listed from the profiler, and each fused
kernel is tried alone on a batch with and without padding.

Trainer section: `mt train --config configs/base.yaml` under torchrun, one rank per visible
card, for a few hundred steps on a corpus (Multi30k if found, else made-up words of WMT-like
lengths), then the same model trained on the same batches in this process through
`train_step` alone: the gap is what the trainer around the model costs.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench import train_flops, write_section  # noqa: E402

from mt import search  # noqa: E402
from mt.batching import BatchSampler, collate, collate_source  # noqa: E402
from mt.config import Config, load_config  # noqa: E402
from mt.device import DTYPES, autocast, configure_backends  # noqa: E402
from mt.distributed import World  # noqa: E402
from mt.metrics import read_metrics  # noqa: E402
from mt.model import Transformer, count_parameters  # noqa: E402
from mt.rundir import encode_split, prepare_tokenizer  # noqa: E402
from mt.train import TrainState, build_learner, optimizer_step, train_step  # noqa: E402
from mt.vocab import PAD_ID  # noqa: E402

SECTION = "## GPU: configs/base.yaml throughput and MFU"  # + " (torch.compile)" or " (eager)"
TRAINER_SECTION = "## GPU: `mt train` against its model (configs/base.yaml)"
FIRST_ID = 4  # ids 0-3 are pad, unk, bos, eos
DECODE_LEN = 32  # output pieces per sentence in the decoding measurement
SMOKE = [
    "model.dim=64", "model.ffn_dim=128", "model.heads=2", "model.enc_layers=1",
    "model.dec_layers=1", "tokenizer.vocab_size=500", "train.max_tokens=512",
    "decode.max_tokens=512",
]  # fmt: skip
# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s, by a
# substring of torch.cuda.get_device_name; the first match counts ("H100 80GB HBM3" is the SXM).
DATASHEET_BF16_TFLOPS = [
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
    ("RTX 4090", 165.0),
]  # fmt: skip
PROBED_KERNELS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "memory-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def synthetic_lengths(n: int, max_len: int, rng: np.random.Generator) -> tuple[Any, Any]:
    """WMT-like source lengths and target lengths within 30% of them."""
    src = np.clip(rng.normal(27, 12, n), 3, min(120, max_len)).astype(np.int64)
    tgt = np.clip(src * rng.uniform(0.7, 1.3, n), 3, max_len).astype(np.int64)
    return src, tgt


def synthetic_batches(config: Config, n_batches: int, seed: int = 0) -> list[Any]:
    """n_batches padded training batches of random ids, bucketed under train.max_tokens."""
    rng = np.random.default_rng(seed)
    vocab = config.tokenizer.vocab_size
    # at least 16 tokens a sentence under the budget: WMT-like lengths average 27
    sentences = max(1000, n_batches * config.train.max_tokens // 16)
    src_lens, tgt_lens = synthetic_lengths(sentences, config.data.max_len, rng)
    sampler = BatchSampler(src_lens, tgt_lens, config.train.max_tokens, seed)
    batches = []
    for indices in sampler.epoch_batches(1)[:n_batches]:
        pairs = [
            (rng.integers(FIRST_ID, vocab, src_lens[i]), rng.integers(FIRST_ID, vocab, tgt_lens[i]))
            for i in indices
        ]
        batches.append(collate(pairs, indices))
    if len(batches) < n_batches:
        raise SystemExit(f"gpu_bench: only {len(batches)} batches, {n_batches} needed")
    return batches


def sync(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    """Best FLOP/s of an n x n x n matmul on the device (after warm-up)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    best = 0.0
    for i in range(repeats + 3):
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b, out=c)
        sync(device)
        if i >= 3:
            best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def datasheet_peak(device_name: str) -> float | None:
    """The card's dense bf16 peak in FLOP/s from DATASHEET_BF16_TFLOPS; None if not listed."""
    for key, tflops in DATASHEET_BF16_TFLOPS:
        if key in device_name:
            return tflops * 1e12
    return None


def peak_memory_mib(device: torch.device) -> float:
    """Peak allocated device memory (CUDA) or peak resident set size (CPU), MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sdpa_kernels(step: Any) -> list[str]:
    """Names of the scaled-dot-product-attention ops that one call of `step` runs."""
    from torch.profiler import profile

    with profile() as prof:
        step()
    return sorted({e.key for e in prof.key_averages() if "scaled_dot_product" in e.key})


def probe_kernels(
    model: Transformer, config: Config, device: torch.device, precision: str
) -> dict[str, dict[str, bool]]:
    """Whether each SDPA kernel, allowed alone, runs a training pass with and without padding.

    FlashAttention takes no mask, so it can only serve batches without source padding, which
    the model then runs unmasked (padded=False); the masked pass tells which kernel takes over.
    """
    B, L = 8, 32
    rng = np.random.default_rng(2)
    src, tgt_in = (
        torch.as_tensor(rng.integers(FIRST_ID, config.tokenizer.vocab_size, (B, L)), device=device)
        for _ in range(2)
    )
    dtype = DTYPES[precision]
    found: dict[str, dict[str, bool]] = {}
    for name, kernel in PROBED_KERNELS.items():
        found[name] = {}
        for case, padded in (("no padding", False), ("padding", True)):
            try:
                with sdpa_kernel(kernel), torch.autocast(device.type, dtype, precision != "fp32"):
                    model(src, tgt_in, padded=padded).float().sum().backward()
                found[name][case] = True
            except RuntimeError:  # "No available kernel"
                found[name][case] = False
            model.zero_grad(set_to_none=True)
    return found


def sentence_shapes(batch: Any) -> list[Any]:
    """One (1, S) / (1, T) batch shape per sentence at its real length, for train_flops."""
    src_lens = (batch.src != PAD_ID).sum(dim=1).tolist()
    tgt_lens = (batch.tgt_out != PAD_ID).sum(dim=1).tolist()
    return [
        SimpleNamespace(src=SimpleNamespace(shape=(1, s)), tgt_in=SimpleNamespace(shape=(1, t)))
        for s, t in zip(src_lens, tgt_lens, strict=True)
    ]


def padding_counts(batches: list[Any]) -> dict[str, int]:
    """Real tokens and padded positions of the source and target sides of `batches`."""
    return {
        "src_tokens": sum(b.src_tokens for b in batches),
        "src_positions": sum(b.src.numel() for b in batches),
        "tgt_tokens": sum(b.tgt_tokens for b in batches),
        "tgt_positions": sum(b.tgt_out.numel() for b in batches),
        "batches": len(batches),
        "batches_without_src_padding": sum(b.src_tokens == b.src.numel() for b in batches),
    }


def time_steps(learner: Any, batches: list[Any], config: Config) -> list[float]:
    """Seconds of one update (forward, backward, optimizer step) per batch, one batch each."""
    state, times = TrainState(), []
    for batch in batches:
        sync(learner.device)
        start = time.perf_counter()
        train_step(learner, [batch], batch.tgt_tokens, False, False)
        optimizer_step(learner, state, config.train.min_loss_scale)
        sync(learner.device)
        times.append(time.perf_counter() - start)
    return times


def train_bench(
    config: Config, device: torch.device, precision: str, steps: int, warmup: int
) -> dict[str, Any]:
    """Tokens/s and FLOP/s of `steps` updates timed after `warmup` others and a pass over them."""
    vocab = config.tokenizer.vocab_size
    learner = build_learner(config, (vocab, vocab), World(), device, precision)
    batches = synthetic_batches(config, warmup + steps + 1)
    timed = batches[warmup : warmup + steps]
    compile_start = time.perf_counter()
    time_steps(learner, batches[:warmup], config)
    warmup_seconds = time.perf_counter() - compile_start
    time_steps(learner, timed, config)  # each shape once, as a long run has seen its buckets
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = time_steps(learner, timed, config)
    kernels = sdpa_kernels(lambda: time_steps(learner, batches[-1:], config))
    seconds = sum(times)
    real_shapes = [shape for b in timed for shape in sentence_shapes(b)]
    return {
        "params": count_parameters(learner.model),
        "tgt_tok_s": sum(b.tgt_tokens for b in timed) / seconds,
        "step_ms_median": 1000 * statistics.median(times),
        "flop_s": train_flops(timed, config, vocab) / seconds,
        "real_flop_s": train_flops(real_shapes, config, vocab) / seconds,
        "padding": padding_counts(timed),
        "peak_mib": peak_memory_mib(device),
        "warmup_seconds": warmup_seconds,
        "sdpa_kernels": kernels,
        "sdpa_alone": probe_kernels(learner.model, config, device, precision),
        "model": learner.model,
    }


@torch.no_grad()
def decode_bench(
    model: torch.nn.Module, config: Config, device: torch.device, precision: str, n: int
) -> dict[str, float]:
    """Beam-5 sentences/s over n synthetic sources under decode.max_tokens, DECODE_LEN out each."""
    model.eval()
    rng = np.random.default_rng(1)
    lengths, _ = synthetic_lengths(n, config.data.max_len, rng)
    vocab = config.tokenizer.vocab_size
    sources = [rng.integers(FIRST_ID, vocab, k) for k in lengths]
    sampler = BatchSampler(lengths, lengths, config.decode.max_tokens, shuffle=False)
    batches = [
        collate_source([sources[i] for i in b], b).src.to(device) for b in sampler.epoch_batches(1)
    ]
    # An untrained model ends at once; EOS banned before DECODE_LEN pieces and forced after
    # them makes every sentence do a trained model's work, as in bench_ct2's fixed-length rows.
    beam5 = dataclasses.replace(
        config.decode, beam=5, nbest=1, sampling=False,
        min_len=DECODE_LEN, max_len_a=0, max_len_b=DECODE_LEN + 1,
    )  # fmt: skip
    with autocast(device, precision):  # untimed: the first pass picks kernels, grows the cache
        for src in batches:
            search.decode(model, src, beam5)
    out_tokens = 0
    sync(device)
    start = time.perf_counter()
    with autocast(device, precision):
        for src in batches:
            nbest = search.decode(model, src, beam5)
            out_tokens += sum(len(h[0].tokens) for h in nbest)
    sync(device)
    seconds = time.perf_counter() - start
    return {"sentences_s": n / seconds, "out_tok_s": out_tokens / seconds, "sentences": n}


def heading(args: argparse.Namespace) -> str:
    """The section heading: one section per compilation mode."""
    return f"{SECTION} ({'torch.compile' if args.compile else 'eager'})"


def mfu_rows(flop_s: float, res: dict[str, Any], what: str) -> list[str]:
    """Table rows: MFU of `flop_s` against the measured and the datasheet peaks."""
    sheet = res["datasheet_flop_s"]
    return [
        f"| **MFU{what}, measured peak** | **{flop_s / res['peak_flop_s']:.1%}** |",
        f"| MFU{what}, datasheet peak | "
        + (f"{flop_s / sheet:.1%} |" if sheet else "n/a (card not in the table) |"),
    ]


def kernel_lines(alone: dict[str, dict[str, bool]]) -> list[str]:
    """One line per probed SDPA kernel: which batches it can run alone."""
    lines = ["| SDPA kernel alone | no padding (no mask) | padding (additive mask) |"]
    lines.append("|---|---|---|")
    for name, cases in alone.items():
        lines.append(f"| {name} | {'yes' if cases['no padding'] else 'no'} | "
                     f"{'yes' if cases['padding'] else 'no'} |")  # fmt: skip
    return lines


def report(args: argparse.Namespace, res: dict[str, Any]) -> str:
    """The Markdown section for docs/benchmarks.md."""
    t, pad = res["train"], res["train"]["padding"]
    sheet = res["datasheet_flop_s"]
    lines = [
        heading(args),
        "",
        f"`{res['command']}` on {res['device']}, torch {torch.__version__}, {res['date']}.",
        "",
        f"{args.config}: {t['params']:,} parameters (vocabulary {res['vocab']:,}), "
        f"{res['precision']}, torch.compile {'on' if args.compile else 'off'}, batches of "
        f"{res['max_tokens']:,} tokens (synthetic, WMT-like lengths), {args.steps} timed steps "
        f"after {args.warmup} warm-up steps ({t['warmup_seconds']:.1f} s, compilation included) "
        "and one untimed pass over the timed batches.",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| training target tokens/s | {t['tgt_tok_s']:,.0f} |",
        f"| median step | {t['step_ms_median']:.1f} ms |",
        f"| model FLOP/s (training, padding included) | {t['flop_s'] / 1e12:.1f} T |",
        f"| model FLOP/s (real tokens only) | {t['real_flop_s'] / 1e12:.1f} T |",
        f"| measured {res['precision']} matmul peak ({res['matmul_n']}^3) "
        f"| {res['peak_flop_s'] / 1e12:.1f} T |",
        "| datasheet dense bf16 peak | "
        + (f"{sheet / 1e12:.0f} T |" if sheet else "n/a (card not in the table) |"),
        *mfu_rows(t["flop_s"], res, ""),
        *mfu_rows(t["real_flop_s"], res, " (real tokens)"),
        f"| padding: source / target positions that are pads "
        f"| {1 - pad['src_tokens'] / pad['src_positions']:.1%} / "
        f"{1 - pad['tgt_tokens'] / pad['tgt_positions']:.1%} |",
        f"| batches without source padding (attention unmasked) "
        f"| {pad['batches_without_src_padding']} of {pad['batches']} |",
        f"| peak memory | {t['peak_mib']:,.0f} MiB |",
    ]
    if "decode" in res:
        d = res["decode"]
        lines += [
            f"| beam-5 decoding, sentences/s ({d['sentences']:,} synthetic sources, "
            f"{DECODE_LEN} pieces out each) "
            f"| {d['sentences_s']:,.1f} |",
            f"| beam-5 decoding, output tokens/s | {d['out_tok_s']:,.0f} |",
        ]
    lines += [
        "",
        f"SDPA ops in one training step: {', '.join(f'`{k}`' for k in t['sdpa_kernels'])}.",
        "",
        *kernel_lines(t["sdpa_alone"]),
        "",
    ]
    return "\n".join(lines)


def model_section(args: argparse.Namespace, config: Config, device: torch.device) -> dict:
    """Measure training (and, eager, decoding) on synthetic batches: the results."""
    matmul_n = 8192 if device.type == "cuda" else 1024 if args.smoke else 2048
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    res: dict[str, Any] = {
        "command": "python3 scripts/gpu_bench.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "device": name,
        "precision": args.precision,
        "vocab": config.tokenizer.vocab_size,
        "max_tokens": config.train.max_tokens,
        "matmul_n": matmul_n,
        "peak_flop_s": matmul_peak(device, DTYPES[args.precision], matmul_n),
        "datasheet_flop_s": datasheet_peak(name) if args.precision == "bf16" else None,
    }
    res["train"] = train_bench(config, device, args.precision, args.steps, args.warmup)
    model = res["train"].pop("model")
    if not args.compile:  # decoding runs the bare model: the compiled pass would repeat it
        res["decode"] = decode_bench(model, config, device, args.precision, args.sentences)
    return res


# ---------------------------------------------------------------------------------------------
# `mt train` itself against its model's speed on the same batches.

LEXICON = 50_000  # made-up words of the synthetic corpus: enough for a 37k-piece vocabulary


def synthetic_corpus(prefix: Path, pairs: int, langs: tuple[str, str], seed: int = 0) -> None:
    """Write `pairs` sentence pairs of made-up words and WMT-like lengths to prefix.<lang>.

    The words are random letter strings drawn by Zipf's law, so that BPE finds as many pieces
    as in real text; the two sides are unrelated, which changes nothing about speed.
    """
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 12, LEXICON)
    letters = rng.choice(np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8), sizes.sum())
    words = np.split(letters, np.cumsum(sizes)[:-1])
    lexicon = np.array([w.tobytes().decode() for w in words], dtype=object)
    zipf = 1 / np.arange(1, LEXICON + 1) ** 1.1
    for lang, lengths in zip(langs, synthetic_lengths(pairs, 120, rng), strict=True):
        drawn = lexicon[rng.choice(LEXICON, lengths.sum(), p=zipf / zipf.sum())]
        lines = (" ".join(s) for s in np.split(drawn, np.cumsum(lengths)[:-1]))
        Path(f"{prefix}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")


def trainer_overrides(args: argparse.Namespace, work: Path, corpus: str, device: str) -> list[str]:
    """The `mt train` settings of the trainer section: no dev set, no report, no averaging."""
    vocab = [f"tokenizer.vocab_size={args.vocab}"] if args.vocab else []
    return [
        *(SMOKE if args.smoke else []), *vocab, f"run_dir={work / 'run'}",
        f"data.train={corpus}", "data.valid=", "data.test=", f"data.cache_dir={work / 'cache'}",
        f"data.num_proc={1 if args.smoke else 8}", f"train.max_steps={args.trainer_steps}",
        f"train.log_every={max(1, args.trainer_steps // 8)}",
        f"train.valid_every={args.trainer_steps}", "train.keep_last=1", "train.average_last=0",
        "train.report=false", "train.compile=false", f"train.precision={args.precision}",
        f"train.device={device}",
    ]  # fmt: skip


def run_trainer(overrides: list[str], config: str, ranks: int, log: Path) -> float:
    """Run `torchrun -m mt train` with one rank per card; its wall-clock seconds."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(ranks), "-m", "mt", "train", "--config", config,
               *overrides]  # fmt: skip
    start = time.perf_counter()
    with log.open("wb") as out:
        code = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode
    if code:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(f"gpu_bench: `mt train` failed ({code}), end of {log}:\n{tail}")
    return time.perf_counter() - start


def trainer_windows(records: list[dict[str, Any]]) -> dict[str, float]:
    """Throughput and waits of `mt train` over its logging windows after the first (warm-up)."""
    windows = list(itertools.pairwise(records))
    seconds = [
        (b["step"] - a["step"]) * b["tokens_per_update"] / b["tgt_tok_s"] for a, b in windows
    ]
    tokens = [(b["step"] - a["step"]) * b["tokens_per_update"] for a, b in windows]
    return {
        "tgt_tok_s": sum(tokens) / sum(seconds),  # all ranks
        "data_share": sum(b.get("data_seconds", math.nan) for _, b in windows) / sum(seconds),
        "steps": records[-1]["step"] - records[0]["step"],
    }


def model_speed_on_run_data(
    config: Config, device: torch.device, precision: str, steps: int, warmup: int
) -> float:
    """Target tokens/s of the run's model through `train_step` alone, on the run's own batches."""
    tokenizer = prepare_tokenizer(config)  # the run's: `mt train` trained it
    data = encode_split(config, tokenizer, "train")  # from the run's cache
    sampler = BatchSampler(data.src_lens, data.tgt_lens, config.train.max_tokens, config.train.seed)
    order = sampler.epoch_batches(1)[: warmup + steps]
    batches = [collate(data.pairs(indices), indices) for indices in order]
    vocab = (tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    learner = build_learner(config, vocab, World(), device, precision)
    timed = batches[warmup:]
    time_steps(learner, batches[:warmup] + timed, config)  # each shape once, as `mt train` has
    seconds = sum(time_steps(learner, timed, config))
    return sum(b.tgt_tokens for b in timed) / seconds


def trainer_section(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Run `mt train`, then its model alone on the same batches: the results."""
    work = Path(args.workdir or f"/tmp/mt-gpu-bench-{time.strftime('%Y%m%d-%H%M%S')}")
    work.mkdir(parents=True, exist_ok=True)
    config_path = str(ROOT / args.config)
    data = load_config(config_path).data
    corpus = args.data or str(work / "train")
    if not args.data:
        synthetic_corpus(work / "train", args.pairs, (data.src_lang, data.tgt_lang))
    overrides = trainer_overrides(args, work, corpus, device.type)
    ranks = torch.cuda.device_count() if device.type == "cuda" else 1
    wall = run_trainer(overrides, config_path, ranks, work / "train.log")
    config = load_config(config_path, overrides)
    windows = trainer_windows(read_metrics(work / "run", "train"))
    model_tok_s = model_speed_on_run_data(config, device, args.precision, args.steps, args.warmup)
    return {
        "command": "python3 scripts/gpu_bench.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "corpus": args.data or f"synthetic, {args.pairs:,} pairs of made-up words",
        "vocab": config.tokenizer.vocab_size,
        "ranks": ranks,
        "update": (config.train.update_freq, config.train.max_tokens),
        "wall_seconds": wall,
        "trainer": windows,
        "model_tgt_tok_s": model_tok_s,  # one card
    }


def trainer_report(args: argparse.Namespace, res: dict[str, Any]) -> str:
    """The Markdown section of the trainer measurement."""
    w, ranks = res["trainer"], res["ranks"]
    update_freq, max_tokens = res["update"]
    per_rank = w["tgt_tok_s"] / ranks
    lines = [
        TRAINER_SECTION,
        "",
        f"`{res['command']}` on {ranks} x {res['device']}, torch {torch.__version__}, "
        f"{res['date']}. `torchrun --nproc_per_node {ranks} -m mt train --config {args.config}` "
        f"for {args.trainer_steps} steps of {update_freq} x {max_tokens:,} tokens per rank, "
        f"{args.precision}, eager, on {res['corpus']} (vocabulary {res['vocab']:,}); then the "
        f"same model on the run's first batches through `train_step` alone ({args.steps} timed "
        f"after {args.warmup} and one untimed pass over them).",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| `mt train`, whole command (tokenizer, encoding, start-up, {args.trainer_steps} steps) "
        f"| {res['wall_seconds']:.0f} s |",
        f"| `mt train` target tokens/s, all ranks ({w['steps']} steps after the first window) "
        f"| {w['tgt_tok_s']:,.0f} |",
        f"| `mt train` target tokens/s per rank | {per_rank:,.0f} |",
        f"| the model alone on the same batches, one card | {res['model_tgt_tok_s']:,.0f} |",
        f"| **trainer speed / model speed** | **{per_rank / res['model_tgt_tok_s']:.0%}** |",
        f"| rank 0 waiting for batches | {w['data_share']:.1%} of training time |",
        "",
    ]
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/base.yaml")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--precision", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on a CPU"
    )
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=15, help="untimed steps (compilation)")
    parser.add_argument("--max-tokens", type=int, help="batch budget (default: the config's)")
    parser.add_argument("--sentences", type=int, default=2000, help="sources to decode")
    parser.add_argument("--trainer", action="store_true", help="measure `mt train` itself")
    parser.add_argument("--trainer-steps", type=int, default=200)
    parser.add_argument("--pairs", type=int, default=100_000, help="synthetic corpus size")
    parser.add_argument("--data", help="a corpus prefix for --trainer instead of synthetic data")
    parser.add_argument("--vocab", type=int, help="vocabulary size (default: the config's)")
    parser.add_argument("--workdir", help="--trainer's run and data (default: a new /tmp dir)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, seconds on a CPU")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--write", help="Markdown file whose section to replace")
    args = parser.parse_args()
    # bf16 is what a GPU trains in; on a CPU without bf16 units it is far slower than fp32.
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.smoke:
        args.steps, args.warmup, args.sentences = 3, 1, 16
        args.trainer_steps, args.pairs = 20, 2000
    return args


def main() -> None:
    """Run the model or the trainer section; print it, and write it where asked."""
    args = parse_args()
    overrides = [f"train.compile={str(args.compile).lower()}"]
    if args.max_tokens:
        overrides.append(f"train.max_tokens={args.max_tokens}")
    if args.vocab:
        overrides.append(f"tokenizer.vocab_size={args.vocab}")
    config = load_config(ROOT / args.config, overrides + (SMOKE if args.smoke else []))
    device = torch.device(args.device)
    configure_backends(device)
    torch.manual_seed(0)
    if args.trainer:
        res, head = trainer_section(args, device), TRAINER_SECTION
        section = trainer_report(args, res)
    else:
        res, head = model_section(args, config, device), heading(args)
        section = report(args, res)
    print(section)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2), encoding="utf-8")
    if args.write:
        write_section(Path(args.write), section, head)


if __name__ == "__main__":
    main()
