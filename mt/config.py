"""Typed run configuration: YAML files and dotted overrides, validated at load.

Every default lives here, in one place, with a one-line doc per field. A run's config has
five sections (`data`, `tokenizer`, `model`, `train`, `decode`) and a `run_dir`. Errors name
the file (or the command line) and the key, e.g.
`configs/x.yaml: model.heads=7 does not divide model.dim=512`.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mt.errors import ConfigError
from mt.files import atomic_write_bytes

DEVICE_NAMES = r"auto|cpu|cuda(:\d+)?"  # train.device and --device: the devices mt runs on

CONFIG_FILE = "config.yaml"  # the resolved config inside a run directory
LengthPenalty = Literal["gnmt", "average", "none"]
LENGTH_PENALTIES = typing.get_args(LengthPenalty)
Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS = typing.get_args(Precision)


class _Invalid(Exception):
    """An impossible value; `key` is the dotted key to blame (for naming the file or override)."""

    def __init__(self, keys: str | tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.keys = (keys,) if isinstance(keys, str) else keys


def _check(ok: bool, keys: str | tuple[str, ...], message: str) -> None:
    """Raise _Invalid blaming `keys` (all the keys involved in a cross-field rule) unless ok."""
    if not ok:
        raise _Invalid(keys, message)


LANG_CODE = re.compile(r"[A-Za-z0-9_-]+")  # a file suffix, a column name, a tag's middle


@dataclass
class CorpusConfig:
    """One translation direction of a multilingual run and its files (see DataConfig.corpora).

    An empty train, valid or test takes data.train, data.valid or data.test: a prefix names one
    file per language, so the files of a multi-way parallel corpus serve every direction.
    """

    src_lang: str = ""  # source language code, e.g. de (the suffix of its files)
    tgt_lang: str = ""  # target language code, e.g. en
    train: str = ""  # training data (the forms of data.train); empty: data.train
    valid: str = ""  # dev set; empty: data.valid
    test: str = ""  # test set; empty: data.test
    weight: float = 1.0  # multiplies this corpus's sampling probability

    @property
    def direction(self) -> str:
        """E.g. ``de-en``."""
        return f"{self.src_lang}-{self.tgt_lang}"

    def __post_init__(self) -> None:
        for key in ("src_lang", "tgt_lang"):
            code = getattr(self, key)
            _check(
                bool(LANG_CODE.fullmatch(code)),
                key,
                f"{key}={code!r} is not a language code (letters, digits, - and _)",
            )
        _check(
            self.src_lang != self.tgt_lang,
            ("src_lang", "tgt_lang"),
            f"src_lang and tgt_lang are both '{self.src_lang}'",
        )
        _check(self.weight > 0, "weight", f"weight={self.weight} must be positive")


@dataclass
class DataConfig:
    """Where the parallel data lives and how training pairs are filtered.

    A run trains one direction (src_lang, tgt_lang, train, valid, test) or, with `corpora`,
    several: each corpus names its direction, and its files unless it shares data.train etc.
    """

    src_lang: str = "de"  # source language code: the suffix of source files / the column name
    tgt_lang: str = "en"  # target language code
    train: str = ""  # a prefix (train.de[.gz] + train.en[.gz]), a .tsv file, or hf:NAME[:CONFIG]
    valid: str = ""  # dev set (same forms); never filtered
    test: str = ""  # test set (same forms); never filtered
    max_len: int = 256  # training pairs with more subword tokens on either side are dropped
    max_ratio: float = 3.0  # training pairs whose token-length ratio exceeds this are dropped
    num_proc: int = 1  # worker processes for encoding
    cache_dir: str = ""  # where encoded corpora are cached; empty means <run_dir>/cache
    corpora: list[CorpusConfig] = field(default_factory=list)  # directions; empty: src/tgt_lang
    temperature: float = 5.0  # corpus i gives a share ~ weight_i * pairs_i^(1/T) of the sentences
    mixed_batches: bool = False  # batches hold sentences of every direction, not of one
    select_direction: str = ""  # its dev BLEU picks the best checkpoint; empty: the mean

    def directions(self) -> list[CorpusConfig]:
        """Every direction with its files resolved: the corpora, or the one pair of the keys."""
        if not self.corpora:
            pair = (self.src_lang, self.tgt_lang, self.train, self.valid, self.test)
            return [CorpusConfig(*pair)]
        shared = {"train": self.train, "valid": self.valid, "test": self.test}
        return [
            dataclasses.replace(c, **{k: getattr(c, k) or v for k, v in shared.items()})
            for c in self.corpora
        ]

    def direction_names(self) -> list[str]:
        """The directions' names in order, e.g. ["de-en", "en-de"]."""
        return [c.direction for c in self.directions()]

    def target_languages(self) -> list[str]:
        """The target languages of the run's directions, in order of first appearance."""
        return list(dict.fromkeys(c.tgt_lang for c in self.directions()))

    def __post_init__(self) -> None:
        _check(
            self.src_lang != self.tgt_lang,
            ("data.src_lang", "data.tgt_lang"),
            f"data.src_lang and data.tgt_lang are both '{self.src_lang}'",
        )
        _check(self.max_len > 0, "data.max_len", f"data.max_len={self.max_len} must be positive")
        _check(
            self.max_ratio >= 1,
            "data.max_ratio",
            f"data.max_ratio={self.max_ratio} must be at least 1",
        )
        _check(self.num_proc >= 1, "data.num_proc", f"data.num_proc={self.num_proc} must be >= 1")
        for key in ("src_lang", "tgt_lang"):
            code = getattr(self, key)
            _check(
                bool(self.corpora or LANG_CODE.fullmatch(code)),
                f"data.{key}",
                f"data.{key}={code!r} is not a language code (letters, digits, - and _)",
            )
        seen: dict[str, int] = {}
        for i, corpus in enumerate(self.corpora):
            first = seen.setdefault(corpus.direction, i)
            other = self.corpora[first]
            # Either corpus's languages may be what the command line changed.
            keys = (
                "data.corpora",
                *(f"data.corpora[{n}].{k}_lang" for n in (first, i) for k in ("src", "tgt")),
            )
            _check(
                first == i
                or (other.src_lang, other.tgt_lang) != (corpus.src_lang, corpus.tgt_lang),
                keys,
                f"data.corpora[{i}]: direction {corpus.direction} is already data.corpora[{first}]",
            )
            _check(
                first == i,
                keys,
                f"data.corpora[{i}]: {corpus.src_lang} -> {corpus.tgt_lang} and data.corpora"
                f"[{first}]'s {other.src_lang} -> {other.tgt_lang} are both named "
                f"{corpus.direction}: write a code with _ instead of - (pt_BR)",
            )
        names = self.direction_names()
        languages = (
            f"data.corpora[{n}].{k}_lang" for n in range(len(self.corpora)) for k in ("src", "tgt")
        )
        _check(
            not self.select_direction or self.select_direction in names,
            ("data.select_direction", "data.src_lang", "data.tgt_lang", *languages),
            f"data.select_direction={self.select_direction!r} is not a direction of the run "
            f"({', '.join(names)})",
        )
        _check(
            self.temperature > 0,
            "data.temperature",
            f"data.temperature={self.temperature} must be positive",
        )


