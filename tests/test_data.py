"""Tests for mt.data: encoding, length filters, the Arrow cache and row retrieval."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from helpers.corpus import synthetic_pairs, write_corpus
from helpers.processes import dead_pid

from mt import data as data_module
from mt.config import DataConfig, TokenizerConfig
from mt.corpora import Corpus, open_corpus
from mt.data import (
    CorpusMix,
    EncodedCorpus,
    FilterStats,
    encode_corpus,
    length_filter,
    process_space,
    temp_prefix,
)
from mt.errors import DataError, MtError
from mt.tokenizer import Tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def rows(data: EncodedCorpus) -> list[tuple[list[int], list[int]]]:
    """All rows of an encoded corpus, in order."""
    return data.pairs(np.arange(len(data)))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """A few hundred synthetic pairs."""
    return write_corpus(tmp_path_factory.mktemp("tiny") / "train", *synthetic_pairs(300))


@pytest.fixture(scope="session")
def tok(tiny: Corpus, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """A joint BPE tokenizer trained on the tiny corpus."""
    return train_tokenizer(
        tiny, tmp_path_factory.mktemp("tok"), TokenizerConfig(vocab_size=320), seed=1
    )


@pytest.fixture(scope="session")
def tok2(tiny: Corpus, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """Another tokenizer (a different vocabulary size) on the same corpus."""
    return train_tokenizer(
        tiny, tmp_path_factory.mktemp("tok2"), TokenizerConfig(vocab_size=330), seed=1
    )


@pytest.fixture(scope="session")
def crafted(tok: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """Pairs built to hit each filter rule once or more, with max_len=10 and max_ratio=3."""
    target_words = synthetic_pairs(300)[1][0].split()  # no umlaut to split off, unlike source's
    singles = [w for w in target_words if len(tok.encode_src([w])[0]) == 1]
    assert singles, "need words that are one piece each"

    def words(n: int) -> str:
        return " ".join([singles[0]] * n)

    pairs = [
        (words(3), words(2)),  # kept
        (words(1), words(3)),  # kept: ratio exactly 3
        (words(10), words(10)),  # kept: exactly max_len
        ("", words(2)),  # empty
        (words(1), "   "),  # empty: whitespace only
        ("", words(12)),  # empty (and too long): the first reason counts
        (words(11), words(11)),  # too long
        (words(1), words(11)),  # too long (and bad ratio)
        (words(1), words(4)),  # bad ratio
    ]
    src, tgt = zip(*pairs, strict=True)
    return write_corpus(tmp_path_factory.mktemp("crafted") / "train", list(src), list(tgt))


def test_lengths_are_token_counts(tiny: Corpus, tok: Tokenizer, tmp_path: Path) -> None:
    data = encode_corpus(tiny, tok, tmp_path, DataConfig(), filter_lengths=False)
    src, tgt = tok.encode_src(tiny.sources()), tok.encode_tgt(tiny.targets())
    assert len(data) == len(src) == 300
    assert rows(data) == list(zip(src, tgt, strict=True))
    assert data.src_lens.tolist() == [len(s) for s in src]
    assert data.tgt_lens.tolist() == [len(t) for t in tgt]
    assert data.dataset.column_names == ["src_ids", "tgt_ids"]  # raw text is not kept


def test_filter_counts_each_reason(crafted: Corpus, tok: Tokenizer, tmp_path: Path) -> None:
    data = encode_corpus(
        crafted, tok, tmp_path, DataConfig(max_len=10, max_ratio=3.0), filter_lengths=True
    )
    assert data.stats == FilterStats(9, 3, 3, 2, 1, max_len=10, max_ratio=3.0)
    assert data.stats.describe() == (
        "kept 3 of 9 pairs (dropped: 3 empty, 2 over 10 tokens, 1 with length ratio over 3.0)"
    )
    kept = list(zip(crafted.sources()[:3], crafted.targets()[:3], strict=True))
    assert rows(data) == [(tok.encode_src([s])[0], tok.encode_tgt([t])[0]) for s, t in kept]
    assert data.src_lens.tolist() == [3, 1, 10] and data.tgt_lens.tolist() == [2, 3, 10]


def test_a_target_language_tag_counts_as_a_position_but_not_as_text() -> None:
    # Sources of 1, 3, 10 and 0 pieces of text, each non-empty one after its tag.
    src, tgt = np.array([2, 4, 11, 0]), np.array([4, 1, 10, 3])
    keep, stats = length_filter(src, tgt, (10, 3.0), tagged=True)
    # 4 > 3 x 1: a bad ratio; 3 = 3 x 1: kept; 11 positions > 10: too long; no text: empty.
    assert keep.tolist() == [False, True, False, False]
    assert stats == FilterStats(4, 1, 1, 1, 1, max_len=10, max_ratio=3.0)
    untagged = length_filter(src - (src > 0), tgt, (10, 3.0))[0]  # the bilingual run's pairs
    assert untagged.tolist() == [False, True, True, False]  # but for the tag's position


def test_describe_formats_thousands() -> None:
    stats = FilterStats(29000, 28950, 3, 40, 7, max_len=256, max_ratio=3.0)
    assert stats.describe() == (
        "kept 28,950 of 29,000 pairs "
        "(dropped: 3 empty, 40 over 256 tokens, 7 with length ratio over 3.0)"
    )


def test_unfiltered_keeps_everything(crafted: Corpus, tok: Tokenizer, tmp_path: Path) -> None:
    data = encode_corpus(
        crafted, tok, tmp_path, DataConfig(max_len=10, max_ratio=3.0), filter_lengths=False
    )
    assert data.stats.describe() == "kept 9 of 9 pairs (not filtered)"
    assert len(data) == 9
    assert data.src_lens.tolist() == [3, 1, 10, 0, 1, 0, 11, 1, 1]
    assert data.tgt_lens.tolist() == [2, 3, 10, 2, 0, 12, 11, 11, 4]


def test_cache_is_reused(
    tiny: Corpus, tok: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = encode_corpus(tiny, tok, tmp_path, DataConfig(), filter_lengths=True)
    entries = list(tmp_path.iterdir())
    assert len(entries) == 1  # only the final entry: no temporary or intermediate files
    assert {p.name for p in entries[0].iterdir()} == {
        "data-00000-of-00001.arrow",
        "dataset_info.json",
        "state.json",
        "lengths.npy",
        "stats.json",
    }

    def fail(self: Tokenizer, texts: list[str]) -> list[list[int]]:
        raise AssertionError("re-encoded a cached corpus")

    monkeypatch.setattr(Tokenizer, "encode_src", fail)
    second = encode_corpus(tiny, tok, tmp_path, DataConfig(), filter_lengths=True)
    assert rows(second) == rows(first) and second.stats == first.stats
    # Memory-mapped from the cache entry, not loaded into memory.
    assert [Path(f["filename"]).parent for f in second.dataset.cache_files] == entries


def test_a_damaged_cache_is_one_line(tiny: Corpus, tok: Tokenizer, tmp_path: Path) -> None:
    encode_corpus(tiny, tok, tmp_path, DataConfig(), filter_lengths=True)
    (entry,) = tmp_path.iterdir()
    arrow = entry / "data-00000-of-00001.arrow"
    data = bytearray(arrow.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 400] = b"\xff" * 400  # ids of -1, same size: only a check finds it
    arrow.write_bytes(bytes(data))
    with pytest.raises(DataError) as err:
        encode_corpus(tiny, tok, tmp_path, DataConfig(), filter_lengths=True)
    assert str(err.value) == (
        f"{entry}: damaged encoded-corpus cache (ids outside the vocabulary); delete it"
    )
    shutil.rmtree(entry)
    encode_corpus(tiny, tok, tmp_path, DataConfig(), filter_lengths=True)
    lengths = np.load(entry / "lengths.npy")
    lengths[1, -2:] = 0  # what zeroed bytes at the end of the file hold
    np.save(entry / "lengths.npy", lengths)
    with pytest.raises(DataError) as err:
        encode_corpus(tiny, tok, tmp_path, DataConfig(), filter_lengths=True)
    assert str(err.value) == (
        f"{entry}: damaged encoded-corpus cache (lengths.npy does not match the data); delete it"
    )
    np.save(entry / "lengths.npy", lengths[0])  # one row: was an IndexError
    with pytest.raises(DataError) as err:
        encode_corpus(tiny, tok, tmp_path, DataConfig(), filter_lengths=True)
    size = len(lengths[0])
    assert str(err.value) == (
        f"{entry}: unreadable encoded-corpus cache (lengths.npy holds ({size},), not (2, {size}))"
        "; delete it"
    )
    np.save(entry / "lengths.npy", lengths)
    (entry / "state.json").write_text("{}", encoding="utf-8")  # datasets raises a KeyError
    with pytest.raises(DataError, match=r"unreadable encoded-corpus cache \(.*\); delete it$"):
        encode_corpus(tiny, tok, tmp_path, DataConfig(), filter_lengths=True)


def test_cache_key_changes(tiny: Corpus, tok: Tokenizer, tok2: Tokenizer, tmp_path: Path) -> None:
    def entries() -> int:
        return len(list(tmp_path.iterdir()))

    encode_corpus(tiny, tok, tmp_path, DataConfig(), filter_lengths=True)
    encode_corpus(tiny, tok2, tmp_path, DataConfig(), filter_lengths=True)
    assert entries() == 2  # another tokenizer
    encode_corpus(tiny, tok, tmp_path, DataConfig(max_len=20), filter_lengths=True)
    assert entries() == 3  # another max_len
    encode_corpus(tiny, tok, tmp_path, DataConfig(max_ratio=2.0), filter_lengths=True)
    assert entries() == 4  # another max_ratio
    encode_corpus(tiny, tok, tmp_path, DataConfig(), filter_lengths=False)
    encode_corpus(tiny, tok, tmp_path, DataConfig(max_len=20), filter_lengths=False)
    assert entries() == 5  # unfiltered: the limits do not matter
    src, tgt = tiny.sources(), tiny.targets()
    changed = write_corpus(tmp_path.parent / "changed" / "train", [*src[:-1], "ka to"], tgt)
    data = encode_corpus(changed, tok, tmp_path, DataConfig(), filter_lengths=False)
    assert entries() == 6  # other content
    assert data.pairs(np.array([299]))[0][0] == tok.encode_src(["ka to"])[0]


def test_pairs_in_requested_order(tiny: Corpus, tok: Tokenizer, tmp_path: Path) -> None:
    data = encode_corpus(tiny, tok, tmp_path, DataConfig(), filter_lengths=False)
    order = np.array([5, 0, 299, 3, 3])
    src, tgt = tiny.sources(), tiny.targets()
    expected = [(tok.encode_src([src[i]])[0], tok.encode_tgt([tgt[i]])[0]) for i in order]
    assert data.pairs(order) == expected
    assert data.pairs(np.array([], dtype=np.int64)) == []
    with pytest.raises(IndexError):
        data.pairs(np.array([300]))


def test_parallel_encoding_matches(tok: Tokenizer, tmp_path: Path) -> None:
    # More than one Arrow record batch (1,000 rows each), so rows span several chunks.
    corpus = write_corpus(tmp_path / "big" / "train", *synthetic_pairs(2500, seed=1))
    one = encode_corpus(corpus, tok, tmp_path / "one", DataConfig(max_len=20), filter_lengths=True)
    two = encode_corpus(
        corpus, tok, tmp_path / "two", DataConfig(max_len=20, num_proc=2), filter_lengths=True
    )
    assert one.stats == two.stats and one.stats.too_long > 0 and one.stats.bad_ratio > 0
    everything = rows(one)
    assert everything == rows(two)
    assert np.array_equal(one.src_lens, two.src_lens)
    assert np.array_equal(one.tgt_lens, two.tgt_lens)
    order = np.random.default_rng(0).permutation(len(one))
    assert one.pairs(order) == [everything[i] for i in order]
    assert len(one.dataset.data.table.column("src_ids").chunks) > 1


def test_corpus_errors_are_data_errors(tok: Tokenizer, tmp_path: Path) -> None:
    mismatched = write_corpus(tmp_path / "bad" / "train", ["ka", "to"], ["ri"])
    with pytest.raises(DataError, match=r"has 2 lines but .* has 1"):
        encode_corpus(mismatched, tok, tmp_path / "cache", DataConfig(), filter_lengths=True)
    empty = write_corpus(tmp_path / "empty" / "train", [], [])
    with pytest.raises(DataError, match="no sentence pairs"):
        encode_corpus(empty, tok, tmp_path / "cache", DataConfig(), filter_lengths=True)
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-written is left


def test_temp_dirs_of_dead_encodings_are_removed_not_live_ones(
    tiny: Corpus, tok: Tokenizer, tmp_path: Path, caplog
) -> None:
    # A real process makes its temp directory as an encoding does, then is killed with -9.
    script = (
        "import sys, tempfile; from mt.data import temp_prefix; "
        "print(tempfile.mkdtemp(prefix=temp_prefix(), dir=sys.argv[1]), flush=True); "
        "sys.stdin.readline()"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    dead = Path(child.stdout.readline().strip())
    assert dead.parent == tmp_path  # not "" (a child that died): nothing goes in the checkout
    (dead / "raw").mkdir()
    (dead / "raw" / "part.arrow").write_bytes(b"half")
    child.kill()
    child.wait()  # reaped: its pid no longer exists
    live = Path(tempfile.mkdtemp(prefix=temp_prefix(), dir=tmp_path))  # this process's
    host, space = socket.gethostname(), process_space()
    other_host = tmp_path / f".tmp-{host}x-{child.pid}-abc"  # can't tell: another machine
    other_space = tmp_path / f".tmp-{host}~1-{child.pid}-abc"  # another container of this host
    unknown = tmp_path / ".tmp-k3j4h5"  # can't tell: no owner in the name
    for path in (other_host, other_space, unknown):
        path.mkdir()
    assert dead.name.startswith(f".tmp-{space}-{child.pid}-") and space.startswith(host)
    with caplog.at_level(logging.INFO, logger="mt"):
        encode_corpus(tiny, tok, tmp_path, DataConfig(), filter_lengths=True)
    assert not dead.exists()
    assert live.is_dir() and other_host.is_dir() and other_space.is_dir() and unknown.is_dir()
    assert f"{dead}: removed the temp directory of dead process {child.pid}" in [
        r.getMessage() for r in caplog.records
    ]


def test_a_temp_directory_that_cannot_be_removed_is_not_said_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pid = dead_pid()
    dead = tmp_path / f".tmp-{process_space()}-{pid}-abc"
    dead.mkdir()
    monkeypatch.setattr(data_module.shutil, "rmtree", lambda *args, **kwargs: None)  # read-only
    with caplog.at_level(logging.INFO, logger="mt"):
        data_module.remove_stale_temps(tmp_path)
    assert caplog.messages == [f"{dead}: could not remove the temp directory of dead process {pid}"]


def test_a_full_disk_under_the_cache_is_one_line(
    tiny: Corpus, tok: Tokenizer, small_fs, tmp_path: Path
) -> None:
    cache = small_fs.mount(tmp_path / "cache")
    small_fs.fill(cache)
    with pytest.raises(MtError, match=r"cannot write") as err:
        encode_corpus(tiny, tok, cache, DataConfig(), filter_lengths=True)
    assert re.fullmatch(
        rf"{cache}/[0-9a-f]{{64}}: cannot write \(No space left on device\)", str(err.value)
    )
    assert sorted(p.name for p in cache.iterdir()) == [".filler"]  # no entry, no temp dir


# --- several directions -------------------------------------------------------------------------


class Sized:
    """What CorpusMix reads of an EncodedCorpus, for `n` one-token pairs."""

    def __init__(self, n: int) -> None:
        self.src_lens = self.tgt_lens = np.ones(n, dtype=np.int32)
        self.stats = FilterStats(n + 1, n, 1, 0, 0, max_len=64, max_ratio=3.0)

    def __len__(self) -> int:
        return len(self.src_lens)


@pytest.mark.parametrize(
    ("weights", "temperature", "expected"),
    [([1, 1], 1.0, [0.9, 0.1]), ([1, 1], 2.0, [0.75, 0.25]), ([1, 3], 2.0, [0.5, 0.5])],
)
def test_corpus_probabilities_follow_size_temperature_and_weight(
    weights: list[float], temperature: float, expected: list[float]
) -> None:
    mix = CorpusMix({"de-en": Sized(900), "fr-en": Sized(100)}, weights, temperature)
    np.testing.assert_allclose(mix.probabilities(), expected)
    assert (len(mix), mix.stats.total, mix.stats.kept, mix.stats.empty) == (1000, 1002, 1000, 2)


def test_corpus_mix_numbers_rows_part_after_part(
    tiny: Corpus, tok: Tokenizer, tmp_path: Path
) -> None:
    forth = encode_corpus(tiny, tok, tmp_path, DataConfig(), filter_lengths=True)
    back = encode_corpus(
        open_corpus(tiny.spec, "en", "de"), tok, tmp_path, DataConfig(), filter_lengths=True
    )
    mix = CorpusMix({"de-en": forth, "en-de": back}, [1.0, 1.0], 5.0)
    n = len(forth)
    assert len(mix) == 2 * n and mix.src_lens.tolist() == [*forth.src_lens, *back.src_lens]
    (src, tgt), (src_back, tgt_back), second = mix.pairs(np.array([0, n, 1]))
    assert (src_back, tgt_back) == (tgt, src)  # the same pair, the other way
    assert [(src, tgt), second] == forth.pairs(np.array([0, 1]))
