"""Tests for mt.batching: token-budget bucketing, determinism, updates over ranks, collation."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from mt import batching
from mt.batching import (
    BatchSampler,
    MixtureSampler,
    Prefetcher,
    collate,
    collate_source,
    padding_efficiency,
    plan_updates,
)
from mt.corpora import read_lines
from mt.vocab import BOS_ID, EOS_ID, PAD_ID


def random_lens(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Correlated source/target lengths like a real parallel corpus."""
    rng = np.random.default_rng(seed)
    src = rng.integers(0, 60, n)
    tgt = np.clip((src * rng.uniform(0.6, 1.5, n)).astype(np.int64), 0, 80)
    return src, tgt


def assert_valid_epoch(batches: list[np.ndarray], src, tgt, max_tokens: int, n: int) -> None:
    """Every batch within the budget and every sentence exactly once."""
    for b in batches:
        assert b.dtype == np.int64 and len(b) > 0
        assert len(b) * (max(src[b].max(), tgt[b].max()) + 1) <= max_tokens
    np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(n))


@pytest.mark.parametrize(
    "shuffle, window, max_tokens",
    [(True, 0, 1000), (True, 37, 1000), (False, 0, 500), (False, 200, 81), (True, 1, 300)],
)
def test_budget_and_coverage(shuffle: bool, window: int, max_tokens: int) -> None:
    src, tgt = random_lens(3000)
    sampler = BatchSampler(src, tgt, max_tokens, shuffle=shuffle, window=window)
    for epoch in (1, 2):
        assert_valid_epoch(sampler.epoch_batches(epoch), src, tgt, max_tokens, 3000)


def test_a_huge_budget_costs_no_memory_of_its_size() -> None:
    # A budget of 10**15 tokens (a typo of train.valid_max_tokens or --max-tokens) batches
    # a window at a time; it used to allocate 8 bytes per budget token.
    src, tgt = random_lens(3000)
    batches = BatchSampler(src, tgt, 10**15, shuffle=False, window=1000).epoch_batches(1)
    assert [len(b) for b in batches] == [1000, 1000, 1000]
    assert_valid_epoch(batches, src, tgt, 10**15, 3000)
    assert [len(b) for b in batching.source_batches([[5]] * 10, max_tokens=10**15)] == [10]


def test_batches_are_reasonably_full() -> None:
    src, tgt = random_lens(3000)
    batches = BatchSampler(src, tgt, 2000).epoch_batches(1)
    used = sum(len(b) * (max(src[b].max(), tgt[b].max()) + 1) for b in batches)
    assert used / (2000 * len(batches)) > 0.8  # greedy cutting leaves little budget unused


def test_deterministic_given_seed_and_epoch() -> None:
    src, tgt = random_lens(2000)
    a = BatchSampler(src, tgt, 800, seed=5).epoch_batches(3)
    b = BatchSampler(src.copy(), tgt.copy(), 800, seed=5).epoch_batches(3)
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    other_epoch = BatchSampler(src, tgt, 800, seed=5).epoch_batches(4)
    other_seed = BatchSampler(src, tgt, 800, seed=6).epoch_batches(3)
    for c in (other_epoch, other_seed):
        assert not np.array_equal(np.concatenate(a), np.concatenate(c))


def test_no_shuffle_is_sorted_and_epoch_independent() -> None:
    src, tgt = random_lens(2000)
    a = BatchSampler(src, tgt, 800, shuffle=False, seed=1).epoch_batches(1)
    b = BatchSampler(src, tgt, 800, shuffle=False, seed=9).epoch_batches(7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True)) and len(a) == len(b)
    order = np.concatenate(a)
    longest = np.maximum(src, tgt)[order]
    assert np.all(np.diff(longest) >= 0)  # one window = whole corpus, sorted ascending


