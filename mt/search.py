"""Decoding with the model's `encode()` / `decode()` and its incremental state.

Greedy search, beam search (fairseq-style) and sampling. Shape legend:
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
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mt.model import DecoderState, Transformer
from mt.vocab import BOS_ID, EOS_ID, PAD_ID

LENGTH_PENALTIES = ("gnmt", "average", "none")


@dataclass(frozen=True)
class Hypothesis:
    """One finished output: ids without BOS/EOS, its length-penalised score and log-probability."""

    tokens: list[int]
    score: float  # the ranking score: logprob / length_penalty(len(tokens) + 1)
    logprob: float  # sum of token log-probabilities, EOS included


def max_lengths(src: Tensor, a: float, b: int, limit: int) -> Tensor:
    """Per-sentence output length limits a * source length + b, capped at `limit`: (B,) long."""
    src_len = (src != PAD_ID).sum(dim=1)  # (B,) real tokens, EOS included
    return (a * src_len.float() + b).long().clamp(1, limit)


def length_penalty(length: Tensor | int, alpha: float, kind: str) -> Tensor | float:
    """Divisor of a log-probability; `length` counts output tokens including EOS."""
    if kind == "gnmt":  # Wu et al. 2016
        return ((5 + length) / 6) ** alpha
    if kind == "average":  # plain length normalisation, alpha ignored
        return length.float() if isinstance(length, Tensor) else float(length)
    if kind == "none":
        return torch.ones_like(length, dtype=torch.float) if isinstance(length, Tensor) else 1.0
    raise ValueError(f"length penalty must be one of {LENGTH_PENALTIES}, got {kind!r}")


def banned_logprobs(logits: Tensor, step: int, min_len: int) -> tuple[Tensor, Tensor]:
    """Float32 log-probs (N, V), PAD/BOS banned, EOS banned before min_len; EOS's unbanned (N,)."""
    lprobs = F.log_softmax(logits, dim=-1, dtype=torch.float32)  # (N, V), masked in place below
    eos = lprobs[:, EOS_ID].clone()  # (N,) kept for rows at their limit, where EOS is forced
    lprobs[:, [PAD_ID, BOS_ID]] = -math.inf
    if step < min_len:
        lprobs[:, EOS_ID] = -math.inf
    return lprobs, eos


def step_logprobs(logits: Tensor, step: int, limit: Tensor, min_len: int) -> Tensor:
    """Float32 log-probs (N, V) of token step+1: PAD/BOS banned, EOS banned or forced."""
    lprobs, eos = banned_logprobs(logits, step, min_len)  # (N, V), (N,)
    at_limit = step + 1 >= limit  # (N,)
    lprobs.masked_fill_(at_limit.unsqueeze(1), -math.inf)
    lprobs[:, EOS_ID] = torch.where(at_limit, eos, lprobs[:, EOS_ID])
    return lprobs  # (N, V)


def strip(tokens: Tensor) -> list[list[int]]:
    """Rows of output ids (B, L) cut at the first EOS, without specials."""
    rows = []
    for row in tokens.tolist():
        ids = []
        for t in row:
            if t in (EOS_ID, PAD_ID):
                break
            ids.append(t)
        rows.append(ids)
    return rows


# ---------------------------------------------------------------------------------------------
# Greedy search and sampling: one output per row, rows run until EOS or their limit.


@torch.no_grad()
def greedy_search(
    model: Transformer, src: Tensor, max_len_a: float, max_len_b: int
) -> list[list[int]]:
    """Batched greedy decoding: the most probable token at each step, until EOS or the limit."""
    if src.size(0) == 0:
        return []
    tokens, _ = decode_rows(model, src, model.encode(src), max_len_a, max_len_b, 0, pick_argmax)
    return strip(tokens)


def pick_argmax(lprobs: Tensor) -> Tensor:
    """The most probable token of each row: (N, V) -> (N,)."""
    return lprobs.argmax(dim=-1)


