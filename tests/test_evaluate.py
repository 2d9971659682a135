"""`mt evaluate`: sacrebleu parity, JSON output, errors, the run's test set, ensembles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock
from urllib.error import URLError

import pytest
from helpers.entry import run_main
from helpers.runs import run_with
from sacrebleu.metrics import BLEU
from typer.testing import CliRunner

from mt import bleu as mt_bleu
from mt import checkpoint as ckpt
from mt import evaluate as mt_evaluate
from mt.bleu import bleu_tokenizer
from mt.cli import app
from mt.errors import MtError
from mt.evaluate import evaluate
from mt.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SACREBLEU = Path(sys.executable).parent / "sacrebleu"

REFS = [
    "The cat sat on the mat.",
    "Hello, world! How are you today?",
    "Ein Haus am See — mit Blick auf die Berge.",
    "Numbers like 3.14 and 1,000 stay intact.",
    "",
    "Short one",
]
HYPS = [
    "The cat sat on a mat .",
    "hello world, how are you today ?",
    "Ein Haus am see mit Blick auf Berge.",
    "Numbers such as 3.14 and 1,000 stay.",
    "not empty",
    "Short one",
]


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    """A crafted hypothesis file and its reference file."""
    hyp, ref = tmp_path / "hyp.txt", tmp_path / "ref.txt"
    hyp.write_text("\n".join(HYPS) + "\n", encoding="utf-8")
    ref.write_text("\n".join(REFS) + "\n", encoding="utf-8")
    return hyp, ref


def sacrebleu_cli(hyp: Path, ref: Path, *extra: str) -> dict[str, dict]:
    """The sacrebleu tool's JSON scores (4 decimals), by lower-case metric key."""
    args = [str(SACREBLEU), str(ref), "-i", str(hyp), "--format", "json", "-w", "4", *extra]
    out = subprocess.run(args, capture_output=True, check=True, text=True).stdout
    found = json.loads(out)
    found = found if isinstance(found, list) else [found]
    return {item["name"].lower().rstrip("2"): item for item in found}


def test_scores_equal_the_sacrebleu_tool(files: tuple[Path, Path]) -> None:
    hyp, ref = files
    ours = evaluate(hyp, ref)
    theirs = sacrebleu_cli(hyp, ref, "-m", "bleu", "chrf", "ter")
    assert set(ours) == set(theirs) == {"bleu", "chrf", "ter"}
    for key, score in ours.items():
        assert round(score.score, 4) == theirs[key]["score"], key
        assert score.signature == theirs[key]["signature"], key
    lower = evaluate(hyp, ref, lowercase=True)["bleu"]
    theirs_lower = sacrebleu_cli(hyp, ref, "-m", "bleu", "-lc")["bleu"]
    assert round(lower.score, 4) == theirs_lower["score"]
    assert lower.signature == theirs_lower["signature"]
    assert "case:lc" in lower.signature and lower.score > ours["bleu"].score


def test_chinese_is_scored_as_sacrebleu_scores_it_given_the_language(tmp_path: Path) -> None:
    hyp, ref = tmp_path / "hyp.zh", tmp_path / "ref.zh"
    hyp.write_text("一个男人在街上骑自行车。\n两只狗在草地上玩。\n", encoding="utf-8")
    ref.write_text("一个男人在路上骑自行车。\n两只狗在草地上跑。\n", encoding="utf-8")
    ours = evaluate(hyp, ref, tokenize="zh")["bleu"]
    theirs = sacrebleu_cli(hyp, ref, "-m", "bleu", "-l", "en-zh")["bleu"]
    assert round(ours.score, 4) == theirs["score"] and ours.signature == theirs["signature"]
    assert evaluate(hyp, ref)["bleu"].score == 0.0  # 13a: each line one word, none alike
    assert [bleu_tokenizer(lang) for lang in ("zh", "zh-Hans", "ZH_tw", "en", None)] == [
        "zh", "zh", "zh", "13a", "13a"
    ]  # fmt: skip
    with pytest.raises(MtError) as error:
        evaluate(hyp, ref, tokenize="words")
    assert str(error.value).startswith("--tokenize words: sacreBLEU's tokenizers are none, zh, 13a")


def test_a_table_of_directions_names_each_signature_that_is_not_shared() -> None:
    de = mt_evaluate.score(["Ein Hund läuft."], ["Ein Hund rennt."], tokenize="13a")
    zh = mt_evaluate.score(["两只狗在草地上玩。"], ["两只狗在草地上跑。"], tokenize="zh")
    table = mt_evaluate.format_table({"en-de": de, "en-zh": zh}).splitlines()
    assert table[3:] == [
        f"BLEU (en-de): {de['bleu'].signature}",
        f"BLEU (en-zh): {zh['bleu'].signature}",
        f"chrF2: {de['chrf'].signature}",
        f"TER: {de['ter'].signature}",
    ]
    assert "tok:13a" in table[3] and "tok:zh" in table[4]
    assert zh["chrf"].signature == de["chrf"].signature  # shared: one line, no direction
    same = mt_evaluate.format_table({"en-de": de, "de-de": de}).splitlines()
    assert same[3] == f"BLEU: {de['bleu'].signature}"


