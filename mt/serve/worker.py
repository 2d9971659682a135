"""The worker that owns the model: queued requests gathered into token-budget batches.

Requests wait in one queue. Once free, the worker takes the first and gathers more for up to
`batch_wait_ms` (or until a batch's worth of source tokens is waiting, or as many sentences as
were in the server, answered or waiting, at the end of a recent batch: clients just answered
tend to come straight back, and without this the wait splits them into batches decoded in
turn), groups them by decoding settings and decodes each group with `mt translate`'s own batched
search (Translator.translate), so a sentence gets the translation `mt translate` gives it, whatever
else shares its batch. Answers go back to each request's event loop through
loop.call_soon_threadsafe: the HTTP side never waits on the model, and the model never waits on
HTTP.

The loop runs on a thread of its own (start) or on the caller's (run): `mt serve` decodes on the
main thread, where PyTorch's OpenMP team decodes faster than a second thread's (see
docs/benchmarks.md), and runs uvicorn beside it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from mt.alignment import Alignment, alignment
from mt.config import DecodeConfig
from mt.model import Transformer
from mt.serve.limits import Limits
from mt.tokenizer import Tokenizer
from mt.translate import Translation, Translator

log = logging.getLogger("mt")
RECENT_BATCHES = 4  # the loads (see Batcher._recent) the worker gathers towards


class Unavailable(Exception):
    """The server cannot take a request now (a full queue, or shutting down): answer 503."""


@dataclass(frozen=True)
class Result:
    """One sentence's n-best translations, and the cross-attention of the best when asked."""

    hypotheses: list[Translation]
    alignment: Alignment | None


@dataclass(eq=False)
class Job:
    """One request: its sentences (and their source ids), its settings, where its answer goes."""

    lines: list[str]
    ids: list[list[int]]  # source pieces per line, none for blank lines
    beam: int
    nbest: int
    attention: bool
    future: asyncio.Future[list[Result]]
    arrived: float  # time.monotonic() when queued
    tgt_lang: str | None = None  # the target language of a multilingual model
    prefixes: list[list[int]] | None = None  # target pieces each line's output starts with
    constraints: list[list[list[int]]] | None = None  # target phrases each line's must contain

    @property
    def tokens(self) -> int:
        """Source tokens to decode, each sentence's EOS included."""
        return sum(len(seq) + 1 for seq in self.ids if seq)


@dataclass
class Stats:
    """What the worker has done so far (GET /health shows it)."""

    queued: int = 0  # sentences waiting now
    requests: int = 0  # requests answered
    sentences: int = 0  # sentences translated
    rounds: int = 0  # gatherings decoded
    most_requests: int = 0  # the most requests decoded in one gathering
    dropped: int = 0  # requests whose client went away while they waited


