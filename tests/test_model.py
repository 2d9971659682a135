"""Tests for mt.model: overfitting, masking, incremental decoding, parameter counts, bf16."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import mt.model as model_module
from mt.config import ModelConfig
from mt.loss import label_smoothed_nll
from mt.model import (
    Dropout,
    Reorder,
    Transformer,
    count_parameters,
    product_attention,
    sinusoidal_positions,
)

PAD, BOS, EOS, VOCAB = 0, 1, 2, 50


def tiny(prenorm: bool = True, dropout: float = 0.0, **kw: object) -> Transformer:
    """A small deterministic model for fast CPU tests."""
    torch.manual_seed(0)
    args = dict(dim=32, enc_layers=2, dec_layers=2, heads=2, ffn_dim=64, dropout=dropout)
    args.update(kw)
    return Transformer(ModelConfig(prenorm=prenorm, **args), VOCAB, VOCAB)


def sentence(length: int, gen: torch.Generator) -> list[int]:
    """Random real tokens followed by eos."""
    return [*torch.randint(3, VOCAB, (length - 1,), generator=gen).tolist(), EOS]


def pad_batch(rows: list[list[int]]) -> torch.Tensor:
    """Right-pad token lists to a (B, L) long tensor."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + [PAD] * (width - len(r)) for r in rows])


