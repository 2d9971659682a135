"""Tests for mt.tokenizer: SentencePiece training, loading, encoding and decoding."""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
from helpers.corpus import synthetic_pairs, write_corpus, write_multiway

from mt.config import TokenizerConfig
from mt.corpora import Corpus, open_corpus
from mt.errors import DataError, MtError
from mt.tokenizer import (
    _balanced,
    _sample,
    _texts,
    load_tokenizer,
    tokenizer_files,
    train_multilingual_tokenizer,
    train_tokenizer,
    unk_rate,
)
from mt.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID

ROOT = Path(__file__).resolve().parents[1]

# Byte fallback adds 256 byte pieces, so a byte-fallback vocabulary needs more than that.
VOCAB = 320


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """A few hundred synthetic training pairs."""
    return write_corpus(tmp_path_factory.mktemp("tiny") / "train", *synthetic_pairs())


@pytest.fixture(scope="session")
def unseen(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """A dev set with characters the training data never had (emoji, CJK)."""
    src = ["der hund 🐶 läuft", "katze 猫"]
    tgt = ["the dog 🐶 runs", "cat 猫 ✨"]
    return write_corpus(tmp_path_factory.mktemp("unseen") / "dev", src, tgt)


@pytest.fixture(scope="session")
def joint_dir(tiny: Corpus, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A joint BPE tokenizer trained on the tiny corpus."""
    directory = tmp_path_factory.mktemp("joint")
    train_tokenizer(tiny, directory, TokenizerConfig(vocab_size=VOCAB), seed=1)
    return directory


@pytest.fixture(scope="session")
def split_dir(tiny: Corpus, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Per-side unigram tokenizers trained on the tiny corpus."""
    directory = tmp_path_factory.mktemp("split")
    train_tokenizer(
        tiny, directory, TokenizerConfig(vocab_size=VOCAB, type="unigram", joint=False), seed=1
    )
    return directory


def test_special_ids_are_fixed(joint_dir: Path, split_dir: Path) -> None:
    for directory in (joint_dir, split_dir):
        tok = load_tokenizer(directory)
        for model in (tok.src, tok.tgt):
            assert [model.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]


def test_joint_has_one_file(joint_dir: Path) -> None:
    tok = load_tokenizer(joint_dir)
    assert tok.joint
    assert tok.paths == tokenizer_files(joint_dir, joint=True) == [joint_dir / "spm.model"]
    assert sorted(p.name for p in joint_dir.iterdir()) == ["spm.model"]  # no temp files left
    assert tok.src_vocab_size == tok.tgt_vocab_size == VOCAB


def test_per_side_has_two_files(split_dir: Path) -> None:
    tok = load_tokenizer(split_dir)
    assert not tok.joint
    assert [p.name for p in tok.paths] == ["spm.src.model", "spm.tgt.model"]
    assert tok.paths == tokenizer_files(split_dir, joint=False)
    assert tok.src_vocab_size == tok.tgt_vocab_size == VOCAB
    # Each side has only its own language's pieces.
    assert tok.src.piece_to_id("ä") != UNK_ID and tok.tgt.piece_to_id("ä") == UNK_ID


def test_a_tokenizer_knows_the_settings_it_was_trained_with(
    joint_dir: Path, split_dir: Path
) -> None:
    assert load_tokenizer(joint_dir).trained_with() == {
        "type": "bpe",
        "vocab_size": VOCAB,
        "character_coverage": 1.0,
        "byte_fallback": True,
    }
    assert load_tokenizer(split_dir).trained_with()["type"] == "unigram"


def test_a_tokenizer_loads_from_a_path_that_is_not_utf8(joint_dir: Path, tmp_path: Path) -> None:
    odd = tmp_path / os.fsdecode(b"bad\xffname")
    shutil.copytree(joint_dir, odd)
    assert load_tokenizer(odd).encode_src(["der hund"]) == load_tokenizer(joint_dir).encode_src(
        ["der hund"]
    )


def test_retraining_other_layout_removes_stale_files(tiny: Corpus, tmp_path: Path) -> None:
    train_tokenizer(tiny, tmp_path, TokenizerConfig(vocab_size=VOCAB, joint=False), seed=1)
    tok = train_tokenizer(tiny, tmp_path, TokenizerConfig(vocab_size=VOCAB, joint=True), seed=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spm.model"]
    assert load_tokenizer(tmp_path).joint and tok.joint


def test_round_trip(tiny: Corpus, joint_dir: Path, split_dir: Path) -> None:
    for directory in (joint_dir, split_dir):
        tok = load_tokenizer(directory)
        src, tgt = tiny.sources(), tiny.targets()
        assert tok.decode_tgt(tok.encode_tgt(tgt)) == tgt
        assert tok.src.decode(tok.encode_src(src)) == src
        assert "".join(tok.src.encode(src[0], out_type=str)).replace("▁", " ").strip() == src[0]
        assert "".join(tok.tgt.encode(tgt[0], out_type=str)).replace("▁", " ").strip() == tgt[0]


def test_encode_has_no_bos_eos_and_decode_skips_specials(tiny: Corpus, joint_dir: Path) -> None:
    tok = load_tokenizer(joint_dir)
    text = tiny.targets()[0]
    ids = tok.encode_tgt([text])[0]
    assert ids and not {PAD_ID, BOS_ID, EOS_ID} & set(ids)
    padded = [BOS_ID, *ids, EOS_ID, 17, PAD_ID, PAD_ID]  # anything after EOS is ignored
    assert tok.decode_tgt([padded, [PAD_ID, *ids, PAD_ID]]) == [text, text]


def test_decoded_lines_stay_one_line_each(joint_dir: Path) -> None:
    # Byte pieces may spell a line break: one line out per line in, as mt translate writes.
    tok = load_tokenizer(joint_dir)
    breaks = [tok.tgt.piece_to_id(f"<0x{b:02X}>") for b in b"\n\r"]
    assert tok.tgt.unk_id() not in breaks  # the tokenizer has byte pieces
    lines = tok.decode_lines([f"5 {breaks[0]} 6", str(breaks[1])], "tgt", "stdin")
    assert len(lines) == 2 and not any("\n" in line or "\r" in line for line in lines)
    assert lines == [" ".join(tok.decode_tgt([[5]]) + tok.decode_tgt([[6]])), " "]


def test_training_is_deterministic(tiny: Corpus, joint_dir: Path, tmp_path: Path) -> None:
    again = train_tokenizer(tiny, tmp_path, TokenizerConfig(vocab_size=VOCAB), seed=1)
    assert again.paths[0].read_bytes() == (joint_dir / "spm.model").read_bytes()
    assert again.fingerprint() == load_tokenizer(joint_dir).fingerprint()


SAMPLED_TRAINING = """
import sys
from mt.config import TokenizerConfig
from mt.corpora import open_corpus
from mt.tokenizer import train_tokenizer
corpus = open_corpus(sys.argv[1], "de", "en")
config = TokenizerConfig(vocab_size=int(sys.argv[3]), input_sentence_size=250)
train_tokenizer(corpus, sys.argv[2], config, seed=1)
"""


def test_sampled_training_is_deterministic_across_processes(tiny: Corpus, tmp_path: Path) -> None:
    # 600 sentences, a sample of 250: SentencePiece's own sampler gave another model in every
    # process; mt samples itself, with the seed.
    models = []
    for i in range(2):
        args = [sys.executable, "-c", SAMPLED_TRAINING, str(tiny.src_path.with_suffix("")),
                str(tmp_path / str(i)), str(VOCAB)]  # fmt: skip
        subprocess.run(args, check=True, cwd=ROOT, capture_output=True)
        models.append((tmp_path / str(i) / "spm.model").read_bytes())
    assert models[0] == models[1]


def test_sample_is_uniform_and_seeded() -> None:
    lines = [f"s{i}" for i in range(1000)]
    first = _sample(iter(lines), 100, seed=1)
    assert first == _sample(iter(lines), 100, seed=1)
    assert first != _sample(iter(lines), 100, seed=2)
    assert len(first) == len(set(first)) == 100 and set(first) <= set(lines)
    assert _sample(iter(lines[:50]), 100, seed=1) == lines[:50]  # fewer: all, in order
    # Every sentence is kept with probability 100/1000: over 300 samples, late and early
    # sentences alike (a reservoir that favoured the first lines would fail this).
    counts = collections.Counter(s for seed in range(300) for s in _sample(iter(lines), 100, seed))
    early = sum(counts[f"s{i}"] for i in range(100)) / 300  # expected 10 of the first 100
    late = sum(counts[f"s{i}"] for i in range(900, 1000)) / 300
    assert 9 < early < 11 and 9 < late < 11


def test_fingerprint_changes_with_vocab_size(tiny: Corpus, joint_dir: Path, tmp_path: Path) -> None:
    other = train_tokenizer(tiny, tmp_path, TokenizerConfig(vocab_size=VOCAB + 10), seed=1)
    assert other.fingerprint() != load_tokenizer(joint_dir).fingerprint()


def test_long_lines_train_the_tokenizer(tmp_path: Path) -> None:
    # Paragraphs of ~5,000 bytes each: SentencePiece's own limit (4,192) left every one out.
    words = ["ein hund", "eine katze", "ein haus", "der baum", "die straße"]
    long = [" ".join(words[(i + j) % 5] for j in range(500)) + " ." for i in range(20)]
    assert min(len(line.encode()) for line in long) > 4192
    corpus = write_corpus(tmp_path / "long", long, long)
    tok = train_tokenizer(
        corpus, tmp_path / "tok", TokenizerConfig(vocab_size=40, byte_fallback=False), seed=1
    )
    assert tok.src_vocab_size == 40 and tok.src.encode("ein", out_type=str) == ["▁ein"]
    blank = write_corpus(tmp_path / "blank", [" "] * 3, [" "] * 3)
    with pytest.raises(DataError) as err:
        train_tokenizer(
            blank, tmp_path / "tok2", TokenizerConfig(vocab_size=40, byte_fallback=False), seed=1
        )
    assert str(err.value) == (
        f"{blank.describe()}: no sentences to train the tokenizer on (SentencePiece skips empty "
        "lines and lines over 65,536 bytes)"
    )


def test_vocab_too_large_is_a_data_error(tiny: Corpus, tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        train_tokenizer(tiny, tmp_path / "tok", TokenizerConfig(vocab_size=5000), seed=1)
    assert str(err.value) == (
        f"tokenizer.vocab_size=5000 is too large for the corpus {tiny.describe()}: it yields at "
        "most 928 pieces; set a smaller tokenizer.vocab_size (<= 928)"
    )
    assert not (tmp_path / "tok").exists()


def test_vocab_too_small_for_the_alphabet(tiny: Corpus, tmp_path: Path) -> None:
    small = f"tokenizer.vocab_size=20 is too small for the corpus {tiny.describe()}"
    with pytest.raises(DataError) as err:
        train_tokenizer(tiny, tmp_path, TokenizerConfig(vocab_size=20), seed=1)
    assert str(err.value) == (
        f"{small}: its characters and 256 byte pieces alone need 282; set "
        "tokenizer.vocab_size >= 282, or tokenizer.byte_fallback=false (then the characters "
        "need 26)"
    )
    with pytest.raises(DataError) as err:
        train_tokenizer(tiny, tmp_path, TokenizerConfig(vocab_size=20, byte_fallback=False), seed=1)
    assert str(err.value) == (
        f"{small}: its characters alone need 26; set tokenizer.vocab_size >= 26 or lower "
        "tokenizer.character_coverage"
    )
    at_least = TokenizerConfig(vocab_size=20, byte_fallback=False, character_coverage=0.98)
    with pytest.raises(DataError) as err:  # the lowest coverage SentencePiece takes: no advice
        train_tokenizer(tiny, tmp_path, at_least, seed=1)
    assert str(err.value).endswith("its characters alone need 25; set tokenizer.vocab_size >= 25")


def test_corpus_error_surfaces_through_training(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "bad", ["ein hund", "eine katze"], ["a dog"])
    with pytest.raises(DataError, match=r"has 2 lines but .* has 1"):
        train_tokenizer(corpus, tmp_path / "tok", TokenizerConfig(vocab_size=VOCAB), seed=1)


def test_load_without_model_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no tokenizer found"):
        load_tokenizer(tmp_path)
    (tmp_path / "spm.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a SentencePiece model"):
        load_tokenizer(tmp_path)
    (tmp_path / "spm.model").write_bytes(b"")  # a copy cut short
    with pytest.raises(DataError) as err:
        load_tokenizer(tmp_path)
    assert str(err.value) == f"{tmp_path / 'spm.model'}: not a SentencePiece model (an empty file)"


def test_unk_rate_with_and_without_byte_fallback(
    tiny: Corpus, unseen: Corpus, joint_dir: Path, tmp_path: Path
) -> None:
    assert unk_rate(load_tokenizer(joint_dir), unseen) == (0.0, 0.0)
    assert unk_rate(load_tokenizer(joint_dir), tiny) == (0.0, 0.0)
    no_bytes = train_tokenizer(
        tiny, tmp_path, TokenizerConfig(vocab_size=100, byte_fallback=False), seed=1
    )
    src, tgt = unk_rate(no_bytes, unseen)
    assert 0 < src < 1 and 0 < tgt < 1


def test_multi30k_round_trip(multi30k: Path, tmp_path: Path) -> None:
    train = open_corpus(str(multi30k / "train"), "de", "en")
    dev = open_corpus(str(multi30k / "val"), "de", "en")
    tok = train_tokenizer(
        train, tmp_path, TokenizerConfig(vocab_size=8000, input_sentence_size=200_000), seed=1
    )
    assert tok.src_vocab_size == 8000
    # The model's own normalizer (NFKC, whitespace collapsed), with spaces left as spaces.
    normalizer = spm.SentencePieceNormalizer(
        model_file=str(tok.paths[0]), add_dummy_prefix=False, escape_whitespaces=False
    )
    texts = dev.sources() + dev.targets()
    decoded = tok.src.decode(tok.encode_src(texts))
    assert decoded == [normalizer.normalize(t) for t in texts]
    changed = sum(t != normalizer.normalize(t) for t in texts)
    print(f"multi30k dev: {len(texts)} round trips, {changed} changed by normalization")
    src_unk, tgt_unk = unk_rate(tok, dev)
    assert src_unk == tgt_unk == 0.0  # byte fallback: nothing is unknown
    print(f"multi30k dev unk rate: {src_unk:.4%} source, {tgt_unk:.4%} target")


# --- several languages ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def multiway(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny de/en corpus and a made-up fr, line-aligned (see write_multiway)."""
    return write_multiway(tmp_path_factory.mktemp("multiway"), ROOT / "tests" / "data" / "tiny")


def directions(root: Path, *pairs: str) -> list[Corpus]:
    """The training corpora of directions like "de-en" in a multi-way directory."""
    return [open_corpus(str(root / "train"), *pair.split("-")) for pair in pairs]


def test_one_tag_per_target_language_never_split(multiway: Path, tmp_path: Path) -> None:
    corpora = directions(multiway, "de-en", "en-de", "fr-en", "en-fr")
    config = TokenizerConfig(vocab_size=200, byte_fallback=False)
    tok = train_multilingual_tokenizer(corpora, tmp_path, config, seed=1, temperature=5.0)
    assert tok.tags == {"en": 4, "de": 5, "fr": 6}  # right after the special ids
    assert [tok.src.id_to_piece(i) for i in (4, 5, 6)] == [">>en<<", ">>de<<", ">>fr<<"]
    plain = tok.src.encode(["Ein mann sieht den see ."], out_type=int)[0]
    assert tok.encode_src(["Ein mann sieht den see .", ""], "fr") == [[6, *plain], []]
    # As text, a tag is one piece too: SentencePiece never splits a user-defined piece.
    assert ">>fr<<" in tok.src.encode(">>fr<< Ein mann", out_type=str)
    assert load_tokenizer(tmp_path).tags == tok.tags  # the model file records the languages
    with pytest.raises(MtError) as err:
        tok.encode_src(["Ein mann"])
    assert str(err.value) == "the model translates into en, de, fr: name the target language"
    with pytest.raises(MtError) as err:
        tok.encode_src(["Ein mann"], "cs")
    assert str(err.value) == "the model does not translate into 'cs' (only into en, de, fr)"


def test_one_target_language_has_no_tags(multiway: Path, tmp_path: Path) -> None:
    corpora = directions(multiway, "de-en", "fr-en")
    config = TokenizerConfig(vocab_size=120, byte_fallback=False, joint=False)
    tok = train_multilingual_tokenizer(corpora, tmp_path, config, seed=1, temperature=5.0)
    assert tok.tags == {} and not tok.joint
    assert tok.encode_src(["Ein mann"], "en") == tok.src.encode(["Ein mann"], out_type=int)


def test_single_pair_tokenizers_have_no_tags(joint_dir: Path, split_dir: Path) -> None:
    for directory in (joint_dir, split_dir):
        tok = load_tokenizer(directory)
        assert tok.tags == {}
        assert tok.encode_src(["ka to"], "en") == tok.encode_src(["ka to"])


def test_the_sample_is_balanced_by_temperature(tmp_path: Path) -> None:
    big, small = [f"gross {i}" for i in range(900)], [f"petit {i}" for i in range(100)]
    streams = {"de": [lambda: iter(big)], "fr": [lambda: iter(small)]}
    for temperature, size, want in ((1.0, 0, (900, 100)), (1e9, 2000, (500, 500))):
        sample = _balanced(streams, size, temperature, seed=1)
        counts = collections.Counter(s.split()[0] for s in sample)
        assert (counts["gross"], counts["petit"]) == want
    # T = 2: shares ~ sqrt(900) : sqrt(100) = 3 : 1 of 400; fr's 100 lines are all kept once.
    sample = _balanced(streams, 400, 2.0, seed=1)
    assert collections.Counter(s.split()[0] for s in sample) == {"gross": 300, "petit": 100}
    assert sorted(s for s in sample if s.startswith("petit")) == sorted(small)
    upsampled = _balanced(streams, 0, 1e9, seed=1)
    assert collections.Counter(upsampled)["petit 7"] == 5  # 500 from 100: every line 5 times


def test_a_shared_file_counts_once(multiway: Path) -> None:
    texts = _texts(directions(multiway, "de-en", "en-de", "fr-en"), (0, 1))
    assert {lang: len(streams) for lang, streams in texts.items()} == {"de": 1, "en": 1, "fr": 1}


def test_a_target_language_for_a_tokenizer_without_tags_is_refused(joint_dir: Path) -> None:
    tokenizer = load_tokenizer(joint_dir)
    assert tokenizer.tags == {}
    with pytest.raises(MtError) as err:
        tokenizer.encode_lines(["der hund"], "src", pieces=False, tgt_lang="fr")
    assert str(err.value) == (
        "--tgt-lang fr: this tokenizer has no language tags (its model has one target language)"
    )


def test_a_tokenizer_of_a_sample_says_so(
    tiny: Corpus, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sentences = 2 * sum(1 for _ in tiny.pairs())  # joint: both sides
    config = TokenizerConfig(vocab_size=VOCAB, input_sentence_size=sentences - 1)
    with caplog.at_level("INFO", logger="mt"):
        train_tokenizer(tiny, tmp_path / "sampled", config, seed=1)
        train_tokenizer(tiny, tmp_path / "whole", TokenizerConfig(vocab_size=VOCAB), seed=1)
    assert caplog.messages == [
        f"{tiny.describe()}: the joint tokenizer learns from a random {sentences - 1:,} of its "
        f"{sentences:,} sentences (tokenizer.input_sentence_size)"
    ]  # not for the whole corpus (the default takes up to 1,000,000)
