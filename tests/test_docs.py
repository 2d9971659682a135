"""docs/transformer.md cannot rot: its code runs, its excerpts match mt/, its numbers are asserted.

The article has two kinds of fenced code: ```python blocks run, in order, in one namespace;
```py blocks quote mt's source and must appear verbatim (after dedent) in a file under mt/.
Large numbers written in the prose (with thousands separators, e.g. 63,075,328) and numeric
shapes such as (2, 7, 16) must appear as literals in an `assert` of some ```python block.
"""

from __future__ import annotations

import ast
import re
import subprocess
import textwrap
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ARTICLE = ROOT / "docs" / "transformer.md"
FIGURES_SCRIPT = ROOT / "scripts" / "figures.sh"
FENCE = re.compile(r"^```(\S*)\s*$")
LANGUAGES = {"python", "py", "bash", "text", ""}  # any other fence is probably a typo
# 1,024 or 63,075,328, also as LaTeX writes them (63{,}075{,}328); not part of a longer number.
GROUPED_NUMBER = re.compile(r"(?<![\d.,])\d{1,3}(?:(?:,|\{,\})\d{3})+(?![\d]|\{,\})")
SHAPE = re.compile(r"\((\d+(?:, \d+)+)\)")  # (2, 7, 16)
SENTENCE = "Ein Mann mit einem orangefarbenen Hut, der etwas anstarrt."  # test_2016_flickr.de:1


@dataclass(frozen=True)
class Block:
    """A fenced code block of the article."""

    lang: str
    line: int  # 1-based line in the article of the block's first line of code
    code: str

    @property
    def name(self) -> str:
        """Where the block is, for failure messages: its line and first line of code."""
        first = next((s.strip() for s in self.code.splitlines() if s.strip()), "")
        return f"docs/transformer.md:{self.line} ({first!r})"


def parse_article(text: str) -> tuple[list[Block], list[tuple[int, str]]]:
    """The fenced blocks, and the prose as (line number, line) pairs outside any fence."""
    blocks, prose = [], []
    lang, start, body = None, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if lang is None and match:
            lang, start, body = match.group(1), number + 1, []
        elif lang is not None and line.strip() == "```":
            blocks.append(Block(lang, start, "\n".join(body) + "\n"))
            lang = None
        elif lang is not None:
            body.append(line)
        else:
            prose.append((number, line))
    assert lang is None, f"docs/transformer.md:{start - 1}: a code fence is never closed"
    return blocks, prose


BLOCKS, PROSE = parse_article(ARTICLE.read_text(encoding="utf-8"))
RUN = [b for b in BLOCKS if b.lang == "python"]
EXCERPTS = [b for b in BLOCKS if b.lang == "py"]


def asserted_literals() -> tuple[set[int], set[tuple[int, ...]]]:
    """Integer constants and tuples of integer constants inside the `assert`s of runnable blocks."""
    numbers: set[int] = set()
    tuples: set[tuple[int, ...]] = set()
    for block in RUN:
        for statement in ast.walk(ast.parse(block.code)):
            if not isinstance(statement, ast.Assert):
                continue
            for node in ast.walk(statement):
                if isinstance(node, ast.Constant) and type(node.value) is int:
                    numbers.add(node.value)
                elif isinstance(node, ast.Tuple) and all(
                    isinstance(e, ast.Constant) and type(e.value) is int for e in node.elts
                ):
                    tuples.add(tuple(e.value for e in node.elts))
    return numbers, tuples


def source_lines() -> Iterator[tuple[Path, list[str]]]:
    """Every Python file under mt/, as lines."""
    for path in sorted((ROOT / "mt").rglob("*.py")):
        yield path, path.read_text(encoding="utf-8").splitlines()


def matches_at(lines: list[str], i: int, excerpt: list[str]) -> int:
    """How many excerpt lines match lines[i:] under one common indentation of the source."""
    first = lines[i]
    indent = first[: len(first) - len(first.lstrip())]
    count = 0
    for want, have in zip(excerpt, lines[i:], strict=False):  # the file may end first
        if (have.strip() != "") if want == "" else (have != indent + want):
            break
        count += 1
    return count


