"""Tests for mt.search: greedy, beam search against a slow reference, n-best, sampling, waits."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.shared import built_once
from torch.utils._python_dispatch import TorchDispatchMode

import mt.model as model_module
import mt.search as search_module
from mt.config import DecodeConfig, ModelConfig
from mt.model import Transformer
from mt.search import (
    Constraints,
    Ensemble,
    Hypothesis,
    Progress,
    beam_search,
    block_topk,
    block_width,
    contains,
    decode,
    essential,
    greedy_search,
    length_penalty,
    max_lengths,
    output_limits,
    prefixes,
    ranked,
    row_candidates,
    sample,
    step_logprobs,
)
from mt.vocab import BOS_ID, EOS_ID, PAD_ID

VOCAB = 30
FIRST_REAL = 4  # ids 0-3 are PAD, UNK, BOS, EOS


def tiny(seed: int, eos_boost: float = 1.0, **kw: object) -> Transformer:
    """A small random model in eval mode; eos_boost > 1 makes EOS likelier, so lengths vary."""
    torch.manual_seed(seed)
    args: dict = dict(dim=32, enc_layers=2, dec_layers=2, heads=2, ffn_dim=64, dropout=0.0)
    args.update(kw)
    model = Transformer(ModelConfig(**args), VOCAB, VOCAB).eval()
    with torch.no_grad():
        model.tgt_embed.weight[EOS_ID] *= eos_boost
    return model


def pad_batch(rows: list[list[int]]) -> torch.Tensor:
    """Right-pad token lists to a (B, L) long tensor."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + [PAD_ID] * (width - len(r)) for r in rows])


def greedy_ids(
    model: Transformer, src: torch.Tensor, a: float = 1.2, b: int = 10
) -> list[list[int]]:
    """The outputs of greedy search with limits a * source length + b, as ids."""
    return [h[0].tokens for h in greedy_search(model, src, DecodeConfig(max_len_a=a, max_len_b=b))]


