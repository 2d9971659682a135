"""Reranking n-best lists with a reverse model (`mt score`): dev and test BLEU by its weight.

    .venv/bin/python scripts/bench_rerank.py runs/multi30k-de-en runs/multi30k-en-de
    .venv/bin/python scripts/bench_rerank.py FORWARD REVERSE --write docs/benchmarks.md

The forward run translates its dev set (data.valid) and test set (data.test) with beam search,
--nbest K outputs per sentence; the reverse run (the opposite direction) scores each output
as a source for the original sentence, as `mt score --length-penalty average` does: the mean
log-probability per piece of the original given the output. A candidate's score is its forward
score (as `mt translate --nbest` prints it) plus WEIGHT x its reverse score; the table gives the
BLEU of each sentence's top candidate per weight (0: the forward model alone), the weight
chosen on dev, and the oracle (each sentence's candidate of highest sentence BLEU) as a ceiling.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "scripts"):  # run as a script from anywhere; bench.py sits beside it
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import sacrebleu  # noqa: E402
import torch  # noqa: E402
from bench import cpu_model, log, publish, wrap  # noqa: E402

from mt.evaluate import score  # noqa: E402
from mt.rundir import open_split  # noqa: E402
from mt.score import score_pairs  # noqa: E402
from mt.translate import Translator, load_translator  # noqa: E402

SECTION = "## Reranking n-best lists with a reverse model (`mt score`)"
SPLITS = {"valid": "dev", "test": "test"}
Candidates = list[list[tuple[str, float, float]]]  # per sentence: (text, forward, reverse)


def candidates(
    forward: Translator, reverse: Translator, sources: list[str], langs: tuple[str, str]
) -> Candidates:
    """Each source's n-best outputs with their forward and reverse scores.

    langs: (source, target) language, told to models of several target languages.
    """
    src_lang = langs[0] if reverse.tokenizer.tags else None
    tgt_lang = langs[1] if forward.tokenizer.tags else None
    nbest = forward.translate(sources, scores=True, tgt_lang=tgt_lang)
    flat = [(i, h) for i, hyps in enumerate(nbest) for h in hyps if h.found and h.text.strip()]
    back = [0.0] * len(flat)
    outputs, originals = [h.text for _, h in flat], [sources[i] for i, _ in flat]
    for indices, found, _, _ in score_pairs(reverse, outputs, originals, src_lang):
        for j, value in zip(indices, found, strict=True):  # unscored (too long): never preferred
            back[j] = value if value is not None and math.isfinite(value) else -math.inf
    out: Candidates = [[] for _ in sources]
    for (i, h), value in zip(flat, back, strict=True):
        out[i].append((h.text, h.score, value))
    return out


def top(cands: Candidates, weight: float) -> list[str]:
    """Each sentence's best candidate by forward + weight x reverse score (empty for none);
    at weight 0, the forward model's own best."""
    return [
        max(c, key=lambda x: x[1] + weight * x[2] if weight else x[1])[0] if c else ""
        for c in cands
    ]


def oracle(cands: Candidates, refs: list[str]) -> list[str]:
    """Each sentence's candidate of highest sentence BLEU."""
    return [
        max(c, key=lambda x: sacrebleu.sentence_bleu(x[0], [ref]).score)[0] if c else ""
        for c, ref in zip(cands, refs, strict=True)
    ]


def bench(
    forward_run: Path, reverse_run: Path, nbest: int, weights: list[float]
) -> dict[str, dict[str, float]]:
    """{split: {weight as text, or "oracle": BLEU}} for the forward run's dev and test sets."""
    # fp32: outputs and scores the same on every CPU (auto may pick bf16 by timing).
    config, forward, _ = load_translator([forward_run], "cpu", "fp32", nbest=nbest)
    _, reverse, _ = load_translator([reverse_run], "cpu", "fp32", length_penalty="average")
    langs = (config.data.src_lang, config.data.tgt_lang)
    res: dict[str, dict[str, float]] = {}
    for split in SPLITS:
        log(f"{forward_run}: {split}")
        pairs = list(open_split(config, split).pairs())
        sources, refs = [s for s, _ in pairs], [t for _, t in pairs]
        cands = candidates(forward, reverse, sources, langs)
        res[split] = {f"{w:g}": score(top(cands, w), refs)["bleu"].score for w in weights}
        res[split]["oracle"] = score(oracle(cands, refs), refs)["bleu"].score
    return res


def report(args: argparse.Namespace, res: dict[str, dict[str, float]]) -> str:
    """The Markdown section: BLEU per weight on dev and test, the dev choice marked."""
    weights = [w for w in res["valid"] if w != "oracle"]
    chosen = max(weights, key=lambda w: res["valid"][w])
    lines = [
        SECTION,
        "",
        f"`scripts/bench_rerank.py {args.forward} {args.reverse} --nbest {args.nbest} "
        f"--weights {args.weights}` on {cpu_model()}, {torch.get_num_threads()} threads, "
        f"{time.strftime('%Y-%m-%d')}, fp32. The forward run's {args.nbest} best outputs (beam "
        "search as its config says), reranked by forward score + weight x the reverse run's "
        "mean log-probability per piece of the source given the output (`mt score "
        "--length-penalty average`); sacreBLEU, cased. Weight 0 is the forward model alone; "
        "(chosen) marks the best weight on dev; the oracle picks each sentence's candidate of "
        "highest sentence BLEU.",
        "",
        "| weight | dev BLEU | test BLEU |",
        "|---|---:|---:|",
    ]
    for w in [*weights, "oracle"]:
        mark = " (chosen)" * (w == chosen)
        lines.append(f"| {w}{mark} | {res['valid'][w]:.2f} | {res['test'][w]:.2f} |")
    gain = res["test"][chosen] - res["test"][weights[0]]
    lines += ["", f"Test BLEU at the weight chosen on dev: {gain:+.2f} over weight {weights[0]}."]
    return "\n".join(wrap(line) for line in lines) + "\n"


def main() -> None:
    """Parse arguments, rerank dev and test, print (and maybe write) the section."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("forward", type=Path, help="the run that translates")
    parser.add_argument("reverse", type=Path, help="a run of the opposite direction")
    parser.add_argument("--nbest", type=int, default=5, help="candidates per sentence")
    parser.add_argument("--weights", default="0,0.25,0.5,1,2", help="reverse weights, first 0")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    parser.add_argument("--write", help="Markdown file whose section to replace")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    weights = [float(w) for w in args.weights.split(",")]
    publish(
        report(args, bench(args.forward, args.reverse, args.nbest, weights)), args.write, SECTION
    )


if __name__ == "__main__":
    main()
