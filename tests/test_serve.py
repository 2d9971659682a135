"""`mt serve`: schemas, line alignment, identity with `mt translate` under concurrent load,
every bad input, limits, a full queue, dropped clients, graceful shutdown, the load generator."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import importlib.util
import json
import logging
import math
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip(
    "fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')"
)
pytest.importorskip("httpx", reason="httpx is not installed (pip install -e '.[dev]')")

import httpx
from fastapi.testclient import TestClient
from helpers.ports import free_port
from helpers.runs import run_with

from mt import serve as serve_package
from mt.alignment import align
from mt.cli import app as cli_app
from mt.config import CONFIG_FILE, load_config
from mt.errors import MtError
from mt.metrics import read_metrics
from mt.model import count_parameters
from mt.rundir import load_trained
from mt.serve import server as server_module
from mt.serve import worker as worker_module
from mt.serve.api import Served, create_app
from mt.serve.limits import Limits
from mt.serve.server import load, serve, serving
from mt.translate import Translator, encode_constraints, encode_prefixes

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "tiny"
CPU = torch.device("cpu")
TIMEOUT_S = 120  # a safety net only: every wait below ends on an event
SENTENCES = (TINY / "valid.de").read_text(encoding="utf-8").splitlines()
JSON = {"Content-Type": "application/json"}
FIELDS = "text, prefix, constraints, beam, nbest, tgt_lang, pieces, attention"  # of a request


def mt_translate(run: Path, lines: list[str], *args: str) -> list[str]:
    """`mt translate`'s output lines for `lines` (in-process; fp32 on the CPU)."""
    args = ("translate", "-m", str(run), "--device", "cpu", "--precision", "fp32", *args)
    result = CliRunner().invoke(cli_app, list(args), input="".join(f"{x}\n" for x in lines))
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()


@pytest.fixture
def make_served(trained_run: Path) -> Iterator[Callable[..., Served]]:
    """Served instances of the tiny run, or another `run`, (fp32, CPU) with the given limits;
    stopped after."""
    made: list[Served] = []

    def make(beam: int | None = None, run: Path = trained_run, **limits: float) -> Served:
        made.append(load(run, CPU, "fp32", beam, Limits(**limits)))
        return made[-1]

    yield make
    for served in made:
        served.batcher.stop()


@pytest.fixture
def client(make_served: Callable[..., Served]) -> Iterator[TestClient]:
    """A client of the app with the default limits; its lifespan runs the worker."""
    with TestClient(create_app(make_served())) as test_client:
        yield test_client


def post(client: TestClient, body: object) -> httpx.Response:
    return client.post("/v1/translate", json=body)


# --- answers ---------------------------------------------------------------------------------


def test_translations_are_line_aligned_and_equal_mt_translate(
    client: TestClient, trained_run: Path
) -> None:
    lines = [SENTENCES[0], "", "   ", SENTENCES[1], "漢字 🙂", SENTENCES[2]]
    response = post(client, {"text": lines})
    assert response.status_code == 200
    translations = response.json()["translations"]
    assert [t["text"] for t in translations] == mt_translate(trained_run, lines)
    assert [set(t) for t in translations] == [{"text", "score"}] * len(lines)
    assert translations[1] == translations[2] == {"text": "", "score": 0.0}
    assert all(t["score"] < 0 for t in translations if t["text"])
    (one,) = post(client, {"text": SENTENCES[0]}).json()["translations"]  # a string: one line
    assert one["text"] == translations[0]["text"]
    assert one["score"] == pytest.approx(translations[0]["score"], abs=1e-5)  # other padding


def test_nbest_lists_equal_mt_translate_nbest(client: TestClient, trained_run: Path) -> None:
    lines = [SENTENCES[3], "", SENTENCES[4]]
    response = post(client, {"text": lines, "beam": 4, "nbest": 3})
    expected = [
        row.split("\t") for row in mt_translate(trained_run, lines, "--beam", "4", "--nbest", "3")
    ]
    for i, translation in enumerate(response.json()["translations"]):
        rows = expected[3 * i : 3 * i + 3]
        assert [h["text"] for h in translation["nbest"]] == [row[2] for row in rows]
        assert [f"{h['score']:.4f}" for h in translation["nbest"]] == [row[1] for row in rows]
        assert translation["text"] == translation["nbest"][0]["text"]
    # As with mt translate, the list comes when asked for, even of one.
    assert len(post(client, {"text": "x", "nbest": 1}).json()["translations"][0]["nbest"]) == 1


def test_the_runs_nbest_is_capped_by_the_requests_beam_not_the_servers(
    make_served: Callable[..., Served], trained_run: Path, tmp_path: Path
) -> None:
    run = run_with(trained_run, tmp_path / "run", ["decode.beam=5", "decode.nbest=3"])
    expected = mt_translate(run, [SENTENCES[0]])  # the run's 3-best
    with TestClient(create_app(make_served(1, run))) as client:  # mt serve RUN --beam 1
        default = post(client, {"text": SENTENCES[0]}).json()["translations"][0]
        assert "nbest" not in default  # the server's beam 1: one output
        wide = post(client, {"text": SENTENCES[0], "beam": 5}).json()["translations"][0]
        assert [h["text"] for h in wide["nbest"]] == [r.split("\t")[2] for r in expected]
        assert len(expected) == 3


