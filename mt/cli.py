"""The `mt` command line (Typer). The only module that imports every stage."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer

from mt.errors import MtError
from mt.files import stdout_errors
from mt.serve.limits import Limits

if TYPE_CHECKING:
    from mt.config import Config
    from mt.corpora import Corpus


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


def echo(text: str) -> None:
    """A command's output on stdout: its reader gone or a full disk end the command as
    `stdout_errors` says, not in a second failure flushing stdout at exit."""
    with stdout_errors():
        typer.echo(text)


def _setup_logging() -> None:
    logging.basicConfig(
        format="%(asctime)s | %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO,
        stream=sys.stderr,
    )
    for noisy in ("datasets", "filelock", "fsspec", "huggingface_hub", "urllib3"):
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
    cfg, _ = _load(config, overrides, ("train", "valid", "test"))
    from mt.finish import finish
    from mt.rundir import check_config_file
    from mt.train import train

    check_config_file(config, cfg)
    result = train(cfg, resume=resume)
    finish(cfg, result)
    if result.signum is not None:
        sys.exit(128 + result.signum)  # 143 for SIGTERM, 130 for SIGINT


@data_app.command("fetch")
def data_fetch(
    name: Annotated[str, typer.Argument(help="Data set to fetch: multi30k (task 1, raw).")],
    dest: Annotated[Path, typer.Argument(help="Directory to write the files to.")],
    langs: Annotated[
        str, typer.Option(help="Comma-separated languages, any of de, en, fr, cs.")
    ] = "de,en,fr,cs",
    mirror: Annotated[
        str | None,
        typer.Option(
            help="Fetch from here instead of the official site: a URL or a local directory "
            "(default: the MT_DATA_MIRROR environment variable, else the official site).",
        ),
    ] = None,
) -> None:
    """Download a public data set, verifying checksums; files already valid are skipped.

    Prints the paths of the files on stdout; progress goes to stderr.
    """
    from mt.fetch import fetch_data

    for path in fetch_data(name, dest, langs, mirror=mirror, progress=sys.stderr.isatty()):
        echo(str(path))


def _load(
    config: Path, overrides: list[str] | None, splits: tuple[str, ...]
) -> tuple[Config, dict[str, dict[str, Corpus]]]:
    """The config (data.train set) and its corpora among `splits`, checked before any work."""
    from mt.config import load_config

    cfg = load_config(config, overrides or [], required=("data.train",))
    from mt.rundir import open_run  # slow (torch): imported once the config is known good

    return cfg, open_run(cfg, splits)


@data_app.command("prepare")
def data_prepare(config: ConfigOption, overrides: Overrides = None) -> None:
    """Train the tokenizer if the run has none, encode and cache the corpora, print statistics.

    Prints, per corpus: pairs kept by the length filters (training data only), token counts;
    for the training data, batches per epoch and padding efficiency; for the dev set, the
    rate of unknown pieces. A second run reuses the cached encodings.
    """
    cfg, corpora = _load(config, overrides, ("train", "valid", "test"))
    from mt.rundir import prepare_data, prepare_tokenizer

    for line in prepare_data(cfg, prepare_tokenizer(cfg), corpora):
        echo(line)


@tokenizer_app.command("train")
def tokenizer_train(config: ConfigOption, overrides: Overrides = None) -> None:
    """Train the run's SentencePiece model(s) on the training data (if the run has none).

    Prints the model path(s) and, when data.valid is set, the dev set's unknown-piece rate.
    """
    cfg, corpora = _load(config, overrides, ("train", "valid"))
    from mt.rundir import prepare_tokenizer, split_label
    from mt.tokenizer import describe_unk_rate

    tokenizer = prepare_tokenizer(cfg)
    for path in tokenizer.paths:
        echo(str(path))
    for name, corpus in corpora.get("valid", {}).items():
        echo(f"{split_label(cfg, 'valid', name)}: {describe_unk_rate(tokenizer, corpus)}")


ModelOption = Annotated[
    Path,
    typer.Option(
        "--model", "-m", help="Run directory, tokenizer directory or SentencePiece model file."
    ),
]
Side = Literal["src", "tgt"]
InputArg = Annotated[str, typer.Argument(help="Input file (plain or .gz), or - for stdin.")]


@tokenizer_app.command("encode")
def tokenizer_encode(
    model: ModelOption,
    path: InputArg = "-",
    side: Annotated[Side, typer.Option(help="Which side's model to use.")] = "src",
    pieces: Annotated[bool, typer.Option(help="Print pieces instead of ids.")] = False,
    tgt_lang: TgtLangOption = None,
) -> None:
    """Encode text: one line in, one line of space-separated ids (or pieces) out."""
    from mt.config import CONFIG_FILE, load_config
    from mt.corpora import read_lines
    from mt.rundir import find_tokenizer

    tokenizer = find_tokenizer(model)
    config = Path(model) / CONFIG_FILE
    if tgt_lang is not None and not tokenizer.tags and config.is_file():
        # A run of one target language: its sources carry no tag, as translate reads them.
        targets = load_config(config).data.target_languages()
        if tgt_lang not in targets:
            raise MtError(
                f"--tgt-lang {tgt_lang}: the model translates into {', '.join(targets)} only"
            )
        tgt_lang = None
    for line in tokenizer.encode_lines(list(read_lines(path)), side, pieces, tgt_lang):
        echo(line)


@tokenizer_app.command("decode")
def tokenizer_decode(
    model: ModelOption,
    path: InputArg = "-",
    side: Annotated[Side, typer.Option(help="Which side's model to use.")] = "tgt",
) -> None:
    """Decode lines of space-separated ids back to text; PAD, BOS and EOS are dropped."""
    from mt.corpora import input_name, read_lines
    from mt.rundir import find_tokenizer

    tokenizer = find_tokenizer(model)
    for text in tokenizer.decode_lines(read_lines(path), side, input_name(path)):
        echo(text)


# --- translate, evaluate, average -------------------------------------------------------------

FROM_RUN = "(default: from the run's config)"
RUN_MODEL = (
    "Run directory (its model: the average of its last checkpoints where the run makes one, "
    "as its report scores; else its best checkpoint, else its latest), checkpoints directory, "
    "or .safetensors file"
)
TrainedModelsOption = Annotated[
    list[Path],
    typer.Option(
        "--model",
        "-m",
        help=RUN_MODEL + " (e.g. an average). Repeat it for an ensemble of models that "
        "share their vocabulary (the first model's run gives the decoding settings).",
    ),
]
WeightsOption = Annotated[
    list[float] | None,
    typer.Option(
        "--weights",
        help="One weight per --model, in order, for the ensemble's log-linear average "
        "(default: equal).",
        show_default=False,
    ),
]
BeamOption = Annotated[
    int | None, typer.Option(min=1, help=f"Beam size (1 = greedy). {FROM_RUN}", show_default=False)
]
AlphaOption = Annotated[
    float | None,
    typer.Option(min=0.0, help=f"Length penalty exponent. {FROM_RUN}", show_default=False),
]
LengthPenaltyOption = Annotated[
    str | None,
    typer.Option(
        "--length-penalty",
        help=f"gnmt ((5 + length) / 6)^alpha, average (length) or none: what a log-probability "
        f"is divided by. {FROM_RUN}",
        show_default=False,
    ),
]


def dash_is_stdout(output: Path | None) -> Path | None:
    """`-o -` means stdout, as `-` for an input means stdin (not a file named "-")."""
    return None if output == Path("-") else output


OutputOption = Annotated[
    Path | None,
    typer.Option(
        "--output",
        "-o",
        help="Write here (atomically, once done; gzipped if it ends in .gz) instead of to stdout "
        "(-: stdout).",
        callback=dash_is_stdout,
    ),
]
MaxTokensOption = Annotated[
    int | None,
    typer.Option(
        min=1,
        help=f"Source tokens per decoding batch (padding counted). {FROM_RUN}",
        show_default=False,
    ),
]
DeviceOption = Annotated[str, typer.Option(help="auto (CUDA if present), cpu, cuda or cuda:N.")]
TgtLangOption = Annotated[
    str | None,
    typer.Option(
        "--tgt-lang",
        help="Target language, for a model of several (one of the run's; not needed for one). "
        "A source line that starts with a tag (>>fr<< ...) goes into its language.",
        show_default=False,
    ),
]
PrecisionOption = Annotated[
    str,
    typer.Option(
        help="auto (bf16/fp16 on CUDA; on CPU bf16 if it multiplies the model's matrices "
        "1.2x faster than fp32, timed at start-up), fp32, bf16, or fp16 (CUDA only)."
    ),
]
QuantizeOption = Annotated[
    str,
    typer.Option(
        "--quantize",
        help="none, or int8: the model's matrix products in int8, for a faster CPU "
        "(fp32 otherwise; outputs change a little, see docs/benchmarks.md).",
    ),
]


TRANSLATE_HELP = (
    "Translate text line by line: exactly one output line per input line, in input order.\n\n"
    "Blank input lines give blank output lines. Lines longer than the model's max_positions - 1 "
    "pieces (- 2 for a multilingual model: its language tag takes one) are truncated, with a "
    "warning naming the line.\n\n"
    "With --nbest K, each input line gives K lines INDEX<TAB>SCORE<TAB>TEXT, best first, where "
    "INDEX is the 0-based input line number and SCORE the length-penalised log-probability.\n\n"
    "--prefix and --constraints files have one line per input line (an empty line: none). A "
    "prefix is how the translation must start; constraints are tab-separated phrases it must "
    "contain, in any order. A line whose phrases no translation can hold gets the best "
    "translation without them, and a warning naming the line."
)


@app.command("translate", help=TRANSLATE_HELP)
def translate_command(
    model: TrainedModelsOption,
    source: Annotated[
        str,
        typer.Argument(metavar="FILE", help="Input file, one sentence per line, or - for stdin."),
    ] = "-",
    output: OutputOption = None,
    beam: BeamOption = None,
    alpha: AlphaOption = None,
    length_penalty: LengthPenaltyOption = None,
    nbest: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Write the K best translations per input line, as INDEX<TAB>SCORE<TAB>TEXT.",
            show_default=False,
        ),
    ] = None,
    max_tokens: MaxTokensOption = None,
    tgt_lang: TgtLangOption = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    prefix: Annotated[
        Path | None, typer.Option(help="How each translation starts, one line per input line.")
    ] = None,
    constraints: Annotated[
        Path | None,
        typer.Option(help="Tab-separated phrases each translation must contain, one line each."),
    ] = None,
    weights: WeightsOption = None,
    quantize: QuantizeOption = "none",
    sampling: Annotated[
        bool | None,
        typer.Option(
            "--sampling/--no-sampling",
            help="Sample translations instead of searching; --beam N draws N (or --nbest, if "
            f"more). {FROM_RUN}",
            show_default=False,
        ),
    ] = None,
    temperature: Annotated[
        float | None,
        typer.Option(help=f"Sampling temperature. {FROM_RUN}", show_default=False),
    ] = None,
    top_k: Annotated[
        int | None,
        typer.Option(
            help=f"Sample from the K most probable pieces (0 = all). {FROM_RUN}", show_default=False
        ),
    ] = None,
    top_p: Annotated[
        float | None,
        typer.Option(
            help=f"Sample from the most probable pieces of this total probability. {FROM_RUN}",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            help=f"Sampling seed: the same input, the same samples (-1: new each run). {FROM_RUN}",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Translate a file or stdin with a trained model (see TRANSLATE_HELP)."""
    from mt.translate import translate_file

    translate_file(
        source,
        model,
        output,
        device=device,
        precision=precision,
        tgt_lang=tgt_lang,
        prefix=prefix,
        constraints=constraints,
        weights=weights,
        quantization=quantize,
        beam=beam,
        alpha=alpha,
        length_penalty=length_penalty,
        nbest=nbest,
        max_tokens=max_tokens,
        sampling=sampling,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
    )


