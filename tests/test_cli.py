"""Tests for the `mt` command line: help, error reporting, data fetch/prepare, tokenizer commands.

A few tests run the real `mt` entry point (exit codes, the one-line `error:` message on stderr,
log lines): in a subprocess, or in-process through `main()` (helpers.entry) where no start-up,
signal or file descriptor matters; the rest use Typer's CliRunner on `mt.cli.app`, where a user
error surfaces as the MtError that `main()` would print.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from helpers.entry import run_main as run_mt_here
from typer.testing import CliRunner, Result

from mt.cli import app
from mt.errors import ConfigError, DataError, MtError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
TINY_DATA = ROOT / "tests" / "data" / "tiny"
_SCRIPT = Path(sys.executable).with_name("mt")
MT = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "mt"]
WIDE = {"COLUMNS": "200", "NO_COLOR": "1"}  # help on one line per option, without colours


def run_mt(
    *args: str, stdin: bytes = b"", env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """The real `mt` command: (exit code, stdout, stderr)."""
    proc = subprocess.run(
        [*MT, *args],
        input=stdin,
        capture_output=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        timeout=120,
    )
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


def invoke(
    *args: str, stdin: str | bytes | None = None, env: dict[str, str] | None = None
) -> Result:
    """`mt ARGS` in-process."""
    return CliRunner().invoke(app, list(args), input=stdin, env={**WIDE, **(env or {})})


def tiny_args(run_dir: Path, *overrides: str) -> list[str]:
    """`--config tiny.yaml` with absolute data paths (so any working directory works)."""
    return [
        "--config",
        str(TINY),
        f"run_dir={run_dir}",
        f"data.train={TINY_DATA / 'train'}",
        f"data.valid={TINY_DATA / 'valid'}",
        f"data.test={TINY_DATA / 'valid'}",
        *overrides,
    ]


def only_error_line(stderr: str) -> str:
    """The single stderr line of a failed command (no traceback, no log lines)."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A tiny run after one `mt data prepare` in a subprocess: (run dir, stdout, stderr)."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    code, out, err = run_mt("data", "prepare", *tiny_args(run_dir))
    assert code == 0, err
    return run_dir, out, err


# --- help ------------------------------------------------------------------------------------


def test_help_lists_the_commands() -> None:
    code, out, err = run_mt("--help", env=WIDE)
    assert code == 0, err
    for command in ("train", "data", "tokenizer"):
        assert f" {command} " in out
    out = invoke("data", "--help").stdout
    assert " fetch " in out and " prepare " in out
    out = invoke("tokenizer", "--help").stdout
    assert all(f" {c} " in out for c in ("train", "encode", "decode"))


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        (["data", "fetch"], ["--langs", "[default: de,en,fr,cs]", "--mirror", "MT_DATA_MIRROR"]),
        (["data", "prepare"], ["--config", "[required]", "overrides"]),
        (["tokenizer", "train"], ["--config", "[required]", "overrides"]),
        (["tokenizer", "encode"], ["--model", "[default: src]", "--pieces", "[default: -]"]),
        (["tokenizer", "decode"], ["--model", "[default: tgt]", "src|tgt"]),
    ],
)
def test_command_help_shows_options_and_defaults(command: list[str], shown: list[str]) -> None:
    result = invoke(*command, "--help")
    assert result.exit_code == 0, result.output
    for text in shown:
        assert text in result.stdout, (text, result.stdout)


# --- errors through the real entry point -----------------------------------------------------


def test_usage_errors_exit_2_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    cases = [
        (["translate", "--beam", "0", "x"], "error: mt translate: Invalid value for '--beam': "
         "Input should be greater than or equal to 1 (see mt translate --help)"),
        (["train"], "error: mt train: Missing option '--config' / '-c' (see mt train --help)"),
        (["bogus"], "error: mt: No such command 'bogus' (see mt --help)"),
    ]  # fmt: skip
    for args, expected in cases:  # in-process: main() as `mt` runs it, a Python start-up less
        code, _, err = run_mt_here(monkeypatch, capsys, caplog, *args)
        assert (code, err.splitlines()) == (2, [expected])


