"""metrics.jsonl and TensorBoard: torn lines repaired or skipped, resumes without duplicates,
and a full disk reported as one line."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mt.cli import app
from mt.errors import MtError
from mt.metrics import METRICS_FILE, MetricsLog, read_metrics, selection_scores

ROOT = Path(__file__).resolve().parents[1]
RECORDS = [
    {"kind": "train", "step": 10, "time": 1.0, "loss": 5.0},
    {"kind": "valid", "step": 10, "time": 2.0, "loss": 4.5, "bleu": 1.5},
    {"kind": "train", "step": 20, "time": 3.0, "loss": 4.0},
    {"kind": "valid", "step": 20, "time": 4.0, "loss": 3.5, "bleu": 2.5},
    {"kind": "end", "step": 20, "time": 5.0, "train_seconds": 4.0},
    {"kind": "train", "step": 30, "time": 6.0, "loss": 3.0},
]


def lines_of(records: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def test_a_torn_last_line_is_cut_off_when_opened(tmp_path: Path, caplog) -> None:
    path = tmp_path / METRICS_FILE
    path.write_bytes(lines_of(RECORDS[:2]) + b'{"kind": "train", "st')  # the disk filled up
    with caplog.at_level(logging.WARNING, logger="mt"):
        metrics = MetricsLog(tmp_path, tensorboard=False)
    metrics.write("train", 20, {"loss": 4.0})
    metrics.close()
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: line 3 is incomplete (a write cut short): removed it"
    ]
    assert [(r["kind"], r["step"]) for r in read_metrics(tmp_path)] == [
        ("train", 10),
        ("valid", 10),
        ("train", 20),
    ]
    assert path.read_bytes().startswith(lines_of(RECORDS[:2]) + b'{"kind": "train", "step": 20')


def test_a_whole_but_invalid_last_line_is_cut_off(tmp_path: Path, caplog) -> None:
    path = tmp_path / METRICS_FILE
    # A torn line that a later run appended onto: it ends with a newline but is no JSON.
    path.write_bytes(lines_of(RECORDS[:1]) + b'{"kind": "tr' + lines_of(RECORDS[1:2]))
    with caplog.at_level(logging.WARNING, logger="mt"):
        MetricsLog(tmp_path, tensorboard=False).close()
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: line 2 is incomplete (a write cut short): removed it"
    ]
    assert path.read_bytes() == lines_of(RECORDS[:1])


def test_a_whole_file_is_left_alone(tmp_path: Path, caplog) -> None:
    path = tmp_path / METRICS_FILE
    path.write_bytes(lines_of(RECORDS))
    inode = path.stat().st_ino
    with caplog.at_level(logging.INFO, logger="mt"):
        MetricsLog(tmp_path, tensorboard=False).close()
    assert path.read_bytes() == lines_of(RECORDS)
    assert path.stat().st_ino == inode  # not rewritten
    assert not caplog.records


def test_readers_skip_unreadable_lines_with_one_warning_each(tmp_path: Path, caplog) -> None:
    path = tmp_path / METRICS_FILE
    path.write_bytes(
        lines_of(RECORDS[:2])
        + b'{"kind": "tr{"kind": "valid"\n'  # torn, then appended onto
        + b"[1, 2]\n"  # JSON, but no record
        + b'{"kind": "train", "step": "\xc3\n'  # a multi-byte character cut short
        + lines_of(RECORDS[2:4])
    )
    with caplog.at_level(logging.WARNING, logger="mt"):
        assert [r["step"] for r in read_metrics(tmp_path, "valid")] == [10, 20]
        assert len(read_metrics(tmp_path)) == 4  # warned once per line, not once per read
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: line {n} is not a metrics record (a torn write?): skipped" for n in (3, 4, 5)
    ]


def test_resume_drops_later_records_and_end_records(tmp_path: Path, caplog) -> None:
    path = tmp_path / METRICS_FILE
    path.write_bytes(lines_of(RECORDS) + b'{"kind": "valid", "step": 3')
    with caplog.at_level(logging.INFO, logger="mt"):
        metrics = MetricsLog(tmp_path, tensorboard=False, resume_step=20)
    metrics.write("train", 30, {"loss": 2.9})
    metrics.close()
    kept = [(r["kind"], r["step"]) for r in read_metrics(tmp_path)]
    assert kept == [("train", 10), ("valid", 10), ("train", 20), ("valid", 20), ("train", 30)]
    assert read_metrics(tmp_path, "train")[-1]["loss"] == 2.9
    assert path.read_bytes().startswith(lines_of(RECORDS[:4]))  # kept lines byte for byte
    assert sorted(p.name for p in tmp_path.iterdir()) == [METRICS_FILE]  # no temp file left
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: line 7 is incomplete (a write cut short): removed it",
        f"{path}: resuming from step 20: dropped 2 lines of the earlier process "
        "(later steps, its end record)",
    ]


def test_a_fresh_start_drops_everything_after_step_0(tmp_path: Path) -> None:
    (tmp_path / METRICS_FILE).write_bytes(lines_of(RECORDS))
    MetricsLog(tmp_path, tensorboard=False, resume_step=0).close()
    assert (tmp_path / METRICS_FILE).read_bytes() == b""


def scalars(directory: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a TensorBoard tag as TensorBoard itself loads it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_tensorboard_hides_the_steps_after_a_resume(tmp_path: Path) -> None:
    metrics = MetricsLog(tmp_path)
    for step in (1, 2, 3, 4):
        metrics.write("train", step, {"loss": float(step)})
    metrics.close()
    # Resumed from step 2, and next logging at step 5: nothing is out of order, so without a
    # purge TensorBoard would keep the dead process's steps 3 and 4.
    metrics = MetricsLog(tmp_path, resume_step=2)
    metrics.write("train", 5, {"loss": 0.5})
    metrics.close()
    assert scalars(tmp_path / "tensorboard", "train/loss") == [(1, 1.0), (2, 2.0), (5, 0.5)]


@pytest.mark.slow
def test_plot_report_and_average_read_past_a_torn_line(trained_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    path = run / METRICS_FILE
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join([lines[0], b'{"kind": "tra', *lines[1:], b'{"kind": "val']))
    runner = CliRunner()
    plotted = runner.invoke(app, ["plot", str(run), "-o", str(tmp_path / "c.png")])
    assert plotted.exit_code == 0, plotted.output
    reported = runner.invoke(app, ["report", str(run), "--no-test"])
    assert reported.exit_code == 0, reported.output
    assert "best dev BLEU" in (run / "report.md").read_text()
    averaged = runner.invoke(app, ["average", str(run), "--best", "2"])
    assert averaged.exit_code == 0, averaged.output


# --- a full disk --------------------------------------------------------------------------------


def test_a_full_disk_under_metrics_jsonl_is_one_error(small_fs, tmp_path: Path, capfd) -> None:
    run = small_fs.mount(tmp_path / "run")
    small_fs.fill(run)
    metrics = MetricsLog(run, tensorboard=False)
    with pytest.raises(MtError) as err:
        metrics.write("train", 1, {"loss": 1.0, "note": "x" * 5000})
    assert str(err.value) == f"{run / METRICS_FILE}: cannot write (No space left on device)"
    metrics.close()  # the failed file was closed at once: nothing is left to flush at exit
    assert "Traceback" not in capfd.readouterr().err


# TensorBoard writes from a thread; pytest catches what threads raise, so these run the writer in
# a subprocess, as `mt train` does. It opens the log, says "ready", waits for a line on stdin (the
# test fills the disk meanwhile), then logs until it fails.
WRITER = """
import sys
from pathlib import Path
from mt.errors import MtError
from mt.metrics import MetricsLog

