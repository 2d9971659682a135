"""Decoding with the model's `encode()` / `decode()` and its incremental state.

`decode` is the entry point: it runs what a `DecodeConfig` asks for, greedy search, beam search
(fairseq-style) or sampling, each of which takes the same config. Shape legend:
    B  sentences          S  source length       D  model dimension    V  vocabulary size
    K  beam size          N  rows = B * K         T  tokens decoded so far

Conventions shared by every search:
- Scores are float32 log-probabilities, log_softmax(logits.float()) over the whole vocabulary;
  mixed precision is the caller's business. Tokens are banned (set to -inf) *after* the
  log_softmax, so a hypothesis' logprob is exactly what a teacher-forced forward pass gives it.
- PAD and BOS are never produced. EOS is banned until `min_len` tokens are out and forced when an
  output reaches its limit `max_lengths(...)`; the limit counts EOS, so an output holds at most
  limit - 1 tokens before its EOS. When the two clash the limit wins.
- Lengths given to the length penalty count the output tokens including EOS (never 0).
- Every search returns at least one hypothesis per sentence. A hypothesis' score may be -inf or
  nan when the model's scores are not finite (a diverged model): callers check, never index blindly.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mt.config import LENGTH_PENALTIES, DecodeConfig
from mt.model import DecoderState, Transformer
from mt.vocab import BOS_ID, EOS_ID, PAD_ID, strip_specials


@dataclass(frozen=True)
class Hypothesis:
    """One finished output: ids without BOS/EOS, its length-penalised score and log-probability.

    score and logprob may be -inf or nan when the model's scores are not finite.
    """

    tokens: list[int]
    score: float  # the ranking score: logprob / length_penalty(len(tokens) + 1)
    logprob: float  # sum of token log-probabilities, EOS included


class Ensemble:
    """Models searched as one: at each step, the weighted sum of their log-probabilities.

    A log-linear ensemble: search's log_softmax renormalises the sum, so an ensemble of one
    model with itself scores as the model. Each model keeps its own incremental state; the
    encoder memories travel concatenated along D, so search selects their rows as one tensor.
    """

    def __init__(self, models: Sequence[Transformer], weights: Sequence[float] | None = None):
        self.models = list(models)
        weights = [1.0] * len(self.models) if weights is None else list(weights)
        self.weights = [w / sum(weights) for w in weights]  # scores stay log-probabilities
        self.dims = [model.config.dim for model in self.models]
        self.max_positions = min(model.max_positions for model in self.models)

    def encode(self, src: Tensor, padded: bool = True) -> Tensor:
        """Source tokens (B, S) -> every model's memory, concatenated: (B, S, sum of D)."""
        return torch.cat([model.encode(src, padded) for model in self.models], dim=2)

    def decode(
        self,
        tgt_in: Tensor,
        memory: Tensor,
        src: Tensor,
        state: EnsembleState | None = None,
        padded: bool = True,
    ) -> Tensor:
        """New target tokens (N, T) -> the weighted sum of log-probs (N, T, V), float32.

        Without a state, tgt_in holds every target token (teacher forcing), as for a model.
        """
        total = None
        parts = memory.split(self.dims, dim=2)  # (B, S, D) per model
        states = [None] * len(self.models) if state is None else state.states
        for model, part, own, weight in zip(self.models, parts, states, self.weights, strict=True):
            logits = model.decode(tgt_in, part, src, own, padded)  # (N, T, V)
            lprobs = F.log_softmax(logits, dim=-1, dtype=torch.float32) * weight
            total = lprobs if total is None else total + lprobs
        assert total is not None
        return total  # (N, T, V)

    def init_state(self, max_len: int = 16) -> EnsembleState:
        """An empty incremental state for each model."""
        return EnsembleState([model.init_state(max_len) for model in self.models])


@dataclass
class EnsembleState:
    """The incremental decoding states of an ensemble's models, reordered together."""

    states: list[DecoderState]

    def reorder(self, index: Tensor, source_index: Tensor | None = None) -> None:
        """Select/reorder target rows in every model's state (see DecoderState.reorder)."""
        for state in self.states:
            state.reorder(index, source_index)


Decoder = Transformer | Ensemble  # what search decodes with


def decode(
    model: Decoder,
    src: Tensor,
    config: DecodeConfig,
    scores: bool = False,
    prefix: Tensor | None = None,
    constraints: Constraints | None = None,
    generator: torch.Generator | None = None,
) -> list[list[Hypothesis]]:
    """The hypotheses of each sentence of src (B, S) that `config` asks for, best first.

    `model` is one Transformer or an Ensemble. `prefix` (B, P), PAD after each row's pieces,
    forces how outputs start; `constraints` are phrases each output must contain, and take
    beam search (even at beam 1), with the best unconstrained hypotheses where none meets them.
    Sampling draws max(beam, nbest) outputs, with `generator`'s random numbers if given. A beam
    of 1 for one output without min_len is greedy search, unless `scores` asks for beam search's
    scores (n-best output prints them): greedy scores its outputs the same way, but its sums may
    differ in the last bits.
    """
    if constraints is not None:
        if config.sampling:
            raise ValueError("constraints need beam search, not sampling")
        return constrained_search(model, src, config, prefix, constraints)
    if config.sampling:
        return sample(model, src, config, generator, prefix)
    if config.beam == 1 and config.nbest == 1 and config.min_len == 0 and not scores:
        return greedy_search(model, src, config, prefix)
    return beam_search(model, src, config, prefix)


def max_lengths(src: Tensor, a: float, b: int, limit: int) -> Tensor:
    """Per-sentence output length limits a * source length + b, capped at `limit`: (B,) long."""
    return limits_of((src != PAD_ID).sum(dim=1), a, b, limit)  # real tokens, EOS included