@pytest.mark.slow
def test_the_real_command_names_itself_in_usage_errors_and_prints_help() -> None:
    prog = "mt" if _SCRIPT.is_file() else "python -m mt"
    code, _, err = run_mt("translate", "--beam", "0", "x")
    assert (code, err.splitlines()) == (2, [
        f"error: {prog} translate: Invalid value for '--beam': Input should be greater than or "
        f"equal to 1 (see {prog} translate --help)"
    ])  # fmt: skip
    code, out, err = run_mt("translate", "--help")
    assert code == 0 and "--beam" in out and err == ""


def test_config_errors_exit_2_with_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    run_dir = tmp_path / "run"
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  heads: 3\n", encoding="utf-8")
    cases = [
        (["--config", str(TINY), f"run_dir={run_dir}", "model.foo=1"],
         "error: command line: unknown key model.foo"),
        (["--config", str(tmp_path / "none.yaml")],
         f"error: {tmp_path / 'none.yaml'}: no such config file"),
        (["--config", str(bad), f"run_dir={run_dir}"],
         f"error: {bad}: model.heads=3 does not divide model.dim=512"),
        (["--config", str(TINY), f"run_dir={run_dir}", "data.train="],
         "error: command line: data.train is empty; set it in the config or data.train=PATH"),
    ]  # fmt: skip
    for args, expected in cases:  # in-process: main() as `mt` runs it, a Python start-up less
        code, _, err = run_mt_here(monkeypatch, capsys, caplog, "data", "prepare", *args)
        assert code == 2, err
        assert only_error_line(err) == expected
    assert not run_dir.exists()  # nothing written


@pytest.mark.slow
def test_data_errors_exit_1_with_one_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    missing = tmp_path / "missing"
    code, _, err = run_mt("data", "prepare", *tiny_args(run_dir, f"data.valid={missing}"))
    assert code == 1
    line = only_error_line(err)
    assert line.startswith(f"error: data.valid: corpus {missing}: no de file")
    assert not run_dir.exists()  # checked before the tokenizer is trained


def test_train_checks_test_data_resume_and_cache_before_any_work(tmp_path: Path) -> None:
    run_dir, missing, a_file = tmp_path / "run", tmp_path / "missing", tmp_path / "a_file"
    a_file.write_text("", encoding="utf-8")
    for lang in ("de", "en"):
        (tmp_path / f"empty.{lang}").write_text("", encoding="utf-8")
    empty = tmp_path / "empty"
    shipped = tmp_path / "shipped" / "checkpoints" / "step-00000010.safetensors"  # no state
    shipped.parent.mkdir(parents=True)
    shipped.write_bytes(b"weights")
    cases = [
        (tiny_args(run_dir, f"data.test={missing}"), f"data.test: corpus {missing}: no de file"),
        (tiny_args(run_dir, f"data.valid={empty}"),
         f"valid: {empty}.de + {empty}.en: no sentence pairs"),
        ([*tiny_args(run_dir), "--resume", str(missing / "step-1.safetensors")],
         f"{missing / 'step-1.safetensors'}: no checkpoint found"),
        ([*tiny_args(run_dir), "--resume", str(shipped.parent.parent)],
         f"--resume {shipped.parent.parent}: {shipped.with_suffix('').with_suffix('.state.pt')} "
         "is missing (resuming needs it)"),
        (tiny_args(run_dir, f"data.cache_dir={a_file}"),
         f"data.cache_dir {a_file}: not a directory"),
    ]  # fmt: skip
    for args, message in cases:
        result = invoke("train", *args)
        assert isinstance(result.exception, MtError), result.output
        assert str(result.exception).startswith(message)
        assert not (run_dir / "tokenizer").exists()  # nothing slow has started
        assert not run_dir.exists() or list(run_dir.iterdir()) == []  # not even a lock file


def test_train_checks_the_run_directorys_tensorboard_before_any_work(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "tensorboard").write_text("", encoding="utf-8")  # e.g. a copy gone wrong
    result = invoke("train", *tiny_args(run_dir))
    assert str(result.exception) == f"run_dir {run_dir / 'tensorboard'}: not a directory"
    assert not (run_dir / "tokenizer").exists()  # nothing slow has started


