"""BLEU of the EMA of the weights against the trained weights, at fixed numbers of updates.

    .venv/bin/python scripts/ema_compare.py --config configs/multi30k.yaml \\
        --data data/multi30k --run runs/ema-de-en --steps 1200,2000 --decays 0.999

Trains one run per decay with `train.ema_decay` set, for a fixed number of updates
(train.max_minutes=0), with a checkpoint at every step asked for and none pruned. Then it
translates the dev and test sets with each of those checkpoints twice: with its weights file
(the EMA) and with the trained weights its state file keeps (the same in every run: the EMA
never feeds back into training, so they are also what a run without EMA would have). Prints a
Markdown table of cased BLEU (beam and length penalty from the config) and each run's median
training throughput. Running it again resumes or reuses what is done. Arguments after `--` go
to `mt train` (e.g. data.src_lang=en data.tgt_lang=de for the other direction).

    .venv/bin/python scripts/ema_compare.py --existing runs/multi30k-de-en --steps 600,1200

scores the checkpoints of a run already trained with train.ema_decay (kept, not pruned) instead.
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
from pathlib import Path

from mt import checkpoint as ckpt
from mt.bleu import bleu_tokenizer
from mt.evaluate import model_translations, score
from mt.metrics import read_metrics
from mt.rundir import load_run_config, open_split
from mt.translate import resolve_runtime


def train(args: argparse.Namespace, decay: str, run: Path, extra: list[str]) -> None:
    """`mt train` for max(steps) updates, checkpoints every gcd(steps), all of them kept."""
    every = math.gcd(*args.steps)
    overrides = [
        f"run_dir={run}", f"train.ema_decay={decay}", f"train.max_steps={max(args.steps)}",
        "train.max_minutes=0", f"train.valid_every={every}",
        f"train.keep_last={max(args.steps) // every + 1}", "train.average_last=0",
        "train.report=false",
    ]  # fmt: skip
    if args.data:  # Multi30k's file names, as scripts/multi30k.sh
        data = args.data.resolve()
        overrides += [f"data.train={data}/train", f"data.valid={data}/val"]
        overrides += [f"data.test={data}/test_2016_flickr"]
    command = [sys.executable, "-m", "mt", "train", "--config", str(args.config)]
    subprocess.run([*command, *overrides, *extra], check=True)


def weights_file(run: Path, step: int) -> Path:
    """The weights file of a run's checkpoint `step`: the EMA of the weights."""
    return ckpt.checkpoint_dir(run) / (ckpt.step_name(step) + ckpt.WEIGHTS_SUFFIX)


def trained_weights(run: Path, step: int) -> Path:
    """The trained weights of checkpoint `step` as a weights file in RUN/trained (made once)."""
    saved = ckpt.Checkpoint.from_weights(weights_file(run, step))
    # RUN/trained/x.safetensors: its run directory is RUN, whose config and tokenizer it takes.
    out = run / "trained" / saved.weights.name
    if not out.is_file():
        out.parent.mkdir(exist_ok=True)
        state = ckpt.load_training_state(saved)["model"]
        ckpt.save_weights(out, state, ckpt.read_metadata(saved.weights))
    return out


def bleu(weights: Path, run: Path, split: str, args: argparse.Namespace) -> float:
    """Cased BLEU of `weights` on the run's dev ("valid") or test set."""
    pairs = list(open_split(load_run_config(run), split).pairs())
    sources, refs = [s for s, _ in pairs], [t for _, t in pairs]
    hyps, _, tgt_lang = model_translations(weights, sources, args.device, args.precision)
    return score(hyps, refs, tokenize=bleu_tokenizer(tgt_lang))["bleu"].score


def main() -> None:
    """Train, translate, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="the runs' config (to train)")
    parser.add_argument("--data", type=Path, help="a directory of Multi30k-named files")
    parser.add_argument("--run", type=Path, help="prefix of the run directories")
    parser.add_argument("--existing", type=Path, help="a trained run to score instead")
    parser.add_argument("--steps", default="1200,2000", help="updates at which to compare")
    parser.add_argument("--decays", default="0.999", help="comma-separated train.ema_decay")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", help="for decoding")
    args, extra = parser.parse_known_args()
    extra = [item for item in extra if item != "--"]
    args.steps = sorted(int(s) for s in args.steps.split(","))
    if args.existing:
        runs = {str(load_run_config(args.existing).train.ema_decay): args.existing}
    elif args.run and args.config:
        runs = {decay: Path(f"{args.run}-ema{decay}") for decay in args.decays.split(",")}
        for decay, run in runs.items():
            train(args, decay, run, extra)
    else:
        parser.error("give --config and --run to train, or --existing RUN")
    first = next(iter(runs.values()))
    # One choice for every decode: `auto` times fp32 against bf16, and two timings on a busy
    # machine may disagree, which would decode the trained and the EMA weights differently.
    _, args.precision = resolve_runtime(args.device, args.precision, first)
    rows = ["| updates | weights | dev BLEU | test BLEU |", "|---:|---|---:|---:|"]
    for step in args.steps:
        models = {"trained": trained_weights(first, step)}
        for decay, run in runs.items():
            models[f"EMA {decay}"] = (
                ckpt.checkpoint_dir(run) / f"{ckpt.step_name(step)}.safetensors"
            )
        for name, weights in models.items():
            run = weights.parent.parent
            dev, test = (bleu(weights, run, split, args) for split in ("valid", "test"))
            rows.append(f"| {step:,} | {name} | {dev:.2f} | {test:.2f} |")
    print("\n".join(rows))
    print()
    for decay, run in runs.items():
        speed = statistics.median(r["tgt_tok_s"] for r in read_metrics(run, "train"))
        print(f"{run}: median {speed:,.0f} target tokens/s (train.ema_decay={decay})")


if __name__ == "__main__":
    main()
