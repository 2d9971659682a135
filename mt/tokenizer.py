"""SentencePiece tokenizers: train them on a corpus, load them, encode and decode text.

The special ids are fixed project-wide (see ``mt.vocab``): pad=0, unk=1, bos=2, eos=3. Encoding
returns bare piece ids; adding BOS/EOS is the model's business.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property, partial
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import sentencepiece as spm
from sentencepiece.sentencepiece_model_pb2 import ModelProto, TrainerSpec

from mt.config import TokenizerConfig, temperature_shares
from mt.errors import DataError, MtError, first_line
from mt.files import atomic_write_bytes
from mt.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID, strip_specials

log = logging.getLogger("mt")

if TYPE_CHECKING:
    from mt.corpora import Corpus

JOINT_FILE = "spm.model"
SRC_FILE = "spm.src.model"
TGT_FILE = "spm.tgt.model"
# The trained model depends on the thread count, so it is fixed rather than taken from the
# machine: the same corpus and settings must give the same model bytes everywhere.
_NUM_THREADS = 4
# SentencePiece leaves longer lines out of training (its default, 4,192 bytes, left out whole
# paragraph-aligned corpora); the model's data.max_len filters pairs later anyway.
MAX_SENTENCE_BYTES = 65_536
_CHUNK = 10_000  # sentences encoded at once by unk_rate


TAG = ">>{}<<"  # the piece that asks for a target language: Marian's and OPUS-MT's convention
_TAG = re.compile(r">>([A-Za-z0-9_-]+)<<")
_LEADING_TAG = re.compile(r"\s*" + _TAG.pattern)  # a tag that starts a text
# What would break one line out per line in, in a decoded text: byte pieces can spell these.
LINE_BREAKS = str.maketrans({"\n": " ", "\r": " ", "\u2028": " ", "\u2029": " "})


def tag_piece(lang: str) -> str:
    """The reserved piece naming target language `lang`, e.g. ``>>fr<<``."""
    return TAG.format(lang)


def leading_tag(text: str) -> tuple[str | None, str]:
    """The language of the ``>>xx<<`` that starts `text` (after spaces) and the text after it;
    (None, text) when it starts with none."""
    found = _LEADING_TAG.match(text)
    return (found[1], text[found.end() :]) if found else (None, text)


@dataclass
class Tokenizer:
    """The source and target SentencePiece models (the same model when the vocabulary is joint).

    A multilingual model's source model has one piece per target language (``>>fr<<``), right
    after the special ids; a source sentence starts with the piece of the language wanted.
    """

    src: spm.SentencePieceProcessor
    tgt: spm.SentencePieceProcessor
    paths: list[Path]

    @cached_property
    def tags(self) -> dict[str, int]:
        """Target language -> its tag's id; empty for a model with one target language."""
        out = {}
        for i in range(EOS_ID + 1, self.src.vocab_size()):
            found = _TAG.fullmatch(self.src.id_to_piece(i))
            if found is None or self.src.is_byte(i) or self.src.is_control(i):
                break  # the user-defined pieces come first, then bytes and learned pieces
            out[found.group(1)] = i
        return out

    def tag_id(self, tgt_lang: str | None) -> int | None:
        """The id to put before a source for `tgt_lang` (None: the model has no tags)."""
        if not self.tags:
            return None
        if tgt_lang in self.tags:
            return self.tags[tgt_lang]
        known = ", ".join(self.tags)
        if tgt_lang is None:
            raise MtError(f"the model translates into {known}: name the target language")
        raise MtError(f"the model does not translate into {tgt_lang!r} (only into {known})")

    @property
    def joint(self) -> bool:
        """True when one model serves both languages."""
        return len(self.paths) == 1

    @property
    def src_vocab_size(self) -> int:
        """Number of source pieces, special ids included."""
        return self.src.vocab_size()

    @property
    def tgt_vocab_size(self) -> int:
        """Number of target pieces, special ids included."""
        return self.tgt.vocab_size()

    def trained_with(self) -> dict[str, object]:
        """The `tokenizer.*` settings the source model was trained with, read from the model."""
        spec = ModelProto.FromString(self.src.serialized_model_proto()).trainer_spec
        return {
            "type": TrainerSpec.ModelType.Name(spec.model_type).lower(),
            "vocab_size": spec.vocab_size,
            "character_coverage": round(spec.character_coverage, 6),  # stored as a float32
            "byte_fallback": spec.byte_fallback,
        }

    def fingerprint(self) -> str:
        """sha256 over the model file bytes: changes whenever the tokenizer changes."""
        digest = hashlib.sha256()
        for path in self.paths:
            data = path.read_bytes()
            # Length-prefixed so that two files can never hash like one concatenated file.
            digest.update(len(data).to_bytes(8, "little") + data)
        return digest.hexdigest()

    def encode_src(
        self, texts: list[str], tgt_lang: str | Sequence[str | None] | None = None
    ) -> list[list[int]]:
        """Source texts to piece ids, without BOS/EOS, after the tag of `tgt_lang` if any (one
        language for every text, or one per text).

        The tag is an id, not text: SentencePiece would put a "▁" piece before it. A text
        without pieces gets no tag, so blank lines stay blank.
        """
        ids = self.src.encode(texts, out_type=int)
        if not self.tags:  # one target language: no tags
            return ids
        langs = [tgt_lang] * len(ids) if tgt_lang is None or isinstance(tgt_lang, str) else tgt_lang
        return [
            [self.tag_id(lang), *seq] if seq else seq  # type: ignore[list-item]
            for seq, lang in zip(ids, langs, strict=True)
        ]

    def encode_tagged(self, lines: Sequence[str], tgt_lang: str | None) -> list[list[int]]:
        """encode_src of lines to translate: each after the tag it starts with (see
        own_targets), else that of `tgt_lang`."""
        texts, langs = self.own_targets(lines)
        return self.encode_src(texts, [lang or tgt_lang for lang in langs])

    def own_targets(self, lines: Sequence[str]) -> tuple[list[str], list[str | None]]:
        """Each line without the tag of a target language that starts it, and that language.

        A multilingual model's lines may name their own target (``>>fr<< text``, as Marian and
        OPUS-MT read them); the tag's text is not the source. Other lines, and every line of a
        model with one target language (whose text it is), come back as they are, with None.
        """
        texts, langs = list(lines), [None] * len(lines)
        if self.tags:
            for index, line in enumerate(lines):
                lang, rest = leading_tag(line)
                if lang in self.tags:
                    texts[index], langs[index] = rest, lang
        return texts, langs

    def encode_tgt(self, texts: list[str]) -> list[list[int]]:
        """Target texts to piece ids, without BOS/EOS."""
        return self.tgt.encode(texts, out_type=int)

    def decode_tgt(self, ids: list[list[int]]) -> list[str]:
        """Target ids to text; stops at the first EOS and ignores PAD and BOS."""
        return self.tgt.decode([strip_specials(seq) for seq in ids])

    def side(self, name: str) -> spm.SentencePieceProcessor:
        """The model of one side, "src" or "tgt"."""
        return self.src if name == "src" else self.tgt

    def vocabulary(self, side: str) -> list[str]:
        """The piece of every id of the "src" or "tgt" model, in id order."""
        processor = self.side(side)
        return [processor.id_to_piece(i) for i in range(processor.vocab_size())]

    def encode_lines(
        self, lines: list[str], side: str, pieces: bool, tgt_lang: str | None = None
    ) -> list[str]:
        """Each text as its space-separated ids (or pieces), without BOS/EOS: one line each.

        With `tgt_lang`, sources start with its tag, as the model reads them.
        """
        if tgt_lang is not None and not self.tags:
            raise MtError(
                f"--tgt-lang {tgt_lang}: this tokenizer has no language tags (its model has one "
                "target language)"
            )
        if tgt_lang is None:
            encoded = self.side(side).encode(lines, out_type=str if pieces else int)
            return [" ".join(map(str, row)) for row in encoded]
        if side != "src":
            raise MtError("--tgt-lang tags sources: it needs --side src")
        rows = self.encode_tagged(lines, tgt_lang)  # a line's own tag wins, as in mt translate
        return [
            " ".join(self.src.id_to_piece(i) if pieces else str(i) for i in row) for row in rows
        ]

    def decode_lines(self, lines: Iterable[str], side: str, name: str) -> list[str]:
        """Texts of lines of space-separated ids; DataError naming `name` and the line if bad.

        PAD, BOS and EOS are dropped (and the target side stops at EOS, as search output needs).
        """
        processor = self.side(side)
        size = processor.vocab_size()
        ids = []
        for number, line in enumerate(lines, start=1):
            tokens = line.split()
            bad = next((t for t in tokens if not _is_id(t, size)), None)
            if bad is not None:
                raise DataError(
                    f"{name}: line {number}: {bad!r} is not a piece id (expected integers "
                    f"from 0 to {size - 1}, separated by spaces)"
                )
            ids.append([int(t) for t in tokens])
        texts = self.decode_tgt(ids) if side == "tgt" else processor.decode(ids)
        return [text.translate(LINE_BREAKS) for text in texts]


