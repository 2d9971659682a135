"""`mt translate`: read lines, encode, batch by length, search, restore order, detokenise.

Every input line gives exactly one output line (or K with n-best output), in input order.
Blank lines, and lines with no source pieces at all, are not decoded: they give empty output
(whatever their prefix or constraints). Outputs may be steered, line by line, by a prefix file
(how each starts) and a constraints file (tab-separated phrases each must contain); several
models translate as one log-linear ensemble.
A line for which the model gives no hypothesis a finite score (diverged weights, an overflow)
gets an empty translation too, score nan, rather than the arbitrary text of a NaN argmax; the
command writes every line and then fails with one line naming the checkpoint.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from tqdm import tqdm

from mt import search
from mt.batching import collate_source, source_batches
from mt.checkpoint import read_metadata
from mt.config import PRECISIONS, Config, DecodeConfig, from_dict
from mt.corpora import check_stdin, input_name, read_lines
from mt.device import (
    Features,
    autocast,
    configure_backends,
    model_products,
    resolve_device,
    resolve_precision,
)
from mt.errors import ConfigError, MtError
from mt.files import atomic_write, stdout_errors
from mt.packing import pack, time_packed
from mt.quantize import check_quantization, quantize
from mt.rundir import load_run_config, load_trained, model_checkpoint
from mt.search import Constraints, Decoder, Ensemble
from mt.tokenizer import LINE_BREAKS, Tokenizer, leading_tag
from mt.vocab import UNK_ID

log = logging.getLogger("mt")

_NBEST_BREAKS = str.maketrans({"\t": " "})


@dataclass(frozen=True)
class Translation:
    """One hypothesis for one input line: detokenised text, length-penalised score, ids."""

    text: str
    score: float
    tokens: list[int]
    found: bool = True  # False: no hypothesis had a finite score, so the text is empty


EMPTY = Translation("", 0.0, [])  # what a blank input line translates to
NOT_FOUND = Translation("", math.nan, [], found=False)  # a line without a finite hypothesis


# --- input ----------------------------------------------------------------------------------


def encode_sources(
    lines: Sequence[str], tokenizer: Tokenizer, max_len: int, tgt_lang: str | None = None
) -> list[list[int]]:
    """Source ids per line (none for blank lines), cut to max_len pieces with a warning.

    A multilingual model's sources start with a tag (see Tokenizer.encode_tagged): that of the
    line's own ``>>xx<<`` where it starts with one, else that of `tgt_lang`. The tag takes one
    of the max_len places; the warning counts the line's own pieces.
    """
    ids = tokenizer.encode_tagged([line if line.strip() else "" for line in lines], tgt_lang)
    tag = int(bool(tokenizer.tags))
    after = " (after the language tag)" if tag else ""
    for number, seq in enumerate(ids, start=1):
        if len(seq) > max_len:
            have, keep = f"{len(seq) - tag:,}", f"{max_len - tag:,}"
            log.warning("line %d: %s tokens, truncated to %s%s", number, have, keep, after)
            del seq[max_len:]
    return ids


def check_target(
    config: Config,
    tokenizer: Tokenizer,
    tgt_lang: str | None,
    lines: Sequence[str] | None = None,
    source: str = "",
) -> None:
    """MtError unless `tgt_lang` is one the model translates into (or None, for one), and each
    of `lines` (read from `source`) that starts with a tag names one too; a multilingual
    model's lines without a tag need `tgt_lang`."""
    known = config.data.target_languages()
    listed = ", ".join(known)
    if tgt_lang is not None and tgt_lang not in known:
        raise MtError(f"--tgt-lang {tgt_lang}: the model translates into {listed} only")
    if not tokenizer.tags:
        return
    if tgt_lang is None and lines is None:
        raise MtError(f"the model translates into {listed}: choose one with --tgt-lang")
    if (found := first_untargeted(lines or [], known, tgt_lang)) is None:
        return
    index, lang = found
    if lang is not None:
        raise MtError(
            f"{source}: line {index + 1} starts with >>{lang}<<, but the model translates into "
            f"{listed} only"
        )
    raise MtError(
        f"the model translates into {listed}: choose one with --tgt-lang, or start each line "
        f"with its tag ({source}: line {index + 1} starts with no >>xx<<)"
    )


