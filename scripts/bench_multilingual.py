"""One multilingual model against bilingual ones on Multi30k: test BLEU, zero-shot, speed.

    .venv/bin/python scripts/bench_multilingual.py --write docs/benchmarks.md   # hours
    .venv/bin/python scripts/bench_multilingual.py --smoke                      # for tests

Trains the bilingual recipe configs/multi30k.yaml once per direction that
configs/multi30k-multi.yaml lists (or takes runs trained before, --bilingual), then, on the same
machine, the multilingual recipe (one model for every direction) for twice the bilingual runs'
mean updates. Every run resumes where an earlier invocation with the same --workdir stopped, so
the hours it takes may span sessions; minutes are training and validation time over them all.
--minutes sets the bilingual runs' time (default: the recipe's 58) and --set changes both recipes
alike (e.g. to the smaller model of configs/demo.yaml, for a benchmark that fits in an hour).
Scores each test direction with both (sacreBLEU, cased, with its signature); asks the
multilingual model for the directions it never saw (zero-shot, e.g. de→fr), with their BLEU and
the share of outputs that langid (its model ships inside the package; restricted to the run's
languages) finds in another language than asked; and compares the median training throughput
(target tokens/s). Prints a Markdown section for docs/benchmarks.md. --smoke trains tiny models
for a few steps on a slice of the data: the numbers then mean nothing. --score RUN trains
nothing: it prints a finished multilingual run's test BLEU per direction and its zero-shot rows.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "scripts"):  # run as a script from anywhere; bench.py sits beside it
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from bench import TEST_PREFIX, cpu_model, find_data, log, publish, wrap  # noqa: E402

from mt.bleu import bleu_tokenizer  # noqa: E402
from mt.config import Config, load_config  # noqa: E402
from mt.corpora import open_corpus, read_lines  # noqa: E402
from mt.evaluate import MetricScore, evaluate_run, model_translations, score  # noqa: E402
from mt.metrics import read_metrics  # noqa: E402
from mt.rundir import load_run_config  # noqa: E402

SECTION = "## Multilingual vs bilingual models (Multi30k)"
MULTI_CONFIG = ROOT / "configs" / "multi30k-multi.yaml"
BILINGUAL_CONFIG = ROOT / "configs" / "multi30k.yaml"
SPLITS = {"train": "train", "valid": "val", "test": TEST_PREFIX}  # data.<key>: file prefix
SMOKE_LINES = {"train": 300, "val": 10, TEST_PREFIX: 10}  # lines of each split kept by --smoke
SPEED_LINES = {"train": None, "val": 20, TEST_PREFIX: 20}  # speed runs: all training data
# Before --set, which may change them. No EMA: the bilingual recipe's would cost it time that
# the multilingual one does not spend.
SPEED_SETTINGS = ["train.log_every=20", "train.keep_last=1", "train.ema_decay=0"]
SMOKE_OVERRIDES = [  # a tiny model, a few steps: the whole benchmark path in seconds
    "tokenizer.vocab_size=200",
    "tokenizer.byte_fallback=false",
    "model.dim=32",
    "model.enc_layers=1",
    "model.dec_layers=1",
    "model.heads=2",
    "model.ffn_dim=64",
    "train.max_steps=10",
    "train.max_minutes=0",
    "train.max_tokens=512",
    "train.warmup_steps=2",
    "train.log_every=5",
    "train.valid_every=10",
    "train.precision=fp32",
    "train.device=cpu",
    "decode.beam=1",
    "decode.max_len_a=0",  # untrained models run to the length limit: keep it short
    "decode.max_len_b=5",
]


def sliced_data(data: Path, out: Path, languages: list[str], lines: dict[str, int | None]) -> Path:
    """In `out`, the first `lines[prefix]` lines of each split of every language (None: the
    whole file, linked)."""
    out.mkdir(parents=True, exist_ok=True)
    for prefix, n in lines.items():
        for lang in languages:
            source = data / f"{prefix}.{lang}.gz"
            if n is None:
                if not (link := out / source.name).exists():
                    link.symlink_to(source.resolve())
                continue
            kept = itertools.islice(read_lines(source), n)
            (out / f"{prefix}.{lang}").write_text("\n".join(kept) + "\n", encoding="utf-8")
    return out


def run_languages(config: Config) -> list[str]:
    """Every language a run reads, as a source or a target, sorted."""
    return sorted({lang for c in config.data.directions() for lang in (c.src_lang, c.tgt_lang)})


def run_config(path: Path, run_dir: Path, data: Path, extra: list[str]) -> Config:
    """The config at `path` on the Multi30k files in `data`, training into `run_dir`."""
    files = [f"data.{key}={data / prefix}" for key, prefix in SPLITS.items()]
    return load_config(path, [f"run_dir={run_dir}", *files, "train.report=false", *extra])


def train_run(config: Config) -> dict[str, Any]:
    """Train (or resume) a run; its numbers (see run_numbers)."""
    from mt.train import train

    log(f"training {config.run_dir}")
    if (signum := train(config).signum) is not None:  # stopped early: not a finished run
        raise SystemExit(
            f"bench_multilingual: {config.run_dir} stopped by signal {signum}; run the same "
            "command again to resume it"
        )
    return run_numbers(Path(config.run_dir))


def run_numbers(run: Path) -> dict[str, Any]:
    """A trained run's directory, updates and minutes of training and validation (from its
    last `end` record, over all its sessions) and median target tokens/s."""
    records, ends = read_metrics(run, "train"), read_metrics(run, "end")
    return {
        "run": run,
        "steps": ends[-1]["step"] if ends else 0,
        "minutes": ends[-1]["train_seconds"] / 60 if ends else 0.0,
        "tok_s": statistics.median(r["tgt_tok_s"] for r in records) if records else 0.0,
    }


def trained_bilingual(runs: list[Path], wanted: list[str]) -> dict[str, dict[str, Any]]:
    """--bilingual: runs trained before, by direction; SystemExit naming a run that does not fit."""
    found: dict[str, dict[str, Any]] = {}
    for run in runs:
        if not read_metrics(run, "end"):
            raise SystemExit(
                f"--bilingual {run}: not a finished run (no end record in metrics.jsonl)"
            )
        directions = [c.direction for c in load_run_config(run).data.directions()]
        if len(directions) != 1 or directions[0] not in wanted or directions[0] in found:
            raise SystemExit(
                f"--bilingual {run}: trains {', '.join(directions)}; expected one of "
                f"{', '.join(d for d in wanted if d not in found)}"
            )
        found[directions[0]] = run_numbers(run)
    return found


def zero_shot(multi: Config) -> list[tuple[str, str]]:
    """(source, target) pairs the multilingual model can be asked for but never trained on."""
    trained = {(c.src_lang, c.tgt_lang) for c in multi.data.directions()}
    sources = dict.fromkeys(c.src_lang for c in multi.data.directions())
    targets = multi.data.target_languages()
    return [(s, t) for s in sources for t in targets if s != t and (s, t) not in trained]


@functools.cache
def language_identifier(languages: tuple[str, ...]) -> Any:
    """langid's identifier, choosing among `languages` only (its model takes seconds to load)."""
    import langid

    identifier = langid.langid.LanguageIdentifier.from_modelstring(langid.langid.model)
    identifier.set_languages(list(languages))
    return identifier