def test_a_sampling_server_draws_as_many_samples_as_mt_translate(
    make_served: Callable[..., Served], trained_run: Path, tmp_path: Path
) -> None:
    sampling = ["decode.sampling=true", "decode.beam=1", "decode.nbest=4"]
    run = run_with(trained_run, tmp_path / "run", sampling)
    expected = mt_translate(run, [SENTENCES[0]])  # the run's default: 4 samples, as n-best rows
    with TestClient(create_app(make_served(run=run))) as client:
        default = post(client, {"text": SENTENCES[0]}).json()["translations"][0]
        assert len(default["nbest"]) == len(expected) == 4
        asked = post(client, {"text": SENTENCES[0], "nbest": 6}).json()["translations"][0]
        assert len(asked["nbest"]) == 6  # more than the beam: samples, not beams
        over = post(client, {"text": SENTENCES[0], "nbest": 17})
        assert (over.status_code, over.json()) == (
            422, {"error": "nbest: 17 exceeds this server's limit of 16"}
        )  # fmt: skip


def test_pieces_are_the_tokenizers(client: TestClient, trained_run: Path) -> None:
    _, tokenizer, _, _ = load_trained(trained_run, CPU)
    response = post(client, {"text": [SENTENCES[5]], "pieces": True, "nbest": 2})
    translation = response.json()["translations"][0]
    assert translation["source_pieces"] == tokenizer.src.encode(SENTENCES[5], out_type=str)
    assert tokenizer.tgt.decode_pieces(translation["target_pieces"]) == translation["text"]
    assert translation["nbest"][0]["pieces"] == translation["target_pieces"]


def test_attention_is_what_mt_attention_plots(client: TestClient, trained_run: Path) -> None:
    config, tokenizer, model, _ = load_trained(trained_run, CPU)
    sentence = "der Hund läuft schnell ."
    found = align(model, tokenizer, sentence, config.decode)
    response = post(client, {"text": [sentence, ""], "attention": True})
    with_attention, blank = response.json()["translations"]
    attention = with_attention["attention"]
    assert with_attention["text"] == found.translation
    assert (attention["source"], attention["target"]) == (found.source_pieces, found.target_pieces)
    weights = torch.tensor(attention["layers"], dtype=torch.float64)  # (layers, T, S), rounded
    assert weights.shape == (
        config.model.dec_layers,
        len(found.target_pieces),
        len(found.source_pieces),
    )
    assert torch.allclose(
        weights, found.weights.mean(dim=1).double(), atol=1e-4 + 1e-6
    )  # 4 decimals
    assert "attention" not in blank
    # Written off the event loop, the answer is otherwise the one without attention.
    assert response.headers["content-type"] == "application/json"
    without = post(client, {"text": [sentence, ""]}).json()["translations"]
    assert [{k: v for k, v in with_attention.items() if k != "attention"}, blank] == without


def test_attention_is_refused_over_the_limit_on_its_weights(
    make_served: Callable[..., Served], trained_run: Path
) -> None:
    config, tokenizer, _, _ = load_trained(trained_run, CPU)
    text, prefix = ["der Hund läuft schnell .", "", "das Haus ."], ["", "", "The house"]
    src = [len(ids) + 1 for ids in tokenizer.encode_src(text)]  # with EOS
    limits = [int(config.decode.max_len_a * n + config.decode.max_len_b) for n in src]
    assert len(tokenizer.encode_tgt([prefix[2]])[0]) + 1 <= limits[2]  # the prefix fits
    weights = config.model.dec_layers * (limits[0] * src[0] + limits[2] * src[2])  # not the blank
    with TestClient(create_app(make_served(max_attention_weights=weights))) as client:
        body = {"text": text, "prefix": prefix, "attention": True}
        assert post(client, body).status_code == 200
        assert post(client, {**body, "attention": False}).status_code == 200
    with TestClient(create_app(make_served(max_attention_weights=weights - 1))) as client:
        assert post(client, {**body, "attention": False}).status_code == 200
        response = post(client, body)
        assert (response.status_code, response.json()) == (422, {"error": (
            f"attention: up to {weights:,} weights for these sentences (decoder layers x output "
            f"limit x source pieces), over this server's limit of {weights - 1:,}: ask for "
            "fewer sentences"
        )})  # fmt: skip


def test_model_card_health_schema_and_page(client: TestClient, trained_run: Path) -> None:
    _, _, model, _ = load_trained(trained_run, CPU)
    card = client.get("/v1/model").json()
    assert card["source_languages"] == ["de"] and card["target_languages"] == ["en"]
    assert card["directions"] == ["de-en"]
    assert card["parameters"] == count_parameters(model)
    assert (card["checkpoint"], card["steps"]) == ("step-00000300", 300)
    assert card["best_dev_bleu"] == max(r["bleu"] for r in read_metrics(trained_run, "valid"))
    assert card["decoding"]["beam"] == 2 and card["limits"] == {
        **dataclasses.asdict(Limits()), "max_tokens": 512
    }  # fmt: skip
    assert str(trained_run) not in json.dumps(card)  # no paths
    assert (card["precision"], card["quantization"]) == ("fp32", "none")
    assert client.get("/health").json()["status"] == "ok"
    schema = client.get("/openapi.json").json()
    assert schema["info"]["summary"] == "de → en translation with a Transformer trained by mt"
    assert {"/v1/translate", "/v1/model", "/health"} <= set(schema["paths"])
    request = schema["components"]["schemas"]["TranslateRequest"]
    assert ", ".join(request["properties"]) == FIELDS
    page = client.get("/")
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    assert not re.search(r"(src|href)=\"(https?:)?//", page.text)  # nothing from elsewhere
    assert 'id="source"' in page.text and 'id="heatmap"' in page.text


