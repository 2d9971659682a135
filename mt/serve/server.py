"""`mt serve`: load a trained model once, then serve it over HTTP with uvicorn.

SIGTERM (or Ctrl-C) stops accepting connections, answers every request already queued without
waiting to gather more, and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import torch
import uvicorn

from mt.checkpoint import Checkpoint
from mt.config import Config, DecodeConfig
from mt.errors import MtError
from mt.metrics import read_metrics, selected_bleu
from mt.model import Transformer, count_parameters
from mt.packing import pack
from mt.quantize import quantize
from mt.rundir import load_trained
from mt.serve.api import ModelInfo, Served, create_app
from mt.serve.limits import Limits
from mt.serve.worker import Batcher
from mt.translate import decode_settings, resolve_runtime

log = logging.getLogger("mt")
LOOPBACK = ("127.0.0.1", "::1", "localhost")
READY_TIMEOUT_S = 120  # serving(): how long a server thread may take to listen
# Once told to exit and the queue is decoded: how long uvicorn may wait for connections to close.
ANSWER_GRACE_S = 10
EXIT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # USR1: SLURM's notice


def load(
    model_path: Path,
    device: torch.device,
    precision: str,
    beam: int | None,
    limits: Limits,
    quantization: str = "none",
) -> Served:
    """The model of a run or checkpoint, its tokenizer, a (not yet started) worker, its card."""
    config, tokenizer, model, checkpoint = load_trained(model_path, device)
    decode = decode_settings(config, beam=beam)
    if decode.beam > limits.max_beam:
        given = f"--beam {beam}" if beam is not None else f"the run's decode.beam={decode.beam}"
        raise MtError(f"{given} exceeds --max-beam {limits.max_beam}")
    if decode.nbest > limits.max_beam:  # a run that samples may ask more outputs than its beam
        raise MtError(f"the run's decode.nbest={decode.nbest} exceeds --max-beam {limits.max_beam}")
    batcher = Batcher(model, tokenizer, decode, device, precision, limits)
    info = describe(config, model, checkpoint, decode, batcher, precision, quantization)
    if tokenizer.tags:  # the language tag takes one of the source's places
        info.max_source_pieces -= 1
    # After describe, which counts the fp32 model's parameters.
    pack(quantize(model, quantization), device, precision)
    return Served(tokenizer, batcher, info, limits, config.decode.nbest)


def describe(
    config: Config,
    model: Transformer,
    checkpoint: Checkpoint,
    decode: DecodeConfig,
    batcher: Batcher,
    precision: str,
    quantization: str = "none",
) -> ModelInfo:
    """What GET /v1/model says: no paths, only what the model is and how it is served."""
    run_dir = checkpoint.run_dir
    select = config.data.select_direction  # the BLEU that chose the run's best checkpoint
    bleus = [selected_bleu(r, select) for r in read_metrics(run_dir, "valid") if "bleu" in r]
    limits = {**dataclasses.asdict(batcher.limits), "max_tokens": batcher.max_tokens}
    return ModelInfo(
        source_languages=list(dict.fromkeys(c.src_lang for c in config.data.directions())),
        target_languages=config.data.target_languages(),
        directions=config.data.direction_names(),
        parameters=count_parameters(model),
        checkpoint=checkpoint.name,
        steps=trained_steps(checkpoint),
        best_dev_bleu=max(bleus, default=None),
        architecture=dataclasses.asdict(config.model),
        decoding=dataclasses.asdict(decode),
        limits=limits,
        max_source_pieces=model.max_positions - 1,  # - 1: room for EOS
        device=str(batcher.device),
        precision=precision,
        quantization=quantization,
    )


def trained_steps(checkpoint: Checkpoint) -> int | None:
    """The checkpoint's step, or for an average (no step in its name) the run's last step."""
    try:
        return checkpoint.step
    except MtError:
        steps = [r["step"] for r in read_metrics(checkpoint.run_dir, "train")]
        return max(steps, default=None)


class Server(uvicorn.Server):
    """uvicorn's server that also drains the worker when told to exit, and says where it is."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_exit = on_exit
        self.ready = threading.Event()
        self.url = ""
        self.loop: asyncio.AbstractEventLoop | None = None  # uvicorn's, once started

    async def startup(self, sockets: list | None = None) -> None:
        """Start as uvicorn does, then log the URL (with the real port when asked for port 0)."""
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
            log.info("mt serve: listening on %s (the page at /, API docs at /docs)", self.url)
            self.ready.set()

    def close_connections(self) -> None:
        """Close every open connection, from any thread: a request still being sent ends as its
        client's disconnect, so the server shuts down without cancelling (500s, tracebacks)."""

        def close() -> None:
            for connection in list(self.server_state.connections):
                connection.transport.close()

        if self.loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing is open
                self.loop.call_soon_threadsafe(close)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Stop accepting (uvicorn), and let the worker decode what waits without gathering.

        A second signal changes nothing: uvicorn's force-exit would cancel requests whose
        batch the worker decodes anyway (their clients got bare 500s), not stop it sooner.
        """
        if self.should_exit:
            log.info("mt serve: already stopping; answering what is queued (SIGKILL stops now)")
            return
        super().handle_exit(sig, frame)
        self.on_exit()


def serve(
    model_path: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    beam: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    quantization: str = "none",
    limits: Limits | None = None,
    cors_origins: list[str] | None = None,
    log_level: str = "info",
) -> None:
    """`mt serve`: translate over HTTP until SIGTERM or Ctrl-C."""
    dev, prec = resolve_runtime(device, precision, model_path, quantization)
    served = load(model_path, dev, prec, beam, limits or Limits(), quantization)
    if host not in LOOPBACK:
        log.warning("listening on %s: anyone who can reach this machine can use the model", host)
    if log_level == "debug":
        log.setLevel(logging.DEBUG)  # the worker's queue and batches
    config = uvicorn.Config(
        create_app(served, cors_origins, worker_thread=False, local_only=host in LOOPBACK),
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=None,  # in-flight requests are answered, however long
    )
    server = Server(config, served.batcher.drain)
    # The model decodes on this, the main, thread and uvicorn serves on another, which installs
    # no signal handlers: these, Python's, run here between two of the worker's operations.
    handlers = {sig: signal.signal(sig, server.handle_exit) for sig in EXIT_SIGNALS}
    http = threading.Thread(target=_run_until_exit, args=(server,), name="mt-serve-http")
    try:
        http.start()
        served.batcher.run()  # until drained: told to exit, or the server failed to start
    finally:
        server.should_exit = True  # already, unless the worker itself failed
        http.join(ANSWER_GRACE_S)  # what the worker decoded goes out to its clients
        if http.is_alive():
            log.warning(
                "mt serve: a client still holds a connection %g s after the last answer "
                "(a request never sent whole?); closing it",
                ANSWER_GRACE_S,
            )
            server.close_connections()
            http.join(ANSWER_GRACE_S)
            server.force_exit = True  # if closing them did not end it
            http.join()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if not server.url:
        raise MtError(f"the server did not start on {host}:{port} (see the log)")


def _run_until_exit(server: Server) -> None:
    """Serve until told to exit; then, or if it failed to start, let the worker drain."""
    try:
        server.run()
    except SystemExit:  # uvicorn could not start, and has logged why; the caller reports it
        log.debug("uvicorn exited without serving")
    finally:
        server.on_exit()
        server.ready.set()


@contextlib.contextmanager
def serving(
    served: Served, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"
) -> Iterator[str]:
    """Serve on a background thread (tests, scripts) until the block ends; yields the URL."""
    config = uvicorn.Config(create_app(served), host=host, port=port, log_level=log_level)
    server = Server(config, served.batcher.drain)
    thread = threading.Thread(
        target=_run_until_exit, args=(server,), name="mt-serve-http", daemon=True
    )
    thread.start()
    server.ready.wait(READY_TIMEOUT_S)
    if not server.url:
        server.should_exit = True
        raise MtError(f"the server did not start on {host}:{port} (see the log)")
    try:
        yield server.url
    finally:
        server.handle_exit(signal.SIGTERM, None)
        thread.join()
