"""`mt translate`: one output line per input line, whatever the input; batching; n-best; errors."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from helpers.entry import run_main
from helpers.runs import run_with
from helpers.waiting import SAFETY_NET_S
from typer.testing import CliRunner

from mt import checkpoint as ckpt
from mt.cli import app
from mt.config import load_config, save_config
from mt.device import model_products
from mt.errors import MtError
from mt.rundir import load_trained
from mt.translate import (
    Translator,
    decode_settings,
    decoding_products,
    encode_constraints,
    encode_prefixes,
    resolve_runtime,
    translate_file,
)

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")

LONG = " ".join(["haus"] * 5000)
# Line 4 (1-based) is the long one; 2 and 3 are blank; the rest are hostile but valid UTF-8.
EDGE_LINES = [
    "Der hund findet das haus am morgen .",
    "",
    "   \t ",
    LONG,
    "Das kind 🙂 mag 🎉 den see .",
    "a\x00b\x07c\td",
    "ein auto\rim park",
    "\x00",
    "漢字 und ünïcödé",
]
EDGE_TEXT = "\n".join(EDGE_LINES) + "\n"


@pytest.fixture(scope="module")
def loaded(trained_run: Path):
    """(config, tokenizer, model) of the trained tiny run, on the CPU."""
    config, tokenizer, model, _ = load_trained(trained_run, CPU)
    return config, tokenizer, model


def run_mt(*args: str, stdin: bytes = b"", cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """The real `mt` command in a subprocess (entry point, error handling, real stdin)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mt", *args],
        input=stdin,
        capture_output=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


def test_every_input_line_gives_one_output_line(loaded, caplog) -> None:
    config, tokenizer, model = loaded
    with caplog.at_level(logging.WARNING, logger="mt"):
        out = Translator(tokenizer, model, config.decode, CPU).translate(EDGE_LINES)
    assert len(out) == len(EDGE_LINES)
    assert all(len(hyps) == 1 for hyps in out)
    texts = [hyps[0].text for hyps in out]
    assert texts[1] == texts[2] == ""  # blank and whitespace-only lines are not decoded
    assert texts[0] and texts[3] and texts[4]
    assert all("\n" not in t and "\r" not in t for t in texts)
    limit = model.max_positions - 1
    warnings = [r.getMessage() for r in caplog.records]
    assert any(re.fullmatch(rf"line 4: [\d,]+ tokens, truncated to {limit}", w) for w in warnings)
    assert not any(w.startswith(("line 1:", "line 5:")) for w in warnings)


def test_output_does_not_depend_on_batching(loaded) -> None:
    config, tokenizer, model = loaded
    valid = (ROOT / "tests/data/tiny/valid.de").read_text(encoding="utf-8").splitlines()
    lines = [*valid[:20], *(line for line in EDGE_LINES if line != LONG)]
    for beam in (1, 3):
        decode = dataclasses.replace(config.decode, beam=beam)
        one = Translator(tokenizer, model, decode, CPU).translate(lines, max_tokens=1)
        big = Translator(tokenizer, model, decode, CPU).translate(lines, max_tokens=100_000)
        assert [h[0].text for h in one] == [h[0].text for h in big]