def random_sources(n: int, seed: int, low: int = 1, high: int = 9) -> list[list[int]]:
    """n random sources of low..high-1 real tokens followed by EOS."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (n,), generator=gen).tolist()
    return [
        [*torch.randint(FIRST_REAL, VOCAB, (k,), generator=gen).tolist(), EOS_ID] for k in lengths
    ]


@pytest.fixture(scope="module")
def reverser(tmp_path_factory: pytest.TempPathFactory) -> Transformer:
    """A model briefly trained to reverse its source: confident, outputs of varied lengths.

    Trained once per session (helpers.shared.built_once), whichever test worker asks first.
    """
    built = built_once(tmp_path_factory, "reverser", lambda d: torch.save(
        train_reverser().state_dict(), d / "model.pt"
    ))  # fmt: skip
    model = tiny(0)
    model.load_state_dict(torch.load(built / "model.pt", weights_only=True))
    return model.eval()


def train_reverser() -> Transformer:
    """tiny(0) trained for 400 steps to reverse random sources."""
    model = tiny(0)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(400):
        srcs = random_sources(32, seed=1000 + step)
        tgts = [[*s[-2::-1], EOS_ID] for s in srcs]
        tgt_in = pad_batch([[BOS_ID, *t[:-1]] for t in tgts])
        logits = model(pad_batch(srcs), tgt_in)
        loss = F.cross_entropy(logits.transpose(1, 2), pad_batch(tgts), ignore_index=PAD_ID)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def models(reverser: Transformer) -> list[Transformer]:
    """The trained model and a few random ones, one of them post-norm."""
    return [reverser, tiny(1, eos_boost=3.0), tiny(2, eos_boost=3.0, prenorm=False), tiny(3)]


def teacher_forced_logprob(model: Transformer, src: list[int], tokens: list[int]) -> float:
    """Sum of log-probabilities of tokens + EOS from one full forward pass."""
    tgt_in = torch.tensor([[BOS_ID, *tokens]])
    with torch.no_grad():
        lprobs = F.log_softmax(model(torch.tensor([src]), tgt_in).float(), dim=-1)[0]  # (T, V)
    return float(lprobs.gather(1, torch.tensor([[*tokens, EOS_ID]]).T).sum())


def reference_beam(
    model: Transformer, src: list[int], beam: int, alpha: float, kind: str, limit: int, min_len: int
) -> list[Hypothesis]:
    """Slow fairseq-style beam search: no cache, a full forward pass per beam, plain Python."""
    live: list[tuple[list[int], float]] = [([], 0.0)]
    finished: list[Hypothesis] = []
    for step in range(limit):
        candidates = []
        for tokens, score in live:
            tgt_in = torch.tensor([[BOS_ID, *tokens]])
            with torch.no_grad():
                logits = model(torch.tensor([src]), tgt_in)[0, -1].float()
            at_limit = step + 1 >= limit
            for token, lp in enumerate(F.log_softmax(logits, dim=-1).tolist()):
                if token in (PAD_ID, BOS_ID) or (at_limit and token != EOS_ID):
                    continue
                if token == EOS_ID and step < min_len and not at_limit:
                    continue
                candidates.append((score + lp, tokens, token))
        candidates = sorted(candidates, key=lambda c: -c[0])[: 2 * beam]
        for score, tokens, token in candidates[:beam]:
            if token == EOS_ID and len(finished) < beam:
                penalty = length_penalty(len(tokens) + 1, alpha, kind)
                finished.append(Hypothesis(tokens, score / penalty, score))
        if len(finished) >= beam or step + 1 >= limit:
            break
        live = [([*tokens, t], s) for s, tokens, t in candidates if t != EOS_ID][:beam]
    return sorted(finished, key=lambda h: -h.score)


def assert_same_hypotheses(got: list[Hypothesis], want: list[Hypothesis]) -> None:
    """Same tokens in the same order, scores and logprobs equal up to float32 rounding."""
    assert [h.tokens for h in got] == [h.tokens for h in want]
    for g, w in zip(got, want, strict=True):
        assert g.score == pytest.approx(w.score, abs=1e-4)
        assert g.logprob == pytest.approx(w.logprob, abs=1e-4)


def test_length_penalty() -> None:
    assert length_penalty(1, 0.6, "gnmt") == pytest.approx(1.0)
    assert length_penalty(7, 1.0, "gnmt") == pytest.approx(2.0)
    assert length_penalty(7, 0.0, "gnmt") == pytest.approx(1.0)
    assert length_penalty(7, 0.6, "average") == 7.0
    assert length_penalty(7, 0.6, "none") == 1.0
    lengths = torch.tensor([1, 7])
    assert torch.allclose(length_penalty(lengths, 1.0, "gnmt"), torch.tensor([1.0, 2.0]))
    assert torch.equal(length_penalty(lengths, 0.6, "average"), torch.tensor([1.0, 7.0]))
    assert torch.equal(length_penalty(lengths, 0.6, "none"), torch.ones(2))
    with pytest.raises(ValueError, match="length penalty"):
        length_penalty(3, 0.6, "wu")


def test_trained_model_outputs_vary(reverser: Transformer) -> None:
    srcs = random_sources(8, seed=5)
    out = greedy_ids(reverser, pad_batch(srcs))
    assert len({len(o) for o in out}) >= 3
    assert sum(o == s[-2::-1] for o, s in zip(out, srcs, strict=True)) >= 4


@pytest.mark.parametrize("kind", ["gnmt", "average", "none"])
@pytest.mark.slow
def test_beam_one_is_greedy(reverser: Transformer, kind: str) -> None:
    src = pad_batch(random_sources(10, seed=7))
    for model in models(reverser):
        for a, b in [(1.2, 10), (0.0, 3), (1.0, 1)]:
            greedy = greedy_ids(model, src, a, b)
            one = DecodeConfig(beam=1, length_penalty=kind, max_len_a=a, max_len_b=b)
            beams = beam_search(model, src, one)
            assert [h[0].tokens for h in beams] == greedy


def test_batch_invariance(reverser: Transformer) -> None:
    srcs = random_sources(6, seed=11)
    for model in models(reverser)[:3]:
        batch = beam_search(model, pad_batch(srcs), DecodeConfig(beam=4, nbest=4))
        reverse = beam_search(model, pad_batch(srcs[::-1]), DecodeConfig(beam=4, nbest=4))[::-1]
        for i, src in enumerate(srcs):
            alone = beam_search(model, pad_batch([src]), DecodeConfig(beam=4, nbest=4))[0]
            assert_same_hypotheses(batch[i], alone)
            assert_same_hypotheses(reverse[i], alone)


def test_finished_sentences_leave_the_batch(reverser: Transformer) -> None:
    srcs = [[5, EOS_ID], [*range(FIRST_REAL, 24), EOS_ID], [7, 8, EOS_ID]]
    rows: list[int] = []
    decode = reverser.decode

    def spy(tgt_in: torch.Tensor, *args: object) -> torch.Tensor:
        rows.append(tgt_in.size(0))
        return decode(tgt_in, *args)

    reverser.decode = spy  # type: ignore[method-assign]
    try:
        batch = beam_search(reverser, pad_batch(srcs), DecodeConfig(beam=3, nbest=3))
    finally:
        del reverser.decode
    # One row per sentence at the first step (all beams would hold BOS), then K rows per
    # sentence still searching, fewer and fewer.
    assert rows[:2] == [3, 9] and rows[-1] == 3 and rows[1:] == sorted(rows[1:], reverse=True)
    for src, hyps in zip(srcs, batch, strict=True):
        assert_same_hypotheses(
            hyps, beam_search(reverser, pad_batch([src]), DecodeConfig(beam=3, nbest=3))[0]
        )


@pytest.mark.slow
def test_nbest_sorted_and_consistent_with_the_model(reverser: Transformer) -> None:
    srcs = random_sources(5, seed=13)
    for model in models(reverser):
        nbest = beam_search(model, pad_batch(srcs), DecodeConfig(beam=5, nbest=5))
        onebest = beam_search(model, pad_batch(srcs), DecodeConfig(beam=5, nbest=1))
        for src, hyps, best in zip(srcs, nbest, onebest, strict=True):
            assert len(hyps) == 5 and len(best) == 1
            assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
            assert len({tuple(h.tokens) for h in hyps}) == 5
            assert hyps[0] == best[0]
            for h in hyps:
                assert h.logprob == pytest.approx(
                    teacher_forced_logprob(model, src, h.tokens), abs=1e-4
                )
                assert h.score == pytest.approx(
                    h.logprob / length_penalty(len(h.tokens) + 1, 0.6, "gnmt")
                )


@pytest.mark.parametrize(
    ("beam", "alpha", "kind", "min_len"),
    [(3, 0.6, "gnmt", 0), (4, 1.0, "gnmt", 2), (2, 0.0, "average", 0), (3, 0.6, "none", 1)],
)
def test_matches_slow_reference(beam: int, alpha: float, kind: str, min_len: int) -> None:
    srcs = random_sources(5, seed=20, high=6)
    src = pad_batch(srcs)
    early = 0  # hypotheses that ended before their limit: the test must exercise early EOS
    for seed in (2, 3):  # one pre-norm, one post-norm model
        model = tiny(seed, eos_boost=8.0, prenorm=seed % 2 == 0)
        limits = max_lengths(src, 1.0, 3, model.max_positions - 1).tolist()
        config = DecodeConfig(
            beam=beam,
            alpha=alpha,
            length_penalty=kind,
            min_len=min_len,
            nbest=beam,
            max_len_a=1.0,
            max_len_b=3,
        )
        got = beam_search(model, src, config)
        for s, hyps, limit in zip(srcs, got, limits, strict=True):
            assert_same_hypotheses(
                hyps, reference_beam(model, s, beam, alpha, kind, limit, min_len)
            )
            early += sum(len(h.tokens) < limit - 1 for h in hyps)
    assert early >= 3


def test_beam_beats_greedy_without_length_penalty(reverser: Transformer) -> None:
    # Not a theorem (early stopping can prune the greedy path) but it holds for these seeds.
    srcs = random_sources(8, seed=19)
    for model in models(reverser):
        greedy = greedy_ids(model, pad_batch(srcs))
        for kind, alpha in [("none", 0.6), ("gnmt", 0.0)]:
            beams = beam_search(
                model, pad_batch(srcs), DecodeConfig(beam=4, alpha=alpha, length_penalty=kind)
            )
            for src, g, hyps in zip(srcs, greedy, beams, strict=True):
                assert hyps[0].logprob >= teacher_forced_logprob(model, src, g) - 1e-5


def test_min_and_max_length(reverser: Transformer) -> None:
    src = pad_batch(random_sources(6, seed=23))
    for model in models(reverser)[:2]:
        for hyps in beam_search(model, src, DecodeConfig(beam=3, min_len=6, nbest=3)):
            assert all(len(h.tokens) >= 6 for h in hyps)
        limits = max_lengths(src, 0.5, 2, model.max_positions - 1).tolist()
        for hyps, limit in zip(
            beam_search(model, src, DecodeConfig(beam=3, max_len_a=0.5, max_len_b=2, nbest=3)),
            limits,
            strict=True,
        ):
            assert all(len(h.tokens) <= limit - 1 for h in hyps)
        # When min_len cannot be reached the limit wins; with limit 1 the output is empty.
        short = DecodeConfig(beam=2, max_len_a=0.0, max_len_b=3, min_len=9)
        assert all(len(h[0].tokens) == 2 for h in beam_search(model, src, short))
        empty = DecodeConfig(beam=2, max_len_a=0.0, max_len_b=1)
        assert all(h[0].tokens == [] for h in beam_search(model, src, empty))


def test_max_positions_caps_the_length() -> None:
    model = tiny(4, max_positions=8)
    src = pad_batch(random_sources(3, seed=29))
    long = DecodeConfig(beam=3, length_penalty="none", max_len_a=5.0, max_len_b=50, min_len=50)
    for hyps in beam_search(model, src, long):
        assert len(hyps[0].tokens) == model.max_positions - 2
    for hyps in sample(model, src, dataclasses.replace(long, beam=2)):
        assert all(len(h.tokens) == model.max_positions - 2 for h in hyps)


def test_sampling_limits_to_greedy(reverser: Transformer) -> None:
    src = pad_batch(random_sources(8, seed=31))
    for model in models(reverser)[:3]:
        greedy = greedy_ids(model, src)
        gen = torch.Generator().manual_seed(0)
        for kwargs in [dict(top_k=1), dict(top_p=1e-6), dict(temperature=1e-4)]:
            out = sample(model, src, DecodeConfig(beam=2, **kwargs), generator=gen)
            assert all(h.tokens == g for hyps, g in zip(out, greedy, strict=True) for h in hyps)


def test_sampling_is_deterministic_and_consistent() -> None:
    model = tiny(5, eos_boost=3.0)
    srcs = random_sources(4, seed=37)
    src = pad_batch(srcs)

    def draw(seed: int) -> list[list[Hypothesis]]:
        config = DecodeConfig(beam=6, top_k=10, top_p=0.9)
        return sample(model, src, config, generator=torch.Generator().manual_seed(seed))

    first = draw(1)
    assert first == draw(1) and first != draw(2)
    limits = max_lengths(src, 1.2, 10, model.max_positions - 1).tolist()
    for s, hyps, limit in zip(srcs, first, limits, strict=True):
        assert len(hyps) == 6
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        for h in hyps:
            assert len(h.tokens) <= limit - 1 and not {PAD_ID, BOS_ID, EOS_ID} & set(h.tokens)
            assert h.logprob == pytest.approx(teacher_forced_logprob(model, s, h.tokens), abs=1e-4)
    assert len({tuple(h.tokens) for hyps in first for h in hyps}) > 12
    three = DecodeConfig(beam=3, min_len=4)
    for hyps in sample(model, src, three, generator=torch.Generator().manual_seed(3)):
        assert all(len(h.tokens) >= 4 for h in hyps)


def test_runs_under_autocast(reverser: Transformer) -> None:
    src = pad_batch(random_sources(3, seed=41))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hyps = beam_search(reverser, src, DecodeConfig(beam=3, nbest=2))
    assert all(len(h) == 2 and all(math.isfinite(x.score) for x in h) for h in hyps)


def test_empty_batch(reverser: Transformer) -> None:
    empty = torch.zeros(0, 4, dtype=torch.long)
    for sampling in (False, True):
        assert decode(reverser, empty, DecodeConfig(beam=3, sampling=sampling)) == []
    assert greedy_search(reverser, empty, DecodeConfig()) == []


def test_decode_runs_the_search_the_config_asks_for(
    reverser: Transformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mt.search

    src = pad_batch(random_sources(4, seed=43))
    called = []
    for name in ("greedy_search", "beam_search", "sample"):
        real = getattr(mt.search, name)

        def spy(*args: object, real: Callable = real, name: str = name, **kw: object) -> object:
            called.append(name)
            return real(*args, **kw)

        monkeypatch.setattr(mt.search, name, spy)
    cases = [
        (DecodeConfig(beam=1), False, "greedy_search", 1),
        (DecodeConfig(beam=1), True, "beam_search", 1),  # n-best output: beam search's scores
        (DecodeConfig(beam=1, min_len=2), False, "beam_search", 1),
        (DecodeConfig(beam=3, nbest=2), False, "beam_search", 2),
        (DecodeConfig(beam=2, nbest=3, sampling=True), False, "sample", 3),  # max(beam, nbest)
    ]
    for config, scores, search, per_sentence in cases:
        out = decode(reverser, src, config, scores)
        assert called == [search] and [len(hyps) for hyps in out] == [per_sentence] * 4
        called.clear()


def test_block_width() -> None:
    assert block_width(8000, 10) == 64
    assert block_width(37000, 10) == 74  # the divisor of 37,000 nearest to 64
    assert block_width(384, 6) == 16  # wider blocks would leave too few of them
    assert block_width(7919, 10) == 0  # a prime: no width divides it
    assert block_width(30, 6) == 0  # small vocabularies use plain topk


@pytest.mark.parametrize(("vocab", "k", "width"), [(8000, 10, 64), (384, 6, 16), (600, 10, 20)])
def test_block_topk_equals_topk(vocab: int, k: int, width: int) -> None:
    gen = torch.Generator().manual_seed(vocab)
    x = torch.randn(40, vocab, generator=gen)
    x[:20] = x[:20].mul(4).round()  # many ties among the best
    x[:, :3] = -math.inf  # banned ids
    x[5, : vocab - k] = -math.inf  # a row whose only finite entries are its last k
    values, ids = block_topk(x, k, width)
    want = x.topk(k, dim=1).values
    assert torch.equal(values, want)  # the same values, best first
    assert torch.equal(x.gather(1, ids), values)  # ids point at them
    assert all(len(set(row)) == k for row in ids.tolist())  # k distinct tokens per row
    assert sorted(ids[5].tolist()) == list(range(vocab - k, vocab))


@pytest.mark.parametrize(("step", "min_len"), [(0, 0), (3, 5), (7, 0)])
def test_row_candidates_equal_topk_of_step_logprobs(step: int, min_len: int) -> None:
    gen = torch.Generator().manual_seed(step)
    logits = torch.randn(30, 8000, generator=gen) * 3  # wide enough for block_topk
    logits[:, EOS_ID] += 6  # EOS among the best, so banning and forcing it matter
    limit = torch.randint(step, step + 3, (30,), generator=gen)  # rows at, past and below it
    want = step_logprobs(logits.clone(), step, limit, min_len).topk(10, dim=1)
    top, tokens = row_candidates(logits.clone(), step, limit, min_len, 10)
    live = top.isfinite()
    assert torch.equal(live, want.values.isfinite())
    assert torch.equal(top[live], want.values[live])
    assert torch.equal(tokens[live], want.indices[live])
    assert (tokens[step + 1 >= limit, 0] == EOS_ID).all()


aten = torch.ops.aten
# Operations that make the host wait for a GPU: reading a value back (item, bool, int) or
# producing a shape that depends on values (the host must learn it before going on).
READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
         aten.repeat_interleave.Tensor}  # fmt: skip
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}


class HostWaits(TorchDispatchMode):
    """Counts the operations that would make the host wait for a GPU, run on any device.

    On a CPU nothing waits, so the operations are counted instead: those in READS, indexing by a
    boolean mask, and Tensor.tolist (which reads a CPU tensor without any operation).
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__()
        self.count = 0
        tolist = torch.Tensor.tolist

        def counted_tolist(tensor: torch.Tensor) -> object:
            self.count += 1
            return tolist(tensor)

        monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)

    def __torch_dispatch__(
        self,
        func: torch._ops.OpOverload,
        types: object,
        args: tuple = (),
        kwargs: dict | None = None,
    ) -> object:
        if func in READS or (
            func in INDEXING and any(i is not None and i.dtype == torch.bool for i in args[1])
        ):
            self.count += 1
        return func(*args, **(kwargs or {}))


