"""A run's report.md: config, model, data, training, dev curve, test scores and the curves PNG.

Training writes `data.json` (corpus statistics) at its start and an `end` metrics record at
its end; `write_report` reads those, metrics.jsonl and the checkpoints, so `mt report RUN`
can (re)build the report of any run, finished or not.
"""

from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path
from typing import Any

from mt.bleu import bleu_tokenizer
from mt.config import CONFIG_FILE, Config
from mt.data import DATA_FILE
from mt.device import describe_precision
from mt.errors import MtError
from mt.evaluate import MetricScore, score, signatures, translate_test_sets
from mt.files import atomic_write_bytes
from mt.metrics import may_be_best, read_metrics, record_directions, selected_bleu
from mt.model import Transformer, count_parameters
from mt.plot import plot_curves
from mt.rundir import check_writable, load_run_config, model_checkpoint, read_json_object

log = logging.getLogger("mt")

REPORT_FILE = "report.md"
CURVES_FILE = "curves.png"


Scores = dict[str, MetricScore]  # by metric: bleu, bleu_lc (lowercased), chrf, ter


def test_scores(
    run_dir: Path, device: str = "auto", precision: str = "auto"
) -> tuple[str, dict[str, Scores]]:
    """Translate every test direction with the run's model; scores by direction.

    The hypotheses are written next to the report as test.hyp.<tgt_lang> for a run of one
    direction, test.hyp.<direction> (e.g. test.hyp.de-en) for a run of several, even where only
    one of them has a test set.
    """
    checkpoint = model_checkpoint(run_dir).weights  # the run's model, as `mt translate` uses
    # Beam search (or greedy), as validation, even where the run samples (translate_test_sets).
    translations = translate_test_sets(checkpoint, device, precision)
    targets = {c.direction: c.tgt_lang for c in load_run_config(run_dir).data.directions()}
    out = {}
    for direction, (hyps, refs, tgt_lang) in translations.items():
        suffix = direction if len(targets) > 1 else targets[direction]
        text = "".join(h + "\n" for h in hyps)
        atomic_write_bytes(run_dir / f"test.hyp.{suffix}", text.encode("utf-8"))
        cased = score(hyps, refs, tokenize=bleu_tokenizer(tgt_lang))
        lowercased = score(hyps, refs, True, bleu_tokenizer(tgt_lang))["bleu"]
        out[direction] = {"bleu": cased["bleu"], "bleu_lc": lowercased, **cased}
    return checkpoint.name, out


