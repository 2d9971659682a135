"""The HTTP API of `mt serve` (FastAPI): schemas, validation, one-line JSON errors, the page.

POST /v1/translate   sentences in, line-aligned translations out (n-best, pieces, attention)
GET  /v1/model       what the model is: languages, size, training, decoding defaults, limits
GET  /health         for probes: ok, with the worker's counters
GET  /               the page (page.html); /docs and /openapi.json come with FastAPI

Every error is a JSON object {"error": "FIELD: what is wrong"} on one line, with a 4xx status
for bad requests, 503 and Retry-After when the queue is full, 500 without a traceback for bugs.
A request names no file and no model: the server translates with the one it loaded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mt.search import limits_of
from mt.serve.limits import Limits
from mt.serve.worker import Batcher, Job, Result, Unavailable
from mt.tokenizer import Tokenizer
from mt.translate import Translation, encode_sources, first_untargeted, forced_problem, meets

RETRY_AFTER_S = 1  # what a 503 tells clients to wait: about one batch of decoding
CLIENT_GONE = 499  # nginx's code for "client closed request": nobody reads this response


# --- schemas ---------------------------------------------------------------------------------


class TranslateRequest(BaseModel):
    """Sentences to translate and how (strict: "5" is not a beam, unknown fields are refused)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    text: str | list[str] = Field(description="One sentence, or a list of sentences.")
    prefix: str | list[str] | None = Field(
        None,
        description="How each translation starts: a list line-aligned with text (a string for "
        "one sentence); an empty string means none.",
    )
    constraints: list[list[str]] | None = Field(
        None,
        description="Phrases each translation must contain, in any order: one list per "
        "sentence, line-aligned with text (an empty list means none).",
    )
    beam: int | None = Field(None, ge=1, description="Beam size (default: the server's).")
    nbest: int | None = Field(
        None, ge=1, description="Hypotheses per sentence (at most beam); the list is returned."
    )
    tgt_lang: str | None = Field(
        None,
        description="Target language (one of the model's); a sentence that starts with its own "
        "tag (>>fr<< ...) goes into that language.",
    )
    pieces: bool = Field(False, description="Return source and target pieces.")
    attention: bool = Field(
        False, description="Return the best translation's cross-attention (mean of heads)."
    )


class Hypothesis(BaseModel):
    """One of a sentence's n best translations."""

    text: str
    score: float | None = Field(description="Length-penalised log-probability.")
    pieces: list[str] | None = None
    constraints_met: bool | None = Field(
        None, description="Whether it contains every constraint (sentences with constraints)."
    )


class Attention(BaseModel):
    """Cross-attention of the best translation: layers x target x source, mean of heads."""

    source: list[str] = Field(description="S labels: the source pieces, then </s>.")
    target: list[str] = Field(description="T labels: the output pieces, then </s>.")
    layers: list[list[list[float]]] = Field(description="(decoder layers, T, S); rows sum to 1.")


class TranslationOut(BaseModel):
    """The translation of one input sentence (empty for a blank one)."""

    text: str
    score: float | None = Field(description="Length-penalised log-probability of the text.")
    constraints_met: bool | None = Field(
        None, description="Whether the text contains every constraint (sentences with some)."
    )
    nbest: list[Hypothesis] | None = None
    source_pieces: list[str] | None = None
    target_pieces: list[str] | None = None
    attention: Attention | None = None


class TranslateResponse(BaseModel):
    """One translation per input sentence, in input order."""

    translations: list[TranslationOut]


class ModelInfo(BaseModel):
    """The served model: languages, size, training, decoding defaults and the server's limits."""

    source_languages: list[str]
    target_languages: list[str]
    directions: list[str] = Field(
        description="The directions trained, e.g. de-en; others are zero-shot."
    )
    parameters: int
    checkpoint: str
    steps: int | None = Field(description="Training steps (None when unknown).")
    best_dev_bleu: float | None
    architecture: dict[str, Any]
    decoding: dict[str, Any]
    limits: dict[str, Any]
    max_source_pieces: int
    device: str
    precision: str
    quantization: str = Field(description="none, or int8 (see mt translate --quantize).")


class Health(BaseModel):
    """Liveness, and what the worker has done so far (see worker.Stats)."""

    status: str
    queued: int
    requests: int
    sentences: int
    rounds: int
    most_requests: int
    dropped: int


class Error(BaseModel):
    """Every error response: one line naming the field (or body, queue, server)."""

    error: str


# --- what the app serves ---------------------------------------------------------------------