def off_target(hyps: list[str], wanted: str, languages: list[str]) -> float:
    """Percentage of non-empty outputs that langid finds in another of `languages`."""
    identifier = language_identifier(tuple(languages))
    found = [identifier.classify(h)[0] for h in hyps if h.strip()]
    return 100 * sum(lang != wanted for lang in found) / max(len(found), 1)


def score_zero_shot(run: Path, multi: Config, data: Path) -> dict[str, dict[str, Any]]:
    """BLEU and off-target rate of each zero-shot direction on the test set."""
    languages = run_languages(multi)
    out = {}
    for src, tgt in zero_shot(multi):
        pairs = list(open_corpus(str(data / TEST_PREFIX), src, tgt, split="test").pairs())
        sources, refs = [s for s, _ in pairs], [t for _, t in pairs]
        hyps, _, _ = model_translations(run, sources, "auto", "auto", tgt_lang=tgt)
        bleu = score(hyps, refs, tokenize=bleu_tokenizer(tgt))["bleu"]
        out[f"{src}-{tgt}"] = {"bleu": bleu, "off_target": off_target(hyps, tgt, languages)}
    return out


def speed_runs(args: argparse.Namespace, multi: Config, precision: str) -> dict[str, Any]:
    """Throughput with the sampler and the tags as the only differences: fresh runs of
    --speed-minutes each, the multilingual recipe and each of its directions' bilingual one,
    all with the multilingual vocabulary's size and the multilingual run's precision. They
    validate once, at the end, on the first 20 dev lines; the numbers are run_numbers'."""
    workdir = Path(args.workdir) / "speed"
    data = args.data
    if not args.smoke:  # the smoke data is small already
        data = sliced_data(data, workdir / "data", run_languages(multi), SPEED_LINES)
    last = [
        f"train.max_minutes={args.speed_minutes}",
        "train.valid_every=1000000",
        f"train.precision={precision}",
    ]
    head, vocab = [*SPEED_SETTINGS, *args.overrides], multi.tokenizer.vocab_size
    configs = {
        "multilingual": run_config(
            MULTI_CONFIG, workdir / "multi", data, [*head, *args.multi_overrides, *last]
        )
    }
    for c in multi.data.directions():
        langs = [f"data.src_lang={c.src_lang}", f"data.tgt_lang={c.tgt_lang}"]
        settings = [*langs, *head, f"tokenizer.vocab_size={vocab}", *last]
        configs[f"bilingual {c.direction}"] = run_config(
            BILINGUAL_CONFIG, workdir / c.direction, data, settings
        )
    runs = {name: train_run(config) for name, config in configs.items()}
    return {"vocab_size": vocab, "precision": precision, "runs": runs}


