"""Bucketed token batching: length-sorted token-budget batches, updates shared by ranks, collation.

Lengths given to this module never include special tokens. The model sees
source = ids + [EOS], decoder input = [BOS] + ids and target = ids + [EOS], so a
sentence pair occupies max(src + 1, tgt + 1) columns of a padded batch.

Resumption needs no replay: batches depend only on (seed, epoch), so a run that
stopped after consuming k batches of epoch e resumes with `epoch_batches(e)[k:]`. The batches of
an epoch are the same whatever the number of ranks: each update takes the next
update_freq x world_size of them and deals them out to the ranks, so a run may resume on another
number of ranks at exactly the same place.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Generic, TypeVar

import numpy as np
import torch
from torch import Tensor

from mt.vocab import BOS_ID, EOS_ID, PAD_ID

if TYPE_CHECKING:
    from mt.data import CorpusMix, EncodedCorpus

# A default shuffle window holds this many batches' worth of sentences: large enough that
# each window has many sentences of every length (dense batches), small enough to stay random.
WINDOW_BATCHES = 100
# sort_windows sorts about this many indices (whole windows) at a time, so that its temporaries
# stay near 13 MB however large the corpus.
SORT_BLOCK = 1 << 18


T = TypeVar("T")


@dataclass(frozen=True, eq=False)
class BatchSampler:
    """Token-budget batches of similar-length sentences, deterministic per (seed, epoch).

    `max_tokens` bounds n_sentences * longest, where longest is the max over the batch of
    src + 1 and tgt + 1 (padding counted). A sentence that alone exceeds it raises ValueError
    at construction, naming its index, its lengths and max_tokens. `window` = 0 picks
    WINDOW_BATCHES batches' worth of sentences when shuffling, and the whole corpus otherwise.
    """

    src_lens: np.ndarray
    tgt_lens: np.ndarray
    max_tokens: int
    seed: int = 1
    shuffle: bool = True
    window: int = 0

    def __post_init__(self) -> None:
        # int32, as EncodedCorpus holds them: its arrays are used as they are, not copied.
        src = np.asarray(self.src_lens, dtype=np.int32)
        tgt = np.asarray(self.tgt_lens, dtype=np.int32)
        # Frozen dataclass: normalise the arrays in place of the caller's (lists, int64, ...).
        object.__setattr__(self, "src_lens", src)
        object.__setattr__(self, "tgt_lens", tgt)
        _check_args(src, tgt, self.max_tokens, self.window)

    @cached_property
    def _widths(self) -> np.ndarray:
        """Padded columns each sentence needs, counting BOS/EOS: (N,)."""
        return np.maximum(self.src_lens, self.tgt_lens) + 1

    def window_size(self) -> int:
        """Sentences per sort window (the `window` field, or its default when 0)."""
        n = len(self.src_lens)
        if self.window > 0:
            return min(self.window, max(n, 1))
        if not self.shuffle or n == 0:
            return max(n, 1)
        per_batch = self.max_tokens / float(self._widths.mean())
        return int(min(n, max(1, round(WINDOW_BATCHES * per_batch))))

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The batches of `epoch`, in order; each an int64 array of corpus indices."""
        return self.draw([self.seed, epoch])

    def draw(self, key: Sequence[int]) -> list[np.ndarray]:
        """One shuffled pass over the corpus in batches, a function of `key` (the RNG's seed)."""
        rng = np.random.default_rng(list(key)) if self.shuffle else None
        n = len(self.src_lens)
        order = rng.permutation(n) if rng is not None else np.arange(n, dtype=np.int64)
        return self.batch(order, rng)

    def batch(self, order: np.ndarray, rng: np.random.Generator | None) -> list[np.ndarray]:
        """Indices `order` sorted by length within windows, cut into batches, shuffled by rng."""
        window = self.window_size()
        order = sort_windows(order, self.src_lens, self.tgt_lens, window)
        batches = cut_batches(order, self._widths[order], window, self.max_tokens)
        if rng is not None:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __len__(self) -> int:
        """Batches in epoch 1 (with shuffle, other epochs can differ by a few)."""
        return self._len_epoch1

    @cached_property
    def _len_epoch1(self) -> int:
        return len(self.epoch_batches(1))