def first_untargeted(
    lines: Sequence[str], known: Sequence[str], tgt_lang: str | None
) -> tuple[int, str | None] | None:
    """The first of a multilingual model's `lines` without a target language in `known`: its
    index and its tag's language (None: it has no tag, and there is no `tgt_lang`); None when
    every line has one (its own tag's, or tgt_lang). Blank lines need none."""
    for index, line in enumerate(lines):
        lang, _ = leading_tag(line)
        if lang is not None and lang not in known:
            return index, lang
        if lang is None and tgt_lang is None and line.strip():
            return index, None
    return None


def read_aligned(path: str | Path, lines: Sequence[str], source: str) -> list[str]:
    """The lines of `path`, one per input line: MtError naming both when the counts differ."""
    rows = list(read_lines(path))
    if len(rows) != len(lines):
        raise MtError(
            f"{input_name(path)}: {len(rows)} lines, but {input_name(source)} has {len(lines)}"
        )
    return rows


def forced_problem(ids: Sequence[int], limit: int) -> str | None:
    """What keeps target pieces from being forced into an output (a prefix or a constraint
    phrase): empty, text the vocabulary cannot spell (UNK), more than `limit`; None if fine."""
    if not ids:
        return "is empty"
    if UNK_ID in ids:
        return "holds characters that the target vocabulary lacks"
    if len(ids) > limit:
        return f"has {len(ids):,} pieces, more than the {limit:,} an output can hold"
    return None


def encode_prefixes(
    path: Path, rows: Sequence[str], tokenizer: Tokenizer, limit: int
) -> list[list[int]]:
    """Target pieces of each line's prefix (none for an empty line), at most `limit` each."""
    ids = tokenizer.encode_tgt(list(rows))
    for number, seq in enumerate(ids, start=1):
        if seq and (problem := forced_problem(seq, limit)):
            raise MtError(f"{input_name(path)}: line {number}: the prefix {problem}")
    return ids


def encode_constraints(
    path: Path, rows: Sequence[str], tokenizer: Tokenizer, limit: int
) -> list[list[list[int]]]:
    """Target pieces of each line's tab-separated phrases (none for a blank line)."""
    phrases = [row.split("\t") if row.strip() else [] for row in rows]
    flat = iter(tokenizer.encode_tgt([text for line in phrases for text in line]))
    out = []
    for number, line in enumerate(phrases, start=1):
        ids = [next(flat) for _ in line]
        for j, seq in enumerate(ids, start=1):
            if problem := forced_problem(seq, limit):
                raise MtError(f"{input_name(path)}: line {number}: constraint {j} {problem}")
        out.append(ids)
    return out


def meets(tokens: Sequence[int], phrases: Sequence[list[int]]) -> bool:
    """Whether output `tokens` contain every one of the constraint `phrases`."""
    return all(search.contains(tokens, phrase) for phrase in phrases)


def warn_unmet(
    indices: Sequence[int], translations: Sequence[Sequence[Translation]], wanted: list
) -> None:
    """A warning naming each line whose best output misses one of its phrases `wanted`
    (blank lines are not translated, so not steered: no warning)."""
    for i, hyps in zip(indices, translations, strict=True):
        best = hyps[0]
        if best is not EMPTY and best.found and not meets(best.tokens, wanted[i]):
            log.warning("line %d: no translation met all its constraints; wrote one without", i + 1)


# --- models ---------------------------------------------------------------------------------