def on_a_gpu(index: torch.Tensor) -> bool:
    """mt.model.reorders_in_place as on a GPU: a reorder copies every row, without reading."""
    return False


def test_host_waits_counts_what_waits_for_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.arange(6)
    with HostWaits(monkeypatch) as waits:
        y = (x + 1).view(2, 3).sum(0).index_select(0, x[:2])  # all on the device
        y[x[:2] > 0] = 0
        assert waits.count == 1  # the boolean index
        assert x.tolist() == list(range(6)) and bool(x.any()) and int(x.max()) == 5
        x[x > 2].nonzero()
        x.repeat_interleave(x)
    assert waits.count == 7


def decode_calls(model: Transformer | Ensemble, search: Callable[[], object]) -> tuple[object, int]:
    """search()'s result and the number of model.decode calls it made."""
    calls = 0
    decode = model.decode

    def spy(*args: object) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return decode(*args)

    model.decode = spy  # type: ignore[method-assign]
    try:
        return search(), calls
    finally:
        del model.decode


def test_searches_wait_for_the_device_once_per_step(
    reverser: Transformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_module, "reorders_in_place", on_a_gpu)
    src = pad_batch(random_sources(12, seed=47))
    two = DecodeConfig(beam=2)
    searches = [
        (
            lambda: beam_search(reverser, src, DecodeConfig(beam=4, nbest=2)),
            4,
        ),  # + the limit, 3 reads at the end
        (lambda: greedy_search(reverser, src, DecodeConfig()), 3),  # + limit, outputs, scores
        (lambda: sample(reverser, src, two, generator=torch.Generator().manual_seed(0)), 3),
    ]
    for search, outside_the_steps in searches:
        want, steps = decode_calls(reverser, search)
        with HostWaits(monkeypatch) as waits:
            assert search() == want
        assert steps >= 8 and waits.count <= steps + outside_the_steps


