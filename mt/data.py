"""Encoded corpora: token ids in a memory-mapped Arrow cache, with length filters for training data.

A corpus is encoded once per (corpus content, tokenizer, filter settings) and cached under
``cache_dir/<key>/`` as a ``datasets`` directory (columns ``src_ids``, ``tgt_ids``) plus the
length table (``lengths.npy``) and the filter statistics (``stats.json``, written last).
Encoding happens in ``cache_dir/.tmp-<host>-<pid>-<random>/``; one left by a process that died
(kill -9) is removed by the next encode on the same host, never one of a live process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets.exceptions import DatasetGenerationError

from mt.config import temperature_shares
from mt.errors import DataError, MtError, first_line
from mt.files import atomic_write_bytes, write_errors
from mt.lock import pid_alive
from mt.tokenizer import leading_tag, unk_rate

if TYPE_CHECKING:
    from mt.config import DataConfig
    from mt.corpora import Corpus
    from mt.tokenizer import Tokenizer

# Bumped whenever the cached layout or the encoding recipe changes, so old caches are not reused.
FORMAT_VERSION = 3
STATS_FILE = "stats.json"
LENGTHS_FILE = "lengths.npy"
DATA_FILE = "data.json"  # a run's corpus statistics, for its report
_RAW = datasets.Features({"src": datasets.Value("string"), "tgt": datasets.Value("string")})
_IDS = datasets.Features(
    {
        "src_ids": datasets.List(datasets.Value("int32")),
        "tgt_ids": datasets.List(datasets.Value("int32")),
    }
)

log = logging.getLogger("mt")


@dataclass(frozen=True)
class FilterStats:
    """How many pairs a corpus had, how many were kept, and why the others were dropped."""

    total: int
    kept: int
    empty: int
    too_long: int
    bad_ratio: int
    max_len: int | None = None  # None: the corpus was not filtered (dev/test data)
    max_ratio: float | None = None

    def describe(self) -> str:
        """E.g. ``kept 28,950 of 29,000 pairs (dropped: 3 empty, 40 over 256 tokens, ...)``."""
        kept = f"kept {self.kept:,} of {self.total:,} pairs"
        if self.max_len is None:
            return f"{kept} (not filtered)"
        return (
            f"{kept} (dropped: {self.empty:,} empty, {self.too_long:,} over {self.max_len} "
            f"tokens, {self.bad_ratio:,} with length ratio over {self.max_ratio})"
        )


@dataclass
class EncodedCorpus:
    """Token ids of a parallel corpus, memory-mapped from an Arrow cache; lengths in memory."""

    dataset: datasets.Dataset  # columns src_ids, tgt_ids (list<int32>), memory-mapped
    src_lens: np.ndarray  # (N,) token counts without special tokens
    tgt_lens: np.ndarray
    stats: FilterStats
    key: str = ""  # the cache entry's name: a digest of the text, tokenizer and filters
    _views: _ListViews = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._views = _ListViews(self.dataset)

    def __len__(self) -> int:
        return len(self.src_lens)

    def pairs(self, indices: np.ndarray) -> list[tuple[list[int], list[int]]]:
        """The (source ids, target ids) of the given rows, in the given order."""
        return self._views.rows(np.asarray(indices, dtype=np.int64))

    def describe_tokens(self) -> str:
        """E.g. ``377,534 source and 372,454 target tokens``."""
        return describe_tokens(self.src_lens, self.tgt_lens)


class _ListViews:
    """Zero-copy numpy views of the two list columns, chunk by chunk, over the memory map.

    Slicing these views skips what ``dataset[indices]`` does for every batch: an Arrow
    ``take`` and a conversion through Python dicts (docs/benchmarks.md has the timings).
    """

    def __init__(self, dataset: datasets.Dataset) -> None:
        # Rows are addressed in table order; a dataset with an indices mapping would break that.
        if dataset._indices is not None:
            raise ValueError("expected a dataset without an indices mapping (as saved to disk)")
        table = dataset.data.table
        self.columns = [_chunk_views(table.column(name)) for name in ("src_ids", "tgt_ids")]
        sizes = [len(chunk) for chunk in table.column("src_ids").chunks]
        self.starts = np.cumsum([0, *sizes])

    def rows(self, indices: np.ndarray) -> list[tuple[list[int], list[int]]]:
        """Rows by global index: find each row's chunk, then slice its values by offsets."""
        if len(indices) and (indices.min() < 0 or indices.max() >= self.starts[-1]):
            raise IndexError(f"row index out of range for {self.starts[-1]} rows")
        chunks = np.searchsorted(self.starts, indices, side="right") - 1
        local = (indices - self.starts[chunks]).tolist()
        (src_off, src_val), (tgt_off, tgt_val) = self.columns
        out = []
        for c, i in zip(chunks.tolist(), local, strict=True):
            so, to = src_off[c], tgt_off[c]
            out.append(
                (src_val[c][so[i] : so[i + 1]].tolist(), tgt_val[c][to[i] : to[i + 1]].tolist())
            )
        return out


