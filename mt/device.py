"""Device placement and mixed precision: everything the model itself does not know about."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from mt.config import DEVICE_NAMES
from mt.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; another name than DEVICE_NAMES, or an unavailable CUDA
    device, is a config error."""
    if re.fullmatch(DEVICE_NAMES, name) is None:  # torch knows mps, meta, ...: mt runs on none
        raise ConfigError(f"train.device={name}: expected auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name}: CUDA is not available on this machine")
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.index is not None and device.index >= count:
        raise ConfigError(
            f"train.device={name}: this machine has {count} CUDA device(s), cuda:0 to "
            f"cuda:{count - 1}"
        )
    return device


def memory_bytes(device: torch.device) -> int | None:
    """The memory of `device`: the GPU's, or the machine's RAM for a CPU (None if unknown)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system that says
        return None


def machine_kind(device: torch.device) -> str:
    """What `precision: auto` on `device` depends on: the GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        return f"cpu: {cpu_model()}"
    return device.type


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what `platform` knows of it."""
    with contextlib.suppress(OSError, UnicodeDecodeError):  # not Linux: no such file
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles, the units that make bf16 matrix products fast.

    Without them oneDNN's bf16 matrix products can be slower than fp32's, and bf16 training
    and decoding with them (docs/benchmarks.md has the measurements). This is only the fallback
    of `auto` on CPU, which times the two precisions (`measure_rates`).
    """
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private; absent in old torch
    return bool(check is not None and check())


# ---------------------------------------------------------------------------------------------
# `auto` on CPU: fp32 or bf16, whichever multiplies the model's matrices faster on this CPU.

MEASURED = ("fp32", "bf16")  # the CPU precisions `auto` chooses between
MEASURE_BUDGET = 0.5  # seconds of matrix products `auto` may spend timing them at start-up
FIRST_ROWS = 8  # rows of the first, smallest rung: bounds the one call that may overrun
TIMED_CALLS = 2  # timed calls per product and rung after the untimed one; the fastest counts
VERDICT_ROWS = 256  # bf16 is chosen only on rates measured at this many rows (or all asked)
BF16_MARGIN = 1.2  # and only if this much faster than fp32: noise must not flip the choice

Features = tuple[int, int]  # (in, out) features of a linear layer


@dataclass(frozen=True)
class Measurement:
    """fp32 and bf16 rates (GFLOP/s) over a model's products, each of `rows` rows."""

    rows: int
    rates: dict[str, float]  # a precision the budget cut short before it was timed is absent
    seconds: float  # spent in matrix products, untimed calls included
    complete: bool = True  # False: the budget ran out within this rung


@dataclass(frozen=True)
class PrecisionChoice:
    """A resolved precision and how it was chosen: asked, cuda, measured, amx (the rule) or
    kept (`auto`'s earlier choice, kept by a resumed run)."""

    precision: str
    how: str
    measurement: Measurement | None = None
    why: str = ""  # amx: why nothing was measured; measured: why fp32 despite bf16; kept: whose

    def record(self) -> dict[str, float | str]:
        """The choice as a flat metrics record (see describe_precision)."""
        out: dict[str, float | str] = {"precision": self.precision, "how": self.how}
        if self.measurement is not None:
            m = self.measurement
            out.update({"rows": m.rows, "seconds": round(m.seconds, 3)})
            # Four significant digits: a tiny model's rates can be far below 1 GFLOP/s.
            rates = {f"{p}_gflops": float(f"{rate:.4g}") for p, rate in m.rates.items()}
            out.update(rates)
        if self.why:
            out["why"] = self.why
        return out

    def describe(self) -> str:
        """One line for the log and the report, e.g. `bf16 (as asked)`."""
        return describe_precision(self.record())


def describe_precision(record: dict[str, object]) -> str:
    """A precision record (PrecisionChoice.record) as one line of text."""
    precision, how = record["precision"], record["how"]
    if how == "asked":
        return f"{precision} (as asked)"
    if how == "cuda":
        return f"{precision} (auto on CUDA: bf16 where the GPU has bf16 units, else fp16)"
    if how == "amx":
        return f"{precision} (auto by the AMX rule: {record.get('why', '')})"
    if how == "kept":
        return f"{precision} (auto, kept: {record.get('why', '')})"
    rates = ", ".join(
        f"{p} {_number(record[f'{p}_gflops'])} GFLOP/s"
        if f"{p}_gflops" in record
        else f"{p} too slow to time"
        for p in MEASURED
    )
    why = f"; {record['why']}" if record.get("why") else ""
    return (
        f"{precision} (auto, measured on the model's matrix products at {record['rows']:,} "
        f"rows in {record['seconds']:.2f} s: {rates}{why})"
    )