def _is_id(text: str, size: int) -> bool:
    """Whether `text` is a piece id of a model of `size` pieces (ASCII digits only)."""
    return text.isascii() and text.isdigit() and int(text) < size


def tokenizer_files(directory: Path, joint: bool) -> list[Path]:
    """The model file(s) a tokenizer of this kind has in ``directory``."""
    directory = Path(directory)
    if joint:
        return [directory / JOINT_FILE]
    return [directory / SRC_FILE, directory / TGT_FILE]


def load_model_file(path: Path) -> Tokenizer:
    """One SentencePiece model file as the tokenizer of both sides."""
    model = _load_model(path)
    return Tokenizer(src=model, tgt=model, paths=[path])


def load_tokenizer(directory: Path) -> Tokenizer:
    """Load the joint model, or else the per-side pair, from ``directory``."""
    for joint in (True, False):
        paths = tokenizer_files(directory, joint)
        if all(p.is_file() for p in paths):
            models = [_load_model(p) for p in paths]
            return Tokenizer(src=models[0], tgt=models[-1], paths=paths)
    raise DataError(
        f"{directory}: no tokenizer found (expected {JOINT_FILE}, or {SRC_FILE} and {TGT_FILE})"
    )


def _load_model(path: Path) -> spm.SentencePieceProcessor:
    """Load one model file and check that it uses the project's special ids."""
    try:
        # From bytes: SentencePiece takes only UTF-8 file names, and a path need not be one.
        proto = path.read_bytes()
        if not proto:  # SentencePiece loads nothing from no bytes, and says nothing
            raise RuntimeError("an empty file")
        model = spm.SentencePieceProcessor(model_proto=proto)
    except (OSError, RuntimeError) as exc:
        raise DataError(f"{path}: not a SentencePiece model ({first_line(exc)})") from None
    ids = (model.pad_id(), model.unk_id(), model.bos_id(), model.eos_id())
    if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
        raise DataError(
            f"{path}: special ids pad/unk/bos/eos are {ids}, expected "
            f"{(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}; retrain the tokenizer"
        )
    return model