SCORE_HELP = (
    "Score translations with a model: one line per line pair of SRC and TGT.\n\n"
    "A pair's score is what translate --nbest prints for that output: the log-probability of "
    "the target's pieces and EOS given the source, divided by the length penalty (--alpha, "
    "--length-penalty none for the plain log-probability, average for its mean per piece); "
    "to the last decimal in fp32, within about 0.01 in bf16 or with --quantize int8 (one pass "
    "over the whole target, where search goes step by step). A "
    "blank source line gives a blank line; a pair too long for the model gives nan, with a "
    "warning naming the line. For reranking n-best lists (a right-to-left or reverse model) "
    "and for filtering parallel data.\n\n"
    "--piece-scores adds, after a tab, the log-probability of each target piece and of EOS; "
    "--summary prints instead one line: the cross-entropy per target piece and its perplexity "
    "over every pair scored (a dev set's are the dev nll and ppl training logs)."
)


@app.command("score", help=SCORE_HELP)
def score_command(
    model: TrainedModelsOption,
    source: Annotated[str, typer.Argument(metavar="SRC", help="Sources, one per line, or -.")],
    target: Annotated[
        str, typer.Argument(metavar="TGT", help="Their translations, one per line, or -.")
    ],
    output: OutputOption = None,
    alpha: AlphaOption = None,
    length_penalty: LengthPenaltyOption = None,
    max_tokens: MaxTokensOption = None,
    tgt_lang: TgtLangOption = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    weights: WeightsOption = None,
    quantize: QuantizeOption = "none",
    piece_scores: Annotated[
        bool, typer.Option(help="After each score, a tab and every piece's log-probability.")
    ] = False,
    summary: Annotated[
        bool, typer.Option(help="One line instead: cross-entropy and perplexity of the whole.")
    ] = False,
) -> None:
    """Score line pairs with a trained model (see SCORE_HELP)."""
    from mt.score import score_file

    score_file(
        source,
        target,
        model,
        output,
        device=device,
        precision=precision,
        tgt_lang=tgt_lang,
        weights=weights,
        quantization=quantize,
        piece_scores=piece_scores,
        summary=summary,
        alpha=alpha,
        length_penalty=length_penalty,
        max_tokens=max_tokens,
    )