def test_int8_server_answers_as_mt_translate_int8(trained_run: Path) -> None:
    """One sentence at a time: int8 activations are quantised per batch, so a translation may
    depend on its batch mates; alone, it is what `mt translate --quantize int8` gives alone."""
    served = load(trained_run, CPU, "fp32", None, Limits(), "int8")
    _, _, model, _ = load_trained(trained_run, CPU)
    with TestClient(create_app(served)) as int8_client:
        card = int8_client.get("/v1/model").json()
        assert card["quantization"] == "int8"
        assert card["parameters"] == count_parameters(model)  # the model's, not int8's count
        for sentence in SENTENCES[:3]:
            answer = int8_client.post("/v1/translate", json={"text": sentence}).json()
            expected = mt_translate(trained_run, [sentence], "--quantize", "int8")
            assert [t["text"] for t in answer["translations"]] == expected
    served.batcher.stop()


def test_cors_only_when_configured(make_served: Callable[..., Served]) -> None:
    origin = {"Origin": "http://example.org"}
    with TestClient(create_app(make_served())) as closed:
        assert "access-control-allow-origin" not in closed.get("/health", headers=origin).headers
    with TestClient(create_app(make_served(), ["http://example.org"])) as opened:
        headers = opened.get("/health", headers=origin).headers
        assert headers["access-control-allow-origin"] == "http://example.org"
    # Refused before the app (BodyLimit): the page of that origin can still read why.
    with TestClient(create_app(make_served(max_request_bytes=100), ["http://example.org"])) as c:
        response = c.post("/v1/translate", json={"text": "a" * 200}, headers=origin)
        assert response.status_code == 413
        assert response.headers["access-control-allow-origin"] == "http://example.org"


def test_a_loopback_server_answers_only_requests_for_its_own_names(
    make_served: Callable[..., Served],
) -> None:
    app = create_app(make_served(), local_only=True)  # as `mt serve` on 127.0.0.1 makes it
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "LOCALHOST"):
            assert client.get("/health", headers={"Host": host}).status_code == 200, host
        # A page of another site whose name resolves to 127.0.0.1 (DNS rebinding):
        refused = client.get("/health", headers={"Host": "evil.example:8000"})
        assert (refused.status_code, refused.json()) == (
            400,
            {"error": "host: 'evil.example:8000' is not this server's name (127.0.0.1, ::1, "
             "localhost)"},
        )  # fmt: skip


# --- bad input -------------------------------------------------------------------------------

BAD = [
    (b"{bad", JSON, 400,
     "body: malformed JSON (Expecting property name enclosed in double quotes at character 1)"),
    (b"", JSON, 400, 'body: empty; expected a JSON object such as {"text": ["..."]}'),
    (b"[1]", JSON, 422, 'body: expected a JSON object such as {"text": ["..."]}'),
    (b'{"text": "a"}', {"Content-Type": "application/x-www-form-urlencoded"}, 400,
     "body: not JSON; send it with Content-Type: application/json"),
    # Without a Content-Type, a browser sends another site's request with no CORS preflight.
    (b'{"text": "a"}', {}, 400, "body: not JSON; send it with Content-Type: application/json"),
    (b'{"text": "Stra\xdfe"}', JSON, 400, "body: not UTF-8 (byte 14 of the body)"),
    (b'{"text": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", JSON, 400,
     "body: JSON nested too deeply"),
    (b'{"text": "a", "beam": 1' + b"0" * 5000 + b"}", JSON, 400,
     "body: malformed JSON (an integer of more digits than Python reads)"),
    (b'{"beam": 2}', JSON, 422, "text: Field required"),
    (b'{"text": 5}', JSON, 422, "text: expected a string or a list of strings"),
    (b'{"text": ["a", 3]}', JSON, 422, "text[1]: Input should be a valid string"),
    (b'{"text": []}', JSON, 422, "text: empty list; give a string or a non-empty list of strings"),
    (b'{"text": "a", "beam": "5"}', JSON, 422, "beam: Input should be a valid integer"),
    (b'{"text": "a", "beam": 2.0}', JSON, 422, "beam: Input should be a valid integer"),
    (b'{"text": "a", "beam": 0}', JSON, 422, "beam: Input should be greater than or equal to 1"),
    (b'{"text": "a", "beam": 17}', JSON, 422, "beam: 17 exceeds this server's limit of 16"),
    (b'{"text": "a", "nbest": 0}', JSON, 422, "nbest: Input should be greater than or equal to 1"),
    (b'{"text": "a", "nbest": 3}', JSON, 422, "nbest: 3 exceeds the beam (2)"),
    (b'{"text": "a", "tgt_lang": "fr"}', JSON, 422,
     "tgt_lang: 'fr' is not a target language of this model (en)"),
    (b'{"text": "a", "pieces": 1}', JSON, 422, "pieces: Input should be a valid boolean"),
    (b'{"text": "a", "model": "/etc/passwd"}', JSON, 422,
     f"model: unknown field (the fields are {FIELDS})"),
    (b'{"text": "a", "str": 1}', JSON, 422, f"str: unknown field (the fields are {FIELDS})"),
    (b'{"text": "a", "\\nx": 1}', JSON, 422, f"'\\nx': unknown field (the fields are {FIELDS})"),
    (b'{"text": ["a", "b"], "prefix": "A"}', JSON, 422,
     "prefix: 1 for 2 sentences; give one per sentence"),
    (b'{"text": "a", "prefix": 5}', JSON, 422, "prefix: expected a string or a list of strings"),
    (b'{"text": "a", "prefix": ["A", 5]}', JSON, 422, "prefix[1]: Input should be a valid string"),
    (b'{"text": "a", "constraints": [["dog"], []]}', JSON, 422,
     "constraints: 2 for 1 sentence; give one per sentence"),
    (b'{"text": ["a", "\\udfff"]}', JSON, 422,
     "text[1]: not valid Unicode (a lone UTF-16 surrogate)"),
    (b'{"text": "\\ud800 a", "prefix": "A"}', JSON, 422,
     "text: not valid Unicode (a lone UTF-16 surrogate)"),  # one string: no index
    (b'{"text": "a", "prefix": "\\ud800"}', JSON, 422,
     "prefix: not valid Unicode (a lone UTF-16 surrogate)"),
    (b'{"text": ["\\ud800 a"], "prefix": ["\\ud800"]}', JSON, 422,
     "text[0]: not valid Unicode (a lone UTF-16 surrogate)"),
    (b'{"text": "a", "constraints": [["dog", "\\ud800"]]}', JSON, 422,
     "constraints[0][1]: not valid Unicode (a lone UTF-16 surrogate)"),
    (b'{"text": "a", "constraints": ["dog"]}', JSON, 422,
     "constraints[0]: Input should be a valid list"),
    (b'{"text": "a", "constraints": [[' + b'"dog", ' * 16 + b'"cat"]]}', JSON, 422,
     "constraints[0]: 17 phrases exceed this server's limit of 16"),
    (b'{"text": ["a", "b"], "constraints": [[], ["dog", " "]]}', JSON, 422,
     "constraints[1][1]: is empty"),
]  # fmt: skip