def _chunk_views(column: pa.ChunkedArray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(offsets, values) numpy views per chunk of a list<int32> ChunkedArray; no copies."""
    offsets = [chunk.offsets.to_numpy(zero_copy_only=True) for chunk in column.chunks]
    values = [chunk.values.to_numpy(zero_copy_only=True) for chunk in column.chunks]
    return offsets, values


@dataclass
class CorpusMix:
    """The training corpora of a run's directions seen as one: rows numbered part after part.

    With one direction it is that corpus. Part i is drawn with probability proportional to
    weight_i * pairs_i^(1 / temperature) (Arivazhagan et al. 2019): T = 1 samples as the data
    comes, larger T moves towards uniform, so small directions are not drowned.
    """

    parts: dict[str, EncodedCorpus]  # direction (e.g. de-en) -> its encoded training corpus
    weights: list[float]  # per part, from the config
    temperature: float

    def __post_init__(self) -> None:
        self.offsets = np.cumsum([0, *(len(p) for p in self.parts.values())])  # (C + 1,)
        parts = list(self.parts.values())
        self.src_lens = np.concatenate([p.src_lens for p in parts])  # (N,) over all parts
        self.tgt_lens = np.concatenate([p.tgt_lens for p in parts])
        counts = ("total", "kept", "empty", "too_long", "bad_ratio")
        self.stats = FilterStats(
            *(sum(getattr(p.stats, key) for p in parts) for key in counts),
            max_len=parts[0].stats.max_len,
            max_ratio=parts[0].stats.max_ratio,
        )

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def fingerprint(self) -> str:
        """A digest of every part's text, tokenizer and filters: changes when the data do."""
        keys = "\n".join(f"{name} {part.key}" for name, part in self.parts.items())
        return hashlib.sha256(keys.encode()).hexdigest()

    def probabilities(self) -> np.ndarray:
        """(C,) the share of the sentences an epoch draws from each part."""
        sizes = [len(p) for p in self.parts.values()]
        return np.array(temperature_shares(sizes, self.temperature, self.weights))

    def pairs(self, indices: np.ndarray) -> list[tuple[list[int], list[int]]]:
        """The (source ids, target ids) of the given rows, in the given order."""
        indices = np.asarray(indices, dtype=np.int64)
        which = np.searchsorted(self.offsets, indices, side="right") - 1  # part of each row
        out: list[tuple[list[int], list[int]]] = [([], [])] * len(indices)
        for part in np.unique(which).tolist():
            rows = np.flatnonzero(which == part)
            local = indices[rows] - self.offsets[part]
            corpus = list(self.parts.values())[part]
            for row, pair in zip(rows.tolist(), corpus.pairs(local), strict=True):
                out[row] = pair
        return out

    def describe_tokens(self) -> str:
        """E.g. ``377,534 source and 372,454 target tokens``."""
        return describe_tokens(self.src_lens, self.tgt_lens)


def describe_tokens(src_lens: np.ndarray, tgt_lens: np.ndarray) -> str:
    """E.g. ``377,534 source and 372,454 target tokens``."""
    return f"{int(src_lens.sum()):,} source and {int(tgt_lens.sum()):,} target tokens"


def cache_key(
    corpus_fingerprint: str,
    tokenizer_fingerprint: str,
    filter: bool,
    max_len: int,
    max_ratio: float,
) -> str:
    """sha256 naming the cache entry of one corpus encoded with one tokenizer and filter."""
    limits = {"max_len": max_len, "max_ratio": float(max_ratio)} if filter else {}
    # The limits are left out when not filtering, so dev/test caches survive a max_len change.
    recipe = {
        "format": FORMAT_VERSION,
        "corpus": corpus_fingerprint,
        "tokenizer": tokenizer_fingerprint,
        "filter": filter,
        **limits,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def encode_corpus(
    corpus: Corpus,
    tokenizer: Tokenizer,
    cache_dir: Path,
    settings: DataConfig,
    *,
    filter_lengths: bool,
) -> EncodedCorpus:
    """Encode a corpus, or load it from the cache; with `filter_lengths`, drop the pairs that
    `settings` (data.max_len, data.max_ratio) rule out. data.num_proc processes encode."""
    max_len, max_ratio = settings.max_len, settings.max_ratio
    key = cache_key(
        corpus.fingerprint(), tokenizer.fingerprint(), filter_lengths, max_len, max_ratio
    )
    target = Path(cache_dir) / key
    remove_stale_temps(Path(cache_dir))
    if (target / STATS_FILE).is_file():
        log.info("%s: reused the cached encoding in %s", corpus.describe(), target)
    else:
        limits = (max_len, max_ratio) if filter_lengths else None
        _build(corpus, tokenizer, target, limits, settings.num_proc)
        log.info("%s: encoded and cached in %s", corpus.describe(), target)
    encoded = load_encoded(target)
    _check_ids(encoded, tokenizer, target)
    return encoded


def _check_ids(encoded: EncodedCorpus, tokenizer: Tokenizer, directory: Path) -> None:
    """DataError if a cached id is outside the vocabulary, or the length table is not the
    data's (batching plans from it): the cache was damaged since."""
    src_lens, tgt_lens = _lengths(encoded.dataset)
    if not (
        np.array_equal(src_lens, encoded.src_lens) and np.array_equal(tgt_lens, encoded.tgt_lens)
    ):
        raise DataError(
            f"{directory}: damaged encoded-corpus cache ({LENGTHS_FILE} does not match the "
            "data); delete it"
        )
    table = encoded.dataset.data.table
    sizes = {"src_ids": tokenizer.src_vocab_size, "tgt_ids": tokenizer.tgt_vocab_size}
    for column, size in sizes.items():
        bounds = pc.min_max(pc.list_flatten(table.column(column)))
        low, high = bounds["min"].as_py(), bounds["max"].as_py()
        if low is not None and (low < 0 or high >= size):
            raise DataError(
                f"{directory}: damaged encoded-corpus cache (ids outside the vocabulary); delete it"
            )


def load_encoded(directory: Path) -> EncodedCorpus:
    """Open one cache entry: the Arrow data memory-mapped, lengths and stats in memory."""
    try:
        dataset = datasets.load_from_disk(str(directory))
        lengths = np.load(directory / LENGTHS_FILE)
        stats = FilterStats(**json.loads((directory / STATS_FILE).read_text(encoding="utf-8")))
        if lengths.shape != (2, len(dataset)):
            raise ValueError(f"{LENGTHS_FILE} holds {lengths.shape}, not (2, {len(dataset)})")
    except Exception as exc:  # datasets raises many types (KeyError for a damaged state.json)
        raise DataError(
            f"{directory}: unreadable encoded-corpus cache ({first_line(exc)}); delete it"
        ) from None
    return EncodedCorpus(dataset, lengths[0], lengths[1], stats, key=directory.name)


TEMP_PREFIX = ".tmp-"


def temp_prefix() -> str:
    """This process's prefix for temp directories: the owner to check before removing one."""
    return f"{TEMP_PREFIX}{process_space()}-{os.getpid()}-"


def process_space() -> str:
    """Where this process's id means this process: the host, and its PID namespace where it
    has one (containers that share the host's name, as with host networking, each have their
    own process ids, so a live encoding of one is dead to the other's check)."""
    host = socket.gethostname()
    try:
        return f"{host}~{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:  # not Linux
        return host


def remove_stale_temps(cache_dir: Path) -> None:
    """Remove temp directories that encodings killed on this host left in `cache_dir`.

    A directory whose process still runs is kept, and so is one of another host or PID
    namespace (a cache on a shared file system, another container) or with a name of another
    form: nothing proves that it is dead.
    """
    space = process_space()
    for path in sorted(Path(cache_dir).glob(f"{TEMP_PREFIX}*")):
        # host (it may hold "-") and namespace, pid, tempfile's random suffix (never a "-")
        parts = path.name[len(TEMP_PREFIX) :].rsplit("-", 2)
        if len(parts) != 3 or parts[0] != space or not parts[1].isdigit():
            continue
        if path.is_dir() and not pid_alive(int(parts[1])):
            shutil.rmtree(path, ignore_errors=True)  # a read-only cache keeps it: said so
            done = "could not remove" if path.exists() else "removed"
            log.info("%s: %s the temp directory of dead process %s", path, done, parts[1])


def _build(
    corpus: Corpus,
    tokenizer: Tokenizer,
    target: Path,
    limits: tuple[int, float] | None,
    num_proc: int,
) -> None:
    """Encode into a temporary directory beside ``target``, then move the result into place."""
    # The cache's first write: a read-only cache (its complete entries read fine) is refused
    # here, in one line, before any encoding.
    with write_errors(target.parent):
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = tempfile.TemporaryDirectory(dir=target.parent, prefix=temp_prefix())
    # Every intermediate Arrow file lives in this directory and goes with it.
    with temp as tmp, write_errors(target, Path(tmp)):
        with _quiet_datasets():
            encoded = _encode(corpus, tokenizer, Path(tmp), target.name, num_proc)
            src_lens, tgt_lens = _lengths(encoded)
            tagged = bool(tokenizer.tags)  # encode_src puts a tag before every source
            keep, stats = length_filter(src_lens, tgt_lens, limits, tagged)
            if stats.kept < stats.total:
                encoded = _select_rows(encoded, np.flatnonzero(keep), f"{target.name[:32]}-kept")
            final = Path(tmp) / "final"
            encoded.save_to_disk(str(final))
        np.save(final / LENGTHS_FILE, np.stack([src_lens[keep], tgt_lens[keep]]))
        # Written last: its presence marks a complete entry.
        (final / STATS_FILE).write_text(json.dumps(asdict(stats)), encoding="utf-8")
        try:
            os.replace(final, target)
        except OSError:
            # Another process finished the same entry first (a non-empty target cannot be replaced).
            if not (target / STATS_FILE).is_file():
                raise


def _encode(
    corpus: Corpus, tokenizer: Tokenizer, tmp: Path, key: str, num_proc: int
) -> datasets.Dataset:
    """Stream the raw pairs to Arrow, then encode both sides in batches (in parallel if asked)."""
    # datasets cannot build an empty dataset, and an empty corpus is a mistake anyway.
    if next(iter(corpus.pairs()), None) is None:
        raise DataError(f"{corpus.describe()}: no sentence pairs")
    try:
        raw = datasets.Dataset.from_generator(
            _raw_pairs,
            features=_RAW,
            cache_dir=str(tmp / "raw"),
            gen_kwargs={"corpus": corpus},
            fingerprint=f"{key[:32]}-raw",  # skips hashing the generator; the key identifies it
        )
    except DatasetGenerationError as exc:
        # datasets wraps the corpus's own one-line error (file, line); show that instead.
        if isinstance(exc.__cause__, MtError):
            raise exc.__cause__ from None
        raise
    # The tokenizer travels to worker processes by pickling; SentencePiece pickles its model.
    return raw.map(
        _encode_batch,
        batched=True,
        num_proc=num_proc if num_proc > 1 else None,
        fn_kwargs={"tokenizer": tokenizer, "tgt_lang": corpus.tgt_lang},
        remove_columns=["src", "tgt"],
        features=_IDS,
        cache_file_name=str(tmp / "ids.arrow"),
        new_fingerprint=f"{key[:32]}-ids",
        load_from_cache_file=False,
    )


def _select_rows(dataset: datasets.Dataset, rows: np.ndarray, fingerprint: str) -> datasets.Dataset:
    """``dataset.select(rows)`` with the row indices kept in numpy: 8 bytes a row.

    ``Dataset.select`` turns an index array into a Python list first, a numpy scalar of about
    40 bytes per row; this builds the same indices mapping directly (docs/scaling.md, section 3).
    """
    # Row numbers are non-negative, so viewing them as uint64 (what datasets needs) copies nothing.
    indices = pa.table({"indices": pa.array(rows.astype(np.int64, copy=False).view(np.uint64))})
    return datasets.Dataset(
        dataset.data,
        info=dataset.info,
        split=dataset.split,
        indices_table=indices,
        fingerprint=fingerprint,
    )


def _raw_pairs(corpus: Corpus) -> Iterator[dict[str, str]]:
    """The corpus's pairs as rows for ``Dataset.from_generator``."""
    for src, tgt in corpus.pairs():
        yield {"src": src, "tgt": tgt}


def _encode_batch(
    batch: dict[str, list[str]], tokenizer: Tokenizer, tgt_lang: str
) -> dict[str, list[list[int]]]:
    """Encode one batch of raw pairs (sources after the tag of `tgt_lang`, if there are tags)."""
    src = _without_own_tag(batch["src"], tgt_lang) if tokenizer.tags else batch["src"]
    return {
        "src_ids": tokenizer.encode_src(src, tgt_lang),
        "tgt_ids": tokenizer.encode_tgt(batch["tgt"]),
    }


def _without_own_tag(texts: list[str], tgt_lang: str) -> list[str]:
    """The texts without a leading tag of `tgt_lang` (a pre-tagged corpus, as OPUS-MT's are).

    `mt translate` reads such a tag as the target language, not as text, so the model must be
    trained on what follows it; a tag naming another language stays, as text.
    """
    out = []
    for text in texts:
        lang, rest = leading_tag(text)
        out.append(rest if lang == tgt_lang else text)
    return out


def _lengths(dataset: datasets.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Token counts per row, read from the Arrow list offsets (no Python lists)."""
    table = dataset.data.table
    return tuple(
        pc.list_value_length(table.column(name)).to_numpy().astype(np.int32)
        for name in ("src_ids", "tgt_ids")
    )


def length_filter(
    src_lens: np.ndarray,
    tgt_lens: np.ndarray,
    limits: tuple[int, float] | None,
    tagged: bool = False,
) -> tuple[np.ndarray, FilterStats]:
    """Keep mask and counts; a dropped pair counts under its first reason: empty, long, ratio.

    `tagged`: each non-empty source starts with a target-language tag, which takes a position
    (max_len counts it) but is not text (emptiness and the length ratio leave it out), so every
    direction of a multi-way corpus keeps the pairs a bilingual run would.
    """
    total = len(src_lens)
    if limits is None:
        return np.ones(total, dtype=bool), FilterStats(total, total, 0, 0, 0)
    max_len, max_ratio = limits
    src_text = src_lens - (src_lens > 0) if tagged else src_lens
    shorter, longer = np.minimum(src_text, tgt_lens), np.maximum(src_text, tgt_lens)
    # Blank or whitespace-only text normalizes to no tokens at all.
    empty = shorter == 0
    too_long = ~empty & (np.maximum(src_lens, tgt_lens) > max_len)
    # A pair within max_len passes any ratio above it: the cap keeps the product finite.
    bad_ratio = ~empty & ~too_long & (longer > min(max_ratio, max_len) * shorter)
    keep = ~(empty | too_long | bad_ratio)
    counts = [int(m.sum()) for m in (keep, empty, too_long, bad_ratio)]
    return keep, FilterStats(total, *counts, max_len=max_len, max_ratio=float(max_ratio))


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Hide the progress bars of ``datasets`` (the caller reports what was done)."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _train_counts(data: EncodedCorpus | CorpusMix) -> dict[str, Any]:
    """Filter counts and kept source / target tokens of (some) training data."""
    return {
        "train": asdict(data.stats),
        "train_src_tokens": int(data.src_lens.sum()),
        "train_tgt_tokens": int(data.tgt_lens.sum()),
    }


def write_data_stats(
    run_dir: Path, train: CorpusMix, tokenizer: Tokenizer, valid: dict[str, Corpus]
) -> dict[str, Any]:
    """Save the training filter counts and token totals, in all and per direction, with the unk
    rate of each direction's dev set."""
    directions = {name: _train_counts(part) for name, part in train.parts.items()}
    for name, corpus in valid.items():
        directions[name]["valid_unk_rate"] = list(unk_rate(tokenizer, corpus))
    stats: dict[str, Any] = {
        **_train_counts(train),
        "src_vocab": tokenizer.src_vocab_size,
        "tgt_vocab": tokenizer.tgt_vocab_size,
        "directions": directions,
    }
    text = json.dumps(stats, indent=2) + "\n"
    atomic_write_bytes(Path(run_dir) / DATA_FILE, text.encode("utf-8"))
    return stats