def train_tokenizer(
    corpus: Corpus, directory: Path, config: TokenizerConfig, seed: int
) -> Tokenizer:
    """Train joint or per-side SentencePiece models on the corpus; write them to ``directory``."""
    if config.joint:
        sides = {"joint": _joint_sentences(corpus)}
    else:
        sides = {"source": (s for s, _ in corpus.pairs()), "target": (t for _, t in corpus.pairs())}
    options = _options(config)
    models = [
        _train_one(corpus.describe(), side, sentences, seed, options)
        for side, sentences in sides.items()
    ]
    return _write_models(directory, config.joint, models)


def train_multilingual_tokenizer(
    corpora: Sequence[Corpus],
    directory: Path,
    config: TokenizerConfig,
    seed: int,
    temperature: float,
) -> Tokenizer:
    """One model for all the languages of `corpora` (or one per side), with a tag per target.

    Each language's share of the sample is proportional to its sentences^(1/temperature), as
    for the batches: a small language is repeated, a large one sampled. The tags are pieces
    SentencePiece never splits; with one target language there are none.
    """
    targets = list(dict.fromkeys(c.tgt_lang for c in corpora))
    tags = [tag_piece(lang) for lang in targets] if len(targets) > 1 else []
    size = config.input_sentence_size
    if config.joint:
        sides = {"joint": _balanced(_texts(corpora, (0, 1)), size, temperature, seed)}
    else:
        sides = {
            "source": _balanced(_texts(corpora, (0,)), size, temperature, seed),
            "target": _balanced(_texts(corpora, (1,)), size, temperature, seed),
        }
    where = " and ".join(c.describe() for c in corpora)
    models = []
    for side, sentences in sides.items():
        # The tags go where the source is read: the joint model, or the source model.
        options = {**_options(config), "input_sentence_size": 0}
        if side != "target" and tags:
            options["user_defined_symbols"] = tags
        models.append(_train_one(where, side, iter(sentences), seed, options))
    return _write_models(directory, config.joint, models)