def _number(value: float) -> str:
    """E.g. 2,513, 110.3, 0.004412."""
    return f"{value:,.0f}" if value >= 1000 else f"{value:.4g}"


def model_products(dim: int, ffn_dim: int, vocab: int) -> list[Features]:
    """The linear layers that take a Transformer's time: attention, both FFN layers, output."""
    return [(dim, dim), (dim, ffn_dim), (ffn_dim, dim), (dim, vocab)]


Layer = Callable[[Tensor], Callable[[Tensor], Tensor]]  # weight (out, in) -> (rows, in) -> out
TimeCalls = Callable[[str, int, Features, float], list[float]]  # time_linear's signature


def plain_layer(weight: Tensor) -> Callable[[Tensor], Tensor]:
    """What nn.Linear does with `weight` (no bias)."""
    return functools.partial(F.linear, weight=weight)


@torch.no_grad()
def time_linear(
    precision: str, rows: int, features: Features, budget: float, layer: Layer = plain_layer
) -> list[float]:
    """Seconds of up to 1 + TIMED_CALLS calls of `rows` rows through one layer.

    The first, untimed call's seconds include making the operands and the layer (and oneDNN
    builds its kernel for a new shape on that call). No call starts once `budget` seconds are
    spent. `layer` makes the layer from its weight: nn.Linear's product unless told otherwise.
    """
    if budget <= 0:
        return []
    start = time.perf_counter()
    dtype = DTYPES[precision]
    x = torch.full((rows, features[0]), 0.5, dtype=dtype)  # (rows, in)
    forward = layer(torch.full((features[1], features[0]), 0.5, dtype=dtype))  # weight (out, in)
    times: list[float] = []
    while len(times) < 1 + TIMED_CALLS and sum(times) < budget:
        forward(x)
        now = time.perf_counter()
        times.append(now - start)
        start = now
    return times


def time_rung(
    precision: str,
    rows: int,
    products: list[Features],
    budget: float,
    time_calls: TimeCalls,
) -> tuple[float | None, float]:
    """GFLOP/s of one precision over all products at `rows` rows, and the seconds spent.

    The rate is None if `budget` ran out first. Each product counts its fastest timed call.
    """
    spent = best = 0.0
    for features in products:
        times = time_calls(precision, rows, features, budget - spent)
        spent += sum(times)
        if len(times) < 1 + TIMED_CALLS:
            return None, spent
        best += min(times[1:])
    if not best > 0:
        raise RuntimeError("the clock did not advance")
    flops = 2 * rows * sum(k * n for k, n in products)
    return flops / best / 1e9, spent


def measure_rates(
    products: list[Features],
    rows: int,
    budget: float = MEASURE_BUDGET,
    time_calls: TimeCalls = time_linear,
) -> Measurement:
    """Time fp32 and bf16 on `products` at 8, 16, 32... rows, up to `rows`, within `budget`.

    Never a fixed number of calls: a precision that multiplies slowly (bf16 without AVX-512
    BF16 or AMX) could take seconds on a single large product. A rung twice as large starts
    only if twice the last rung's time fits in what is left of the budget, and no call starts
    once it is spent, so the time spent is at most the budget plus one call (with its
    operands) of the smallest rung. Returns the last complete rung, or the first one cut
    short if none completed.
    """
    spent, last, size = 0.0, None, min(FIRST_ROWS, rows)
    while True:
        rates: dict[str, float] = {}
        rung_start = spent
        for precision in MEASURED:
            rate, seconds = time_rung(precision, size, products, budget - spent, time_calls)
            spent += seconds
            if rate is None:
                cut = Measurement(size, rates, spent, complete=False)
                return cut if last is None else dataclasses.replace(last, seconds=spent)
            rates[precision] = rate
        last = Measurement(size, rates, spent)
        if size >= rows or spent + 2 * (spent - rung_start) > budget:
            return last
        size = min(2 * size, rows)


def enough_rows(measurement: Measurement, rows: int) -> bool:
    """Whether the measurement reached the rows a verdict for bf16 needs (of `rows` asked)."""
    return measurement.complete and measurement.rows >= min(rows, VERDICT_ROWS)


def bf16_faster(measurement: Measurement, margin: float = BF16_MARGIN) -> bool:
    """Whether bf16 was timed `margin` times faster than fp32."""
    rates = measurement.rates
    return rates.get("bf16", 0.0) >= margin * rates.get("fp32", math.inf)