def random_pairs(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n random pairs of lengths 3-8 as padded (src, tgt_in, tgt_out)."""
    gen = torch.Generator().manual_seed(seed)
    srcs, tgts = [], []
    for _ in range(n):
        srcs.append(sentence(int(torch.randint(3, 9, (1,), generator=gen)), gen))
        tgts.append(sentence(int(torch.randint(3, 9, (1,), generator=gen)), gen))
    tgt_in = pad_batch([[BOS, *t[:-1]] for t in tgts])
    return pad_batch(srcs), tgt_in, pad_batch(tgts)


def test_sinusoidal_positions() -> None:
    table = sinusoidal_positions(10, 8)
    assert table.shape == (10, 8)
    assert torch.allclose(table[0, 0::2], torch.zeros(4))
    assert torch.allclose(table[0, 1::2], torch.ones(4))
    assert torch.isclose(table[3, 2], torch.sin(torch.tensor(3 / 10000 ** (2 / 8))))


@pytest.mark.slow
def test_overfits_ten_pairs() -> None:
    model = tiny()
    src, tgt_in, tgt_out = random_pairs(10)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        loss, nll, n = label_smoothed_nll(model(src, tgt_in), tgt_out, 0.0, PAD)
        opt.zero_grad()
        (loss / n).backward()
        opt.step()
    assert (nll / n).item() < 0.05


@pytest.mark.parametrize("prenorm", [True, False])
@pytest.mark.parametrize("precision", [torch.float32, torch.bfloat16])
def test_padding_does_not_change_outputs(prenorm: bool, precision: torch.dtype) -> None:
    model = tiny(prenorm).eval()
    gen = torch.Generator().manual_seed(2)
    short_src, long_src = sentence(4, gen), sentence(7, gen)
    short_tgt, long_tgt = [BOS, *sentence(3, gen)], [BOS, *sentence(6, gen)]
    # bf16 keeps 8 bits: a sentence alone and in a batch rounds at different places.
    atol = 1e-5 if precision == torch.float32 else 5e-2
    with torch.no_grad(), torch.autocast("cpu", precision, enabled=precision != torch.float32):
        alone_mem = model.encode(torch.tensor([short_src]), padded=False)
        batch_mem = model.encode(pad_batch([short_src, long_src]))
        assert torch.allclose(alone_mem[0].float(), batch_mem[0, :4].float(), atol=atol)
        alone = model(torch.tensor([short_src]), torch.tensor([short_tgt]), padded=False)
        batch = model(pad_batch([short_src, long_src]), pad_batch([short_tgt, long_tgt]))
    assert torch.allclose(alone[0].float(), batch[0, :4].float(), atol=atol)
    same = alone[0].argmax(-1) == batch[0, :4].argmax(-1)  # (4,)
    if precision == torch.float32:
        assert bool(same.all())
    else:  # another CPU's bf16 kernels may round a near tie the other way: only those may differ
        top2 = alone[0].float().topk(2, dim=-1).values  # (4, 2)
        assert bool((same | (top2[:, 0] - top2[:, 1] < 2 * atol)).all())


def unpadded_pairs(n: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """n random (src, tgt_in) pairs whose sources all have 6 tokens: no source padding."""
    gen = torch.Generator().manual_seed(seed)
    srcs = [sentence(6, gen) for _ in range(n)]
    tgts = [[BOS, *sentence(int(torch.randint(2, 8, (1,), generator=gen)), gen)] for _ in srcs]
    return torch.tensor(srcs), pad_batch(tgts)


def sdpa_masks(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor | None]:
    """The attn_mask of every SDPA call from now on, in call order."""
    masks: list[torch.Tensor | None] = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args: object, attn_mask: torch.Tensor | None = None, **kwargs: object) -> object:
        masks.append(attn_mask)
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return masks


@pytest.mark.parametrize("precision", [torch.float32, torch.bfloat16])
def test_masks_are_what_sdpa_runs_fastest_with(
    monkeypatch: pytest.MonkeyPatch, precision: torch.dtype
) -> None:
    model = tiny().eval()
    src, tgt_in, _ = random_pairs(3)  # sources of different lengths: padded
    masks = sdpa_masks(monkeypatch)
    with torch.no_grad(), torch.autocast("cpu", precision, enabled=precision != torch.float32):
        model(src, tgt_in)
        # Encoder self-attention and cross-attention get an additive mask in the compute dtype,
        # rows 8 elements apart; causal self-attention none.
        assert [m is None for m in masks] == [False, False, True, False, True, False]
        S = src.size(1)
        for mask in [m for m in masks if m is not None]:
            assert mask.dtype == precision and mask.shape == (3, 1, 1, S)
            assert mask.stride(0) % 8 == 0 and mask.stride(-1) == 1
            assert torch.equal(mask[:, 0, 0] == -math.inf, src == PAD)
            assert torch.equal(mask[:, 0, 0] == 0, src != PAD)
        # Without padding, no mask at all: SDPA may then use its flash kernel.
        masks.clear()
        src, tgt_in = unpadded_pairs(3)
        masked, unmasked = model(src, tgt_in), model(src, tgt_in, padded=False)
        assert len(masks) == 12 and all(m is None for m in masks[6:])
    tolerance = 1e-5 if precision == torch.float32 else 2e-2  # bf16 kernels may differ
    assert torch.allclose(masked.float(), unmasked.float(), atol=tolerance)


def test_causal_mask() -> None:
    model = tiny().eval()
    src, tgt_in, _ = random_pairs(2)
    changed = tgt_in.clone()
    changed[:, 3:] = 7
    with torch.no_grad():
        a, b = model(src, tgt_in), model(src, changed)
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-6)
    assert not torch.allclose(a[:, 3:], b[:, 3:], atol=1e-3)


def decode_incrementally(
    model: Transformer, src: torch.Tensor, tgt_in: torch.Tensor
) -> torch.Tensor:
    """Logits (B, T, V) from feeding tgt_in one token at a time through a fresh state."""
    memory, state = model.encode(src), model.init_state()
    steps = [model.decode(tgt_in[:, t : t + 1], memory, src, state) for t in range(tgt_in.size(1))]
    assert state.step == tgt_in.size(1)
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("prenorm", [True, False])
def test_incremental_matches_full(prenorm: bool) -> None:
    model = tiny(prenorm).eval()
    src, tgt_in, _ = random_pairs(3)
    with torch.no_grad():
        full = model(src, tgt_in)
        step = decode_incrementally(model, src, tgt_in)
        # Several new tokens at once on top of a cache must also respect causality.
        memory, state = model.encode(src), model.init_state()
        first = model.decode(tgt_in[:, :2], memory, src, state)
        rest = model.decode(tgt_in[:, 2:], memory, src, state)
    assert torch.allclose(full, step, atol=1e-5)
    assert torch.allclose(full, torch.cat([first, rest], dim=1), atol=1e-5)


def test_incremental_matches_full_without_padding() -> None:
    model = tiny().eval()
    src, tgt_in = unpadded_pairs(3)
    with torch.no_grad():
        full = model(src, tgt_in, padded=False)
        memory, state = model.encode(src, padded=False), model.init_state()
        steps = [
            model.decode(tgt_in[:, t : t + 1], memory, src, state, padded=False)
            for t in range(tgt_in.size(1))
        ]
    assert torch.allclose(full, torch.cat(steps, dim=1), atol=1e-5)
    assert torch.allclose(full, model(src, tgt_in), atol=1e-5)  # the masked pass agrees


def test_product_attention_computes_what_sdpa_does() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 8), torch.randn(3, 2, 6, 8), torch.randn(3, 2, 6, 8)
    allowed = torch.ones(4, 6, dtype=torch.bool).tril(diagonal=2)  # (L, L') True: may attend
    additive = torch.zeros(3, 1, 1, 6).masked_fill_(torch.arange(6) >= 4, -math.inf)
    for mask in (None, allowed, additive):
        got = product_attention(q, k, v, mask)
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert got.shape == want.shape == (3, 2, 4, 8)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # A key at -inf gets weight 0: the output is the same without it.
    torch.testing.assert_close(
        product_attention(q, k, v, additive), product_attention(q, k[:, :, :4], v[:, :, :4], None)
    )


def test_decoding_steps_on_a_cpu_attend_by_matrix_products(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny().eval()
    src, tgt_in, _ = random_pairs(3)
    with torch.no_grad():
        memory, state = model.encode(src), model.init_state()
        masks = sdpa_masks(monkeypatch)  # counts SDPA calls from here on
        model.decode(tgt_in[:, :1], memory, src, state)
        model.decode(tgt_in[:, 1:3], memory, src, state)  # two at once: a causal mask
        assert masks == []  # neither self- nor cross-attention over a cache went to SDPA
        model(src, tgt_in)  # teacher-forced: SDPA, as in training
    assert len(masks) == 6


def test_bf16_decoding_on_cpu_attends_over_a_float32_cache() -> None:
    model = tiny().eval()
    src, tgt_in, _ = random_pairs(3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(src, tgt_in)
        memory, state = model.encode(src), model.init_state()
        step = model.decode(tgt_in[:, :1], memory, src, state)
        k, v = model.decoder[0].self_attn.project_kv(memory[:, :1])  # bf16 under autocast
    cache = state.layers[0]
    assert (k.dtype, v.dtype) == (torch.bfloat16, torch.bfloat16)
    assert {cache.self_k.dtype, cache.self_v.dtype, cache.cross_k.dtype} == {torch.float32}
    assert step.dtype == full.dtype == torch.bfloat16  # the layers after attention keep autocast's
    assert (step[:, 0].float() - full[:, 0].float()).abs().max() < 0.1  # bf16 rounding apart


def test_cache_grows_past_its_capacity_and_keeps_its_contents() -> None:
    model = tiny(True).eval()
    src, tgt_in, _ = random_pairs(3)
    index = torch.tensor([2, 1, 0, 0])
    with torch.no_grad():
        memory, state = model.encode(src), model.init_state(max_len=2)
        steps = [model.decode(tgt_in[:, t : t + 1], memory, src, state) for t in range(3)]
        assert state.layers[0].self_k.size(0) == 4  # 2, doubled once at the third position
        state.reorder(index, index)  # a reorder keeps the capacity
        assert state.layers[0].self_k.shape[:2] == (4, 4)
        src2, memory2, tgt2 = src[index], memory[index], tgt_in[index]
        later = [model.decode(tgt2[:, t : t + 1], memory2, src2, state) for t in range(3, 6)]
        assert state.layers[0].self_k.size(0) == 8 and state.layers[0].length == 6
        full = model(src2, tgt2[:, :6])
    assert torch.allclose(full[:, :3], torch.cat(steps, dim=1)[index], atol=1e-5)
    assert torch.allclose(full[:, 3:6], torch.cat(later, dim=1), atol=1e-5)


@pytest.mark.parametrize("prenorm", [True, False])
def test_reorder_matches_reordered_full(prenorm: bool) -> None:
    model = tiny(prenorm).eval()
    src, tgt_in, _ = random_pairs(3)
    index = torch.tensor([2, 1, 0, 0])  # reverse and duplicate a row, as beam search does
    with torch.no_grad():
        memory, state = model.encode(src), model.init_state()
        for t in range(3):
            model.decode(tgt_in[:, t : t + 1], memory, src, state)
        state.reorder(index, index)
        src2, memory2, tgt2 = src[index], memory[index], tgt_in[index]
        steps = [model.decode(tgt2[:, t : t + 1], memory2, src2, state) for t in range(3, 6)]
        full = model(src2, tgt2[:, :6])
    assert torch.allclose(full[:, 3:6], torch.cat(steps, dim=1), atol=1e-5)


@pytest.mark.parametrize("prenorm", [True, False])
@pytest.mark.parametrize("in_place", [True, False])
def test_grouped_rows_share_their_source(
    prenorm: bool, in_place: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Beam search: G target rows per source, shuffled among themselves and sources dropped,
    # while the cross-attention caches keep one row per source.
    monkeypatch.setattr(model_module, "reorders_in_place", lambda index: in_place)
    model = tiny(prenorm).eval()
    src, tgt_in, _ = random_pairs(3)
    G = 2
    rows = tgt_in.repeat_interleave(G, dim=0)  # (6, T): rows 2g, 2g+1 belong to source g
    rows[1::2, 2:] = tgt_in.flip(0)[:, 2:]  # the second copy continues differently
    with torch.no_grad():
        memory, state = model.encode(src), model.init_state()
        for t in range(3):
            model.decode(rows[:, t : t + 1], memory, src, state)
        assert state.layers[0].cross_k.size(0) == 3  # one row per source, not per beam
        index = torch.tensor([1, 0, 5, 5])  # swap source 0's rows; drop source 1
        keep = torch.tensor([0, 2])
        state.reorder(index, keep)
        # In place, the buffers keep their rows, the first ones live; else they are copied.
        assert state.layers[0].self_k.size(1) == (6 if in_place else 4)
        assert state.layers[0].cross_k.size(0) == 2
        rows2, src2, memory2 = rows[index], src[keep], memory[keep]
        steps = [model.decode(rows2[:, t : t + 1], memory2, src2, state) for t in range(3, 6)]
        full = model(src2.repeat_interleave(G, dim=0), rows2[:, :6])
    assert torch.allclose(full[:, 3:6], torch.cat(steps, dim=1), atol=1e-5)


def expected_count(vocab: int, dim: int, ffn: int, layers: int, prenorm: bool) -> int:
    """Closed-form parameter count of a three-way tied model with `layers` per stack."""
    attention = 4 * dim * dim + 3 * dim  # q, k, v, out projections; k has no bias
    encoder_layer = attention + 2 * dim * ffn + ffn + dim + 2 * 2 * dim
    decoder_layer = encoder_layer + attention + 2 * dim
    final_norms = 2 * 2 * dim if prenorm else 0
    return vocab * dim + layers * (encoder_layer + decoder_layer) + final_norms


@pytest.mark.parametrize("prenorm", [True, False])
def test_parameter_counts(prenorm: bool) -> None:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        base = Transformer(ModelConfig(prenorm=prenorm), 37000, 37000)
        big_shape = ModelConfig(dim=1024, heads=16, ffn_dim=4096, prenorm=prenorm)
        big = Transformer(big_shape, 37000, 37000)
    assert count_parameters(base) == expected_count(37000, 512, 2048, 6, prenorm)
    assert count_parameters(big) == expected_count(37000, 1024, 4096, 6, prenorm)
    assert count_parameters(base) == (63_075_328 if prenorm else 63_073_280)
    assert count_parameters(big) == (214_231_040 if prenorm else 214_226_944)
    assert 60_000_000 < count_parameters(base) < 66_000_000


def test_two_way_tie_counts_both_embeddings() -> None:
    shared = tiny()
    shape = ModelConfig(dim=32, enc_layers=2, dec_layers=2, heads=2, ffn_dim=64)
    separate = Transformer(dataclasses.replace(shape, share_embeddings=False), 60, VOCAB)
    assert separate.src_embed is not separate.tgt_embed
    assert count_parameters(separate) == count_parameters(shared) + 60 * 32


def test_share_embeddings_needs_joint_vocab() -> None:
    with pytest.raises(ValueError, match="share_embeddings"):
        Transformer(ModelConfig(dim=32, enc_layers=1, dec_layers=1, heads=2, ffn_dim=64), 60, 50)


def test_bf16_autocast_close_to_fp32() -> None:
    model = tiny()
    src, tgt_in, tgt_out = random_pairs(4)
    loss32, _, n = label_smoothed_nll(model(src, tgt_in), tgt_out, 0.1, PAD)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(src, tgt_in)
        loss16, _, _ = label_smoothed_nll(logits, tgt_out, 0.1, PAD)
    assert logits.dtype == torch.bfloat16 and loss16.dtype == torch.float32
    (loss16 / n).backward()
    assert torch.isfinite(loss16)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert torch.isclose(loss16, loss32, rtol=0.03)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_dropout_rate_scale_and_gradient(p: float) -> None:
    torch.manual_seed(0)
    drop = Dropout(p)
    x = torch.ones(1000, 1000, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - p) < 0.002  # 1e6 draws: sd of the rate ~5e-4
    # Each of the four 16-bit quarters of a 64-bit word drops at rate p (2.5e5 draws each).
    lane_rates = 1 - kept.flatten().view(-1, 4).float().mean(dim=0)
    assert (lane_rates - p).abs().max().item() < 0.005
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(sum)/dx is the scaled mask itself


def test_bf16_dropout_keeps_the_expected_value() -> None:
    # Kept activations are x / (1 - p) rounded one by one, not x times a rounded factor:
    # bf16 holds 1 / 0.75 as 1.3359, which biased every activation by +0.2%.
    torch.manual_seed(0)
    x = torch.randn(1000, 1000).to(torch.bfloat16)
    y = Dropout(0.25)(x)
    kept = y != 0
    ratio = y[kept].double() / (x[kept].double() / 0.75)
    assert abs(ratio.mean().item() - 1) < 2e-4  # unbiased; each within bf16's rounding
    assert (ratio - 1).abs().max().item() <= 2**-8


def test_dropout_is_seeded_odd_sized_and_off_in_eval() -> None:
    drop = Dropout(0.3)
    x = torch.randn(7, 5, 3)  # 105 elements: the last 64-bit word is a quarter used
    torch.manual_seed(5)
    a = drop(x)
    torch.manual_seed(5)
    assert torch.equal(a, drop(x))
    assert not torch.equal(a, drop(x))
    assert a.shape == x.shape
    assert drop.eval()(x) is x
    assert Dropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
        Dropout(1.0)


def test_a_reorder_in_place_is_a_selection() -> None:
    gen = torch.Generator().manual_seed(5)
    for rows in (1, 4, 9):
        for _ in range(20):
            x = torch.randn(7, rows, 3, generator=gen)  # (P, R, C)
            index = torch.randint(0, rows, (int(torch.randint(1, rows + 1, (1,))),))  # (N',)
            want = x.clone()
            want[:5, : index.size(0)] = x[:5].index_select(1, index)  # the first 5 blocks
            Reorder(index).move(x, 5)
            assert torch.equal(x, want)
            y = torch.randn(rows, 2, 3, generator=gen)  # taken along dim 0, as cross caches
            assert torch.equal(Reorder(index).take(y.clone()), y.index_select(0, index))
