"""Corpus files for tests: the Multi30k file names, small synthetic parallel corpora."""

from __future__ import annotations

import random
from pathlib import Path

from mt.config import Config, load_config
from mt.corpora import Corpus, open_corpus
from mt.fetch import MULTI30K_SPLITS

ROOT = Path(__file__).resolve().parents[2]
MULTI_DIRECTIONS = ("de-en", "en-de", "fr-en", "en-fr")  # those of multi_config
# The gzipped de/en files of every Multi30k split, named as `mt data fetch multi30k` names them.
MULTI30K_DE_EN = [f"{split}.{lang}.gz" for split in MULTI30K_SPLITS for lang in ("de", "en")]
SYLLABLES = [
    "ka",
    "to",
    "ri",
    "men",
    "sa",
    "lu",
    "bre",
    "dor",
    "fin",
    "ga",
    "hei",
    "ost",
    "pra",
    "ul",
    "wen",
    "zi",
]


def _words(rng: random.Random, n: int) -> list[str]:
    """`n` pseudo-words of one to three syllables."""
    return ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 3))) for _ in range(n)]


def synthetic_pairs(n: int = 300, seed: int = 0) -> tuple[list[str], list[str]]:
    """`n` random word-salad sentence pairs of 2 to 9 words from 80-word vocabularies."""
    rng = random.Random(seed)
    # German-like words get an umlaut so that the two sides have different alphabets.
    de, en = [w + "ä" for w in _words(rng, 80)], _words(rng, 80)
    src = [" ".join(rng.choices(de, k=rng.randint(2, 9))) for _ in range(n)]
    tgt = [" ".join(rng.choices(en, k=rng.randint(2, 9))) for _ in range(n)]
    return src, tgt


def write_corpus(prefix: Path, src: list[str], tgt: list[str]) -> Corpus:
    """Write `prefix.de` / `prefix.en` and open them as a corpus."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.de").write_text("".join(f"{s}\n" for s in src), encoding="utf-8")
    Path(f"{prefix}.en").write_text("".join(f"{t}\n" for t in tgt), encoding="utf-8")
    return open_corpus(str(prefix), "de", "en")


def write_multiway(directory: Path, tiny: Path) -> Path:
    """The tiny de/en corpus (train, valid) plus a made-up third language `fr`; returns directory.

    The fr side is the English side with every word reversed: line-aligned with both, unlike
    either, and learnable by a tiny model. Paths: directory/train.{de,en,fr}, valid.{de,en,fr}.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid"):
        for lang in ("de", "en"):
            text = (tiny / f"{split}.{lang}").read_text(encoding="utf-8")
            (directory / f"{split}.{lang}").write_text(text, encoding="utf-8")
        english = (tiny / f"{split}.en").read_text(encoding="utf-8").splitlines()
        french = [" ".join(word[::-1] for word in line.split()) for line in english]
        (directory / f"{split}.fr").write_text("".join(f"{s}\n" for s in french), "utf-8")
    return directory


def multi_config(multiway: Path, run_dir: Path, *overrides: str) -> Config:
    """The tiny config on four directions (MULTI_DIRECTIONS) of a write_multiway corpus."""
    corpora = ", ".join(
        f"{{src_lang: {d.split('-')[0]}, tgt_lang: {d.split('-')[1]}}}" for d in MULTI_DIRECTIONS
    )
    return load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            f"run_dir={run_dir}",
            f"data.cache_dir={run_dir.parent / 'cache'}",
            f"data.train={multiway / 'train'}",
            f"data.valid={multiway / 'valid'}",
            f"data.test={multiway / 'valid'}",
            f"data.corpora=[{corpora}]",
            "tokenizer.vocab_size=160",
            *overrides,
        ],
    )