def load_models(
    paths: Sequence[Path],
    device: torch.device,
    weights: Sequence[float] | None = None,
    quantization: str = "none",
    precision: str = "fp32",
) -> tuple[Config, Tokenizer, Decoder, str]:
    """The first model's config and tokenizer, the model or ensemble, and its checkpoint(s).

    Several models make a log-linear ensemble (weights default to equal); they must share the
    vocabulary: MtError naming the first difference otherwise. `quantization` (see mt.quantize)
    applies to every model; on a CPU, fp32 and bf16 pack the linear layers (see mt.packing).
    """
    if weights and len(paths) == 1:
        raise MtError("--weights: they weigh the models of an ensemble; give several --model")
    if weights and len(weights) != len(paths):
        raise MtError(f"--weights: {len(weights)} weights for {len(paths)} models")
    if weights and not (all(0 <= w < math.inf for w in weights) and 0 < sum(weights) < math.inf):
        raise MtError("--weights: each must be a finite number >= 0, and one > 0")
    loaded = [load_trained(path, device) for path in paths]
    config, tokenizer = loaded[0][0], loaded[0][1]
    for path, (other_config, other, _, _) in zip(paths[1:], loaded[1:], strict=True):
        difference = vocabulary_difference(tokenizer, other)
        if difference:
            raise MtError(
                f"--model {path}: {difference} in --model {paths[0]}: the models of an "
                "ensemble must share their vocabulary"
            )
        mine, theirs = (", ".join(sorted(c.data.direction_names())) for c in (config, other_config))
        if mine != theirs:  # a shared joint vocabulary does not make them one direction
            raise MtError(
                f"--model {path}: it translates {theirs}, not {mine} as --model {paths[0]}: "
                "the models of an ensemble must translate the same directions"
            )
    names = ", ".join(str(checkpoint.weights) for *_, checkpoint in loaded)
    models = [model for _, _, model, _ in loaded]
    decoder = models[0] if len(models) == 1 else Ensemble(models, weights)
    return config, tokenizer, pack(quantize(decoder, quantization), device, precision), names


def vocabulary_difference(first: Tokenizer, other: Tokenizer) -> str | None:
    """How other's vocabulary differs from first's ("its tgt piece 7 is ..."), or None."""
    for side in ("src", "tgt"):
        mine, theirs = first.vocabulary(side), other.vocabulary(side)
        if len(mine) != len(theirs):
            return f"its {side} vocabulary has {len(theirs):,} pieces, not {len(mine):,} as"
        for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
            if a != b:
                return f"its {side} piece {i} is {b!r}, not {a!r} as"
    return None


# --- decoding settings ----------------------------------------------------------------------


SAMPLING_ONLY = ("temperature", "top_k", "top_p", "seed")  # decode.* no search reads


def decode_settings(config: Config, **overrides: Any) -> DecodeConfig:
    """The run's decode section with command-line values (None = keep the run's) applied."""
    given = {key: value for key, value in overrides.items() if value is not None}
    if not given:
        return config.decode
    sampling = given.get("sampling", config.decode.sampling)
    if ignored := [key for key in SAMPLING_ONLY if key in given and not sampling]:
        option = "--" + ignored[0].replace("_", "-")
        raise MtError(f"command line: {option} applies to sampling only: add --sampling")
    penalty = given.get("length_penalty", config.decode.length_penalty)
    if "alpha" in given and penalty != "gnmt":
        if "length_penalty" in given:
            raise MtError(
                f"command line: --alpha applies to --length-penalty gnmt only, not {penalty}"
            )
        raise MtError(
            f"command line: --alpha applies to the gnmt length penalty only; the run's "
            f"decode.length_penalty is {penalty}"
        )
    if "nbest" not in given and not sampling:
        # A search returns at most its beam; a sampling run's n-best may exceed its beam.
        given["nbest"] = min(config.decode.nbest, given.get("beam", config.decode.beam))
    tree = config.to_dict()
    tree["decode"].update(given)
    return from_dict(tree, "command line").decode  # validates, e.g. nbest <= beam


def settings_before_input(model: Path, **overrides: Any) -> DecodeConfig | None:
    """decode_settings from `model`'s run config alone, so that bad options fail before any
    input is read or model loaded; None where the config cannot be read (loading the model
    then says why)."""
    try:
        config = load_run_config(model_checkpoint(Path(model)).run_dir)
    except MtError:
        return None
    return decode_settings(config, **overrides)


def check_decode_options(model: Path, **overrides: Any) -> None:
    """MtError for decoding options that `model`'s run config refuses (settings_before_input),
    for commands that load the model's settings later."""
    settings_before_input(model, **overrides)


