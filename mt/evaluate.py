"""`mt evaluate`: BLEU, chrF and TER (sacreBLEU) of a file, or of a model's translations."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from sacrebleu.metrics import BLEU, CHRF, TER

from mt.bleu import DEFAULT_TOKENIZER, bleu_tokenizer, missing_extra
from mt.corpora import check_stdin, input_name, read_lines
from mt.errors import MtError
from mt.rundir import open_directions, open_split
from mt.translate import (
    Translator,
    check_decode_options,
    check_found,
    check_target,
    count_missing,
    load_translator,
)


@dataclass(frozen=True)
class MetricScore:
    """One corpus-level score and the sacreBLEU signature that makes it reproducible."""

    name: str  # sacreBLEU's name, e.g. "chrF2"
    score: float
    signature: str
    line: str  # sacreBLEU's own one-line rendering, e.g. "BLEU = 35.12 66.7/40.0/... (BP = ...)"


def check_tokenize(tokenize: str | None) -> None:
    """MtError unless `tokenize` (None: by language) is a BLEU tokenizer sacreBLEU has here."""
    if tokenize is None:
        return
    if tokenize not in BLEU.TOKENIZERS:
        known = ", ".join(BLEU.TOKENIZERS)
        raise MtError(f"--tokenize {tokenize}: sacreBLEU's tokenizers are {known}")
    if (reason := missing_extra(tokenize)) is not None:
        raise MtError(f"--tokenize {tokenize}: {reason}")


def score(
    hyps: list[str], refs: list[str], lowercase: bool = False, tokenize: str = DEFAULT_TOKENIZER
) -> dict[str, MetricScore]:
    """BLEU (optionally lowercased, with sacreBLEU's tokenizer `tokenize`), chrF and TER of
    hypotheses against one reference each."""
    bleu = BLEU(lowercase=lowercase, tokenize=tokenize)
    metrics = {"bleu": bleu, "chrf": CHRF(), "ter": TER()}
    out = {}
    for key, metric in metrics.items():
        result = metric.corpus_score(hyps, [refs])
        signature = metric.get_signature().format()
        out[key] = MetricScore(result.name, result.score, signature, result.format(width=2))
    return out


def format_text(scores: dict[str, MetricScore]) -> str:
    """One line per metric: the score as sacreBLEU prints it, then its signature."""
    return "\n".join(f"{s.line} | {s.signature}" for s in scores.values())


def format_json(scores: dict[str, MetricScore]) -> str:
    """{"bleu": {"name", "score", "signature"}, "chrf": ..., "ter": ...} as indented JSON."""
    return json.dumps(_tree(scores), indent=2, ensure_ascii=False)


def _tree(scores: dict[str, MetricScore]) -> dict[str, dict[str, Any]]:
    """Each metric's name, score and signature, as JSON wants them."""
    return {
        key: {"name": s.name, "score": s.score, "signature": s.signature}
        for key, s in scores.items()
    }


def check_aligned(hyps: list[str], refs: list[str], hyp_name: str, ref_name: str) -> None:
    """MtError unless both sides have the same number of lines, and some."""
    if len(hyps) != len(refs):
        raise MtError(f"{hyp_name} has {len(hyps)} lines but {ref_name} has {len(refs)}")
    if not refs:
        raise MtError(f"{hyp_name} and {ref_name} have no lines to score")


def format_table(by_direction: dict[str, dict[str, MetricScore]]) -> str:
    """One row per direction (BLEU, chrF, TER), then each metric's signature."""
    first = next(iter(by_direction.values()))
    names = [s.name for s in first.values()]
    rows = [f"{'direction':<12}" + "".join(f"{n:>8}" for n in names)]
    for direction, scores in by_direction.items():
        rows.append(f"{direction:<12}" + "".join(f"{s.score:>8.2f}" for s in scores.values()))
    rows += [f"{first[key].name}{of}: {sig}" for key, of, sig in signatures(by_direction)]
    return "\n".join(rows)


def signatures(by_direction: dict[str, dict[str, MetricScore]]) -> list[tuple[str, str, str]]:
    """(metric key, "", signature) where every direction shares it, else one per direction,
    (key, " (direction)", signature).

    Directions differ where BLEU tokenizes by target language (zh, ja, ko), so one signature
    under a table of several would misname how the others were scored.
    """
    first = next(iter(by_direction.values()))
    found: list[tuple[str, str, str]] = []
    for key in first:
        each = {direction: scores[key].signature for direction, scores in by_direction.items()}
        if len(set(each.values())) == 1:
            found.append((key, "", first[key].signature))
        else:
            found += [(key, f" ({direction})", signature) for direction, signature in each.items()]
    return found


def format_json_records(by_direction: dict[str, dict[str, MetricScore]]) -> str:
    """A JSON list: one record per direction, {"direction", "bleu": {...}, "chrf", "ter"}."""
    records = [
        {"direction": direction, **_tree(scores)} for direction, scores in by_direction.items()
    ]
    return json.dumps(records, indent=2, ensure_ascii=False)


def format_directions(
    by_direction: dict[str, dict[str, MetricScore]], as_json: bool, named: bool = False
) -> str:
    """The scores of one direction as for a file; of several (or `named`), a table or records."""
    if len(by_direction) == 1 and not named:
        (scores,) = by_direction.values()
        return format_json(scores) if as_json else format_text(scores)
    return format_json_records(by_direction) if as_json else format_table(by_direction)


def evaluate_run(
    models: Path | Sequence[Path],
    lowercase: bool = False,
    device: str = "auto",
    precision: str = "auto",
    weights: Sequence[float] | None = None,
    quantization: str = "none",
    tgt_lang: str | None = None,
    tokenize: str | None = None,
    **overrides: Any,
) -> dict[str, dict[str, MetricScore]]:
    """Translate and score the test set of every direction of the (first model's) run.

    With `tgt_lang`, only the directions into it. BLEU tokenizes with `tokenize`, by default
    that of each direction's target language (bleu_tokenizer).
    """
    check_tokenize(tokenize)
    translations = translate_test_sets(
        models, device, precision, weights, quantization=quantization, tgt_lang=tgt_lang,
        **overrides,
    )  # fmt: skip
    return {
        direction: score(t.hyps, t.refs, lowercase, tokenize or bleu_tokenizer(t.tgt_lang))
        for direction, t in translations.items()
    }


class SetTranslations(NamedTuple):
    """A direction's test (or dev) set translated: best translations, references, language."""

    hyps: list[str]
    refs: list[str]
    tgt_lang: str


def translate_test_sets(
    models: Path | Sequence[Path],
    device: str = "auto",
    precision: str = "auto",
    weights: Sequence[float] | None = None,
    split: str = "test",
    quantization: str = "none",
    tgt_lang: str | None = None,
    **overrides: Any,
) -> dict[str, SetTranslations]:
    """Best translations and references of each direction's `split` (test or valid) set.

    With `tgt_lang`, only the directions into it.
    """
    paths = [models] if isinstance(models, Path) else list(models)
    check_decode_options(paths[0], **scored_search(overrides))  # before the model loads
    config, translator, checkpoints = load_translator(
        paths, device, precision, weights, quantization, **scored_search(overrides)
    )
    tests = open_directions(config, split)
    if not tests:
        raise MtError(
            f"{paths[0]}: the run has no {split} set (data.{split}); give --src and --ref"
        )
    if tgt_lang is not None:
        into = {d: c for d, c in tests.items() if c.tgt_lang == tgt_lang}
        if not into:
            known = ", ".join(dict.fromkeys(c.tgt_lang for c in tests.values()))
            raise MtError(f"--tgt-lang {tgt_lang}: the run's {split} sets translate into {known}")
        tests = into
    out = {}
    for direction, corpus in tests.items():
        pairs = list(corpus.pairs())
        hyps = best_translations(translator, [s for s, _ in pairs], checkpoints, corpus.tgt_lang)
        out[direction] = SetTranslations(hyps, [t for _, t in pairs], corpus.tgt_lang)
    return out


def scored_search(overrides: dict[str, Any]) -> dict[str, Any]:
    """Decoding overrides for a score: the best output only, of beam search (or greedy) even
    where the run samples (its report and validation score the same search)."""
    return {"sampling": False, **overrides, "nbest": 1}


def model_translations(
    models: Path | Sequence[Path],
    sources: list[str] | None,
    device: str,
    precision: str,
    weights: Sequence[float] | None = None,
    tgt_lang: str | None = None,
    quantization: str = "none",
    **overrides: Any,
) -> tuple[list[str], list[str] | None, str]:
    """Best translations of `sources` (None: the run's test set), the test references, and
    the language translated into.

    Several models translate as an ensemble, the first one's run giving the settings and the
    test set. The references are None unless the run's test set was translated.
    """
    paths = [models] if isinstance(models, Path) else list(models)
    check_decode_options(paths[0], **scored_search(overrides))  # before the model loads
    config, translator, checkpoints = load_translator(
        paths, device, precision, weights, quantization, **scored_search(overrides)
    )
    check_target(config, translator.tokenizer, tgt_lang)  # the references' language, for BLEU
    if sources is not None:  # their lines' own tags, if any
        check_target(config, translator.tokenizer, tgt_lang, sources, "--src")
    refs = None
    if sources is None:
        pairs = list(open_split(config, "test").pairs())
        sources, refs = [s for s, _ in pairs], [t for _, t in pairs]
    into = tgt_lang or config.data.target_languages()[0]
    return best_translations(translator, sources, checkpoints, tgt_lang), refs, into


def best_translations(
    translator: Translator, sources: list[str], checkpoints: str, tgt_lang: str | None
) -> list[str]:
    """The best translation of each source; MtError naming the checkpoints if one has none."""
    translations = translator.translate(sources, progress=sys.stderr.isatty(), tgt_lang=tgt_lang)
    # Scores of a model that cannot translate every line would be meaningless.
    check_found(checkpoints, count_missing(translations), len(translations))
    return [hyps[0].text for hyps in translations]


def evaluate(
    hyp: Path | None = None,
    ref: Path | None = None,
    src: Path | None = None,
    model: Path | Sequence[Path] | None = None,
    lowercase: bool = False,
    device: str = "auto",
    precision: str = "auto",
    weights: Sequence[float] | None = None,
    quantization: str = "none",
    tokenize: str | None = None,
    **overrides: Any,
) -> dict[str, MetricScore]:
    """Score --hyp against --ref, or --model's translations of --src (default: its test set).

    BLEU tokenizes with `tokenize`, by default 13a for files and for a model the one of the
    language it translates into (bleu_tokenizer).
    """
    check_tokenize(tokenize)
    check_stdin({"--hyp": hyp, "--ref": ref, "--src": src})
    if model is None:
        if hyp is None or ref is None:
            raise MtError("give --hyp and --ref, or --model (with --src and --ref, or neither)")
        given = [name for name, value in overrides.items() if value is not None]
        given += ["weights"] * bool(weights) + ["quantize"] * (quantization != "none")
        given += ["device"] * (device != "auto") + ["precision"] * (precision != "auto")
        if given:  # decoding options mean nothing to a file of translations
            raise MtError(f"--{given[0].replace('_', '-')} needs --model (to translate)")
        if src is not None:
            raise MtError("--src needs --model (to translate it)")
        hyps, refs = list(read_lines(hyp)), list(read_lines(ref))
        check_aligned(hyps, refs, input_name(hyp), input_name(ref))
        return score(hyps, refs, lowercase, tokenize or DEFAULT_TOKENIZER)
    if hyp is not None:
        raise MtError("give either --hyp (to score a file) or --model (to translate), not both")
    if (src is None) != (ref is None):
        raise MtError("--model needs both --src and --ref, or neither (to use the run's test set)")
    sources = refs = None
    if src is not None and ref is not None:
        sources, refs = list(read_lines(src)), list(read_lines(ref))
        # Before spending time translating.
        check_aligned(sources, refs, input_name(src), input_name(ref))
    hyps, test_refs, into = model_translations(
        model, sources, device, precision, weights, quantization=quantization, **overrides
    )
    refs = refs if refs is not None else test_refs
    assert refs is not None
    return score(hyps, refs, lowercase, tokenize or bleu_tokenizer(into))
