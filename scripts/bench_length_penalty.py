"""Dev and test BLEU of trained runs under several length penalties: the decode.alpha lever.

    .venv/bin/python scripts/bench_length_penalty.py runs/multi30k-de-en runs/multi30k-en-de
    .venv/bin/python scripts/bench_length_penalty.py RUN ... --write docs/benchmarks.md

Decodes every direction's dev set (data.valid) and test set (data.test) of each run with beam
search under each setting of --settings (a length penalty, with its alpha for gnmt), everything
else as the run's config says, and prints a Markdown section: BLEU per run, direction, setting
and split (sacreBLEU, cased), the best setting on dev, and each setting's mean change in dev and
test BLEU from the run's own setting. Choose on dev; test only confirms. A run directory
decodes with the run's model; a checkpoint file (RUN/checkpoints/step-N.safetensors) with its
weights and its run's config.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "scripts"):  # run as a script from anywhere; bench.py sits beside it
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from bench import cpu_model, log, publish, wrap  # noqa: E402

from mt.bleu import bleu_tokenizer  # noqa: E402
from mt.evaluate import score, translate_test_sets  # noqa: E402
from mt.rundir import load_run_config, model_checkpoint  # noqa: E402
from mt.translate import resolve_runtime  # noqa: E402

SECTION = "## Length penalty: dev and test BLEU by decode.alpha"
SPLITS = ("valid", "test")
Setting = tuple[str, float]  # (decode.length_penalty, decode.alpha)


def parse_settings(text: str) -> list[Setting]:
    """'gnmt:0.6,gnmt:1.0,average' -> [("gnmt", 0.6), ("gnmt", 1.0), ("average", 0.0)]."""
    settings = []
    for item in text.split(","):
        kind, _, alpha = item.strip().partition(":")
        settings.append((kind, float(alpha) if alpha else 0.0))
    return settings


def label(setting: Setting) -> str:
    """How a setting reads in the table."""
    kind, alpha = setting
    return f"{kind} {alpha:g}" if kind == "gnmt" else kind


def bleu_of(run: Path, setting: Setting, split: str, precision: str) -> dict[str, float]:
    """BLEU of every direction of `run` on `split` under `setting`: {direction: BLEU}."""
    kind, alpha = setting
    alpha_given = alpha if kind == "gnmt" else None  # the others ignore alpha
    found = translate_test_sets(
        run, "cpu", precision, split=split, length_penalty=kind, alpha=alpha_given
    )
    return {
        direction: score(t.hyps, t.refs, tokenize=bleu_tokenizer(t.tgt_lang))["bleu"].score
        for direction, t in found.items()
    }


def own_setting(run: Path) -> Setting:
    """The length penalty and alpha the run's config decodes with (run: a run or checkpoint)."""
    decode = load_run_config(model_checkpoint(run).run_dir).decode
    return decode.length_penalty, decode.alpha if decode.length_penalty == "gnmt" else 0.0


def bench(runs: list[Path], settings: list[Setting]) -> dict[Path, dict[Setting, dict]]:
    """{run: {setting: {split: {direction: BLEU}}}}, the run's own setting included."""
    res: dict[Path, dict[Setting, dict]] = {}
    for run in runs:
        res[run] = {}
        # One choice for every decode of the run: `auto` times fp32 against bf16, and two
        # timings on a busy machine may disagree, which would change outputs between settings.
        _, precision = resolve_runtime("cpu", "auto", run)
        for setting in dict.fromkeys([own_setting(run), *settings]):
            log(f"{run}: {label(setting)}")
            res[run][setting] = {s: bleu_of(run, setting, s, precision) for s in SPLITS}
    return res


def report(args: argparse.Namespace, res: dict[Path, dict[Setting, dict]]) -> str:
    """The Markdown section: one row per run, direction and setting; then the mean changes."""
    runs = " ".join(str(run) for run in res)
    lines = [
        SECTION,
        "",
        f"`scripts/bench_length_penalty.py {runs} --settings {args.settings}` on {cpu_model()}, "
        f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}. Beam search as each "
        "run's config says but for the length penalty; dev = data.valid, test = data.test; "
        "sacreBLEU, cased. (own) marks the run's own setting, (best) the best on dev.",
        "",
        "| run | direction | setting | dev BLEU | test BLEU |",
        "|---|---|---|---:|---:|",
    ]
    changes: dict[Setting, list[tuple[float, float]]] = {}
    for run, by_setting in res.items():
        own = own_setting(run)
        for direction in by_setting[own]["valid"]:
            best = max(by_setting, key=lambda s: by_setting[s]["valid"][direction])
            for setting, scores in by_setting.items():
                dev, test = scores["valid"][direction], scores["test"][direction]
                marks = " (own)" * (setting == own) + " (best)" * (setting == best)
                lines.append(
                    f"| {run} | {direction} | {label(setting)}{marks} | {dev:.2f} | {test:.2f} |"
                )
                base = by_setting[own]
                gain = (dev - base["valid"][direction], test - base["test"][direction])
                changes.setdefault(setting, []).append(gain)
    lines += ["", "| setting | mean dev change | mean test change | directions |"]
    lines += ["|---|---:|---:|---:|"]
    for setting, gains in changes.items():
        dev_gain = statistics.mean(g[0] for g in gains)
        test_gain = statistics.mean(g[1] for g in gains)
        lines.append(f"| {label(setting)} | {dev_gain:+.2f} | {test_gain:+.2f} | {len(gains)} |")
    return "\n".join(wrap(line) for line in lines) + "\n"


def main() -> None:
    """Parse arguments, decode every run under every setting, print (and maybe write)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path,
                        help="run directories (their models) or checkpoint files")  # fmt: skip
    parser.add_argument("--settings", default="gnmt:0.6,gnmt:1.0,gnmt:1.5,gnmt:2.0,average",
                        help="length penalties, KIND[:ALPHA] separated by commas")  # fmt: skip
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    parser.add_argument("--write", help="Markdown file whose section to replace")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    section = report(args, bench(args.runs, parse_settings(args.settings)))
    publish(section, args.write, SECTION)


if __name__ == "__main__":
    main()