def resolve_runtime(
    device: str,
    precision: str,
    model: Path | None = None,
    quantization: str = "none",
    keep_memory: bool = True,
) -> tuple[torch.device, str]:
    """The device and autocast precision, backends set up; fp16 needs CUDA (bf16 runs on CPU).

    `auto` on CPU times fp32 against bf16 on the layers of `model` (a run or checkpoint) as
    decoding runs them (packed, fp32's large batches maybe through BLAS: mt.packing.time_packed),
    once per command; without it, by the AMX rule
    (mt.device.resolve_precision). A `quantization` other than none decodes in fp32 on the CPU
    (mt.quantize). keep_memory: see mt.device.configure_backends.
    """
    if precision not in PRECISIONS:
        raise MtError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    try:
        dev = resolve_device(device)
    except ConfigError as exc:  # it names train.device, not the option the user gave
        raise MtError(f"--device {device}: {str(exc).rsplit(': ', 1)[-1]}") from None
    if precision == "fp16" and dev.type != "cuda":
        raise MtError(f"--precision fp16 needs a CUDA device, not {dev}")
    check_quantization(quantization, dev, precision)
    configure_backends(dev, keep_memory)
    if quantization != "none":
        return dev, "fp32"
    choice = resolve_precision(precision, dev, *decoding_products(model), time_calls=time_packed)
    if precision == "auto":  # said on a terminal, like the progress bar; pipes stay quiet
        say = log.info if sys.stderr.isatty() else log.debug
        say("precision: %s", choice.describe())
    return dev, choice.precision


def decoding_products(model: Path | None) -> tuple[list[Features] | None, int]:
    """The (in, out) features of `model`'s large layers and its decoding batches' tokens.

    (None, 0) where they cannot be read: loading the model then says what is wrong with it.
    """
    if model is None:
        return None, 0
    try:
        checkpoint = model_checkpoint(Path(model))
        config = load_run_config(checkpoint.run_dir)
        vocab = int(read_metadata(checkpoint.weights).get("tgt_vocab", "0"))
    except (MtError, ValueError):
        return None, 0
    vocab = vocab or config.tokenizer.vocab_size
    return model_products(config.model.dim, config.model.ffn_dim, vocab), config.decode.max_tokens


# --- translation ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Translator:
    """A model or ensemble with its tokenizer, decoding settings, device and precision.

    `dataclasses.replace(translator, decode=...)` gives one with other settings (mt serve's
    per-request beam).
    """

    tokenizer: Tokenizer
    model: Decoder
    decode: DecodeConfig
    device: torch.device
    precision: str = "fp32"

    @torch.no_grad()
    def batches(
        self,
        lines: Sequence[str],
        *,
        max_tokens: int | None = None,
        scores: bool = False,
        progress: bool = False,
        tgt_lang: str | None = None,
        prefixes: Sequence[list[int]] | None = None,
        constraints: Sequence[list[list[int]]] | None = None,
    ) -> Iterator[tuple[list[int], list[list[Translation]]]]:
        """(line indices, their n-best translations) batch by batch, longest batches last.

        Blank lines (and lines without pieces) come first, untranslated. `max_tokens` overrides
        decode.max_tokens; `scores` forces beam search even at beam 1. A line without a finite
        hypothesis gets `nbest` times NOT_FOUND. prefixes and constraints hold target pieces per
        line (see encode_prefixes and encode_constraints).
        """
        model, decode, device = self.model, self.decode, self.device
        ids = encode_sources(lines, self.tokenizer, model.max_positions - 1, tgt_lang)  # + EOS
        empty = [i for i, seq in enumerate(ids) if not seq]
        if empty:
            yield empty, [[EMPTY] * decode.nbest for _ in empty]
        bar = tqdm(
            total=len(lines) - len(empty), unit="sent", disable=not progress, file=sys.stderr
        )
        generator = None
        if decode.sampling:  # seed -1: fresh entropy, not torch's global stream, which every
            generator = torch.Generator(device)  # new process starts at the same fixed seed
            if decode.seed >= 0:
                generator.manual_seed(decode.seed)
            else:
                generator.seed()
        for batch in source_batches(ids, max_tokens or decode.max_tokens):
            src = collate_source([ids[i] for i in batch], batch).src.to(device)  # (B, S)
            rows = batch.tolist()
            prefix = (
                None if prefixes is None else search.prefixes([prefixes[i] for i in rows], device)
            )
            wanted = None if constraints is None else [constraints[i] for i in rows]
            wanted = None if wanted is None else Constraints.of(wanted, device)
            with autocast(device, self.precision):
                hypotheses = search.decode(model, src, decode, scores, prefix, wanted, generator)
            yield rows, [self._detokenise(hyps) for hyps in hypotheses]
            bar.update(len(batch))
        bar.close()

    def translate(self, lines: Sequence[str], **options: Any) -> list[list[Translation]]:
        """The n-best translations of every line, in input order; options as for batches."""
        out: list[list[Translation]] = [[] for _ in lines]
        for indices, translations in self.batches(lines, **options):
            for i, hyps in zip(indices, translations, strict=True):
                out[i] = hyps
        return out

    def _detokenise(self, hyps: Sequence[Any]) -> list[Translation]:
        """The `nbest` best finite-scored hypotheses of one line as Translations, one-line text.

        Always `nbest` of them: NOT_FOUND fills the places of outputs the search could not find
        (a length limit that leaves fewer possible outputs, unmet constraints, scores not finite).
        """
        nbest = self.decode.nbest
        hyps = [h for h in hyps if math.isfinite(h.score)][:nbest]
        texts = self.tokenizer.decode_tgt([list(h.tokens) for h in hyps]) if hyps else []
        found = [
            Translation(text.translate(LINE_BREAKS), float(h.score), list(h.tokens))
            for text, h in zip(texts, hyps, strict=True)
        ]
        return found + [NOT_FOUND] * (nbest - len(found))


