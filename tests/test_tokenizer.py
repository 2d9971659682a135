"""Tests for mt.tokenizer: SentencePiece training, loading, encoding and decoding."""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
from helpers.corpus import synthetic_pairs, write_corpus

from mt.config import TokenizerConfig
from mt.corpora import Corpus, open_corpus
from mt.errors import DataError
from mt.tokenizer import _sample, load_tokenizer, tokenizer_files, train_tokenizer, unk_rate
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


def test_vocab_too_large_is_a_data_error(tiny: Corpus, tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        train_tokenizer(tiny, tmp_path / "tok", TokenizerConfig(vocab_size=5000), seed=1)
    assert str(err.value) == (
        f"tokenizer.vocab_size=5000 is too large for the corpus {tiny.describe()}: it yields at "
        "most 928 pieces; set a smaller tokenizer.vocab_size (<= 928)"
    )
    assert not (tmp_path / "tok").exists()


def test_vocab_too_small_for_the_alphabet(tiny: Corpus, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"vocab_size=100 is too small .* need 282"):
        train_tokenizer(tiny, tmp_path, TokenizerConfig(vocab_size=100), seed=1)


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
