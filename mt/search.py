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
from collections.abc import Callable
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


def decode(
    model: Transformer, src: Tensor, config: DecodeConfig, scores: bool = False
) -> list[list[Hypothesis]]:
    """The hypotheses of each sentence of src (B, S) that `config` asks for, best first.

    Sampling draws max(beam, nbest) outputs. A beam of 1 for one output without min_len is
    greedy search, unless `scores` asks for beam search's scores (n-best output prints them):
    greedy scores its outputs the same way, but its sums may differ in the last bits.
    """
    if config.sampling:
        return sample(model, src, config)
    if config.beam == 1 and config.nbest == 1 and config.min_len == 0 and not scores:
        return greedy_search(model, src, config)
    return beam_search(model, src, config)


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


def plan(src: Tensor, limit: Tensor) -> tuple[int, bool]:
    """The steps to run, the longest limit (B,), and whether src holds padding: one device read.

    Without padding the model attends without masks, which lets SDPA use its fastest kernels.
    """
    steps, padded = torch.stack([limit.max(), (src == PAD_ID).any()]).tolist()
    return steps, bool(padded)


def banned_logprobs(logits: Tensor, step: int, min_len: int) -> tuple[Tensor, Tensor]:
    """Float32 log-probs (N, V), PAD/BOS banned, EOS banned before min_len; EOS's unbanned (N,)."""
    lprobs = F.log_softmax(logits, dim=-1, dtype=torch.float32)  # (N, V), masked in place below
    eos = lprobs[:, EOS_ID].clone()  # (N,) kept for rows at their limit, where EOS is forced
    lprobs[:, PAD_ID] = -math.inf  # one column at a time: a list index would be a host upload
    lprobs[:, BOS_ID] = -math.inf
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
    return [strip_specials(row) for row in tokens.tolist()]


# ---------------------------------------------------------------------------------------------
# Greedy search and sampling: one output per row, rows run until EOS or their limit.


@torch.no_grad()
def greedy_search(model: Transformer, src: Tensor, config: DecodeConfig) -> list[list[Hypothesis]]:
    """Batched greedy decoding: the most probable token at each step, until EOS or the limit.

    One hypothesis per sentence, scored as beam search scores it: the log-probabilities tell
    whether the model's scores were finite at all (a NaN argmax still picks a token).
    """
    if src.size(0) == 0:
        return []
    tokens, logprobs = decode_rows(model, src, config, pick_argmax)  # (B, T), (B,)
    return [
        [finished_hypothesis(ids, lp, config.alpha, config.length_penalty)]
        for ids, lp in zip(strip(tokens), logprobs.tolist(), strict=True)
    ]


def pick_argmax(lprobs: Tensor) -> Tensor:
    """The most probable token of each row: (N, V) -> (N,)."""
    return lprobs.argmax(dim=-1)


def decode_rows(
    model: Transformer,
    src: Tensor,
    config: DecodeConfig,
    pick: Callable[[Tensor], Tensor],
    copies: int = 1,
) -> tuple[Tensor, Tensor]:
    """Extend `copies` rows per source by `pick(lprobs)` until EOS, within config's lengths.

    Returns ids (N, T) with PAD after EOS and logprobs (N,), N = B * copies, rows of a source
    consecutive.
    """
    limit = max_lengths(src, config.max_len_a, config.max_len_b, model.max_positions - 1)  # (B,)
    steps, padded = plan(src, limit)
    memory = model.encode(src, padded).repeat_interleave(copies, dim=0)  # (N, S, D)
    src, limit = src.repeat_interleave(copies, dim=0), limit.repeat_interleave(copies)  # (N, ...)
    N = src.size(0)
    state = model.init_state(steps)
    token = torch.full((N,), BOS_ID, dtype=torch.long, device=src.device)  # (N,)
    finished = torch.zeros(N, dtype=torch.bool, device=src.device)  # (N,)
    total = torch.zeros(N, device=src.device)  # (N,) float32
    out = []
    for t in range(steps):
        logits = model.decode(token.unsqueeze(1), memory, src, state, padded)[:, -1]  # (N, V)
        lprobs = step_logprobs(logits, t, limit, config.min_len)  # (N, V)
        token = pick(lprobs).masked_fill(finished, PAD_ID)  # (N,)
        gained = lprobs.gather(1, token.unsqueeze(1)).squeeze(1)  # (N,)
        total += gained.masked_fill(finished, 0.0)
        out.append(token)
        finished |= token == EOS_ID
        if bool(finished.all()):  # the step's one wait for the device
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
    config: DecodeConfig,
    generator: torch.Generator | None = None,
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

    tokens, logprobs = decode_rows(model, src, config, pick, copies=num)
    hyps = [
        finished_hypothesis(ids, lp, config.alpha, config.length_penalty)
        for ids, lp in zip(strip(tokens), logprobs.tolist(), strict=True)
    ]
    return [ranked(hyps[i : i + num], num) for i in range(0, len(hyps), num)]


