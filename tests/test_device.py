"""Tests for mt.device: the CPU allocator setting and the precision contexts."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from mt.device import autocast

FAULTS = """
import resource, sys, torch
from mt.device import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for step in range(8):  # like training steps: the same large temporaries, again and again
    if step == 6:
        before = faults()
    x, y = torch.ones(8 * 2**20), torch.ones(16 * 2**20)  # 32 and 64 MiB
    total = x.sum() + y.sum()
    del x, y
print(faults() - before)
"""


def minor_faults(mode: str) -> int:
    """Page faults of the last two of eight rounds of large allocations."""
    out = subprocess.run(
        [sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_keep_freed_memory_reuses_pages() -> None:
    assert minor_faults("default") > 40_000  # 2 x 24,576 pages of 4 KiB, faulted in again
    assert minor_faults("keep") < 1_000


def sdpa_kernels(precision: str) -> set[str]:
    """Names of the SDPA ops that run under mt's context for `precision` on CPU."""
    q = torch.randn(2, 2, 5, 8)
    with profile() as prof, autocast(torch.device("cpu"), precision):
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
    return {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}


def test_cpu_low_precision_uses_the_math_sdpa_kernel() -> None:
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in sdpa_kernels("fp32")
    bf16 = sdpa_kernels("bf16")
    assert "aten::_scaled_dot_product_attention_math" in bf16
    assert not any("flash" in name for name in bf16)
