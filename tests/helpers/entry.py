"""The real `mt` entry point (mt.cli.main) in the test's own process: a Python start-up saved."""

from __future__ import annotations

import logging
import os
import signal
import sys

import pytest

from mt.cli import main


def run_main(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
    *args: str,
) -> tuple[int, str, str]:
    """`mt ARGS` as a shell runs it, in-process: (exit code, stdout, stderr).

    The log lines `mt` would print on stderr (INFO and up) come first in that stderr, one line
    per record, so that "stderr is one `error:` line" holds here as it does in a subprocess.
    main()'s signal handlers and environment default are undone afterwards.
    """
    monkeypatch.setattr(sys, "argv", ["mt", *args])
    # Click names the program after argv[0] unless __main__ is a package's (pytest's is).
    monkeypatch.setattr(sys.modules["__main__"], "__package__", None, raising=False)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", os.environ.get("TOKENIZERS_PARALLELISM", "false"))
    handlers = {stop: signal.getsignal(stop) for stop in (signal.SIGTERM, signal.SIGUSR1)}
    capsys.readouterr()
    caplog.clear()
    code: object = 0
    try:
        with caplog.at_level(logging.INFO):
            main()
    except SystemExit as exc:
        code = exc.code
    finally:
        for stop, handler in handlers.items():
            signal.signal(stop, handler)
    out, err = capsys.readouterr()
    logged = "".join(f"{record.getMessage()}\n" for record in caplog.records)
    if isinstance(code, str):  # sys.exit("message"): Python prints it, exit status 1
        code, err = 1, f"{err}{code}\n"
    return int(code or 0), out, logged + err