@dataclasses.dataclass
class Served:
    """The loaded model's tokenizer, batcher and description, and the server's limits."""

    tokenizer: Tokenizer
    batcher: Batcher
    info: ModelInfo
    limits: Limits
    nbest: int  # the run's decode.nbest, which a request's beam caps, not the server's --beam


class RequestError(Exception):
    """A request the server refuses: a field and what is wrong with it."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.status = status


def _served(request: Request) -> Served:
    return request.app.state.served


ServedDep = Annotated[Served, Depends(_served)]
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Error, "description": text}
    for code, text in (
        (400, "Malformed JSON or an empty body"),
        (413, "Body over the size limit"),
        (422, "A field is missing, of the wrong type or out of range"),
        (503, "Queue full or shutting down; see Retry-After"),
    )
}
router = APIRouter()


# --- routes ----------------------------------------------------------------------------------


@router.post(
    "/v1/translate",
    response_model=TranslateResponse,
    response_model_exclude_unset=True,  # a null score stays: unset options are left out
    responses=ERRORS,
)
async def translate(body: TranslateRequest, request: Request, served: ServedDep) -> Any:
    """Translate sentences; the answer has one translation per sentence, in order."""
    lines = [body.text] if isinstance(body.text, str) else body.text
    beam, nbest = _settings(body, served)
    ids = _encode(lines, served, body.tgt_lang, isinstance(body.text, str))
    room = served.batcher.model.max_positions - 2  # output pieces before EOS, as mt translate
    prefixes = None if body.prefix is None else _prefixes(body.prefix, len(lines), served, room)
    wanted = body.constraints
    constraints = None if wanted is None else _constraints(wanted, len(lines), served, room)
    if body.attention:
        _check_attention(ids, prefixes, constraints, served)
    try:
        job = served.batcher.submit(
            lines, ids, beam, nbest, body.attention, body.tgt_lang, prefixes, constraints
        )
    except Unavailable as exc:
        headers = {"Retry-After": str(RETRY_AFTER_S)}
        return JSONResponse({"error": str(exc)}, status_code=503, headers=headers)
    try:
        results = await _results(job, request, served.batcher)
    except Exception:  # the worker logged why; the next batch may well succeed
        return JSONResponse({"error": "server: translation failed (see its log)"}, 500)
    if results is None:
        return Response(status_code=CLIENT_GONE)
    # n-best lists when asked for, or when the server's default gives several (as mt translate).
    with_nbest = body.nbest is not None or nbest > 1

    # A multilingual model's tag is not the user's text: its pieces leave it out, as attention.
    tagged = bool(served.tokenizer.tags)

    def render() -> TranslateResponse:
        translations = [
            _render(result, seq[1:] if tagged else seq, served.tokenizer, with_nbest, body.pieces)
            for result, seq in zip(results, ids, strict=True)
        ]
        for out, result, seq, phrases in zip(
            translations, results, ids, constraints or [None] * len(ids), strict=True
        ):
            if phrases and seq:  # a blank sentence is not translated, so not steered
                _mark_constraints(out, result.hypotheses, phrases)
        return TranslateResponse(translations=translations)

    if not body.attention:
        return render()

    # Attention maps are many floats to turn into lists and JSON: off the event loop, which
    # serves the others meanwhile (FastAPI would write a returned model on the loop).
    def written() -> bytes:
        return render().model_dump_json(exclude_unset=True).encode()

    return Response(await asyncio.to_thread(written), media_type="application/json")


@router.get("/v1/model", response_model=ModelInfo)
async def model_info(served: ServedDep) -> ModelInfo:
    """Describe the model, its decoding defaults and the server's limits."""
    return served.info


@router.get("/health", response_model=Health, responses={503: {"model": Health}})
async def health(served: ServedDep) -> Any:
    """Liveness for probes, with the worker's counters; 503 "draining" once told to stop."""
    draining = served.batcher.draining
    status = Health(
        status="draining" if draining else "ok", **dataclasses.asdict(served.batcher.stats)
    )
    return JSONResponse(status.model_dump(), status_code=503) if draining else status


PAGE_HEADERS = {
    # The page is self-contained: forbid anything from elsewhere (no CDN can creep in).
    "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
    "style-src 'unsafe-inline'",
    "X-Content-Type-Options": "nosniff",
}


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page(request: Request) -> HTMLResponse:
    """The page to try the model."""
    return HTMLResponse(request.app.state.page, headers=PAGE_HEADERS)


# --- request handling ------------------------------------------------------------------------