metrics = MetricsLog(Path(sys.argv[1]))
if sys.argv[2:] == ["inject"]:
    from tensorboard.summary.writer.record_writer import RecordWriter

    def full(self, data):
        raise OSError(28, "No space left on device")

    RecordWriter.write = full
print("ready", flush=True)
sys.stdin.readline()
try:
    for step in range(1, 10_000):  # until the events file's last page is full too
        metrics.write("train", step, {"loss": 1.0})
except MtError as exc:
    print(f"step {step}: {exc}")
"""


def log_until_full(run: Path, fill: Callable[[], None], *args: str) -> tuple[str, str]:
    """Run WRITER on `run`, calling `fill` once it is ready: (stdout, stderr)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(run), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout.readline() == "ready\n", proc.communicate()
    fill()
    out, err = proc.communicate("go\n", timeout=120)
    assert proc.returncode == 0, err
    return out, err


@pytest.mark.slow
def test_a_full_disk_under_tensorboard_is_one_error(small_fs, tmp_path: Path) -> None:
    run = tmp_path / "run"
    board = small_fs.mount(run / "tensorboard")
    out, err = log_until_full(run, lambda: small_fs.fill(board))
    step = len(read_metrics(run))  # metrics.jsonl lives on another disk: every step is in it
    assert out == f"step {step}: {board}: cannot write (No space left on device)\n"
    assert "Traceback" not in err  # TensorBoard's writer thread failed, and printed nothing
    with pytest.raises(MtError, match=f"^{board}: cannot write \\(No space left on device\\)$"):
        MetricsLog(run)  # a new writer cannot even start its events file


@pytest.mark.slow
def test_tensorboard_write_errors_injected(tmp_path: Path) -> None:
    out, err = log_until_full(tmp_path, lambda: None, "inject")
    assert out == f"step 1: {tmp_path / 'tensorboard'}: cannot write (No space left on device)\n"
    assert "Traceback" not in err


def test_the_last_record_of_a_step_validated_again_decides_its_score() -> None:
    valid = [
        {"step": 5, "bleu": 10.0, "loss": 1.0},
        {"step": 10, "bleu": 12.0, "loss": 1.0, "de-en/bleu": 20.0},
        {"step": 5, "bleu": 11.0, "loss": math.nan},  # re-validated: the weights diverged
        {"step": 15, "bleu": 9.0, "loss": 1.0},
        {"step": 15, "bleu": 13.0, "loss": 1.0},  # re-validated: its last score
    ]
    assert selection_scores(valid, "") == {10: 12.0, 15: 13.0}
    assert selection_scores(valid, "de-en") == {10: 20.0, 15: 13.0}  # where it has one
