"""Attention at decoding's shapes on a CPU: SDPA's default kernel, its math kernel, two matmuls.

    .venv/bin/python scripts/bench_attention.py --rows 160,1280 --sentences 32,256

A micro-benchmark for issue 19's decoding levers, to run on a quiet machine before building
anything: beam search's self-attention has one query per row (N rows, L cached keys, time-major as
mt.model.LayerCache keeps them) and its cross-attention G queries per sentence (B sentences, S
source keys, contiguous). Each variant runs on the
same random inputs in bf16 and fp32; "matmul" is q k^T, a float32 softmax and a product with v
(the path a decoder could take instead of SDPA); the largest difference from the default
kernel's output is printed beside its time. The variants alternate, so that noise hits them
alike; the median of --repeats rounds of --calls calls is reported, in microseconds per call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "scripts"):  # run as a script from anywhere; bench.py sits beside it
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench import cpu_model  # noqa: E402
from torch import Tensor  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

HEADS, HEAD_DIM = 4, 64  # configs/multi30k.yaml: dim 256, 4 heads
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """SDPA with the kernel it picks (on a CPU: the flash kernel)."""
    return F.scaled_dot_product_attention(q, k, v)


def sdpa_math(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """SDPA's math kernel."""
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v)


def matmuls(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(hd)) v with two matrix products: (..., Lq, hd) -> (..., Lq, hd)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.size(-1) ** -0.5  # (..., Lq, Lk)
    return torch.matmul(scores.softmax(-1, dtype=torch.float32).to(q.dtype), v)


VARIANTS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "sdpa": sdpa,
    "sdpa math": sdpa_math,
    "matmul": matmuls,
}


def shapes(rows: list[int], sentences: list[int], keys: int, beam: int, source: int) -> list:
    """(label, q shape, k/v shape) of each case: self-attention per N, cross per B."""
    cases = [(f"self, N={n}, L={keys}, time-major keys", (n, HEADS, 1, HEAD_DIM),
              (n, HEADS, keys, HEAD_DIM)) for n in rows]  # fmt: skip
    cases += [(f"cross, B={b}, G={beam}, S={source}", (b, HEADS, beam, HEAD_DIM),
               (b, HEADS, source, HEAD_DIM)) for b in sentences]  # fmt: skip
    return cases


def timed(fn: Callable[[], Tensor], calls: int) -> float:
    """Microseconds per call over `calls` calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


@torch.no_grad()
def case(
    q_shape: tuple, kv_shape: tuple, dtype: torch.dtype, calls: int, repeats: int, time_major: bool
) -> dict:
    """Median microseconds per call of each variant, and its largest difference from SDPA's.

    time_major: k and v are (B, H, L, hd) views of (L, B, H, hd) buffers, as the decoder's
    self-attention cache passes them; else contiguous, as its cross-attention keys are."""
    q, k, v = (torch.randn(s, dtype=dtype) for s in (q_shape, kv_shape, kv_shape))
    if time_major:  # as the decoder's self-attention cache hands them over (mt.model.LayerCache)
        k, v = (x.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3) for x in (k, v))
    reference = sdpa(q, k, v).float()
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for fn in VARIANTS.values():  # one untimed round
        timed(lambda fn=fn: fn(q, k, v), calls)
    for _ in range(repeats):
        for name, fn in VARIANTS.items():
            times[name].append(timed(lambda fn=fn: fn(q, k, v), calls))
    return {
        name: (statistics.median(times[name]), (fn(q, k, v).float() - reference).abs().max().item())
        for name, fn in VARIANTS.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="160,1280", help="self-attention rows N (comma list)")
    parser.add_argument("--sentences", default="32,256", help="cross-attention sentences B")
    parser.add_argument("--keys", type=int, default=20, help="cached target positions L")
    parser.add_argument("--beam", type=int, default=5, help="queries per sentence G")
    parser.add_argument("--source", type=int, default=16, help="source positions S")
    parser.add_argument("--precisions", default="bf16,fp32")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, sentences = ([int(x) for x in s.split(",")] for s in (args.rows, args.sentences))
    print(f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()}), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; H={HEADS}, "
          f"hd={HEAD_DIM}; median of {args.repeats} x {args.calls} calls")  # fmt: skip
    print()
    names = list(VARIANTS)
    print("| shape | precision | " + " | ".join(f"{n} us" for n in names) + " | "
          + " | ".join(f"{n} max diff" for n in names[1:]) + " |")  # fmt: skip
    print("|---|---|" + "---:|" * (2 * len(names) - 1))
    for label, q_shape, kv_shape in shapes(rows, sentences, args.keys, args.beam, args.source):
        for precision in args.precisions.split(","):
            time_major = label.startswith("self")
            res = case(q_shape, kv_shape, DTYPES[precision], args.calls, args.repeats, time_major)
            us = " | ".join(f"{res[n][0]:,.1f}" for n in names)
            diffs = " | ".join(f"{res[n][1]:.1e}" for n in names[1:])
            print(f"| {label} | {precision} | {us} | {diffs} |", flush=True)


if __name__ == "__main__":
    main()
