"""`mt score`: a pair's score is its search score; batching, ensembles, blank and long lines;
per-piece scores and the summary (training's dev nll)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mt.cli import app
from mt.errors import MtError
from mt.rundir import load_trained
from mt.score import Scored, Summary, score_pairs
from mt.search import Ensemble
from mt.translate import Translator

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
VALID = (ROOT / "tests/data/tiny/valid.de").read_text(encoding="utf-8").splitlines()[:12]


@pytest.fixture(scope="module")
def translator(trained_run: Path) -> Translator:
    """The trained tiny run's model, beam 3 with its 3 best, fp32 on the CPU."""
    config, tokenizer, model, _ = load_trained(trained_run, CPU)
    return Translator(tokenizer, model, dataclasses.replace(config.decode, beam=3, nbest=3), CPU)


def scores(translator: Translator, sources: list[str], targets: list[str], **options) -> list:
    """score_pairs' scores in input order."""
    out: list = [0.0] * len(sources)
    for indices, found, _, _ in score_pairs(translator, sources, targets, **options):
        for i, score in zip(indices, found, strict=True):
            out[i] = score
    return out


@pytest.mark.parametrize("penalty", ["gnmt", "none"])
def test_a_search_output_scores_what_the_search_scored_it(
    translator: Translator, penalty: str
) -> None:
    translator = dataclasses.replace(
        translator, decode=dataclasses.replace(translator.decode, length_penalty=penalty)
    )
    hyps = translator.translate(VALID, scores=True)
    pairs = [(src, h) for src, line in zip(VALID, hyps, strict=True) for h in line if h.found]
    # A search may end in pieces that are not its text's own segmentation: only those that are.
    tokenizer = translator.tokenizer
    pairs = [(s, h) for s, h in pairs if tokenizer.encode_tgt([h.text])[0] == h.tokens]
    assert len(pairs) >= 30
    got = scores(translator, [s for s, _ in pairs], [h.text for _, h in pairs])
    assert got == pytest.approx([h.score for _, h in pairs], abs=1e-4)


def test_scores_are_log_probabilities_and_do_not_depend_on_batching(
    translator: Translator,
) -> None:
    targets = [*VALID[1:], VALID[0]]  # the wrong translations: low scores, but scores
    plain = dataclasses.replace(translator.decode, length_penalty="none", max_tokens=100_000)
    one_batch = scores(dataclasses.replace(translator, decode=plain), VALID, targets)
    assert all(-math.inf < s < 0 for s in one_batch)
    one_each = dataclasses.replace(plain, max_tokens=1)
    alone = scores(dataclasses.replace(translator, decode=one_each), VALID, targets)
    assert alone == pytest.approx(one_batch, rel=1e-5)
    average = dataclasses.replace(plain, length_penalty="average")
    means = scores(dataclasses.replace(translator, decode=average), VALID, targets)
    pieces = [len(p) + 1 for p in translator.tokenizer.encode_tgt(targets)]  # EOS included
    assert means == pytest.approx([s / n for s, n in zip(one_batch, pieces, strict=True)])


def test_an_ensemble_scores_what_its_search_scored(
    translator: Translator, trained_run: Path
) -> None:
    earlier = load_trained(trained_run / "checkpoints" / "step-00000200", CPU)[2]
    ensemble = Ensemble([translator.model, earlier], [0.3, 0.7])
    joint = dataclasses.replace(translator, model=ensemble)
    hyps = [h for line in joint.translate(VALID[:6], scores=True) for h in line]
    sources = [src for src in VALID[:6] for _ in range(3)]  # nbest 3
    pairs = [(s, h) for s, h in zip(sources, hyps, strict=True) if h.found]
    tokenizer = translator.tokenizer
    pairs = [(s, h) for s, h in pairs if tokenizer.encode_tgt([h.text])[0] == h.tokens]
    got = scores(joint, [s for s, _ in pairs], [h.text for _, h in pairs])
    assert len(pairs) >= 12 and got == pytest.approx([h.score for _, h in pairs], abs=1e-4)
    alone = scores(translator, [s for s, _ in pairs], [h.text for _, h in pairs])
    assert alone != pytest.approx(got, abs=1e-3)  # the second model counts


