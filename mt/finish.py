"""After training: average the last checkpoints, then write the run's report (rank 0 only).

These are separate jobs that read what training wrote; the `mt train` command runs them once
training returns, so that the training loop depends on nothing that decodes or scores.
"""

from __future__ import annotations

import logging

from mt.average import average_run
from mt.checkpoint import list_checkpoints
from mt.config import Config
from mt.report import write_report
from mt.rundir import run_path
from mt.train import TrainResult

log = logging.getLogger("mt")


def finish(config: Config, result: TrainResult) -> None:
    """Average (train.average_last) and report (train.report) a run that ended normally."""
    if not result.main or result.idle or result.signum is not None:
        return  # a signalled run resumes later; its end comes then
    run_dir, train = run_path(config), config.train
    if train.average_last:
        last = min(train.average_last, len(list_checkpoints(run_dir)))
        path = average_run(run_dir, last=last)
        log.info("averaged the last %d checkpoints into %s", last, path)
    if train.report:
        # Test decoding at "auto" precision, as `mt evaluate` does.
        log.info("wrote %s", write_report(run_dir, device=result.device))