def test_train_never_rewrites_a_hand_written_config_in_the_run_directory(tmp_path: Path) -> None:
    from mt.config import load_config, save_config
    from mt.rundir import check_config_file

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    mine = run_dir / "config.yaml"
    args = tiny_args(run_dir)[2:]  # the overrides: run_dir and data paths
    text = "# my experiment\n" + TINY.read_text(encoding="utf-8")
    mine.write_text(text, encoding="utf-8")
    result = invoke("train", "--config", str(mine), *args)
    assert isinstance(result.exception, ConfigError)
    assert str(result.exception) == (
        f"{mine}: the run's own config.yaml, which mt train rewrites with the resolved config; "
        f"keep yours outside {run_dir} (e.g. in configs/)"
    )
    assert mine.read_text(encoding="utf-8") == text
    save_config(load_config(TINY, args), mine)  # as mt train writes it: resuming from it is fine
    check_config_file(mine, load_config(mine, ["train.max_steps=5"]))
    # As an older mt wrote it, which knew fewer keys: fine too (it was refused once upgraded).
    older = [line for line in mine.read_text().splitlines(keepends=True) if "ema_decay" not in line]
    mine.write_text("".join(older))
    check_config_file(mine, load_config(mine))
    mine.write_text("# mine\n" + "".join(older))  # but not with a comment of its own
    with pytest.raises(ConfigError):
        check_config_file(mine, load_config(mine))


def test_broken_dev_data_and_a_shared_tsv_are_found_before_any_work(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    lines = (TINY_DATA / "valid.en").read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "v.de").write_text((TINY_DATA / "valid.de").read_text(encoding="utf-8"))
    (tmp_path / "v.en").write_text("".join(lines[:5]), encoding="utf-8")
    result = invoke("data", "prepare", *tiny_args(run_dir, f"data.valid={tmp_path / 'v'}"))
    assert isinstance(result.exception, DataError)
    assert str(result.exception) == (
        f"valid: {tmp_path / 'v.de'} has {len(lines)} lines but {tmp_path / 'v.en'} has 5"
    )
    assert not run_dir.exists()
    tsv = tmp_path / "both.tsv"
    tsv.write_text("Der hund .\tThe dog .\n", encoding="utf-8")
    both = "data.corpora=[{src_lang: de, tgt_lang: en}, {src_lang: en, tgt_lang: de}]"
    result = invoke("data", "prepare", *tiny_args(run_dir, f"data.train={tsv}", both))
    assert isinstance(result.exception, DataError)
    assert str(result.exception) == (
        f"data.train for data.corpora[1]: {tsv}: a .tsv file holds one direction (source, tab, "
        "target), and de-en reads this one: give en-de its own"
    )
    alias = tmp_path / ".." / tmp_path.name / "both.tsv"  # the same file, from another split
    other = tmp_path / "other.tsv"
    other.write_text("The dog .\tDer hund .\n", encoding="utf-8")
    split = f"[{{src_lang: de, tgt_lang: en, train: {tsv}}}, {{src_lang: en, tgt_lang: de, "
    split += f"train: {other}, valid: {alias}}}]"
    # Without data.train: every corpus names its own, so it would be refused as doing nothing.
    args = [a for a in tiny_args(run_dir, f"data.corpora={split}") if "data.train=" not in a]
    result = invoke("data", "prepare", *args)
    assert str(result.exception) == (
        f"data.corpora[1].valid: {alias}: a .tsv file holds one direction (source, tab, target), "
        "and de-en reads this one: give en-de its own"
    )