def _options(config: TokenizerConfig) -> dict:
    """SentencePiece's training options for `config`, with mt's special ids."""
    return {
        "vocab_size": config.vocab_size,
        "model_type": config.type,
        "character_coverage": config.character_coverage,
        "byte_fallback": config.byte_fallback,
        "input_sentence_size": config.input_sentence_size,
        "max_sentence_length": MAX_SENTENCE_BYTES,
        "normalization_rule_name": "nmt_nfkc",
        "pad_id": PAD_ID,
        "unk_id": UNK_ID,
        "bos_id": BOS_ID,
        "eos_id": EOS_ID,
        "num_threads": _NUM_THREADS,
        "minloglevel": 2,  # SentencePiece logs every training step to stderr otherwise
    }


def _write_models(directory: Path, joint: bool, models: list[bytes]) -> Tokenizer:
    """Write the model bytes under their names in `directory` and load them."""
    paths = tokenizer_files(directory, joint)
    Path(directory).mkdir(parents=True, exist_ok=True)
    for path, model in zip(paths, models, strict=True):
        atomic_write_bytes(path, model)
    # Remove the other layout's files so that load_tokenizer can never pick up a stale model.
    for stale in tokenizer_files(directory, not joint):
        stale.unlink(missing_ok=True)
    return load_tokenizer(directory)


def _texts(corpora: Sequence[Corpus], sides: tuple[int, ...]) -> dict[str, list[Callable]]:
    """Language -> functions streaming its sentences, each (corpus, side) file once.

    A multi-way corpus used in several directions names the same file for a language in each:
    it is read once, so that it does not count twice.
    """
    out: dict[str, dict[tuple[str, str], Callable]] = {}
    for corpus in corpora:
        for side in sides:
            lang = (corpus.src_lang, corpus.tgt_lang)[side]
            stream = partial(_side, corpus, side)
            out.setdefault(lang, {}).setdefault((corpus.spec, lang), stream)
    return {lang: list(streams.values()) for lang, streams in out.items()}


def _side(corpus: Corpus, side: int) -> Iterator[str]:
    """The source (0) or target (1) sentences of a corpus."""
    return (pair[side] for pair in corpus.pairs())


def _balanced(
    languages: dict[str, list[Callable]], size: int, temperature: float, seed: int
) -> list[str]:
    """As many sentences as there are (at most `size`, if set); language l's share ~ n_l^(1/T)."""
    counts = {lang: sum(1 for f in streams for _ in f()) for lang, streams in languages.items()}
    total = min(size or math.inf, sum(counts.values()))
    shares = np.array(temperature_shares(list(counts.values()), temperature))
    quotas = np.round(total * shares).astype(int)
    out: list[str] = []
    for streams, n, quota in zip(languages.values(), counts.values(), quotas, strict=True):
        whole, rest = divmod(int(quota), max(n, 1))
        sentences = (s for f in streams for s in f())
        if whole:  # a small language, repeated: SentencePiece counts every copy
            every = list(sentences)
            out.extend(every * whole)
            sentences = iter(every)
        out.extend(_sample(sentences, rest, seed))
    return out


def _joint_sentences(corpus: Corpus) -> Iterator[str]:
    """Source and target sentences interleaved, for one model shared by both languages."""
    for src, tgt in corpus.pairs():
        yield src
        yield tgt


def _train_one(where: str, side: str, sentences: Iterator[str], seed: int, options: dict) -> bytes:
    """Train one model in memory and return its bytes; SentencePiece failures become DataErrors."""
    size = options["input_sentence_size"]
    feed = _Feed(sentences)
    if size:
        read = feed
        feed = _Feed(iter(_sample(read, size, seed)))
        if read.count > size:  # a model of a sample: say so, and where the setting is
            log.info(
                f"{where}: the {side} tokenizer learns from a random {size:,} of its "
                f"{read.count:,} sentences (tokenizer.input_sentence_size)"
            )
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    # The sample is drawn here: SentencePiece's own sampling gave a different model in every
    # new process for the same corpus and seed (sentencepiece 0.2).
    options = {**options, "input_sentence_size": 0}
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=feed, model_writer=model, **options)
    except RuntimeError as exc:
        if feed.error is not None:
            raise feed.error from None
        raise _training_error(where, side, options, str(exc)) from None
    return model.getvalue()