def output_limits(
    model: Decoder, src: Tensor, config: DecodeConfig, forced: Tensor | None = None
) -> Tensor:
    """Each sentence's length limit (B,): `max_lengths`, or where the `forced` pieces and EOS
    do not fit in it, those pieces, max_len_b more and EOS.

    forced (B,) counts the pieces a sentence's output must hold (prefix and constraints), so
    that a prefix or constraint longer than the usual limit still leaves room to go on and end;
    one that fits keeps the limit (an output given back as a prefix gives that output).
    """
    src_len = (src != PAD_ID).sum(dim=1)  # (B,) real tokens, EOS included
    return limits_of(src_len, config.max_len_a, config.max_len_b, model.max_positions - 1, forced)


def limits_of(src_len: Tensor, a: float, b: int, cap: int, forced: Tensor | None = None) -> Tensor:
    """`output_limits` (B,) of sources of `src_len` (B,) tokens, EOS included: a * src_len + b,
    or the `forced` pieces, b more and EOS where those do not fit; at most `cap`."""
    limit = (a * src_len.float() + b).long().clamp(1, cap)  # (B,)
    if forced is None:
        return limit
    return torch.where(forced + 1 > limit, forced + b + 1, limit).clamp(max=cap)


def forced_pieces(prefix: Tensor | None, constraints: Constraints | None) -> Tensor | None:
    """The pieces (B,) each sentence's output must hold: its prefix and its constraints."""
    counts = [] if prefix is None else [(prefix != PAD_ID).sum(dim=1)]
    if constraints is not None:
        counts.append(constraints.lengths.sum(dim=1))
    return sum(counts[1:], counts[0]) if counts else None


def length_penalty(length: Tensor | int, alpha: float, kind: str) -> Tensor | float:
    """Divisor of a log-probability; `length` counts output tokens including EOS."""
    if kind == "gnmt":  # Wu et al. 2016
        return ((5 + length) / 6) ** alpha
    if kind == "average":  # plain length normalisation, alpha ignored
        return length.float() if isinstance(length, Tensor) else float(length)
    if kind == "none":
        return torch.ones_like(length, dtype=torch.float) if isinstance(length, Tensor) else 1.0
    raise ValueError(f"length penalty must be one of {LENGTH_PENALTIES}, got {kind!r}")


def plan(src: Tensor, limit: Tensor) -> tuple[int, bool]:
    """The steps to run (the longest of `limit` (B,)) and whether src holds padding: one read.

    Without padding the model attends without masks, which lets SDPA use its fastest kernels.
    """
    steps, padded = torch.stack([limit.max(), (src == PAD_ID).any()]).tolist()
    return steps, bool(padded)