def test_a_read_only_cache_serves_its_complete_entries(
    prepared: tuple[Path, str, str], small_fs, tmp_path: Path
) -> None:
    run_dir, out, _ = prepared
    cache = small_fs.mount(tmp_path / "cache")  # e.g. a finished cache shared read-only
    shutil.copytree(run_dir / "cache", cache, dirs_exist_ok=True)
    small_fs.make_read_only(cache)
    args = tiny_args(run_dir, f"data.cache_dir={cache}")
    result = invoke("data", "prepare", *args)
    assert result.exit_code == 0, result.output
    assert result.stdout == out  # every entry read from it
    # An entry it lacks must be written: one line naming the cache, before any encoding.
    result = invoke("data", "prepare", *args, "data.max_len=32")
    assert isinstance(result.exception, MtError), result.exception
    assert str(result.exception) == f"{cache}: cannot write (Read-only file system)"
    # A run whose tokenizer is still to train needs new entries: refused before training it.
    fresh = tiny_args(tmp_path / "fresh", f"data.cache_dir={cache}")
    with mock.patch("mt.rundir.train_tokenizer", side_effect=AssertionError("trained")):
        result = invoke("data", "prepare", *fresh)
    assert isinstance(result.exception, DataError), result.exception
    assert str(result.exception) == (
        f"data.cache_dir {cache}: cannot write files in {cache} (Read-only file system)"
    )


def test_training_data_that_the_filters_empty_is_an_error(tmp_path: Path) -> None:
    result = invoke("data", "prepare", *tiny_args(tmp_path / "run", "data.max_len=2"))
    assert isinstance(result.exception, DataError)
    message = str(result.exception)
    assert message.startswith(f"data.train: {TINY_DATA / 'train.de'} + ")
    assert ": no pairs left to train on, kept 0 of 500 pairs (dropped: 0 empty, " in message
    assert message.endswith("(see data.max_len and data.max_ratio)")
    # In a run of several directions the message names the corpus's own key.
    tsv = tmp_path / "short.tsv"
    tsv.write_text("x\ta b c d e f g h i j k l m n o p q r s t\n", encoding="utf-8")
    second = f"{{src_lang: en, tgt_lang: de, train: {tsv}}}"
    both = f"data.corpora=[{{src_lang: de, tgt_lang: en}}, {second}]"
    result = invoke("data", "prepare", *tiny_args(tmp_path / "run2", both))
    assert isinstance(result.exception, DataError)
    assert str(result.exception).startswith(f"data.corpora[1].train: {tsv}: no pairs left to train")


@pytest.mark.slow
def test_os_errors_are_one_line(prepared: tuple[Path, str, str], tmp_path: Path) -> None:
    run_dir, _, _ = prepared
    blocker = tmp_path / "file"
    blocker.write_text("x", encoding="utf-8")
    code, _, err = run_mt("data", "prepare", *tiny_args(run_dir, f"data.cache_dir={blocker}/c"))
    assert code == 1
    assert err.splitlines()[-1] == (
        f"error: data.cache_dir {blocker}/c: cannot create ({blocker} is not a directory)"
    )
    assert "Traceback" not in err
    result = invoke("tokenizer", "train", *tiny_args(blocker / "run"))
    assert isinstance(result.exception, DataError)
    assert str(result.exception) == f"run_dir {blocker / 'run'}: cannot create (Not a directory)"


@pytest.mark.slow
def test_a_full_disk_under_checkpoints_is_one_line(
    trained_run: Path, small_fs, tmp_path: Path
) -> None:
    # The trained run, resumed for one step, with its checkpoints on a file system now full.
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    checkpoints = small_fs.mount(run / "checkpoints")
    for path in (trained_run / "checkpoints").iterdir():
        shutil.copyfile(path, checkpoints / path.name)
    before = {path.name: path.read_bytes() for path in checkpoints.iterdir()}
    small_fs.fill(checkpoints)
    overrides = ("train.max_steps=301", "train.valid_every=100", "train.report=false")
    code, _, err = run_mt("train", *tiny_args(run, *overrides))
    assert code == 1, err
    assert re.fullmatch(
        rf"error: {checkpoints}/step-00000301\.(safetensors|state\.pt): "
        r"cannot write \(No space left on device\)",
        err.splitlines()[-1],
    ), err
    assert "Traceback" not in err
    after = {p.name: p.read_bytes() for p in checkpoints.iterdir() if p.name != ".filler"}
    assert after == before  # the previous checkpoints and best as they were; no temp file


# --- data prepare ----------------------------------------------------------------------------