def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Train every model, score every direction; the numbers of the report."""
    workdir, data, extra = Path(args.workdir), Path(args.data), args.overrides
    timed = [f"train.max_minutes={args.minutes}"] if args.minutes is not None else []
    directions = load_config(MULTI_CONFIG).data.directions()
    given = trained_bilingual(args.bilingual, [c.direction for c in directions])
    bilingual: dict[str, dict[str, Any]] = {}
    for c in directions:
        if c.direction in given:
            bilingual[c.direction] = given[c.direction]
            continue
        langs = [f"data.src_lang={c.src_lang}", f"data.tgt_lang={c.tgt_lang}"]
        config = run_config(BILINGUAL_CONFIG, workdir / c.direction, data, [*langs, *extra, *timed])
        bilingual[c.direction] = train_run(config)
    steps = 2 * round(statistics.mean(run["steps"] for run in bilingual.values()))
    counted = [f"train.max_steps={steps}", "train.max_minutes=0"]  # updates, not minutes
    multi_config = run_config(
        MULTI_CONFIG, workdir / "multi", data, [*extra, *args.multi_overrides, *counted]
    )
    multi = train_run(multi_config)
    log("scoring the test sets")
    multi["bleu"] = {d: s["bleu"] for d, s in evaluate_run(multi["run"]).items()}
    for direction, run in bilingual.items():
        run["bleu"] = evaluate_run(run["run"])[direction]["bleu"]
    zero = score_zero_shot(multi["run"], multi_config, data)
    res = {"multi": multi, "bilingual": bilingual, "zero_shot": zero}
    if args.speed_minutes:
        precision = read_metrics(multi["run"], "end")[-1]["precision"]
        res["speed"] = speed_runs(args, multi_config, precision)
    return res


def bleu_rows(res: dict[str, Any]) -> list[str]:
    """The table of test BLEU per direction, bilingual against multilingual."""
    rows = [
        "| direction | bilingual BLEU | multilingual BLEU | difference |",
        "|---|---:|---:|---:|",
    ]
    for direction, run in res["bilingual"].items():
        ours, theirs = res["multi"]["bleu"][direction].score, run["bleu"].score
        rows.append(f"| {direction} | {theirs:.2f} | {ours:.2f} | {ours - theirs:+.2f} |")
    return rows


def speed_rows(named: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """The table of training runs: steps, minutes and median target tokens/s."""
    rows = ["| model | steps | minutes | target tokens/s |", "|---|---:|---:|---:|"]
    for name, run in named:
        rows.append(f"| {name} | {run['steps']:,} | {run['minutes']:.1f} | {run['tok_s']:,.0f} |")
    return rows


def command(args: argparse.Namespace) -> str:
    """The options that shape the numbers, as they would be typed."""
    words = ["scripts/bench_multilingual.py", *(["--smoke"] if args.smoke else [])]
    words += ["--minutes", f"{args.minutes:g}"] if args.minutes is not None else []
    words += ["--set", *args.set] if args.set else []
    words += ["--multi-set", *args.multi_set] if args.multi_set else []
    words += ["--bilingual", *map(str, args.bilingual)] if args.bilingual else []
    words += ["--speed-minutes", f"{args.speed_minutes:g}"] if args.speed_minutes else []
    return shlex.join(words)


def speed_ratio(named: list[tuple[str, dict[str, Any]]]) -> float:
    """The first run's target tokens/s over the mean of the others'."""
    others = statistics.mean(run["tok_s"] for _, run in named[1:])
    return named[0][1]["tok_s"] / others if others else float("nan")


def same_vocabulary(args: argparse.Namespace, res: dict[str, Any]) -> list[str]:
    """The lines on the speed runs (--speed-minutes), none without them."""
    if "speed" not in res:
        return []
    speed = res["speed"]
    named = list(speed["runs"].items())
    return [
        "",
        f"The same comparison at the same vocabulary size ({speed['vocab_size']:,} pieces "
        f"everywhere), fresh runs of {args.speed_minutes:g} minutes each in "
        f"{speed['precision']}, one after another in this invocation, validating only at "
        "the end on 20 dev lines (--speed-minutes):",
        "",
        *speed_rows(named),
        "",
        f"At the same vocabulary size, multilingual training throughput is "
        f"{speed_ratio(named):.2f} x the bilingual runs' mean.",
    ]


def report(args: argparse.Namespace, res: dict[str, Any]) -> str:
    """The Markdown section: machine, BLEU per direction, zero-shot, training speed."""
    machine = f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()})"
    signature: MetricScore = next(iter(res["multi"]["bleu"].values()))
    named = [("multilingual", res["multi"])]
    named += [(f"bilingual {d}", run) for d, run in res["bilingual"].items()]
    lines = [
        SECTION,
        "",
        f"`{command(args)}` on {machine}, "
        f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}"
        + (" (smoke run: the numbers mean nothing)." if args.smoke else ".")
        + f" Test set {TEST_PREFIX}; BLEU signature `{signature.signature}`.",
        "",
        *bleu_rows(res),
        "",
        "Zero-shot directions (never trained): BLEU, and the share of outputs langid finds in "
        "another of the run's languages than the one asked for.",
        "",
        "| direction | BLEU | off-target |",
        "|---|---:|---:|",
        *(
            f"| {d} | {z['bleu'].score:.2f} | {z['off_target']:.1f}% |"
            for d, z in res["zero_shot"].items()
        ),
        "",
        *speed_rows(named),
        "",
        f"Multilingual training throughput is {speed_ratio(named):.2f} x the bilingual runs' mean.",
        *same_vocabulary(args, res),
    ]
    return "\n".join(wrap(line) for line in lines) + "\n"


def score_report(args: argparse.Namespace) -> str:
    """--score RUN: a finished multilingual run's test BLEU per direction and its zero-shot
    directions, without training anything (e.g. a run trained with other settings)."""
    run: Path = args.score
    bleu = {d: s["bleu"] for d, s in evaluate_run(run).items()}
    zero = score_zero_shot(run, load_run_config(run), Path(args.data))
    ends = read_metrics(run, "end")
    updates = ends[-1]["step"] if ends else 0
    signature = next(iter(bleu.values())).signature
    lines = [
        f"`scripts/bench_multilingual.py --score {run}` ({updates:,} updates) on "
        f"{cpu_model()}, {time.strftime('%Y-%m-%d')}. Test set {TEST_PREFIX}; BLEU signature "
        f"`{signature}`. Off-target: the share of outputs langid finds in another of the "
        "run's languages than the one asked for.",
        "",
        "| direction | BLEU | off-target |",
        "|---|---:|---:|",
        *(f"| {d} | {b.score:.2f} | |" for d, b in bleu.items()),
        *(
            f"| {d} (zero-shot) | {z['bleu'].score:.2f} | {z['off_target']:.1f}% |"
            for d, z in zero.items()
        ),
    ]
    return "\n".join(wrap(line) for line in lines) + "\n"


def common_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """The options every Multi30k multilingual benchmark takes; runs go to runs/NAME[-smoke]."""
    parser.add_argument("--data", help="Multi30k directory with de, en and fr files (default "
                        "data/multi30k or ../shared/data/multi30k)")  # fmt: skip
    parser.add_argument("--workdir", help=f"runs (default runs/{name}[-smoke])")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    parser.add_argument("--smoke", action="store_true", help="tiny models, a slice of the data")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for every run")  # fmt: skip
    parser.add_argument("--write", help="Markdown file whose section to replace")
    parser.set_defaults(name=name)


def set_up(args: argparse.Namespace) -> None:
    """Act on the common options: the workdir made, threads set, args.data the data to train
    on (with --smoke, a slice of it in the workdir) and args.overrides every run's settings."""
    args.workdir = args.workdir or f"runs/{args.name}{'-smoke' if args.smoke else ''}"
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = find_data(args.data)
    languages = run_languages(load_config(MULTI_CONFIG))
    if args.smoke:
        data = sliced_data(data, Path(args.workdir) / "smoke-data", languages, SMOKE_LINES)
    args.data = data
    args.overrides = [*(SMOKE_OVERRIDES if args.smoke else []), *args.set]