class Batcher:
    """The queue and the worker thread that owns the model (start, submit, cancel, stop)."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        decode: DecodeConfig,
        device: torch.device,
        precision: str,
        limits: Limits,
    ) -> None:
        self.model, self.tokenizer, self.decode = model, tokenizer, decode
        self.device, self.precision, self.limits = device, precision, limits
        self.max_tokens = limits.max_tokens or decode.max_tokens
        self.stats = Stats()
        self._queue: deque[Job] = deque()
        # Reentrant: drain() may run in a signal handler that interrupted a holder of the lock.
        self._cond = threading.Condition(threading.RLock())
        self._draining = False
        # Sentences in the server at the end of each recent batch (answered + waiting): about the
        # number of clients, whose requests the next batch gathers towards.
        self._recent: deque[int] = deque(maxlen=RECENT_BATCHES)
        self._free_since = 0.0  # time.monotonic() at the end of the last batch
        self._running = False  # whether run() has begun (on whichever thread)
        self._finished = threading.Event()  # set when run() returns

    # --- the HTTP side (called on the event loop) --------------------------------------------

    def submit(
        self,
        lines: list[str],
        ids: list[list[int]],
        beam: int,
        nbest: int,
        attention: bool,
        tgt_lang: str | None = None,
        prefixes: list[list[int]] | None = None,
        constraints: list[list[list[int]]] | None = None,
    ) -> Job:
        """Queue a request; its future gets one Result per line. Unavailable if it cannot wait."""
        future = asyncio.get_running_loop().create_future()
        arrived = time.monotonic()
        job = Job(
            lines, ids, beam, nbest, attention, future, arrived, tgt_lang, prefixes, constraints
        )
        with self._cond:
            if self._draining:
                raise Unavailable("server: shutting down")
            waiting = self.stats.queued
            if waiting + len(lines) > self.limits.max_queue:
                raise Unavailable(f"queue: full ({waiting} sentences waiting); retry later")
            self._queue.append(job)
            self.stats.queued += len(lines)
            self._cond.notify_all()
        log.debug("queued %d sentences (%d waiting)", len(lines), waiting + len(lines))
        return job

    def cancel(self, job: Job) -> None:
        """Drop a request whose client went away: out of the queue if it is still there."""
        job.future.cancel()
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
                self.stats.queued -= len(job.lines)
                self.stats.dropped += 1
                self._cond.notify_all()
                log.debug("dropped %d sentences: their client went away", len(job.lines))

    # --- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Run the worker on a thread of its own."""
        threading.Thread(target=self.run, name="mt-serve-worker", daemon=True).start()

    @property
    def draining(self) -> bool:
        """Whether the worker was told to stop (it answers what is queued, takes nothing new)."""
        return self._draining

    def drain(self) -> None:
        """Refuse new requests and decode what is queued without waiting to gather more."""
        with self._cond:
            self._draining = True
            self._cond.notify_all()

    def stop(self) -> None:
        """Drain, then wait for the worker (if it ever ran) to answer everything queued."""
        self.drain()
        if self._running:
            self._finished.wait()

    def wait_until(self, ready: Callable[[Stats], bool], timeout: float) -> bool:
        """Block until ready(stats) holds (True), or the timeout passes (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: ready(self.stats), timeout)

    # --- the worker ----------------------------------------------------------------------------

    def run(self) -> None:
        """Decode queued requests on the calling thread until drained and answered."""
        self._running = True
        try:
            self._loop()
        finally:
            self._finished.set()

    def _loop(self) -> None:
        while jobs := self._gather():
            groups: dict[tuple[int, int, str | None, bool], list[Job]] = {}
            # One search per setting that shapes it. Prefixes do not; constraints take another
            # search, which requests without them keep out of, as they would in mt translate.
            for job in jobs:
                key = (job.beam, job.nbest, job.tgt_lang, job.constraints is not None)
                groups.setdefault(key, []).append(job)
            for (beam, nbest, tgt_lang, _), group in groups.items():
                self._decode(group, replace(self.decode, beam=beam, nbest=nbest), tgt_lang)
            with self._cond:
                self.stats.rounds += 1
                self.stats.most_requests = max(self.stats.most_requests, len(jobs))
                self.stats.requests += len(jobs)
                answered = sum(len(job.lines) for job in jobs)
                self.stats.sentences += answered
                self._recent.append(answered + self.stats.queued)
                self._free_since = time.monotonic()
                self._cond.notify_all()

    def _gather(self) -> list[Job]:
        """The next jobs to decode, oldest first, about one batch of tokens; [] to exit."""
        with self._cond:
            while True:  # again if every gathered request was dropped while waiting
                self._cond.wait_for(lambda: self._queue or self._draining)
                if not self._queue:
                    return []  # draining, and everything has been answered
                # Up to batch_wait_ms from when a request came or the worker became free.
                start = max(self._queue[0].arrived, self._free_since)
                deadline = start + self.limits.batch_wait_ms / 1000
                self._cond.wait_for(self._gathered, timeout=max(0.0, deadline - time.monotonic()))
                if self._queue:
                    break
            jobs, tokens = [], 0
            while self._queue and (not jobs or tokens + self._queue[0].tokens <= self.max_tokens):
                jobs.append(self._queue.popleft())
                tokens += jobs[-1].tokens
            self.stats.queued -= sum(len(job.lines) for job in jobs)
            return jobs

    def _gathered(self) -> bool:
        """Whether to stop waiting: draining, a batch's worth of tokens, or the recent load."""
        return (
            self._draining
            or self.stats.queued >= max(self._recent, default=math.inf)
            or self._waiting_tokens() >= self.max_tokens
        )

    def _waiting_tokens(self) -> int:
        return sum(job.tokens for job in self._queue)

    def _decode(self, jobs: list[Job], decode: DecodeConfig, tgt_lang: str | None) -> None:
        """Translate the jobs' lines together and answer each job with its own lines."""
        lines = [line for job in jobs for line in job.lines]
        log.debug(
            "decoding %d sentences of %d requests, beam %d", len(lines), len(jobs), decode.beam
        )
        try:
            translator = Translator(self.tokenizer, self.model, decode, self.device, self.precision)
            found = translator.translate(
                lines,
                max_tokens=self.max_tokens,
                scores=True,
                tgt_lang=tgt_lang,
                prefixes=_per_line(jobs, [job.prefixes for job in jobs]),
                constraints=_per_line(jobs, [job.constraints for job in jobs]),
            )
        except Exception as exc:  # the worker must outlive a failed batch; its requests get 500
            if len(jobs) > 1:  # one request may be the cause (out of memory): spare the others
                log.warning(
                    "decoding %d sentences of %d requests failed (%s): each request again, alone",
                    len(lines), len(jobs), exc,
                )  # fmt: skip
                for job in jobs:
                    self._decode([job], decode, tgt_lang)
                return
            log.exception("decoding %d sentences failed", len(lines))
            _answer(jobs[0], exc)
            return
        start = 0
        for job in jobs:
            hyps = found[start : start + len(job.lines)]
            start += len(job.lines)
            try:  # one request's attention failing (out of memory) fails that request alone
                results = [self._result(job, i, h) for i, h in enumerate(hyps)]
            except Exception as exc:
                log.exception("the results of a request of %d sentences failed", len(job.lines))
                _answer(job, exc)
                continue
            _answer(job, results)

    def _result(self, job: Job, index: int, hyps: list[Translation]) -> Result:
        ids = job.ids[index]
        if not (job.attention and ids):
            return Result(hyps, None)
        # Heads averaged at once (what the answer shows): a waiting answer holds 1/H of them.
        found = alignment(self.model, self.tokenizer, ids, hyps[0].tokens).heads_averaged()
        # A multilingual model's tag is not the user's text: left out, as `mt attention` does.
        tagged = bool(self.tokenizer.tags)
        return Result(hyps, found.without_first_source() if tagged else found)


def _per_line(jobs: list[Job], given: list[list[Any] | None]) -> list[Any] | None:
    """The jobs' per-line steering, one list over all their lines ([] for a job without it)."""
    if all(rows is None for rows in given):
        return None
    return [
        row for job, rows in zip(jobs, given, strict=True) for row in rows or [[]] * len(job.lines)
    ]


def _answer(job: Job, value: list[Result] | BaseException) -> None:
    """Hand a job's answer to its event loop (it may be closed, or the request cancelled)."""

    def settle() -> None:
        if job.future.done():
            return  # the client went away
        if isinstance(value, BaseException):
            job.future.set_exception(value)
        else:
            job.future.set_result(value)

    try:
        job.future.get_loop().call_soon_threadsafe(settle)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        log.debug("answer for a closed event loop dropped")