def temperature_shares(
    sizes: typing.Sequence[int], temperature: float, weights: typing.Sequence[float] = ()
) -> list[float]:
    """Each part's share, proportional to weight x size^(1/temperature), summing to 1.

    Computed from logarithms: at a low temperature the powers of large sizes (or a huge
    weight) overflow a float. Empty parts get 0; with none but empty ones, all get 0.
    """
    weights = weights or [1.0] * len(sizes)
    logs = [
        math.log(w) + math.log(n) / temperature if n > 0 and w > 0 else -math.inf
        for n, w in zip(sizes, weights, strict=True)
    ]
    top = max(logs, default=-math.inf)
    if top == -math.inf:
        return [0.0] * len(sizes)
    powers = [math.exp(x - top) for x in logs]
    return [p / sum(powers) for p in powers]


@dataclass
class TokenizerConfig:
    """The SentencePiece model trained for a run that has none."""

    type: Literal["bpe", "unigram"] = "bpe"  # SentencePiece model type
    vocab_size: int = 8000  # pieces per model (joint: one model for both languages)
    joint: bool = True  # one vocabulary for both sides, so all embeddings can be tied
    character_coverage: float = 1.0  # fraction of characters covered by the alphabet
    byte_fallback: bool = True  # unknown characters become UTF-8 byte pieces instead of <unk>
    input_sentence_size: int = 1_000_000  # sentences sampled for training (0 = all)

    def __post_init__(self) -> None:
        _check(
            8 <= self.vocab_size < 2**31,  # SentencePiece's own int32
            "tokenizer.vocab_size",
            f"tokenizer.vocab_size={self.vocab_size} must be in [8, {2**31 - 1}]",
        )
        _check(
            0.98 <= self.character_coverage <= 1,  # SentencePiece's own range
            "tokenizer.character_coverage",
            f"tokenizer.character_coverage={self.character_coverage} must be in [0.98, 1]",
        )
        _check(
            self.input_sentence_size >= 0,
            "tokenizer.input_sentence_size",
            f"tokenizer.input_sentence_size={self.input_sentence_size} must be >= 0",
        )