@pytest.mark.parametrize("scale", [math.inf, math.nan, 1e38])
def test_non_finite_scores_still_give_every_sentence_a_hypothesis(scale: float) -> None:
    model = tiny(1)
    with torch.no_grad():  # the output layer's input: logits inf, nan or beyond float32
        model.dec_norm.weight.mul_(scale)
    srcs = random_sources(5, seed=53)
    src = pad_batch(srcs)
    limits = max_lengths(src, 1.2, 10, model.max_positions - 1).tolist()
    for beam in (1, 3):
        out = beam_search(model, src, DecodeConfig(beam=beam, nbest=beam))
        assert len(out) == len(srcs) and all(1 <= len(hyps) <= beam for hyps in out)
        for hyps, limit in zip(out, limits, strict=True):
            for h in hyps:  # the live beams at the limit, with their scores
                assert not math.isfinite(h.score) and not math.isfinite(h.logprob)
                assert len(h.tokens) == limit - 1 and not {PAD_ID, BOS_ID, EOS_ID} & set(h.tokens)
    out = sample(model, src, DecodeConfig(beam=2), generator=torch.Generator().manual_seed(0))
    assert [len(hyps) for hyps in out] == [2] * len(srcs)
    assert all(not math.isfinite(h.score) for hyps in out for h in hyps)


