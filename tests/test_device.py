"""Tests for mt.device: the CPU allocator setting and the precision contexts."""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from mt import device
from mt.device import Measurement, autocast, choose_precision

HEAP = """
import ctypes, json, sys, torch
from mt.device import give_back_freed_memory, keep_freed_memory
FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
          "fordblks", "keepcost")
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
if sys.argv[1] in ("keep", "trim"):
    assert keep_freed_memory()
x = torch.ones(16 * 2**20)  # 64 MiB, the size of a Multi30k logits tensor
mapped = libc.mallinfo2().hblkhd  # bytes in separately mmapped blocks
del x
before = resident()
if sys.argv[1] == "trim":
    assert give_back_freed_memory()
print(json.dumps({"mapped": mapped, "free_in_heap": libc.mallinfo2().fordblks,
                  "given_back": before - resident()}))
"""


def heap_after_free(mode: str) -> dict[str, int]:
    """glibc's view of a 64 MiB tensor: mmapped while alive? kept in the heap once freed?"""
    out = subprocess.run(
        [sys.executable, "-c", HEAP, mode], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


@pytest.mark.slow  # two Python processes importing torch
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_keep_freed_memory_keeps_large_blocks_in_the_heap_until_given_back() -> None:
    # By default a large tensor is its own mmap, unmapped when freed: the next one is faulted
    # in and zeroed by the kernel again. With the setting it comes from the heap and stays.
    default, keep = heap_after_free("default"), heap_after_free("keep")
    assert default["mapped"] >= 64 * 2**20 and default["free_in_heap"] < 64 * 2**20
    assert keep["mapped"] < 64 * 2**20 and keep["free_in_heap"] >= 64 * 2**20
    assert keep["given_back"] < 2**20  # kept: still resident
    # give_back_freed_memory (after a validation) hands the freed pages back at once.
    assert heap_after_free("trim")["given_back"] >= 60 * 2**20


def sdpa_kernels(precision: str, grad: bool = True) -> set[str]:
    """Names of the SDPA ops that run under mt's context for `precision` on CPU."""
    q = torch.randn(2, 2, 5, 8)
    with torch.set_grad_enabled(grad), profile() as prof, autocast(torch.device("cpu"), precision):
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
    return {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cpu_training_uses_the_math_sdpa_kernel(precision: str) -> None:
    kernels = sdpa_kernels(precision)
    assert "aten::_scaled_dot_product_attention_math" in kernels
    assert not any("flash" in name for name in kernels)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cpu_decoding_keeps_the_flash_sdpa_kernel(precision: str) -> None:
    kernels = sdpa_kernels(precision, grad=False)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in kernels
    assert not any("math" in name for name in kernels)


CPU = torch.device("cpu")
MULTI30K = device.model_products(256, 1024, 8000)  # configs/multi30k.yaml, 8,000 pieces


def test_choose_precision_needs_bf16_faster_by_the_margin_on_enough_rows() -> None:
    def choose(fp32: float, bf16: float, rows: int = 1024, complete: bool = True) -> str:
        measured = Measurement(rows, {"fp32": fp32, "bf16": bf16}, 0.1, complete)
        return choose_precision(measured, rows=4096)

    assert choose(100.0, 250.0) == "bf16"  # AVX-512 BF16 or AMX
    assert choose(100.0, 120.0) == "bf16"  # exactly the margin
    assert choose(100.0, 119.0) == "fp32"  # faster, but not by the margin
    assert choose(250.0, 159.0) == "fp32"  # AVX-512 without bf16 units
    assert choose(100.0, 1.0) == "fp32"  # AVX2
    assert choose(100.0, 250.0, rows=128) == "fp32"  # too few rows to trust
    assert choose(100.0, 250.0, complete=False) == "fp32"  # the budget cut the rung short
    few = Measurement(64, {"fp32": 1.0, "bf16": 2.0}, 0.1)
    assert choose_precision(few, rows=64) == "bf16"  # every row asked for was measured
    assert choose_precision(Measurement(8, {"fp32": 1.0}, 0.5, False), rows=64) == "fp32"


@pytest.mark.parametrize(("units", "expected"), [(True, "bf16"), (False, "fp16")])
def test_auto_on_cuda_is_bf16_only_with_bf16_units(
    monkeypatch: pytest.MonkeyPatch, units: bool, expected: str
) -> None:
    # A V100 or T4 "supports" bf16 by emulation alone: auto must give it fp16.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: (
        units or including_emulation
    ))  # fmt: skip
    choice = device.resolve_precision("auto", torch.device("cuda"))
    assert choice.record()["precision"] == expected
    assert choice.describe() == (
        f"{expected} (auto on CUDA: bf16 where the GPU has bf16 units, else fp16)"
    )