@dataclass
class ModelConfig:
    """The Transformer's shape (Vaswani et al. 2017)."""

    dim: int = 512  # model (embedding) dimension
    enc_layers: int = 6  # encoder layers
    dec_layers: int = 6  # decoder layers
    heads: int = 8  # attention heads; must divide dim
    ffn_dim: int = 2048  # inner dimension of the position-wise feed-forward network
    dropout: float = 0.1  # dropout on embeddings, sublayer outputs and inside the FFN
    attn_dropout: float = 0.0  # dropout on attention weights
    activation: Literal["relu", "gelu"] = "relu"  # FFN activation
    prenorm: bool = True  # layer norm before each sublayer (False: after, as in the paper)
    share_embeddings: bool = True  # tie source, target and output embeddings (joint vocab only)
    max_positions: int = 1024  # longest sequence the positional table covers

    def __post_init__(self) -> None:
        for key in ("dim", "enc_layers", "dec_layers", "heads", "ffn_dim", "max_positions"):
            value = getattr(self, key)
            _check(value > 0, f"model.{key}", f"model.{key}={value} must be positive")
        _check(
            self.dim % self.heads == 0,
            ("model.heads", "model.dim"),
            f"model.heads={self.heads} does not divide model.dim={self.dim}",
        )
        for key in ("dropout", "attn_dropout"):
            value = getattr(self, key)
            _check(0 <= value < 1, f"model.{key}", f"model.{key}={value} must be in [0, 1)")


