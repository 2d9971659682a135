"""Training-step time with the output layer and loss on every target position, or on non-pad only.

    .venv/bin/python scripts/bench_padding.py --config configs/multi30k.yaml --repeats 20

A micro-benchmark for issue 19's "no FLOPs on padding" lever, to run on a quiet machine before
building it: one forward and backward of the config's model (dropout as configured) on
synthetic batches of `train.max_tokens` tokens (padding included), for each target length T and
non-pad fraction asked. "full" projects all B x T decoder states onto the vocabulary and masks
the loss, as mt trains today; "gathered" selects the non-pad states first (B x T x fraction
rows). The two losses agree (printed). The variants alternate, so that noise hits both alike;
the median step is reported. Worth building only if "gathered" is faster at >= 90% non-pad.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from mt.config import load_config
from mt.device import autocast, configure_backends
from mt.loss import label_smoothed_nll
from mt.model import Transformer
from mt.vocab import PAD_ID

CPU = torch.device("cpu")


def decoder_states(model: Transformer, src: Tensor, tgt_in: Tensor) -> Tensor:
    """The decoder's final states (B, T, D): Transformer.decode without the output layer."""
    memory = model.encode(src)  # (B, S, D)
    x = model._embed(model.tgt_embed, tgt_in, 0)  # (B, T, D)
    mask = model.source_mask(src, x, padded=True)  # (B, 1, 1, S)
    for layer in model.decoder:
        x = layer(x, memory, mask, None)
    return model.dec_norm(x)  # (B, T, D)


def full_loss(model: Transformer, states: Tensor, tgt_out: Tensor, eps: float) -> Tensor:
    """Logits at every position (B, T, V), pads masked in the loss: what mt does today."""
    logits = F.linear(states, model.tgt_embed.weight)  # (B, T, V)
    return label_smoothed_nll(logits, tgt_out, eps, PAD_ID)[0]


def gathered_loss(model: Transformer, states: Tensor, tgt_out: Tensor, eps: float) -> Tensor:
    """Logits at the non-pad positions only: (1, N, V) for the N real target tokens."""
    keep = tgt_out != PAD_ID  # (B, T)
    logits = F.linear(states[keep], model.tgt_embed.weight)  # (N, V)
    return label_smoothed_nll(logits[None], tgt_out[keep][None], eps, PAD_ID)[0]


def batch(rows: int, length: int, nonpad: float, vocab: int) -> tuple[Tensor, Tensor, Tensor]:
    """Synthetic (src, tgt_in, tgt_out) of (rows, length), pads spread evenly over the rows."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, vocab, (rows, length), generator=generator)  # no specials
    pads = round((1 - nonpad) * rows * length)
    lengths = torch.full((rows,), length - pads // rows)
    lengths[: pads % rows] -= 1
    real = torch.arange(length)[None, :] < lengths[:, None]  # (rows, length)
    tgt = tokens.masked_fill(~real, 0)
    return tgt.clone(), tgt.roll(1, dims=1), tgt  # teacher forcing: shapes are what count


def step_seconds(step: Callable[[], Tensor]) -> tuple[float, float]:
    """Seconds of one forward and backward, and its loss."""
    start = time.perf_counter()
    loss = step()
    loss.backward()
    return time.perf_counter() - start, float(loss.detach())


def bench(
    model: Transformer, data: tuple[Tensor, Tensor, Tensor], args: argparse.Namespace
) -> tuple[dict[str, float], dict[str, float]]:
    """Median step seconds and the losses of both variants on one batch."""
    src, tgt_in, tgt_out = data
    eps = args.label_smoothing

    def run(loss_fn: Callable[..., Tensor]) -> Tensor:
        model.zero_grad(set_to_none=True)
        with autocast(CPU, args.precision):
            states = decoder_states(model, src, tgt_in)
        return loss_fn(model, states, tgt_out, eps)

    times: dict[str, list[float]] = {"full": [], "gathered": []}
    losses: dict[str, float] = {}
    for i in range(args.repeats + 1):  # the first round warms up
        for name, fn in (("full", full_loss), ("gathered", gathered_loss)):
            torch.manual_seed(i)  # the same dropout in both variants
            seconds, losses[name] = step_seconds(lambda fn=fn: run(fn))
            if i:
                times[name].append(seconds)
    return {name: statistics.median(t) for name, t in times.items()}, losses


def main() -> None:
    """Parse arguments, time each shape, print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--vocab", type=int, default=0, help="default: tokenizer.vocab_size")
    parser.add_argument("--lengths", default="12,16,24,32", help="target lengths T per batch")
    parser.add_argument("--nonpad", default="0.8,0.9,0.95", help="non-pad fractions")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(args.config)
    args.label_smoothing = config.train.label_smoothing
    vocab = args.vocab or config.tokenizer.vocab_size
    configure_backends(CPU)  # as training does
    torch.manual_seed(0)
    model = Transformer(config.model, vocab, vocab).train()
    machine = platform.processor() or platform.machine()
    print(f"{machine}, {torch.get_num_threads()} threads, {args.precision}, vocabulary "
          f"{vocab:,}, {config.train.max_tokens:,} tokens a batch")  # fmt: skip
    print()
    print("| B x T | non-pad | full ms | gathered ms | speed-up | loss full / gathered |")
    print("|---|---:|---:|---:|---:|---|")
    for length in (int(t) for t in args.lengths.split(",")):
        rows = config.train.max_tokens // length
        for nonpad in (float(f) for f in args.nonpad.split(",")):
            seconds, losses = bench(model, batch(rows, length, nonpad, vocab), args)
            full, gathered = seconds["full"] * 1e3, seconds["gathered"] * 1e3
            agree = f"{losses['full']:.4f} / {losses['gathered']:.4f}"
            print(f"| {rows} x {length} | {nonpad:.0%} | {full:.1f} | {gathered:.1f} | "
                  f"{full / gathered:.3f}x | {agree} |")  # fmt: skip


if __name__ == "__main__":
    main()
