"""`mt train`: one training loop, read top to bottom, with small helpers around it.

Data flows: corpora -> tokenizer -> encoded, cached data -> token-budget batches -> model ->
label-smoothed loss -> Adam + inverse-sqrt schedule -> checkpoints, validation BLEU.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import sacrebleu
import torch
from torch import nn
from tqdm import tqdm

from mt import checkpoint as ckpt
from mt.batching import Batch, BatchSampler, collate
from mt.config import CONFIG_FILE, Config, diff, load_config, save_config
from mt.data import EncodedCorpus
from mt.device import autocast, configure_backends, resolve_device, resolve_precision
from mt.errors import ConfigError, MtError
from mt.loss import label_smoothed_nll
from mt.metrics import MetricsLog
from mt.model import Transformer, count_parameters
from mt.optim import make_optimizer, make_scheduler
from mt.run import corpus, encoded, model_from_config, prepare_tokenizer, run_path
from mt.search import greedy_search
from mt.tokenizer import Tokenizer

log = logging.getLogger("mt")

# Settings a resumed run may change; everything else in data/tokenizer/model must match.
RESUMABLE_DATA_KEYS = {"valid", "test", "num_proc", "cache_dir"}


@dataclass
class TrainState:
    """Counters saved in every checkpoint, so that a resumed run continues exactly."""

    step: int = 0  # optimizer updates done
    epoch: int = 1  # current epoch (1-based)
    batches_done: int = 0  # batches of the current epoch already consumed
    best_bleu: float = -1.0  # best dev BLEU so far
    bad_validations: int = 0  # validations since the best one (early stopping)
    overflow_steps: int = 0  # fp16 updates skipped because gradients overflowed
    train_seconds: float = 0.0  # wall-clock spent in training steps and validation


@dataclass
class TrainResult:
    """How a run ended: its final state and, if a signal stopped it, the signal number."""

    state: TrainState
    signum: int | None = None


class StopSignals:
    """Remembers SIGTERM/SIGINT, so the loop can finish its step, checkpoint and exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def batch_stream(
    sampler: BatchSampler, data: EncodedCorpus, state: TrainState, max_epochs: int
) -> Iterator[tuple[int, int, Batch]]:
    """(epoch, batches done in that epoch after this one, batch) from the saved position on."""
    epoch, done = state.epoch, state.batches_done
    while not max_epochs or epoch <= max_epochs:
        batches = sampler.epoch_batches(epoch)
        for i in range(done, len(batches)):
            yield epoch, i + 1, collate(data.pairs(batches[i]), batches[i])
        epoch, done = epoch + 1, 0


def check_resumable(config: Config, run_dir: Path) -> None:
    """Refuse to continue a run whose data, tokenizer or model settings changed."""
    saved_path = run_dir / CONFIG_FILE
    if not saved_path.exists():
        return
    saved = load_config(saved_path)
    changes = [
        line
        for line in diff(saved, config, ["data", "tokenizer", "model"])
        if line.split(":")[0].removeprefix("data.") not in RESUMABLE_DATA_KEYS
    ]
    if changes:
        raise ConfigError(
            f"{saved_path}: the run was started with other settings ({'; '.join(changes)}); "
            "use a new run_dir, or restore those settings to resume"
        )


