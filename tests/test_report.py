"""Tests for mt.report and mt.plot: the run report, its data statistics and the curves PNG."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mt.cli import app
from mt.errors import MtError
from mt.evaluate import score
from mt.metrics import read_metrics
from mt.model import count_parameters
from mt.plot import DPI, FIGURE_INCHES, plot_curves
from mt.rundir import load_trained, open_split

SIZE = (int(FIGURE_INCHES[0] * DPI), int(FIGURE_INCHES[1] * DPI))


def test_training_writes_report_with_true_numbers(trained_run: Path) -> None:
    report = (trained_run / "report.md").read_text(encoding="utf-8")
    config, _, model, _ = load_trained(trained_run, torch.device("cpu"))
    assert f"**{count_parameters(model):,} parameters**" in report
    data = json.loads((trained_run / "data.json").read_text())
    assert data["train"]["kept"] == data["train"]["total"] == 500
    assert "kept 500 of 500 pairs" in report
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


def test_plot_without_metrics_is_one_line_error(tmp_path: Path) -> None:
    out = tmp_path / "curves.png"
    result = CliRunner().invoke(app, ["plot", str(tmp_path), "-o", str(out)])
    assert isinstance(result.exception, MtError)
    assert (
        str(result.exception)
        == f"{tmp_path}: no metrics.jsonl records to plot (not a trained run?)"
    )
    assert not out.exists()