def decode_rows(
    model: Transformer,
    src: Tensor,
    memory: Tensor,
    max_len_a: float,
    max_len_b: int,
    min_len: int,
    pick: Callable[[Tensor], Tensor],
) -> tuple[Tensor, Tensor]:
    """Extend rows by `pick(lprobs)` until EOS: ids (N, T) with PAD after EOS, logprobs (N,)."""
    N = src.size(0)
    limit = max_lengths(src, max_len_a, max_len_b, model.max_positions - 1)  # (N,)
    state = model.init_state(int(limit.max()))
    token = torch.full((N,), BOS_ID, dtype=torch.long, device=src.device)  # (N,)
    finished = torch.zeros(N, dtype=torch.bool, device=src.device)  # (N,)
    total = torch.zeros(N, device=src.device)  # (N,) float32
    out = []
    for t in range(int(limit.max())):
        logits = model.decode(token.unsqueeze(1), memory, src, state)[:, -1]  # (N, V)
        lprobs = step_logprobs(logits, t, limit, min_len)  # (N, V)
        token = pick(lprobs).masked_fill(finished, PAD_ID)  # (N,)
        gained = lprobs.gather(1, token.unsqueeze(1)).squeeze(1)  # (N,)
        total += gained.masked_fill(finished, 0.0)
        out.append(token)
        finished |= token == EOS_ID
        if bool(finished.all()):
            break
    return torch.stack(out, dim=1), total  # (N, T), (N,)


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
    model: Transformer,
    src: Tensor,
    num: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    max_len_a: float = 1.2,
    max_len_b: int = 10,
    min_len: int = 0,
    generator: torch.Generator | None = None,
    alpha: float = 0.6,
    length_penalty: str = "gnmt",
) -> list[list[Hypothesis]]:
    """`num` independent samples per sentence, sorted by length-penalised score, best first."""
    check_sampling(num, temperature, top_k, top_p, length_penalty)
    if src.size(0) == 0:
        return []

    def pick(lprobs: Tensor) -> Tensor:
        """One token per row (N,) drawn from the filtered distribution."""
        weights = sampling_weights(lprobs, temperature, top_k, top_p)  # (N, V)
        return torch.multinomial(weights.softmax(dim=-1), 1, generator=generator).squeeze(1)

    memory = model.encode(src).repeat_interleave(num, dim=0)  # (B*num, S, D)
    rows = src.repeat_interleave(num, dim=0)  # (B*num, S)
    tokens, logprobs = decode_rows(model, rows, memory, max_len_a, max_len_b, min_len, pick)
    hyps = [
        finished_hypothesis(ids, lp, alpha, length_penalty)
        for ids, lp in zip(strip(tokens), logprobs.tolist(), strict=True)
    ]
    return [ranked(hyps[i : i + num], num) for i in range(0, len(hyps), num)]


def check_sampling(num: int, temperature: float, top_k: int, top_p: float, kind: str) -> None:
    """Raise ValueError on sampling settings out of range."""
    if num < 1 or temperature <= 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(
            f"sampling needs num >= 1, temperature > 0, top_k >= 0 and 0 < top_p <= 1; got "
            f"num={num}, temperature={temperature}, top_k={top_k}, top_p={top_p}"
        )
    length_penalty(1, 0.0, kind)


def finished_hypothesis(tokens: list[int], logprob: float, alpha: float, kind: str) -> Hypothesis:
    """The Hypothesis for `tokens` (EOS excluded) of log-probability `logprob` (EOS included)."""
    return Hypothesis(tokens, logprob / length_penalty(len(tokens) + 1, alpha, kind), logprob)


def ranked(hyps: list[Hypothesis], n: int) -> list[Hypothesis]:
    """The n best hypotheses by score, best first (stable on ties)."""
    return sorted(hyps, key=lambda h: -h.score)[:n]


# ---------------------------------------------------------------------------------------------
# Beam search. All sentences' beams live in one batch of rows, K consecutive rows per sentence;
# sentences leave the batch as soon as they are done.


@dataclass
class Beams:
    """Live beams of the B' sentences still searching, G rows each, plus their decoder inputs.

    G is 1 before the first step (every beam of a sentence would hold the same BOS), K after.
    """

    sent: Tensor  # (B',) index of each sentence in the caller's batch
    tokens: Tensor  # (B'*G, 1+T) BOS then the tokens so far
    scores: Tensor  # (B'*G,) float32 running log-probabilities (-inf: not a real beam)
    count: Tensor  # (B',) finished hypotheses set aside so far
    limit: Tensor  # (B',) output length limits (EOS included)
    memory: Tensor  # (B', S, D) one row per sentence: its G beams share it
    src: Tensor  # (B', S)
    state: DecoderState

    @property
    def rows_per_sentence(self) -> int:
        """G, the target rows of each sentence."""
        return self.tokens.size(0) // self.sent.size(0)


def start_beams(model: Transformer, src: Tensor, max_len_a: float, max_len_b: int) -> Beams:
    """Encode each sentence once; one row per sentence until the first step expands it."""
    B, device = src.size(0), src.device
    limit = max_lengths(src, max_len_a, max_len_b, model.max_positions - 1)  # (B,)
    return Beams(
        sent=torch.arange(B, device=device),
        tokens=torch.full((B, 1), BOS_ID, dtype=torch.long, device=device),
        scores=torch.zeros(B, device=device),
        count=torch.zeros(B, dtype=torch.long, device=device),
        limit=limit,
        memory=model.encode(src),  # (B, S, D)
        src=src,  # (B, S)
        state=model.init_state(int(limit.max())),
    )


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
    logits: Tensor, step: int, limit: Tensor, min_len: int, k: int
) -> tuple[Tensor, Tensor]:
    """The k best next tokens of each row by `step_logprobs`: log-probs and ids, (N, k) each.

    The same as `step_logprobs(...).topk(k)`, but the length limit is applied to the k
    candidates rather than to all V tokens: a row at its limit keeps only EOS, with its score.
    """
    lprobs, eos = banned_logprobs(logits, step, min_len)  # (N, V), (N,)
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
    finished: list[list[Hypothesis]],
    beams: Beams,
    candidates: tuple[Tensor, Tensor, Tensor],
    beam: int,
    alpha: float,
    kind: str,
) -> Tensor:
    """File EOS candidates ranked in their sentence's top K, up to K per sentence: count (B',)."""
    scores, origin, tokens = (c[:, :beam] for c in candidates)  # (B', K) each
    ends = (tokens == EOS_ID) & scores.isfinite()  # (B', K)
    b, j = ends.nonzero(as_tuple=True)  # (E,) each, sentence-major and best first
    if b.numel() > 0:
        rows = b * beams.rows_per_sentence + origin[b, j]  # (E,)
        outputs = beams.tokens[rows, 1:].tolist()  # E lists of T ids, without BOS and EOS
        for s, ids, lp in zip(beams.sent[b].tolist(), outputs, scores[b, j].tolist(), strict=True):
            if len(finished[s]) < beam:
                finished[s].append(finished_hypothesis(ids, lp, alpha, kind))
    return (beams.count + ends.sum(dim=1)).clamp(max=beam)  # (B',)