@pytest.mark.slow
def test_stdin_file_and_output_file_agree(
    trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "in.txt"
    source.write_bytes(EDGE_TEXT.encode("utf-8"))
    fp32 = ["--precision", "fp32"]  # auto is timed per call: two calls could choose differently
    piped = run_mt("translate", "-m", str(trained_run), *fp32, stdin=source.read_bytes())
    assert piped.returncode == 0, piped.stderr.decode()
    assert re.search(rb"line 4: [\d,]+ tokens, truncated to 127", piped.stderr)
    stdout = piped.stdout.decode("utf-8")
    assert stdout.count("\n") == len(EDGE_LINES)

    runner = CliRunner()
    from_file = runner.invoke(app, ["translate", "-m", str(trained_run), str(source), *fp32])
    assert from_file.exit_code == 0, from_file.output
    assert from_file.stdout == stdout

    target = tmp_path / "out.txt"
    written = runner.invoke(
        app, ["translate", str(source), "-m", str(trained_run), "-o", str(target), *fp32]
    )
    assert written.exit_code == 0, written.output
    assert written.stdout == ""
    assert target.read_text(encoding="utf-8") == stdout
    monkeypatch.chdir(tmp_path)  # where a file named "-" would go
    dash = runner.invoke(app, ["translate", str(source), "-m", str(trained_run), "-o", "-", *fp32])
    assert dash.exit_code == 0, dash.output
    assert dash.stdout == stdout  # `-o -` is stdout, as `-` is stdin: no file named "-"
    assert not (tmp_path / "-").exists()
    packed = tmp_path / "out.txt.gz"  # gzipped, as a .gz input is read
    args = ["translate", str(source), "-m", str(trained_run), "-o", str(packed), *fp32]
    assert runner.invoke(app, args).exit_code == 0
    assert gzip.decompress(packed.read_bytes()).decode("utf-8") == stdout
    assert packed.read_bytes()[10:].split(b"\0")[0] == b"out.txt"  # the name, not the temp's
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_nbest_lines(trained_run: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.txt"
    source.write_text("Der hund mag den see .\n\nDas kind findet ein auto .\n", encoding="utf-8")
    args = ["translate", "-m", str(trained_run), str(source), "--nbest", "3", "--beam", "4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert len(rows) == 9 and all(len(row) == 3 for row in rows)
    assert [int(row[0]) for row in rows] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for i in (0, 2):
        scores = [float(row[1]) for row in rows[3 * i : 3 * i + 3]]
        assert scores == sorted(scores, reverse=True) and all(s < 0 for s in scores)
        assert all(row[2] for row in rows[3 * i : 3 * i + 3])
    assert [row[2] for row in rows[3:6]] == ["", "", ""]  # a blank line: K blank hypotheses


def test_nbest_lines_where_fewer_outputs_are_possible(trained_run: Path, tmp_path: Path) -> None:
    run = run_with(trained_run, tmp_path / "run", ["decode.max_len_b=0"])
    source, prefixes = tmp_path / "in.txt", tmp_path / "prefixes.txt"
    source.write_text("Der hund mag den see .\nDas kind findet ein auto .\n", encoding="utf-8")
    # A prefix past the output length limit, with max_len_b 0: the limit becomes the prefix and
    # its EOS, so the search can find one output only.
    long = " ".join(["The dog sees the cat ."] * 6)
    prefixes.write_text(f"{long}\n\n", encoding="utf-8")
    args = ["translate", "-m", str(run), str(source), "--nbest", "3", "--beam", "4"]
    result = CliRunner().invoke(app, [*args, "--prefix", str(prefixes)])
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert [row[0] for row in rows] == ["0", "0", "0", "1", "1", "1"]
    assert rows[0][2] == long and float(rows[0][1]) < 0
    assert rows[1:3] == [["0", "nan", ""], ["0", "nan", ""]]
    assert all(float(row[1]) < 0 and row[2] for row in rows[3:])


def test_sampling_from_the_command_line_with_a_seed(trained_run: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.txt"
    source.write_text("Der hund mag den see .\nDas kind findet ein auto .\n", encoding="utf-8")
    args = ["translate", "-m", str(trained_run), str(source), "--precision", "fp32"]
    samples = [*args, "--sampling", "--beam", "4", "--nbest", "4", "--temperature", "2"]
    first, again, other = (
        CliRunner().invoke(app, [*samples, "--seed", seed]) for seed in ("1", "1", "2")
    )
    assert first.exit_code == 0, first.output
    assert first.stdout == again.stdout != other.stdout
    rows = [line.split("\t") for line in first.stdout.splitlines()]
    assert [row[0] for row in rows] == ["0"] * 4 + ["1"] * 4
    for i in (0, 4):
        scores = [float(row[1]) for row in rows[i : i + 4]]
        assert scores == sorted(scores, reverse=True)
    # Seed -1 draws new samples each run, even where torch's global random numbers restart at
    # the same place (as they do in every new process).
    unseeded = []
    for _ in range(2):
        torch.manual_seed(0)
        unseeded.append(CliRunner().invoke(app, [*samples, "--seed", "-1"]).stdout)
    assert unseeded[0] != unseeded[1] and unseeded[0].count("\n") == 8
    # One sample from the most probable piece only is the greedy translation.
    greedy = CliRunner().invoke(app, [*args, "--beam", "1"])
    top1 = CliRunner().invoke(app, [*args, "--sampling", "--beam", "1", "--top-k", "1"])
    assert top1.stdout == greedy.stdout and greedy.stdout.count("\n") == 2
    for options, message in [
        (["--sampling", "--temperature", "0"], "decode.temperature=0.0 must be in (0, 1000]"),
        # Each of these was taken: nan log-probs in float32 (every line empty, exit 0), an
        # OverflowError at the first ended hypothesis, and an alpha that no penalty reads.
        (["--sampling", "--temperature", "1e39"], "decode.temperature=1e+39 must be in (0, 1000]"),
        (["--alpha", "1000"], "decode.alpha=1000.0 must be in [0, 10]"),
        (["--length-penalty", "none", "--alpha", "1"], "--alpha applies to --length-penalty "
         "gnmt only, not none"),
    ]:  # fmt: skip
        bad = CliRunner().invoke(app, [*args, *options])
        assert str(bad.exception) == f"command line: {message}"


def test_an_output_that_cannot_be_written_is_refused_before_translating(
    trained_run: Path, tmp_path: Path
) -> None:
    source = tmp_path / "in.txt"
    source.write_text("Der hund mag den see .\n", encoding="utf-8")
    args = ["translate", "-m", str(trained_run), str(source), "-o"]
    for output, message in [
        (tmp_path, f"{tmp_path}: is a directory, not a file to write"),
        (tmp_path / "no" / "out", f"{tmp_path / 'no' / 'out'}: directory {tmp_path / 'no'} does "
         "not exist"),
    ]:  # fmt: skip
        with mock.patch("mt.translate.load_models", side_effect=AssertionError("loaded")):
            result = CliRunner().invoke(app, [*args, str(output)])
        assert isinstance(result.exception, MtError) and str(result.exception) == message


def test_bad_decoding_options_fail_before_any_input_is_read(
    trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unread(path: object) -> None:
        raise AssertionError(f"{path} read before the options were checked")

    for module in ("mt.translate", "mt.score"):
        monkeypatch.setattr(f"{module}.read_lines", unread)
    args = ["translate", "-m", str(trained_run), "-", "--nbest", "3", "--beam", "2"]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, MtError)
    assert str(result.exception) == "command line: decode.nbest=3 exceeds decode.beam=2"
    terms = tmp_path / "terms.tsv"
    args = ["translate", "-m", str(trained_run), "-", "--sampling", "--constraints", str(terms)]
    result = CliRunner().invoke(app, args)
    assert str(result.exception) == (
        f"--constraints {terms}: constraints need beam search, not sampling"
    )
    args = ["score", "-m", str(trained_run), "-", str(terms), "--length-penalty", "log"]
    result = CliRunner().invoke(app, args)
    assert str(result.exception) == (
        "command line: decode.length_penalty must be one of gnmt, average, none, got 'log'"
    )


@pytest.mark.slow
def test_a_model_file_outside_a_run_is_a_one_line_error(trained_run: Path, tmp_path: Path) -> None:
    loose = tmp_path / "model.safetensors"
    shutil.copyfile(ckpt.resolve_checkpoint(trained_run).weights, loose)
    result = CliRunner().invoke(app, ["translate", "-m", str(loose)], input="Der hund .\n")
    assert str(result.exception) == (
        f"{loose}: not in a run's checkpoints directory (no config.yaml in {tmp_path.parent}); "
        "a model file loads from RUN/checkpoints/, beside the run's config and tokenizer"
    )


@pytest.mark.slow  # a second or more: the full suite runs it
def test_invalid_utf8_is_a_one_line_error(trained_run: Path, tmp_path: Path) -> None:
    source = tmp_path / "bad.txt"
    source.write_bytes(b"Der hund .\nDas \xff kind .\n")
    result = run_mt("translate", "-m", str(trained_run), str(source))
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.decode() == f"error: {source}: line 2 is not valid UTF-8\n"


def test_sampling_and_scores(loaded) -> None:
    config, tokenizer, model = loaded
    lines = ["Der hund mag den see .", "", "Das kind findet ein auto ."]
    decode = dataclasses.replace(config.decode, sampling=True, beam=3, nbest=2, top_k=5)
    out = Translator(tokenizer, model, decode, CPU).translate(lines)
    assert [len(hyps) for hyps in out] == [2, 2, 2]
    assert out[1][0].text == "" and out[1][0].score == 0.0
    for hyps in (out[0], out[2]):
        assert hyps[0].score >= hyps[1].score
    greedy = dataclasses.replace(config.decode, beam=1, nbest=1)
    scored = Translator(tokenizer, model, greedy, CPU).translate(lines, scores=True)
    plain = Translator(tokenizer, model, greedy, CPU).translate(lines)
    assert [h[0].text for h in scored] == [h[0].text for h in plain]
    assert all(h[0].score < 0 for h in (scored[0], scored[2]))


def test_load_trained_accepts_run_checkpoints_dir_and_file(trained_run: Path) -> None:
    best = ckpt.best_checkpoint(trained_run)
    assert best is not None
    for path in (trained_run, trained_run / "checkpoints", best.weights):
        _, _, model, found = load_trained(path, CPU)
        assert found.weights == best.weights and not model.training
    with pytest.raises(MtError, match="no checkpoint found"):
        load_trained(trained_run / "tokenizer", CPU)


# --- a diverged model: every line still gets its output, then one error line -------------------

DIVERGED_INPUT = "Der hund findet das haus .\n\nDas kind mag den see .\n"


def diverged_error(run: Path, missing: int = 2, total: int = 3) -> str:
    weights = ckpt.resolve_checkpoint(run).weights
    return (
        f"error: {weights}: the model's scores are not finite (diverged weights?): "
        f"no translation for {missing} of {total} lines\n"
    )


@pytest.mark.parametrize("beam", ["1", "2"])  # greedy (search.decode_rows) and beam search
@pytest.mark.slow
def test_a_diverged_model_writes_every_line_then_fails(
    diverged_run: Path, tmp_path: Path, beam: str
) -> None:
    source = tmp_path / "in.txt"
    source.write_text(DIVERGED_INPUT, encoding="utf-8")
    target = tmp_path / "out.txt"
    result = run_mt(
        "translate", "-m", str(diverged_run), str(source), "--beam", beam, "-o", str(target)
    )
    assert result.returncode == 1
    assert result.stderr.decode() == diverged_error(diverged_run)  # one line, no traceback
    assert result.stdout == b""
    assert target.read_text(encoding="utf-8") == "\n\n\n"  # complete: one (empty) line each


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGUSR1])  # SIGUSR1: SLURM's notice
def test_a_stop_signal_mid_file_leaves_nothing_half_written(
    trained_run: Path, tmp_path: Path, stop: signal.Signals
) -> None:
    source = tmp_path / "in.txt"
    source.write_text("der hund mag den see im park .\n" * 20_000, encoding="utf-8")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mt", "translate", "-m", str(trained_run), str(source),
         "-o", str(out_dir / "out.txt")],
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.stderr is not None
    deadline = time.monotonic() + SAFETY_NET_S
    try:
        while not any(out_dir.iterdir()):  # until the temp file is there: translating
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.1)
            assert proc.returncode is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no temp file: the child hangs"
        proc.send_signal(stop)
        assert proc.wait(timeout=60) == 128 + stop
    finally:
        proc.kill()
        proc.wait()
    err = proc.stderr.read().decode()
    assert "Traceback" not in err
    said = f"stopped by {stop.name} before the end; run it again"
    assert err.splitlines()[-1] == said
    assert list(out_dir.iterdir()) == []