def _settings(body: TranslateRequest, served: Served) -> tuple[int, int]:
    """The request's beam and n-best, checked against the model and the limits."""
    info, limits = served.info, served.limits
    known = ", ".join(info.target_languages)
    if body.tgt_lang is not None and body.tgt_lang not in info.target_languages:
        raise RequestError(
            "tgt_lang", f"{body.tgt_lang!r} is not a target language of this model ({known})"
        )
    decode = served.batcher.decode
    beam = body.beam or decode.beam
    if beam > limits.max_beam:
        raise RequestError("beam", f"{beam} exceeds this server's limit of {limits.max_beam}")
    if decode.sampling:  # samples are drawn, as many as asked, whatever the beam (as mt translate)
        nbest = body.nbest or decode.nbest
        if nbest > limits.max_beam:
            raise RequestError("nbest", f"{nbest} exceeds this server's limit of {limits.max_beam}")
        return beam, nbest
    nbest = body.nbest or min(served.nbest, beam)
    if nbest > beam:
        raise RequestError("nbest", f"{nbest} exceeds the beam ({beam})")
    return beam, nbest


def _check_tags(lines: list[str], known: list[str], tgt_lang: str | None, single: bool) -> None:
    """A multilingual model's sentences name their target: their own >>xx<<, or tgt_lang."""
    if (found := first_untargeted(lines, known, tgt_lang)) is None:
        return
    index, lang = found
    listed = ", ".join(known)
    if lang is not None:
        raise RequestError(
            _item("text", index, single),
            f"starts with >>{lang}<<, not a target language of this model ({listed})",
        )
    raise RequestError(
        "tgt_lang",
        f"missing: this model translates into {listed} (or start each sentence with its tag, "
        f"e.g. >>{known[0]}<<)",
    )


def _item(field: str, index: int, single: bool) -> str:
    """How an error names one item of a field: `text[3]`, or `text` when given as one string."""
    return field if single else f"{field}[{index}]"


def _encode(
    lines: list[str], served: Served, tgt_lang: str | None, single: bool = False
) -> list[list[int]]:
    """Source ids per line (none for blank lines); refuses too many or too long sentences.

    `single`: the text was one string, which errors name without an index."""
    limit, longest = served.limits.max_sentences, served.info.max_source_pieces
    if not lines:
        raise RequestError("text", "empty list; give a string or a non-empty list of strings")
    if len(lines) > limit:
        raise RequestError("text", f"{len(lines)} sentences exceed the limit of {limit}")
    _check_unicode("text", lines, single)
    if served.tokenizer.tags:
        _check_tags(lines, served.info.target_languages, tgt_lang, single)
    ids = encode_sources(lines, served.tokenizer, sys.maxsize, tgt_lang)  # refused, not cut
    tag = int(bool(served.tokenizer.tags))  # a place of the source's own
    for index, seq in enumerate(ids):
        if len(seq) - tag > longest:
            raise RequestError(
                _item("text", index, single),
                f"{len(seq) - tag} pieces exceed the model's limit of {longest}",
            )
    return ids


def _prefixes(prefix: str | list[str], count: int, served: Served, room: int) -> list[list[int]]:
    """Target pieces of each sentence's prefix; refuses a count other than `count`, long ones."""
    single = isinstance(prefix, str)
    rows = [prefix] if single else prefix
    _check_aligned("prefix", len(rows), count)
    _check_unicode("prefix", rows, single)
    ids = served.tokenizer.encode_tgt(rows)
    for index, seq in enumerate(ids):
        if seq and (problem := forced_problem(seq, room)):
            raise RequestError(_item("prefix", index, single), problem)
    return ids


def _constraints(
    phrases: list[list[str]], count: int, served: Served, room: int
) -> list[list[list[int]]]:
    """Target pieces of each sentence's phrases; refuses a count other than `count`, more
    phrases than the limit, empty or long phrases, and a server that samples."""
    if served.batcher.decode.sampling:
        raise RequestError("constraints", "need beam search, but this server samples")
    _check_aligned("constraints", len(phrases), count)
    limit = served.limits.max_constraints
    for i, row in enumerate(phrases):
        if len(row) > limit:  # the search's work grows with the phrases a sentence has
            raise RequestError(
                f"constraints[{i}]", f"{len(row)} phrases exceed this server's limit of {limit}"
            )
        _check_unicode(f"constraints[{i}]", row)
    flat = iter(served.tokenizer.encode_tgt([text for row in phrases for text in row]))
    ids = [[next(flat) for _ in row] for row in phrases]
    for i, row in enumerate(ids):
        for j, seq in enumerate(row):
            if problem := forced_problem(seq, room):
                raise RequestError(f"constraints[{i}][{j}]", problem)
    return ids