def test_inputs_go_in_chunks_with_their_own_line_numbers(
    translator: Translator, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    long = " ".join(["haus"] * 300)
    sources, targets = [*VALID[:5], long, "", *VALID[5:9]], [*VALID[:5], "x", "y", *VALID[5:9]]
    whole = scores(translator, sources, targets)
    monkeypatch.setattr("mt.score.CHUNK_PAIRS", 3)
    with caplog.at_level(logging.WARNING, logger="mt"):
        chunked = scores(translator, sources, targets)
    assert chunked[6] is None and math.isnan(chunked[5])
    ok = [i for i in range(len(sources)) if i not in (5, 6)]
    assert [chunked[i] for i in ok] == pytest.approx([whole[i] for i in ok], rel=1e-5)
    assert [m.split(":")[0] for m in caplog.messages] == ["line 6", "line 6"]  # whole, chunked


def test_piece_scores_sum_to_the_score_and_the_summary_is_the_dev_nll_training_logged(
    trained_run: Path, tmp_path: Path
) -> None:
    src, tgt = (ROOT / f"tests/data/tiny/valid.{lang}" for lang in ("de", "en"))
    step = trained_run / "checkpoints" / "step-00000300.safetensors"
    args = ["score", str(src), str(tgt), "-m", str(step), "--precision", "fp32"]
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [*args, "--piece-scores", "--length-penalty", "none"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    pieces = [line.split("\t")[1].split(" ") for line in lines]
    assert len(lines) == 40 and [len(p) for p in pieces] == [
        len(ids) + 1
        for ids in load_trained(trained_run, CPU)[1].encode_tgt(tgt.read_text().splitlines())
    ]
    for line, row in zip(lines, pieces, strict=True):
        assert float(line.split("\t")[0]) == pytest.approx(sum(map(float, row)), abs=1e-3)
    result = CliRunner().invoke(app, [*args, "--summary", "-o", str(out)])
    assert result.exit_code == 0, result.output
    summary = out.read_text(encoding="utf-8")
    found = re.fullmatch(
        r"cross-entropy (\S+) nats per piece, perplexity (\S+), over ([\d,]+) target pieces "
        r"\(EOS included\) of 40 pairs\n",
        summary,
    )
    assert found, summary
    logged = [json.loads(line) for line in (trained_run / "metrics.jsonl").open()]
    dev = next(r for r in logged if r["kind"] == "valid" and r.get("step") == 300)
    assert float(found[1]) == pytest.approx(dev["nll"], abs=1e-4)
    assert float(found[2]) == pytest.approx(dev["ppl"], rel=1e-3)
    assert int(found[3].replace(",", "")) == sum(len(p) for p in pieces)
    result = CliRunner().invoke(app, [*args, "--summary", "--piece-scores"])
    assert (
        str(result.exception) == "--piece-scores and --summary: give one (the summary has no lines)"
    )
    result = CliRunner().invoke(app, [*args, "--summary", "--alpha", "2"])
    assert str(result.exception) == "--alpha and --summary: the summary is per piece"


def test_a_diverged_model_writes_every_score_then_fails(diverged_run: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_text(f"{VALID[0]}\n\n", encoding="utf-8")
    out = tmp_path / "scores"
    args = ["score", str(src), str(src), "-m", str(diverged_run), "-o", str(out)]
    result = CliRunner().invoke(app, [*args, "--precision", "fp32"])
    assert str(result.exception).endswith(
        ": the model's scores are not finite (diverged weights?): no score for 1 of 2 lines"
    )
    assert out.read_text(encoding="utf-8") == "nan\n\n"


def test_blank_sources_blank_lines_and_too_long_pairs_nan(
    trained_run: Path, tmp_path: Path
) -> None:
    long = " ".join(["haus"] * 300)  # over the tiny model's 128 positions
    src, tgt = tmp_path / "src", tmp_path / "tgt"
    src.write_text(f"{VALID[0]}\n\n{VALID[1]}\n{long}\n", encoding="utf-8")
    tgt.write_text(f"{VALID[0]}\nDer hund .\n{long}\n\n", encoding="utf-8")
    out = tmp_path / "scores"
    args = ["score", str(src), str(tgt), "-m", str(trained_run), "--precision", "fp32"]
    result = CliRunner().invoke(app, [*args, "-o", str(out)])
    assert result.exit_code == 0, result.output
    lines = out.read_text(encoding="utf-8").split("\n")
    assert lines[1:] == ["", "nan", "nan", ""]  # blank source; too long target; too long source
    assert -math.inf < float(lines[0]) < 0
    result = CliRunner().invoke(app, [*args, "-o", str(out), "--piece-scores"])
    assert out.read_text(encoding="utf-8").split("\n")[1:] == ["", "nan", "nan", ""]
    result = CliRunner().invoke(app, [*args, "--summary"])
    assert result.stdout.endswith(" of 1 pairs; 3 not scored (blank source or too long)\n")
    src.write_text("\n\n", encoding="utf-8")
    tgt.write_text("a\nb\n", encoding="utf-8")
    result = CliRunner().invoke(app, [*args, "--summary"])
    assert str(result.exception) == (
        f"{src}: no pair to score (every source line is blank or too long)"
    )
    piped = CliRunner().invoke(app, ["score", "-", *args[2:], "--summary"], input="\n\n")
    assert (
        str(piped.exception) == "stdin: no pair to score (every source line is blank or too long)"
    )


def test_bad_inputs_are_one_line_errors(
    trained_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src, tgt = tmp_path / "src", tmp_path / "tgt"
    src.write_text("Der hund .\nDie katze .\n", encoding="utf-8")
    tgt.write_text("The dog .\n", encoding="utf-8")
    args = ["score", "-m", str(trained_run)]
    result = CliRunner().invoke(app, [*args, str(src), str(tgt)])
    assert isinstance(result.exception, MtError)
    assert str(result.exception) == f"{tgt}: 1 lines, but {src} has 2"
    result = CliRunner().invoke(app, [*args, "-", "-"], input="Der hund .\n")
    assert str(result.exception) == "SRC and TGT both read standard input (-): give one a file"
    result = CliRunner().invoke(app, [*args, str(src), str(src), "--length-penalty", "log"])
    assert str(result.exception) == (
        "command line: decode.length_penalty must be one of gnmt, average, none, got 'log'"
    )
    with caplog.at_level(logging.WARNING, logger="mt"):
        tgt.write_text("x\n" + " ".join(["the"] * 200) + "\n", encoding="utf-8")
        result = CliRunner().invoke(app, [*args, str(src), str(tgt)])
    assert result.exit_code == 0, result.output
    warning = r"line 2: \d+ source and 200 target pieces, more than the model's 127: score nan"
    said = [m for m in caplog.messages if re.fullmatch(warning, m)]
    assert len(said) == 1 and said == caplog.messages[-1:]


def test_a_summary_of_a_diverging_model_caps_its_perplexity_as_training_does() -> None:
    summary = Summary()
    summary.add(Scored([0], [-2000.0], [[-1000.0, -1000.0]], True))  # 1,000 nats per piece
    assert summary.line() == (
        f"cross-entropy 1000.0000 nats per piece, perplexity {math.exp(100):.4f}, over 2 target "
        "pieces (EOS included) of 1 pairs"
    )