def locate(excerpt: list[str]) -> str | None:
    """None if the excerpt is verbatim in a file under mt/, else where the closest match breaks."""
    best, where = 0, "no line under mt/ matches its first line"
    for path, lines in source_lines():
        for i, line in enumerate(lines):
            if line.strip() and line.strip() == excerpt[0].strip():
                n = matches_at(lines, i, excerpt)
                if n == len(excerpt):
                    return None
                if n > best:
                    at = f"{path.relative_to(ROOT)}:{i + 1 + n}"
                    best, where = n, f"closest: {at} differs from excerpt line {n + 1}"
    return where


def test_article_has_both_kinds_of_code() -> None:
    unknown = [f"{b.name}: ```{b.lang}" for b in BLOCKS if b.lang not in LANGUAGES]
    assert not unknown, f"fences must be one of {sorted(LANGUAGES)}: {unknown}"
    assert len(RUN) >= 10 and len(EXCERPTS) >= 10


def test_python_blocks_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the article reads configs/*.yaml
    namespace: dict[str, object] = {"__name__": "docs_transformer"}
    with torch.random.fork_rng():  # the article seeds torch: leave other tests' RNG alone
        torch.manual_seed(0)
        for block in RUN:
            # Blank lines in front, so that tracebacks give the article's own line numbers.
            padded = "\n" * (block.line - 1) + block.code
            try:
                exec(compile(padded, str(ARTICLE), "exec"), namespace)
            except Exception as exc:  # any failure, reported with its block
                where = traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-3)
                pytest.fail(f"{block.name} raised:\n{''.join(where)}", pytrace=False)


def test_excerpts_are_verbatim_in_mt() -> None:
    stale = []
    for block in EXCERPTS:
        where = locate(textwrap.dedent(block.code).rstrip("\n").splitlines())
        if where is not None:
            stale.append(f"{block.name} is not verbatim in mt/ ({where})")
    assert not stale, "\n".join(stale)


def test_quoted_numbers_are_asserted() -> None:
    numbers, _ = asserted_literals()
    missing = []
    for number, line in PROSE:
        for match in GROUPED_NUMBER.finditer(line):
            value = int(match.group().replace("{,}", "").replace(",", ""))
            if value not in numbers:
                missing.append(f"docs/transformer.md:{number}: {match.group()}")
    assert not missing, "numbers in the prose that no assert checks:\n" + "\n".join(missing)


def test_quoted_shapes_are_asserted() -> None:
    _, tuples = asserted_literals()
    missing = []
    for number, line in PROSE:
        for match in SHAPE.finditer(line):
            shape = tuple(int(n) for n in match.group(1).split(", "))
            if shape not in tuples:
                missing.append(f"docs/transformer.md:{number}: {match.group()}")
    assert not missing, "shapes in the prose that no assert checks:\n" + "\n".join(missing)


def test_figures_are_what_the_script_makes(tmp_path: Path) -> None:
    linked = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", ARTICLE.read_text(encoding="utf-8"))
    assert sorted(linked) == ["figures/attention.png", "figures/curves.png"]
    # A stand-in `mt` records its arguments: the script's commands, without a trained run.
    log = tmp_path / "calls"
    fake = tmp_path / "mt"
    script = f"#!/usr/bin/env bash\nprintf '[%s]' \"$@\" >> {log}\necho >> {log}\n"
    fake.write_text(script, encoding="utf-8")
    fake.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "MT": str(fake), "FIGURES": str(tmp_path / "figures")}
    run = subprocess.run(
        ["bash", str(FIGURES_SCRIPT), "RUN_DIR"], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    calls = log.read_text(encoding="utf-8").splitlines()
    out = tmp_path / "figures"
    assert calls == [  # one [argument] each
        f"[plot][RUN_DIR][--output][{out}/curves.png]",
        f"[attention][RUN_DIR][{SENTENCE}][--output][{out}/attention.png]",
    ]