EVALUATE_HELP = (
    "Print sacreBLEU's BLEU, chrF and TER, each with its signature.\n\n"
    "Score a file (--hyp and --ref), a model's translation of a file (--model, --src and --ref), "
    "or a model's translation of its run's test set (--model alone): of every direction of a "
    "multilingual run, one row (or --json record) each.\n\n"
    "BLEU tokenizes with 13a, or for a model translating into Chinese, Japanese or Korean as "
    "sacrebleu -l xx-zh (ja, ko) does; --tokenize chooses."
)


@app.command("evaluate", help=EVALUATE_HELP)
def evaluate_command(
    hyp: Annotated[Path | None, typer.Option(help="Translations to score (with --ref).")] = None,
    ref: Annotated[Path | None, typer.Option(help="References, one per line.")] = None,
    src: Annotated[
        Path | None, typer.Option(help="Sources for --model to translate (with --ref).")
    ] = None,
    model: Annotated[
        list[Path] | None,
        typer.Option(
            "--model",
            "-m",
            help="Translate with this run or checkpoint (repeat it for an ensemble); without "
            "--src/--ref, the first one's test set.",
        ),
    ] = None,
    lowercase: Annotated[bool, typer.Option(help="Case-insensitive BLEU.")] = False,
    tokenize: Annotated[
        str | None,
        typer.Option(help="sacreBLEU's BLEU tokenizer: 13a, intl, zh, ja-mecab, char, ..."),
    ] = None,
    json_output: Annotated[
        bool,
        typer.Option(
            "--json", help="Print JSON instead of text: the scores, or one record per direction."
        ),
    ] = False,
    beam: BeamOption = None,
    alpha: AlphaOption = None,
    max_tokens: MaxTokensOption = None,
    tgt_lang: TgtLangOption = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    weights: WeightsOption = None,
    quantize: QuantizeOption = "none",
) -> None:
    """Score translations with sacreBLEU (see EVALUATE_HELP)."""
    from mt.evaluate import evaluate, evaluate_run, format_directions, format_json, format_text
    from mt.rundir import load_run_config, model_checkpoint

    if model and (hyp, src, ref) == (None, None, None):
        decode = {"beam": beam, "alpha": alpha, "max_tokens": max_tokens}
        by_direction = evaluate_run(
            model, lowercase, device, precision, weights, quantize, tgt_lang, tokenize, **decode
        )
        # A run of several directions names them (and so does --tgt-lang), however many have
        # a test set.
        run = load_run_config(model_checkpoint(model[0]).run_dir)
        named = tgt_lang is not None or len(run.data.directions()) > 1
        echo(format_directions(by_direction, json_output, named=named))
        return
    scores = evaluate(
        hyp,
        ref,
        src,
        model or None,
        lowercase=lowercase,
        device=device,
        precision=precision,
        weights=weights,
        quantization=quantize,
        tokenize=tokenize,
        beam=beam,
        alpha=alpha,
        max_tokens=max_tokens,
        tgt_lang=tgt_lang,
    )
    echo(format_json(scores) if json_output else format_text(scores))