def test_resume_by_skipping_consumed_batches() -> None:
    src, tgt = random_lens(2000)
    corpus = FakeCorpus(src, tgt)
    full = list(plan_updates(BatchSampler(src, tgt, 700, seed=3), corpus, (1, 0), 2, 1))
    # A new sampler (a new process) resuming after the 5th batch of epoch 2.
    resumed = list(plan_updates(BatchSampler(src, tgt, 700, seed=3), corpus, (2, 5), 2, 1))
    first = next(i for i, u in enumerate(full) if u.epoch == 2) + 5
    assert len(resumed) == len(full) - first > 0
    for want, got in zip(full[first:], resumed, strict=True):
        assert (got.epoch, got.done, got.tokens) == (want.epoch, want.done, want.tokens)
        assert np.array_equal(got.batches[0].indices, want.batches[0].indices)


@pytest.mark.parametrize("window", [0, 37, 500])
def test_sorting_in_blocks_equals_one_sort(window: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # sort_windows sorts SORT_BLOCK indices at a time to bound its memory; batches must not change.
    src, tgt = random_lens(3000)
    whole = BatchSampler(src, tgt, 1000, seed=4, window=window).epoch_batches(2)
    monkeypatch.setattr(batching, "SORT_BLOCK", 100)  # many blocks of whole windows
    blocks = BatchSampler(src, tgt, 1000, seed=4, window=window).epoch_batches(2)
    assert len(whole) == len(blocks)
    assert all(np.array_equal(x, y) for x, y in zip(whole, blocks, strict=True))


class FakeCorpus:
    """What plan_updates reads of an EncodedCorpus: lengths and pairs of ids."""

    def __init__(self, src: np.ndarray, tgt: np.ndarray) -> None:
        self.src_lens, self.tgt_lens = src, tgt

    def pairs(self, indices: np.ndarray) -> list[tuple[list[int], list[int]]]:
        return [([7] * int(self.src_lens[i]), [8] * int(self.tgt_lens[i])) for i in indices]


def rank_updates(corpus, sampler, start, update_freq, world_size, max_epochs=2):
    """Each rank's updates, as lists of batch index arrays, rank by rank."""
    return [
        list(plan_updates(sampler, corpus, start, max_epochs, update_freq, rank, world_size))
        for rank in range(world_size)
    ]


@pytest.mark.parametrize(("update_freq", "world_size"), [(1, 1), (2, 1), (1, 2), (3, 2), (2, 3)])
def test_updates_deal_each_epoch_out_once(update_freq: int, world_size: int) -> None:
    src, tgt = random_lens(1001, seed=world_size)
    corpus, sampler = FakeCorpus(src, tgt), BatchSampler(src, tgt, 600, seed=2)
    per_rank = rank_updates(corpus, sampler, (1, 0), update_freq, world_size)
    assert len({len(updates) for updates in per_rank}) == 1  # every rank makes every update
    for epoch in (1, 2):
        expected = sampler.epoch_batches(epoch)
        size = update_freq * world_size
        steps = [u for u in zip(*per_rank, strict=True) if u[0].epoch == epoch]
        assert len(steps) == -(-len(expected) // size)  # an update never spans two epochs
        for k, ranks in enumerate(steps):
            chunk = expected[k * size : (k + 1) * size]
            dealt = [b.indices for rank in range(world_size) for b in ranks[rank].batches]
            assert sorted(map(tuple, dealt)) == sorted(map(tuple, chunk))
            assert {u.done for u in ranks} == {k * size + len(chunk)}
            assert {u.tokens for u in ranks} == {
                sum(b.tgt_tokens for u in ranks for b in u.batches)
            }


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (2, 3), (3, 2)])
def test_resume_on_another_world_size_continues_exactly(before: int, after: int) -> None:
    # A run stopped after k updates on `before` ranks resumes on `after` ranks (keeping the
    # batches per update) at the very batch it stopped at: nothing skipped, nothing repeated.
    src, tgt = random_lens(1500, seed=7)
    corpus, sampler = FakeCorpus(src, tgt), BatchSampler(src, tgt, 500, seed=4)
    size = 6
    straight = rank_updates(corpus, sampler, (1, 0), size // before, before)
    k = 5
    stopped = straight[0][k - 1]
    resumed = rank_updates(corpus, sampler, (stopped.epoch, stopped.done), size // after, after)

    def update_sets(per_rank):
        return [
            sorted(tuple(b.indices) for u in ranks for b in u.batches)
            for ranks in zip(*per_rank, strict=True)
        ]

    assert update_sets(resumed) == update_sets(straight)[k:]


def test_updates_with_fewer_batches_than_ranks() -> None:
    # Two batches for three ranks: the third rank takes part in the update with no batch.
    src, tgt = np.full(20, 9), np.full(20, 5)
    sampler = BatchSampler(src, tgt, 100, shuffle=False)
    assert len(sampler.epoch_batches(1)) == 2
    per_rank = rank_updates(FakeCorpus(src, tgt), sampler, (1, 0), 1, 3, max_epochs=1)
    assert [[len(u.batches) for u in updates] for updates in per_rank] == [[1], [1], [0]]
    assert per_rank[2][0].tokens == 20 * 6


def test_prefetcher_keeps_order_and_ends() -> None:
    items = Prefetcher(iter(range(50)), depth=2, prepare=lambda x: x * 10)
    assert list(items) == [x * 10 for x in range(50)]
    assert next(items, None) is None  # stays ended
    items.close()


def test_prefetcher_raises_the_producers_error_in_order() -> None:
    def produce():
        yield 1
        yield 2
        raise ValueError("bad corpus row")

    items = Prefetcher(produce(), depth=1)
    assert [next(items), next(items)] == [1, 2]
    with pytest.raises(ValueError, match="bad corpus row"):
        next(items)
    items.close()


def test_prefetcher_close_stops_a_blocked_producer() -> None:
    produced = []

    def produce():
        for i in range(10_000):
            produced.append(i)
            yield i

    items = Prefetcher(produce(), depth=2)
    assert next(items) == 0
    items.close()  # the thread was blocked on a full queue; close() must not hang
    assert not items._thread.is_alive()
    assert len(produced) < 10


def test_overlong_sentence_raises() -> None:
    with pytest.raises(ValueError) as info:
        BatchSampler(np.array([3, 4, 10, 20]), np.array([2, 4, 4, 1]), max_tokens=8)
    assert str(info.value) == (
        "sentence 2 is too long: 11 tokens with BOS/EOS (source 10, target 4) exceeds max_tokens=8"
    )


def test_invalid_arguments_raise() -> None:
    with pytest.raises(ValueError, match="equal length"):
        BatchSampler(np.array([1, 2]), np.array([1]), 10)
    with pytest.raises(ValueError, match="max_tokens >= 1"):
        BatchSampler(np.array([1]), np.array([1]), 0)


def test_empty_corpus_and_len() -> None:
    empty = np.zeros(0, dtype=np.int64)
    assert BatchSampler(empty, empty, 10).epoch_batches(1) == []
    src, tgt = random_lens(500)
    sampler = BatchSampler(src, tgt, 400)
    assert len(sampler) == len(sampler.epoch_batches(1))


def test_collate_hand_example() -> None:
    pairs = [([5, 6, 7], [8]), ([9], [10, 11, 12, 13])]
    batch = collate(pairs, np.array([4, 1]))
    P, B, E = PAD_ID, BOS_ID, EOS_ID
    assert batch.src.dtype == torch.long
    assert batch.src.tolist() == [[5, 6, 7, E], [9, E, P, P]]
    assert batch.tgt_in.tolist() == [[B, 8, P, P, P], [B, 10, 11, 12, 13]]
    assert batch.tgt_out.tolist() == [[8, E, P, P, P], [10, 11, 12, 13, E]]
    assert batch.indices.tolist() == [4, 1]
    assert (batch.src_tokens, batch.tgt_tokens) == (6, 7)
    moved = batch.to("cpu")
    assert torch.equal(moved.tgt_out, batch.tgt_out) and moved.tgt_tokens == 7


def test_collate_empty_sentences_and_numpy_input() -> None:
    batch = collate([(np.array([], dtype=np.int64), []), ([], [])], np.array([0, 1]))
    assert batch.src.tolist() == [[EOS_ID], [EOS_ID]]
    assert batch.tgt_in.tolist() == [[BOS_ID], [BOS_ID]]
    assert batch.tgt_out.tolist() == [[EOS_ID], [EOS_ID]]


def test_collate_source() -> None:
    batch = collate_source([[4, 5], [6, 7, 8, 9], [10]], np.array([2, 0, 1]))
    E = EOS_ID
    assert batch.src.tolist() == [[4, 5, E, 0, 0], [6, 7, 8, 9, E], [10, E, 0, 0, 0]]
    assert batch.src_tokens == 10 and batch.indices.tolist() == [2, 0, 1]


def test_source_batches_hold_every_non_empty_sentence_once_under_the_budget() -> None:
    rng = np.random.default_rng(0)
    ids = [[5] * int(n) for n in rng.integers(0, 30, 200)]  # some empty
    ids[7] = [5] * 60  # with its EOS over the budget, which rises to fit it alone
    batches = batching.source_batches(ids, max_tokens=40)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == [i for i, seq in enumerate(ids) if seq]
    for batch in batches:
        longest = max(len(ids[i]) for i in batch) + 1  # + EOS
        assert len(batch) * longest <= 61
    assert [7] in [batch.tolist() for batch in batches]
    assert batching.source_batches([[], []], max_tokens=40) == []


def test_padding_efficiency_hand_example() -> None:
    src, tgt = np.array([1, 3, 2, 2]), np.array([1, 1, 4, 0])
    # Source rows (+EOS) [2, 4] -> 6/8 and [3, 3] -> 1; target [2, 2] -> 1 and [5, 1] -> 6/10.
    eff = padding_efficiency([np.array([0, 1]), np.array([2, 3])], src, tgt)
    assert eff == pytest.approx(((0.75 + 1.0) / 2, (1.0 + 0.6) / 2))


def multi30k_lengths(multi30k: Path) -> tuple[np.ndarray, np.ndarray]:
    """Subword lengths of Multi30k train: tiny joint BPE if sentencepiece exists, else words*1.3."""
    de, en = (list(read_lines(multi30k / f"train.{x}.gz")) for x in ("de", "en"))
    try:
        import sentencepiece as spm
    except ImportError:
        return tuple(np.array([round(len(s.split()) * 1.3) for s in side]) for side in (de, en))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(de + en), model_writer=model, vocab_size=8000,
        model_type="bpe", minloglevel=2, num_threads=2,
    )  # fmt: skip
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    return tuple(np.array([len(ids) for ids in sp.encode(side)]) for side in (de, en))


@pytest.fixture(scope="module")
def multi30k_lens(multi30k: Path) -> tuple[np.ndarray, np.ndarray]:
    """Subword lengths of Multi30k train (see multi30k_lengths), computed once."""
    return multi30k_lengths(multi30k)


def test_padding_efficiency_multi30k(multi30k_lens: tuple[np.ndarray, np.ndarray]) -> None:
    src, tgt = multi30k_lens
    for shuffle in (True, False):
        batches = BatchSampler(src, tgt, 4096, shuffle=shuffle).epoch_batches(1)
        assert_valid_epoch(batches, src, tgt, 4096, len(src))
        src_eff, tgt_eff = padding_efficiency(batches, src, tgt)
        assert src_eff >= 0.90 and tgt_eff >= 0.90, (shuffle, src_eff, tgt_eff)


# --- several corpora ----------------------------------------------------------------------------


def mixture(
    seed: int = 3, max_tokens: int = 500, mixed: bool = False
) -> tuple[FakeCorpus, MixtureSampler]:
    """Three corpora of 900, 200 and 50 pairs drawn 50/30/20, and their rows corpus after corpus."""
    parts = [random_lens(n, seed=i) for i, n in enumerate((900, 200, 50))]
    samplers = [BatchSampler(src, tgt, max_tokens, seed=seed) for src, tgt in parts]
    sampler = MixtureSampler(samplers, np.array([0.5, 0.3, 0.2]), seed, mixed)
    src, tgt = (np.concatenate([part[side] for part in parts]) for side in (0, 1))
    return FakeCorpus(src, tgt), sampler


def test_mixture_draws_each_corpus_its_share_of_sentences_in_batches_of_its_own() -> None:
    corpus, sampler = mixture()
    assert len(sampler) == sampler.counts(1).sum()
    for epoch in (1, 2):
        counts = sampler.counts(epoch)
        batches = sampler.epoch_batches(epoch)
        assert len(batches) == counts.sum()
        which = [np.unique(np.searchsorted(sampler.offsets, b, side="right") - 1) for b in batches]
        assert all(len(w) == 1 for w in which)  # a batch holds one corpus
        assert np.bincount([int(w[0]) for w in which], minlength=3).tolist() == counts.tolist()
        corpus_of = np.repeat([int(w[0]) for w in which], [len(b) for b in batches])  # per row
        rows = np.bincount(corpus_of, minlength=3)
        assert np.all(np.abs(rows / rows.sum() - sampler.probabilities) < 0.03), rows
        for b in batches:
            assert len(b) * (max(corpus.src_lens[b].max(), corpus.tgt_lens[b].max()) + 1) <= 500
        # The 50-pair corpus is drawn more often than it has batches: it goes round again.
        small = np.concatenate([b for b, w in zip(batches, which, strict=True) if w[0] == 2])
        assert len(small) > 50 and set(small.tolist()) == set(range(1100, 1150))
    again = mixture()[1]
    assert all(map(np.array_equal, sampler.epoch_batches(2), again.epoch_batches(2)))
    first, second = sampler.epoch_batches(1), sampler.epoch_batches(2)
    assert not all(map(np.array_equal, first, second))


@pytest.mark.parametrize("mixed", [False, True])
def test_shares_in_proportion_to_size_read_every_pair_once(mixed: bool) -> None:
    # Short and long sentences, 1,000 pairs each: in batches of 600 tokens the short corpus
    # fills 10 batches, the long one 100. Shares of sentences 1:1 (temperature 1) must read
    # each pair once an epoch, not give each corpus half of the 110 batches.
    rng = np.random.default_rng(0)
    short, long = rng.integers(3, 6, 1000), rng.integers(50, 59, 1000)
    samplers = [BatchSampler(lens, lens, 600, seed=2) for lens in (short, long)]
    sampler = MixtureSampler(samplers, np.array([0.5, 0.5]), seed=2, mixed=mixed)
    for epoch in (1, 2):
        rows = np.sort(np.concatenate(sampler.epoch_batches(epoch)))
        assert np.array_equal(rows, np.arange(2000))


def test_shares_in_proportion_to_size_read_every_pair_once_whatever_each_shuffle_cuts() -> None:
    # Lengths spread widely: each epoch's shuffle cuts a corpus into a few batches more or
    # fewer than epoch 1's did. Counts taken from epoch 1 dropped pairs or read some twice.
    rng = np.random.default_rng(0)
    sizes = (20_000, 8_000)
    samplers = [BatchSampler(*(rng.integers(1, 61, n) for _ in "st"), 2048, seed=1) for n in sizes]
    sampler = MixtureSampler(samplers, np.array(sizes) / sum(sizes), seed=1)
    passes = []
    for epoch in (1, 2, 3):
        rows = np.sort(np.concatenate(sampler.epoch_batches(epoch)))
        assert np.array_equal(rows, np.arange(sum(sizes))), epoch
        passes.append(sampler.counts(epoch).tolist())
    assert len({tuple(p) for p in passes}) > 1  # the shuffles did cut differently


def test_mixed_batches_draw_each_corpus_its_share_of_sentences() -> None:
    corpus, sampler = mixture(mixed=True)
    shares = [575, 345, 230]  # 1,150 rows in all, drawn 50/30/20
    for epoch in (1, 2):
        batches = sampler.epoch_batches(epoch)
        rows = np.concatenate(batches)
        which = np.searchsorted(sampler.offsets, rows, side="right") - 1
        assert np.bincount(which, minlength=3).tolist() == shares
        for b in batches:
            assert len(b) * (max(corpus.src_lens[b].max(), corpus.tgt_lens[b].max()) + 1) <= 500
        corpora = [len(np.unique(np.searchsorted(sampler.offsets, b, "right"))) for b in batches]
        assert max(corpora) == 3 and abs(len(batches) - len(sampler)) <= 3 * (epoch - 1)
        # The 50-pair corpus goes round 4.6 times: every pair 4 or 5 times.
        small = np.bincount(rows[which == 2] - 1100, minlength=50)
        assert sorted(set(small.tolist())) == [4, 5]
        # The 900-pair corpus is cut short: 575 different pairs, none twice.
        assert len(np.unique(rows[which == 0])) == 575
    again = mixture(mixed=True)[1]
    assert all(map(np.array_equal, sampler.epoch_batches(2), again.epoch_batches(2)))
    first, second = sampler.epoch_batches(1), sampler.epoch_batches(2)
    assert not all(map(np.array_equal, first, second))


@pytest.mark.parametrize("mixed", [False, True])
def test_a_mixture_of_one_is_its_sampler(mixed: bool) -> None:
    src, tgt = random_lens(700, seed=5)
    alone = BatchSampler(src, tgt, 400, seed=9)
    mixture = MixtureSampler([alone], np.array([1.0]), seed=9, mixed=mixed)
    for epoch in (1, 2):
        assert all(map(np.array_equal, mixture.epoch_batches(epoch), alone.epoch_batches(epoch)))


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_mixture_updates_resume_exactly_on_any_ranks(before: int, after: int, mixed: bool) -> None:
    corpus, sampler = mixture(seed=4, mixed=mixed)
    size = 4
    straight = rank_updates(corpus, sampler, (1, 0), size // before, before)
    one_rank = rank_updates(corpus, sampler, (1, 0), size, 1)

    def update_sets(per_rank):
        return [
            sorted(tuple(b.indices) for u in ranks for b in u.batches)
            for ranks in zip(*per_rank, strict=True)
        ]

    assert update_sets(straight) == update_sets(one_rank)  # 2 ranks x 2 = 1 rank x 4
    k = 7
    stopped = straight[0][k - 1]
    resumed = rank_updates(corpus, sampler, (stopped.epoch, stopped.done), size // after, after)
    assert update_sets(resumed) == update_sets(straight)[k:]


@pytest.mark.parametrize("mixed", [False, True])
def test_mixture_batches_stay_full(
    multi30k_lens: tuple[np.ndarray, np.ndarray], mixed: bool
) -> None:
    de, en = multi30k_lens
    # de-en whole and 5,000 pairs of en-de: two directions of different sizes.
    samplers = [BatchSampler(de, en, 4096), BatchSampler(en[:5000], de[:5000], 4096)]
    sampler = MixtureSampler(samplers, np.array([0.6, 0.4]), seed=1, mixed=mixed)
    batches = sampler.epoch_batches(1)
    src, tgt = np.concatenate([de, en[:5000]]), np.concatenate([en, de[:5000]])
    src_eff, tgt_eff = padding_efficiency(batches, src, tgt)
    assert src_eff >= 0.90 and tgt_eff >= 0.90, (src_eff, tgt_eff)
