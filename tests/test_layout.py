"""The package's layering: data flows one way, and the imports (read from the AST) say so.

Each top-level module of mt/ (a subpackage counts as one) belongs to a stage; a module imports
only from its own stage or earlier ones, never from a later one, even inside a function or under
TYPE_CHECKING. No import cycles between modules, and nothing but __main__ imports the CLI. The
README's tour table names each module once, in the order of the stages.
"""

from __future__ import annotations

import ast
import graphlib
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mt"

# In data-flow order, as the README's tour lists them: what every stage uses first, the command
# line last. Training depends on what it trains with, never on what runs after it.
STAGES: list[tuple[str, set[str]]] = [
    ("foundations", {"errors", "files", "vocab", "loss", "bleu", "optim", "lock"}),
    (
        "settings, the machine and the run's records",
        {"config", "device", "distributed", "checkpoint", "metrics", "plot"},
    ),
    ("text", {"fetch", "corpora", "tokenizer"}),
    ("data", {"data", "batching"}),
    ("model", {"model", "search", "quantize", "packing"}),
    ("run directory", {"rundir"}),
    ("training", {"train"}),
    ("translation", {"translate", "score"}),
    (
        "after training",
        {"average", "evaluate", "report", "finish", "alignment", "export", "serve"},
    ),
    ("command line", {"cli", "__main__"}),
]


@dataclass(frozen=True)
class Import:
    """One import statement's target inside the package."""

    path: str  # e.g. mt/model.py
    line: int
    importer: str  # dotted module, e.g. mt.serve.api
    imported: str  # dotted module, e.g. mt.train


def module_name(path: Path, root: Path) -> str:
    """The dotted module of a file under `root` (a package's __init__.py is the package)."""
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str, root: Path) -> bool:
    """Whether `name` (dotted, under the package) is a module or subpackage of `root`."""
    relative = Path(*name.split(".")[1:])
    return (root / relative).with_suffix(".py").is_file() or (root / relative).is_dir()


def resolve(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool) -> list[str]:
    """The absolute names an import statement asks for (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = importer.split(".")
        package = package if is_package else package[:-1]
        anchor = package[: len(package) - node.level + 1]
        base = ".".join([*anchor, base] if base else anchor)
    return [f"{base}.{alias.name}" for alias in node.names] + [base]


def package_imports(root: Path) -> list[Import]:
    """Every import of a module of the package by a file of the package, wherever it stands."""
    found = []
    for path in sorted(root.rglob("*.py")):
        importer = module_name(path, root)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            names = resolve(node, importer, path.name == "__init__.py")
            if isinstance(node, ast.ImportFrom):
                # `from mt import search` imports mt.search; `from mt.model import X`, mt.model.
                names = [n for n in names[:-1] if is_module(n, root)] or names[-1:]
            for name in names:
                if name.split(".")[0] == root.name and name != root.name:
                    rel = path.relative_to(root.parent).as_posix()
                    found.append(Import(rel, node.lineno, importer, name))
    return found


def top(name: str) -> str:
    """The top-level module of a dotted name: mt.serve.api -> serve."""
    return name.split(".")[1]


def top_modules(root: Path) -> set[str]:
    """The package's top-level modules and subpackages: model, serve, __main__, ..."""
    return {top(module_name(p, root)) for p in root.rglob("*.py") if p != root / "__init__.py"}


def stage_of(module: str, stages: list[tuple[str, set[str]]]) -> int | None:
    """The index of the stage that holds `module` (a top-level name), or None."""
    return next((i for i, (_, members) in enumerate(stages) if module in members), None)


def layering_errors(root: Path, stages: list[tuple[str, set[str]]]) -> list[str]:
    """One message per import that runs from an earlier stage to a later one, or to the CLI."""
    staged = set().union(*(members for _, members in stages))
    errors = [
        f"{root.name}/{module} is in no stage: add it to STAGES where its imports put it"
        for module in sorted(top_modules(root) - staged)
    ]
    for imp in package_imports(root):
        src, dst = top(imp.importer), top(imp.imported)
        if dst == "cli" and src not in {"cli", "__main__"}:
            errors.append(f"{imp.path}:{imp.line} imports {imp.imported}: only __main__ may")
            continue
        mine, theirs = stage_of(src, stages), stage_of(dst, stages)
        if mine is not None and theirs is not None and theirs > mine:
            errors.append(
                f"{imp.path}:{imp.line} imports {imp.imported}: {src} ({stages[mine][0]}) "
                f"may not import from a later stage, {dst} ({stages[theirs][0]})"
            )
    return errors