def test_prepare_prints_statistics(prepared: tuple[Path, str, str]) -> None:
    _, out, err = prepared
    lines = out.splitlines()
    assert lines[0] == (
        "train: kept 500 of 500 pairs (dropped: 0 empty, 0 over 64 tokens, "
        "0 with length ratio over 3.0)"
    )
    assert lines[1].startswith("train: ") and lines[1].endswith(" target tokens")
    assert "batches of <= 256 tokens per epoch" in lines[2] and "non-pad" in lines[2]
    assert "valid: kept 40 of 40 pairs (not filtered)" in lines
    assert "valid: unknown pieces 0.000% source, 0.000% target" in lines
    assert any(line.startswith("test: ") for line in lines)
    assert "training a bpe tokenizer (100 pieces" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_second_prepare_reuses_the_cache(prepared: tuple[Path, str, str]) -> None:
    run_dir, first_out, _ = prepared
    cache_files = sorted((run_dir / "cache").rglob("*"))
    tokenizer = run_dir / "tokenizer" / "spm.model"
    mtimes = {p: p.stat().st_mtime_ns for p in [*cache_files, tokenizer]}
    code, out, err = run_mt("data", "prepare", *tiny_args(run_dir))
    assert code == 0, err
    assert out == first_out
    assert "training" not in err
    assert "using the run's tokenizer" in err
    assert err.count(f"reused the cached encoding in {run_dir / 'cache'}") == 3  # train/valid/test
    assert sorted((run_dir / "cache").rglob("*")) == cache_files
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_too_small_max_tokens_is_a_config_error(prepared: tuple[Path, str, str]) -> None:
    run_dir, _, _ = prepared
    result = invoke("data", "prepare", *tiny_args(run_dir, "train.max_tokens=20"))
    assert isinstance(result.exception, ConfigError)
    assert str(result.exception) == (
        "command line: train.max_tokens=20 cannot hold a sentence of data.max_len=64 tokens "
        "(needs at least 65)"
    )


def test_prepare_needs_a_config() -> None:
    result = invoke("data", "prepare", "run_dir=x")
    assert result.exit_code == 2
    assert "Missing option '--config'" in result.output


# --- tokenizer -------------------------------------------------------------------------------


def test_tokenizer_train_reuses_and_reports_unk_rate(prepared: tuple[Path, str, str]) -> None:
    run_dir, _, _ = prepared
    model = run_dir / "tokenizer" / "spm.model"
    before = model.stat().st_mtime_ns
    result = invoke("tokenizer", "train", *tiny_args(run_dir))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        str(model),
        "valid: unknown pieces 0.000% source, 0.000% target",
    ]
    assert model.stat().st_mtime_ns == before
    # A tokenizer of the other kind would replace the one the run's checkpoints need.
    per_side = tiny_args(run_dir, "tokenizer.joint=false", "model.share_embeddings=false")
    for command in (["tokenizer", "train"], ["data", "prepare"]):
        refused = invoke(*command, *per_side)
        assert isinstance(refused.exception, ConfigError)
        assert str(refused.exception) == (
            f"tokenizer.joint=false: the run's tokenizer in {run_dir / 'tokenizer'} is joint; "
            "delete it to train another (the run's checkpoints need it)"
        )
    assert sorted(p.name for p in model.parent.iterdir()) == ["spm.model", "trained_on.json"]
    assert model.stat().st_mtime_ns == before


def test_reusing_a_tokenizer_warns_of_each_setting_it_was_not_trained_with(
    prepared: tuple[Path, str, str], caplog: pytest.LogCaptureFixture
) -> None:
    run_dir, _, _ = prepared
    directory = run_dir / "tokenizer"
    same = invoke("tokenizer", "train", *tiny_args(run_dir, "tokenizer.character_coverage=1"))
    assert same.exit_code == 0, same.output
    assert not [m for m in caplog.messages if m.startswith("warning")]
    settings = ["type=unigram", "vocab_size=120", "character_coverage=0.9995", "byte_fallback=true"]
    other = tiny_args(run_dir, *(f"tokenizer.{s}" for s in settings))
    result = invoke("tokenizer", "train", *other)
    assert result.exit_code == 0, result.output
    warnings = [m for m in caplog.messages if m.startswith("warning")]
    trained = ["type=bpe", "vocab_size=100", "character_coverage=1.0", "byte_fallback=false"]
    assert warnings == [
        f"warning: the run's tokenizer was trained with tokenizer.{was}, not "
        f"{now.split('=')[1]}; delete {directory} to retrain it"
        for was, now in zip(trained, settings, strict=True)
    ]