@pytest.mark.slow
def test_a_diverged_model_on_stdout_and_in_nbest_format(diverged_run: Path) -> None:
    result = run_mt("translate", "-m", str(diverged_run), stdin=DIVERGED_INPUT.encode())
    assert (result.returncode, result.stdout) == (1, b"\n\n\n")
    assert result.stderr.decode() == diverged_error(diverged_run)
    args = ["translate", "-m", str(diverged_run), "--nbest", "2", "--beam", "2"]
    nbest = CliRunner().invoke(app, args, input=DIVERGED_INPUT)
    assert isinstance(nbest.exception, MtError)
    assert f"error: {nbest.exception}\n" == diverged_error(diverged_run)
    assert nbest.stdout.splitlines() == [
        "0\tnan\t", "0\tnan\t", "1\t0.0000\t", "1\t0.0000\t", "2\tnan\t", "2\tnan\t"
    ]  # fmt: skip


def test_lines_without_a_finite_hypothesis_are_empty(loaded, monkeypatch) -> None:
    from mt import search
    from mt.translate import NOT_FOUND

    config, tokenizer, model = loaded
    lines = ["Der hund mag den see .", "Das kind findet ein auto .", "Ein mann ."]
    real = search.beam_search

    def beam_search(model, src, *args, **kwargs):  # rows sorted by length: see which is which
        hyps = real(model, src, *args, **kwargs)
        lengths = (src != 0).sum(dim=1).tolist()
        nan = search.Hypothesis([5, 6], math.nan, math.nan)
        # The longest line: nothing came back (search today); the shortest: only a NaN score.
        return [
            [] if n == max(lengths) else [nan] if n == min(lengths) else h
            for h, n in zip(hyps, lengths, strict=True)
        ]

    monkeypatch.setattr(search, "beam_search", beam_search)
    lengths = [len(ids) for ids in tokenizer.encode_src(lines)]
    assert len(set(lengths)) == 3  # one batch (see max_tokens), rows told apart by length
    decode = dataclasses.replace(config.decode, beam=2, nbest=2)
    out = Translator(tokenizer, model, decode, CPU).translate(lines, max_tokens=100_000)
    longest, shortest = lengths.index(max(lengths)), lengths.index(min(lengths))
    assert out[longest] == out[shortest] == [NOT_FOUND, NOT_FOUND]
    (other,) = set(range(3)) - {longest, shortest}
    assert [h.found for h in out[other]] == [True, True] and all(h.text for h in out[other])
    assert all(math.isfinite(h.score) for h in out[other])


