"""Tests for mt.report and mt.plot: the run report, its data statistics and the curves PNG."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers.corpus import MULTI_DIRECTIONS, multi_config
from PIL import Image
from typer.testing import CliRunner

from mt import plot, rundir
from mt import report as report_module
from mt.cli import app
from mt.config import load_config, save_config
from mt.corpora import open_corpus
from mt.errors import MtError
from mt.evaluate import model_translations, score
from mt.metrics import read_metrics
from mt.model import count_parameters
from mt.plot import DPI, FIGURE_INCHES, plot_curves
from mt.report import _dev_lines, _model_section, _test_section, write_report
from mt.report import test_scores as report_test_scores
from mt.rundir import load_trained, open_split

SIZE = (int(FIGURE_INCHES[0] * DPI), int(FIGURE_INCHES[1] * DPI))


def test_training_writes_report_with_true_numbers(trained_run: Path) -> None:
    report = (trained_run / "report.md").read_text(encoding="utf-8")
    config, _, model, _ = load_trained(trained_run, torch.device("cpu"))
    assert f"**{count_parameters(model):,} parameters**" in report
    data = json.loads((trained_run / "data.json").read_text())
    assert data["train"]["kept"] == data["train"]["total"] == 500
    assert f"- train `{config.data.train}`: kept 500 of 500 pairs (dropped 0 empty" in report
    assert list(data["directions"]) == ["de-en"]
    valid = read_metrics(trained_run, "valid")
    best = max(valid, key=lambda r: r["bleu"])
    assert f"best dev BLEU **{best['bleu']:.2f}** at step {best['step']:,}" in report
    assert [r["step"] for r in valid] == [100, 200, 300]
    end = read_metrics(trained_run, "end")[-1]
    assert (end["step"], end["precision"], end["device"]) == (300, "fp32", "cpu")
    assert "300 steps" in report
    assert "- precision from step 0: fp32 (as asked)" in report
    # The test rows are the scores of the hypotheses written beside the report.
    hyps = (trained_run / "test.hyp.en").read_text(encoding="utf-8").splitlines()
    refs = [t for _, t in open_split(config, "test").pairs()]
    bleu = score(hyps, refs)["bleu"]
    row = re.search(r"^\| BLEU \| ([\d.]+) \| `(.*)` \|$", report, re.M)
    assert row is not None
    assert float(row.group(1)) == pytest.approx(bleu.score, abs=0.005)
    assert row.group(2) == bleu.signature.replace("|", "\\|")
    assert re.search(r"^\| BLEU \(lowercased\) \| [\d.]+ \| `nrefs:1\\\|case:lc", report, re.M)
    assert "![learning curves](curves.png)" in report
    assert Image.open(trained_run / "curves.png").size == SIZE


def test_the_wall_clock_axis_leaves_out_the_time_between_a_stop_and_its_resume() -> None:
    from mt.plot import training_clock

    records = [
        {"kind": "precision", "step": 0, "time": 100.0},
        {"kind": "train", "step": 10, "time": 110.0},
        {"kind": "precision", "step": 10, "time": 5000.0},  # resumed 81 minutes later
        {"kind": "train", "step": 20, "time": 5012.0},
        {"kind": "end", "step": 20, "time": 5013.5},
    ]
    assert training_clock(records) == [0.0, 10.0, 10.0, 22.0, 23.5]


def test_the_best_dev_bleu_is_of_a_validation_with_a_finite_loss() -> None:
    valid = [
        {"step": 10, "loss": 3.0, "ppl": 20.0, "bleu": 12.0},
        {"step": 20, "loss": math.nan, "ppl": math.nan, "bleu": 30.0},  # training's best never
    ]
    assert _dev_lines(valid, "")[0] == "- best dev BLEU **12.00** at step 10"


def test_curves_leave_out_a_record_without_a_time(tmp_path: Path) -> None:
    from mt.plot import run_curves

    lines = [
        {"kind": "precision", "step": 0, "time": 100.0},
        {"kind": "train", "step": 10, "loss": 4.0},  # no time: written by hand?
        {"kind": "train", "step": 20, "time": 130.0, "loss": 3.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert run_curves(tmp_path)["train", "loss"] == {"": ([20], [30.0], [3.0])}


def test_legend_names_tell_runs_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mt.plot import run_labels

    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    assert run_labels([a, tmp_path / "c"]) == ["run", "c"]
    assert run_labels([a, b]) == [str(a), str(b)]
    a.mkdir(parents=True)
    monkeypatch.chdir(a)
    assert run_labels([Path(".")]) == ["run"]


@pytest.mark.slow
def test_plot_several_runs_and_report_command(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "both.png"
    assert plot_curves([trained_run, trained_run], out, labels=["a", "b"]) == out
    assert Image.open(out).size == SIZE
    runner = CliRunner()
    result = runner.invoke(app, ["plot", str(trained_run), "-o", str(tmp_path / "cli.png")])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "cli.png").size == SIZE
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("config.yaml", "metrics.jsonl", "data.json"):
        (copy / name).write_bytes((trained_run / name).read_bytes())
    result = runner.invoke(app, ["report", str(copy), "--no-test"])
    assert result.exit_code == 0, result.output
    text = (copy / "report.md").read_text(encoding="utf-8")
    assert "## Test" not in text
    assert "## Training" in text and (copy / "curves.png").is_file()


def test_a_run_that_samples_is_tested_by_beam_search(trained_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy, ignore=shutil.ignore_patterns("cache", "tensorboard"))
    _, searched = report_test_scores(copy, "cpu", "fp32")
    hyps, _, _ = model_translations(copy, None, "cpu", "fp32")
    config = load_config(copy / "config.yaml", ["decode.sampling=true", "decode.temperature=5"])
    save_config(config, copy / "config.yaml")  # e.g. a run kept for back-translation
    _, again = report_test_scores(copy, "cpu", "fp32")
    assert again["de-en"]["bleu"].score == searched["de-en"]["bleu"].score > 90
    assert model_translations(copy, None, "cpu", "fp32")[0] == hyps  # so is `mt evaluate`


def test_plot_without_metrics_is_one_line_error(tmp_path: Path) -> None:
    out = tmp_path / "curves.png"
    result = CliRunner().invoke(app, ["plot", str(tmp_path), "-o", str(out)])
    assert isinstance(result.exception, MtError)
    assert (
        str(result.exception)
        == f"{tmp_path}: no metrics.jsonl records to plot (not a trained run?)"
    )
    assert not out.exists()


def test_a_report_names_the_direction_of_a_signature_it_does_not_share(tmp_path: Path) -> None:
    config = multi_config(tmp_path, tmp_path / "run")  # de-en, en-de, fr-en, en-fr
    latin = score(["A dog runs."], ["A dog is running."])
    chinese = score(["两只狗在玩。"], ["两只狗在跑。"], tokenize="zh")  # as a zh target is scored
    by_direction = {d: {**latin, "bleu": (chinese if d == "en-de" else latin)["bleu"]}
                    for d in MULTI_DIRECTIONS}  # fmt: skip
    lines = _test_section("step-00000010.safetensors", by_direction, config)
    signatures = lines[lines.index("sacreBLEU signatures:") + 2 : -1]
    assert signatures == [
        *(f"- BLEU ({d}): `{by_direction[d]['bleu'].signature}`" for d in MULTI_DIRECTIONS),
        f"- chrF: `{latin['chrf'].signature}`",
        f"- TER: `{latin['ter'].signature}`",
    ]
    assert "tok:zh" in signatures[1] and "tok:13a" in signatures[0]


def test_a_report_of_a_run_it_cannot_write_into_stops_before_translating(
    trained_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def read_only(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    def translating(*args: object, **kwargs: object) -> None:
        raise AssertionError("translated the test set first")

    monkeypatch.setattr(rundir.tempfile, "TemporaryFile", read_only)  # the write probe
    monkeypatch.setattr(report_module, "translate_test_sets", translating)
    with pytest.raises(MtError) as err:
        write_report(trained_run, device="cpu", precision="fp32")
    assert str(err.value) == (
        f"RUN {trained_run}: cannot write files in {trained_run} (Permission denied)"
    )


def test_a_device_for_a_report_that_translates_nothing_is_refused(
    trained_run: Path, tmp_path: Path
) -> None:
    def refusal(*args: str) -> str:
        result = CliRunner().invoke(app, ["report", *args])
        assert isinstance(result.exception, MtError), result.output
        return str(result.exception)

    assert refusal(str(trained_run), "--no-test", "--device", "cuda:7") == (
        "--device sets how the test set is translated, and none is (--no-test)"
    )
    assert refusal(str(trained_run), "--no-test", "--precision", "bf16").startswith(
        "--precision sets how the test set is translated"
    )
    untested = load_config(trained_run / "config.yaml", ["data.test="])
    save_config(untested, tmp_path / "config.yaml")  # all the refusal reads
    assert refusal(str(tmp_path), "--device", "cpu") == (
        "--device sets how the test set is translated, and none is (the run has no test set)"
    )
    # Training's own report of such a run takes the run's device, and writes no test section
    # (tests/test_train.py).


@pytest.fixture
def multi_copy(multi_run: Path, tmp_path: Path) -> Path:
    """A copy of conftest's multilingual run, for reports to write into."""
    copy = tmp_path / "multi"
    shutil.copytree(multi_run, copy, ignore=shutil.ignore_patterns("cache", "tensorboard"))
    return copy