def _duration(seconds: float) -> str:
    """E.g. 42 s, 12.5 min, 3.25 h."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    return f"{minutes:.1f} min" if minutes < 120 else f"{minutes / 60:.2f} h"


def _model_section(config: Config, run_dir: Path) -> list[str]:
    data = read_json_object(run_dir / DATA_FILE)
    m, tc = config.model, config.train
    dropout = f"dropout {m.dropout}"
    if tc.initial_dropout_steps:
        dropout += f" ({tc.initial_dropout} for the first {tc.initial_dropout_steps:,} updates)"
    lines = [
        "## Model",
        "",
        f"{m.enc_layers}+{m.dec_layers} layers, dim {m.dim}, {m.heads} heads, FFN {m.ffn_dim}, "
        f"{'pre' if m.prenorm else 'post'}-norm, {m.activation}, {dropout}, "
        f"{'shared' if m.share_embeddings else 'separate'} embeddings.",
    ]
    if data:
        model = Transformer(m, data["src_vocab"], data["tgt_vocab"])
        lines[-1] += f" **{count_parameters(model):,} parameters** "
        lines[-1] += f"(vocabulary {data['src_vocab']:,} / {data['tgt_vocab']:,})."
    return [*lines, ""]


def _data_section(run_dir: Path, config: Config) -> list[str]:
    data = read_json_object(run_dir / DATA_FILE)
    if not data:
        return []
    directions = {c.direction: c for c in config.data.directions()}
    # data.json of runs from before per-direction statistics: one direction's, at the top level.
    per = data.get("directions") or {next(iter(directions)): data}
    lines = ["## Data", ""]
    if len(per) > 1:
        lines.append(f"- train, {len(per)} directions: {_kept(data)}")
    for name, stats in per.items():
        label, corpus = (f"{name} " if len(per) > 1 else ""), directions[name]
        lines.append(f"- {label}train `{corpus.train}`: {_kept(stats)}")
        if "valid_unk_rate" in stats:
            src, tgt = stats["valid_unk_rate"]
            lines.append(
                f"- {label}dev `{corpus.valid}`: unk rate {src:.3%} source, {tgt:.3%} target"
            )
    return [*lines, ""]


def _kept(stats: dict[str, Any]) -> str:
    """E.g. `kept 28,950 of 29,000 pairs (dropped ...); 377,534 source and ... tokens`."""
    t = stats["train"]
    return (
        f"kept {t['kept']:,} of {t['total']:,} pairs (dropped {t['empty']:,} empty, "
        f"{t['too_long']:,} over {t['max_len']} tokens, {t['bad_ratio']:,} with a length ratio "
        f"over {t['max_ratio']}); {stats['train_src_tokens']:,} source and "
        f"{stats['train_tgt_tokens']:,} target subword tokens"
    )


def _training_section(run_dir: Path, select_direction: str) -> list[str]:
    train = read_metrics(run_dir, "train")
    valid = read_metrics(run_dir, "valid")
    end = read_metrics(run_dir, "end")
    lines = ["## Training", ""]
    if end:
        e = end[-1]
        since = e.get("clock_step", 0)  # a run started from another run's checkpoint
        own = f"; the last {e['step'] - since:,} in this run, from another run's step {since:,}"
        own = own if since else ""
        lines.append(
            f"- {e['step']:,} steps ({e['epoch']} epochs{own}) in "
            f"{_duration(e['train_seconds'])}, validation included; {e['precision']} on "
            f"{e['device']}"
        )
    for record in read_metrics(run_dir, "precision"):  # one per start: a resume may differ
        lines.append(f"- precision from step {record['step']:,}: {describe_precision(record)}")
    for record in read_metrics(run_dir, "cooldown"):
        lines.append(
            f"- lr cool-down after step {record['step']:,}: from {record['lr']:.2e} to 0 over "
            f"{record['steps']:,} updates"
        )
    if train:
        speed = statistics.median(r["tgt_tok_s"] for r in train)
        lines.append(f"- median throughput {speed:,.0f} target tokens/s")
    if valid:
        lines += _dev_lines(valid, select_direction)
    return [*lines, ""]


def _dev_lines(valid: list[dict[str, Any]], select_direction: str) -> list[str]:
    """The best dev BLEU, and the dev scores at each validation (BLEU of each direction too)."""
    eligible = [r for r in valid if may_be_best(r)]  # as training chooses its best
    best = max(eligible or valid, key=lambda r: selected_bleu(r, select_direction))
    directions = record_directions(valid[-1])
    mean = f" (mean of the {len(directions)} directions)" if directions else ""
    head = f"- best dev BLEU{mean} **{best['bleu']:.2f}** at step {best['step']:,}"
    if directions and select_direction:
        chosen = selected_bleu(best, select_direction)
        head += f"; {select_direction}'s (data.select_direction) chose it: **{chosen:.2f}**"
    columns = ["step", "dev loss", "dev ppl", f"dev BLEU{' (mean)' if mean else ''}", *directions]
    lines = [head, "", _row(columns), _row(["---:"] * len(columns))]
    for r in valid:
        scores = [f"{r['loss']:.3f}", f"{r['ppl']:.2f}", f"{r['bleu']:.2f}"]
        bleus = [f"{r.get(f'{d}/bleu', math.nan):.2f}" for d in directions]
        lines.append(_row([f"{r['step']:,}", *scores, *bleus]))
    return lines


def _row(cells: list[str]) -> str:
    """A Markdown table row."""
    return f"| {' | '.join(cells)} |"


LABELS = {"bleu": "BLEU", "bleu_lc": "BLEU (lowercased)", "chrf": "chrF", "ter": "TER"}


def _test_section(checkpoint: str, by_direction: dict[str, Scores], config: Config) -> list[str]:
    tests = ", ".join(dict.fromkeys(f"`{c.test}`" for c in config.data.directions() if c.test))
    lines = [
        "## Test",
        "",
        f"{tests}, translated with `{checkpoint}` (beam {config.decode.beam}, "
        f"alpha {config.decode.alpha}).",
        "",
    ]
    if len(config.data.directions()) == 1:
        (scores,) = by_direction.values()
        lines += ["| metric | score | sacreBLEU signature |", "|---|---:|---|"]
        for key, s in scores.items():
            signature = s.signature.replace("|", "\\|")  # a bare | would end the table cell
            lines.append(_row([LABELS[key], f"{s.score:.2f}", f"`{signature}`"]))
        return [*lines, ""]
    first = next(iter(by_direction.values()))
    lines += [
        _row(["direction", *(LABELS[k] for k in first)]),
        _row(["---", *["---:"] * len(first)]),
    ]
    for direction, scores in by_direction.items():
        lines.append(_row([direction, *(f"{s.score:.2f}" for s in scores.values())]))
    lines += ["", "sacreBLEU signatures:", ""]
    lines += [
        f"- {LABELS[key]}{of}: `{signature}`" for key, of, signature in signatures(by_direction)
    ]
    return [*lines, ""]


def _scores_test(config: Config, test: bool) -> bool:
    """Whether a report translates a test set: asked to (`test`), and the run has one."""
    return test and any(c.test for c in config.data.directions())


def check_runtime_used(run_dir: Path, test: bool, device: str, precision: str) -> None:
    """MtError where `mt report` is given --device or --precision but translates no test set.

    For the command's options only: the report that training writes at its end is given the
    run's own device, which a run without a test set simply does not use.
    """
    options = (("--device", device), ("--precision", precision))
    given = [option for option, value in options if value != "auto"]
    if given and not _scores_test(load_run_config(Path(run_dir)), test):
        why = "--no-test" if not test else "the run has no test set"
        raise MtError(f"{given[0]} sets how the test set is translated, and none is ({why})")


def write_report(
    run_dir: Path, test: bool = True, device: str = "auto", precision: str = "auto"
) -> Path:
    """Write RUN/report.md and RUN/curves.png; with `test`, score the test set if it has one."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    scored = _scores_test(config, test)
    check_writable(run_dir, "RUN")  # before translating the test set, not after
    lines = [f"# Run report: `{run_dir}`", ""]
    lines += _model_section(config, run_dir)
    lines += _data_section(run_dir, config)
    lines += _training_section(run_dir, config.data.select_direction)
    if scored:
        checkpoint, scores = test_scores(run_dir, device, precision)
        lines += _test_section(checkpoint, scores, config)
    if read_metrics(run_dir):
        plot_curves([run_dir], run_dir / CURVES_FILE)
        lines += ["## Curves", "", f"![learning curves]({CURVES_FILE})", ""]
    config_text = (run_dir / CONFIG_FILE).read_text(encoding="utf-8").rstrip()
    lines += ["## Config", "", "```yaml", config_text, "```", ""]
    path = run_dir / REPORT_FILE
    atomic_write_bytes(path, "\n".join(lines).encode("utf-8"))
    return path