def finished_hypothesis(tokens: list[int], logprob: float, alpha: float, kind: str) -> Hypothesis:
    """The Hypothesis for `tokens` (EOS excluded) of log-probability `logprob` (EOS included)."""
    return Hypothesis(tokens, logprob / length_penalty(len(tokens) + 1, alpha, kind), logprob)


def ranked(hyps: list[Hypothesis], n: int) -> list[Hypothesis]:
    """The n best hypotheses by score, best first (stable on ties)."""
    return sorted(hyps, key=lambda h: -h.score)[:n]


# ---------------------------------------------------------------------------------------------
# Beam search. All sentences' beams live in one batch of rows, K consecutive rows per sentence;
# sentences leave the batch as soon as they are done. On a GPU the host waits for the device
# once per step, to learn which sentences are done; everything else stays on the device, and
# the hypotheses set aside are read back once, at the end.


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

    def rows(self, beams: Tensor) -> Tensor:
        """Row index of each sentence's beams `beams` (B', n), each in [0, G): (B', n)."""
        first = torch.arange(self.sent.size(0), device=beams.device) * self.rows_per_sentence
        return first.unsqueeze(1) + beams  # (B', n)


def start_beams(model: Transformer, src: Tensor, limit: Tensor, steps: int, padded: bool) -> Beams:
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


def advance(
    beams: Beams, candidates: tuple[Tensor, Tensor, Tensor], done: Tensor, kept: int, beam: int
) -> Beams:
    """Continue the K best live candidates of the `kept` sentences not `done` (B',) bool."""
    scores, origin, tokens = select_live(candidates, beam)  # (B', K) each
    # The indices of the sentences not done, in order, without a wait for the device: a stable
    # sort puts them first, and the host knows how many they are.
    keep = done.to(torch.uint8).argsort(stable=True)[:kept]  # (B'',)
    all_kept = kept == done.size(0)  # then per-sentence tensors stay as they are
    rows = beams.rows(origin).index_select(0, keep).view(-1)  # (B''*K,) by origin beam
    beams.state.reorder(rows, None if all_kept else keep)
    return Beams(
        sent=beams.sent.index_select(0, keep),
        tokens=torch.cat(
            [beams.tokens.index_select(0, rows), tokens.index_select(0, keep).view(-1, 1)], dim=1
        ),
        scores=scores.index_select(0, keep).view(-1),  # (B''*K,)
        count=beams.count.index_select(0, keep),
        limit=beams.limit.index_select(0, keep),
        memory=beams.memory if all_kept else beams.memory.index_select(0, keep),  # (B'', S, D)
        src=beams.src if all_kept else beams.src.index_select(0, keep),  # (B'', S)
        state=beams.state,
    )


@torch.no_grad()
def beam_search(model: Transformer, src: Tensor, config: DecodeConfig) -> list[list[Hypothesis]]:
    """Beam search over src (B, S): B lists of 1 to `nbest` hypotheses, best score first.

    fairseq's criterion: a sentence stops once `beam` hypotheses have ended (an EOS candidate
    counts if it ranks in the step's top K), or at its length limit where every beam ends.
    Fewer than nbest come back only when the length limit leaves fewer possible outputs, or
    when the model's scores are not finite: a sentence none of whose hypotheses has a finite
    score gets its live beams at the limit, whose scores may be -inf or nan.
    """
    if src.size(0) == 0:
        return []
    beam, min_len = config.beam, config.min_len
    limit = max_lengths(src, config.max_len_a, config.max_len_b, model.max_positions - 1)  # (B,)
    steps, padded = plan(src, limit)
    finished = Finished.empty(src.size(0), beam, steps, src.device)
    beams = start_beams(model, src, limit, steps, padded)
    for step in range(steps):
        tokens, memory, state = beams.tokens[:, -1:], beams.memory, beams.state
        logits = model.decode(tokens, memory, beams.src, state, padded)  # (B'*G, 1, V)
        row_limit = beams.limit.repeat_interleave(beams.rows_per_sentence)  # (B'*G,)
        top = row_candidates(logits[:, -1], step, row_limit, min_len, 2 * beam)  # (B'*G, 2K) x2
        candidates = expand_candidates(beams.scores, *top, beams.sent.size(0), beam)  # (B', 2K)
        beams.count = set_aside_finished(finished, beams, candidates)
        at_limit = step + 1 >= beams.limit  # (B',)
        done, stuck = at_limit | (beams.count >= beam), at_limit & (beams.count == 0)
        done_now, stuck_now = torch.stack([done, stuck]).tolist()  # the step's one wait
        if any(stuck_now):
            set_aside_live(finished, beams, top[0][:, 0], stuck)  # EOS is first at the limit
        if all(done_now):
            break
        beams = advance(beams, candidates, done, done_now.count(False), beam)
    return finished.hypotheses(config.nbest, config.alpha, config.length_penalty)