# --- outputs without prefixes or constraints, recorded from the search before they existed ------

RECORDED = Path(__file__).parent / "data" / "search_outputs.json"
RECORDED_CONFIGS = {
    "greedy": (DecodeConfig(beam=1), False),
    "greedy_scored": (DecodeConfig(beam=1), True),
    "beam": (DecodeConfig(beam=4, nbest=3, min_len=2), False),
    "beam_average": (DecodeConfig(beam=3, nbest=3, length_penalty="average"), False),
    "sampling": (DecodeConfig(beam=3, sampling=True, top_k=8, top_p=0.9), False),
}


def search_outputs() -> dict[str, list[list[list]]]:
    """[tokens, score.hex(), logprob.hex()] of every hypothesis, per model and search."""
    src = pad_batch(random_sources(6, seed=59))
    outputs = {}
    for seed in (1, 2):
        model = tiny(seed, eos_boost=3.0, prenorm=seed == 1)
        for name, (config, scores) in RECORDED_CONFIGS.items():
            torch.manual_seed(seed)  # sampling draws from the global generator
            hyps = decode(model, src, config, scores)
            outputs[f"{seed}/{name}"] = [
                [[h.tokens, h.score.hex(), h.logprob.hex()] for h in sentence] for sentence in hyps
            ]
    return outputs


def test_outputs_without_the_new_inputs_are_unchanged() -> None:
    recorded = json.loads(RECORDED.read_text(encoding="utf-8"))
    now = search_outputs()
    assert now.keys() == recorded.keys()
    for key, sentences in recorded.items():
        assert [[h[0] for h in s] for s in now[key]] == [[h[0] for h in s] for s in sentences]
        # Recorded and checked bit for bit on one CPU; another CPU's float32 kernels may round
        # the last bits differently, so the floats are compared to float32 rounding here.
        got = [float.fromhex(x) for s in now[key] for h in s for x in h[1:]]
        want = [float.fromhex(x) for s in sentences for h in s for x in h[1:]]
        assert got == pytest.approx(want, rel=1e-6, abs=1e-6)


# --- target prefixes ---------------------------------------------------------------------------

PREFIX_CONFIGS = [
    DecodeConfig(beam=1),  # greedy
    DecodeConfig(beam=4, nbest=3),
    DecodeConfig(beam=3, nbest=2, sampling=True, top_k=6),
]