def test_every_bad_request_gets_a_one_line_error_and_the_server_keeps_serving(
    client: TestClient,
) -> None:
    for body, headers, status, error in BAD:
        response = client.post("/v1/translate", content=body, headers=headers)
        assert (response.status_code, response.json()) == (status, {"error": error}), body
    assert client.get("/nope").json() == {"error": "path: Not Found"}
    assert client.delete("/health").json() == {"error": "path: Method Not Allowed"}
    good = post(client, {"text": "der Hund .", "tgt_lang": "en"})
    assert good.status_code == 200 and good.json()["translations"][0]["text"]


def test_limits_on_size_sentences_and_length(
    make_served: Callable[..., Served], trained_run: Path
) -> None:
    _, tokenizer, _, _ = load_trained(trained_run, CPU)
    with TestClient(create_app(make_served(max_request_bytes=1000, max_sentences=2))) as client:
        too_big = {"text": "a" * 1000}
        for body in (json.dumps(too_big).encode(), iter([json.dumps(too_big).encode()])):
            response = client.post("/v1/translate", content=body, headers=JSON)  # iter: chunked
            assert response.status_code == 413
            assert response.json() == {"error": "body: larger than the limit of 1,000 bytes"}
        response = post(client, {"text": ["a", "b", "c"]})
        assert response.json() == {"error": "text: 3 sentences exceed the limit of 2"}
        long = "a b " * 70
        pieces = len(tokenizer.encode_src([long])[0])
        assert pieces > 127
        response = post(client, {"text": ["a", long]})
        assert response.status_code == 422
        assert response.json() == {
            "error": f"text[1]: {pieces} pieces exceed the model's limit of 127"
        }
        # Prefixes and constraints: mt translate's limit, the pieces an output holds before EOS.
        pieces = len(tokenizer.encode_tgt([long])[0])
        out = f"has {pieces} pieces, more than the 126 an output can hold"
        for steering, error in (
            ({"prefix": ["", long]}, f"prefix[1]: {out}"),
            ({"constraints": [[], ["dog", long]]}, f"constraints[1][1]: {out}"),
            ({"prefix": "Ω"}, "prefix: holds characters that the target vocabulary lacks"),
            ({"constraints": [[], ["Ω"]]},
             "constraints[1][0]: holds characters that the target vocabulary lacks"),
        ):  # fmt: skip
            text = ["a"] if isinstance(steering.get("prefix"), str) else ["a", "b"]
            response = post(client, {"text": text, **steering})
            assert (response.status_code, response.json()) == (422, {"error": error})


def test_a_failed_batch_answers_500_without_a_traceback_and_the_next_succeeds(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Translator.translate

    def fail_once(*args: object, **kwargs: object) -> object:
        monkeypatch.setattr(Translator, "translate", real)
        raise RuntimeError("boom")

    monkeypatch.setattr(Translator, "translate", fail_once)
    response = post(client, {"text": "der Hund ."})
    assert (response.status_code, response.json()) == (
        500, {"error": "server: translation failed (see its log)"}
    )  # fmt: skip
    assert post(client, {"text": "der Hund ."}).status_code == 200


# --- batching --------------------------------------------------------------------------------


def queued_then_answered(served: Served, requests: list[dict]) -> list[httpx.Response]:
    """The responses to `requests`, all queued before the worker starts, so batches mix them."""

    async def scenario() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=create_app(served))  # no lifespan: we start it
        async with httpx.AsyncClient(transport=transport, base_url="http://mt") as client:
            sent = [asyncio.ensure_future(client.post("/v1/translate", json=r)) for r in requests]
            queued = sum(len(r["text"]) for r in requests)
            assert await asyncio.to_thread(
                served.batcher.wait_until, lambda s: s.queued == queued, TIMEOUT_S
            )
            served.batcher.start()
            responses = await asyncio.gather(*sent)
            # Answers go out before the worker counts its round: wait for the count.
            assert await asyncio.to_thread(
                served.batcher.wait_until, lambda s: s.requests == len(requests), TIMEOUT_S
            )
            return responses

    return asyncio.run(scenario())


