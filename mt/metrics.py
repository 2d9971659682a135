"""Training metrics: a JSON-lines file and TensorBoard scalars in the run directory.

metrics.jsonl holds one JSON object per line, `{"kind", "step", "time", ...values}`. A crash or
a full disk can leave its last line torn: opening the file for writing cuts that line off, and
readers skip any unreadable line, each with a warning naming the file and the line. A run
resumed from a checkpoint at step S first drops what an earlier process logged after S.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

from mt.errors import MtError
from mt.files import atomic_write_bytes, write_errors

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

log = logging.getLogger("mt")


def perplexity(nll: float) -> float:
    """exp of a per-token negative log-likelihood, capped so that a diverged one stays finite."""
    return math.exp(min(nll, 100.0))


class MetricsLog:
    """Appends one JSON record per event to metrics.jsonl and mirrors numbers to TensorBoard."""

    def __init__(
        self,
        run_dir: Path,
        tensorboard: bool = True,
        resume_step: int | None = None,
        revalidate: bool = False,
    ) -> None:
        """Open the run's metrics for appending, a torn last line cut off.

        With `resume_step` S (the step of the checkpoint training continues from; 0 for a
        fresh start), records after S are dropped, and so are `end` records: the steps after S
        will be logged again, and this process writes its own `end`. `revalidate`: S's
        validation runs again (a signal put it off), so a `valid` record of S goes too (an
        earlier resume's, killed before it saved). TensorBoard hides its events after S too.
        """
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / METRICS_FILE
        repair_metrics(self.path, resume_step, revalidate)
        with write_errors(self.path):
            self.file = self.path.open("a", encoding="utf-8")
        self.tensorboard_dir = run_dir / TENSORBOARD_DIR
        self.writer = None
        if tensorboard:
            self.writer = _summary_writer(self.tensorboard_dir, resume_step)

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        """Record `values` (numbers or strings) of event `kind` (train, valid, ...) at `step`."""
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        try:
            with write_errors(self.path):
                self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
                self.file.flush()
        except MtError:
            # Close now, dropping what did not fit: a flush at exit would fail again, noisily.
            with contextlib.suppress(OSError):
                self.file.close()
            raise
        if self.writer is not None:
            with write_errors(self.tensorboard_dir):
                for key, value in values.items():
                    if isinstance(value, (int, float)) and math.isfinite(value):
                        self.writer.add_scalar(f"{kind}/{key}", value, step)
                # Waits for the writer thread, and raises here what it failed to write.
                self.writer.flush()

    def sync(self) -> None:
        """Put the records written so far on disk (before a checkpoint that counts on them)."""
        with write_errors(self.path):
            os.fsync(self.file.fileno())

    def close(self) -> None:
        """Flush and close the file and the TensorBoard writer."""
        with write_errors(self.path):
            self.file.close()
        if self.writer is not None:
            with write_errors(self.tensorboard_dir):
                self.writer.close()


def _summary_writer(directory: Path, resume_step: int | None) -> Any:
    """A TensorBoard SummaryWriter on `directory`, hiding events after `resume_step`."""
    from torch.utils.tensorboard import SummaryWriter  # slow import: only when used

    _quiet_tensorboard_thread()
    with write_errors(directory):
        # purge_step P: TensorBoard discards the events of earlier files at steps >= P.
        purge = None if resume_step is None else resume_step + 1
        return SummaryWriter(str(directory), purge_step=purge)


@functools.cache
def _quiet_tensorboard_thread() -> None:
    """Keep TensorBoard's writer thread from printing a traceback when a write fails.

    The thread keeps its exception, and the main thread raises it at its next add or flush,
    where write_errors makes it one line; only the thread's own printout is suppressed.
    """
    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if not isinstance(args.thread, _AsyncWriterThread):
            previous(args)

    threading.excepthook = hook


# --- reading and repairing ----------------------------------------------------------------------


def _parse(line: bytes) -> dict[str, Any] | None:
    """The record on one line, or None if the line is not one (torn, not JSON, not a record)."""
    try:
        record = json.loads(line)
    except ValueError:  # JSONDecodeError, and UnicodeDecodeError for a multi-byte char cut short
        return None
    ok = isinstance(record, dict) and isinstance(record.get("kind"), str)
    return record if ok and isinstance(record.get("step"), int) else None


@functools.cache  # once per line and process: `mt report` reads the file several times
def _warn_unreadable(path: Path, number: int) -> None:
    log.warning("%s: line %d is not a metrics record (a torn write?): skipped", path, number)


def _records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) of every readable line; each unreadable one warned about once."""
    out = []
    for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not line.strip():
            continue
        record = _parse(line)
        if record is None:
            _warn_unreadable(path, number)
        else:
            out.append((number, record))
    return out


def read_metrics(run_dir: Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of metrics.jsonl (optionally only those of one kind), in order."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [r for _, r in _records(path) if kind is None or r["kind"] == kind]


def repair_metrics(path: Path, resume_step: int | None = None, revalidate: bool = False) -> None:
    """Cut a torn last line off `path`; with `resume_step`, drop what follows (see MetricsLog)."""
    if not path.is_file():
        return
    data = path.read_bytes()
    *lines, tail = data.split(b"\n")  # tail: what follows the last newline, b"" when whole
    if tail or (lines and lines[-1].strip() and _parse(lines[-1]) is None):
        torn = len(lines) + 1 if tail else len(lines)
        log.warning("%s: line %d is incomplete (a write cut short): removed it", path, torn)
        lines = lines if tail else lines[:-1]
    if resume_step is not None:
        kept = [
            line
            for number, line in enumerate(lines, start=1)
            if _survives(path, number, line, resume_step, revalidate)
        ]
        if len(kept) < len(lines):
            log.info(
                f"{path}: resuming from step {resume_step}: dropped {len(lines) - len(kept)} "
                "lines of the earlier process (later steps, its end record)"
            )
        lines = kept
    repaired = b"".join(line + b"\n" for line in lines)
    if repaired != data:
        atomic_write_bytes(path, repaired)


def _survives(path: Path, number: int, line: bytes, step: int, revalidate: bool) -> bool:
    """Whether a line is kept by a resume at `step`: a readable record up to it, not an `end`,
    nor, with `revalidate`, a `valid` record of `step`."""
    record = _parse(line)
    if record is None:
        if line.strip():
            _warn_unreadable(path, number)
        return False
    again = revalidate and record["kind"] == "valid" and record["step"] == step
    return record["step"] <= step and record["kind"] != "end" and not again


def record_directions(record: dict[str, Any]) -> list[str]:
    """The directions a validation record scores one by one (its `de-en/bleu` keys), in order.

    Empty for a run of one direction, whose record holds only `bleu`.
    """
    return [key.removesuffix("/bleu") for key in record if key.endswith("/bleu")]


def may_be_best(record: dict[str, Any]) -> bool:
    """Whether a validation record may choose the best checkpoint: its dev loss is finite."""
    return math.isfinite(record.get("loss", 0.0))


def selected_bleu(record: dict[str, Any], select_direction: str) -> float:
    """The dev BLEU that picks the best checkpoint: `select_direction`'s if set, else the mean.

    A run of one direction has only `bleu`, so `select_direction` changes nothing there.
    """
    key = f"{select_direction}/bleu"
    return float(record[key] if select_direction and key in record else record["bleu"])


def selection_scores(valid: list[dict[str, Any]], select_direction: str) -> dict[int, float]:
    """By step, the dev BLEU (selected_bleu) of the validation records that may choose the best
    checkpoint (may_be_best). Of a step validated again the last record decides, as it is of
    the weights saved last: one whose dev loss is not finite leaves the step out."""
    scores: dict[int, float] = {}
    for record in valid:
        step = int(record["step"])
        if "bleu" in record:
            scores[step] = selected_bleu(record, select_direction)
        if not may_be_best(record):
            scores.pop(step, None)
    return scores