AVERAGE_HELP = (
    "Average the weights of a run's last K (or best K by dev BLEU) checkpoints into one file.\n\n"
    "A signal's checkpoint between validations (a resume point) is not among the last. "
    "Asking for more checkpoints than the run has is an error. The result loads like any other "
    "checkpoint, e.g. mt translate --model RUN/checkpoints/average.safetensors."
)


@app.command("average", help=AVERAGE_HELP)
def average_command(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="Run directory.")],
    last: Annotated[int, typer.Option(min=0, help="Average the last K checkpoints.")] = 0,
    best: Annotated[
        int, typer.Option(min=0, help="Average the K checkpoints with the best dev BLEU.")
    ] = 0,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="A FILE.safetensors in RUN/checkpoints (default: average.safetensors there).",
        ),
    ] = None,
) -> None:
    """Average checkpoints (see AVERAGE_HELP)."""
    from mt.average import average_run

    echo(str(average_run(run, last=last, best=best, output=output)))


@app.command("plot")
def plot_command(
    runs: Annotated[
        list[Path], typer.Argument(metavar="RUN...", help="Run directories (one line each).")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="PNG file to write.")] = Path(
        "curves.png"
    ),
) -> None:
    """Plot train loss, dev loss and dev BLEU against steps and wall-clock, from metrics.jsonl."""
    from mt.plot import plot_curves

    echo(str(plot_curves(runs, output)))


