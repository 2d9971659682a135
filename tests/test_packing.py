"""oneDNN-packed fp32 linear layers for CPU decoding (mt.packing)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mt import device, packing
from mt.config import DecodeConfig, ModelConfig
from mt.model import FeedForward, Transformer
from mt.packing import PackedLinear, fuse_activation, pack
from mt.quantize import quantize
from mt.rundir import load_trained
from mt.search import Ensemble, beam_search
from mt.translate import Translator, load_models, resolve_runtime
from mt.vocab import BOS_ID, EOS_ID

CPU = torch.device("cpu")
TINY = Path(__file__).resolve().parents[1] / "tests" / "data" / "tiny"
needs_onednn = pytest.mark.skipif(not packing.available(), reason="torch built without oneDNN")


def tiny_model(seed: int = 0) -> Transformer:
    """A random model whose biases are not zero (its initialisation zeroes them), so that a
    bias dropped or misplaced by packing changes what it computes."""
    torch.manual_seed(seed)
    config = ModelConfig(dim=32, enc_layers=2, dec_layers=2, heads=4, ffn_dim=64, dropout=0.0)
    model = Transformer(config, 40, 40).eval()
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, nn.Linear) and layer.bias is not None:
                layer.bias.normal_(std=0.1)
    return model


def linears(model: nn.Module) -> int:
    return sum(type(m) is nn.Linear for m in model.modules())


def packed(model: nn.Module) -> int:
    return sum(isinstance(m, PackedLinear) for m in model.modules())


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_computes_the_linear_layer(bias: bool) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(48, 80, bias=bias)
    fast = PackedLinear(layer.weight, layer.bias, torch.float32)
    for x in (
        torch.randn(7, 48),
        torch.randn(3, 5, 48),
        torch.randn(5, 3, 48).transpose(0, 1),  # not contiguous
        torch.randn(0, 48),
    ):
        got = fast(x)
        assert got.shape == (*x.shape[:-1], 80)
        torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_pack_swaps_every_linear_layer_and_the_tied_projection() -> None:
    model = tiny_model()
    count = linears(model)  # 4 per attention, 2 per FFN
    assert count == 2 * (4 + 2) + 2 * (8 + 2)
    assert pack(model, CPU, "fp32") is model
    assert linears(model) == 0
    # Each of the 4 self-attentions has one fused q/k/v layer in place of three.
    assert packed(model) == count - 4 * 2 + 1
    assert isinstance(model.output_layer, PackedLinear)
    # The parameters left are the embeddings' and the norms': packed layers are not trained.
    kept = {id(p): p for m in model.modules() if isinstance(m, (nn.Embedding, nn.LayerNorm))
            for p in m.parameters()}  # fmt: skip
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in kept.values())


@needs_onednn
def test_pack_fuses_self_attention_projections_and_the_ffn_activation() -> None:
    plain = tiny_model()
    fast = pack(copy.deepcopy(plain), CPU, "fp32")
    x = torch.randn(3, 5, 32)
    for mine, theirs in [(fast.encoder[0], plain.encoder[0]), (fast.decoder[1], plain.decoder[1])]:
        attn = mine.self_attn
        assert attn.q_proj is attn.k_proj is attn.v_proj is None
        assert (attn.qkv_proj.in_features, attn.qkv_proj.out_features) == (32, 96)
        expected = theirs.self_attn.project_qkv(x)  # three separate products
        for got, want in zip(attn.project_qkv(x), expected, strict=True):
            assert got.shape == want.shape == (3, 4, 5, 8)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert mine.ffn.fc1.post == "relu" and isinstance(mine.ffn.act, nn.Identity)
        torch.testing.assert_close(mine.ffn(x), theirs.ffn(x), rtol=1e-5, atol=1e-5)
    cross = fast.decoder[0].cross_attn  # keys and values come from the memory: not fused
    assert cross.qkv_proj is None and isinstance(cross.q_proj, PackedLinear)


@needs_onednn
def test_a_packed_gelu_layer_computes_the_exact_gelu() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(48, 80)
    fast = PackedLinear(layer.weight, layer.bias, torch.float32, nn.GELU)
    x = torch.randn(7, 48)
    torch.testing.assert_close(fast(x), F.gelu(layer(x)), rtol=1e-5, atol=1e-5)
    ffn = FeedForward(32, 64, 0.0, "gelu").eval()
    ffn.act = nn.GELU(approximate="tanh")  # oneDNN's tanh GELU is not asked for: left alone
    fuse_activation(ffn, torch.float32)
    assert type(ffn.fc1) is nn.Linear and isinstance(ffn.act, nn.GELU)


@needs_onednn
def test_packed_model_scores_as_the_plain_one() -> None:
    plain = tiny_model()
    fast = pack(copy.deepcopy(plain), CPU, "fp32")
    src = torch.tensor([[5, 9, 12, 7, EOS_ID], [6, 8, EOS_ID, 0, 0]])
    tgt = torch.tensor([[BOS_ID, 11, 13, 17], [BOS_ID, 14, 15, 0]])
    with torch.no_grad():
        torch.testing.assert_close(fast(src, tgt), plain(src, tgt), rtol=1e-4, atol=1e-4)
    config = DecodeConfig(beam=4, nbest=4, max_len_a=1.0, max_len_b=4)
    # Ranked scores agree at each rank (a near tie may swap two hypotheses, not their scores).
    ours, reference = beam_search(fast, src, config), beam_search(plain, src, config)
    for mine, theirs in zip(ours, reference, strict=True):
        assert len(mine) == len(theirs) == 4
        for a, b in zip(mine, theirs, strict=True):
            assert a.score == pytest.approx(b.score, abs=1e-4)


@needs_onednn
def test_a_deep_copy_of_a_packed_model_packs_its_own_weights() -> None:
    model = pack(tiny_model(), CPU, "fp32")
    twin = copy.deepcopy(model)
    layer, copied = model.decoder[0].ffn.fc1, twin.decoder[0].ffn.fc1
    assert isinstance(copied, PackedLinear)
    assert copied.weight.data_ptr() != layer.weight.data_ptr()
    x = torch.randn(3, 32)
    torch.testing.assert_close(copied(x), layer(x))


@needs_onednn
@pytest.mark.parametrize("act", [None, nn.ReLU, nn.GELU])
def test_batches_from_blas_rows_go_through_blas_and_compute_the_same(
    act: type | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(48, 80)
    fast = PackedLinear(layer.weight, layer.bias, torch.float32, act)
    fast.blas_rows = 6
    through: list[tuple[int, ...]] = []
    blas = fast.blas
    monkeypatch.setattr(fast, "blas", lambda x: through.append(tuple(x.shape)) or blas(x))
    expected = {None: lambda y: y, nn.ReLU: F.relu, nn.GELU: F.gelu}[act]
    for x in (torch.randn(5, 48), torch.randn(6, 48), torch.randn(2, 4, 48)):
        torch.testing.assert_close(fast(x), expected(layer(x)), rtol=1e-5, atol=1e-5)
    assert through == [(6, 48), (2, 4, 48)]  # rows counted over every leading dimension
    assert "BLAS from 6 rows" in repr(fast)
    assert copy.deepcopy(fast).blas_rows == 6


@needs_onednn
def test_calibrate_hands_blas_each_shape_from_the_fewest_rows_it_won_at(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[tuple[str, int, tuple[int, int], str]] = []
    wins = {(32, 64): 8, (32, 40): 64}  # BLAS's first winning rows, per shape; others never

    def timed(
        precision: str, rows: int, shape: tuple[int, int], budget: float, layer=device.plain_layer
    ) -> list:
        way = "blas" if layer is device.plain_layer else "packed"
        asked.append((precision, rows, shape, way))
        fast = (rows >= wins.get(shape, 10**9)) == (way == "blas")
        return [1.0] + [0.1 if fast else 0.2] * device.TIMED_CALLS

    monkeypatch.setattr(packing, "time_linear", timed)
    model = pack(tiny_model(), CPU, "fp32")
    asked.clear()
    assert packing.calibrate(model, ladder=(8, 64), budget=60.0) == {(32, 64): 8, (32, 40): 64}
    shapes = {(32, 32), (32, 40), (32, 64), (32, 96), (64, 32)}  # (in, out) of the tiny model
    rungs = [(rows, shape) for _, rows, shape, _ in asked[::2]]  # the ladder, rung by rung
    assert rungs == [(8, shape) for shape in sorted(shapes)] + [
        (64, shape) for shape in sorted(shapes - {(32, 64)})
    ]
    assert [way for *_, way in asked] == ["packed", "blas"] * len(rungs)
    assert {p for p, *_ in asked} == {"fp32"}
    chosen = {
        (m.in_features, m.out_features, m.blas_rows)
        for m in model.modules()
        if isinstance(m, PackedLinear)
    }
    assert chosen == {(32, 64, 8), (32, 40, 64)} | {
        (*shape, None) for shape in shapes - {(32, 64), (32, 40)}
    }


@needs_onednn
def test_calibrate_leaves_packed_what_the_budget_cut_short(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def timed(
        precision: str, rows: int, shape: tuple[int, int], budget: float, layer=device.plain_layer
    ) -> list:
        if budget < 1.5:  # no room for a whole timing
            return [1.0]
        return [1.0] + [0.1 if layer is device.plain_layer else 0.2] * device.TIMED_CALLS

    monkeypatch.setattr(packing, "time_linear", timed)
    model = pack(tiny_model(), CPU, "fp32")
    # The first shape (32 -> 32) is timed both ways; the 1 s left cuts the next one short.
    first = (1.0 + 0.2 * device.TIMED_CALLS) + (1.0 + 0.1 * device.TIMED_CALLS)
    assert packing.calibrate(model, ladder=(64,), budget=first + 1.0) == {(32, 32): 64}
    assert packing.calibrate(model, ladder=(64,), budget=0.0) == {}
    assert all(m.blas_rows is None for m in model.modules() if isinstance(m, PackedLinear))


@needs_onednn
def test_pack_calibrates_fp32_models_only(monkeypatch: pytest.MonkeyPatch) -> None:
    calibrated: list[Transformer] = []
    monkeypatch.setattr(packing, "calibrate", calibrated.append)
    model = pack(tiny_model(), CPU, "fp32")
    assert calibrated == [model]
    if packing.packs(CPU, "bf16"):
        pack(tiny_model(), CPU, "bf16")
        assert calibrated == [model]


@pytest.mark.skipif(not packing.packs(CPU, "bf16"), reason="no oneDNN bf16 on this CPU")
def test_bf16_packed_linear_does_what_autocast_does_to_nn_linear() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(48, 80)
    fast = PackedLinear(layer.weight, layer.bias, torch.bfloat16)
    x = torch.randn(3, 5, 48)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        expected = layer(x)
        got, from_bf16 = fast(x), fast(x.bfloat16())  # fp32 input is cast, as autocast does
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)  # bf16's own rounding
    torch.testing.assert_close(from_bf16, got)
    model = pack(tiny_model(), CPU, "bf16")
    assert packed(model) == 25 and model.output_layer.dtype == torch.bfloat16


def test_pack_leaves_other_precisions_devices_and_quantised_models_alone() -> None:
    for precision in ("fp16", "auto"):
        model = tiny_model()
        pack(model, CPU, precision)
        assert packed(model) == 0 and model.output_layer is None
    model = tiny_model()
    pack(model, torch.device("meta"), "fp32")  # any device but the CPU
    assert packed(model) == 0
    model = quantize(tiny_model(), "int8")
    output = model.output_layer
    pack(model, CPU, "fp32")
    assert packed(model) == 0 and model.output_layer is output


def test_pack_is_a_no_op_without_onednn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packing, "available", lambda: False)
    model = tiny_model()
    pack(model, CPU, "fp32")
    assert packed(model) == 0 and linears(model) == 32


@needs_onednn
def test_pack_packs_each_model_of_an_ensemble() -> None:
    ensemble = Ensemble([tiny_model(0), tiny_model(1)])
    assert pack(ensemble, CPU, "fp32") is ensemble
    assert [packed(m) for m in ensemble.models] == [25, 25]


@needs_onednn
def test_load_models_packs_for_fp32_on_the_cpu_and_translates_alike(trained_run: Path) -> None:
    config, tokenizer, fast, _ = load_models([trained_run], CPU, precision="fp32")
    _, _, plain, _ = load_trained(trained_run, CPU)
    self_attentions = len(plain.encoder) + len(plain.decoder)  # 3 layers fused into 1 each
    assert packed(fast) == 1 + linears(plain) - 2 * self_attentions and packed(plain) == 0
    lines = (TINY / "valid.de").read_text(encoding="utf-8").splitlines()[:40]
    mine = Translator(tokenizer, fast, config.decode, CPU, "fp32").translate(lines)
    theirs = Translator(tokenizer, plain, config.decode, CPU, "fp32").translate(lines)
    same = [a[0] for a, b in zip(mine, theirs, strict=True) if a[0].text == b[0].text]
    assert len(same) >= 36  # float rounding may flip a near tie, rarely
    for a, b in zip(mine, theirs, strict=True):
        if a[0].text == b[0].text:
            assert a[0].score == pytest.approx(b[0].score, abs=1e-4)


@needs_onednn
def test_time_packed_times_the_packed_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[tuple[tuple[int, ...], torch.dtype]] = []

    class Recording(PackedLinear):
        def __init__(self, weight: torch.Tensor, bias: None, dtype: torch.dtype) -> None:
            made.append((tuple(weight.shape), dtype))
            super().__init__(weight, bias, dtype)

    monkeypatch.setattr(packing, "PackedLinear", Recording)
    times = packing.time_packed("fp32", 16, (8, 24), budget=60.0)
    assert len(times) == 1 + device.TIMED_CALLS and all(t >= 0 for t in times)
    assert made == [((24, 8), torch.float32)]  # one layer, weight (out, in), made once
    assert packing.time_packed("fp32", 16, (8, 24), budget=0.0) == []
    monkeypatch.setattr(packing, "packs", lambda dev, precision: False)  # e.g. no bf16 in oneDNN
    assert len(packing.time_packed("bf16", 16, (8, 24), budget=60.0)) == 1 + device.TIMED_CALLS
    assert len(made) == 1  # timed through nn.Linear's product, as decoding would run it


def test_auto_precision_times_fp32_as_decoding_runs_it_packed_or_through_blas(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = device.TIMED_CALLS

    def timed(precision: str, rows: int, features: tuple, budget: float, layer=None) -> list:
        per_call = 0.3 if layer is not None else 0.2  # BLAS faster here, as calibrate would find
        return [1.0] + [per_call] * calls

    monkeypatch.setattr(packing, "time_linear", timed)
    monkeypatch.setattr(packing, "packs", lambda dev, precision: True)
    packed_seconds = 1.0 + 0.3 * calls
    # fp32: large batches go to BLAS where it is faster (calibrate), so its time counts.
    fp32 = packing.time_packed("fp32", 256, (8, 24), 60.0)
    assert fp32 == pytest.approx([1.0 + packed_seconds] + [0.2] * calls)
    assert packing.time_packed("bf16", 256, (8, 24), 60.0) == [1.0] + [0.3] * calls  # packed only
    # One cut short by the budget loses; both cut short: the first, every second counted.
    assert packing.faster([1.0, 0.1], [1.0] + [0.2] * calls) == pytest.approx([2.1] + [0.2] * calls)
    assert packing.faster([1.0, 0.1], [0.5]) == pytest.approx([1.5, 0.1])
    assert packing.faster([], []) == []


def test_auto_precision_for_decoding_times_the_packed_layers(
    trained_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[object] = []

    def measure(products: list, rows: int, time_calls: object) -> device.Measurement:
        seen.append(time_calls)
        return device.Measurement(rows, {"fp32": 100.0, "bf16": 10.0}, 0.1)

    monkeypatch.setattr(device, "measure_rates", measure)
    assert resolve_runtime("cpu", "auto", trained_run) == (CPU, "fp32")
    assert seen == [packing.time_packed]
