"""`mt score`: how a model scores given translations, one line each (reranking, filtering).

A pair's score is what `mt translate --nbest` prints for that output when its search finds it:
the log-probability of the target's pieces and EOS given the source (an ensemble's weighted sum
of log-probabilities, renormalised, as search uses it), divided by the length penalty of
decode.length_penalty and decode.alpha. The pieces are the SentencePiece encoding of the target
text, which for a search's output is nearly always the pieces it produced. decode.min_len and
the output length limit do not apply: a score is the model's, whatever a search would allow.
That holds to float rounding in fp32; in bf16 and int8 the one teacher-forced pass over the
whole target and search's steps round (and quantise activations) differently, about 0.01 apart.

Beside each score, `--piece-scores` prints the log-probability of each piece and of EOS (the
terms of the unpenalised score); `--summary` prints instead one line for the whole input: the
cross-entropy per target piece and its perplexity, which for a run's dev set are the dev `nll`
and `ppl` that training logs.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple

import torch
from torch import Tensor
from tqdm import tqdm

from mt.batching import collate, pair_batches
from mt.corpora import check_stdin, input_name, read_lines
from mt.device import autocast
from mt.errors import MtError
from mt.metrics import perplexity
from mt.search import Decoder, length_penalty
from mt.translate import (
    InOrderWriter,
    Translator,
    check_decode_options,
    check_found,
    check_output_path,
    check_target,
    encode_sources,
    load_translator,
    output_stream,
    read_aligned,
    resolve_runtime,
)
from mt.vocab import PAD_ID

log = logging.getLogger("mt")


CHUNK_PAIRS = 20_000  # pairs encoded and batched at a time: never the whole input's ids at once
LOGITS_ELEMENTS = 2**24  # a batch's (B, T, V) scores at most (64 MiB in float32)


class Scored(NamedTuple):
    """Scores of some of the input's pairs."""

    indices: list[int]  # the pairs' places in the input
    scores: list[float | None]  # None: a blank source; nan: a pair too long for the model
    pieces: list[list[float]]  # log-probability of each target piece and EOS ([]: not scored)
    by_model: bool  # False for blank and too long pairs


def piece_logprobs(model: Decoder, src: Tensor, tgt_in: Tensor, tgt_out: Tensor) -> Tensor:
    """Log-probability of each piece of tgt_out (B, T) given src (B, S): (B, T) fp32, 0 at PAD.

    tgt_in is BOS then tgt_out's pieces; PAD pads the rows of both on the right.
    """
    memory = model.encode(src)  # (B, S, D)
    scores = model.decode(tgt_in, memory, src).float()  # (B, T, V): logits, or an ensemble's sum
    picked = scores.gather(2, tgt_out.unsqueeze(2)).squeeze(2)  # (B, T)
    picked = picked - torch.logsumexp(scores, dim=-1)  # log_softmax at the targets alone
    return picked.masked_fill(tgt_out == PAD_ID, 0.0)


def too_long(
    src_ids: list[list[int]], tgt_ids: list[list[int]], room: int, first: int
) -> list[int]:
    """Indices of the pairs with more than `room` pieces on a side, each named in a warning
    (line numbers from `first`)."""
    found = []
    for i, (src, tgt) in enumerate(zip(src_ids, tgt_ids, strict=True)):
        if src and max(len(src), len(tgt)) > room:
            log.warning(
                "line %d: %s source and %s target pieces, more than the model's %s: score nan",
                first + i, f"{len(src):,}", f"{len(tgt):,}", f"{room:,}",
            )  # fmt: skip
            found.append(i)
    return found


@torch.no_grad()
def score_pairs(
    translator: Translator,
    sources: Sequence[str],
    targets: Sequence[str],
    tgt_lang: str | None = None,
    progress: bool = False,
) -> Iterator[Scored]:
    """The pairs' scores, batch by batch.

    Pairs go CHUNK_PAIRS at a time, each chunk's blank sources first (unscored: `mt translate`
    leaves them blank too), then its batches by length.
    """
    bar = tqdm(total=len(sources), unit="pair", disable=not progress, file=sys.stderr)
    for start in range(0, len(sources), CHUNK_PAIRS):
        chunk = slice(start, start + CHUNK_PAIRS)
        for found in _score_chunk(translator, sources[chunk], targets[chunk], tgt_lang, start):
            yield found._replace(indices=[start + i for i in found.indices])
            bar.update(len(found.indices))
    bar.close()