def _check_attention(
    ids: list[list[int]],
    prefixes: list[list[int]] | None,
    constraints: list[list[list[int]]] | None,
    served: Served,
) -> None:
    """RequestError where the request's attention could hold more weights than the limit:
    decoder layers x output limit x source pieces (EOS included), over its sentences."""
    model, decode = served.batcher.model, served.batcher.decode
    src_len = torch.tensor([len(seq) + 1 for seq in ids])  # (B,)
    forced = torch.tensor([
        len(prefixes[i] if prefixes else []) + sum(map(len, constraints[i] if constraints else []))
        for i in range(len(ids))
    ])  # fmt: skip
    cap = model.max_positions - 1
    limits = limits_of(src_len, decode.max_len_a, decode.max_len_b, cap, forced)  # (B,)
    blank = torch.tensor([not seq for seq in ids])  # not translated
    weights = int((len(model.decoder) * limits * src_len).masked_fill(blank, 0).sum())
    limit = served.limits.max_attention_weights
    if weights > limit:
        raise RequestError(
            "attention",
            f"up to {weights:,} weights for these sentences (decoder layers x output limit x "
            f"source pieces), over this server's limit of {limit:,}: ask for fewer sentences",
        )


def _check_unicode(field: str, rows: list[str], single: bool = False) -> None:
    """RequestError naming `field[i]` (`field` if `single`), the first string that is not text
    (a lone surrogate).

    JSON's \\ud800-style escapes may spell half a UTF-16 pair, which is not a character.
    """
    for index, row in enumerate(rows):
        try:
            row.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(
                _item(field, index, single), "not valid Unicode (a lone UTF-16 surrogate)"
            ) from None


def _check_aligned(field: str, given: int, count: int) -> None:
    """RequestError unless `field` gives one item per sentence."""
    if given != count:
        sentences = "1 sentence" if count == 1 else f"{count} sentences"
        raise RequestError(field, f"{given} for {sentences}; give one per sentence")


async def _results(job: Job, request: Request, batcher: Batcher) -> list[Result] | None:
    """The job's results, or None if the client went away first (the job is then dropped)."""
    left = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({job.future, left}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this request is itself cancelled
        left.cancel()
        if not job.future.done():
            batcher.cancel(job)
    return None if job.future.cancelled() else job.future.result()


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: nothing else can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _render(
    result: Result, ids: list[int], tokenizer: Tokenizer, nbest: bool, pieces: bool
) -> TranslationOut:
    """One sentence's answer, with what the request asked for."""
    hyps = result.hypotheses
    best = hyps[0]
    out = TranslationOut(text=best.text, score=_finite(best.score))
    if nbest:
        out.nbest = [
            Hypothesis(text=h.text, score=_finite(h.score))
            if not pieces
            else Hypothesis(text=h.text, score=_finite(h.score), pieces=_pieces(tokenizer, h))
            for h in hyps
        ]
    if pieces:
        out.source_pieces = [tokenizer.src.id_to_piece(i) for i in ids]
        out.target_pieces = _pieces(tokenizer, best)
    if result.alignment is not None:
        found = result.alignment
        weights = found.weights.mean(dim=1).double().round(decimals=4)  # (layers, T, S)
        out.attention = Attention(
            source=found.source_pieces, target=found.target_pieces, layers=weights.tolist()
        )
    return out


def _mark_constraints(
    out: TranslationOut, hyps: list[Translation], phrases: list[list[int]]
) -> None:
    """Say of the best translation and each n-best one whether it meets every constraint."""
    out.constraints_met = hyps[0].found and meets(hyps[0].tokens, phrases)
    for shown, hyp in zip(out.nbest or [], hyps, strict=False):
        shown.constraints_met = hyp.found and meets(hyp.tokens, phrases)


def _pieces(tokenizer: Tokenizer, hyp: Translation) -> list[str]:
    return [tokenizer.tgt.id_to_piece(i) for i in hyp.tokens]


def _finite(score: float) -> float | None:
    """JSON has no NaN or infinity: such a score is null."""
    return score if math.isfinite(score) else None


# --- errors ----------------------------------------------------------------------------------


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message.splitlines()[0]}, status_code=status)


async def _request_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestError)
    return _error(exc.status, str(exc))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # The most specific error: in a union (text: str | list[str]) the list member's says which
    # item is wrong.
    error = max(exc.errors(), key=lambda e: len(e["loc"]))
    return _error(*_explain(error))


UNION_MEMBERS = {"str", "list[str]"}  # pydantic names the union member in the error's loc
FIELDS = ", ".join(TranslateRequest.model_fields)


