"""After training: average the last checkpoints, then write the run's report (rank 0 only).

These are separate jobs that read what training wrote; the `mt train` command runs them once
training returns, so that the training loop depends on nothing that decodes or scores.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mt.average import average_run, averageable
from mt.checkpoint import latest_checkpoint
from mt.config import Config
from mt.lock import hold_run_lock
from mt.report import REPORT_FILE, write_report
from mt.rundir import load_run_config, model_checkpoint, run_average, run_path
from mt.train import TrainResult

log = logging.getLogger("mt")


def finish(config: Config, result: TrainResult) -> None:
    """Average (train.average_last) and report (train.report) a run that ended normally.

    A run that was already at its end (rerun after a signal stopped these jobs) does what is
    missing of them.
    """
    if not result.main or result.signum is not None:
        return  # a signalled run resumes later; its end comes then
    run_dir = run_path(config)
    if result.idle:  # its config.yaml stays as the run ended: what its model is follows it
        config = own_config(config, run_dir)
    with hold_run_lock(run_dir):  # no second trainer may write checkpoints under these jobs
        _finish(config, result, run_dir)


def own_config(config: Config, run_dir: Path) -> Config:
    """The config of a run at its end, for a rerun with nothing to train (which does not
    rewrite it), with a warning where the rerun's average_last or report would differ."""
    own = load_run_config(run_dir)
    changed = [
        f"train.{key}={json.dumps(getattr(config.train, key))}"  # as YAML writes it
        for key in ("average_last", "report")
        if getattr(config.train, key) != getattr(own.train, key)
    ]
    if changed:
        log.warning(
            f"warning: {run_dir} has ended: {' and '.join(changed)} change nothing (its "
            "config.yaml decides its model and report; `mt average` and `mt report` make "
            "others)"
        )
    return own


def _average(run_dir: Path, wanted: int, step: int) -> None:
    """Average the run's last `wanted` checkpoints up to its last `step`, or as many as it has
    (never those of later steps, which a run gone back with --resume leaves), saying so."""
    last = min(wanted, len(averageable(run_dir, step)))
    checkpoints = f"{last} checkpoint{'s' if last != 1 else ''}"
    if last:
        log.info(
            "averaged the last %s into %s",
            checkpoints,
            average_run(run_dir, last=last, replace_own=True, upto=step),
        )
    if last < wanted:
        log.warning(
            f"warning: train.average_last={wanted}, but the run has "
            f"{f'only {checkpoints}' if last else 'no checkpoint to average'} (see "
            "train.keep_last and train.valid_every)"
        )


def _newer_than_model(path: Path, run_dir: Path) -> bool:
    """Whether `path` exists and was written after the run's model and latest checkpoint."""
    if not path.is_file():
        return False
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return True
    made = (latest.weights, model_checkpoint(run_dir).weights)
    return all(path.stat().st_mtime_ns >= m.stat().st_mtime_ns for m in made if m.is_file())


def _finish(config: Config, result: TrainResult, run_dir: Path) -> None:
    """The average and report of a finished run, under its lock."""
    train = config.train
    # An idle rerun does what a signal left undone: an average that covers the run's last
    # checkpoint, a report newer than the run's model (a run extended and stopped in these
    # jobs has older ones, of fewer steps).
    if train.average_last and not (result.idle and run_average(run_dir) is not None):
        _average(run_dir, train.average_last, result.state.step)
    if train.report and not (result.idle and _newer_than_model(run_dir / REPORT_FILE, run_dir)):
        # Test decoding at "auto" precision, as `mt evaluate` does.
        log.info("wrote %s", write_report(run_dir, device=result.device))