def test_without_mecab_japanese_is_scored_by_character_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class NoMecab(BLEU):
        def __init__(self, tokenize: str | None = None, **options: object) -> None:
            if tokenize is not None and tokenize.endswith("mecab"):
                raise RuntimeError("Japanese tokenization requires\n extra dependencies")
            super().__init__(tokenize=tokenize, **options)

    monkeypatch.setattr("mt.bleu.BLEU", NoMecab)
    monkeypatch.setattr("mt.evaluate.BLEU", NoMecab)
    mt_bleu.available.cache_clear()
    try:
        assert bleu_tokenizer("ja") == bleu_tokenizer("ja") == "char"
        assert caplog.messages == [
            'warning: BLEU\'s ja-mecab tokenizer needs MeCab (pip install "sacrebleu[ja]"): '
            "scoring with char instead (see the signature)"
        ]
        with pytest.raises(MtError) as error:
            mt_evaluate.check_tokenize("ko-mecab")
        assert (
            str(error.value)
            == "--tokenize ko-mecab: Japanese tokenization requires extra dependencies"
        )
    finally:
        mt_bleu.available.cache_clear()


def test_a_tokenizer_sacrebleu_cannot_download_names_the_option(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Offline(BLEU):
        def __init__(self, tokenize: str | None = None, **options: object) -> None:
            if tokenize == "flores200":  # its SentencePiece model comes from the web, once
                raise URLError("[Errno -2] Name or service not known")
            super().__init__(tokenize=tokenize, **options)

    monkeypatch.setattr("mt.bleu.BLEU", Offline)
    mt_bleu.missing_extra.cache_clear()
    try:
        with pytest.raises(MtError) as error:
            mt_evaluate.check_tokenize("flores200")
        assert str(error.value) == (
            "--tokenize flores200: sacreBLEU could not fetch what it needs (<urlopen error "
            "[Errno -2] Name or service not known>)"
        )
    finally:
        mt_bleu.missing_extra.cache_clear()


def test_text_output_prints_each_score_with_its_signature(files: tuple[Path, Path]) -> None:
    hyp, ref = files
    result = CliRunner().invoke(app, ["evaluate", "--hyp", str(hyp), "--ref", str(ref)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split(" = ")[0] for line in lines] == ["BLEU", "chrF2", "TER"]
    theirs = sacrebleu_cli(hyp, ref, "-m", "bleu", "chrf", "ter")
    for line, key in zip(lines, ("bleu", "chrf", "ter"), strict=True):
        printed = float(line.split(" = ")[1].split()[0])
        assert printed == round(theirs[key]["score"], 2)
        assert line.endswith(" | " + theirs[key]["signature"])


def test_json_output(files: tuple[Path, Path]) -> None:
    hyp, ref = files
    args = ["evaluate", "--hyp", str(hyp), "--ref", str(ref), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    tree = json.loads(result.stdout)
    assert set(tree) == {"bleu", "chrf", "ter"}
    assert tree["bleu"]["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    assert tree["ter"]["score"] == evaluate(hyp, ref)["ter"].score


def test_line_count_mismatch_is_a_one_line_error(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    (tmp_path / "hyp.txt").write_text("a\n" * 10, encoding="utf-8")
    (tmp_path / "ref.txt").write_text("a\n" * 11, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    args = ["evaluate", "--hyp", "hyp.txt", "--ref", "ref.txt"]
    assert run_main(monkeypatch, capsys, caplog, *args) == (
        1,
        "",
        "error: hyp.txt has 10 lines but ref.txt has 11\n",
    )
    piped = CliRunner().invoke(app, ["evaluate", "--hyp", "-", "--ref", "ref.txt"], input="a\n")
    assert str(piped.exception) == "stdin has 1 lines but ref.txt has 11"


def test_empty_files_are_a_one_line_error(tmp_path: Path) -> None:
    hyp, ref = tmp_path / "hyp.txt", tmp_path / "ref.txt"
    hyp.write_text("", encoding="utf-8")
    ref.write_text("", encoding="utf-8")
    with pytest.raises(MtError) as err:
        evaluate(hyp, ref)
    assert str(err.value) == f"{hyp} and {ref} have no lines to score"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hyp": "h"}, "give --hyp and --ref"),
        ({"src": "s", "ref": "r", "hyp": "h"}, "--src needs --model"),
        ({"model": "m", "hyp": "h"}, "not both"),
        ({"model": "m", "src": "s"}, "needs both --src and --ref"),
        ({"hyp": "-", "ref": "-"}, "^--hyp and --ref both read standard input"),
        ({"hyp": "h", "ref": "r", "tgt_lang": "fr"}, r"^--tgt-lang needs --model \(to"),
        ({"model": "m", "src": "-", "ref": "-"}, "^--ref and --src both read standard input"),
    ],
)
def test_inconsistent_options(kwargs: dict, message: str) -> None:
    with pytest.raises(MtError, match=message):
        evaluate(**{key: Path(value) for key, value in kwargs.items()})


def test_model_options_are_refused_when_scoring_a_file() -> None:
    for option, message in [
        ({"weights": [1.0]}, "--weights"),
        ({"quantization": "int8"}, "--quantize"),
        ({"device": "cpu"}, "--device"),
        ({"precision": "fp32"}, "--precision"),
    ]:
        with pytest.raises(MtError) as err:
            evaluate(hyp=Path("h"), ref=Path("r"), **option)
        assert str(err.value) == f"{message} needs --model (to translate)"


def test_model_without_files_scores_the_test_set(trained_run: Path, tmp_path: Path) -> None:
    # The tiny config's test set is its dev set, and validation decodes greedily in the run's
    # fp32 (`auto` would pick bf16 on a CPU with AMX): same BLEU.
    best = ckpt.best_checkpoint(trained_run)
    assert best is not None
    valid = {r["step"]: r["bleu"] for r in read_metrics(trained_run, "valid")}
    result = CliRunner().invoke(
        app,
        ["evaluate", "--model", str(trained_run), "--beam", "1", "--precision", "fp32", "--json"],
    )
    assert result.exit_code == 0, result.output
    tree = json.loads(result.stdout)
    assert tree["bleu"]["score"] == pytest.approx(valid[best.step], abs=1e-9)

    # The same through --src/--ref.
    src, ref = ROOT / "tests/data/tiny/valid.de", ROOT / "tests/data/tiny/valid.en"
    scores = evaluate(src=src, ref=ref, model=trained_run, precision="fp32", beam=1)
    assert scores["bleu"].score == pytest.approx(valid[best.step], abs=1e-9)


def test_decoding_options_the_run_refuses_fail_before_the_model_loads(
    trained_run: Path, tmp_path: Path
) -> None:
    run = run_with(trained_run, tmp_path / "run", ["decode.length_penalty=average"])
    src, ref = ROOT / "tests/data/tiny/valid.de", ROOT / "tests/data/tiny/valid.en"
    message = (
        "command line: --alpha applies to the gnmt length penalty only; the run's "
        "decode.length_penalty is average"
    )  # mt evaluate has no --length-penalty to name
    for files in ([], ["--src", str(src), "--ref", str(ref)]):  # the run's test set, or files
        with mock.patch("mt.translate.load_models", side_effect=AssertionError("loaded")):
            result = CliRunner().invoke(
                app, ["evaluate", "--model", str(run), "--alpha", "1", *files]
            )
        assert isinstance(result.exception, MtError) and str(result.exception) == message


@pytest.mark.slow
def test_a_diverged_model_is_one_error_line(diverged_run: Path, tmp_path: Path) -> None:
    (tmp_path / "src.txt").write_text("Der hund .\nDas kind .\n", encoding="utf-8")
    (tmp_path / "ref.txt").write_text("The dog .\nThe child .\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = ["evaluate", "--model", str(diverged_run), "--src", "src.txt", "--ref", "ref.txt"]
    result = subprocess.run(
        [sys.executable, "-m", "mt", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    weights = ckpt.resolve_checkpoint(diverged_run).weights
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        f"error: {weights}: the model's scores are not finite (diverged weights?): "
        "no translation for 2 of 2 lines\n"
    )


def test_an_ensemble_scores_as_its_weights_say(trained_run: Path) -> None:
    # Each checkpoint's BLEU on the test set (the dev set), greedy in fp32, is in the metrics:
    # an ensemble whose weights leave one model alone must score exactly as that model did.
    valid = {r["step"]: r["bleu"] for r in read_metrics(trained_run, "valid")}
    first, last = ckpt.list_checkpoints(trained_run)  # steps 200 and 300
    assert valid[first.step] != valid[last.step]  # else the weights could not be told apart
    both = ["-m", str(first.weights), "-m", str(last.weights), "--weights", "0", "--weights", "2"]
    args = ["evaluate", *both, "--beam", "1", "--precision", "fp32", "--json"]
    result = CliRunner().invoke(app, args)  # the first model's run's test set
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["bleu"]["score"] == pytest.approx(valid[last.step], abs=1e-9)

    # Through --src/--ref, with the models the other way round.
    src, ref = ROOT / "tests/data/tiny/valid.de", ROOT / "tests/data/tiny/valid.en"
    models = [last.weights, first.weights]
    scores = evaluate(src=src, ref=ref, model=models, precision="fp32", weights=[0, 1], beam=1)
    assert scores["bleu"].score == pytest.approx(valid[first.step], abs=1e-9)
    with pytest.raises(MtError, match=r"^--weights: 1 weights for 2 models$"):
        evaluate(src=src, ref=ref, model=models, precision="fp32", weights=[1])