def train_step(
    model: nn.Module,
    batches: list[Batch],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    config: Config,
    device: torch.device,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Forward/backward over the micro-batches of one update; returns loss, nll, tokens, norm.

    Losses are summed and divided by the target tokens of the whole update, so gradient
    accumulation gives the same gradient as one big batch. The optimizer is not stepped here.
    """
    tokens = sum(b.tgt_tokens for b in batches)
    loss_sum = torch.zeros((), device=device)
    nll_sum = torch.zeros((), device=device)
    for batch in batches:
        batch = batch.to(device)
        with autocast(device, precision):
            logits = model(batch.src, batch.tgt_in)  # (B, T, V)
        loss, nll, _ = label_smoothed_nll(logits, batch.tgt_out, config.train.label_smoothing)
        scaler.scale(loss / tokens).backward()
        loss_sum += loss.detach()
        nll_sum += nll.detach()
    scaler.unscale_(optimizer)
    clip = config.train.clip_norm or math.inf
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    return loss_sum, nll_sum, tokens, norm


@torch.no_grad()
def validate(
    model: Transformer,
    data: EncodedCorpus,
    references: list[str],
    tokenizer: Tokenizer,
    config: Config,
    device: torch.device,
    precision: str,
) -> dict[str, float]:
    """Dev loss and perplexity (teacher forcing) and BLEU of batched greedy decoding."""
    model.eval()
    longest = int(max(data.src_lens.max(initial=0), data.tgt_lens.max(initial=0))) + 1
    budget = max(config.train.valid_max_tokens, longest)
    sampler = BatchSampler(data.src_lens, data.tgt_lens, budget, shuffle=False)
    hypotheses = [""] * len(data)
    loss_sum = nll_sum = 0.0
    tokens = 0
    for indices in sampler.epoch_batches(1):
        batch = collate(data.pairs(indices), indices).to(device)
        with autocast(device, precision):
            logits = model(batch.src, batch.tgt_in)
            output = greedy_search(
                model, batch.src, config.decode.max_len_a, config.decode.max_len_b
            )
        loss, nll, _ = label_smoothed_nll(logits, batch.tgt_out, config.train.label_smoothing)
        loss_sum, nll_sum, tokens = (
            loss_sum + loss.item(),
            nll_sum + nll.item(),
            tokens + batch.tgt_tokens,
        )
        for index, text in zip(indices.tolist(), tokenizer.decode_tgt(output), strict=True):
            hypotheses[index] = text
    model.train()
    bleu = sacrebleu.corpus_bleu(hypotheses, [references])
    nll = nll_sum / max(tokens, 1)
    return {
        "loss": loss_sum / max(tokens, 1),
        "nll": nll,
        "ppl": math.exp(min(nll, 100.0)),
        "bleu": bleu.score,
    }


def save(
    run_dir: Path,
    model: Transformer,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    state: TrainState,
    metadata: dict[str, str],
) -> ckpt.Checkpoint:
    """Write a complete checkpoint: weights, and everything needed to resume exactly."""
    payload = {
        "train": dataclasses.asdict(state),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": ckpt.rng_state(),
    }
    return ckpt.save_checkpoint(run_dir, state.step, model, payload, metadata)


def restore(
    checkpoint: ckpt.Checkpoint,
    model: Transformer,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    metadata: dict[str, str],
) -> TrainState:
    """Load a checkpoint into the model and optimizer; returns its TrainState."""
    ckpt.load_weights(checkpoint.weights, model, expected=metadata)
    payload = ckpt.load_state(checkpoint.state)
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    scaler.load_state_dict(payload["scaler"])
    ckpt.set_rng_state(payload["rng"])
    return TrainState(**payload["train"])


def checkpoint_metadata(tokenizer: Tokenizer) -> dict[str, str]:
    """What a checkpoint must agree on with the run that loads it."""
    return {
        "tokenizer_sha256": tokenizer.fingerprint(),
        "src_vocab": str(tokenizer.src_vocab_size),
        "tgt_vocab": str(tokenizer.tgt_vocab_size),
    }


def log_line(state: TrainState, values: dict[str, float]) -> str:
    """A compact progress line: step, loss, ppl, lr, tokens/s."""
    return (
        f"step {state.step} | epoch {state.epoch} | loss {values['loss']:.3f} | "
        f"ppl {values['ppl']:.2f} | lr {values['lr']:.2e} | {values['tgt_tok_s']:,.0f} tgt tok/s"
    )


def train(config: Config, resume: Path | None = None) -> TrainResult:
    """Train a model as configured; resumes from the run's latest checkpoint if it has one."""
    run_dir = run_path(config)
    check_resumable(config, run_dir)
    save_config(config, run_dir / CONFIG_FILE)
    tc = config.train
    device = resolve_device(tc.device)
    precision = resolve_precision(tc.precision, device)
    configure_backends(device)
    torch.manual_seed(tc.seed)

    tokenizer = prepare_tokenizer(config)
    train_data = encoded(config, tokenizer, "train")
    log.info("train: %s", train_data.stats.describe())
    valid_data = encoded(config, tokenizer, "valid") if config.data.valid else None
    references = corpus(config, "valid").targets() if config.data.valid else []

    model = model_from_config(config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    model.to(device)
    log.info("model: %s parameters", f"{count_parameters(model):,}")
    optimizer = make_optimizer(model, tc.lr, tc.betas, tc.eps, tc.weight_decay, device)
    scheduler = make_scheduler(optimizer, tc.lr, tc.warmup_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    metadata = checkpoint_metadata(tokenizer)
    state = TrainState()
    start = ckpt.resolve_checkpoint(resume) if resume else ckpt.latest_checkpoint(run_dir)
    if start is not None:
        state = restore(start, model, optimizer, scheduler, scaler, metadata)
        log.info("resumed from %s (step %d, epoch %d)", start.weights, state.step, state.epoch)
    if state.step >= tc.max_steps:
        log.info(
            "%s is already at step %d (train.max_steps=%d): nothing to do",
            run_dir,
            state.step,
            tc.max_steps,
        )
        return TrainResult(state)

    sampler = BatchSampler(train_data.src_lens, train_data.tgt_lens, tc.max_tokens, tc.seed)
    log.info(
        "%d batches per epoch; up to %d tokens (padding included) per update = %d x %d; %s on %s",
        len(sampler),
        tc.max_tokens * tc.update_freq,
        tc.max_tokens,
        tc.update_freq,
        precision,
        device,
    )
    step_model = torch.compile(model, dynamic=True) if tc.compile else model
    metrics = MetricsLog(run_dir)
    stream = batch_stream(sampler, train_data, state, tc.max_epochs)
    bar = tqdm(
        total=tc.max_steps,
        initial=state.step,
        desc="train",
        disable=not sys.stderr.isatty(),
        dynamic_ncols=True,
    )
    window = {"loss": 0.0, "nll": 0.0, "tokens": 0, "time": 0.0, "steps": 0}
    last_saved = -1
    model.train()
    with StopSignals() as stop:
        while state.step < tc.max_steps and stop.signum is None:
            # 1. Gather the micro-batches of one update; remember where they end in the epoch.
            batches = []
            for epoch, done, batch in stream:
                batches.append(batch)
                state.epoch, state.batches_done = epoch, done
                if len(batches) == tc.update_freq:
                    break
            if not batches:
                log.info("reached train.max_epochs=%d", tc.max_epochs)
                break
            # 2. Forward, backward, update.
            t0 = time.perf_counter()
            loss, nll, tokens, norm = train_step(
                step_model, batches, optimizer, scaler, config, device, precision
            )
            if precision != "fp16" and not (
                math.isfinite(loss.item()) and math.isfinite(norm.item())
            ):
                crash = ckpt.save_crash(run_dir, state.step + 1, model)
                raise MtError(
                    f"non-finite loss or gradient at step {state.step + 1}; parameters were not "
                    f"updated; weights saved to {crash} (try a lower train.lr or train.clip_norm)"
                )
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state.step += 1
            if precision == "fp16" and scaler.get_scale() < scale:
                state.overflow_steps += 1
                if scaler.get_scale() < tc.min_loss_scale:
                    raise MtError(
                        f"fp16 loss scale fell to {scaler.get_scale():g} at step {state.step} "
                        f"(below train.min_loss_scale={tc.min_loss_scale:g}): gradients keep "
                        "overflowing; use train.precision=bf16, or a lower train.lr"
                    )
            elapsed = time.perf_counter() - t0
            state.train_seconds += elapsed
            window["loss"] += loss.item()
            window["nll"] += nll.item()
            window["tokens"] += tokens
            window["time"] += elapsed
            window["steps"] += 1
            bar.update(1)

            # 3. Log every log_every steps.
            if state.step % tc.log_every == 0 or state.step == tc.max_steps:
                values = {
                    "loss": window["loss"] / window["tokens"],
                    "ppl": math.exp(min(window["nll"] / window["tokens"], 100.0)),
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": norm.item(),
                    "tgt_tok_s": window["tokens"] / window["time"],
                    "tokens_per_update": window["tokens"] / window["steps"],
                    "epoch": state.epoch,
                    "overflow_steps": state.overflow_steps,
                }
                metrics.write("train", state.step, values)
                bar.set_postfix(
                    loss=f"{values['loss']:.3f}",
                    lr=f"{values['lr']:.1e}",
                    tok_s=f"{values['tgt_tok_s']:,.0f}",
                )
                if bar.disable:
                    log.info(log_line(state, values))
                window = dict.fromkeys(window, 0)

            # 4. Validate and checkpoint every valid_every steps (and at the end).
            if state.step % tc.valid_every == 0 or state.step == tc.max_steps:
                improved = True  # without a dev set, the newest checkpoint is the best
                if valid_data is not None:
                    t1 = time.perf_counter()
                    scores = validate(
                        model, valid_data, references, tokenizer, config, device, precision
                    )
                    scores["seconds"] = time.perf_counter() - t1
                    state.train_seconds += scores["seconds"]
                    improved = scores["bleu"] > state.best_bleu
                    state.best_bleu = max(state.best_bleu, scores["bleu"])
                    state.bad_validations = 0 if improved else state.bad_validations + 1
                    metrics.write("valid", state.step, scores)
                    log.info(
                        "valid step %d | loss %.3f | ppl %.2f | BLEU %.2f (best %.2f) | %.1fs",
                        state.step,
                        scores["loss"],
                        scores["ppl"],
                        scores["bleu"],
                        state.best_bleu,
                        scores["seconds"],
                    )
                saved = save(run_dir, model, optimizer, scheduler, scaler, state, metadata)
                last_saved = state.step
                if improved:
                    ckpt.set_best(run_dir, saved)
                ckpt.prune_checkpoints(run_dir, tc.keep_last)
                if tc.patience and state.bad_validations >= tc.patience:
                    log.info("no better dev BLEU in %d validations: stopping early", tc.patience)
                    break
        bar.close()
        if last_saved != state.step:
            save(run_dir, model, optimizer, scheduler, scaler, state, metadata)
            ckpt.prune_checkpoints(run_dir, tc.keep_last)
        metrics.close()
        if stop.signum is not None:
            log.info(
                "stopped by signal %d at step %d; checkpoint written; run the same command "
                "to resume",
                stop.signum,
                state.step,
            )
        return TrainResult(state, stop.signum)