def test_a_request_whose_attention_fails_leaves_its_batch_answered(
    make_served: Callable[..., Served], monkeypatch: pytest.MonkeyPatch
) -> None:
    def out_of_memory(*args: object, **kwargs: object) -> object:
        raise RuntimeError("out of memory (injected)")

    monkeypatch.setattr(worker_module, "alignment", out_of_memory)
    served = make_served()
    requests = [{"text": ["der Hund ."]}, {"text": ["das Haus ."], "attention": True}]
    requests.append({"text": ["der Mann ."]})
    responses = queued_then_answered(served, requests)
    assert served.batcher.stats.most_requests == 3  # one batch held all three
    assert [r.status_code for r in responses] == [200, 500, 200]


def test_a_request_whose_decoding_fails_leaves_its_batch_answered(
    make_served: Callable[..., Served], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Translator.translate

    def fail_on_house(self: Translator, lines: list[str], **kwargs: object) -> object:
        if "das Haus ." in lines:
            raise RuntimeError("out of memory (injected)")
        return real(self, lines, **kwargs)

    monkeypatch.setattr(Translator, "translate", fail_on_house)
    served = make_served()
    requests = [{"text": ["der Hund ."]}, {"text": ["das Haus ."]}, {"text": ["der Mann ."]}]
    responses = queued_then_answered(served, requests)
    assert served.batcher.stats.most_requests == 3  # one batch held all three
    assert [r.status_code for r in responses] == [200, 500, 200]
    b = served.batcher
    alone = Translator(b.tokenizer, b.model, b.decode, b.device, b.precision)
    assert responses[0].json()["translations"][0]["text"] == real(alone, ["der Hund ."])[0][0].text


@pytest.mark.slow
def test_concurrent_requests_get_mt_translates_answers_whatever_shares_their_batch(
    make_served: Callable[..., Served], trained_run: Path
) -> None:
    """Requests of mixed settings, all queued before the worker starts, so batches mix them."""
    config, tokenizer, _, _ = load_trained(trained_run, CPU)
    served = make_served(max_tokens=256)  # a few sentences per batch: several rounds
    requests = [
        {"text": SENTENCES[i : i + 1 + i % 3], "beam": 1 + i % 3, "nbest": 1 + i % 3 // 2}
        for i in range(0, 30)
    ]
    responses = queued_then_answered(served, requests)
    stats = served.batcher.stats
    assert stats.most_requests > 1 and stats.rounds > 1  # batches mixed requests
    model = served.batcher.model  # packed as `mt translate` packs it: its products, its bits
    for request, response in zip(requests, responses, strict=True):
        decode = dataclasses.replace(config.decode, beam=request["beam"], nbest=request["nbest"])
        for line, got in zip(request["text"], response.json()["translations"], strict=True):
            alone = Translator(tokenizer, model, decode, CPU).translate([line], scores=True)[0]
            assert [h["text"] for h in got["nbest"]] == [h.text for h in alone]
            assert [h["score"] for h in got["nbest"]] == pytest.approx(
                [h.score for h in alone], abs=1e-5
            )


STEERED = [SENTENCES[0], "", SENTENCES[1], SENTENCES[2]]
PREFIXES = ["A man", "A", "", "The child sees"]
CONSTRAINTS = [["park", "ball"], [], ["house"], []]


def test_prefixes_and_constraints_equal_mt_translates(
    client: TestClient, trained_run: Path, tmp_path: Path
) -> None:
    prefix, constraints = tmp_path / "prefix.txt", tmp_path / "constraints.txt"
    prefix.write_text("".join(f"{p}\n" for p in PREFIXES), encoding="utf-8")
    constraints.write_text("".join("\t".join(c) + "\n" for c in CONSTRAINTS), encoding="utf-8")
    args = ("--prefix", str(prefix), "--constraints", str(constraints))
    expected = mt_translate(trained_run, STEERED, *args)
    body = {"text": STEERED, "prefix": PREFIXES, "constraints": CONSTRAINTS}
    got = [t["text"] for t in post(client, body).json()["translations"]]
    assert got == expected
    assert got[0].startswith("A man") and "park" in got[0] and "ball" in got[0]
    assert got[1] == "" and "house" in got[2] and got[3].startswith("The child sees")
    plain = [t["text"] for t in post(client, {"text": STEERED}).json()["translations"]]
    assert plain[0] != got[0] and plain[2] != got[2]  # the steering changed them
    one = post(client, {"text": STEERED[0], "prefix": PREFIXES[0], "constraints": CONSTRAINTS[:1]})
    assert one.json()["translations"][0]["text"] == got[0]
    met = [t.get("constraints_met") for t in post(client, body).json()["translations"]]
    assert met == [True, None, True, None]  # said of the sentences with constraints only


def test_unmet_constraints_are_said_and_a_missing_hypothesis_has_a_null_score(
    client: TestClient, trained_run: Path
) -> None:
    _, tokenizer, model, _ = load_trained(trained_run, CPU)
    room = model.max_positions - 2
    words = 1
    while len(tokenizer.encode_tgt([" ".join(["dog"] * (words + 1))])[0]) <= room:
        words += 1
    full = " ".join(["dog"] * words)  # as many pieces as an output may hold: nothing else fits
    steered = {"text": [SENTENCES[0]], "beam": 2, "nbest": 2}
    answer = post(client, {**steered, "constraints": [[full, "cat"]]}).json()["translations"][0]
    assert answer["constraints_met"] is False
    assert [h["constraints_met"] for h in answer["nbest"]] == [False, False]
    # A prefix that fills the output: one hypothesis only, the second is empty with score null.
    answer = post(client, {**steered, "prefix": [full]}).json()["translations"][0]
    assert answer["nbest"][1] == {"text": "", "score": None}
    assert answer["text"] == full and answer["score"] < 0 and "constraints_met" not in answer


def test_requests_steered_differently_share_batches_and_get_their_own_answers(
    make_served: Callable[..., Served], trained_run: Path
) -> None:
    """Plain, prefixed, constrained and both, queued before the worker starts: mixed batches."""
    config, tokenizer, _, _ = load_trained(trained_run, CPU)
    served = make_served()
    requests: list[dict] = []
    for i in range(8):
        request: dict = {"text": [SENTENCES[i], STEERED[i % 4]]}
        if i % 2:
            request["prefix"] = [PREFIXES[(i + 1) % 4], PREFIXES[i % 4]]
        if i % 4 >= 2:
            request["constraints"] = [CONSTRAINTS[(i + 1) % 4], CONSTRAINTS[i % 4]]
        requests.append(request)
    responses = queued_then_answered(served, requests)
    assert served.batcher.stats.most_requests > 2  # prefixed and plain ones shared a batch
    model = served.batcher.model  # packed as `mt translate` packs it: its products, its bits
    room = model.max_positions - 2
    for request, response in zip(requests, responses, strict=True):
        lines = request["text"]
        prefixes = request.get("prefix") and encode_prefixes(
            Path("p"), request["prefix"], tokenizer, room
        )
        wanted = request.get("constraints") and encode_constraints(
            Path("c"), ["\t".join(c) for c in request["constraints"]], tokenizer, room
        )
        alone = Translator(tokenizer, model, config.decode, CPU).translate(
            lines, scores=True, prefixes=prefixes, constraints=wanted
        )
        got = response.json()["translations"]
        assert [t["text"] for t in got] == [h[0].text for h in alone]
        assert [t["score"] for t in got] == pytest.approx([h[0].score for h in alone], abs=1e-5)


def test_health_says_draining_once_the_server_stops(make_served: Callable[..., Served]) -> None:
    served = make_served()
    with TestClient(create_app(served)) as client:
        assert client.get("/health").status_code == 200
        served.batcher.drain()  # as SIGTERM does: a load balancer should stop sending
        response = client.get("/health")
        assert (response.status_code, response.json()["status"]) == (503, "draining")


def test_a_full_queue_answers_503_with_retry_after(make_served: Callable[..., Served]) -> None:
    served = make_served(max_queue=3, max_sentences=2)

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=create_app(served))
        async with httpx.AsyncClient(transport=transport, base_url="http://mt") as client:
            waiting = asyncio.ensure_future(client.post("/v1/translate", json={"text": ["a", "b"]}))
            assert await asyncio.to_thread(
                served.batcher.wait_until, lambda s: s.queued == 2, TIMEOUT_S
            )
            full = await client.post("/v1/translate", json={"text": ["c", "d"]})
            assert full.status_code == 503 and full.headers["retry-after"] == "1"
            assert full.json() == {"error": "queue: full (2 sentences waiting); retry later"}
            fits = asyncio.ensure_future(client.post("/v1/translate", json={"text": "e"}))
            assert await asyncio.to_thread(
                served.batcher.wait_until, lambda s: s.queued == 3, TIMEOUT_S
            )
            served.batcher.start()
            assert [(await r).status_code for r in (waiting, fits)] == [200, 200]

    asyncio.run(scenario())


def test_the_worker_stops_gathering_once_the_last_batchs_load_is_back(
    make_served: Callable[..., Served],
) -> None:
    # Without a batch behind it the worker gathers for batch_wait_ms (here: until the first
    # request's tokens fill a batch); after one, as soon as as many sentences wait as were in
    # the server when it ended: closed-loop clients come back together and share one batch.
    served = make_served(batch_wait_ms=600_000, max_tokens=20)
    long = ["der Hund läuft durch das hohe Gras .", "das Kind spielt mit dem Ball ."]
    short = {"text": ["Hund", "Kind"]}  # 2 sentences, the last batch's load
    tokens = [
        sum(len(s) + 1 for s in served.tokenizer.encode_src(x)) for x in (long, short["text"])
    ]
    assert tokens[0] >= 20 > tokens[1]

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=create_app(served))
        async with httpx.AsyncClient(transport=transport, base_url="http://mt") as client:
            served.batcher.start()
            first = await asyncio.wait_for(
                client.post("/v1/translate", json={"text": long}), TIMEOUT_S
            )
            assert first.status_code == 200
            # Answers go out before the worker counts the round: wait for the count.
            assert await asyncio.to_thread(
                served.batcher.wait_until, lambda s: s.rounds == 1, TIMEOUT_S
            )
            second = await asyncio.wait_for(client.post("/v1/translate", json=short), TIMEOUT_S)
            assert second.status_code == 200
            assert await asyncio.to_thread(
                served.batcher.wait_until, lambda s: s.rounds == 2, TIMEOUT_S
            )

    asyncio.run(scenario())