@pytest.mark.slow  # conftest's multilingual run
def test_report_of_a_multilingual_run_has_a_row_per_direction(multi_copy: Path) -> None:
    report = write_report(multi_copy, device="cpu", precision="fp32").read_text(encoding="utf-8")
    config = load_config(multi_copy / "config.yaml")
    tests = {c.direction: c for c in config.data.directions()}
    rows = re.findall(r"^\| ([a-z]{2}-[a-z]{2}) \| ([\d.]+) \| ([\d.]+) \|", report, re.M)
    assert [direction for direction, _, _ in rows] == list(MULTI_DIRECTIONS)
    for direction, bleu, bleu_lc in rows:
        hyps = (multi_copy / f"test.hyp.{direction}").read_text(encoding="utf-8").splitlines()
        refs = [t for _, t in open_corpus(tests[direction].test, *direction.split("-")).pairs()]
        assert float(bleu) == pytest.approx(score(hyps, refs)["bleu"].score, abs=0.005)
        assert float(bleu_lc) == pytest.approx(score(hyps, refs, True)["bleu"].score, abs=0.005)
    assert f"- BLEU: `{score(hyps, refs)['bleu'].signature}`" in report
    # The data section: the totals, then each direction's training counts and dev unk rates.
    data = json.loads((multi_copy / "data.json").read_text())
    per = data["directions"]
    assert list(per) == list(MULTI_DIRECTIONS)
    assert sum(p["train"]["kept"] for p in per.values()) == data["train"]["kept"]
    assert sum(p["train_src_tokens"] for p in per.values()) == data["train_src_tokens"]
    assert f"- train, 4 directions: kept {data['train']['kept']:,} of " in report
    for direction, corpus in tests.items():
        kept, total = per[direction]["train"]["kept"], per[direction]["train"]["total"]
        assert f"- {direction} train `{corpus.train}`: kept {kept:,} of {total:,} pairs" in report
        src, tgt = per[direction]["valid_unk_rate"]
        unk = f"- {direction} dev `{corpus.valid}`: unk rate {src:.3%} source, {tgt:.3%} target"
        assert unk in report

    valid = read_metrics(multi_copy, "valid")
    best = max(valid, key=lambda r: r["bleu"])
    mean = f"mean of the 4 directions) **{best['bleu']:.2f}** at step {best['step']}\n"
    assert f"- best dev BLEU ({mean}" in report
    header = "| step | dev loss | dev ppl | dev BLEU (mean) | de-en | en-de | fr-en | en-fr |"
    assert header in report
    for r in valid:
        bleus = " | ".join(f"{r[f'{d}/bleu']:.2f}" for d in MULTI_DIRECTIONS)
        assert f"| {r['bleu']:.2f} | {bleus} |" in report