@dataclass(frozen=True, eq=False)
class MixtureSampler:
    """Batches of several corpora, deterministic per (seed, epoch).

    An epoch has as many batches as the corpora together (in epoch 1). Corpus c gives about a
    share `probabilities[c]` of the sentences, in whole batches of its own (`counts`), in an
    order shuffled per epoch, taking them from its own shuffled passes: a large corpus is cut
    short, a small one goes round several times. With `mixed`, each batch holds sentences of any
    corpus, of similar lengths, in the same shares. One corpus gives exactly its BatchSampler's
    batches. Indices count rows corpus after corpus, as CorpusMix numbers them.
    """

    samplers: list[BatchSampler]  # one per corpus, on its own lengths
    probabilities: np.ndarray  # (C,) summing to 1
    seed: int = 1
    mixed: bool = False  # batches hold sentences of several corpora

    @classmethod
    def of(cls, data: CorpusMix, max_tokens: int, seed: int, mixed: bool = False) -> MixtureSampler:
        """The sampler of a run's training corpora."""
        parts = data.parts.values()
        samplers = [BatchSampler(p.src_lens, p.tgt_lens, max_tokens, seed) for p in parts]
        return cls(samplers, data.probabilities(), seed, mixed)

    @cached_property
    def offsets(self) -> np.ndarray:
        """(C + 1,) the first global row of each corpus, then the total."""
        return np.cumsum([0, *(len(s.src_lens) for s in self.samplers)])

    @cached_property
    def tgt_lens(self) -> np.ndarray:
        """(N,) target lengths of every row, corpus after corpus."""
        return np.concatenate([s.tgt_lens for s in self.samplers])

    @property
    def max_tokens(self) -> int:
        """The token budget of a batch, the same in every corpus' sampler."""
        return self.samplers[0].max_tokens

    @cached_property
    def merged(self) -> BatchSampler:
        """A sampler over every row, corpus after corpus: how mixed batches are cut."""
        src = np.concatenate([s.src_lens for s in self.samplers])
        return BatchSampler(src, self.tgt_lens, self.max_tokens, self.seed)

    def __len__(self) -> int:
        """Batches in epoch 1 (other epochs can differ by a few: each shuffle batches anew)."""
        return self._len_first

    @cached_property
    def _len_first(self) -> int:
        if len(self.samplers) == 1:
            return len(self.samplers[0])
        if self.mixed:
            return len(self.mixed_batches(1))
        return int(self.counts(1).sum())

    def counts(self, epoch: int) -> np.ndarray:
        """(C,) batches each corpus gives `epoch` (not mixed): see _counts."""
        return self._counts([len(p) for p in self._first_passes(epoch)])

    def _first_passes(self, epoch: int) -> list[list[np.ndarray]]:
        """Each corpus's first shuffled pass of `epoch`, in batches (rows of that corpus)."""
        return [s.draw([self.seed, epoch, c, 0]) for c, s in enumerate(self.samplers)]

    def _counts(self, passes: Sequence[int]) -> np.ndarray:
        """(C,) batches each corpus gives an epoch whose first passes over the corpora take
        `passes` batches: shares of their sum, largest remainders.

        Shares of sentences, not of batches: a corpus of short sentences fits more of them in
        a batch, so it needs fewer batches for its share. Probabilities in proportion to the
        corpora's sizes give each corpus its own first pass, every pair once an epoch (the pass
        of that epoch: another shuffle cuts a few batches more or fewer).
        """
        batches = np.array(passes, dtype=np.float64)
        pairs = np.array([len(s.src_lens) for s in self.samplers], dtype=np.float64)
        per_batch = np.divide(pairs, batches, out=np.ones_like(pairs), where=batches > 0)
        weights = self.probabilities / per_batch  # (C,) batches for each corpus' share
        return shares(int(batches.sum()), weights / weights.sum())

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The batches of `epoch`, in order; each an int64 array of global row indices."""
        if len(self.samplers) == 1:
            return self.samplers[0].epoch_batches(epoch)
        if self.mixed:
            return self.mixed_batches(epoch)
        first = self._first_passes(epoch)
        counts, streams = self._counts([len(p) for p in first]), []
        for c, (sampler, count) in enumerate(zip(self.samplers, counts, strict=True)):
            batches, passes = list(first[c]), 1
            while len(batches) < count:  # another pass over corpus c, shuffled its own way
                batches += sampler.draw([self.seed, epoch, c, passes])
                passes += 1
            streams.append(iter([b + self.offsets[c] for b in batches[:count]]))
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(np.repeat(np.arange(len(self.samplers)), counts))
        return [next(streams[c]) for c in order.tolist()]

    def mixed_batches(self, epoch: int) -> list[np.ndarray]:
        """Batches of any corpus' sentences: corpus c gives a share `probabilities[c]` of them."""
        rows = []
        for c, count in enumerate(shares(int(self.offsets[-1]), self.probabilities).tolist()):
            size = int(self.offsets[c + 1] - self.offsets[c])
            if count == 0:  # an empty corpus (probability 0) gives nothing
                continue
            passes = -(-count // size)  # shuffled passes over corpus c, the last one cut short
            keys = ([self.seed, epoch, c, p] for p in range(passes))
            order = [np.random.default_rng(key).permutation(size) for key in keys]
            rows.append(np.concatenate(order)[:count] + self.offsets[c])
        rng = np.random.default_rng([self.seed, epoch])
        return self.merged.batch(rng.permutation(np.concatenate(rows)), rng)


def shares(total: int, probabilities: np.ndarray) -> np.ndarray:
    """(C,) integers summing to `total` in proportion to probabilities: largest remainders."""
    exact = total * np.asarray(probabilities, dtype=np.float64)
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    counts[np.argsort(counts - exact, kind="stable")[:short]] += 1
    return counts


def _check_args(src: np.ndarray, tgt: np.ndarray, max_tokens: int, window: int) -> None:
    """Raise ValueError on inconsistent sampler arguments or a sentence over the budget."""
    if src.ndim != 1 or src.shape != tgt.shape:
        raise ValueError(
            f"src_lens and tgt_lens must be 1-D of equal length: {src.shape} vs {tgt.shape}"
        )
    if src.size and min(src.min(), tgt.min()) < 0:
        raise ValueError("sentence lengths must be non-negative")
    if max_tokens < 1 or window < 0:
        raise ValueError(f"need max_tokens >= 1 and window >= 0, got {max_tokens} and {window}")
    too_long = np.flatnonzero(np.maximum(src, tgt) + 1 > max_tokens)
    if too_long.size:
        i = int(too_long[0])
        raise ValueError(
            f"sentence {i} is too long: {max(src[i], tgt[i]) + 1} tokens with BOS/EOS "
            f"(source {src[i]}, target {tgt[i]}) exceeds max_tokens={max_tokens}"
        )


def sort_windows(
    order: np.ndarray, src_lens: np.ndarray, tgt_lens: np.ndarray, window: int
) -> np.ndarray:
    """Sort `order` within consecutive windows of `window` indices by (max side, src, -tgt).

    With the longer side fixed, ordering by src then descending tgt walks the pairs whose
    target is the longer side (src rising) and then those whose source is (tgt falling), so
    neighbours are close on BOTH sides and both padded tensors stay dense. lexsort is stable:
    ties keep the (shuffled) input order, which keeps batches random. Whole windows are
    sorted SORT_BLOCK indices at a time, so the temporaries do not grow with the corpus.
    """
    out = np.empty_like(order)
    block = window * max(1, SORT_BLOCK // window)  # whole windows
    for start in range(0, len(order), block):
        part = order[start : start + block]
        src, tgt = src_lens[part], tgt_lens[part]  # (P,) each, in `order`
        win_id = np.arange(len(part)) // window
        perm = np.lexsort((-tgt, src, np.maximum(src, tgt), win_id))
        out[start : start + len(part)] = part[perm]
    return out


def cut_batches(
    order: np.ndarray, widths: np.ndarray, window: int, max_tokens: int
) -> list[np.ndarray]:
    """Greedily cut `order` (widths ascending within each window) into budget-respecting batches.

    Widths rise within a window, so a batch's longest sentence is its last one and the
    batch starting at i can take n sentences iff n * widths[i + n - 1] <= max_tokens, a
    monotone test: one vectorised check per batch finds n. Batches never cross windows.
    """
    n_total = len(order)
    # n * widths[i + n - 1] <= max_tokens implies n <= max_tokens // widths[i]: bounds the slice,
    # as does the window; so no batch holds more than min(max_tokens, window) sentences.
    counts = np.arange(1, min(max_tokens, window) + 1, dtype=np.int64)
    cuts = []
    i = 0
    while i < n_total:
        window_end = min((i // window + 1) * window, n_total)
        cap = min(max_tokens // int(widths[i]), window_end - i)
        fits = counts[:cap] * widths[i : i + cap] <= max_tokens  # (cap,), a True prefix
        i += int(np.count_nonzero(fits))
        cuts.append(i)
    return np.split(order, cuts[:-1]) if cuts else []


def padding_efficiency(
    batches: Sequence[np.ndarray], src_lens: np.ndarray, tgt_lens: np.ndarray
) -> tuple[float, float]:
    """Mean over batches of non-pad / numel for the source and target tensors (1.0 if none)."""
    batches = [b for b in batches if len(b)]
    if not batches:
        return 1.0, 1.0
    idx = np.concatenate(batches)
    starts = np.cumsum([0] + [len(b) for b in batches[:-1]])
    sizes = np.array([len(b) for b in batches])
    effs = []
    for lens in (src_lens, tgt_lens):
        padded = np.asarray(lens, dtype=np.int64)[idx] + 1  # (sum B,) with EOS (or BOS)
        real = np.add.reduceat(padded, starts)
        effs.append(float(np.mean(real / (sizes * np.maximum.reduceat(padded, starts)))))
    return effs[0], effs[1]


def describe_epoch(data: EncodedCorpus | CorpusMix, sampler: BatchSampler | MixtureSampler) -> str:
    """E.g. `906 batches of <= 4096 tokens per epoch, 71.2% / 69.0% non-pad (source / target)`.

    `sampler` draws from `data`'s rows; "mixed batches" when they hold several corpora.
    """
    batches = sampler.epoch_batches(1)
    src_eff, tgt_eff = padding_efficiency(batches, data.src_lens, data.tgt_lens)
    mixed = isinstance(sampler, MixtureSampler) and sampler.mixed and len(sampler.samplers) > 1
    return (
        f"{len(batches):,} {'mixed ' if mixed else ''}batches of <= {sampler.max_tokens} tokens "
        f"per epoch, {src_eff:.1%} / {tgt_eff:.1%} non-pad (source / target)"
    )


@dataclass
class SourceBatch:
    """Source-only batch for translation: ids + EOS, right-padded, with corpus indices."""

    src: Tensor  # (B, S) long
    indices: np.ndarray  # (B,) int64 corpus indices, to restore input order after decoding
    src_tokens: int  # non-pad tokens in src


@dataclass
class Batch:
    """Training batch: source, decoder input and target tensors, right-padded with PAD_ID."""

    src: Tensor  # (B, S) long, ids + EOS
    tgt_in: Tensor  # (B, T) long, BOS + ids
    tgt_out: Tensor  # (B, T) long, ids + EOS
    indices: np.ndarray  # (B,) int64 corpus indices of the rows
    src_tokens: int  # non-pad tokens in src
    tgt_tokens: int  # non-pad tokens in tgt_out (= predicted tokens, for loss normalisation)

    def to(self, device: torch.device | str) -> Batch:
        """Copy the tensors to `device` (non-blocking; pin_memory() first for async H2D)."""
        src, tgt_in, tgt_out = (
            t.to(device, non_blocking=True) for t in (self.src, self.tgt_in, self.tgt_out)
        )
        return Batch(src, tgt_in, tgt_out, self.indices, self.src_tokens, self.tgt_tokens)

    def pin_memory(self) -> Batch:
        """Page-locked copy, so that to(cuda) overlaps with compute."""
        src, tgt_in, tgt_out = (t.pin_memory() for t in (self.src, self.tgt_in, self.tgt_out))
        return Batch(src, tgt_in, tgt_out, self.indices, self.src_tokens, self.tgt_tokens)


def _flatten(seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated ids (sum L,) and lengths (B,) of a list of id sequences."""
    lens = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    if not lens.sum():
        return np.zeros(0, dtype=np.int64), lens
    return np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs]), lens


def pad_with(seqs: Sequence[Sequence[int]], bos: bool, eos: bool) -> np.ndarray:
    """(B, max_len + bos + eos) int64 array: optional BOS, ids, optional EOS, then PAD_ID."""
    flat, lens = _flatten(seqs)
    width = int(lens.max(initial=0)) + bos + eos
    out = np.full((len(seqs), width), PAD_ID, dtype=np.int64)
    # Boolean-mask assignment fills row-major, matching the order of the concatenated ids.
    body = out[:, int(bos) :]
    body[np.arange(body.shape[1]) < lens[:, None]] = flat
    if bos:
        out[:, 0] = BOS_ID
    if eos:
        out[np.arange(len(seqs)), lens + bos] = EOS_ID
    return out


def collate(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], indices: np.ndarray) -> Batch:
    """Batch of (source ids, target ids) pairs without specials; adds EOS/BOS and pads."""
    srcs = [p[0] for p in pairs]
    tgts = [p[1] for p in pairs]
    src = pad_with(srcs, bos=False, eos=True)  # (B, S)
    tgt_in = pad_with(tgts, bos=True, eos=False)  # (B, T)
    tgt_out = pad_with(tgts, bos=False, eos=True)  # (B, T)
    return Batch(
        src=torch.from_numpy(src),
        tgt_in=torch.from_numpy(tgt_in),
        tgt_out=torch.from_numpy(tgt_out),
        indices=np.asarray(indices, dtype=np.int64),
        src_tokens=int(np.count_nonzero(src != PAD_ID)),
        tgt_tokens=int(np.count_nonzero(tgt_out != PAD_ID)),
    )


def collate_source(seqs: Sequence[Sequence[int]], indices: np.ndarray) -> SourceBatch:
    """Source-only batch for translation: ids + EOS, right-padded with PAD_ID."""
    src = pad_with(seqs, bos=False, eos=True)  # (B, S)
    return SourceBatch(
        src=torch.from_numpy(src),
        indices=np.asarray(indices, dtype=np.int64),
        src_tokens=int(np.count_nonzero(src != PAD_ID)),
    )


def source_batches(ids: Sequence[Sequence[int]], max_tokens: int) -> list[np.ndarray]:
    """Length-sorted token-budget batches of the non-empty sentences (indices into ids)."""
    return pair_batches(ids, [[] for _ in ids], max_tokens)


def pair_batches(
    src: Sequence[Sequence[int]], tgt: Sequence[Sequence[int]], max_tokens: int
) -> list[np.ndarray]:
    """Length-sorted token-budget batches of the pairs with a non-empty source (indices)."""
    todo = np.array([i for i, seq in enumerate(src) if seq], dtype=np.int64)
    if not todo.size:
        return []
    src_lens = np.array([len(src[i]) for i in todo], dtype=np.int64)
    tgt_lens = np.array([len(tgt[i]) for i in todo], dtype=np.int64)
    longest = int(np.maximum(src_lens, tgt_lens).max())
    budget = max(max_tokens, longest + 1)  # + EOS or BOS: the longest pair must fit alone
    sampler = BatchSampler(src_lens, tgt_lens, budget, shuffle=False)
    return [todo[batch] for batch in sampler.epoch_batches(1)]


# ---------------------------------------------------------------------------------------------
# Updates: what every rank trains on in one optimizer step.


@dataclass
class Update:
    """One optimizer update as one rank sees it: its micro-batches and where the epoch stands."""

    epoch: int  # the epoch the batches come from (1-based)
    done: int  # batches of that epoch consumed by all ranks together, this update included
    batches: list[Batch]  # this rank's micro-batches: update_freq or fewer (at an epoch's end)
    tokens: int  # target tokens (EOS included) of the whole update, over all ranks


def plan_updates(
    sampler: BatchSampler | MixtureSampler,
    data: EncodedCorpus | CorpusMix,
    start: tuple[int, int],
    max_epochs: int,
    update_freq: int,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[Update]:
    """This rank's updates from `start` = (epoch, batches of it already consumed) on.

    Each update takes the epoch's next update_freq * world_size batches and gives rank r every
    world_size-th of them from the r-th; the last update of an epoch may leave some ranks
    fewer (or none). An update never spans two epochs. Every rank computes the same sequence
    and the update's token count from the lengths alone, so no rank waits for another's.
    """
    epoch, done = start
    size = update_freq * world_size
    while not max_epochs or epoch <= max_epochs:
        batches = sampler.epoch_batches(epoch)
        for first in range(done, len(batches), size):
            chunk = batches[first : first + size]
            tokens = sum(int(sampler.tgt_lens[b].sum()) + len(b) for b in chunk)  # + EOS
            mine = [collate(data.pairs(b), b) for b in chunk[rank::world_size]]
            yield Update(epoch, first + len(chunk), mine, tokens)
        epoch, done = epoch + 1, 0


class Prefetcher(Generic[T]):
    """Iterates `items` in a background thread, up to `depth` items ahead of the consumer.

    Collating the next update on the training thread would leave the accelerator idle; a thread
    does it while the current step runs. `prepare` (e.g. pinning memory) runs in the thread too.
    An exception in the thread is raised by the consumer's next `next()`.
    """

    _END = object()

    def __init__(self, items: Iterator[T], depth: int = 2, prepare: Callable[[T], T] | None = None):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._fill, args=(items, prepare), daemon=True, name="mt-prefetch"
        )
        self._thread.start()

    def _fill(self, items: Iterator[T], prepare: Callable[[T], T] | None) -> None:
        try:
            for item in items:
                if not self._put(prepare(item) if prepare else item):
                    return
        except BaseException as exc:  # handed to the consumer, who raises it
            self._put(exc)
            return
        self._put(self._END)

    def _put(self, item: object) -> bool:
        """Queue `item` unless the consumer has closed; False once it has."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Prefetcher[T]:
        return self

    def __next__(self) -> T:
        item = self._queue.get()
        if item is self._END:
            self._queue.put(item)  # later calls end too
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop the thread (it may be blocked on a full queue) and wait for it."""
        self._stop.set()
        self._thread.join()