def test_auto_on_cuda_asks_the_gpu_it_runs_on(monkeypatch: pytest.MonkeyPatch) -> None:
    current = [0]  # torch's current GPU: 0 a V100 (emulated bf16), 1 an A100

    @contextlib.contextmanager
    def on(index: int) -> Iterator[None]:  # torch.cuda.device: -1 changes nothing
        before = current[0]
        current[0] = before if index < 0 else index
        yield
        current[0] = before

    monkeypatch.setattr(torch.cuda, "device", on)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: (
        current[0] == 1 or including_emulation
    ))  # fmt: skip
    chosen = {
        name: device.resolve_precision("auto", torch.device(name)).precision
        for name in ("cuda:1", "cuda:0", "cuda")
    }
    assert chosen == {"cuda:1": "bf16", "cuda:0": "fp16", "cuda": "fp16"}
    assert current == [0]


class FakeMatmul:
    """F.linear at fixed GFLOP/s per dtype, on a clock that only its products advance."""

    def __init__(self, rates: dict[torch.dtype, float], slower_from: int = 0) -> None:
        self.rates, self.now = rates, 0.0
        self.slower_from = slower_from  # from this many rows bf16 runs 1,000 times slower
        self.calls: list[tuple[torch.dtype, float]] = []  # (dtype, seconds) of each product

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> None:
        rate = self.rates[x.dtype]
        if self.slower_from and x.dtype == torch.bfloat16 and x.shape[0] >= self.slower_from:
            rate /= 1000
        seconds = 2 * x.shape[0] * x.shape[1] * weight.shape[0] / (rate * 1e9)
        self.calls.append((x.dtype, seconds))
        self.now += seconds

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeMatmul:
        monkeypatch.setattr(device, "F", SimpleNamespace(linear=self.linear))
        monkeypatch.setattr(device, "time", SimpleNamespace(perf_counter=lambda: self.now))
        return self


def test_measurement_gives_the_rates_at_the_largest_rows_the_budget_allows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeMatmul({torch.float32: 100.0, torch.bfloat16: 250.0}).install(monkeypatch)
    measured = device.measure_rates(MULTI30K, rows=4096, budget=0.5)
    assert measured.rates == pytest.approx({"fp32": 100.0, "bf16": 250.0})
    assert measured.complete and measured.seconds == pytest.approx(fake.now)
    # Each rung has twice the rows of the one before, and costs twice as much: 8, 16, ..., 1024.
    # 2048 would not fit: it starts only if twice the last rung fits in what is left.
    first = sum(seconds for _, seconds in fake.calls[:24])  # 2 precisions x 4 products x 3 calls
    assert measured.rows == 1024 and fake.now == pytest.approx(first * (2**8 - 1))
    assert fake.now <= 0.5
    assert choose_precision(measured, rows=4096) == "bf16"


def test_a_slow_bf16_is_never_timed_past_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    # AVX2: bf16 products about a hundred times slower than fp32's.
    fake = FakeMatmul({torch.float32: 100.0, torch.bfloat16: 1.0}).install(monkeypatch)
    measured = device.measure_rates(MULTI30K, rows=4096, budget=0.5)
    longest = max(s for _, s in fake.calls[:24])  # the longest call of the first rung
    assert fake.now <= 0.5 + longest
    assert measured.seconds == pytest.approx(fake.now)  # every call counted, cut ones too
    assert measured.rows < device.VERDICT_ROWS
    assert choose_precision(measured, rows=4096) == "fp32"


def test_a_rung_the_budget_cuts_short_gives_the_last_complete_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # bf16 as fast as fp32 up to 16 rows, then far slower: the 32-row rung overruns.
    fake = FakeMatmul({torch.float32: 100.0, torch.bfloat16: 100.0}, 32).install(monkeypatch)
    measured = device.measure_rates(MULTI30K, rows=4096, budget=0.5)
    assert (measured.rows, measured.complete) == (16, True)
    assert measured.rates == pytest.approx({"fp32": 100.0, "bf16": 100.0})
    assert measured.seconds == pytest.approx(fake.now) and fake.now > 0.5  # the overrun counted