@dataclass
class TrainConfig:
    """Optimisation, precision, validation and checkpointing."""

    max_tokens: int = 4096  # token budget per batch, counted with padding (sentences x longest)
    update_freq: int = 1  # batches accumulated per optimizer update
    max_steps: int = 100_000  # optimizer updates to run
    max_epochs: int = 0  # stop after this many epochs (0 = no limit)
    max_minutes: float = 0.0  # stop after this much time training, validating and saving (0 = off)
    seed: int = 1  # seeds batching, dropout and initialisation
    precision: Precision = (
        "auto"  # auto: bf16/fp16 on CUDA; on CPU bf16 if timed >= 1.2x faster than fp32 at start
    )
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    compile: bool = False  # wrap the model in torch.compile
    lr: float = 7e-4  # peak learning rate, reached at the end of warm-up
    warmup_steps: int = 4000  # linear warm-up, then inverse square root decay
    cooldown: float = 0.0  # last share of the run (of max_steps, or of max_minutes if set and
    # sooner) over which the lr falls linearly to 0 (0 = off)
    betas: tuple[float, float] = (0.9, 0.98)  # Adam betas
    eps: float = 1e-9  # Adam epsilon
    weight_decay: float = 0.0  # decoupled weight decay (AdamW)
    clip_norm: float = 0.0  # clip the gradient norm to this (0 = off)
    ema_decay: float = 0.0  # decay of the weights' EMA, validated and saved (0 = off; 0.999)
    initial_dropout: float = 0.0  # the dropout of the first initial_dropout_steps updates
    initial_dropout_steps: int = 0  # updates at initial_dropout, then model.dropout (0 = off)
    label_smoothing: float = 0.1  # epsilon of label-smoothed cross-entropy
    log_every: int = 100  # steps between log lines / metric records
    valid_every: int = 1000  # steps between validations (dev loss and BLEU) and checkpoints
    valid_max_tokens: int = 8192  # token budget of validation batches
    patience: int = 0  # stop after this many validations without a better dev BLEU (0 = off)
    keep_last: int = 5  # step checkpoints kept besides the best one
    average_last: int = 0  # at the end, average the last K checkpoints (0 = off)
    report: bool = True  # at the end, write report.md and curves.png (test scores if data.test)
    min_loss_scale: float = 1e-4  # fp16: stop when the loss scale falls below this
    dist_timeout: float = 600.0  # seconds a rank waits for the others in a collective
    dist_startup_timeout: float = 1800.0  # seconds for rendezvous and start-up (tokenizer, data)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # YAML gives lists
        for key in (
            "max_tokens",
            "update_freq",
            "max_steps",
            "log_every",
            "valid_every",
            "valid_max_tokens",
            "keep_last",
            "eps",
        ):
            value = getattr(self, key)
            _check(value > 0, f"train.{key}", f"train.{key}={value} must be positive")
        for key in (
            "max_epochs",
            "max_minutes",
            "warmup_steps",
            "weight_decay",
            "clip_norm",
            "patience",
            "average_last",
            "initial_dropout_steps",
            "min_loss_scale",
        ):
            value = getattr(self, key)
            _check(value >= 0, f"train.{key}", f"train.{key}={value} must be >= 0")
        _check(self.lr > 0, "train.lr", f"train.lr={self.lr} must be positive")
        _check(
            0 <= self.ema_decay < 1,
            "train.ema_decay",
            f"train.ema_decay={self.ema_decay} must be in [0, 1)",
        )
        _check(
            0 <= self.cooldown < 1,
            "train.cooldown",
            f"train.cooldown={self.cooldown} must be in [0, 1)",
        )
        _check(
            0 <= self.initial_dropout < 1,
            "train.initial_dropout",
            f"train.initial_dropout={self.initial_dropout} must be in [0, 1)",
        )
        _check(
            self.average_last <= self.keep_last,
            ("train.average_last", "train.keep_last"),
            f"train.average_last={self.average_last} exceeds train.keep_last={self.keep_last}: "
            "the checkpoints to average would be deleted",
        )
        for key in ("dist_timeout", "dist_startup_timeout"):
            value = getattr(self, key)
            _check(value > 0, f"train.{key}", f"train.{key}={value} must be positive")
        _check(
            all(0 <= b < 1 for b in self.betas),
            "train.betas",
            f"train.betas={list(self.betas)} must be in [0, 1)",
        )
        _check(
            0 <= self.label_smoothing < 1,
            "train.label_smoothing",
            f"train.label_smoothing={self.label_smoothing} must be in [0, 1)",
        )
        _check(
            re.fullmatch(DEVICE_NAMES, self.device) is not None,
            "train.device",
            f"train.device={self.device!r} must be auto, cpu, cuda or cuda:N",
        )
        _check(
            0 <= self.seed < 2**32,  # what numpy and SentencePiece take
            "train.seed",
            f"train.seed={self.seed} must be in [0, {2**32 - 1}]",
        )


