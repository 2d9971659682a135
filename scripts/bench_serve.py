"""Load test of `mt serve`: concurrent clients sending one sentence each, against 127.0.0.1 only.

    .venv/bin/python scripts/bench_serve.py runs/multi30k-de-en        # the full run
    .venv/bin/python scripts/bench_serve.py runs/multi30k-de-en --smoke  # seconds

Starts its own `mt serve RUN --port 0` (loopback, a free port), then for each client count (1, 8,
32, 128) runs closed-loop clients, each sending single sentences of the run's test set (or --src)
one after another, until --requests are answered or --seconds pass (after 50 untimed requests of
one client). Prints a Markdown table for docs/benchmarks.md: sentences/s, latency percentiles, and
throughput against one client and against `mt translate`'s offline sentences/s on the same
sentences (measured here first, a second pass of each after an untimed one, in this process, with
the server's device, precision, quantisation and threads; a `--precision auto` is resolved once,
here, and the server is given the choice), both in its own batches and in batches of as many
sentences as there are clients, the most a server with that many clients can gather. Then
--memory-requests more requests at 32 clients, with the server's RSS before and after. Bounded in
requests and time; needs the serve extra and aiohttp (make install). The clients are aiohttp's:
they cost a fraction of the CPU httpx's do, and the CPU they take is CPU the server does not get.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import torch

from mt.corpora import read_lines
from mt.errors import MtError
from mt.packing import pack
from mt.quantize import quantize
from mt.rundir import load_trained, open_split
from mt.translate import Translator, resolve_runtime

READY_TIMEOUT_S = 300


def sentences(run: Path, src: Path | None) -> list[str]:
    """Non-blank lines of --src (plain or gzipped), else the sources of the run's test set."""
    if src is None:
        config, _, _, _ = load_trained(run, torch.device("cpu"))
        lines = open_split(config, "test").sources()
    else:
        lines = list(read_lines(src))
    return [line for line in lines if line.strip()]


