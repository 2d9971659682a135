"""The `mt` command line (Typer). The only module that imports every stage."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mt.errors import MtError

if TYPE_CHECKING:
    from mt.tokenizer import Tokenizer

app = typer.Typer(
    help="Train, run and evaluate Transformer translation models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Fetch and prepare parallel corpora.", no_args_is_help=True)
tokenizer_app = typer.Typer(
    help="Train and inspect SentencePiece tokenizers.", no_args_is_help=True
)
app.add_typer(data_app, name="data")
app.add_typer(tokenizer_app, name="tokenizer")

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="YAML config file.")]
Overrides = Annotated[
    list[str] | None,
    typer.Argument(help="Dotted overrides, e.g. model.enc_layers=3 train.max_tokens=2048."),
]


def _setup_logging() -> None:
    logging.basicConfig(
        format="%(asctime)s | %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO,
        stream=sys.stderr,
    )
    for noisy in ("datasets", "filelock", "fsspec", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command("train")
def train_command(
    config: ConfigOption,
    overrides: Overrides = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="Checkpoint to resume from (default: the run's latest, if any)."),
    ] = None,
) -> None:
    """Train a model: tokenizer (if the run has none), data, Transformer, checkpoints."""
    from mt.config import load_config
    from mt.train import train

    result = train(load_config(config, overrides or []), resume=resume)
    if result.signum is not None:
        sys.exit(128 + result.signum)  # 143 for SIGTERM, 130 for SIGINT


@data_app.command("fetch")
def data_fetch(
    name: Annotated[str, typer.Argument(help="Data set to fetch (multi30k).")],
    dest: Annotated[Path, typer.Argument(help="Directory to write the files to.")],
    langs: Annotated[str, typer.Option(help="Comma-separated languages.")] = "de,en,fr,cs",
    mirror: Annotated[
        str | None,
        typer.Option(help="Another source: a URL or a directory (default: $MT_DATA_MIRROR)."),
    ] = None,
) -> None:
    """Download a public data set, verifying checksums; files already valid are skipped."""
    from mt.fetch import fetch_multi30k

    if name != "multi30k":
        raise MtError(f"unknown data set {name!r} (available: multi30k)")
    wanted = [lang.strip() for lang in langs.split(",") if lang.strip()]
    paths = fetch_multi30k(dest, wanted, mirror=mirror, progress=sys.stderr.isatty())
    for path in paths:
        typer.echo(str(path))


@data_app.command("prepare")
def data_prepare(config: ConfigOption, overrides: Overrides = None) -> None:
    """Train the tokenizer if the run has none, encode and cache the corpora, print statistics."""
    from mt.batching import BatchSampler, padding_efficiency
    from mt.config import load_config
    from mt.run import corpus, encoded, prepare_tokenizer
    from mt.tokenizer import unk_rate

    cfg = load_config(config, overrides or [])
    tokenizer = prepare_tokenizer(cfg)
    for which in ("train", "valid", "test"):
        if not getattr(cfg.data, which):
            continue
        data = encoded(cfg, tokenizer, which)
        typer.echo(f"{which}: {data.stats.describe()}")
        typer.echo(
            f"{which}: {int(data.src_lens.sum()):,} source and {int(data.tgt_lens.sum()):,} "
            "target tokens"
        )
        if which == "train":
            sampler = BatchSampler(
                data.src_lens, data.tgt_lens, cfg.train.max_tokens, cfg.train.seed
            )
            batches = sampler.epoch_batches(1)
            src_eff, tgt_eff = padding_efficiency(batches, data.src_lens, data.tgt_lens)
            typer.echo(
                f"train: {len(batches):,} batches of <= {cfg.train.max_tokens} tokens per epoch, "
                f"{src_eff:.1%} / {tgt_eff:.1%} non-pad (source / target)"
            )
        if which == "valid":
            src_unk, tgt_unk = unk_rate(tokenizer, corpus(cfg, "valid"))
            typer.echo(f"valid: unknown pieces {src_unk:.3%} source, {tgt_unk:.3%} target")


@tokenizer_app.command("train")
def tokenizer_train(config: ConfigOption, overrides: Overrides = None) -> None:
    """Train the run's SentencePiece model(s) on the training data (if the run has none)."""
    from mt.config import load_config
    from mt.run import prepare_tokenizer

    tokenizer = prepare_tokenizer(load_config(config, overrides or []))
    for path in tokenizer.paths:
        typer.echo(str(path))


def _open_tokenizer(model: Path) -> Tokenizer:
    from mt.run import TOKENIZER_DIR
    from mt.tokenizer import load_tokenizer

    directory = model / TOKENIZER_DIR if (model / TOKENIZER_DIR).is_dir() else model
    return load_tokenizer(directory)


def _lines(path: str) -> list[str]:
    if path == "-":
        return sys.stdin.read().splitlines()
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise MtError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise MtError(f"{path}: line {line} is not valid UTF-8") from None


ModelOption = Annotated[
    Path, typer.Option("--model", "-m", help="Run directory or tokenizer directory.")
]
SideOption = Annotated[str, typer.Option(help="Which model to use: src or tgt.")]
InputArg = Annotated[str, typer.Argument(help="Input file, or - for stdin.")]


@tokenizer_app.command("encode")
def tokenizer_encode(
    model: ModelOption,
    path: InputArg = "-",
    side: SideOption = "src",
    pieces: Annotated[bool, typer.Option(help="Print pieces instead of ids.")] = False,
) -> None:
    """Encode text, one line in, one line of ids (or pieces) out."""
    tokenizer = _open_tokenizer(model)
    lines = _lines(path)
    if pieces:
        pieces_of = tokenizer.src_pieces if side == "src" else tokenizer.tgt_pieces
        for line in lines:
            typer.echo(" ".join(pieces_of(line)))
        return
    encode = tokenizer.encode_src if side == "src" else tokenizer.encode_tgt
    for ids in encode(lines):
        typer.echo(" ".join(map(str, ids)))


@tokenizer_app.command("decode")
def tokenizer_decode(model: ModelOption, path: InputArg = "-") -> None:
    """Decode lines of target-side ids back to text."""
    tokenizer = _open_tokenizer(model)
    try:
        ids = [[int(t) for t in line.split()] for line in _lines(path)]
    except ValueError as exc:
        raise MtError(f"{path}: expected space-separated integer ids ({exc})") from None
    for text in tokenizer.decode_tgt(ids):
        typer.echo(text)


def main() -> None:
    """Entry point: run the app; user errors become one line on stderr and an exit code."""
    _setup_logging()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except MtError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