def random_prefixes(n: int, seed: int, high: int = 5) -> list[list[int]]:
    """n random prefixes of 0..high-1 real pieces (some empty)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, high, (n,), generator=gen).tolist()
    return [torch.randint(FIRST_REAL, VOCAB, (k,), generator=gen).tolist() for k in lengths]


def test_outputs_start_with_their_prefix_and_score_it(reverser: Transformer) -> None:
    srcs, wanted = random_sources(6, seed=61), random_prefixes(6, seed=66)
    assert {len(p) for p in wanted} >= {0, 2} and len({len(p) for p in wanted}) >= 3
    prefix = prefixes(wanted, torch.device("cpu"))
    for model in models(reverser)[:2]:
        for config in PREFIX_CONFIGS:
            torch.manual_seed(0)
            out = decode(model, pad_batch(srcs), config, prefix=prefix)
            for src, p, hyps in zip(srcs, wanted, out, strict=True):
                assert len(hyps) == max(config.nbest, config.sampling * config.beam)
                for h in hyps:  # the prefix's log-probability is part of every score
                    assert h.tokens[: len(p)] == p
                    assert h.logprob == pytest.approx(
                        teacher_forced_logprob(model, src, h.tokens), abs=1e-4
                    )


def test_a_prefix_longer_than_the_limit_raises_it(reverser: Transformer) -> None:
    src = pad_batch([[5, EOS_ID]])  # limit 1 * 2 + 1 = 3: two pieces and EOS
    prefix = prefixes([[6, 7, 8, 9, 10]], torch.device("cpu"))
    short = DecodeConfig(beam=2, max_len_a=1.0, max_len_b=1)
    assert len(decode(reverser, src, short)[0][0].tokens) <= 2
    # The prefix, then up to max_len_b pieces more: the limit is 5 + 1 + EOS.
    for beam in (1, 2):
        config = dataclasses.replace(short, beam=beam)
        assert output_limits(reverser, src, config, torch.tensor([5])).tolist() == [7]
        for hyps in decode(reverser, src, config, prefix=prefix):
            assert hyps[0].tokens[:5] == [6, 7, 8, 9, 10] and len(hyps[0].tokens) <= 6
    none_more = DecodeConfig(beam=2, max_len_a=1.0, max_len_b=0)
    assert decode(reverser, src, none_more, prefix=prefix)[0][0].tokens == [6, 7, 8, 9, 10]


def test_its_own_greedy_output_as_prefix_gives_it_back(reverser: Transformer) -> None:
    srcs = random_sources(6, seed=67)
    for model in models(reverser):
        own = greedy_ids(model, pad_batch(srcs))
        prefix = prefixes(own, torch.device("cpu"))
        assert greedy_search(model, pad_batch(srcs), DecodeConfig(), prefix) == greedy_search(
            model, pad_batch(srcs), DecodeConfig()
        )
        halves = prefixes([tokens[: len(tokens) // 2] for tokens in own], torch.device("cpu"))
        assert greedy_ids(model, pad_batch(srcs)) == [
            h[0].tokens for h in greedy_search(model, pad_batch(srcs), DecodeConfig(), halves)
        ]


def test_prefixes_are_batch_invariant(reverser: Transformer) -> None:
    srcs, wanted = random_sources(24, seed=71), random_prefixes(24, seed=72)
    for config in PREFIX_CONFIGS[:2]:
        batch = decode(
            reverser, pad_batch(srcs), config, prefix=prefixes(wanted, torch.device("cpu"))
        )
        for i in (0, 5, 17):
            alone = decode(
                reverser,
                pad_batch([srcs[i]]),
                config,
                prefix=prefixes([wanted[i]], torch.device("cpu")),
            )[0]
            assert_same_hypotheses(batch[i], alone)


# --- terminology constraints -------------------------------------------------------------------


def test_progress_follows_phrases_in_any_order() -> None:
    phrases = torch.tensor([[[5, 6], [7, PAD_ID], [PAD_ID, PAD_ID]]])  # two phrases, one slot
    lengths = torch.tensor([[2, 1, 0]])
    progress, banks = Progress.start(lengths), []
    for token in [5, 9, 7, 5, 5, 6, 8]:  # 5 then 9 drops the first match; 5 5 6 restarts it
        progress = progress.after(torch.tensor([token]), phrases, lengths)
        banks.append(int(progress.met_pieces(lengths)))
    assert banks == [1, 0, 1, 2, 2, 3, 3]
    assert progress.met.tolist() == [[True, True, True]] and progress.phrase.tolist() == [-1]


def test_ranked_puts_a_nan_score_last() -> None:
    hyps = [
        Hypothesis([4], -3.0, -3.0),
        Hypothesis([5], math.nan, math.nan),
        Hypothesis([6], -1.0, -1.0),
    ]
    assert [h.tokens for h in ranked(hyps, 3)] == [[6], [4], [5]]
    assert [h.tokens for h in ranked(hyps, 2)] == [[6], [4]]


def met_after(tokens: list[int], *phrases: list[int]) -> list[list[bool]]:
    """Which of `phrases` (one sentence's) the output `tokens` has met, by Progress."""
    constraints = Constraints.of([phrases], torch.device("cpu"))
    assert constraints is not None
    progress = Progress.start(constraints.lengths)
    for token in tokens:
        progress = progress.after(torch.tensor([token]), constraints.phrases, constraints.lengths)
    return progress.met.tolist()


def test_progress_finds_phrases_that_overlap_or_repeat_their_start() -> None:
    assert met_after([5, 5, 5, 6], [5, 5, 6]) == [[True]]  # a failed match keeps its end
    assert met_after([5, 6, 5, 6, 7], [5, 6, 7]) == [[True]]
    assert met_after([5, 5, 6], [5, 5, 5, 6]) == [[False]]
    assert met_after([4, 5, 7], [4, 5, 6], [5, 7]) == [[False, True]]  # inside another's start
    assert met_after([4, 5, 6], [4, 5], [5, 6]) == [[True, True]]  # New York Times
    assert met_after([4, 5, 6], [5, 6], [4, 5]) == [[True, True]]
    assert met_after([4, 6, 5], [4, 5], [5, 6]) == [[False, False]]
    for tokens, phrases in [([8, 4, 4, 5, 9], [[4, 5]]), ([4, 5, 4, 5, 6], [[4, 5, 6], [5, 4]])]:
        assert met_after(tokens, *phrases) == [[contains(tokens, p) for p in phrases]]


@pytest.mark.parametrize("budget", [search_module.ENDS_BUDGET, 200])  # 200: rows a few at once
def test_progress_meets_exactly_the_phrases_an_output_contains(
    budget: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(search_module, "ENDS_BUDGET", budget)
    gen = torch.Generator().manual_seed(5)
    draw = lambda n: torch.randint(4, 7, (n,), generator=gen).tolist()  # noqa: E731
    rows = [[draw(int(torch.randint(1, 5, (1,), generator=gen))) for _ in range(3)]
            for _ in range(300)]  # fmt: skip
    outputs = torch.randint(4, 7, (300, 14), generator=gen)  # 3 pieces: many overlaps
    constraints = Constraints.of(rows, torch.device("cpu"))
    assert constraints is not None
    progress = Progress.start(constraints.lengths)
    for step in range(outputs.size(1)):
        progress = progress.after(outputs[:, step], constraints.phrases, constraints.lengths)
    for row, output, met in zip(rows, outputs.tolist(), progress.met.tolist(), strict=True):
        kept = essential(row)
        assert met[: len(kept)] == [contains(output, p) for p in kept], (row, output)
        assert all(met[len(kept) :])  # empty slots


def test_empty_phrases_constrain_nothing() -> None:
    cpu = torch.device("cpu")
    assert Constraints.of([[[]], []], cpu) is None  # an IndexError in Progress once
    constraints = Constraints.of([[[], [4, 5]], [[]]], cpu)
    assert constraints is not None
    assert constraints.phrases.tolist() == [[[4, 5]], [[PAD_ID, PAD_ID]]]
    assert constraints.lengths.tolist() == [[2], [0]]


def random_constraints(n: int, seed: int) -> list[list[list[int]]]:
    """n sentences' constraints: none, or one or two phrases of one or two real pieces."""
    gen = torch.Generator().manual_seed(seed)
    return [
        [
            torch.randint(
                FIRST_REAL, VOCAB, (int(torch.randint(1, 3, (1,), generator=gen)),), generator=gen
            ).tolist()
            for _ in range(int(torch.randint(0, 3, (1,), generator=gen)))
        ]
        for _ in range(n)
    ]


def test_constrained_outputs_contain_their_phrases(reverser: Transformer) -> None:
    srcs, phrases = random_sources(8, seed=73), random_constraints(8, seed=74)
    assert {len(p) for p in phrases} == {0, 1, 2}
    constraints = Constraints.of(phrases, torch.device("cpu"))
    for model in models(reverser)[:3]:
        for config in (DecodeConfig(beam=1), DecodeConfig(beam=4, nbest=2)):
            out = decode(model, pad_batch(srcs), config, constraints=constraints)
            for src, wanted, hyps in zip(srcs, phrases, out, strict=True):
                assert 1 <= len(hyps) <= config.nbest  # fewer may meet them by the limit
                for h in hyps:
                    assert all(contains(h.tokens, p) for p in wanted), (h.tokens, wanted)
                    assert h.logprob == pytest.approx(
                        teacher_forced_logprob(model, src, h.tokens), abs=1e-4
                    )
    plain = beam_search(reverser, pad_batch(srcs), DecodeConfig(beam=4))
    free = [i for i, p in enumerate(phrases) if not p]  # sentences without constraints
    constrained = decode(reverser, pad_batch(srcs), DecodeConfig(beam=4), constraints=constraints)
    for i in free:
        assert constrained[i][0].tokens == plain[i][0].tokens


def test_constraints_are_batch_invariant_and_work_with_prefixes(reverser: Transformer) -> None:
    srcs, phrases = random_sources(12, seed=79), random_constraints(12, seed=80)
    wanted = random_prefixes(12, seed=66, high=3)
    cpu = torch.device("cpu")
    config = DecodeConfig(beam=3, nbest=3)
    batch = decode(
        reverser, pad_batch(srcs), config, prefix=prefixes(wanted, cpu),
        constraints=Constraints.of(phrases, cpu),
    )  # fmt: skip
    for i in range(0, 12, 3):
        alone = decode(
            reverser, pad_batch([srcs[i]]), config, prefix=prefixes([wanted[i]], cpu),
            constraints=Constraints.of([phrases[i]], cpu),
        )  # fmt: skip
        assert_same_hypotheses(batch[i], alone[0])
    for p, wanted_phrases, hyps in zip(wanted, phrases, batch, strict=True):
        assert all(h.tokens[: len(p)] == p for h in hyps)
        assert all(contains(h.tokens, c) for h in hyps for c in wanted_phrases)


def test_a_phrase_inside_another_or_repeated_asks_for_nothing_more(reverser: Transformer) -> None:
    srcs, cpu = random_sources(6, seed=85, low=5), torch.device("cpu")
    longer = [[src[1:4]] for src in srcs]  # three pieces of each source: its reversal holds them
    inside = [[p[0][1:], p[0], p[0][:2]] for p in longer]  # the tail, the whole, the head
    repeated = [[p[0][1:2], p[0][1:2]] for p in longer]
    config = DecodeConfig(beam=4, nbest=2)
    out = decode(reverser, pad_batch(srcs), config, constraints=Constraints.of(longer, cpu))
    both = decode(reverser, pad_batch(srcs), config, constraints=Constraints.of(inside, cpu))
    assert all(contains(h.tokens, p[0]) for hyps, p in zip(out, longer, strict=True) for h in hyps)
    for one, other in zip(out, both, strict=True):
        assert_same_hypotheses(one, other)
    once = [[p[0]] for p in repeated]
    out = decode(reverser, pad_batch(srcs), config, constraints=Constraints.of(once, cpu))
    twice = decode(reverser, pad_batch(srcs), config, constraints=Constraints.of(repeated, cpu))
    for one, other in zip(out, twice, strict=True):
        assert_same_hypotheses(one, other)


def test_unsatisfiable_constraints_give_the_unconstrained_output() -> None:
    model = tiny(6, max_positions=8)  # at most 6 pieces before EOS
    srcs = random_sources(3, seed=83, high=5)
    phrases = [[[5, 6, 7, 8], [9, 10, 11]], [[12]], []]  # the first needs 7 pieces
    config = DecodeConfig(beam=3, nbest=2)
    out = decode(
        model, pad_batch(srcs), config, constraints=Constraints.of(phrases, torch.device("cpu"))
    )
    plain = beam_search(model, pad_batch(srcs), config)
    assert_same_hypotheses(out[0], plain[0])
    assert all(contains(h.tokens, [12]) for h in out[1]) and out[2] == plain[2]
    with pytest.raises(ValueError, match="constraints need beam search, not sampling"):
        decode(
            model,
            pad_batch(srcs),
            DecodeConfig(sampling=True),
            constraints=Constraints.of(phrases, torch.device("cpu")),
        )


def test_hypotheses_that_cannot_meet_their_phrases_leave_the_beam() -> None:
    model, cpu = tiny(6, max_positions=8), torch.device("cpu")  # at most 6 pieces before EOS
    src = pad_batch(random_sources(2, seed=83, high=5))
    config = DecodeConfig(beam=3, nbest=2)
    fits = [[[5, 6], [7, 8, 9, 10]], [[5, 6, 7, 8], [9, 10, 11]]]  # 6 pieces: only they fit
    out = decode(model, src[:1], config, constraints=Constraints.of(fits[:1], cpu))
    assert sorted(h.tokens for h in out[0]) == [[5, 6, 7, 8, 9, 10], [7, 8, 9, 10, 5, 6]]
    # 7 pieces never fit: the search stops after one step, and plain beam search takes over.
    plain, plain_steps = decode_calls(model, lambda: beam_search(model, src[1:], config))
    hopeless = Constraints.of(fits[1:], cpu)
    found, steps = decode_calls(model, lambda: decode(model, src[1:], config, constraints=hopeless))
    assert found == plain and steps == plain_steps + 1


# --- ensembles ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_ensembles_average_log_probabilities_by_weight(reverser: Transformer) -> None:
    srcs, wanted = pad_batch(random_sources(6, seed=89)), random_prefixes(6, seed=66)
    prefix = prefixes(wanted, torch.device("cpu"))
    other = tiny(7, eos_boost=3.0, dim=48)  # a different shape: memories of other widths
    config = DecodeConfig(beam=3, nbest=2)
    cases = [
        (Ensemble([reverser, reverser]), reverser),  # a model with itself is the model
        (Ensemble([reverser, other], [2.0, 0.0]), reverser),
        (Ensemble([reverser, other], [0.0, 1.0]), other),
    ]
    for ensemble, alone in cases:
        for p in (None, prefix):
            for setting in (DecodeConfig(beam=1), config):
                got = decode(ensemble, srcs, setting, prefix=p)
                for g, w in zip(got, decode(alone, srcs, setting, prefix=p), strict=True):
                    assert_same_hypotheses(g, w)
    mixed = decode(Ensemble([reverser, other]), srcs, config)
    assert [h[0].tokens for h in mixed] != [h[0].tokens for h in decode(reverser, srcs, config)]


# --- steered searches wait as plain ones do ---------------------------------------------------


def test_steered_searches_wait_for_the_device_once_per_step(
    reverser: Transformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_module, "reorders_in_place", on_a_gpu)
    srcs, cpu = random_sources(12, seed=47), torch.device("cpu")
    src, phrases = pad_batch(srcs), random_constraints(12, seed=48)
    prefix = prefixes(random_prefixes(12, seed=49, high=3), cpu)
    constraints = Constraints.of(phrases, cpu)
    ensemble = Ensemble([reverser, tiny(7, dim=48)])
    three, four = DecodeConfig(beam=3), DecodeConfig(beam=4, nbest=2)
    free: list[list[list[int]]] = [[] for _ in srcs]
    searches = [  # (decoder, search, its waits outside the steps as for plain ones, phrases)
        (reverser, lambda: decode(reverser, src, DecodeConfig(beam=1), prefix=prefix), 3, free),
        (reverser, lambda: decode(reverser, src, DecodeConfig(beam=4), prefix=prefix), 4, free),
        (reverser, lambda: decode(reverser, src, four, constraints=constraints), 4, phrases),
        (ensemble, lambda: decode(ensemble, src, three, False, prefix, constraints), 4, phrases),
    ]
    for model, search, outside_the_steps, wanted in searches:
        want, steps = decode_calls(model, search)
        # Met, or the unconstrained fallback would search a second time.
        assert all(contains(h[0].tokens, p) for h, w in zip(want, wanted, strict=True) for p in w)
        with HostWaits(monkeypatch) as waits:
            assert search() == want
        assert steps >= 8 and waits.count <= steps + outside_the_steps, (steps, waits.count)


def test_new_beams_stay_in_their_origins_rows() -> None:
    gen = torch.Generator().manual_seed(3)
    origin = torch.randint(0, 5, (200, 5), generator=gen)  # (B, K) origin beam, best first
    origin[0] = torch.tensor([4, 4, 4, 4, 4])
    origin[1] = torch.tensor([0, 1, 2, 3, 4])
    order = search_module.stay_in_place(origin)  # (B, K) new beam at each row
    assert torch.equal(order.sort(dim=1).values, torch.arange(5).expand(200, 5))  # permutations
    placed = origin.gather(1, order)  # (B, K) origin of the beam in each row
    distinct = [len(set(row)) for row in origin.tolist()]
    assert (placed == torch.arange(5)).sum(dim=1).tolist() == distinct  # as many as can stay
    for row, beams in zip(placed.tolist(), order.tolist(), strict=True):
        for j in set(row):  # in its origin's row: the best new beam of that origin
            assert beams[j] == min(b for b, o in zip(beams, row, strict=True) if o == j)
    assert order[0].tolist() == [1, 2, 3, 4, 0] and order[1].tolist() == [0, 1, 2, 3, 4]


def test_sentences_kept_stay_where_they_are() -> None:
    gen = torch.Generator().manual_seed(4)
    for _ in range(50):
        done = torch.rand(12, generator=gen) < 0.4
        kept = int((~done).sum())
        keep = search_module.kept_in_place(done, kept).tolist()
        assert sorted(keep) == (~done).nonzero().squeeze(1).tolist()
        assert all(keep[i] == i for i in range(kept) if not done[i])


@pytest.mark.parametrize("beam", [3, 5])
def test_reordering_in_place_finds_what_copying_finds(
    reverser: Transformer, beam: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = pad_batch(random_sources(24, seed=48))
    config = DecodeConfig(beam=beam, nbest=beam, max_len_b=4)
    in_place = beam_search(reverser, src, config)
    monkeypatch.setattr(model_module, "reorders_in_place", on_a_gpu)
    assert beam_search(reverser, src, config) == in_place