def import_cycles(root: Path) -> list[str]:
    """The first import cycle between modules, as 'a -> b -> a', or nothing."""
    graph: dict[str, set[str]] = {}
    for imp in package_imports(root):
        if imp.imported != imp.importer:
            graph.setdefault(imp.importer, set()).add(imp.imported)
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        return ["import cycle: " + " -> ".join(reversed(exc.args[1]))]
    return []


def test_no_import_runs_to_a_later_stage() -> None:
    errors = layering_errors(PACKAGE, STAGES)
    assert not errors, "\n".join(errors)


def test_no_import_cycles() -> None:
    cycles = import_cycles(PACKAGE)
    assert not cycles, "\n".join(cycles)


def test_training_imports_nothing_that_runs_after_it() -> None:
    # Averaging and the report run after training: the command calls them (mt.finish).
    imported = {top(i.imported) for i in package_imports(PACKAGE) if i.importer == "mt.train"}
    assert imported & {"report", "evaluate", "translate", "average", "finish"} == set()


def write_package(tmp_path: Path, files: dict[str, str]) -> Path:
    """A throwaway package `mt` under tmp_path with these files (relative path -> source)."""
    root = tmp_path / "mt"
    for name, source in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(source, encoding="utf-8")
    return root


TOY_STAGES = [("low", {"errors", "model"}), ("high", {"train", "serve"}), ("cli", {"cli"})]


def test_an_import_from_a_later_stage_is_named_with_its_line(tmp_path: Path) -> None:
    root = write_package(
        tmp_path,
        {
            "__init__.py": "",
            "errors.py": "",
            "model.py": "import torch\n\n\ndef f():\n    from mt.train import loop\n",
            "train.py": "from mt import model\nfrom mt.errors import MtError\n",
            "serve/__init__.py": "",
            "serve/api.py": "from ..model import Transformer\nfrom . import worker\n",
            "serve/worker.py": "",
            "cli.py": "import mt.serve.api\n",
        },
    )
    assert {(i.importer, i.imported) for i in package_imports(root)} == {
        ("mt.model", "mt.train"),
        ("mt.train", "mt.model"),
        ("mt.train", "mt.errors"),
        ("mt.serve.api", "mt.model"),  # relative imports resolved
        ("mt.serve.api", "mt.serve.worker"),
        ("mt.cli", "mt.serve.api"),
    }
    assert layering_errors(root, TOY_STAGES) == [
        "mt/model.py:5 imports mt.train: model (low) may not import from a later stage, "
        "train (high)"
    ]


def test_a_module_in_no_stage_and_an_import_of_the_cli_are_named(tmp_path: Path) -> None:
    files = {"__init__.py": "", "errors.py": "", "cli.py": "", "extra.py": "from mt import cli\n"}
    root = write_package(tmp_path, files)
    assert layering_errors(root, TOY_STAGES) == [
        "mt/extra is in no stage: add it to STAGES where its imports put it",
        "mt/extra.py:1 imports mt.cli: only __main__ may",
    ]


def test_an_import_cycle_is_named(tmp_path: Path) -> None:
    files = {
        "__init__.py": "",
        "model.py": "from mt.errors import MtError\n",
        "errors.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import mt.model\n",
    }
    cycle = import_cycles(write_package(tmp_path, files))
    assert cycle in (
        ["import cycle: mt.errors -> mt.model -> mt.errors"],
        ["import cycle: mt.model -> mt.errors -> mt.model"],
    )


# --- the README's tour ---------------------------------------------------------------------

TOUR_ROW = re.compile(r"^\| (`[^|]+`) \| [^|]+ \|$")


def tour_modules(readme: str) -> list[str]:
    """The modules named in the first column of the README's 'Tour of the code' table."""
    section = readme.split("## Tour of the code", 1)[1].split("\n## ", 1)[0]
    names = []
    for line in section.splitlines():
        match = TOUR_ROW.match(line)
        if match:
            cells = re.findall(r"`([^`]+)`", match.group(1))
            names += [cell.removesuffix(".py").removesuffix("/") for cell in cells]
    return names


def test_the_readme_tour_names_each_module_once_in_stage_order() -> None:
    names = tour_modules((ROOT / "README.md").read_text(encoding="utf-8"))
    assert sorted(names) == sorted(top_modules(PACKAGE) - {"__main__"})
    stages = [stage_of(name, STAGES) for name in names]
    assert stages == sorted(stages), "the tour's rows must follow STAGES' order"


@pytest.mark.parametrize("line", ["| `model.py` | the Transformer |", "| `serve/` | `mt serve` |"])
def test_tour_rows_are_read(line: str) -> None:
    readme = f"# x\n\n## Tour of the code\n\n| module | job |\n|---|---|\n{line}\n\n## Next\n"
    assert tour_modules(readme) == [line.split("`")[1].removesuffix(".py").removesuffix("/")]