def test_a_single_bf16_product_longer_than_the_budget_stops_the_measurement(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeMatmul({torch.float32: 100.0, torch.bfloat16: 1e-3}).install(monkeypatch)
    measured = device.measure_rates(MULTI30K, rows=4096, budget=0.5)
    assert [dtype for dtype, _ in fake.calls].count(torch.bfloat16) == 1  # then no call starts
    assert (measured.rows, measured.complete) == (8, False)
    assert measured.rates == pytest.approx({"fp32": 100.0})  # bf16: too slow to time
    choice = resolve_precision_with(monkeypatch, measured)
    assert choice.precision == "fp32"
    assert choice.describe() == (
        "fp32 (auto, measured on the model's matrix products at 8 rows in "
        f"{measured.seconds:.2f} s: fp32 100 GFLOP/s, bf16 too slow to time)"
    )


def test_fp32_chosen_on_too_few_rows_says_why_in_the_log_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A busy CPU: the budget ends the timing at 8 rows, where bf16 looked 6x faster.
    measured = Measurement(8, {"fp32": 1.147, "bf16": 7.358}, 0.34)
    choice = resolve_precision_with(monkeypatch, measured)
    assert choice.precision == "fp32"
    assert choice.record()["why"] == "too few rows timed to pick bf16 (it needs 256): a busy CPU?"
    assert choice.describe() == (
        "fp32 (auto, measured on the model's matrix products at 8 rows in 0.34 s: "
        "fp32 1.147 GFLOP/s, bf16 7.358 GFLOP/s; too few rows timed to pick bf16 (it needs 256): "
        "a busy CPU?)"
    )
    # Where fp32 wins on its rates, or bf16 on enough rows, there is nothing to explain.
    slow_bf16 = Measurement(8, {"fp32": 100.0, "bf16": 1.0}, 0.5)
    assert resolve_precision_with(monkeypatch, slow_bf16).why == ""
    enough = Measurement(256, {"fp32": 100.0, "bf16": 250.0}, 0.4)
    assert resolve_precision_with(monkeypatch, enough).record() == {
        "precision": "bf16", "how": "measured", "rows": 256, "seconds": 0.4,
        "fp32_gflops": 100.0, "bf16_gflops": 250.0,
    }  # fmt: skip


def resolve_precision_with(monkeypatch: pytest.MonkeyPatch, measured: Measurement):
    """resolve_precision("auto") on CPU, its measurement replaced by `measured`."""
    monkeypatch.setattr(device, "measure_rates", lambda products, rows, time_calls: measured)
    return device.resolve_precision("auto", CPU, MULTI30K, 4096)


def test_measurement_on_tiny_shapes_gives_finite_positive_rates() -> None:
    # The real products and clock; the budget is a safety net (the shapes take microseconds).
    measured = device.measure_rates(device.model_products(8, 16, 12), rows=16, budget=60.0)
    assert measured.complete and measured.rows == 16
    assert set(measured.rates) == {"fp32", "bf16"}
    assert all(math.isfinite(rate) and rate > 0 for rate in measured.rates.values())


def test_auto_precision_falls_back_to_the_amx_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    choice = device.resolve_precision("auto", CPU)  # no shapes: nothing to time
    assert (choice.precision, choice.how) == ("bf16", "amx")
    assert choice.describe() == (
        "bf16 (auto by the AMX rule: the model's shapes are not known here; the CPU has AMX)"
    )

    def fail(products: list, rows: int, time_calls: object) -> Measurement:
        raise RuntimeError("\"addmm\" not implemented for 'BFloat16'")

    monkeypatch.setattr(device, "measure_rates", fail)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    choice = device.resolve_precision("auto", CPU, MULTI30K, 4096)
    assert (choice.precision, choice.how) == ("fp32", "amx")
    assert choice.why.startswith("timing failed: ")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # a torch without the check
    assert not device.cpu_has_amx() and device.resolve_precision("auto", CPU).precision == "fp32"


def test_asked_precision_is_kept_and_recorded() -> None:
    for name in ("fp32", "bf16", "fp16"):
        choice = device.resolve_precision(name, CPU, MULTI30K, 4096)
        assert choice.record() == {"precision": name, "how": "asked"}
        assert choice.describe() == f"{name} (as asked)"


def test_a_measured_choice_is_recorded_with_both_rates(monkeypatch: pytest.MonkeyPatch) -> None:
    measured = Measurement(1024, {"fp32": 100.123, "bf16": 2513.4}, 0.4567)
    choice = resolve_precision_with(monkeypatch, measured)
    assert choice.record() == {
        "precision": "bf16", "how": "measured", "rows": 1024, "seconds": 0.457,
        "fp32_gflops": 100.1, "bf16_gflops": 2513.0,
    }  # fmt: skip
    assert choice.describe() == (
        "bf16 (auto, measured on the model's matrix products at 1,024 rows in 0.46 s: "
        "fp32 100.1 GFLOP/s, bf16 2,513 GFLOP/s)"
    )


def test_a_cuda_device_the_machine_lacks_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from mt.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device.resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ConfigError) as err:
        device.resolve_device("cuda:7")
    assert (
        str(err.value) == "train.device=cuda:7: this machine has 2 CUDA device(s), cuda:0 to cuda:1"
    )


@pytest.mark.parametrize("name", ["mps", "mps:0", "meta", "xpu", "gpu", "CPU"])
def test_a_device_mt_does_not_run_on_is_one_line_before_any_work(
    name: str, trained_run: Path
) -> None:
    from mt.errors import ConfigError, MtError
    from mt.translate import resolve_runtime

    with pytest.raises(ConfigError) as err:
        device.resolve_device(name)
    assert str(err.value) == f"train.device={name}: expected auto, cpu, cuda or cuda:N"
    with pytest.raises(MtError) as err:
        resolve_runtime(name, "auto", trained_run)
    assert str(err.value) == f"--device {name}: expected auto, cpu, cuda or cuda:N"


def test_memory_of_a_cpu_is_the_machines() -> None:
    found = device.memory_bytes(torch.device("cpu"))
    assert found is not None and found > 2**28  # at least 256 MiB: a machine that runs the tests