def test_a_request_whose_client_left_is_dropped_from_the_queue(
    make_served: Callable[..., Served],
) -> None:
    served = make_served(batch_wait_ms=600_000)  # the worker gathers until it is told to stop
    body = json.dumps({"text": ["der Hund .", "das Kind ."]}).encode()
    head = "POST /v1/translate HTTP/1.1\r\nHost: mt\r\nContent-Type: application/json\r\n"
    with serving(served) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as client:
            client.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            assert served.batcher.wait_until(lambda s: s.queued == 2, TIMEOUT_S)
        assert served.batcher.wait_until(lambda s: s.dropped == 1 and s.queued == 0, TIMEOUT_S)
    assert served.batcher.stats.sentences == 0  # never translated


# --- the command -----------------------------------------------------------------------------


class Lines:
    """The lines a process writes to a pipe, read on a thread, to wait on one by pattern."""

    def __init__(self, stream: object) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.lines.put(line)
        self.lines.put("")  # end of stream

    def wait_for(self, pattern: str) -> re.Match[str]:
        """The first match of pattern in the coming lines; fails at the end of the stream."""
        while line := self.lines.get(timeout=TIMEOUT_S):
            self.seen.append(line)
            if match := re.search(pattern, line):
                return match
        raise AssertionError(f"no line matched {pattern!r} in:\n{''.join(self.seen)}")