@app.command("attention")
def attention_command(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="Run directory or checkpoint.")],
    sentence: Annotated[str, typer.Argument(help="Source sentence to translate.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="PNG file to write.")] = Path(
        "attention.png"
    ),
    layer: Annotated[
        int, typer.Option(min=0, help="Decoder layer to show (1 = first); 0 shows every layer.")
    ] = 0,
    beam: BeamOption = None,
    tgt_lang: TgtLangOption = None,
    show_tag: Annotated[
        bool,
        typer.Option(
            "--show-tag", help="Show a multilingual model's target-language tag as a source piece."
        ),
    ] = False,
    device: DeviceOption = "auto",
) -> None:
    """Translate a sentence and plot the decoder's cross-attention, averaged over heads."""
    from mt.alignment import plot_alignment

    translation, path = plot_alignment(
        run, sentence, output, layer, beam, device, tgt_lang, show_tag
    )
    echo(translation)
    echo(str(path))


SERVE_HELP = (
    "Serve a trained model over HTTP: POST /v1/translate, GET /v1/model, GET /health, API docs "
    "at /docs, and a page to try the model at /.\n\n"
    "Concurrent requests are gathered into batches and decoded like mt translate, with the same "
    "results (but for sampling, --quantize int8, and bf16 or fp16 in their last bits, whose "
    "outputs depend on the batch). "
    "Requests over a limit get a one-line JSON error; a full queue answers 503 with "
    "Retry-After. SIGTERM answers what is queued, then exits 0. Needs the serve extra."
)
LIMITS = Limits()
MaxRequestBytesOption = Annotated[int, typer.Option(min=1, help="Largest request body.")]
MaxSentencesOption = Annotated[int, typer.Option(min=1, help="Sentences per request.")]
MaxBeamOption = Annotated[
    int, typer.Option(min=1, help="Largest beam (and n-best) a request may ask for.")
]
MaxConstraintsOption = Annotated[
    int, typer.Option(min=1, help="Constraint phrases one sentence may ask for.")
]
MaxAttentionOption = Annotated[
    int,
    typer.Option(
        min=1,
        help="Attention weights one request may ask for (decoder layers x output limit x "
        "source pieces, over its sentences).",
    ),
]
MaxQueueOption = Annotated[
    int, typer.Option(min=1, help="Sentences waiting for the model; then 503.")
]
BatchWaitOption = Annotated[
    float, typer.Option(min=0, help="How long to gather requests into a batch.")
]