def load_translator(
    models: Sequence[Path],
    device: str = "auto",
    precision: str = "auto",
    weights: Sequence[float] | None = None,
    quantization: str = "none",
    keep_memory: bool = True,
    **overrides: Any,
) -> tuple[Config, Translator, str]:
    """The first model's config, a Translator for the models, and their checkpoint(s).

    The device and precision are resolved as resolve_runtime does; the decoding settings are
    the run's with `overrides` (decode.*, None = the run's) applied; see load_models for the rest.
    """
    dev, prec = resolve_runtime(device, precision, models[0], quantization, keep_memory)
    config, tokenizer, model, checkpoints = load_models(models, dev, weights, quantization, prec)
    decode = decode_settings(config, **overrides)
    return config, Translator(tokenizer, model, decode, dev, prec), checkpoints


# --- output ---------------------------------------------------------------------------------


def format_translations(index: int, hyps: list[Translation], nbest: bool) -> list[str]:
    """Output lines for one input: its best text, or `index<TAB>score<TAB>text` per hypothesis."""
    if not nbest:
        return [hyps[0].text]
    return [f"{index}\t{h.score:.4f}\t{h.text.translate(_NBEST_BREAKS)}" for h in hyps]


class InOrderWriter:
    """Writes results in input order as soon as a contiguous prefix of them is complete."""

    def __init__(self, stream: IO[bytes], total: int, render: Callable[[int, Any], list[str]]):
        self.stream, self.total, self.render = stream, total, render
        self.pending: dict[int, Any] = {}
        self.next = 0

    def add(self, indices: Sequence[int], results: Sequence[Any]) -> None:
        """Buffer a batch's results, then write and flush the completed prefix."""
        self.pending.update(zip(indices, results, strict=True))
        lines = []
        while self.next in self.pending:
            lines.extend(self.render(self.next, self.pending.pop(self.next)))
            self.next += 1
        if lines:
            self.stream.write("".join(line + "\n" for line in lines).encode("utf-8"))
            self.stream.flush()

    def close(self) -> None:
        """Check that every line was written (a bug otherwise: output would be misaligned)."""
        if self.next != self.total:
            raise RuntimeError(f"wrote {self.next} of {self.total} lines")