def choose_precision(measurement: Measurement, rows: int, margin: float = BF16_MARGIN) -> str:
    """bf16 if measured `margin` times faster than fp32 at enough of the `rows`; else fp32."""
    return "bf16" if enough_rows(measurement, rows) and bf16_faster(measurement, margin) else "fp32"


def resolve_precision(
    name: str,
    device: torch.device,
    products: list[Features] | None = None,
    rows: int = 0,
    time_calls: TimeCalls = time_linear,
) -> PrecisionChoice:
    """`auto`: on CUDA bf16 where the GPU has bf16 units, else fp16; on CPU the faster of fp32
    and bf16.

    On CPU `auto` times both on the model's `products` (model_products) at up to `rows` rows
    (a batch's tokens), through the layers `time_calls` runs (nn.Linear's product unless told
    otherwise); without products, or where timing fails, it falls back to the AMX rule: bf16
    with AMX, else fp32.
    """
    if name != "auto":
        return PrecisionChoice(name, "asked")
    if device.type == "cuda":
        # Without emulation: before compute capability 8 (V100, T4), bf16 runs emulated, slowly.
        # torch asks the current GPU: make it the one asked for (cuda:1 of mixed cards); -1 for
        # plain "cuda" leaves the current one.
        with torch.cuda.device(-1 if device.index is None else device.index):
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        return PrecisionChoice("bf16" if bf16 else "fp16", "cuda")
    if device.type != "cpu":
        return amx_rule(f"{device.type} devices are not timed")
    if not products:
        return amx_rule("the model's shapes are not known here")
    try:
        measurement = measure_rates(products, rows, time_calls=time_calls)
    except RuntimeError as exc:  # e.g. a build without bf16 matrix products
        return amx_rule(f"timing failed: {exc}")
    why = ""
    if bf16_faster(measurement) and not enough_rows(measurement, rows):
        # A busy machine slows the timing until the budget ends it early: say why fp32 won.
        why = f"too few rows timed to pick bf16 (it needs {min(rows, VERDICT_ROWS):,}): a busy CPU?"
    return PrecisionChoice(choose_precision(measurement, rows), "measured", measurement, why)


def amx_rule(why: str) -> PrecisionChoice:
    """bf16 where the CPU has AMX, else fp32, saying why it was not measured."""
    amx = cpu_has_amx()
    why = f"{why}; the CPU has {'' if amx else 'no '}AMX"
    return PrecisionChoice("bf16" if amx else "fp32", "amx", why=why)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context for `precision` (none for fp32), with SDPA's kernel for training.

    On CPU with gradients enabled, SDPA goes to its math kernel in every precision: the CPU
    flash kernel's backward was the slower of the two on Multi30k shapes (bf16 on an AMX Xeon,
    fp32 on an AVX2 EPYC), while without gradients (decoding) its forward is the faster
    (docs/benchmarks.md, "How mt got faster" and "after a cheaper training step").
    """
    stack = contextlib.ExitStack()
    if precision != "fp32":
        stack.enter_context(torch.autocast(device.type, dtype=DTYPES[precision]))
    if device.type == "cpu" and torch.is_grad_enabled():
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack


def configure_backends(device: torch.device, keep_memory: bool = True) -> None:
    """TF32 on CUDA (free speed on Ampere and later); on CPU a page-keeping allocator, unless
    not `keep_memory` (work whose large tensors change shape every call, which kept pages
    fragment)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif keep_memory:
        keep_freed_memory()


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters, from glibc's <malloc.h>


def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse instead of giving it back to the kernel.

    By default every tensor over 32 MiB (logits, their gradients) is a fresh mmap, and the
    kernel page-faults and zeroes it again on each step (docs/benchmarks.md counts the faults).
    Serving all sizes from the heap and never trimming it makes later steps reuse the same
    pages; the cost is that the process keeps its peak memory.
    Returns False (and changes nothing) where the C library is not glibc.
    """
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def give_back_freed_memory() -> bool:
    """Hand the pages of freed heap memory back to the kernel now (glibc's malloc_trim).

    The heap keep_freed_memory never trims also keeps what work of other shapes freed, such as
    validation's beam search: each validation left the process a few hundred MB larger. After
    one, training calls this; its steps' own pages come back on their first touch.
    Returns False where the C library is not glibc.
    """
    trim = _glibc("malloc_trim")
    if trim is None:
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True


def _glibc(name: str) -> Any:
    """glibc's function `name` through ctypes, or None (not Linux, or another C library)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):  # musl and others have no mallopt or malloc_trim
        return None