def test_reusing_a_tokenizer_trained_on_other_data_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir, other = tmp_path / "run", tmp_path / "other"
    for lang in ("de", "en"):  # the same text, named otherwise: a changed data.train
        (tmp_path / f"other.{lang}").write_bytes((TINY_DATA / f"train.{lang}").read_bytes())
    assert invoke("tokenizer", "train", *tiny_args(run_dir)).exit_code == 0
    assert json.loads((run_dir / "tokenizer" / "trained_on.json").read_text()) == {
        "de-en": str(TINY_DATA / "train")
    }
    assert invoke("tokenizer", "train", *tiny_args(run_dir)).exit_code == 0
    assert not [m for m in caplog.messages if m.startswith("warning")]
    assert invoke("tokenizer", "train", *tiny_args(run_dir, f"data.train={other}")).exit_code == 0
    assert [m for m in caplog.messages if m.startswith("warning")] == [
        f"warning: the run's tokenizer was trained on de-en {TINY_DATA / 'train'}, not de-en "
        f"{other.resolve()}; delete {run_dir / 'tokenizer'} to retrain it"
    ]
    # The record edited by hand into another kind of JSON, or into none: one line naming it.
    record = run_dir / "tokenizer" / "trained_on.json"
    for text, problem in [
        ('["de-en"]', "not a JSON object"),
        ('{"de-en": ', "not JSON (Expecting value: line 1 column 11 (char 10))"),
    ]:
        record.write_text(text, encoding="utf-8")
        result = invoke("tokenizer", "train", *tiny_args(run_dir))
        assert isinstance(result.exception, MtError), result.exception
        assert str(result.exception) == f"{record}: damaged, {problem}"


