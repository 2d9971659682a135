"""Write the tiny German-English corpus under tests/data/tiny (committed; a few KB).

Sentences are built from a small grammar, so a tiny model can learn the mapping in seconds:
`der hund sieht die katze .` -> `the dog sees the cat .`
"""

import argparse
import itertools
import random
from pathlib import Path

SUBJECTS = [
    ("der hund", "the dog"),
    ("die katze", "the cat"),
    ("ein mann", "a man"),
    ("eine frau", "a woman"),
    ("das kind", "the child"),
    ("der vogel", "the bird"),
]
VERBS = [
    ("sieht", "sees"),
    ("hört", "hears"),
    ("mag", "likes"),
    ("sucht", "looks for"),
    ("findet", "finds"),
]
OBJECTS = [
    ("den ball", "the ball"),
    ("das haus", "the house"),
    ("einen baum", "a tree"),
    ("die straße", "the street"),
    ("ein auto", "a car"),
    ("den see", "the lake"),
]
PLACES = [("", ""), (" im park", " in the park"), (" am morgen", " in the morning")]


def main() -> None:
    """Write train (most pairs) and valid (held-out pairs) files."""
    pairs = [
        (f"{s[0]} {v[0]} {o[0]}{p[0]} .", f"{s[1]} {v[1]} {o[1]}{p[1]} .")
        for s, v, o, p in itertools.product(SUBJECTS, VERBS, OBJECTS, PLACES)
    ]
    random.Random(1).shuffle(pairs)
    out = Path(__file__).resolve().parents[1] / "tests" / "data" / "tiny"
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", pairs[40:]), ("valid", pairs[:40])):
        for side, lang in ((0, "de"), (1, "en")):
            text = "".join(pair[side][0].upper() + pair[side][1:] + "\n" for pair in part)
            (out / f"{name}.{lang}").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help, no options
    main()
