"""Device placement and mixed precision: everything the model itself does not know about."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from mt.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; an unavailable CUDA device is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name}: CUDA is not available on this machine")
    return device


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles, the units that make bf16 matrix products fast.

    With AMX, bf16 autocast trained Multi30k 1.6x faster than fp32 (docs/benchmarks.md). On an
    AVX-512 CPU without it, oneDNN's bf16 matrix product ran slower than fp32's (159 against
    ~250 GFLOP/s on 2 threads), and bf16 training and decoding were slower than fp32.
    """
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private; absent in old torch
    return bool(check is not None and check())


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto`: bf16 on CUDA that supports it, else fp16; on CPU bf16 with AMX, else fp32."""
    if name != "auto":
        return name
    if device.type != "cuda":
        return "bf16" if cpu_has_amx() else "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context for `precision` (a no-op for fp32).

    On CPU with gradients enabled, low precision also routes SDPA to its math kernel: the CPU
    flash kernel's bf16 backward ran twice as slow as the math one on Multi30k shapes
    (scripts/bench.py). Without gradients (decoding) the flash kernel's forward is faster:
    bf16 beam search took 30% less time with it.
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device.type, dtype=DTYPES[precision]))
    if device.type == "cpu" and torch.is_grad_enabled():
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack


def configure_backends(device: torch.device) -> None:
    """TF32 on CUDA (free speed on Ampere and later); a page-keeping allocator on CPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        keep_freed_memory()


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters, from glibc's <malloc.h>


def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse instead of giving it back to the kernel.

    By default every tensor over 32 MiB (logits, their gradients) is a fresh mmap, and the
    kernel page-faults and zeroes it again on each step: about 200,000 faults and a fifth of a
    bf16 Multi30k step. Serving all sizes from the heap and never trimming it makes later
    steps reuse the same pages; the cost is that the process keeps its peak memory.
    Returns False (and changes nothing) where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