def main() -> None:
    """Parse arguments, train and score every model, print (and maybe write) the section."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, "bench-multilingual")
    parser.add_argument("--minutes", type=float, help="each bilingual run's train.max_minutes "
                        "(default: the recipe's)")  # fmt: skip
    parser.add_argument("--multi-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for the multilingual run only, after --set")  # fmt: skip
    parser.add_argument("--bilingual", nargs="*", default=[], type=Path, metavar="RUN",
                        help="bilingual runs trained before (e.g. by scripts/multi30k.sh, on "
                        "this machine), used instead of training their directions")  # fmt: skip
    parser.add_argument("--speed-minutes", type=float, default=0.0, help="also time fresh runs "
                        "of this many minutes at the same vocabulary size (0: none)")  # fmt: skip
    parser.add_argument("--score", type=Path, metavar="RUN", help="only score this finished "
                        "multilingual run: test BLEU per direction, zero-shot directions (prints "
                        "a table)")  # fmt: skip
    args = parser.parse_args()
    if args.score and args.write:
        parser.error("--score prints its table; --write is for the whole benchmark's section")
    set_up(args)
    if args.score:
        print(score_report(args), end="")
        return
    args.multi_overrides = args.multi_set
    section = report(args, bench(args))
    publish(section, args.write, SECTION)


if __name__ == "__main__":
    main()