@contextlib.contextmanager
def output_stream(output: Path | None) -> Iterator[IO[bytes]]:
    """stdout, or a temp file beside `output` renamed over it only once everything is written
    (gzipped if its name ends in .gz, as inputs named so are read)."""
    if output is None:
        sys.stdout.flush()
        with stdout_errors():
            yield sys.stdout.buffer
        return
    with atomic_write(Path(output)) as stream:  # nothing half-written is ever left behind
        if not Path(output).name.endswith(".gz"):
            yield stream
            return
        # The header names the output, not its temp file; closed before the rename.
        name = Path(output).name
        with gzip.GzipFile(name, mode="wb", fileobj=stream, mtime=0) as packed:
            yield packed  # type: ignore[misc]


def check_output_path(output: Path | None) -> None:
    """MtError unless `output` (None: stdout) is a file that can be written once all is done."""
    if output is None:
        if sys.stdout is None:  # started with stdout closed (>&-)
            raise MtError("stdout: closed; give --output FILE")
        return
    parent = Path(output).parent
    if parent.exists() and not parent.is_dir():
        raise MtError(f"{output}: {parent} is not a directory")
    if not parent.is_dir():
        raise MtError(f"{output}: directory {parent} does not exist")
    if Path(output).is_dir():
        raise MtError(f"{output}: is a directory, not a file to write")


def count_missing(translations: Sequence[Sequence[Translation]]) -> int:
    """How many lines got no translation because no hypothesis had a finite score."""
    return sum(not hyps[0].found for hyps in translations)


def check_found(
    checkpoint: Path | str, missing: int, total: int, what: str = "translation"
) -> None:
    """MtError naming the checkpoint when `missing` of `total` lines got no `what`."""
    if missing:
        raise MtError(
            f"{checkpoint}: the model's scores are not finite (diverged weights?): no "
            f"{what} for {missing} of {total} lines"
        )


def translate_file(
    source: str,
    models: Sequence[Path],
    output: Path | None = None,
    device: str = "auto",
    precision: str = "auto",
    tgt_lang: str | None = None,
    prefix: Path | None = None,
    constraints: Path | None = None,
    weights: Sequence[float] | None = None,
    quantization: str = "none",
    **overrides: Any,
) -> None:
    """`mt translate`: a file (or stdin, "-") through trained models; overrides are decode.*.

    Bad prefix or constraint files fail before anything is written.
    """
    check_stdin({"FILE": source, "--prefix": prefix, "--constraints": constraints})
    # Resolved first, so that a bad --device or --precision fails before stdin is read.
    dev, prec = resolve_runtime(device, precision, models[0], quantization)
    early = settings_before_input(models[0], **overrides)
    if constraints is not None and early is not None and early.sampling:
        raise MtError(f"--constraints {constraints}: constraints need beam search, not sampling")
    lines = list(read_lines(source))  # before loading the model: bad input fails fast
    prefix_rows = None if prefix is None else read_aligned(prefix, lines, source)
    constraint_rows = None if constraints is None else read_aligned(constraints, lines, source)
    check_output_path(output)
    config, translator, checkpoints = load_translator(
        models, str(dev), prec, weights, quantization, **overrides
    )
    tokenizer, decode = translator.tokenizer, translator.decode
    check_target(config, tokenizer, tgt_lang, lines, input_name(source))
    room = translator.model.max_positions - 2  # the output pieces before EOS
    prefixes = prefix_rows and encode_prefixes(prefix, prefix_rows, tokenizer, room)
    wanted = constraint_rows and encode_constraints(constraints, constraint_rows, tokenizer, room)
    # n-best format when asked for on the command line, or when the run's config asks for it.
    nbest = overrides.get("nbest") is not None or decode.nbest > 1
    missing = 0
    with output_stream(output) as stream:
        writer = InOrderWriter(
            stream, len(lines), lambda i, hyps: format_translations(i, hyps, nbest)
        )
        for indices, translations in translator.batches(
            lines,
            scores=nbest,
            progress=sys.stderr.isatty(),
            tgt_lang=tgt_lang,
            prefixes=prefixes,
            constraints=wanted,
        ):
            writer.add(indices, translations)
            missing += count_missing(translations)
            if wanted:
                warn_unmet(indices, translations, wanted)
        writer.close()
    check_found(checkpoints, missing, len(lines))  # once all is written, --output too