def test_greedy_translations_are_scored_like_beam_search(loaded) -> None:
    config, tokenizer, model = loaded
    lines = (ROOT / "tests/data/tiny/valid.de").read_text(encoding="utf-8").splitlines()[:8]
    greedy = dataclasses.replace(config.decode, beam=1, nbest=1)
    plain = Translator(tokenizer, model, greedy, CPU).translate(lines)
    beam1 = Translator(tokenizer, model, greedy, CPU).translate(lines, scores=True)  # beam search
    assert [h[0].tokens for h in plain] == [h[0].tokens for h in beam1]
    assert [h[0].score for h in plain] == pytest.approx([h[0].score for h in beam1], abs=1e-5)


def test_output_on_a_full_disk_is_one_line(trained_run: Path, small_fs, tmp_path: Path) -> None:
    disk = small_fs.mount(tmp_path / "disk")
    target = disk / "out.txt"
    target.write_text("previous\n", encoding="utf-8")
    small_fs.fill(disk)
    lines = (ROOT / "tests/data/tiny/valid.de").read_text(encoding="utf-8")  # not one page fits
    result = CliRunner().invoke(
        app, ["translate", "-m", str(trained_run), "-o", str(target), "--beam", "1"], input=lines
    )
    assert isinstance(result.exception, MtError)
    assert str(result.exception) == f"{target}: cannot write (No space left on device)"
    assert target.read_text(encoding="utf-8") == "previous\n"
    assert sorted(p.name for p in disk.iterdir()) == [".filler", "out.txt"]