@app.command("serve", help=SERVE_HELP)
def serve_command(
    model: Annotated[
        Path,
        typer.Argument(
            metavar="RUN_OR_CHECKPOINT",
            help=RUN_MODEL + ".",
        ),
    ],
    host: Annotated[
        str,
        typer.Option(help="Address to listen on; any but 127.0.0.1, ::1 and localhost is public."),
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="Port; 0 picks a free one (printed).")
    ] = 8000,
    beam: BeamOption = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    quantize: QuantizeOption = "none",
    max_request_bytes: MaxRequestBytesOption = LIMITS.max_request_bytes,
    max_sentences: MaxSentencesOption = LIMITS.max_sentences,
    max_beam: MaxBeamOption = LIMITS.max_beam,
    max_constraints: MaxConstraintsOption = LIMITS.max_constraints,
    max_attention_weights: MaxAttentionOption = LIMITS.max_attention_weights,
    max_queue: MaxQueueOption = LIMITS.max_queue,
    batch_wait_ms: BatchWaitOption = LIMITS.batch_wait_ms,
    max_tokens: MaxTokensOption = None,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(help="Let pages of this origin call the API (repeatable; none by default)."),
    ] = None,
    log_level: Annotated[
        Literal["debug", "info", "warning", "error"],
        typer.Option(help="debug also logs the queue and each batch."),
    ] = "info",
) -> None:
    """Serve a model over HTTP (see SERVE_HELP)."""
    from mt.serve import check_installed

    check_installed()
    from mt.serve.server import serve

    limits = Limits(
        max_request_bytes=max_request_bytes,
        max_sentences=max_sentences,
        max_beam=max_beam,
        max_constraints=max_constraints,
        max_attention_weights=max_attention_weights,
        max_queue=max_queue,
        batch_wait_ms=batch_wait_ms,
        max_tokens=max_tokens,
    )
    serve(
        model,
        host=host,
        port=port,
        beam=beam,
        device=device,
        precision=precision,
        quantization=quantize,
        limits=limits,
        cors_origins=cors_origin,
        log_level=log_level,
    )