@dataclass
class DecodeConfig:
    """Search settings for validation, `mt translate` and `mt evaluate`."""

    beam: int = 5  # beam size (1 = greedy)
    alpha: float = 0.6  # length penalty exponent (see length_penalty)
    length_penalty: LengthPenalty = "gnmt"  # gnmt: ((5+len)/6)^alpha; average: len
    min_len: int = 0  # hypotheses shorter than this (in pieces) cannot end
    max_len_a: float = 1.2  # maximum output length = a * source length + b
    max_len_b: int = 10  # see max_len_a
    max_tokens: int = 8192  # token budget of decoding batches
    nbest: int = 1  # hypotheses returned per sentence (at most beam, unless sampling)
    sampling: bool = False  # sample instead of searching (beam is then the number of samples)
    temperature: float = 1.0  # sampling temperature
    top_k: int = 0  # sample from the k most probable tokens (0 = all)
    top_p: float = 1.0  # sample from the smallest set of tokens with this total probability
    seed: int = -1  # sampling's seed: the same input gets the same samples (-1: new each run)
    valid_beam: int = 1  # beam used for validation BLEU during training (1 = greedy, fastest)

    def __post_init__(self) -> None:
        for key in ("beam", "nbest", "valid_beam"):
            value = getattr(self, key)
            _check(value >= 1, f"decode.{key}", f"decode.{key}={value} must be >= 1")
        _check(
            self.sampling or self.nbest <= self.beam,
            ("decode.nbest", "decode.beam"),
            f"decode.nbest={self.nbest} exceeds decode.beam={self.beam}",
        )
        # Bounds that keep the arithmetic finite: ((5 + len) / 6) ** alpha overflows float32
        # from alpha ~17 at 1,000 pieces, and float32 log-probs divided by a temperature past
        # ~3e38 become nan.
        _check(
            0 <= self.alpha <= 10, "decode.alpha", f"decode.alpha={self.alpha} must be in [0, 10]"
        )
        _check(
            self.length_penalty in LENGTH_PENALTIES,
            "decode.length_penalty",
            f"decode.length_penalty={self.length_penalty!r} must be one of "
            + ", ".join(LENGTH_PENALTIES),
        )
        _check(self.min_len >= 0, "decode.min_len", f"decode.min_len={self.min_len} must be >= 0")
        for key in ("max_len_a", "max_len_b"):
            value = getattr(self, key)
            _check(value >= 0, f"decode.{key}", f"decode.{key}={value} must be >= 0")
        _check(
            self.max_tokens > 0,
            "decode.max_tokens",
            f"decode.max_tokens={self.max_tokens} must be positive",
        )
        _check(
            0 < self.temperature <= 1000,
            "decode.temperature",
            f"decode.temperature={self.temperature} must be in (0, 1000]",
        )
        _check(self.top_k >= 0, "decode.top_k", f"decode.top_k={self.top_k} must be >= 0")
        _check(0 < self.top_p <= 1, "decode.top_p", f"decode.top_p={self.top_p} must be in (0, 1]")
        _check(
            -1 <= self.seed < 2**63, "decode.seed", f"decode.seed={self.seed} must be in [-1, 2^63)"
        )

    def for_validation(self) -> DecodeConfig:
        """The search of validation BLEU: beam valid_beam, the best output only, no sampling."""
        return dataclasses.replace(self, beam=self.valid_beam, nbest=1, sampling=False)


