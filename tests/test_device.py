"""Tests for mt.device: the CPU allocator setting and the precision contexts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from mt.device import autocast, cpu_has_amx, resolve_precision

HEAP = """
import ctypes, json, sys, torch
from mt.device import keep_freed_memory
FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
          "fordblks", "keepcost")
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
if sys.argv[1] == "keep":
    assert keep_freed_memory()
x = torch.ones(16 * 2**20)  # 64 MiB, the size of a Multi30k logits tensor
mapped = libc.mallinfo2().hblkhd  # bytes in separately mmapped blocks
del x
print(json.dumps({"mapped": mapped, "free_in_heap": libc.mallinfo2().fordblks}))
"""


def heap_after_free(mode: str) -> dict[str, int]:
    """glibc's view of a 64 MiB tensor: mmapped while alive? kept in the heap once freed?"""
    out = subprocess.run(
        [sys.executable, "-c", HEAP, mode], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


@pytest.mark.slow  # two Python processes importing torch
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_keep_freed_memory_keeps_large_blocks_in_the_heap() -> None:
    # By default a large tensor is its own mmap, unmapped when freed: the next one is faulted
    # in and zeroed by the kernel again. With the setting it comes from the heap and stays.
    default, keep = heap_after_free("default"), heap_after_free("keep")
    assert default["mapped"] >= 64 * 2**20 and default["free_in_heap"] < 64 * 2**20
    assert keep["mapped"] < 64 * 2**20 and keep["free_in_heap"] >= 64 * 2**20


def sdpa_kernels(precision: str, grad: bool = True) -> set[str]:
    """Names of the SDPA ops that run under mt's context for `precision` on CPU."""
    q = torch.randn(2, 2, 5, 8)
    with torch.set_grad_enabled(grad), profile() as prof, autocast(torch.device("cpu"), precision):
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
    return {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}


def test_cpu_low_precision_training_uses_the_math_sdpa_kernel() -> None:
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in sdpa_kernels("fp32")
    bf16 = sdpa_kernels("bf16")
    assert "aten::_scaled_dot_product_attention_math" in bf16
    assert not any("flash" in name for name in bf16)


def test_cpu_low_precision_decoding_keeps_the_flash_sdpa_kernel() -> None:
    bf16 = sdpa_kernels("bf16", grad=False)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in bf16
    assert not any("math" in name for name in bf16)


def test_auto_precision_on_cpu_is_bf16_only_with_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert cpu_has_amx() and resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_precision("auto", cpu) == "fp32"
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # a torch without the check
    assert not cpu_has_amx() and resolve_precision("auto", cpu) == "fp32"
    assert [resolve_precision(p, cpu) for p in ("fp32", "bf16")] == ["fp32", "bf16"]