@app.command("report")
def report_command(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="Run directory.")],
    test: Annotated[
        bool, typer.Option(help="Translate and score the run's test set (data.test).")
    ] = True,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
) -> None:
    """Write RUN/report.md (config, model, data, training, dev and test scores) and curves.png."""
    from mt.report import check_runtime_used, write_report

    check_runtime_used(run, test, device, precision)
    echo(str(write_report(run, test=test, device=device, precision=precision)))


EXPORT_HELP = (
    "Export a trained model for serving: a CTranslate2 model (ct2) or a Hugging Face "
    "MarianMTModel (hf, post-norm models only), with its tokenizer and a README.md.\n\n"
    "OUT appears whole or not at all; an existing non-empty OUT is replaced only with --force. "
    "ct2 needs ctranslate2 (the export extra), hf needs transformers (the bench extra)."
)


@app.command("export", help=EXPORT_HELP)
def export_command(
    run: Annotated[
        Path,
        typer.Argument(
            metavar="RUN",
            help=RUN_MODEL + " (e.g. an average).",
        ),
    ],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Directory to write.")],
    fmt: Annotated[
        Literal["ct2", "hf"],
        typer.Option("--format", "-f", help="ct2: CTranslate2; hf: Hugging Face MarianMTModel."),
    ],
    quantization: Annotated[
        str | None,
        typer.Option(help="ct2 weight type, e.g. int8, int8_float16, float16 (default float32)."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace a non-empty OUT.")] = False,
) -> None:
    """Export a model (see EXPORT_HELP); prints OUT."""
    from mt.export import export_model

    echo(str(export_model(run, out, fmt, quantization=quantization, force=force)))


def _stopped(signum: int) -> None:
    """Say which signal stopped the command (its temp files are gone; stdout may hold a part)."""
    # A closed stderr says nothing; nor does a write that interrupted another (tqdm's).
    with contextlib.suppress(OSError, RuntimeError):
        typer.echo(
            f"stopped by {signal.Signals(signum).name} before the end; run it again", err=True
        )


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM, SIGUSR1: unwind like Ctrl-C, so temp files go (`mt train`/`serve` set their own)."""
    _stopped(signum)
    raise SystemExit(128 + signum)


def _out_of_gpu_memory(exc: Exception) -> bool:
    """Whether `exc` is torch's CUDA out-of-memory error (torch imported only if it was)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError)


def main() -> None:
    """Entry point: run the app; user errors become one line on stderr and an exit code."""
    if sys.stderr is None:  # started with stderr closed (2>&-): say nothing, but do the work
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (open for the life of the process)
    _setup_logging()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for stop in (signal.SIGTERM, signal.SIGUSR1):  # SIGUSR1: SLURM's notice (scripts/slurm)
        signal.signal(stop, _terminated)
    try:
        code = app(standalone_mode=False)  # its usage errors come here, to be said in one line
    except typer.TyperException as exc:  # Click's usage errors: a bad option, a missing argument
        command = exc.ctx.command_path if getattr(exc, "ctx", None) else "mt"
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        typer.echo(f"error: {command}: {message.rstrip('.')} (see {command} --help)", err=True)
        sys.exit(getattr(exc, "exit_code", 2))
    except typer.Abort:  # end of input at a prompt
        sys.exit(1)
    except MtError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        code = 130
    except OSError as exc:
        # The user's environment, not a bug: a full disk, a read-only or missing directory.
        where = f"{exc.filename}: " if exc.filename else ""
        typer.echo(f"error: {where}{exc.strerror or exc}", err=True)
        sys.exit(1)
    except Exception as exc:
        if not _out_of_gpu_memory(exc):
            raise
        typer.echo(
            "error: out of GPU memory: decode in smaller batches (--max-tokens) or with a "
            "smaller --beam",
            err=True,
        )
        sys.exit(1)
    if code == 130:  # Ctrl-C (Typer turns it into this exit status)
        _stopped(signal.SIGINT)
    if isinstance(code, int):
        sys.exit(code)