@dataclass
class Config:
    """A whole run: where it writes, its data, tokenizer, model, training and decoding."""

    run_dir: str = "runs/default"  # everything a run writes goes here
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)

    def __post_init__(self) -> None:
        _check(self.run_dir.strip() != "", "run_dir", "run_dir is empty: name the run's directory")
        longest = self.data.max_len + 1  # a training sentence with its EOS (or BOS)
        _check(
            self.train.max_tokens >= longest,
            ("train.max_tokens", "data.max_len"),
            f"train.max_tokens={self.train.max_tokens} cannot hold a sentence of "
            f"data.max_len={self.data.max_len} tokens (needs at least {longest})",
        )
        _check(
            self.model.max_positions >= longest,
            ("model.max_positions", "data.max_len"),
            f"model.max_positions={self.model.max_positions} is shorter than "
            f"data.max_len={self.data.max_len} + 1",
        )
        _check(
            self.tokenizer.joint or not self.model.share_embeddings,
            ("model.share_embeddings", "tokenizer.joint"),
            "model.share_embeddings=true needs a joint vocabulary (tokenizer.joint=true)",
        )

    def to_dict(self) -> dict[str, Any]:
        """The config as plain YAML-able values (tuples become lists)."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Building typed objects from plain dicts


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        return f"a list of {len(args)}: " + ", ".join(_type_name(a) for a in args)
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[tp]


def _float_or_same(value: Any) -> Any:
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the field type `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is list:
        return _build_list(value, typing.get_args(tp)[0], key)
    if origin is Literal:
        ok = value in typing.get_args(tp) and isinstance(value, str)
    elif origin is tuple:
        args = typing.get_args(tp)
        ok = isinstance(value, (list, tuple)) and len(value) == len(args)
        if ok:
            return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    elif tp is float:
        value = _float_or_same(value)  # YAML 1.1 reads `1e-3` as a string
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and isinstance(value, int) and abs(value) >= 2**1024:  # float() would raise
            raise _Invalid(
                key, f"{key} must be finite, got an integer of {len(str(abs(value)))} digits"
            )
        value = float(value) if ok else value
        # One check for every float setting, before the range checks: inf passes `lr > 0` and
        # trains a model of NaNs, and NaN would fail a range check with a misleading message.
        if ok and not math.isfinite(value):
            raise _Invalid(key, f"{key}={value} must be finite")
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and not -(2**63) <= value < 2**63:  # what torch, numpy and islice take
            raise _Invalid(key, f"{key}={value} is out of range (at most {2**63 - 1})")
    else:
        ok = isinstance(value, tp)
    if not ok:
        # YAML 1.1 reads yes/no/on/off unquoted as booleans: `src_lang: no` is Norwegian.
        quote = " (quote it: YAML reads yes, no, on, off as booleans)" * (
            tp is str and isinstance(value, bool)
        )
        raise _Invalid(key, f"{key} must be {_type_name(tp)}, got {value!r}{quote}")
    return value


def _build_list(values: Any, cls: type, key: str) -> list[Any]:
    """A list of dataclass `cls` from a list of mappings; errors name `key[i].field`."""
    if not isinstance(values, list):
        raise _Invalid(key, f"{key} must be a list of mappings, got {values!r}")
    out = []
    for i, item in enumerate(values):
        prefix = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise _Invalid(key, f"{prefix} must be a mapping, got {item!r}")
        try:
            out.append(_build(cls, item, f"{prefix}."))
        except _Invalid as exc:
            # __post_init__ blames bare field names: put the element's key in front.
            text = str(exc) if prefix in str(exc) else f"{prefix}.{exc}"
            keys = (k if k.startswith(prefix) else f"{prefix}.{k}" for k in exc.keys)
            raise _Invalid((*keys, key), text) from None
    return out


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Construct dataclass `cls` from a dict, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if value is None and key in _unset_by_default(cls):
            continue  # `test:` or `test: null`: none, as when the key is left out
        dotted = f"{prefix}{key}"
        if key not in hints:
            if dotted in _section_types():  # the command line's spelling, in a file
                section, leaf = dotted.rsplit(".", 1)
                raise _Invalid(
                    dotted,
                    f"unknown key {dotted} (the command line's spelling): "
                    f"in a file, write {leaf} under {section}:",
                )
            raise _Invalid(dotted, f"unknown key {dotted}{_suggestion(str(key), hints, prefix)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            value = {} if value is None else value  # a section whose keys are all commented out
            if not isinstance(value, dict):
                raise _Invalid(dotted, f"{dotted} must be a section (a mapping), got {value!r}")
            kwargs[key] = _build(tp, value, f"{dotted}.")
        else:
            kwargs[key] = _coerce(value, tp, dotted)
    return cls(**kwargs)


def _unset_by_default(cls: type) -> set[str]:
    """The string keys of `cls` whose default is empty: unset (data.test, data.cache_dir ...)."""
    return {f.name for f in dataclasses.fields(cls) if f.default == ""}


def _suggestion(key: str, known: typing.Iterable[str], prefix: str = "") -> str:
    """ "; did you mean data.train?" for a key close to a known one, else ""."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.75)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def _section_types(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of the config and its type (used to parse command-line overrides)."""
    out: dict[str, Any] = {}
    for key, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            out.update(_section_types(tp, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = tp
    return out


_CORPUS_KEY = re.compile(r"data\.corpora\[(\d+)\]\.(\w+)")  # an override of one corpus's field


def _parse_override(item: str) -> tuple[str, Any]:
    """`model.dim=512` -> ("model.dim", 512); string fields keep the raw text."""
    key, sep, raw = item.partition("=")
    key = key.strip().removeprefix("--")
    if not sep or not key:
        raise _Invalid(key, f"override {item!r} is not of the form key=value")
    corpus = _CORPUS_KEY.fullmatch(key)
    if corpus:  # data.corpora[1].weight: one field of one corpus
        tp = typing.get_type_hints(CorpusConfig).get(corpus.group(2))
    else:
        tp = _section_types().get(key)
    if tp is None and corpus:
        fields = typing.get_type_hints(CorpusConfig)
        known = _suggestion(corpus.group(2), fields, key.removesuffix(corpus.group(2)))
        raise _Invalid(key, f"unknown key {key}{known}")
    if tp is None:
        keys = _section_types()
        if any(k.startswith(f"{key}.") for k in keys):
            raise _Invalid(key, f"{key} is a section: override one of its keys, e.g. {key}.KEY=v")
        raise _Invalid(key, f"unknown key {key}{_suggestion(key, keys)}")
    if tp is str:
        return key, raw
    try:
        return key, yaml.load(raw, Loader=_UniqueKeyLoader)
    except (yaml.YAMLError, ValueError, KeyError, AttributeError):  # e.g. !!bool maybe
        return key, raw


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    if corpus := _CORPUS_KEY.fullmatch(key):
        _set_corpus_field(tree, key, int(corpus.group(1)), corpus.group(2), value)
        return
    *parents, leaf = key.split(".")
    for part in parents:
        if tree.get(part) is None:  # absent, or every key commented out: an empty section
            tree[part] = {}
        node = tree[part]
        if not isinstance(node, dict):
            raise _Invalid(key, f"{part} must be a section (a mapping), got {node!r}")
        tree = node
    tree[leaf] = value


def _set_corpus_field(tree: dict[str, Any], key: str, index: int, name: str, value: Any) -> None:
    """Set field `name` of corpus `index` of the tree's data.corpora, which must have it."""
    data = tree.get("data")
    corpora = data.get("corpora") if isinstance(data, dict) else None
    count = len(corpora) if isinstance(corpora, list) else 0
    if index >= count or not isinstance(corpora[index], dict):
        raise _Invalid(key, f"there is no data.corpora[{index}] (data.corpora has {count})")
    corpora[index][name] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, but a key given twice in one mapping is an error, not the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults`: merged by SafeLoader, under the keys given here
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, collections.abc.Hashable):
                raise yaml.constructor.ConstructorError(
                    None, None, "a key must be a name, not a list or a mapping", key_node.start_mark
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 reads 045 as octal 37, 0x10 and 1:30 as numbers and 2024-09-31 as a date (an
# exception when it is none): no config key wants those, so integers are decimal, dates text.
_IMPLICIT = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:timestamp")
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _IMPLICIT]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
# Decimal integers, 09 and 0_9 included (YAML 1.1 reads neither as one): the loader's rule, and
# the dumper's, which must quote the strings that would read back as such.
_DECIMAL_INT = (
    "tag:yaml.org,2002:int",
    re.compile(r"^[-+]?[0-9]+(?:_[0-9]+)*$"),
    list("-+0123456789"),
)
_UniqueKeyLoader.add_implicit_resolver(*_DECIMAL_INT)
_UniqueKeyLoader.add_constructor(
    "tag:yaml.org,2002:int", lambda loader, node: int(loader.construct_scalar(node), 10)
)


class _ConfigDumper(yaml.SafeDumper):
    """yaml.safe_dump's dumper, which also quotes a string that _UniqueKeyLoader reads as an
    integer (`run_dir: 09` would read back as 9).

    It keeps SafeDumper's own resolvers (0x10, 045, dates stay quoted), so every config that
    reads back writes the same text as before: a run's config.yaml is compared as text.
    """


_ConfigDumper.add_implicit_resolver(*_DECIMAL_INT)


def _dump(tree: dict[str, Any]) -> str:
    """A config tree as the YAML text mt writes, in the order of its keys."""
    return yaml.dump(tree, Dumper=_ConfigDumper, sort_keys=False)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    try:
        tree = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.reader.ReaderError as exc:  # a control character: it has no mark
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError(
            f"{path}: line {line}: invalid YAML (character U+{exc.character:04X} is not allowed)"
        ) from None
    except ValueError as exc:  # an explicit !!int or !!float that is none
        raise ConfigError(f"{path}: invalid YAML ({exc})") from None
    except (KeyError, AttributeError):  # PyYAML's !!bool and !!timestamp on what is neither
        raise ConfigError(f"{path}: invalid YAML (a value its explicit !!tag cannot be)") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        if where is not None and where.index >= len(text.rstrip()):  # e.g. an unclosed quote
            where = getattr(exc, "context_mark", None) or where  # where it was opened
        line = f"line {where.line + 1}: " if where is not None else ""
        raise ConfigError(f"{path}: {line}invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return tree


def from_dict(tree: dict[str, Any], source: str = "config") -> Config:
    """Build a validated Config from a plain dict; errors are prefixed with `source`."""
    try:
        return _build(Config, tree, "")
    except _Invalid as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_config(
    path: str | Path, overrides: typing.Sequence[str] = (), required: typing.Sequence[str] = ()
) -> Config:
    """Load a YAML config, apply dotted `key=value` overrides, and validate the result.

    `required` names dotted string keys that must not be empty, e.g. "data.train" to train.
    """
    path = Path(path)
    tree = _read_yaml(path)
    overridden: set[str] = set()
    try:
        for item in overrides:
            key, value = _parse_override(item)
            _set_dotted(tree, key, value)
            overridden.add(key)
    except _Invalid as exc:
        raise ConfigError(f"command line: {exc}") from None
    try:
        config = _build(Config, tree, "")
        for key in required:
            _check_required(config, key)
        _check_direction_keys(config, overridden)
    except _Invalid as exc:
        source = "command line" if overridden.intersection(exc.keys) else str(path)
        raise ConfigError(f"{source}: {exc}") from None
    return config


def _check_direction_keys(config: Config, overridden: set[str]) -> None:
    """Raise _Invalid for data.src_lang or data.tgt_lang set on the command line of a run of
    data.corpora, or data.train, data.valid or data.test where every corpus names its own: they
    would do nothing (a run file always holds them, so only overrides)."""
    corpora = config.data.corpora
    unused = sorted({"data.src_lang", "data.tgt_lang"} & overridden) if corpora else []
    if unused:
        names = ", ".join(config.data.direction_names())
        raise _Invalid(
            unused[0],
            f"{unused[0]}: this config's directions are data.corpora's ({names}); set them "
            "there (data.src_lang and data.tgt_lang are the direction of a run without it)",
        )
    for key in sorted({"data.train", "data.valid", "data.test"} & overridden):
        name = key.removeprefix("data.")
        if corpora and all(getattr(c, name) for c in corpora):
            raise _Invalid(
                key,
                f"{key}: every corpus of data.corpora names its own {name} file; set "
                f"data.corpora[N].{name} instead ({key} is for the corpora that name none)",
            )


def _check_required(config: Config, key: str) -> None:
    """Raise _Invalid if the dotted string key is empty (in any corpus, for data files)."""
    section, name = key.split(".")
    corpora = config.data.directions() if section == "data" and config.data.corpora else []
    for i, corpus in enumerate(corpora):
        _check(
            bool(getattr(corpus, name, True)),
            ("data.corpora", key),
            f"data.corpora[{i}].{name} is empty; set it there or {key}=PATH for every corpus",
        )
    _check(
        bool(corpora) or bool(getattr(getattr(config, section), name)),
        key,
        f"{key} is empty; set it in the config or {key}=PATH",
    )


def config_text(config: Config) -> str:
    """The resolved config as the YAML that `save_config` writes."""
    return _dump(config.to_dict())


def written_by_mt(text: str, config: Config) -> bool:
    """Whether `text` is what save_config wrote for `config`, by this mt or an older one (which
    knew fewer keys: they are left out of the comparison)."""

    def known(new: Any, old: Any) -> Any:  # `new` with only the keys of `old`
        if isinstance(new, dict) and isinstance(old, dict):
            return {k: known(v, old[k]) for k, v in new.items() if k in old}
        if isinstance(new, list) and isinstance(old, list) and len(new) == len(old):
            return [known(a, b) for a, b in zip(new, old, strict=True)]
        return new

    try:
        written = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    return text == _dump(known(config.to_dict(), written))


def save_config(config: Config, path: Path) -> None:
    """Write the resolved config as YAML, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, config_text(config).encode("utf-8"))


def diff(old: Config, new: Config, sections: typing.Iterable[str]) -> list[str]:
    """Lines `key: old -> new` for every differing key in the given sections."""
    a, b = old.to_dict(), new.to_dict()
    lines = []
    for section in sections:
        for key in a[section]:
            lines += _differences(f"{section}.{key}", a[section][key], b[section][key])
    return lines


def _differences(name: str, old: Any, new: Any) -> list[str]:
    """`name: old -> new`; for two lists of sections (data.corpora) of one length, per field."""
    if old == new:
        return []
    sections = isinstance(old, list) and isinstance(new, list) and len(old) == len(new)
    if sections and all(isinstance(x, dict) for x in [*old, *new]):
        return [
            line
            for i, (x, y) in enumerate(zip(old, new, strict=True))
            for key in x
            for line in _differences(f"{name}[{i}].{key}", x[key], y.get(key))
        ]
    return [f"{name}: {old!r} -> {new!r}"]