def banned_logprobs(
    logits: Tensor, step: int, min_len: int, forced: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Float32 log-probs (N, V), PAD/BOS banned, EOS banned before min_len; EOS's unbanned (N,).

    A row with a forced piece (forced (N,), PAD for none) keeps only that piece's log-prob.
    """
    lprobs = F.log_softmax(logits, dim=-1, dtype=torch.float32)  # (N, V), masked in place below
    eos = lprobs[:, EOS_ID].clone()  # (N,) kept for rows at their limit, where EOS is forced
    kept = None if forced is None else lprobs.gather(1, forced.unsqueeze(1))  # (N, 1)
    lprobs[:, PAD_ID] = -math.inf  # one column at a time: a list index would be a host upload
    lprobs[:, BOS_ID] = -math.inf
    if step < min_len:
        lprobs[:, EOS_ID] = -math.inf
    if forced is not None and kept is not None:
        free = (forced == PAD_ID).unsqueeze(1)  # (N, 1) rows past their prefix
        lprobs.masked_fill_(~free, -math.inf)
        # A free row writes -inf to PAD's column, banned already.
        lprobs.scatter_(1, forced.unsqueeze(1), kept.masked_fill(free, -math.inf))
    return lprobs, eos


def step_logprobs(
    logits: Tensor, step: int, limit: Tensor, min_len: int, forced: Tensor | None = None
) -> Tensor:
    """Float32 log-probs (N, V) of token step+1: PAD/BOS banned, EOS banned or forced.

    A forced piece (forced (N,), PAD for none) is never at the limit: limits leave it room.
    """
    lprobs, eos = banned_logprobs(logits, step, min_len, forced)  # (N, V), (N,)
    at_limit = step + 1 >= limit  # (N,)
    lprobs.masked_fill_(at_limit.unsqueeze(1), -math.inf)
    lprobs[:, EOS_ID] = torch.where(at_limit, eos, lprobs[:, EOS_ID])
    return lprobs  # (N, V)


def strip(tokens: Tensor) -> list[list[int]]:
    """Rows of output ids (B, L) cut at the first EOS, without specials."""
    return [strip_specials(row) for row in tokens.tolist()]


# ---------------------------------------------------------------------------------------------
# Greedy search and sampling: one output per row, rows run until EOS or their limit.


@torch.no_grad()
def greedy_search(
    model: Decoder, src: Tensor, config: DecodeConfig, prefix: Tensor | None = None
) -> list[list[Hypothesis]]:
    """Batched greedy decoding: the most probable token at each step, until EOS or the limit.

    One hypothesis per sentence, scored as beam search scores it: the log-probabilities tell
    whether the model's scores were finite at all (a NaN argmax still picks a token).
    """
    if src.size(0) == 0:
        return []
    tokens, logprobs = decode_rows(model, src, config, pick_argmax, prefix=prefix)  # (B, T), (B,)
    return [
        [finished_hypothesis(ids, lp, config.alpha, config.length_penalty)]
        for ids, lp in zip(strip(tokens), logprobs.tolist(), strict=True)
    ]


def pick_argmax(lprobs: Tensor) -> Tensor:
    """The most probable token of each row: (N, V) -> (N,)."""
    return lprobs.argmax(dim=-1)


def decode_rows(
    model: Decoder,
    src: Tensor,
    config: DecodeConfig,
    pick: Callable[[Tensor], Tensor],
    copies: int = 1,
    prefix: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Extend `copies` rows per source by `pick(lprobs)` until EOS, within config's lengths.

    Each row starts with its source's `prefix` (B, P) pieces, forced. Returns ids (N, T) with
    PAD after EOS and logprobs (N,), N = B * copies, rows of a source consecutive.
    """
    limit = output_limits(model, src, config, forced_pieces(prefix, None))  # (B,)
    steps, padded = plan(src, limit)
    memory = model.encode(src, padded).repeat_interleave(copies, dim=0)  # (N, S, D)
    src, limit = src.repeat_interleave(copies, dim=0), limit.repeat_interleave(copies)  # (N, ...)
    prefix = None if prefix is None else prefix.repeat_interleave(copies, dim=0)  # (N, P)
    N = src.size(0)
    state = model.init_state(steps)
    token = torch.full((N,), BOS_ID, dtype=torch.long, device=src.device)  # (N,)
    finished = torch.zeros(N, dtype=torch.bool, device=src.device)  # (N,)
    total = torch.zeros(N, device=src.device)  # (N,) float32
    out = []
    for t in range(steps):
        logits = model.decode(token.unsqueeze(1), memory, src, state, padded)[:, -1]  # (N, V)
        lprobs = step_logprobs(logits, t, limit, config.min_len, forced_at(prefix, t))  # (N, V)
        token = pick(lprobs).masked_fill(finished, PAD_ID)  # (N,)
        gained = lprobs.gather(1, token.unsqueeze(1)).squeeze(1)  # (N,)
        total += gained.masked_fill(finished, 0.0)
        out.append(token)
        finished |= token == EOS_ID
        if bool(finished.all()):  # the step's one wait for the device
            break
    return torch.stack(out, dim=1), total  # (N, T), (N,)


def prefixes(rows: Sequence[Sequence[int]], device: torch.device) -> Tensor | None:
    """Each sentence's forced first pieces as (B, P), PAD after them; None when all are empty."""
    P = max((len(row) for row in rows), default=0)
    if P == 0:
        return None
    padded = [[*row, *[PAD_ID] * (P - len(row))] for row in rows]
    return torch.tensor(padded, dtype=torch.long, device=device)  # (B, P)


def forced_at(prefix: Tensor | None, step: int) -> Tensor | None:
    """The piece each row (N,) must produce at `step` (PAD: any), None once every prefix is out."""
    return None if prefix is None or step >= prefix.size(1) else prefix[:, step]


def sampling_weights(lprobs: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Unnormalised sampling log-weights (N, V): tempered, -inf outside the top-k / nucleus."""
    weights = lprobs / temperature  # (N, V)
    if top_k > 0:
        kth = weights.topk(min(top_k, weights.size(1)), dim=-1).values[:, -1:]  # (N, 1)
        weights = weights.masked_fill(weights < kth, -math.inf)
    if top_p < 1.0:
        ordered, order = weights.sort(dim=-1, descending=True)  # (N, V) each
        probs = ordered.softmax(dim=-1)  # (N, V)
        before = probs.cumsum(dim=-1) - probs  # (N, V) mass of the more probable tokens
        drop = before >= top_p  # the most probable token always stays
        weights = weights.masked_fill(drop.scatter(1, order, drop), -math.inf)
    return weights  # (N, V)


@torch.no_grad()
def sample(
    model: Decoder,
    src: Tensor,
    config: DecodeConfig,
    generator: torch.Generator | None = None,
    prefix: Tensor | None = None,
) -> list[list[Hypothesis]]:
    """max(beam, nbest) independent samples per sentence, by length-penalised score, best first."""
    if src.size(0) == 0:
        return []
    num = max(config.beam, config.nbest)

    def pick(lprobs: Tensor) -> Tensor:
        """One token per row (N,) drawn from the filtered distribution."""
        weights = sampling_weights(lprobs, config.temperature, config.top_k, config.top_p)
        probs = weights.softmax(dim=-1)  # (N, V)
        # A model whose scores are not finite gives rows multinomial refuses: they end there.
        broken = ~probs.isfinite().all(dim=1)  # (N,)
        probs = probs.masked_fill(broken.unsqueeze(1), 0.0)
        probs[:, EOS_ID] += broken.float()
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    tokens, logprobs = decode_rows(model, src, config, pick, copies=num, prefix=prefix)
    hyps = [
        finished_hypothesis(ids, lp, config.alpha, config.length_penalty)
        for ids, lp in zip(strip(tokens), logprobs.tolist(), strict=True)
    ]
    return [ranked(hyps[i : i + num], num) for i in range(0, len(hyps), num)]


def finished_hypothesis(tokens: list[int], logprob: float, alpha: float, kind: str) -> Hypothesis:
    """The Hypothesis for `tokens` (EOS excluded) of log-probability `logprob` (EOS included)."""
    return Hypothesis(tokens, logprob / length_penalty(len(tokens) + 1, alpha, kind), logprob)


def ranked(hyps: list[Hypothesis], n: int) -> list[Hypothesis]:
    """The n best hypotheses by score, best first (stable on ties), nan last.

    A nan key would leave sorted's order undefined: a sample that diverged sorts as -inf.
    """
    return sorted(hyps, key=lambda h: -h.score if h.score == h.score else math.inf)[:n]


# ---------------------------------------------------------------------------------------------
# Beam search. All sentences' beams live in one batch of rows, K consecutive rows per sentence;
# sentences leave the batch as soon as they are done. On a GPU the host waits for the device
# once per step, to learn which sentences are done; everything else stays on the device, and
# the hypotheses set aside are read back once, at the end.


@dataclass
class Beams:
    """Live beams of the B' sentences still searching, G rows each, plus their decoder inputs.

    G is 1 before the first step (every beam of a sentence would hold the same BOS), K after.
    A sentence's beams are in no particular order: each continues in its origin's row where it
    can (stay_in_place), and sentences keep theirs as others leave (kept_in_place), so that
    reordering the decoder's caches copies few rows.
    """

    sent: Tensor  # (B',) index of each sentence in the caller's batch
    tokens: Tensor  # (B'*G, 1+T) BOS then the tokens so far
    scores: Tensor  # (B'*G,) float32 running log-probabilities (-inf: not a real beam)
    count: Tensor  # (B',) finished hypotheses set aside so far
    limit: Tensor  # (B',) output length limits (EOS included)
    memory: Tensor  # (B', S, D) one row per sentence: its G beams share it
    src: Tensor  # (B', S)
    state: DecoderState | EnsembleState
    progress: Progress | None = None  # (B'*G rows) through the constraints, if any

    @property
    def rows_per_sentence(self) -> int:
        """G, the target rows of each sentence."""
        return self.tokens.size(0) // self.sent.size(0)

    def rows(self, beams: Tensor) -> Tensor:
        """Row index of each sentence's beams `beams` (B', n), each in [0, G): (B', n)."""
        first = torch.arange(self.sent.size(0), device=beams.device) * self.rows_per_sentence
        return first.unsqueeze(1) + beams  # (B', n)


def start_beams(
    model: Decoder,
    src: Tensor,
    limit: Tensor,
    steps: int,
    padded: bool,
    constraints: Constraints | None = None,
) -> Beams:
    """Encode each sentence once; one row per sentence until the first step expands it."""
    B, device = src.size(0), src.device
    return Beams(
        sent=torch.arange(B, device=device),
        tokens=torch.full((B, 1), BOS_ID, dtype=torch.long, device=device),
        scores=torch.zeros(B, device=device),
        count=torch.zeros(B, dtype=torch.long, device=device),
        limit=limit,
        memory=model.encode(src, padded),  # (B, S, D)
        src=src,  # (B, S)
        state=model.init_state(steps),
        progress=None if constraints is None else Progress.start(constraints.lengths),
    )


@dataclass
class Finished:
    """Hypotheses set aside, kept on the device: slot j of sentence b is row b*K + j.

    The last row is a spare that takes the writes of candidates not set aside, so that filing
    is a fixed number of writes: selecting the real ones would make the host wait for the device.
    """

    beam: int  # K, the slots per sentence
    tokens: Tensor  # (B*K+1, L) output ids without BOS and EOS, then PAD; L the longest limit
    lengths: Tensor  # (B*K+1,) long: output tokens before EOS, -1 for an empty slot
    logprobs: Tensor  # (B*K+1,) float32, EOS included

    @classmethod
    def empty(cls, sentences: int, beam: int, steps: int, device: torch.device) -> Finished:
        """K empty slots for each of `sentences`, for outputs of up to `steps` tokens."""
        rows = sentences * beam + 1
        return cls(
            beam=beam,
            tokens=torch.full((rows, steps), PAD_ID, dtype=torch.long, device=device),
            lengths=torch.full((rows,), -1, dtype=torch.long, device=device),
            logprobs=torch.zeros(rows, device=device),
        )

    @property
    def spare(self) -> int:
        """The row that takes the writes of candidates not set aside."""
        return self.lengths.size(0) - 1

    def file(self, beams: Beams, slots: Tensor, rows: Tensor, logprobs: Tensor) -> None:
        """Set aside `beams` rows (B', n), each ended by EOS with `logprobs`, into `slots`."""
        T = beams.tokens.size(1) - 1  # output tokens so far
        slots = slots.reshape(-1)  # (B'*n,)
        self.tokens[slots, :T] = beams.tokens.index_select(0, rows.reshape(-1))[:, 1:]
        self.lengths[slots] = T
        self.logprobs[slots] = logprobs.reshape(-1)

    def hypotheses(self, nbest: int, alpha: float, kind: str) -> list[list[Hypothesis]]:
        """Each sentence's `nbest` best hypotheses, best first: the host's one read of them."""
        lengths, logprobs, tokens = (t.tolist() for t in (self.lengths, self.logprobs, self.tokens))
        slots = [
            finished_hypothesis(tokens[i][:n], logprobs[i], alpha, kind) if n >= 0 else None
            for i, n in enumerate(lengths[: self.spare])
        ]
        return [
            ranked([h for h in slots[b : b + self.beam] if h is not None], nbest)
            for b in range(0, self.spare, self.beam)
        ]


VOCAB_BLOCK = 64  # preferred column block width of `block_topk`


@functools.cache
def block_width(vocab: int, k: int) -> int:
    """A width near VOCAB_BLOCK dividing `vocab` for `block_topk`; 0 where plain topk is as good."""
    for width in sorted(range(16, 129), key=lambda w: abs(w - VOCAB_BLOCK)):
        if vocab % width == 0 and vocab >= 4 * k * width:
            return width
    return 0


def block_topk(x: Tensor, k: int, width: int) -> tuple[Tensor, Tensor]:
    """Values and ids of the k largest entries of each row of x (N, V), as x.topk(k, dim=1).

    A row's k largest entries lie in its k blocks of `width` columns with the highest maxima: a
    block outside them has k blocks at least as high, each with an entry at least as high. So
    one max per block and a top-k over k * width candidates replace a top-k over V.
    """
    N, V = x.shape
    blocks = V // width
    maxima = x.view(N, blocks, width).amax(2)  # (N, V/width)
    best = maxima.topk(k, dim=1).indices  # (N, k) block of each candidate group
    rows = torch.arange(N, device=x.device).unsqueeze(1) * blocks + best  # (N, k)
    candidates = x.view(N * blocks, width).index_select(0, rows.view(-1))  # (N*k, width)
    values, pick = candidates.view(N, k * width).topk(k, dim=1)  # (N, k) each
    return values, best.gather(1, pick // width) * width + pick % width


def row_candidates(
    logits: Tensor, step: int, limit: Tensor, min_len: int, k: int, forced: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The k best next tokens of each row by `step_logprobs`: log-probs and ids, (N, k) each.

    The same as `step_logprobs(...).topk(k)`, but the length limit is applied to the k
    candidates rather than to all V tokens: a row at its limit keeps only EOS, with its score.
    """
    lprobs, eos = banned_logprobs(logits, step, min_len, forced)  # (N, V), (N,)
    k = min(k, lprobs.size(1))
    width = block_width(lprobs.size(1), k)
    top, tokens = block_topk(lprobs, k, width) if width else lprobs.topk(k, dim=1)  # (N, k)
    at_limit = (step + 1 >= limit).unsqueeze(1)  # (N, 1)
    first = torch.arange(k, device=top.device) == 0  # (k,) where EOS goes
    top = torch.where(at_limit, torch.where(first, eos.unsqueeze(1), -math.inf), top)
    return top, torch.where(at_limit & first, EOS_ID, tokens)  # (N, k) each


def expand_candidates(
    scores: Tensor, top: Tensor, tokens: Tensor, sentences: int, beam: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The 2K best one-token extensions per sentence: scores, origin beams, tokens, each (B', 2K).

    2K, because at most K of them (one per beam) end in EOS: K live ones always remain. A
    sentence's 2K best extensions are among its rows' own 2K best, `top` and `tokens`
    (B'*G, k) from `row_candidates`, so only those are ranked.
    """
    N, k = top.shape
    total = (top + scores.unsqueeze(1)).view(sentences, -1)  # (B', G*k)
    tokens = tokens.view(sentences, -1)  # (B', G*k)
    missing = 2 * beam - total.size(1)  # > 0 only for a vocabulary under 2K at the first step
    if missing > 0:
        total = F.pad(total, (0, missing), value=-math.inf)  # impossible extensions
        tokens = F.pad(tokens, (0, missing), value=PAD_ID)
    best, pick = total.topk(2 * beam, dim=1)  # (B', 2K) each, best first
    origin = (pick // k).clamp(max=N // sentences - 1)  # (B', 2K)
    return best, origin, tokens.gather(1, pick)


def set_aside_finished(
    finished: Finished, beams: Beams, candidates: tuple[Tensor, Tensor, Tensor]
) -> Tensor:
    """File EOS candidates ranked in their sentence's top K, up to K per sentence: count (B',)."""
    K = finished.beam
    scores, origin, tokens = (c[:, :K] for c in candidates)  # (B', K) each
    ends = (tokens == EOS_ID) & scores.isfinite()  # (B', K) best first
    slot = beams.count.unsqueeze(1) + ends.cumsum(dim=1) - 1  # (B', K) the slot of each end
    filed = ends & (slot < K)  # (B', K)
    slots = torch.where(filed, beams.sent.unsqueeze(1) * K + slot, finished.spare)  # (B', K)
    finished.file(beams, slots, beams.rows(origin), scores)
    return (beams.count + ends.sum(dim=1)).clamp(max=K)  # (B',)


def set_aside_live(finished: Finished, beams: Beams, eos: Tensor, stuck: Tensor) -> None:
    """File the live beams of the sentences `stuck` (B',) bool, ended by EOS of log-prob eos (N,).

    For sentences at their limit with no hypothesis of finite score, i.e. whose model's scores
    are not finite: they get their beams, with non-finite scores, rather than nothing.
    """
    G = beams.rows_per_sentence
    beam = torch.arange(G, device=eos.device).expand(stuck.size(0), G)  # (B', G)
    slots = torch.where(
        stuck.unsqueeze(1), beams.sent.unsqueeze(1) * finished.beam + beam, finished.spare
    )
    finished.file(beams, slots, beams.rows(beam), (beams.scores + eos).view(-1, G))


def select_live(candidates: tuple[Tensor, Tensor, Tensor], beam: int) -> tuple[Tensor, ...]:
    """The K best candidates not ending in EOS: scores, origin beams, tokens, each (B', K)."""
    scores, origin, tokens = candidates  # (B', 2K) each
    position = torch.arange(2 * beam, device=tokens.device)  # (2K,)
    rank = (tokens == EOS_ID).long() * (2 * beam) + position  # (B', 2K) EOS after all others
    pick = rank.topk(beam, dim=1, largest=False).indices  # (B', K) in score order
    return scores.gather(1, pick), origin.gather(1, pick), tokens.gather(1, pick)


def stay_in_place(origin: Tensor) -> Tensor:
    """An order of each sentence's new beams (B', K) in which most sit in their origin's row.

    A beam's row is where its cache is: the best new beam of each origin takes the origin's row,
    the others the rows of origins left without a new beam, so a reorder copies only those.
    """
    B, K = origin.shape
    slots = torch.arange(K, device=origin.device)
    of = origin.unsqueeze(2) == slots  # (B', K beams, K rows) beam i descends from row j
    first = (of & (of.cumsum(1) == 1)).any(2)  # (B', K) the best beam of its origin
    taken = of.any(1)  # (B', K) rows whose origin has a new beam
    free = taken.to(torch.uint8).argsort(dim=1, stable=True)  # (B', K) free rows first
    rank = ((~first).cumsum(1) - 1).clamp(min=0)  # (B', K) each other beam's rank among them
    row = torch.where(first, origin, free.gather(1, rank))  # (B', K) a permutation of rows
    return torch.empty_like(row).scatter_(1, row, slots.expand(B, K))  # beam at each row


def kept_in_place(done: Tensor, kept: int) -> Tensor:
    """The `kept` sentences not `done` (B',) bool, most of them where they are: (B'',).

    Those among the first `kept` stay; those after take the places of the done ones there, in
    order; all without a wait for the device (the host knows `kept`).
    """
    position = torch.arange(done.size(0), device=done.device)
    head = position < kept
    movers = (done | head).to(torch.uint8).argsort(stable=True)  # kept ones of the tail first
    hole = (done.long().cumsum(0) - 1).clamp(min=0)  # (B',) each done sentence's rank
    return torch.where(done[:kept], movers[hole[:kept]], position[:kept])


def advance(
    beams: Beams,
    candidates: tuple[Tensor, Tensor, Tensor],
    done: Tensor,
    kept: int,
    beam: int,
    constraints: Constraints | None = None,
) -> Beams:
    """Continue the K best live candidates of the `kept` sentences not `done` (B',) bool."""
    scores, origin, tokens = select_live(candidates, beam)  # (B', K) each
    if beams.rows_per_sentence == beam:
        order = stay_in_place(origin)  # (B', K)
        scores, origin, tokens = (t.gather(1, order) for t in (scores, origin, tokens))
    # Sentences done leave, unless none is: the host knows how many stay.
    keep = None if kept == done.size(0) else kept_in_place(done, kept)  # (B'',)

    def kept_rows(x: Tensor) -> Tensor:  # per-sentence x (B', ...) -> (B'', ...)
        return x if keep is None else x.index_select(0, keep)

    rows = kept_rows(beams.rows(origin)).view(-1)  # (B''*K,) by origin beam
    beams.state.reorder(rows, keep)
    new = kept_rows(tokens).view(-1)  # (B''*K,)
    progress = None
    if beams.progress is not None and constraints is not None:
        phrases, lengths = constraints.rows(beams.sent, beams.rows_per_sentence)  # (B'*G, ...)
        progress = beams.progress.select(rows).after(new, phrases[rows], lengths[rows])
    return Beams(
        sent=kept_rows(beams.sent),
        tokens=torch.cat([beams.tokens.index_select(0, rows), new.unsqueeze(1)], dim=1),
        scores=kept_rows(scores).view(-1),  # (B''*K,)
        count=kept_rows(beams.count),
        limit=kept_rows(beams.limit),
        memory=kept_rows(beams.memory),  # (B'', S, D)
        src=kept_rows(beams.src),  # (B'', S)
        state=beams.state,
        progress=progress,
    )


def step_candidates(
    logits: Tensor,
    beams: Beams,
    step: int,
    config: DecodeConfig,
    prefix: Tensor | None,
    constraints: Constraints | None,
) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor]:
    """The step's 2K candidates per sentence (B', 2K) x3, and each row's EOS log-prob (N,).

    logits (N, V), N = B'*G. Forced prefix pieces narrow them; constraints rank them by
    dynamic beam allocation (see constrained_candidates).
    """
    beam, G = config.beam, beams.rows_per_sentence
    row_limit = beams.limit.repeat_interleave(G)  # (B'*G,)
    forced = forced_at(prefix, step)  # (B,) or None
    forced = None if forced is None else forced.index_select(0, beams.sent).repeat_interleave(G)
    if constraints is not None:
        lprobs = step_logprobs(logits, step, row_limit, config.min_len, forced)  # (B'*G, V)
        room = row_limit - (step + 2)  # (B'*G,) pieces that may follow this step's, before EOS
        return constrained_candidates(lprobs, beams, constraints, beam, room)
    top = row_candidates(logits, step, row_limit, config.min_len, 2 * beam, forced)  # x2 (N, 2K)
    candidates = expand_candidates(beams.scores, *top, beams.sent.size(0), beam)  # (B', 2K) x3
    return candidates, top[0][:, 0]  # EOS is first at the limit


@torch.no_grad()
def beam_search(
    model: Decoder,
    src: Tensor,
    config: DecodeConfig,
    prefix: Tensor | None = None,
    constraints: Constraints | None = None,
) -> list[list[Hypothesis]]:
    """Beam search over src (B, S): B lists of 1 to `nbest` hypotheses, best score first.

    fairseq's criterion: a sentence stops once `beam` hypotheses have ended (an EOS candidate
    counts if it ranks in the step's top K), or at its length limit where every beam ends.
    Fewer than nbest come back only when the length limit leaves fewer possible outputs, or
    when the model's scores are not finite: a sentence none of whose hypotheses has a finite
    score gets its live beams at the limit, whose scores may be -inf or nan. With constraints,
    only hypotheses that meet them all end (so fewer may come back), and a candidate that can
    no longer meet them within the limit is dropped (see constrained_candidates); a sentence
    left without any candidate stops there, and one with no hypothesis then gets its live beams
    with score -inf (see constrained_search).
    """
    if src.size(0) == 0:
        return []
    beam = config.beam
    limit = output_limits(model, src, config, forced_pieces(prefix, constraints))  # (B,)
    steps, padded = plan(src, limit)
    finished = Finished.empty(src.size(0), beam, steps, src.device)
    beams = start_beams(model, src, limit, steps, padded, constraints)
    for step in range(steps):
        tokens, memory, state = beams.tokens[:, -1:], beams.memory, beams.state
        logits = model.decode(tokens, memory, beams.src, state, padded)  # (B'*G, 1, V)
        candidates, eos = step_candidates(logits[:, -1], beams, step, config, prefix, constraints)
        beams.count = set_aside_finished(finished, beams, candidates)
        ends = step + 1 >= beams.limit  # (B',) at the limit
        if constraints is not None:  # no candidate can meet the phrases any more: end now
            ends |= ~candidates[0].isfinite().any(dim=1)
        done, stuck = ends | (beams.count >= beam), ends & (beams.count == 0)
        done_now, stuck_now = torch.stack([done, stuck]).tolist()  # the step's one wait
        if any(stuck_now):
            set_aside_live(finished, beams, eos, stuck)
        if all(done_now):
            break
        beams = advance(beams, candidates, done, done_now.count(False), beam, constraints)
    return finished.hypotheses(config.nbest, config.alpha, config.length_penalty)


# ---------------------------------------------------------------------------------------------
# Lexically constrained beam search with dynamic beam allocation (Post & Vilar 2018), in the
# vectorised form of Hu et al. 2019: every row's progress through its sentence's phrases is a
# few tensors, and one step ranks every sentence's candidates at once, without a Python loop.


ENDS_BUDGET = 1 << 22  # phrase-piece comparisons at once in Progress.ends


@dataclass(frozen=True)
class Constraints:
    """The phrases each sentence's output must contain, in any order; empty slots pad C."""

    phrases: Tensor  # (B, C, L) long: each phrase's ids, then PAD
    lengths: Tensor  # (B, C) long: pieces per phrase, 0 for an empty slot

    @classmethod
    def of(
        cls, rows: Sequence[Sequence[Sequence[int]]], device: torch.device
    ) -> Constraints | None:
        """The constraints of each sentence's phrases (lists of ids); None when there are none.

        An empty phrase constrains nothing: it is dropped."""
        rows = [essential([phrase for phrase in row if phrase]) for row in rows]
        C = max((len(row) for row in rows), default=0)
        if C == 0:
            return None
        L = max(len(phrase) for row in rows for phrase in row)
        phrases = torch.full((len(rows), C, L), PAD_ID, dtype=torch.long)
        lengths = torch.zeros(len(rows), C, dtype=torch.long)
        for b, row in enumerate(rows):
            for c, phrase in enumerate(row):
                phrases[b, c, : len(phrase)] = torch.tensor(phrase, dtype=torch.long)
                lengths[b, c] = len(phrase)
        return cls(phrases.to(device), lengths.to(device))

    def rows(self, sent: Tensor, copies: int) -> tuple[Tensor, Tensor]:
        """Phrases (N, C, L) and lengths (N, C) of `copies` rows per sentence `sent` (B',)."""
        phrases = self.phrases.index_select(0, sent).repeat_interleave(copies, dim=0)
        return phrases, self.lengths.index_select(0, sent).repeat_interleave(copies, dim=0)

    def select(self, index: Tensor) -> Constraints:
        """The constraints of sentences `index` (B',)."""
        return Constraints(self.phrases.index_select(0, index), self.lengths.index_select(0, index))


def essential(row: Sequence[Sequence[int]]) -> list[Sequence[int]]:
    """A sentence's phrases less those inside another of them (and repeats of one).

    An output holding the rest holds them too; kept, they would have to occur a second time,
    since Progress matches one phrase at a time ("New York" inside "New York Times").
    """
    return [
        phrase
        for i, phrase in enumerate(row)
        if not any(
            j != i and contains(other, phrase) and (len(other) > len(phrase) or j < i)
            for j, other in enumerate(row)
        )
    ]


def contains(tokens: Sequence[int], phrase: Sequence[int]) -> bool:
    """Whether `phrase` occurs in `tokens` as a contiguous run."""
    n = len(phrase)
    return any(list(tokens[i : i + n]) == list(phrase) for i in range(len(tokens) - n + 1))


@dataclass
class Progress:
    """How far each row's output has come through its sentence's phrases.

    The state of an Aho-Corasick automaton over the unmet phrases: the longest end of the output
    that begins one of them (its first such phrase where several begin alike). Every shorter end
    is an end of that one, so the next piece can be judged from it alone: phrases overlap (`New
    York`, `York Times` in `New York Times`) and repeat their start (`a a b` in `a a a b`).
    """

    met: Tensor  # (N, C) bool: the phrase appears in the output (empty slots count as met)
    phrase: Tensor  # (N,) long: the phrase being matched, -1 for none
    matched: Tensor  # (N,) long: its pieces matched so far

    @classmethod
    def start(cls, lengths: Tensor) -> Progress:
        """Nothing met yet for outputs of sentences with phrase lengths (N, C)."""
        none = torch.zeros(lengths.size(0), dtype=torch.long, device=lengths.device)
        return cls(met=lengths == 0, phrase=none - 1, matched=none)

    def select(self, rows: Tensor) -> Progress:
        """The progress of rows `rows` (N',)."""
        return Progress(*(t.index_select(0, rows) for t in (self.met, self.phrase, self.matched)))

    def met_pieces(self, lengths: Tensor) -> Tensor:
        """Constraint pieces met so far (N,): the bank of dynamic beam allocation."""
        return (lengths * self.met).sum(dim=1) + self.matched

    def wanted(self, phrases: Tensor) -> Tensor:
        """The piece (N, C) that advances each phrase: the matched one's next, others' first.

        PAD for met phrases (and empty slots).
        """
        active = torch.arange(phrases.size(1), device=phrases.device) == self.phrase.unsqueeze(1)
        position = torch.where(active, self.matched.unsqueeze(1), 0)  # (N, C)
        return phrases.gather(2, position.unsqueeze(2)).squeeze(2).masked_fill(self.met, PAD_ID)

    def after(self, tokens: Tensor, phrases: Tensor, lengths: Tensor) -> Progress:
        """The progress once rows have produced tokens (N,): phrases (N, C, L), lengths (N, C)."""
        N, C, L = phrases.shape
        ends = self.ends(tokens, phrases)  # (N, C, L): phrase c's first s + 1 pieces end the output
        size = torch.arange(1, L + 1, device=tokens.device)  # (L,) s + 1
        unmet = ~self.met.unsqueeze(2)  # (N, C, 1)
        complete = ends & unmet & (size == lengths.unsqueeze(2))  # (N, C, L)
        # At most one phrase completes a step: of two ending alike, one is inside the other, and
        # Constraints.of keeps only the outer one (essential).
        met = self.met | complete.any(dim=2)  # (N, C)
        partial = ends & ~met.unsqueeze(2) & (size < lengths.unsqueeze(2))  # (N, C, L)
        # The longest partial match, then the first phrase: score s * C + (C - 1 - c).
        rank = size * C + (C - 1 - torch.arange(C, device=tokens.device)).unsqueeze(1)  # (C, L)
        best = torch.where(partial, rank, -1).view(N, -1).max(dim=1).values  # (N,)
        found = best >= 0
        phrase = torch.where(found, C - 1 - best % C, -1)
        return Progress(met, phrase, torch.where(found, best // C, 0))

    def ends(self, tokens: Tensor, phrases: Tensor) -> Tensor:
        """Whether each phrase's first s + 1 pieces (N, C, L) end the output once it has `tokens`.

        The output's end that can matter is the matched part of the phrase being matched, then
        the token: right-aligned in L places, -1 (no piece) before it. Rows go in chunks of up
        to ENDS_BUDGET comparisons (N*C*L*L at once would grow with a long phrase's square).
        """
        chunk = max(1, ENDS_BUDGET // (phrases[0].numel() * phrases.size(2)))  # rows at once
        if phrases.size(0) <= chunk:
            return self._ends(tokens, phrases)
        return torch.cat(
            [
                self.select(rows)._ends(tokens[rows], phrases[rows])
                for rows in torch.arange(phrases.size(0), device=tokens.device).split(chunk)
            ]
        )

    def _ends(self, tokens: Tensor, phrases: Tensor) -> Tensor:
        """`ends` for all the rows at once."""
        N, L = phrases.size(0), phrases.size(2)
        place = torch.arange(L, device=tokens.device)  # (L,)
        matched = phrases.gather(1, self.phrase.clamp(min=0).view(N, 1, 1).expand(N, 1, L))
        source = self.matched.unsqueeze(1) - (L - 1) + place  # (N, L) its piece at each place
        text = matched.squeeze(1).gather(1, source.clamp(0, L - 1))  # (N, L)
        text = text.masked_fill((source < 0) | (self.phrase < 0).unsqueeze(1), -1)
        text[:, -1] = tokens
        # The last s + 1 places of text against a phrase's first s + 1 pieces (L, L) at once.
        at = (L - 1 - place).unsqueeze(1) + place  # (L, L): for s, the place of piece t
        valid = place <= place.unsqueeze(1)  # (L, L): t <= s
        window = text[:, at.clamp(max=L - 1)]  # (N, L, L)
        same = window.unsqueeze(1) == phrases.unsqueeze(2)  # (N, C, L, L)
        return (same | ~valid).all(dim=3)


def constrained_candidates(
    lprobs: Tensor, beams: Beams, constraints: Constraints, beam: int, room: Tensor
) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor]:
    """2K candidates per sentence (B', 2K) x3 in allocation order; each row's EOS log-prob (N,).

    Each row offers its 2K best tokens and the pieces that advance its phrases. Only a row
    that met every phrase may end, so EOS is banned elsewhere, at the limit too; a candidate
    leaving more phrase pieces to produce than the `room` (N,) its row has after this step's
    piece, before EOS, could never end: its score is -inf, so it takes no place in the beam.
    """
    assert beams.progress is not None
    B, G = beams.sent.size(0), beams.rows_per_sentence
    phrases, lengths = constraints.rows(beams.sent, G)  # (N, C, L), (N, C)
    lprobs[:, EOS_ID] = lprobs[:, EOS_ID].masked_fill(~beams.progress.met.all(dim=1), -math.inf)
    top, tokens = lprobs.topk(min(2 * beam, lprobs.size(1)), dim=1)  # (N, k) each
    wanted = beams.progress.wanted(phrases)  # (N, C)
    offered = torch.cat(
        [top, lprobs.gather(1, wanted).masked_fill(repeats(tokens, wanted), -math.inf)], dim=1
    )
    pieces = torch.cat([tokens, wanted], dim=1)  # (N, k + C)
    per_row = pieces.size(1)
    origin = torch.arange(G * per_row, device=lprobs.device) // per_row  # (G*(k+C),) its beam
    rows = beams.rows(origin.expand(B, -1)).view(-1)  # (B'*G*(k+C),)
    row_lengths = lengths[rows]  # (B'*G*(k+C), C)
    met = beams.progress.select(rows).after(pieces.view(-1), phrases[rows], row_lengths)
    bank = met.met_pieces(row_lengths)  # (B'*G*(k+C),)
    left = (row_lengths.sum(dim=1) - bank).view_as(pieces)  # (N, k+C) phrase pieces to come
    hopeless = (left > room.unsqueeze(1)) & (pieces != EOS_ID)
    pool = (
        (offered + beams.scores.unsqueeze(1)).masked_fill(hopeless, -math.inf).view(B, -1),
        origin.expand(B, -1),  # (B', G*(k+C)) each
        pieces.view(B, -1),
        bank.view(B, -1),
    )
    missing = 2 * beam - pool[0].size(1)  # > 0 only for a vocabulary under 2K at the first step
    if missing > 0:
        pool = tuple(
            F.pad(x, (0, missing), value=v)
            for x, v in zip(pool, (-math.inf, 0, PAD_ID, 0), strict=True)
        )
    total, origin, pieces, bank = pool
    pick = allocation_order(total, bank, phrases.size(1) * phrases.size(2) + 1, 2 * beam)
    candidates = (total.gather(1, pick), origin.gather(1, pick), pieces.gather(1, pick))
    return candidates, lprobs[:, EOS_ID]


def repeats(tokens: Tensor, wanted: Tensor) -> Tensor:
    """Which wanted pieces (N, C) a row offers already: among its tokens (N, k), or before."""
    earlier = torch.ones(wanted.size(1), wanted.size(1), dtype=torch.bool, device=wanted.device)
    twice = (wanted.unsqueeze(2) == wanted.unsqueeze(1)) & earlier.tril(-1)  # (N, C, C)
    return (wanted.unsqueeze(2) == tokens.unsqueeze(1)).any(dim=2) | twice.any(dim=2)  # (N, C)


def allocation_order(total: Tensor, bank: Tensor, banks: int, keep: int) -> Tensor:
    """Indices (B', keep) of candidates (B', M) taken in turns between banks, best first in each.

    Dynamic beam allocation: a sentence's beam is shared between banks (pieces met), each turn
    taking every bank's next best, the banks that met more first; a bank without candidates
    leaves its share to the others. Candidates with non-finite scores come last.
    """
    order = total.argsort(dim=1, descending=True, stable=True)  # (B', M)
    banked = bank.gather(1, order)  # (B', M)
    # Not F.one_hot: off CUDA it reads its input's min and max back to the host every step.
    member = banked.unsqueeze(2) == torch.arange(banks, device=bank.device)  # (B', M, banks)
    rank = (member.cumsum(dim=1) * member).sum(dim=2) - 1  # (B', M) place within its bank
    turn = rank * banks + (banks - 1 - banked)  # (B', M)
    turn = turn.masked_fill(~total.gather(1, order).isfinite(), banks * total.size(1))
    return order.gather(1, turn.topk(keep, dim=1, largest=False).indices)


def constrained_search(
    model: Decoder,
    src: Tensor,
    config: DecodeConfig,
    prefix: Tensor | None,
    constraints: Constraints,
) -> list[list[Hypothesis]]:
    """Beam search whose outputs contain every sentence's phrases; unconstrained where none can.

    A sentence for which no hypothesis met all its phrases within its limit gets plain beam
    search's: callers tell by checking the output for its phrases (see `contains`).
    """
    found = beam_search(model, src, config, prefix, constraints)
    failed = [b for b, hyps in enumerate(found) if not any(math.isfinite(h.score) for h in hyps)]
    if failed:
        index = torch.tensor(failed, device=src.device)
        again = beam_search(
            model, src.index_select(0, index), config, None if prefix is None else prefix[index]
        )
        for b, hyps in zip(failed, again, strict=True):
            found[b] = hyps
    return found