@pytest.mark.slow
def test_serve_command_answers_in_flight_work_on_sigterm_and_exits_0(trained_run: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "mt", "serve", str(trained_run), "--port", "0",
            "--device", "cpu", "--precision", "fp32", "--batch-wait-ms", "600000",
            "--log-level", "debug"]  # fmt: skip
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        log = Lines(proc.stderr)
        url = log.wait_for(r"listening on (http://127\.0\.0\.1:\d+)").group(1)  # loopback only
        assert httpx.get(f"{url}/health", timeout=TIMEOUT_S).json()["status"] == "ok"
        answers: list[httpx.Response] = []
        body = {"text": [SENTENCES[0], SENTENCES[1]]}
        request = threading.Thread(
            target=lambda: answers.append(
                httpx.post(f"{url}/v1/translate", json=body, timeout=TIMEOUT_S)
            )
        )
        request.start()
        log.wait_for(r"queued 2 sentences")  # it waits to gather more, for ten minutes
        proc.send_signal(signal.SIGTERM)
        request.join(TIMEOUT_S)
        assert proc.wait(TIMEOUT_S) == 0
    finally:
        proc.kill()
        proc.wait()
    assert answers[0].status_code == 200
    texts = [t["text"] for t in answers[0].json()["translations"]]
    assert texts == mt_translate(trained_run, body["text"])


@pytest.fixture
def listening(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Set once an in-process `serve()` listens (its Server's startup has run)."""
    event = threading.Event()
    startup = server_module.Server.startup

    async def announced(self: server_module.Server, sockets: list | None = None) -> None:
        await startup(self, sockets)
        event.set()

    monkeypatch.setattr(server_module.Server, "startup", announced)
    return event


def test_a_request_never_sent_whole_does_not_hold_sigterm(
    trained_run: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    listening: threading.Event,
) -> None:
    monkeypatch.setattr(server_module, "ANSWER_GRACE_S", 0.5)
    port = free_port()
    stalled = socket.socket()

    def client() -> None:  # 4 of the 100 bytes it announces, and no more; then SIGTERM
        if not listening.wait(TIMEOUT_S):
            return  # serve() failed: the assertions below say so
        stalled.connect(("127.0.0.1", port))
        stalled.sendall(
            b"POST /v1/translate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"te'
        )
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=TIMEOUT_S)  # the upload is taken
        os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=client, daemon=True)
    sender.start()
    with stalled, caplog.at_level(logging.WARNING, logger="mt"):
        serve(trained_run, port=port, device="cpu", precision="fp32")  # returns: not held
    sender.join(TIMEOUT_S)
    assert caplog.messages == [
        "mt serve: a client still holds a connection 0.5 s after the last answer (a request "
        "never sent whole?); closing it"
    ]
    err = capfd.readouterr().err  # uvicorn's own log: the request ended as a disconnect
    assert "Traceback" not in err and "CancelledError" not in err
    # No answer 500 in the access log ('"POST ..." 500'); the log also holds the process id.
    assert '" 500' not in err and "Internal Server Error" not in err


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGUSR1], ids=["TERM", "USR1"])
def test_serve_decodes_on_the_main_thread_and_a_stop_signal_returns_cleanly(
    trained_run: Path,
    monkeypatch: pytest.MonkeyPatch,
    listening: threading.Event,
    stop: signal.Signals,
) -> None:
    threads: list[threading.Thread] = []
    real = Translator.translate

    def recording(self: Translator, *args: object, **kwargs: object) -> object:
        threads.append(threading.current_thread())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Translator, "translate", recording)
    url, answers = f"http://127.0.0.1:{free_port()}", []

    def client() -> None:  # once the server listens: one request, then `stop` to this process
        if not listening.wait(TIMEOUT_S):
            return  # serve() failed: the assertions below say so
        body = {"text": SENTENCES[:3]}
        answers.append(httpx.post(f"{url}/v1/translate", json=body, timeout=TIMEOUT_S))
        os.kill(os.getpid(), stop)

    before = [signal.getsignal(sig) for sig in server_module.EXIT_SIGNALS]
    sender = threading.Thread(target=client, daemon=True)
    sender.start()
    serve(trained_run, port=int(url.rsplit(":", 1)[1]), device="cpu", precision="fp32")
    sender.join(TIMEOUT_S)
    assert threads and all(t is threading.main_thread() for t in threads)
    texts = [t["text"] for t in answers[0].json()["translations"]]
    assert texts == mt_translate(trained_run, SENTENCES[:3])
    assert [signal.getsignal(sig) for sig in server_module.EXIT_SIGNALS] == before


def test_a_second_ctrl_c_changes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    import uvicorn

    drained: list[bool] = []
    server = server_module.Server(uvicorn.Config(create_app), lambda: drained.append(True))
    with caplog.at_level(logging.INFO, logger="mt"):
        for _ in range(3):
            server.handle_exit(signal.SIGINT, None)
    # uvicorn's force-exit would cancel requests the worker decodes anyway: their clients got
    # bare 500s, and the process stopped no sooner.
    assert (server.should_exit, server.force_exit, drained) == (True, False, [True])
    assert (
        caplog.messages
        == ["mt serve: already stopping; answering what is queued (SIGKILL stops now)"] * 2
    )


