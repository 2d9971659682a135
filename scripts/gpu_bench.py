"""Throughput and MFU of configs/base.yaml on one device: training steps and beam-5 decoding.

    python3 scripts/gpu_bench.py                       # CUDA, bf16, torch.compile, base.yaml
    python3 scripts/gpu_bench.py --no-compile          # eager
    python3 scripts/gpu_bench.py --device cpu --smoke  # seconds-long check on a CPU
    scripts/gpu_bench.sh --write docs/benchmarks.md    # the same, one call on a lent GPU

Batches are synthetic: WMT-like sentence lengths (source ~ N(27, 12) tokens, clipped to
[3, 120], target within 30% of it), random ids from the config's vocabulary size, bucketed and
padded by mt's own BatchSampler and collate under train.max_tokens, and trained through mt's
`train_step`/`optimizer_step` (what `mt train` runs), so kernels see real shapes and padding.
Model FLOPs per step are counted as in scripts/bench.py (padding included, causal masking not
discounted) and MFU is model FLOP/s over the best rate of large bf16 matmuls measured on the
same device in the same run. SDPA kernels used are listed from one profiled step.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench import train_flops, write_section  # noqa: E402

from mt.batching import BatchSampler, collate, collate_source  # noqa: E402
from mt.config import Config, load_config  # noqa: E402
from mt.device import DTYPES, autocast, configure_backends  # noqa: E402
from mt.distributed import World  # noqa: E402
from mt.model import count_parameters  # noqa: E402
from mt.search import beam_search  # noqa: E402
from mt.train import TrainState, build, optimizer_step, train_step  # noqa: E402

SECTION = "## GPU: configs/base.yaml throughput and MFU"  # + " (torch.compile)" or " (eager)"
FIRST_ID = 4  # ids 0-3 are pad, unk, bos, eos


def synthetic_lengths(n: int, max_len: int, rng: np.random.Generator) -> tuple[Any, Any]:
    """WMT-like source lengths and target lengths within 30% of them."""
    src = np.clip(rng.normal(27, 12, n), 3, min(120, max_len)).astype(np.int64)
    tgt = np.clip(src * rng.uniform(0.7, 1.3, n), 3, max_len).astype(np.int64)
    return src, tgt


def synthetic_batches(config: Config, n_batches: int, seed: int = 0) -> list[Any]:
    """n_batches padded training batches of random ids, bucketed under train.max_tokens."""
    rng = np.random.default_rng(seed)
    vocab = config.tokenizer.vocab_size
    src_lens, tgt_lens = synthetic_lengths(40 * n_batches * 8, config.data.max_len, rng)
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


def train_bench(
    config: Config, device: torch.device, precision: str, steps: int, warmup: int
) -> dict[str, Any]:
    """Tokens/s and model FLOP/s of `steps` timed updates after `warmup` untimed ones."""
    vocab = config.tokenizer.vocab_size
    sizes = SimpleNamespace(src_vocab_size=vocab, tgt_vocab_size=vocab)  # what build() reads
    trainee = build(config, sizes, World(), device, precision)  # type: ignore[arg-type]
    batches = synthetic_batches(config, warmup + steps + 1)
    state = TrainState()
    world = World()

    def step(batch: Any) -> None:
        train_step(trainee, [batch], batch.tgt_tokens, config, world, device, precision)
        optimizer_step(trainee, state, precision, config.train.min_loss_scale)

    compile_start = time.perf_counter()
    for batch in batches[:warmup]:
        step(batch)
    sync(device)
    warmup_seconds = time.perf_counter() - compile_start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed = batches[warmup : warmup + steps]
    times = []
    for batch in timed:
        start = time.perf_counter()
        step(batch)
        sync(device)
        times.append(time.perf_counter() - start)
    kernels = sdpa_kernels(lambda: step(batches[-1]))
    seconds = sum(times)
    return {
        "params": count_parameters(trainee.model),
        "tgt_tok_s": sum(b.tgt_tokens for b in timed) / seconds,
        "step_ms_median": 1000 * statistics.median(times),
        "flop_s": train_flops(timed, config, vocab) / seconds,
        "peak_mib": peak_memory_mib(device),
        "warmup_seconds": warmup_seconds,
        "sdpa_kernels": kernels,
        "model": trainee.model,
    }


@torch.no_grad()
def decode_bench(
    model: torch.nn.Module, config: Config, device: torch.device, precision: str, n: int
) -> dict[str, float]:
    """Beam-5 sentences/s over n synthetic sources, batched under decode.max_tokens."""
    model.eval()
    rng = np.random.default_rng(1)
    lengths, _ = synthetic_lengths(n, config.data.max_len, rng)
    vocab = config.tokenizer.vocab_size
    sources = [rng.integers(FIRST_ID, vocab, k) for k in lengths]
    sampler = BatchSampler(lengths, lengths, config.decode.max_tokens, shuffle=False)
    batches = [
        collate_source([sources[i] for i in b], b).src.to(device) for b in sampler.epoch_batches(1)
    ]
    d = config.decode
    out_tokens = 0
    sync(device)
    start = time.perf_counter()
    with autocast(device, precision):
        for src in batches:
            nbest = beam_search(model, src, 5, d.alpha, d.length_penalty, d.max_len_a, d.max_len_b)
            out_tokens += sum(len(h[0].tokens) for h in nbest)
    sync(device)
    seconds = time.perf_counter() - start
    return {"sentences_s": n / seconds, "out_tok_s": out_tokens / seconds, "sentences": n}


def heading(args: argparse.Namespace) -> str:
    """The section heading: one section per compilation mode."""
    return f"{SECTION} ({'torch.compile' if args.compile else 'eager'})"


def report(args: argparse.Namespace, res: dict[str, Any]) -> str:
    """The Markdown section for docs/benchmarks.md."""
    t, d = res["train"], res["decode"]
    mfu = t["flop_s"] / res["peak_flop_s"]
    device = res["device"]
    lines = [
        heading(args),
        "",
        f"`{res['command']}` on {device}, torch {torch.__version__}, {res['date']}.",
        "",
        f"{args.config}: {t['params']:,} parameters (vocabulary {res['vocab']:,}), "
        f"{res['precision']}, torch.compile {'on' if args.compile else 'off'}, batches of "
        f"{res['max_tokens']:,} tokens (synthetic, WMT-like lengths), {args.steps} timed steps "
        f"after {args.warmup} warm-up steps ({t['warmup_seconds']:.1f} s, compilation included).",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| training target tokens/s | {t['tgt_tok_s']:,.0f} |",
        f"| median step | {t['step_ms_median']:.1f} ms |",
        f"| model FLOP/s (training) | {t['flop_s'] / 1e12:.1f} T |",
        f"| measured {res['precision']} matmul peak ({res['matmul_n']}^3) "
        f"| {res['peak_flop_s'] / 1e12:.1f} T |",
        f"| **MFU** | **{mfu:.1%}** |",
        f"| peak memory | {t['peak_mib']:,.0f} MiB |",
        f"| beam-5 decoding, sentences/s ({d['sentences']:,} synthetic sources) "
        f"| {d['sentences_s']:,.1f} |",
        f"| beam-5 decoding, output tokens/s | {d['out_tok_s']:,.0f} |",
        "",
        f"SDPA ops in one training step: {', '.join(f'`{k}`' for k in t['sdpa_kernels'])}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/base.yaml")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=15, help="untimed steps (compilation)")
    parser.add_argument("--max-tokens", type=int, help="batch budget (default: the config's)")
    parser.add_argument("--sentences", type=int, default=2000, help="sources to decode")
    parser.add_argument("--smoke", action="store_true", help="tiny model, seconds on a CPU")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--write", help="Markdown file whose section to replace")
    args = parser.parse_args()
    overrides = [f"train.compile={str(args.compile).lower()}"]
    if args.max_tokens:
        overrides.append(f"train.max_tokens={args.max_tokens}")
    if args.smoke:
        overrides += [
            "model.dim=64", "model.ffn_dim=128", "model.heads=2", "model.enc_layers=1",
            "model.dec_layers=1", "tokenizer.vocab_size=500", "train.max_tokens=512",
            "decode.max_tokens=512",
        ]  # fmt: skip
        args.steps, args.warmup, args.sentences = 3, 1, 16
    config = load_config(ROOT / args.config, overrides)
    device = torch.device(args.device)
    configure_backends(device)
    torch.manual_seed(0)
    matmul_n = 8192 if device.type == "cuda" else 1024 if args.smoke else 2048
    res: dict[str, Any] = {
        "command": "python3 scripts/gpu_bench.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "precision": args.precision,
        "vocab": config.tokenizer.vocab_size,
        "max_tokens": config.train.max_tokens,
        "matmul_n": matmul_n,
        "peak_flop_s": matmul_peak(device, DTYPES[args.precision], matmul_n),
    }
    res["train"] = train_bench(config, device, args.precision, args.steps, args.warmup)
    model = res["train"].pop("model")
    res["decode"] = decode_bench(model, config, device, args.precision, args.sentences)
    section = report(args, res)
    print(section)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2), encoding="utf-8")
    if args.write:
        write_section(Path(args.write), section, heading(args))


if __name__ == "__main__":
    main()