def offline_rates(
    run: Path, lines: list[str], dev: torch.device, prec: str, quantization: str,
    clients: list[int],
) -> dict[int, float]:  # fmt: skip
    """`mt translate`'s sentences/s on these lines (the run's decoding settings): under key 0 in
    its own batches; under each client count c in batches of c lines (the most a server with c
    clients can gather; on about 40 c lines spread evenly over all, to bound the time); under
    -c in batches of c of those lines sorted by length, as if the c sentences in flight were
    always of one length (what a server that let new sentences join a running batch could at
    best approach)."""
    config, tokenizer, model, _ = load_trained(run, dev)
    pack(quantize(model, quantization), dev, prec)  # as `mt translate` and `mt serve` decode

    def rate(batches: list[list[str]]) -> float:
        """Sentences/s of a second pass (the first builds oneDNN's kernels for new shapes, which
        the server, timed over thousands of requests, has long had)."""
        for _ in range(2):  # the second pass is the timed one
            start = time.perf_counter()
            for batch in batches:
                Translator(tokenizer, model, config.decode, dev, prec).translate(batch)
        return sum(map(len, batches)) / (time.perf_counter() - start)

    rates = {0: rate([lines])}
    for size in clients:
        sample = lines[:: max(1, len(lines) // (40 * size))]
        rates[size] = rate([sample[i : i + size] for i in range(0, len(sample), size)])
        pieces = dict(zip(sample, map(len, tokenizer.encode_src(sample)), strict=True))
        ordered = sorted(sample, key=pieces.__getitem__)
        rates[-size] = rate([ordered[i : i + size] for i in range(0, len(ordered), size)])
    return rates


def start_server(run: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    """`mt serve` on 127.0.0.1 and a free port; returns the process and its URL once it listens."""
    queue = max(512, 2 * max(args.clients))  # room for every client: measure speed, not 503s
    command = [sys.executable, "-m", "mt", "serve", str(run), "--host", "127.0.0.1",
               "--port", "0", "--device", args.device, "--precision", args.precision,
               "--quantize", args.quantize, "--log-level", "warning",
               "--max-queue", str(queue)]  # fmt: skip
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    deadline, line = time.monotonic() + READY_TIMEOUT_S, ""
    assert server.stderr is not None
    for line in server.stderr:  # its log, line by line, until it says where it listens
        if match := re.search(r"listening on (http://127\.0\.0\.1:\d+)", line):
            # Keep reading its log, or a full pipe would block it.
            threading.Thread(target=shutil.copyfileobj, args=(server.stderr, sys.stderr)).start()
            return server, match.group(1)
        if time.monotonic() > deadline:
            break
    server.kill()
    raise SystemExit(f"mt serve did not start: {line.strip()}")


def rss_mib(pid: int) -> int:
    """Resident memory of a process, in MiB (Linux)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) // 1024  # type: ignore[union-attr]


async def run_clients(
    url: str, lines: list[str], clients: int, requests: int, seconds: float
) -> dict:
    """Closed-loop clients until `requests` are answered or `seconds` pass: counts, latencies."""
    pool = itertools.cycle(lines)
    latencies: list[float] = []
    errors, started = 0, 0
    stop = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=clients)

    async def client(http: aiohttp.ClientSession) -> None:
        nonlocal errors, started
        while started < requests and time.perf_counter() < stop:
            started += 1
            sent = time.perf_counter()
            try:
                async with http.post(f"{url}/v1/translate", json={"text": next(pool)}) as response:
                    await response.read()
                    ok = response.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError):
                errors += 1
                continue
            if ok:
                latencies.append(time.perf_counter() - sent)
            else:
                errors += 1

    timeout = aiohttp.ClientTimeout(total=seconds)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return {"answered": len(latencies), "errors": errors, "rate": len(latencies) / elapsed,
            "latencies": latencies}  # fmt: skip


def percentiles(latencies: list[float]) -> tuple[float, float, float]:
    """p50, p95, p99 in milliseconds (nan with fewer than two)."""
    if len(latencies) < 2:
        return math.nan, math.nan, math.nan
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return cuts[49] * 1000, cuts[94] * 1000, cuts[98] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="run directory or checkpoint")
    parser.add_argument("--src", type=Path, help="sentences (default: the run's test sources)")
    parser.add_argument("--clients", default="1,8,32,128", help="client counts, comma-separated")
    parser.add_argument("--requests", type=int, default=2000, help="requests per client count")
    parser.add_argument("--seconds", type=float, default=120, help="time limit per client count")
    parser.add_argument("--memory-requests", type=int, default=10_000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", help="resolved once, here, for both")
    parser.add_argument("--quantize", default="none", help="none or int8 (mt serve --quantize)")
    parser.add_argument("--threads", type=int, help="intra-op threads of both (default: torch's)")
    parser.add_argument("--smoke", action="store_true", help="a few requests: check it works")
    args = parser.parse_args()
    if args.smoke:
        args.clients, args.requests, args.seconds, args.memory_requests = "1,4", 16, 60, 32
    args.clients = [int(c) for c in args.clients.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    lines = sentences(args.run, args.src)[: 40 if args.smoke else None]
    # One choice for both sides: `auto` times fp32 against bf16, and two timings may disagree.
    try:
        dev, args.precision = resolve_runtime(args.device, args.precision, args.run, args.quantize)
    except MtError as exc:  # e.g. --quantize int8 with --precision bf16
        raise SystemExit(f"bench_serve: {exc}") from None
    args.device = str(dev)
    offline = offline_rates(args.run, lines, dev, args.precision, args.quantize, args.clients)
    server, url = start_server(args.run, args)
    try:
        report(url, server.pid, lines, offline, args)
    finally:
        server.terminate()
        server.wait()


def report(
    url: str, pid: int, lines: list[str], offline: dict[int, float], args: argparse.Namespace
) -> None:
    """Run every client count and the memory run; print the table."""
    machine = platform.processor() or platform.machine()
    print(f"{args.run} | {len(lines)} sentences | {machine} | {os.cpu_count()} CPUs | "
          f"{args.device} {args.precision}, quantize {args.quantize} | "
          f"offline (mt translate) {offline[0]:.1f} sentences/s")  # fmt: skip
    print()
    first = f"{args.clients[0]} client{'s' * (args.clients[0] != 1)}"  # the ratios' baseline
    print("| clients | requests | errors | sentences/s | p50 ms | p95 ms | p99 ms | "
          f"vs {first} | vs offline | offline, batches of `clients` | vs that | "
          "offline, length-sorted batches of `clients` | vs offline |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    # Untimed: the server's first requests build its kernels, as the offline first passes did.
    asyncio.run(run_clients(url, lines, 1, min(len(lines), 50), args.seconds))
    single = None
    for clients in args.clients:
        result = asyncio.run(run_clients(url, lines, clients, args.requests, args.seconds))
        single = single or result["rate"]
        p50, p95, p99 = percentiles(result["latencies"])
        print(f"| {clients} | {result['answered']} | {result['errors']} | {result['rate']:.1f} | "
              f"{p50:.1f} | {p95:.1f} | {p99:.1f} | {result['rate'] / single:.2f}x | "
              f"{result['rate'] / offline[0]:.0%} | {offline[clients]:.1f} | "
              f"{result['rate'] / offline[clients]:.0%} | {offline[-clients]:.1f} | "
              f"{offline[-clients] / offline[0]:.0%} |", flush=True)  # fmt: skip
    before = rss_mib(pid)
    result = asyncio.run(run_clients(url, lines, 32, args.memory_requests, 10 * args.seconds))
    print()
    print(f"server RSS: {before} MiB before, {rss_mib(pid)} MiB after {result['answered']} "
          f"requests at 32 clients ({result['errors']} errors)")  # fmt: skip


if __name__ == "__main__":
    main()