def _explain(error: dict[str, Any]) -> tuple[int, str]:
    """(status, "FIELD: message") for one of pydantic's errors about the request body."""
    kind, loc = error["type"], error["loc"][1:]  # loc[0] is "body"
    field = "".join(
        f"[{part}]" if isinstance(part, int) else f".{part}"
        for part in loc
        if part not in UNION_MEMBERS
    ).lstrip(".")
    if kind == "json_invalid":
        return 400, f"body: malformed JSON ({error['ctx']['error']} at character {loc[0]})"
    if kind == "extra_forbidden":  # the key as sent (a key "str" is no union member)
        key = str(loc[-1])
        shown = key if key and key.isprintable() and key.strip() == key else repr(key)
        return 422, f"{shown}: unknown field (the fields are {FIELDS})"
    if not field:
        if kind == "missing":
            return 400, 'body: empty; expected a JSON object such as {"text": ["..."]}'
        if isinstance(error.get("input"), bytes):  # not parsed: the Content-Type was not JSON
            return 400, "body: not JSON; send it with Content-Type: application/json"
        return 422, 'body: expected a JSON object such as {"text": ["..."]}'
    if field in ("text", "prefix") and kind in ("string_type", "list_type"):
        return 422, f"{field}: expected a string or a list of strings"
    return 422, f"{field}: {error['msg']}"


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 400 and (why := _unparsed(exc.__cause__)):
        return _error(400, f"body: {why}")
    where = "path" if exc.status_code in (404, 405) else "request"
    response = _error(exc.status_code, f"{where}: {exc.detail}")
    response.headers.update(exc.headers or {})
    return response


def _unparsed(cause: BaseException | None) -> str | None:
    """Why FastAPI could not parse a body as JSON, where its own answer does not say."""
    if isinstance(cause, UnicodeDecodeError):
        return f"not UTF-8 (byte {cause.start} of the body)"
    if isinstance(cause, RecursionError):
        return "JSON nested too deeply"
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        return "malformed JSON (an integer of more digits than Python reads)"
    return None


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    # Starlette re-raises the exception after this answer, and uvicorn logs its traceback.
    return _error(500, "server: internal error (see the server's log)")


LOCAL_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


def _host_name(header: str) -> str:
    """The name in a Host header, without its port: "[::1]:8000" -> "::1"."""
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


class LocalHostsOnly:
    """Refuses requests whose Host header is not a loopback name, with a JSON 400.

    A server on 127.0.0.1 is out of other machines' reach, but not of a page of another site
    whose name its owner points at 127.0.0.1 (DNS rebinding): the browser then sends that name.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        host = Headers(scope=scope).get("host") if scope["type"] == "http" else None
        if host is None or _host_name(host).lower() in LOCAL_NAMES:  # HTTP/1.0 may send none
            await self.app(scope, receive, send)
            return
        names = ", ".join(sorted(LOCAL_NAMES))
        refusal = _error(400, f"host: {host!r} is not this server's name ({names})")
        await refusal(scope, receive, send)


class BodyLimit:
    """Refuses request bodies over max_bytes with a JSON 413, reading at most that much.

    Starlette's own limit answers a too-large Content-Length in plain text.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:  # then what comes after the body: the client's disconnect
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"body: larger than the limit of {self.max_bytes:,} bytes"
        await _error(413, message)(scope, receive, send)


# --- the app ---------------------------------------------------------------------------------


def create_app(
    served: Served,
    cors_origins: list[str] | None = None,
    worker_thread: bool = True,
    local_only: bool = False,
) -> ASGIApp:
    """The FastAPI app serving `served`; the lifespan stops its worker, and starts it on a
    thread of its own unless the caller runs it (worker_thread=False). `local_only` refuses
    requests for any host but this machine's loopback names (see LocalHostsOnly)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if worker_thread:
            served.batcher.start()
        yield
        await asyncio.to_thread(served.batcher.stop)  # answers everything still queued

    app = FastAPI(
        title="mt serve",
        summary=", ".join(d.replace("-", " → ") for d in served.info.directions)
        + " translation with a Transformer trained by mt",
        lifespan=lifespan,
    )
    app.state.served = served
    app.state.page = (resources.files("mt.serve") / "page.html").read_text(encoding="utf-8")
    app.include_router(router)
    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)
    limited: ASGIApp = BodyLimit(app, served.limits.max_request_bytes)
    if local_only:
        limited = LocalHostsOnly(limited)
    if not cors_origins:  # none unless configured: browsers keep other sites' pages out
        return limited
    # Outermost, so that every answer (a 413 from BodyLimit, a 500) carries its headers.
    return CORSMiddleware(
        limited,
        allow_origins=cors_origins,
        allow_methods=["GET", "POST"],
        allow_headers=["Content-Type"],
    )