def _sample(sentences: Iterator[str], size: int, seed: int) -> list[str]:
    """A uniform random sample of `size` sentences (all of them if there are fewer).

    Reservoir sampling (Vitter's algorithm R): one pass, `size` sentences in memory.
    """
    rng = random.Random(seed)
    sample = list(islice(sentences, size))
    for seen, sentence in enumerate(sentences, start=size + 1):
        slot = rng.randrange(seen)  # keep the seen-th sentence with probability size / seen
        if slot < size:
            sample[slot] = sentence
    return sample


class _Feed:
    """An iterator that remembers the exception its source raised.

    SentencePiece turns any exception from the sentence iterator into a bare RuntimeError,
    which would hide a corpus DataError (file, line) from the user.
    """

    def __init__(self, sentences: Iterator[str]) -> None:
        self._sentences = sentences
        self.error: BaseException | None = None
        self.count = 0  # sentences given so far

    def __iter__(self) -> _Feed:
        return self

    def __next__(self) -> str:
        try:
            sentence = next(self._sentences)
            self.count += 1
            return sentence
        except StopIteration:
            raise
        except BaseException as exc:
            self.error = exc
            raise


def _training_error(corpus: str, side: str, options: dict, message: str) -> DataError:
    """A one-line DataError for SentencePiece's known training failures of `corpus`."""
    where = f"{corpus} ({side} side)" if side != "joint" else corpus
    vocab_size = options["vocab_size"]
    too_high = re.search(
        r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", message
    )
    if too_high:
        limit = too_high.group(1)
        return DataError(
            f"tokenizer.vocab_size={vocab_size} is too large for the corpus {where}: it yields at "
            f"most {limit} pieces; set a smaller tokenizer.vocab_size (<= {limit})"
        )
    too_low = re.search(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)", message)
    if too_low:
        need = int(too_low.group(1))
        small = f"tokenizer.vocab_size={vocab_size} is too small for the corpus {where}"
        if options["byte_fallback"]:
            return DataError(
                f"{small}: its characters and 256 byte pieces alone need {need}; set "
                f"tokenizer.vocab_size >= {need}, or tokenizer.byte_fallback=false (then the "
                f"characters need {need - 256})"
            )
        lower = (
            " or lower tokenizer.character_coverage" if options["character_coverage"] > 0.98 else ""
        )
        return DataError(
            f"{small}: its characters alone need {need}; set tokenizer.vocab_size >= {need}{lower}"
        )
    if "sentences_.empty()" in message or "all_chars_count" in message:
        return DataError(
            f"{where}: no sentences to train the tokenizer on (SentencePiece skips empty lines "
            f"and lines over {MAX_SENTENCE_BYTES:,} bytes)"
        )
    return DataError(f"{where}: tokenizer training failed ({first_line(message)})")


def unk_rate(tokenizer: Tokenizer, corpus: Corpus) -> tuple[float, float]:
    """Fraction of UNK pieces on the source and the target side of a (dev) corpus."""
    unk = np.zeros(2, dtype=np.int64)
    total = np.zeros(2, dtype=np.int64)
    pairs = corpus.pairs()
    while chunk := list(islice(pairs, _CHUNK)):
        sides = (
            tokenizer.src.encode([s for s, _ in chunk], out_type=int),  # without a tag
            tokenizer.encode_tgt([t for _, t in chunk]),
        )
        for side, ids in enumerate(sides):
            unk[side] += sum(seq.count(UNK_ID) for seq in ids)
            total[side] += sum(len(seq) for seq in ids)
    src, tgt = unk / np.maximum(total, 1)
    return float(src), float(tgt)


def describe_unk_rate(tokenizer: Tokenizer, corpus: Corpus) -> str:
    """E.g. ``unknown pieces 0.012% source, 0.000% target`` (see unk_rate)."""
    src, tgt = unk_rate(tokenizer, corpus)
    return f"unknown pieces {src:.3%} source, {tgt:.3%} target"
