"""Waiting on events in a child process's output, with a timeout only as a safety net."""

from __future__ import annotations

import os
import selectors
import time
from typing import IO

# Long enough for a loaded 2-core machine to start torchrun and two workers many times over:
# reaching it means the child hangs, never that it is slow.
SAFETY_NET_S = 300.0


def read_until(stream: IO[bytes], text: str, timeout: float = SAFETY_NET_S) -> bytes:
    """Read a child's pipe until `text` appears: all bytes read (later reads continue after them).

    AssertionError, with what was read, if the pipe closes first (the child ended) or if
    `timeout` seconds pass without it.
    """
    fd, wanted, seen = stream.fileno(), text.encode(), b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while wanted not in seen:
            if not selector.select(max(deadline - time.monotonic(), 0)):
                raise AssertionError(
                    f"no {text!r} after {timeout:g} s:\n{seen.decode(errors='replace')[-3000:]}"
                )
            chunk = os.read(fd, 1 << 16)  # the raw fd: nothing is left in a Python buffer
            if not chunk:
                raise AssertionError(
                    f"the pipe closed before {text!r}:\n{seen.decode(errors='replace')[-3000:]}"
                )
            seen += chunk
    return seen
