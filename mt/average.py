"""`mt average`: one checkpoint whose weights are the mean of several of a run's checkpoints.

The checkpoints are the last K by step, or the best K by dev BLEU (metrics.jsonl's valid
records). The result is a weights-only safetensors file (default checkpoints/average.safetensors)
with the inputs' metadata; it is not a step checkpoint, so it is never resumed from or pruned.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

from mt.checkpoint import (
    AVERAGE_NAME,
    WEIGHTS_SUFFIX,
    Checkpoint,
    checkpoint_dir,
    is_resume_point,
    read_metadata,
    read_verified,
    save_tensors,
    weights_checkpoints,
)
from mt.config import CONFIG_FILE, load_config
from mt.errors import MtError
from mt.metrics import read_metrics, selection_scores
from mt.rundir import run_average

log = logging.getLogger("mt")

_PER_CHECKPOINT = ("step",)  # metadata that differs between checkpoints of one run


def averageable(run_dir: Path, upto: int | None = None) -> list[Checkpoint]:
    """The checkpoints `--last K` chooses from, oldest first: not resume points, none after
    step `upto`."""
    return [
        c
        for c in weights_checkpoints(run_dir)
        if not is_resume_point(c) and (upto is None or c.step <= upto)
    ]


def select_last(run_dir: Path, k: int, upto: int | None = None) -> list[Checkpoint]:
    """The k checkpoints with the highest steps (up to step `upto`), oldest first (weights
    suffice).

    Not resume points (a signal's checkpoints between validations): the last checkpoints of a
    run stopped and resumed are those of an uninterrupted run. `upto` leaves out those of the
    steps after a run's end that a run gone back with --resume left on disk.
    """
    found = averageable(run_dir, upto)
    if k > len(found):
        every = [c for c in weights_checkpoints(run_dir) if upto is None or c.step <= upto]
        skipped = len(every) - len(found)
        resume = f" (and {skipped} resume point(s) of a signal, not averaged)" if skipped else ""
        raise MtError(f"asked to average {k} checkpoints but {run_dir} has {len(found)}{resume}")
    return found[-k:]


def select_best(run_dir: Path, k: int) -> list[Checkpoint]:
    """The k checkpoints with the highest dev BLEU (later wins ties), oldest first.

    The BLEU is the one that picks the run's best checkpoint: that of data.select_direction if
    the run's config sets it, else the mean over its directions.
    """
    config = Path(run_dir) / CONFIG_FILE
    select = load_config(config).data.select_direction if config.is_file() else ""
    bleu = selection_scores(read_metrics(Path(run_dir), "valid"), select)  # as in training
    scored = [c for c in weights_checkpoints(run_dir) if c.step in bleu]
    if k > len(scored):
        raise MtError(
            f"asked to average the best {k} checkpoints but {run_dir} has {len(scored)} "
            "with a dev BLEU"
        )
    best = sorted(scored, key=lambda c: (bleu[c.step], c.step), reverse=True)[:k]
    return sorted(best, key=lambda c: c.step)


def common_metadata(paths: list[Path]) -> dict[str, str]:
    """The metadata every file shares (step excepted); MtError where two files disagree."""
    first = {k: v for k, v in read_metadata(paths[0]).items() if k not in _PER_CHECKPOINT}
    for path in paths[1:]:
        other = {k: v for k, v in read_metadata(path).items() if k not in _PER_CHECKPOINT}
        for key in sorted(first.keys() | other.keys()):
            if first.get(key) != other.get(key):
                raise MtError(
                    f"cannot average {paths[0]} and {path}: their {key} differs "
                    f"({first.get(key)!r} vs {other.get(key)!r})"
                )
    return first


def average_tensors(paths: list[Path]) -> dict[str, Tensor]:
    """The element-wise mean of the files' tensors, accumulated in float64, in their dtypes.

    Files store tied weights once, under the same name, so the mean keeps them tied.
    """
    sums: dict[str, Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for path in paths:
        stored = read_verified(path)  # a damaged or diverged input would pass into the mean
        if sums and set(stored) != set(sums):
            odd = sorted(set(stored) ^ set(sums))[0]
            raise MtError(f"cannot average {paths[0]} and {path}: only one has tensor {odd}")
        for name, tensor in stored.items():
            if name not in sums:
                sums[name] = torch.zeros_like(tensor, dtype=torch.float64)
                dtypes[name] = tensor.dtype
            elif tensor.shape != sums[name].shape:
                raise MtError(
                    f"cannot average {paths[0]} and {path}: tensor {name} has shape "
                    f"{list(sums[name].shape)} in one and {list(tensor.shape)} in the other"
                )
            sums[name] += tensor.double()
    # Integer tensors (none in the model today) would be rounded back by the cast: acceptable.
    return {name: (total / len(paths)).to(dtypes[name]) for name, total in sums.items()}


def average_checkpoints(paths: list[Path], output: Path) -> Path:
    """Write the mean of the weights files `paths` to `output`, atomically; returns output."""
    if not paths:
        raise MtError("no checkpoints to average")
    metadata = common_metadata(paths)
    metadata["averaged"] = ",".join(p.name.removesuffix(WEIGHTS_SUFFIX) for p in paths)
    save_tensors(output, average_tensors(paths), metadata)
    return output


def check_output(run_dir: Path, output: Path) -> None:
    """MtError unless `output` is a new weights file in the run's checkpoints directory.

    There it loads like any checkpoint (the run's config and tokenizer are beside it); a step
    checkpoint, whose training state would no longer match it, or the `best` pointer is refused.
    """
    directory = checkpoint_dir(run_dir)
    if output.parent.resolve() != directory.resolve():
        raise MtError(
            f"{output}: an average goes in {directory}, where it loads with the run's config "
            "and tokenizer"
        )
    if not output.name.endswith(WEIGHTS_SUFFIX) or output.name == WEIGHTS_SUFFIX:
        raise MtError(f"{output}: an average's file name ends in {WEIGHTS_SUFFIX}")
    if Checkpoint.from_weights(output).is_step or output.name.startswith(("damaged-", "crash-")):
        raise MtError(
            f"{output}: a checkpoint's or a kept one's name; choose another (e.g. {AVERAGE_NAME})"
        )


def check_not_own(run_dir: Path, output: Path) -> None:
    """MtError if `output` is the average a run that averages (train.average_last) makes at its
    end: replaced while it is the run's model (run_average), the model would change; written
    by hand, other checkpoints could pass for the run's model."""
    if not (run_dir / CONFIG_FILE).is_file():
        return
    wanted = load_config(run_dir / CONFIG_FILE).train.average_last
    own = checkpoint_dir(run_dir) / AVERAGE_NAME
    if not wanted or own.resolve() != output.resolve():
        return
    if run_average(run_dir) is not None:
        raise MtError(
            f"{output}: the run's own average of its last {wanted} checkpoints, its model; "
            "name another file with --output"
        )
    raise MtError(
        f"{output}: the name of the run's own average of its last {wanted} checkpoints "
        "(train.average_last), which mt train makes at its end; name another file with --output"
    )


def average_run(
    run_dir: Path,
    last: int = 0,
    best: int = 0,
    output: Path | None = None,
    replace_own: bool = False,
    upto: int | None = None,
) -> Path:
    """Average a run's last `last` (up to step `upto`) or best `best` checkpoints; returns the
    file written.

    The run's own end-of-run average is replaced only with `replace_own` (the run's end).
    """
    run_dir = Path(run_dir)
    if (last > 0) == (best > 0) or min(last, best) < 0:
        raise MtError("give one of --last K or --best K, with K >= 1")
    if not checkpoint_dir(run_dir).is_dir():
        raise MtError(f"{run_dir}: no checkpoints directory (not a run directory?)")
    chosen = select_last(run_dir, last, upto) if last else select_best(run_dir, best)
    output = Path(output) if output is not None else checkpoint_dir(run_dir) / AVERAGE_NAME
    check_output(run_dir, output)
    if not replace_own:
        check_not_own(run_dir, output)
    log.info("averaging %s into %s", ", ".join(c.name for c in chosen), output)
    return average_checkpoints([c.weights for c in chosen], output)