def test_tokenizer_train_from_scratch(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = invoke("tokenizer", "train", *tiny_args(run_dir, "data.valid=", "data.test="))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [str(run_dir / "tokenizer" / "spm.model")]
    assert not (run_dir / "cache").exists()  # training a tokenizer encodes nothing


def test_encode_decode_round_trip(prepared: tuple[Path, str, str], tmp_path: Path) -> None:
    run_dir, _, _ = prepared
    lines = (TINY_DATA / "valid.en").read_text(encoding="utf-8").splitlines()
    result = invoke(
        "tokenizer", "encode", "-m", str(run_dir), "--side", "tgt", str(TINY_DATA / "valid.en")
    )
    assert result.exit_code == 0, result.output
    ids = result.stdout.splitlines()
    assert len(ids) == len(lines)
    assert all(line.split() and all(t.isdigit() for t in line.split()) for line in ids)
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text(result.stdout, encoding="utf-8")
    # A file argument and stdin give the same result; so does the tokenizer directory.
    by_file = invoke("tokenizer", "decode", "-m", str(run_dir), str(ids_file))
    by_stdin = invoke("tokenizer", "decode", "-m", str(run_dir / "tokenizer"), stdin=result.stdout)
    assert by_file.stdout.splitlines() == by_stdin.stdout.splitlines() == lines
    # A model file of any name: that file (one beside it named spm.model is another model).
    custom = tmp_path / "sp" / "custom.model"
    custom.parent.mkdir()
    shutil.copy(run_dir / "tokenizer" / "spm.model", custom)
    (custom.parent / "spm.model").write_bytes(b"")
    by_model = invoke("tokenizer", "decode", "-m", str(custom), str(ids_file))
    assert by_model.exit_code == 0, by_model.output
    assert by_model.stdout.splitlines() == lines


def test_a_closed_stdin_or_stdout_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from mt.corpora import read_lines
    from mt.translate import check_output_path

    monkeypatch.setattr(sys, "stdin", None)  # what Python makes of `mt ... <&-`
    with pytest.raises(DataError, match=r"^stdin: closed; give a file$"):
        list(read_lines("-"))
    monkeypatch.setattr(sys, "stdout", None)  # `>&-`: refused before a model is loaded
    with pytest.raises(MtError, match=r"^stdout: closed; give --output FILE$"):
        check_output_path(None)


def assert_full_stdout_is_one_line(command: list[str]) -> None:
    """`command` with stdout on a full disk: exit 1 and one line saying so."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open("/dev/full", "w") as full:
        proc = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, env=env, timeout=120)
    assert proc.returncode == 1  # not 120, from Python failing to flush stdout again at exit
    assert proc.stderr.decode().splitlines() == [
        "error: stdout: cannot write (No space left on device)"
    ]


@pytest.mark.slow  # starts mt
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_stdout_on_a_full_disk_is_one_line_and_a_closed_stderr_stops_nothing(
    tmp_path: Path,
) -> None:
    hyp = tmp_path / "hyp.txt"
    hyp.write_text("a dog runs .\n", encoding="utf-8")
    command = [*MT, "evaluate", "--hyp", str(hyp), "--ref", str(hyp)]  # as translate, encode
    assert_full_stdout_is_one_line(command)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    closed = subprocess.run(
        command, capture_output=True, env=env, timeout=120, preexec_fn=lambda: os.close(2)
    )
    assert closed.returncode == 0
    assert closed.stdout.decode().startswith("BLEU = 100.00 ")


@pytest.mark.slow  # starts mt
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_every_command_says_a_full_stdout_in_one_line(trained_run: Path, tmp_path: Path) -> None:
    # `mt plot` prints the file it wrote, as average, export, report and data commands print
    # theirs: stdout failing there is one line and exit 1, as for translate's output.
    assert_full_stdout_is_one_line([*MT, "plot", str(trained_run), "-o", str(tmp_path / "c.png")])
    assert (tmp_path / "c.png").is_file()  # the work was done; only its echo failed


def test_a_bad_mirror_from_the_environment_is_named_as_such(tmp_path: Path) -> None:
    result = invoke(
        "data", "fetch", "multi30k", str(tmp_path / "d"), env={"MT_DATA_MIRROR": "http://[::1"}
    )
    assert str(result.exception).startswith("MT_DATA_MIRROR http://[::1: not a valid URL")


def test_encode_pieces_keep_one_line_per_line(prepared: tuple[Path, str, str]) -> None:
    run_dir, _, _ = prepared
    # \x0c and \u2028 are line breaks to str.splitlines() but not to files; \r\n is one ending.
    text = "der hund\x0cmag\r\nden see\u2028im park\n\nam morgen"
    result = invoke("tokenizer", "encode", "-m", str(run_dir), "--pieces", stdin=text.encode())
    assert result.exit_code == 0, result.output
    out = result.stdout.split("\n")
    assert len(out) == 5 and out[-1] == ""
    assert out[0] and out[1] and out[2] == "" and out[3]


def test_encode_takes_the_one_target_language_of_a_run_without_tags(trained_run: Path) -> None:
    run_dir = trained_run  # de-en: one target language, no tags
    plain = invoke("tokenizer", "encode", "-m", str(run_dir), stdin=b"der hund\n")
    en = invoke("tokenizer", "encode", "-m", str(run_dir), "--tgt-lang", "en", stdin=b"der hund\n")
    assert en.exit_code == 0 and en.stdout == plain.stdout != ""  # as translate reads it
    fr = invoke("tokenizer", "encode", "-m", str(run_dir), "--tgt-lang", "fr", stdin=b"der hund\n")
    assert str(fr.exception) == "--tgt-lang fr: the model translates into en only"


@pytest.mark.slow  # a second or more: the full suite runs it
def test_a_reader_that_leaves_early_ends_the_command_quietly(
    prepared: tuple[Path, str, str], tmp_path: Path
) -> None:
    run_dir, _, _ = prepared
    big = tmp_path / "big.de"
    big.write_text("der hund mag den see im park\n" * 50_000, encoding="utf-8")  # > a pipe's buffer
    proc = subprocess.Popen(
        [*MT, "tokenizer", "encode", "-m", str(run_dir), str(big)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().split()  # `| head -1`: one line read, then the pipe closes
    proc.stdout.close()
    assert proc.wait(timeout=120) == 141  # 128 + SIGPIPE, as other filters end
    assert proc.stderr.read() == b""


def test_encode_invalid_utf8_names_the_line(
    prepared: tuple[Path, str, str], tmp_path: Path
) -> None:
    run_dir, _, _ = prepared
    bad = tmp_path / "bad.de"
    bad.write_bytes(b"gut\n\xff kaputt\n")
    for args, stdin, name in [([str(bad)], None, str(bad)), ([], bad.read_bytes(), "stdin")]:
        result = invoke("tokenizer", "encode", "-m", str(run_dir), *args, stdin=stdin)
        assert isinstance(result.exception, DataError)
        assert str(result.exception) == f"{name}: line 2 is not valid UTF-8"


@pytest.mark.parametrize("line", ["5 x", "5 -1", "5 100", "5 ²"])
def test_decode_rejects_bad_ids(prepared: tuple[Path, str, str], line: str) -> None:
    run_dir, _, _ = prepared
    result = invoke("tokenizer", "decode", "-m", str(run_dir), stdin=f"5 6\n{line}\n")
    assert isinstance(result.exception, DataError), result.output
    assert str(result.exception).startswith(f"stdin: line 2: {line.split()[1]!r} is not a piece id")


def test_tokenizer_input_errors(prepared: tuple[Path, str, str], tmp_path: Path) -> None:
    run_dir, _, _ = prepared
    cases = [
        (
            ["-m", str(tmp_path / "nope")],
            f"{tmp_path / 'nope'}: no such run or tokenizer directory",
        ),
        (
            ["-m", str(tmp_path)],
            f"{tmp_path}: no tokenizer found (expected spm.model, or spm.src.model and "
            "spm.tgt.model)",
        ),
        (
            ["-m", str(run_dir), str(tmp_path / "none.txt")],
            f"{tmp_path / 'none.txt'}: no such file",
        ),
        (["-m", str(run_dir), str(tmp_path)], f"{tmp_path}: is a directory, not a file"),
    ]
    for args, message in cases:
        result = invoke("tokenizer", "encode", *args, stdin="")
        assert isinstance(result.exception, DataError)
        assert str(result.exception) == message
    result = invoke("tokenizer", "encode", "-m", str(run_dir), "--side", "both", stdin="x")
    assert result.exit_code == 2 and "'both' is not one of 'src', 'tgt'" in result.output


# --- data fetch ------------------------------------------------------------------------------


def test_fetch_argument_errors(tmp_path: Path) -> None:
    result = invoke("data", "fetch", "wmt14", str(tmp_path))
    assert type(result.exception) is MtError
    assert str(result.exception) == "unknown data set 'wmt14' (available: multi30k)"
    result = invoke("data", "fetch", "multi30k", str(tmp_path), "--langs", "de,xx")
    assert isinstance(result.exception, DataError)
    assert "unknown Multi30k language(s): xx" in str(result.exception)
    assert list(tmp_path.iterdir()) == []


def test_fetch_from_a_local_mirror(multi30k: Path, tmp_path: Path) -> None:
    dest = tmp_path / "multi30k"
    args = ["data", "fetch", "multi30k", str(dest), "--langs", "de, en,de"]
    code, out, err = run_mt(*args, "--mirror", str(multi30k))
    assert code == 0, err
    names = [
        f"{split}.{lang}.gz"
        for split in ("train", "val", "test_2016_flickr")
        for lang in ("de", "en")
    ]
    assert out.splitlines() == [str(dest / name) for name in names]
    assert err.splitlines() == [f"{name}: copied, SHA-256 verified" for name in names]
    for name in names:
        assert (dest / name).read_bytes() == (multi30k / name).read_bytes()
    mtimes = {p: p.stat().st_mtime_ns for p in dest.iterdir()}
    # The second run takes the mirror from the environment and downloads nothing.
    result = invoke(*args, env={"MT_DATA_MIRROR": str(multi30k)})
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [str(dest / name) for name in names]
    assert {p: p.stat().st_mtime_ns for p in dest.iterdir()} == mtimes