def select_live(candidates: tuple[Tensor, Tensor, Tensor], beam: int) -> tuple[Tensor, ...]:
    """The K best candidates not ending in EOS: scores, origin beams, tokens, each (B', K)."""
    scores, origin, tokens = candidates  # (B', 2K) each
    position = torch.arange(2 * beam, device=tokens.device)  # (2K,)
    rank = (tokens == EOS_ID).long() * (2 * beam) + position  # (B', 2K) EOS after all others
    pick = rank.topk(beam, dim=1, largest=False).indices  # (B', K) in score order
    return scores.gather(1, pick), origin.gather(1, pick), tokens.gather(1, pick)


def advance(
    beams: Beams, candidates: tuple[Tensor, Tensor, Tensor], keep: Tensor, beam: int
) -> Beams:
    """Continue the K best live candidates of the sentences in `keep` (B',) bool; drop the rest."""
    scores, origin, tokens = select_live(candidates, beam)  # (B', K) each
    G = beams.rows_per_sentence
    first_row = torch.arange(keep.size(0), device=keep.device).unsqueeze(1) * G  # (B', 1)
    rows = (first_row + origin)[keep].view(-1)  # (B''*K,) rows to continue, by origin beam
    kept = keep.nonzero().squeeze(1)  # (B'',)
    all_kept = kept.size(0) == keep.size(0)  # then per-sentence tensors stay as they are
    beams.state.reorder(rows, None if all_kept else kept)
    return Beams(
        sent=beams.sent[kept],
        tokens=torch.cat([beams.tokens.index_select(0, rows), tokens[keep].view(-1, 1)], dim=1),
        scores=scores[keep].view(-1),  # (B''*K,)
        count=beams.count[kept],
        limit=beams.limit[kept],
        memory=beams.memory if all_kept else beams.memory.index_select(0, kept),  # (B'', S, D)
        src=beams.src if all_kept else beams.src.index_select(0, kept),  # (B'', S)
        state=beams.state,
    )


def check_beam(beam: int, nbest: int, min_len: int, kind: str) -> None:
    """Raise ValueError on beam search settings out of range."""
    if beam < 1 or not 1 <= nbest <= beam or min_len < 0:
        raise ValueError(
            f"beam search needs beam >= 1, 1 <= nbest <= beam and min_len >= 0; "
            f"got beam={beam}, nbest={nbest}, min_len={min_len}"
        )
    length_penalty(1, 0.0, kind)


@torch.no_grad()
def beam_search(
    model: Transformer,
    src: Tensor,
    beam: int,
    alpha: float = 0.6,
    length_penalty: str = "gnmt",
    max_len_a: float = 1.2,
    max_len_b: int = 10,
    min_len: int = 0,
    nbest: int = 1,
) -> list[list[Hypothesis]]:
    """Beam search over src (B, S): B lists of up to `nbest` hypotheses, best score first.

    fairseq's criterion: a sentence stops once `beam` hypotheses have ended (an EOS candidate
    counts if it ranks in the step's top K), or at its length limit where every beam ends.
    Fewer than nbest come back only when the length limit leaves fewer possible outputs.
    """
    check_beam(beam, nbest, min_len, length_penalty)
    if src.size(0) == 0:
        return []
    finished: list[list[Hypothesis]] = [[] for _ in range(src.size(0))]
    beams = start_beams(model, src, max_len_a, max_len_b)
    for step in range(int(beams.limit.max())):
        logits = model.decode(beams.tokens[:, -1:], beams.memory, beams.src, beams.state)
        row_limit = beams.limit.repeat_interleave(beams.rows_per_sentence)  # (B'*G,)
        top = row_candidates(logits[:, -1], step, row_limit, min_len, 2 * beam)  # (B'*G, 2K) x2
        candidates = expand_candidates(beams.scores, *top, beams.sent.size(0), beam)  # (B', 2K)
        beams.count = set_aside_finished(finished, beams, candidates, beam, alpha, length_penalty)
        done = (beams.count >= beam) | (step + 1 >= beams.limit)  # (B',)
        if bool(done.all()):
            break
        beams = advance(beams, candidates, ~done, beam)
    return [ranked(hyps, nbest) for hyps in finished]