@pytest.mark.slow  # conftest's multilingual run
def test_the_best_dev_bleu_of_the_selected_direction_is_reported(multi_copy: Path) -> None:
    config = load_config(multi_copy / "config.yaml", ["data.select_direction=en-fr"])
    save_config(config, multi_copy / "config.yaml")
    valid = read_metrics(multi_copy, "valid")
    chosen = max(valid, key=lambda r: r["en-fr/bleu"])
    report = write_report(multi_copy, test=False).read_text(encoding="utf-8")
    assert (
        f"**{chosen['bleu']:.2f}** at step {chosen['step']}; en-fr's (data.select_direction) "
        f"chose it: **{chosen['en-fr/bleu']:.2f}**"
    ) in report


@pytest.mark.slow  # conftest's multilingual run
def test_plot_draws_each_direction_of_a_multilingual_run(
    multi_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    figures = []
    monkeypatch.setattr(plot, "save_figure", lambda fig, output: figures.append(fig) or output)
    plot_curves([multi_run], tmp_path / "curves.png", labels=["multi"])
    valid = read_metrics(multi_run, "valid")
    (figure,) = figures
    for panel, key in ((1, "loss"), (2, "bleu")):  # the dev panels, against steps
        lines = figure.axes[panel].get_lines()
        names = [f"multi {d}" for d in MULTI_DIRECTIONS]
        assert [line.get_label() for line in lines] == ["multi", *names]
        fields = [key, *(f"{d}/{key}" for d in MULTI_DIRECTIONS)]
        for line, field in zip(lines, fields, strict=True):
            assert list(line.get_xdata()) == [r["step"] for r in valid]
            assert list(line.get_ydata()) == [r[field] for r in valid]
    assert [line.get_label() for line in figure.axes[0].get_lines()] == ["multi"]  # train loss


def test_the_model_section_names_a_dropout_schedule(tmp_path: Path) -> None:
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    plain = load_config(tiny, ["model.dropout=0.3"])
    scheduled = load_config(
        tiny, ["model.dropout=0.3", "train.initial_dropout=0.1", "train.initial_dropout_steps=1500"]
    )
    assert ", dropout 0.3, " in _model_section(plain, tmp_path)[2]
    line = _model_section(scheduled, tmp_path)[2]
    assert ", dropout 0.3 (0.1 for the first 1,500 updates), " in line


def test_a_damaged_data_record_is_one_line(tmp_path: Path) -> None:
    tiny = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    record = tmp_path / "data.json"
    for text, problem in [
        (
            "{",
            "not JSON (Expecting property name enclosed in double quotes: line 1 column 2 "
            "(char 1))",
        ),
        ("[1, 2]", "not a JSON object"),
    ]:
        record.write_text(text, encoding="utf-8")
        with pytest.raises(MtError) as err:
            _model_section(tiny, tmp_path)
        assert str(err.value) == f"{record}: damaged, {problem}"


@pytest.mark.slow  # conftest's multilingual run
def test_a_multilingual_run_with_one_test_set_names_its_direction(multi_copy: Path) -> None:
    config = load_config(multi_copy / "config.yaml")
    test, config.data.test = config.data.test, ""
    config.data.corpora[1].test = test  # en-de's only
    save_config(config, multi_copy / "config.yaml")
    for old in multi_copy.glob("test.hyp.*"):
        old.unlink()
    report = write_report(multi_copy, device="cpu", precision="fp32").read_text(encoding="utf-8")
    assert [p.name for p in multi_copy.glob("test.hyp.*")] == ["test.hyp.en-de"]
    rows = re.findall(r"^\| (\S+) \| BLEU \|", report, re.M) + re.findall(
        r"^\| (en-de) \| [\d.]+ \|", report, re.M
    )
    assert rows == ["direction", "en-de"]