def test_serve_on_a_taken_port_is_a_one_line_error(trained_run: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MtError) as error:
            serve(trained_run, port=port, device="cpu", precision="fp32", log_level="critical")
    assert str(error.value) == f"the server did not start on 127.0.0.1:{port} (see the log)"


def test_serve_command_errors_are_one_line(trained_run: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli_app, ["serve", str(tmp_path / "none"), "--port", "0"])
    assert isinstance(result.exception, MtError)
    args = ["serve", str(trained_run), "--max-sentences", "100", "--max-queue", "10"]
    result = runner.invoke(cli_app, args)
    assert str(result.exception) == (
        "--max-sentences 100 exceeds --max-queue 10: such a request could never be queued"
    )
    result = runner.invoke(cli_app, ["serve", str(trained_run), "--beam", "20"])
    assert str(result.exception) == "--beam 20 exceeds --max-beam 16"
    result = runner.invoke(cli_app, ["serve", str(trained_run), "--max-beam", "1"])
    assert str(result.exception) == "the run's decode.beam=2 exceeds --max-beam 1"
    # 20 samples per sentence: every request would be refused
    run = run_with(trained_run, tmp_path / "sampling", ["decode.sampling=true", "decode.nbest=20"])
    result = runner.invoke(cli_app, ["serve", str(run)])
    assert str(result.exception) == "the run's decode.nbest=20 exceeds --max-beam 16"


def test_missing_serve_extra_gives_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fastapi", None)  # `import fastapi` now fails
    with pytest.raises(MtError, match=r"^mt serve needs fastapi: pip install 'mt\[serve\]'$"):
        serve_package.check_installed()


def test_limits_are_checked() -> None:
    with pytest.raises(MtError, match=r"^--max-queue 0: must be >= 1$"):
        Limits(max_queue=0)
    for wait in (-1, math.inf, 3_600_001, math.nan):
        with pytest.raises(MtError) as err:
            Limits(batch_wait_ms=wait)
        assert str(err.value) == f"--batch-wait-ms {wait}: must be in [0, 3,600,000]"
    assert Limits(batch_wait_ms=3_600_000).batch_wait_ms == 3_600_000


# --- the load generator ----------------------------------------------------------------------


@pytest.mark.slow
def test_load_generator_smoke_run(trained_run: Path, tmp_path: Path) -> None:
    # int8 both offline and in the server: it decodes in fp32 whatever the CPU (mt.quantize).
    # 8 of the test set's 40 sentences: the offline rates, most of the time, decode a fifth as
    # much (the default, the run's test set, is test_load_generator_reads_the_runs_test_set's).
    src = tmp_path / "src.de"
    src.write_text("".join(load_generator_sentences(trained_run)[:8]), encoding="utf-8")
    args = [sys.executable, str(ROOT / "scripts" / "bench_serve.py"), str(trained_run), "--smoke",
            "--quantize", "int8", "--src", str(src)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert " | cpu fp32, quantize int8 | offline (mt translate) " in out.stdout.splitlines()[0]
    rows = [line.split("|") for line in out.stdout.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [int(row[1]) for row in rows] == [1, 4]  # the smoke run's client counts
    for row in rows:
        requests, errors = int(row[2]), int(row[3])
        assert requests > 0 and errors == 0
        p50, p95, p99 = (float(row[i]) for i in (5, 6, 7))
        assert 0 < p50 <= p95 <= p99
        rate, offline_batches, share = float(row[4]), float(row[10]), row[11].strip()
        assert offline_batches > 0 and share.endswith("%")
        # The share of the unrounded rates, which the table prints rounded to 0.1.
        low = (rate - 0.05) / (offline_batches + 0.05)
        high = (rate + 0.05) / (offline_batches - 0.05)
        assert 100 * low - 0.5 <= int(share[:-1]) <= 100 * high + 0.5
        assert len(row) == 15 and float(row[12]) > 0 and re.fullmatch(r"\d+%", row[13].strip())
    assert re.search(r"server RSS: \d+ MiB before, \d+ MiB after \d+ requests", out.stdout)
    assert "| 8 sentences |" in out.stdout.splitlines()[0]


def load_generator_sentences(run: Path) -> list[str]:
    """The lines of the run's test set's source file (the tiny dev set), newlines kept."""
    config = load_config(run / CONFIG_FILE)
    return (
        Path(f"{config.data.test}.{config.data.src_lang}")
        .read_text(encoding="utf-8")
        .splitlines(keepends=True)
    )


def test_load_generator_reads_the_runs_test_set(trained_run: Path, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "bench_serve", ROOT / "scripts" / "bench_serve.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    lines = [line.rstrip("\n") for line in load_generator_sentences(trained_run)]
    assert len(lines) == 40 and bench.sentences(trained_run, None) == lines
    # --src instead: its non-blank lines, plain or gzipped.
    src = tmp_path / "src.de.gz"
    src.write_bytes(gzip.compress(b"eins\n\n  \nzwei\n"))
    assert bench.sentences(trained_run, src) == ["eins", "zwei"]


def test_readme_limits_table_shows_the_defaults() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = dict(re.findall(r"^  \| `--([a-z-]+)` \| ([^|]+) \|", readme, flags=re.M))
    defaults = {
        name.replace("_", "-"): value for name, value in dataclasses.asdict(Limits()).items()
    }
    assert (
        table.pop("max-tokens") == "the run's `decode.max_tokens`"
        and defaults.pop("max-tokens") is None
    )
    assert {name: float(value) for name, value in table.items()} == defaults