def test_auto_precision_is_timed_on_the_models_own_layers(
    trained_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config, tokenizer, _, _ = load_trained(trained_run, CPU)
    m = config.model
    products = model_products(m.dim, m.ffn_dim, tokenizer.tgt_vocab_size)
    assert decoding_products(trained_run) == (products, config.decode.max_tokens)
    assert decoding_products(tmp_path) == (None, 0)  # loading it will say what is wrong
    caplog.set_level("DEBUG", logger="mt")  # INFO on a terminal
    device, precision = resolve_runtime("cpu", "auto", trained_run)
    assert device == CPU and precision in ("fp32", "bf16")
    line = f"precision: {precision} (auto, measured on the model's matrix products at "
    assert line in caplog.text


# --- steering: prefixes, constraints, ensembles ---------------------------------------------------

STEER_LINES = [
    "Der hund findet das haus am morgen .",
    "Der hund mag den see im park .",
    "Das kind mag ein auto im park .",
    "",
]


def test_prefixes_and_constraints_steer_the_translations(loaded) -> None:
    config, tokenizer, model = loaded
    room = model.max_positions - 2
    prefixes = encode_prefixes(Path("p"), ["A cat", "", "The child sees", "A"], tokenizer, room)
    phrases = encode_constraints(Path("c"), ["lake\tcar", " \t", "house", "dog"], tokenizer, room)
    assert phrases[1] == []  # a blank line asks for nothing, as an empty one does
    plain = Translator(tokenizer, model, config.decode, CPU).translate(STEER_LINES)
    steered = Translator(tokenizer, model, config.decode, CPU).translate(
        STEER_LINES, prefixes=prefixes, constraints=phrases
    )
    texts = [h[0].text for h in steered]
    assert texts[0].startswith("A cat") and "lake" in texts[0] and "car" in texts[0]
    assert texts[1] == plain[1][0].text  # neither a prefix nor constraints
    assert texts[2].startswith("The child sees") and "house" in texts[2]
    assert texts[3] == ""  # a blank input line is not translated
    assert plain[0][0].text.startswith("The dog") and "lake" not in plain[0][0].text


def test_unmet_constraints_give_the_plain_translation_and_a_warning(
    loaded, trained_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config, tokenizer, model = loaded
    room = model.max_positions - 2
    dog, cat = (len(tokenizer.encode_tgt([f" {word}"])[0]) for word in ("dog", "cat"))
    dogs = " ".join(["dog"] * (room // (2 * dog) + 1))  # over half an output each: both
    cats = " ".join(["cat"] * (room // (2 * cat) + 1))  # cannot fit in one
    wanted = ["dog", f"{dogs}\t{cats}", "dog"]
    phrases = encode_constraints(Path("c"), wanted, tokenizer, room)
    lines = [STEER_LINES[0], STEER_LINES[1], ""]  # a blank line is not translated: no warning
    plain = Translator(tokenizer, model, config.decode, CPU).translate(lines)
    out = Translator(tokenizer, model, config.decode, CPU).translate(lines, constraints=phrases)
    assert [h[0].tokens for h in out[1:]] == [h[0].tokens for h in plain[1:]]  # last bits differ
    assert out[1][0].score == pytest.approx(plain[1][0].score, abs=1e-5)
    source, constraints = tmp_path / "in.txt", tmp_path / "constraints.txt"
    source.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    constraints.write_text("".join(c + "\n" for c in wanted), encoding="utf-8")
    args = ["translate", "-m", str(trained_run), str(source), "--constraints", str(constraints)]
    args += ["--precision", "fp32"]  # auto may pick bf16 (an AMX CPU): other outputs than `out`
    with caplog.at_level(logging.WARNING, logger="mt"):
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and result.stdout.splitlines()[1:] == [out[1][0].text, ""]
    assert caplog.messages == ["line 2: no translation met all its constraints; wrote one without"]


def test_an_ensemble_of_a_model_with_itself_translates_as_the_model(trained_run: Path) -> None:
    runner = CliRunner()
    source = "\n".join(STEER_LINES[:3]) + "\n"
    args = ["translate", "-m", str(trained_run), "--device", "cpu", "--precision", "fp32"]
    alone = runner.invoke(app, [*args, "--nbest", "2"], input=source)
    assert alone.exit_code == 0, alone.output
    two = [*args, "-m", str(trained_run), "--nbest", "2", "--weights", "3", "--weights", "1"]
    ensemble = runner.invoke(app, two, input=source)
    assert ensemble.exit_code == 0, ensemble.output
    assert ensemble.stdout == alone.stdout  # scores printed to 4 decimals
    wrong = runner.invoke(app, [*args, "-m", str(trained_run), "--weights", "1"], input=source)
    assert str(wrong.exception) == "--weights: 1 weights for 2 models"
    bad = "--weights: each must be a finite number >= 0, and one > 0"
    for weights in (["nan", "1"], ["inf", "1"], ["1e308", "1e308"], ["-1", "2"], ["0", "0"]):
        pair = [*args, "-m", str(trained_run), "--weights", weights[0], "--weights", weights[1]]
        assert str(runner.invoke(app, pair, input=source).exception) == bad, weights
    alone = runner.invoke(app, [*args, "--weights", "2"], input=source)  # nothing to weigh
    assert str(alone.exception) == (
        "--weights: they weigh the models of an ensemble; give several --model"
    )


@pytest.fixture(scope="module")
def other_vocabulary_run(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of trained_run with a 90-piece tokenizer and random weights to match."""
    import shutil

    from mt.checkpoint import resolve_checkpoint, save_weights
    from mt.config import TokenizerConfig
    from mt.corpora import open_corpus
    from mt.model import Transformer
    from mt.rundir import checkpoint_metadata
    from mt.tokenizer import train_tokenizer

    run_dir = tmp_path_factory.mktemp("other_vocabulary") / "run"
    shutil.copytree(trained_run, run_dir, ignore=shutil.ignore_patterns("cache", "tensorboard"))
    corpus = open_corpus(str(ROOT / "tests/data/tiny/train"), "de", "en")
    config = TokenizerConfig(vocab_size=90, byte_fallback=False)
    tokenizer = train_tokenizer(corpus, run_dir / "tokenizer", config, seed=1)
    model_config = load_trained(trained_run, CPU)[0].model
    model = Transformer(model_config, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    save_weights(resolve_checkpoint(run_dir).weights, model, checkpoint_metadata(tokenizer))
    return run_dir


def test_models_with_different_vocabularies_are_refused(
    trained_run: Path, other_vocabulary_run: Path
) -> None:
    args = ["translate", "-m", str(trained_run), "-m", str(other_vocabulary_run)]
    result = CliRunner().invoke(app, args, input="Der hund .\n")
    assert isinstance(result.exception, MtError)
    assert str(result.exception) == (
        f"--model {other_vocabulary_run}: its src vocabulary has 90 pieces, not 100 as in "
        f"--model {trained_run}: the models of an ensemble must share their vocabulary"
    )


def test_models_of_other_directions_are_refused(trained_run: Path, tmp_path: Path) -> None:
    import shutil

    from mt.config import load_config

    reverse = tmp_path / "reverse"  # the same vocabulary and weights, the other direction
    shutil.copytree(trained_run, reverse, ignore=shutil.ignore_patterns("cache", "tensorboard"))
    config = reverse / "config.yaml"
    save_config(load_config(config, ["data.src_lang=en", "data.tgt_lang=de"]), config)
    args = ["translate", "-m", str(trained_run), "-m", str(reverse)]
    result = CliRunner().invoke(app, args, input="Der hund .\n")
    assert isinstance(result.exception, MtError)
    assert str(result.exception) == (
        f"--model {reverse}: it translates en-de, not de-en as --model {trained_run}: the "
        "models of an ensemble must translate the same directions"
    )


TOO_LONG = "pieces, more than the 126 an output can hold"
BAD_STEERING = [  # (option, its file's text, the error after "FILE: ")
    ("--prefix", "A dog\n", "1 lines, but {source} has 2"),
    ("--constraints", "dog\n\ncat\n", "3 lines, but {source} has 2"),
    ("--constraints", "dog\ncat\t\n", "line 2: constraint 2 is empty"),
    ("--constraints", "\t dog\n\n", "line 1: constraint 1 is empty"),
    ("--constraints", "\ndog\t{long}\n", f"line 2: constraint 2 has {{n}} {TOO_LONG}"),
    ("--prefix", "{long}\n\n", f"line 1: the prefix has {{n}} {TOO_LONG}"),
    # tiny.yaml's tokenizer has no byte pieces: characters outside it would be forced as UNK
    ("--prefix", "\nA 日本 dog\n", "line 2: the prefix holds characters that the target "
     "vocabulary lacks"),
    ("--constraints", "dog\tdog 日本\n\n", "line 1: constraint 2 holds characters that the "
     "target vocabulary lacks"),
]  # fmt: skip


@pytest.mark.parametrize(("option", "text", "error"), BAD_STEERING)
def test_bad_prefix_and_constraint_files_are_one_line_errors(
    loaded, trained_run: Path, tmp_path: Path, option: str, text: str, error: str
) -> None:
    _, tokenizer, _ = loaded
    long = " ".join(["haus"] * 200)
    n = f"{len(tokenizer.encode_tgt([long])[0]):,}"
    source, steering, target = tmp_path / "in.txt", tmp_path / "steer.txt", tmp_path / "out.txt"
    source.write_text("Der hund .\nDas kind .\n", encoding="utf-8")
    steering.write_text(text.format(long=long), encoding="utf-8")
    args = ["translate", "-m", str(trained_run), str(source), option, str(steering)]
    result = CliRunner().invoke(app, [*args, "-o", str(target)])
    assert isinstance(result.exception, MtError) and result.exit_code != 0
    assert str(result.exception) == f"{steering}: " + error.format(source=source, n=n)
    assert sorted(tmp_path.iterdir()) == sorted([source, steering])  # nothing written


def test_out_of_gpu_memory_is_one_line(
    trained_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Translator, "batches", out_of_memory)
    source = tmp_path / "in.txt"
    source.write_text("Der hund .\n", encoding="utf-8")
    code, out, err = run_main(monkeypatch, capsys, caplog, "translate", "-m", str(trained_run),
                              str(source), "--precision", "fp32")  # fmt: skip
    assert (code, out) == (1, "")
    assert err.splitlines()[-1] == (
        "error: out of GPU memory: decode in smaller batches (--max-tokens) or with a "
        "smaller --beam"
    )
    assert "Traceback" not in err


def test_a_bad_prefix_on_stdin_is_named_stdin(trained_run: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.txt"
    source.write_text("Der hund .\nDas kind .\n", encoding="utf-8")
    args = ["translate", "-m", str(trained_run), str(source), "--prefix", "-"]
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "out.txt")], input="\nA 日本\n")
    assert isinstance(result.exception, MtError)
    assert str(result.exception) == (
        "stdin: line 2: the prefix holds characters that the target vocabulary lacks"
    )


def test_beam_caps_the_runs_nbest_and_one_stdin_at_most(trained_run: Path, tmp_path: Path) -> None:
    config = load_config(trained_run / "config.yaml", ["decode.nbest=2", "decode.beam=2"])
    assert decode_settings(config, beam=1).nbest == 1  # not "decode.nbest=2 exceeds decode.beam"
    sampled = load_config(trained_run / "config.yaml", ["decode.sampling=true", "decode.nbest=4"])
    assert decode_settings(sampled, sampling=False, beam=2).nbest == 2  # beam search: capped
    one = load_config(trained_run / "config.yaml", ["decode.sampling=true", "decode.beam=1",
                                                    "decode.nbest=4"])  # fmt: skip
    assert decode_settings(one, sampling=False).nbest == 1  # by the run's beam, too
    assert decode_settings(config, sampling=True, beam=1).nbest == 2  # samples: not capped
    with pytest.raises(MtError) as err:
        decode_settings(config, beam=3, top_p=0.9, seed=1)  # sampling is off: they do nothing
    assert str(err.value) == "command line: --top-p applies to sampling only: add --sampling"
    assert decode_settings(sampled, top_k=5).top_k == 5
    with pytest.raises(MtError) as err:
        translate_file("-", [trained_run], prefix=Path("-"))
    assert str(err.value) == "FILE and --prefix both read standard input (-): give one a file"
    afile = tmp_path / "a.de"
    afile.write_text("x\n", encoding="utf-8")
    with pytest.raises(MtError) as err:
        translate_file(str(afile), [trained_run], output=afile / "out.txt")
    assert str(err.value) == f"{afile / 'out.txt'}: {afile} is not a directory"