def _score_chunk(
    translator: Translator,
    sources: Sequence[str],
    targets: Sequence[str],
    tgt_lang: str | None,
    start: int,
) -> Iterator[Scored]:
    """score_pairs for pairs that start at line `start` + 1 of the input."""
    model, decode, device = translator.model, translator.decode, translator.device
    room = model.max_positions - 1  # the pieces that fit beside EOS (source) or BOS (target)
    src_ids = encode_sources(sources, translator.tokenizer, sys.maxsize, tgt_lang)
    tgt_ids = translator.tokenizer.encode_tgt(list(targets))
    blank = [i for i, seq in enumerate(src_ids) if not seq]
    if blank:
        yield Scored(blank, [None] * len(blank), [[]] * len(blank), False)
    skipped = too_long(src_ids, tgt_ids, room, start + 1)
    if skipped:
        yield Scored(skipped, [math.nan] * len(skipped), [[]] * len(skipped), False)
    for i in skipped:
        src_ids[i] = []  # out of the batches
    budget = min(decode.max_tokens, LOGITS_ELEMENTS // translator.tokenizer.tgt_vocab_size)
    for batch in pair_batches(src_ids, tgt_ids, budget):
        rows = batch.tolist()
        pairs = collate([(src_ids[i], tgt_ids[i]) for i in rows], batch)
        src, tgt_in, tgt_out = (t.to(device) for t in (pairs.src, pairs.tgt_in, pairs.tgt_out))
        with autocast(device, translator.precision):
            picked = piece_logprobs(model, src, tgt_in, tgt_out)  # (B, T)
        lengths = (tgt_out != PAD_ID).sum(dim=1)  # (B,) pieces and EOS
        penalty = length_penalty(lengths, decode.alpha, decode.length_penalty)  # (B,)
        scores = picked.sum(dim=1) / penalty  # (B,)
        pieces = [row[:n] for row, n in zip(picked.tolist(), lengths.tolist(), strict=True)]
        yield Scored(rows, scores.tolist(), pieces, True)


def format_score(score: float | None) -> str:
    """One output line: the score with 4 decimals (as n-best output), empty for a blank source."""
    return "" if score is None else f"{score:.4f}"


def format_pieces(score: float | None, pieces: list[float]) -> str:
    """A line of `--piece-scores`: the score, a tab, each piece's log-probability, EOS's last."""
    if not pieces:  # blank source or not scored
        return format_score(score)
    return format_score(score) + "\t" + " ".join(f"{p:.4f}" for p in pieces)


class Summary:
    """`--summary`: the cross-entropy per target piece over every pair the model scored."""

    def __init__(self) -> None:
        self.logprob, self.pieces, self.pairs, self.unscored = 0.0, 0, 0, 0

    def add(self, found: Scored) -> None:
        """Count a batch's pairs."""
        if not found.by_model:
            self.unscored += len(found.indices)
            return
        self.logprob += sum(sum(row) for row in found.pieces)
        self.pieces += sum(len(row) for row in found.pieces)
        self.pairs += len(found.indices)

    def line(self) -> str:
        """E.g. "cross-entropy 1.6021 nats per piece, perplexity 4.9634, over 13,544 target
        pieces (EOS included) of 1,000 pairs"; then how many pairs were not scored, if any."""
        entropy = -self.logprob / self.pieces
        line = (
            f"cross-entropy {entropy:.4f} nats per piece, perplexity {perplexity(entropy):.4f}, "
            f"over {self.pieces:,} target pieces (EOS included) of {self.pairs:,} pairs"
        )
        if self.unscored:
            line += f"; {self.unscored:,} not scored (blank source or too long)"
        return line


def score_file(
    source: str,
    target: str,
    models: Sequence[Path],
    output: Path | None = None,
    device: str = "auto",
    precision: str = "auto",
    tgt_lang: str | None = None,
    weights: Sequence[float] | None = None,
    quantization: str = "none",
    piece_scores: bool = False,
    summary: bool = False,
    **overrides: Any,
) -> None:
    """`mt score`: one score per line pair of `source` and `target` (with each piece's, or one
    summary line instead); overrides are decode.*."""
    if piece_scores and summary:
        raise MtError("--piece-scores and --summary: give one (the summary has no lines)")
    penalty = [key for key in ("alpha", "length_penalty") if overrides.get(key) is not None]
    if summary and penalty:  # the summary is per piece, without a length penalty
        raise MtError(f"--{penalty[0].replace('_', '-')} and --summary: the summary is per piece")
    check_stdin({"SRC": source, "TGT": target})
    # Resolved first, so that a bad --device or --precision fails before stdin is read. Its
    # batches' shapes all differ: freed memory is given back (see configure_backends).
    dev, prec = resolve_runtime(device, precision, models[0], quantization, keep_memory=False)
    check_decode_options(models[0], **overrides)
    sources = list(read_lines(source))  # before loading the model: bad input fails fast
    targets = read_aligned(target, sources, source)
    check_output_path(output)
    config, translator, checkpoints = load_translator(
        models, str(dev), prec, weights, quantization, keep_memory=False, **overrides
    )
    check_target(config, translator.tokenizer, tgt_lang, sources, input_name(source))
    batches = score_pairs(translator, sources, targets, tgt_lang, sys.stderr.isatty())
    with output_stream(output) as stream:
        if summary:
            missing = _write_summary(stream, batches, source)
        else:
            missing = _write_scores(stream, batches, len(sources), piece_scores)
    check_found(checkpoints, missing, len(sources), "score")


def _write_scores(
    stream: IO[bytes], batches: Iterator[Scored], total: int, piece_scores: bool
) -> int:
    """Write a line per pair in input order; the number of pairs the model scored nan or inf."""
    if piece_scores:
        writer = InOrderWriter(stream, total, lambda _, found: [format_pieces(*found)])
    else:
        writer = InOrderWriter(stream, total, lambda _, found: [format_score(found[0])])
    missing = 0  # pairs the model scores nan or inf: diverged weights
    for found in batches:
        writer.add(found.indices, list(zip(found.scores, found.pieces, strict=True)))
        missing += found.by_model and sum(not math.isfinite(s) for s in found.scores)
    writer.close()
    return missing


def _write_summary(stream: IO[bytes], batches: Iterator[Scored], source: str) -> int:
    """Write the summary line; the number of pairs the model scored nan or inf."""
    summary, missing = Summary(), 0
    for found in batches:
        summary.add(found)
        missing += found.by_model and sum(not math.isfinite(s) for s in found.scores)
    if not summary.pieces:
        raise MtError(
            f"{input_name(source)}: no pair to score (every source line is blank or too long)"
        )
    stream.write((summary.line() + "\n").encode("utf-8"))
    return missing
