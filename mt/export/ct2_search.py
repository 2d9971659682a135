"""Translating with a CTranslate2 export as mt would: `translate_ct2`, and the options it passes.

The exported model computes mt's function; what differs is the search around it. Differences
from `mt translate` (`ct2_options` maps the rest exactly):

- Length penalty. CT2 divides by L^p; mt's "average" is p = 1 and "none" a tiny p (p = 0 would
  switch CT2 to stopping at the first finished top beam, where mt, like fairseq, stops after
  `beam` finished hypotheses). mt's default "gnmt", ((5 + L) / 6)^alpha, has no CT2 form: p is
  fitted to its slope at L = the source length, alpha * L / (5 + L), so it varies per batch.
- Length limit. CT2 takes one limit per call; `translate_ct2` batches sentences by source
  length, so each gets mt's a * length + b. At the limit mt forces EOS and scores it; CT2 stops
  without it, which can reorder beam hypotheses that reach the limit.
- PAD and BOS are banned before CT2's softmax, after mt's: scores differ by
  log(1 - p(PAD) - p(BOS)) per token, which can flip near-ties in a beam, never greedy choices.
  So is EOS below `decode.min_len`, where p(EOS) can be large: with a minimum length, beam
  outputs differ more often (greedy ones still never).
- Target prefixes. Both force them and raise the limit to hold them and EOS (CT2's counts the
  prefix too), but CT2 scores a hypothesis by what follows its prefix, where mt counts the
  prefix's log-probability as well: the same constant for every hypothesis of a sentence, which
  ranks them alike without a length penalty ("none"), not always with one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from mt.config import DecodeConfig
from mt.search import limits_of
from mt.tokenizer import Tokenizer
from mt.translate import encode_sources
from mt.vocab import BOS_ID, EOS_ID, PAD_ID

TINY_PENALTY = 1e-6  # CT2 length penalty standing in for mt's "none" (see the module docstring)


def output_limit(decode: DecodeConfig, source_length: int, max_positions: int, forced: int) -> int:
    """mt's output length limit (EOS included) for one source holding `forced` prefix pieces.

    `mt.search.output_limits`' rule: a * length + b, or for a prefix that does not fit in it
    with EOS, the prefix, b more and EOS.
    """
    lengths, pieces = torch.tensor([source_length]), torch.tensor([forced])
    cap = max_positions - 1
    return int(limits_of(lengths, decode.max_len_a, decode.max_len_b, cap, pieces)[0])


def ct2_options(
    decode: DecodeConfig,
    tokenizer: Tokenizer,
    source_length: int,
    max_positions: int,
    forced: int = 0,
) -> dict[str, Any]:
    """`Translator.translate_batch` options for sources of `source_length` tokens (EOS included).

    mt's search with `decode` as closely as CT2 allows, for prefixes of up to `forced` pieces;
    see the module docstring.
    """
    if decode.sampling:
        raise ValueError("ct2_options maps greedy and beam search; sampling is not mapped")
    limit = output_limit(decode, source_length, max_positions, forced)
    penalty = {
        "gnmt": decode.alpha * source_length / (5 + source_length),
        "average": 1.0,
        "none": TINY_PENALTY,
    }[decode.length_penalty]
    penalty = max(penalty, TINY_PENALTY)  # gnmt with alpha 0 is "none"; 0 would stop CT2 early
    banned = [[tokenizer.tgt.id_to_piece(PAD_ID)], [tokenizer.tgt.id_to_piece(BOS_ID)]]
    return {
        "beam_size": decode.beam,
        "length_penalty": penalty,
        "max_decoding_length": limit - 1,  # mt's limit counts EOS, CT2's does not
        "min_decoding_length": min(decode.min_len, limit - 1),  # the limit wins, as in mt
        "max_input_length": 0,  # sources are cut to max_positions - 1 pieces already
        "return_end_token": True,  # EOS counts in hypothesis lengths, as in mt
        "suppress_sequences": banned,
    }


def translate_ct2(
    translator: Any,
    tokenizer: Tokenizer,
    lines: Sequence[str],
    decode: DecodeConfig,
    max_positions: int,
    prefixes: Sequence[Sequence[int]] | None = None,
    tgt_lang: str | None = None,
) -> list[list[int]]:
    """Target ids (no EOS) per line from a CTranslate2 Translator, searching as mt would.

    Sentences are batched by source length and length limit, so each gets its exact mt limit;
    `prefixes` (target ids per line, as `mt.translate.encode_prefixes` gives) start the outputs
    as CTranslate2's `target_prefix`. Blank lines (and lines without pieces) give []. A
    multilingual model's sources start with their own tag or that of `tgt_lang`, as in `mt
    translate`.
    """
    ids = encode_sources(lines, tokenizer, max_positions - 1, tgt_lang)
    forced = [len(p) for p in prefixes] if prefixes is not None else [0] * len(lines)
    out: list[list[int]] = [[] for _ in lines]
    for length, batch in _batches(ids, forced, decode, max_positions):
        longest = max(forced[i] for i in batch)  # all of the batch share one limit
        options = ct2_options(decode, tokenizer, length, max_positions, longest)
        if options["max_decoding_length"] < 1:
            continue  # mt's limit allows only EOS: empty outputs
        sources = [[tokenizer.src.id_to_piece(t) for t in ids[i]] for i in batch]
        if prefixes is not None:
            options["target_prefix"] = [
                [tokenizer.tgt.id_to_piece(t) for t in prefixes[i]] for i in batch
            ]
        results = translator.translate_batch(
            sources, max_batch_size=decode.max_tokens, batch_type="tokens", **options
        )
        for i, result in zip(batch, results, strict=True):
            out[i] = _target_ids(tokenizer, result.hypotheses[0])
    return out


def _batches(
    ids: Sequence[list[int]], forced: Sequence[int], decode: DecodeConfig, max_positions: int
) -> list[tuple[int, list[int]]]:
    """(source length with EOS, line indices) of the non-empty sources, one per mt limit."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, seq in enumerate(ids):
        if seq:
            length = len(seq) + 1  # EOS
            groups[length, output_limit(decode, length, max_positions, forced[i])].append(i)
    return [(length, batch) for (length, _), batch in sorted(groups.items())]


def _target_ids(tokenizer: Tokenizer, hypothesis: list[str]) -> list[int]:
    """Ids of a CT2 hypothesis's pieces, without its end token."""
    ids = [tokenizer.tgt.piece_to_id(piece) for piece in hypothesis]
    return ids[:-1] if ids and ids[-1] == EOS_ID else ids
