"""`mt train`: one training loop, read top to bottom, with small helpers around it.

Data flows: corpora -> tokenizer -> encoded, cached data -> token-budget batches -> model ->
label-smoothed loss -> Adam + inverse-sqrt schedule -> checkpoints, validation BLEU.
Under torchrun every rank runs this loop on its own shard of the batches; rank 0 alone writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import sacrebleu
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from mt import checkpoint as ckpt
from mt import distributed
from mt.average import average_run
from mt.batching import Batch, BatchSampler, collate
from mt.config import CONFIG_FILE, Config, diff, load_config, save_config
from mt.data import EncodedCorpus
from mt.device import autocast, configure_backends, resolve_precision
from mt.distributed import World
from mt.errors import ConfigError, MtError
from mt.loss import label_smoothed_nll
from mt.metrics import MetricsLog
from mt.model import Transformer, count_parameters
from mt.optim import make_optimizer, make_scheduler
from mt.report import write_data_stats, write_report
from mt.run import (
    checkpoint_metadata,
    corpus,
    encoded,
    model_from_config,
    prepare_tokenizer,
    run_path,
)
from mt.search import beam_search, greedy_search
from mt.tokenizer import Tokenizer

log = logging.getLogger("mt")
T = TypeVar("T")

# Settings a resumed run may change; everything else in data/tokenizer/model must match.
RESUMABLE_DATA_KEYS = {"valid", "test", "num_proc", "cache_dir"}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


@dataclass
class TrainState:
    """Counters saved in every checkpoint, so that a resumed run continues exactly."""

    step: int = 0  # optimizer updates done
    epoch: int = 1  # current epoch (1-based)
    batches_done: int = 0  # batches of the current epoch already consumed (by each rank)
    best_bleu: float = -1.0  # best dev BLEU so far
    bad_validations: int = 0  # validations since the best one (early stopping)
    overflow_steps: int = 0  # fp16 updates skipped because gradients overflowed
    oom_steps: int = 0  # updates skipped on every rank because one ran out of memory
    train_seconds: float = 0.0  # wall-clock spent in training steps and validation


@dataclass
class TrainResult:
    """How a run ended: its final state and, if a signal stopped it, the signal number."""

    state: TrainState
    signum: int | None = None


@dataclass
class Trainee:
    """The model and everything that updates it, as saved in and restored from checkpoints."""

    model: Transformer  # the bare model: checkpoints, validation
    step_model: nn.Module  # what the training step calls: DDP and/or torch.compile around it
    ddp: DistributedDataParallel | None  # the DDP wrapper when there are several ranks
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler


class StopSignals:
    """Remembers SIGTERM/SIGINT/SIGUSR1, so the loop can finish its step, checkpoint and exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        for sig in STOP_SIGNALS:
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
    sampler: BatchSampler, data: EncodedCorpus, epoch: int, done: int, max_epochs: int
) -> Iterator[tuple[int, int, Batch]]:
    """(epoch, batches done in that epoch after this one, batch) from a saved position on."""
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


def main_first(world: World, device: torch.device, prepare: Callable[[], T]) -> T:
    """Run `prepare` on rank 0, then on the others (which then find its files and caches).

    The others wait on the start-up group (`train.dist_startup_timeout`): preparing a large
    corpus can take longer than the training group's timeout. `device` must suit the backend
    (CUDA tensors for NCCL).
    """
    if not world.distributed:
        return prepare()
    result, failed = None, 0.0
    if world.is_main:
        try:
            result = prepare()
        except MtError:
            failed = 1.0
            distributed.all_reduce(world, [failed], device, startup=True)
            raise
    if distributed.all_reduce(world, [failed], device, startup=True)[0]:
        raise MtError(f"rank {world.rank}: rank 0 failed while preparing the run (see its error)")
    return result if world.is_main else prepare()


def train_step(
    trainee: Trainee,
    batches: list[Batch],
    tokens: int,
    config: Config,
    world: World,
    device: torch.device,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Forward/backward over this rank's micro-batches of one update; returns loss, nll, norm.

    Losses are summed and divided by the target tokens of the whole update over all ranks
    (`tokens`), so accumulation and data parallelism give the gradient of one big batch. DDP
    averages gradients over ranks, hence the factor world_size; it all-reduces only in the
    last backward (`no_sync` before). Before that backward, one small all-reduce tells every
    rank whether any rank ran out of memory: then all return None and skip the update together.
    """
    model, scaler, ddp = trainee.step_model, trainee.scaler, trainee.ddp
    scale = world.world_size / tokens
    loss_sum = torch.zeros((), device=device)
    nll_sum = torch.zeros((), device=device)
    out_of_memory = False
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        no_sync = ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext()
        try:
            with no_sync:
                batch = batch.to(device)
                with autocast(device, precision):
                    logits = model(batch.src, batch.tgt_in)  # (B, T, V)
                loss, nll, _ = label_smoothed_nll(
                    logits, batch.tgt_out, config.train.label_smoothing
                )
                if not last:
                    scaler.scale(loss * scale).backward()
        except torch.cuda.OutOfMemoryError:
            out_of_memory = True
            break
        loss_sum += loss.detach()
        nll_sum += nll.detach()
    if distributed.all_reduce(world, [float(out_of_memory)], device, op="max")[0]:
        trainee.optimizer.zero_grad(set_to_none=True)
        return None
    scaler.scale(loss * scale).backward()  # the last micro-batch: DDP all-reduces gradients here
    scaler.unscale_(trainee.optimizer)
    clip = config.train.clip_norm or math.inf
    params = [p for group in trainee.optimizer.param_groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    return loss_sum, nll_sum, norm


def data_parallel(
    model: Transformer, world: World, device: torch.device
) -> DistributedDataParallel | None:
    """DDP around the model when there are several ranks (it also syncs initial weights)."""
    if not world.distributed:
        return None
    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        process_group=world.group,
        broadcast_buffers=False,  # the only buffer is the constant position table
    )


def optimizer_step(trainee: Trainee, state: TrainState, precision: str, min_scale: float) -> None:
    """Step optimizer and schedule (GradScaler skips overflowed fp16 steps); count the step."""
    scaler = trainee.scaler
    scale = scaler.get_scale()
    scaler.step(trainee.optimizer)
    scaler.update()
    trainee.optimizer.zero_grad(set_to_none=True)
    trainee.scheduler.step()
    state.step += 1
    if precision == "fp16" and scaler.get_scale() < scale:
        state.overflow_steps += 1
        if scaler.get_scale() < min_scale:
            raise MtError(
                f"fp16 loss scale fell to {scaler.get_scale():g} at step {state.step} "
                f"(below train.min_loss_scale={min_scale:g}): gradients keep overflowing; "
                "use train.precision=bf16, or a lower train.lr"
            )


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
    """Dev loss and perplexity (teacher forcing) and BLEU of batched greedy or beam search."""
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
            output = search_ids(model, batch.src, config)
        loss, nll, _ = label_smoothed_nll(logits, batch.tgt_out, config.train.label_smoothing)
        loss_sum, nll_sum = loss_sum + loss.item(), nll_sum + nll.item()
        tokens += batch.tgt_tokens
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


def search_ids(model: Transformer, src: torch.Tensor, config: Config) -> list[list[int]]:
    """Output ids for validation: greedy for decode.valid_beam=1, beam search otherwise."""
    d = config.decode
    if d.valid_beam == 1:
        return greedy_search(model, src, d.max_len_a, d.max_len_b)
    nbest = beam_search(
        model, src, d.valid_beam, d.alpha, d.length_penalty, d.max_len_a, d.max_len_b, d.min_len
    )
    return [hyps[0].tokens for hyps in nbest]


def save(
    run_dir: Path, trainee: Trainee, state: TrainState, metadata: dict[str, str]
) -> ckpt.Checkpoint:
    """Write a complete checkpoint: weights, and everything needed to resume exactly."""
    payload = {
        "train": dataclasses.asdict(state),
        "optimizer": trainee.optimizer.state_dict(),
        "scheduler": trainee.scheduler.state_dict(),
        "scaler": trainee.scaler.state_dict(),
        "rng": ckpt.rng_state(),
    }
    return ckpt.save_checkpoint(run_dir, state.step, trainee.model, payload, metadata)


def restore(checkpoint: ckpt.Checkpoint, trainee: Trainee, metadata: dict[str, str]) -> TrainState:
    """Load a checkpoint into the model and optimizer; returns its TrainState."""
    ckpt.load_weights(checkpoint.weights, trainee.model, expected=metadata)
    payload = ckpt.load_state(checkpoint.state)
    trainee.optimizer.load_state_dict(payload["optimizer"])
    trainee.scheduler.load_state_dict(payload["scheduler"])
    trainee.scaler.load_state_dict(payload["scaler"])
    ckpt.set_rng_state(payload["rng"])
    return TrainState(**payload["train"])


def step_seed(seed: int, rank: int, step: int) -> int:
    """Dropout seed of one update: a function of (seed, rank, step), so resume needs no RNG."""
    return (seed * 1_000_003 + rank * 7_919 + step) % (2**63)


def prepare(config: Config, world: World) -> tuple[Tokenizer, EncodedCorpus, EncodedCorpus | None]:
    """Check and save the config, train or load the tokenizer, encode (or load) the corpora."""
    run_dir = run_path(config)
    if world.is_main:
        check_resumable(config, run_dir)
        save_config(config, run_dir / CONFIG_FILE)
    tokenizer = prepare_tokenizer(config)
    train_data = encoded(config, tokenizer, "train")
    valid_data = encoded(config, tokenizer, "valid") if config.data.valid else None
    return tokenizer, train_data, valid_data


def build(
    config: Config, tokenizer: Tokenizer, world: World, device: torch.device, precision: str
) -> Trainee:
    """Model (same initialisation on every rank), optimizer, schedule and loss scaler."""
    tc = config.train
    torch.manual_seed(tc.seed)
    model = model_from_config(config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    model.to(device)
    optimizer = make_optimizer(model, tc.lr, tc.betas, tc.eps, tc.weight_decay, device)
    ddp = data_parallel(model, world, device)
    step_model = ddp if ddp is not None else model
    return Trainee(
        model=model,
        step_model=torch.compile(step_model, dynamic=True) if tc.compile else step_model,
        ddp=ddp,
        optimizer=optimizer,
        scheduler=make_scheduler(optimizer, tc.lr, tc.warmup_steps),
        scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
    )


def train(config: Config, resume: Path | None = None) -> TrainResult:
    """Train as configured (one process, or one rank under torchrun); resumes if it can."""
    tc = config.train
    world, device = distributed.setup(tc.device, tc.dist_timeout, tc.dist_startup_timeout)
    if not world.is_main:
        log.setLevel(logging.WARNING)  # rank 0 alone logs progress; errors still print everywhere
    try:
        return _train(config, resume, world, device)
    finally:
        distributed.teardown(world)


def _train(config: Config, resume: Path | None, world: World, device: torch.device) -> TrainResult:
    tc = config.train
    run_dir = run_path(config)
    precision = resolve_precision(tc.precision, device)
    configure_backends(device)
    tokenizer, train_data, valid_data = main_first(world, device, lambda: prepare(config, world))
    references = corpus(config, "valid").targets() if valid_data is not None else []
    trainee = build(config, tokenizer, world, device, precision)
    metadata = checkpoint_metadata(tokenizer)
    state = TrainState()
    start = ckpt.resolve_checkpoint(resume) if resume else ckpt.latest_checkpoint(run_dir)
    if start is not None:
        state = restore(start, trainee, metadata)
        log.info("resumed from %s (step %d, epoch %d)", start.weights, state.step, state.epoch)
    if state.step >= tc.max_steps:
        log.info(
            "%s is already at step %d (train.max_steps=%d): nothing to do",
            run_dir, state.step, tc.max_steps,
        )  # fmt: skip
        return TrainResult(state)

    main = world.is_main
    sampler = BatchSampler(
        train_data.src_lens, train_data.tgt_lens, tc.max_tokens, tc.seed,
        rank=world.rank, world_size=world.world_size,
    )  # fmt: skip
    if main:
        valid_corpus = corpus(config, "valid") if valid_data is not None else None
        write_data_stats(run_dir, train_data, tokenizer, valid_corpus)
        log.info("train: %s", train_data.stats.describe())
        log.info("model: %s parameters", f"{count_parameters(trainee.model):,}")
        log.info(
            "%d batches per epoch per rank; up to %d tokens (padding included) per update = "
            "%d x %d x %d ranks; %s on %s",
            len(sampler), tc.max_tokens * tc.update_freq * world.world_size, tc.max_tokens,
            tc.update_freq, world.world_size, precision, device,
        )  # fmt: skip
    metrics = MetricsLog(run_dir) if main else None
    stream = batch_stream(sampler, train_data, state.epoch, state.batches_done, tc.max_epochs)
    bar = tqdm(
        total=tc.max_steps, initial=state.step, desc="train", dynamic_ncols=True,
        disable=not (main and sys.stderr.isatty()),
    )  # fmt: skip
    window = dict.fromkeys(
        ("loss", "nll", "tokens", "time", "data_time", "sync_time", "steps"), 0.0
    )
    last_saved = -1
    # Log lines go through tqdm.write, so they print above the bar instead of through it.
    with StopSignals() as stop, logging_redirect_tqdm(loggers=[logging.root]):
        while state.step < tc.max_steps:
            # 1. Gather this rank's micro-batches of one update (the same count on every rank).
            t0 = time.perf_counter()
            batches, position = [], (state.epoch, state.batches_done)
            for epoch, done, batch in stream:
                batches.append(batch)
                position = (epoch, done)
                if len(batches) == tc.update_freq:
                    break
            # 2. All ranks agree on the tokens of this update and on whether to stop.
            local_tokens = sum(b.tgt_tokens for b in batches)
            out_of_time = tc.max_minutes and state.train_seconds >= 60 * tc.max_minutes
            t_sync = time.perf_counter()  # this collective also absorbs waiting for slower ranks
            tokens, signalled, timed_out = distributed.all_reduce(
                world, [local_tokens, float(stop.signum is not None), float(out_of_time)], device
            )
            sync_time = time.perf_counter() - t_sync
            if signalled:
                stop.signum = stop.signum or signal.SIGTERM
                break
            if timed_out or not batches:
                if main and timed_out:
                    log.info("reached train.max_minutes=%g at step %d", tc.max_minutes, state.step)
                elif main:
                    log.info("reached train.max_epochs=%d", tc.max_epochs)
                break
            # 3. Forward, backward, update. Dropout depends only on (seed, rank, step).
            torch.manual_seed(step_seed(tc.seed, world.rank, state.step))
            result = train_step(trainee, batches, int(tokens), config, world, device, precision)
            state.epoch, state.batches_done = position
            if result is None:
                state.oom_steps += 1
                state.train_seconds += time.perf_counter() - t0
                if main:
                    log.warning(
                        "step %d: a rank ran out of memory; every rank skipped this update "
                        "(%d so far; lower train.max_tokens if this recurs)",
                        state.step + 1, state.oom_steps,
                    )  # fmt: skip
                continue
            loss, nll, norm = result
            if precision != "fp16" and not math.isfinite(norm.item()):
                # A non-finite loss makes non-finite gradients; after DDP's all-reduce they are
                # the same on every rank, so every rank takes this branch at the same step.
                crash = ckpt.save_crash(run_dir, state.step + 1, trainee.model) if main else None
                raise MtError(
                    f"non-finite loss or gradient at step {state.step + 1}; parameters were not "
                    f"updated; weights saved to {crash} (try a lower train.lr or train.clip_norm)"
                )
            optimizer_step(trainee, state, precision, tc.min_loss_scale)
            elapsed = time.perf_counter() - t0
            state.train_seconds += elapsed
            for key, value in (
                ("loss", loss.item()), ("nll", nll.item()), ("tokens", local_tokens),
                ("time", elapsed), ("data_time", t_sync - t0), ("sync_time", sync_time),
                ("steps", 1),
            ):  # fmt: skip
                window[key] += value
            bar.update(1)

            # 4. Log every log_every steps.
            if state.step % tc.log_every == 0 or state.step == tc.max_steps:
                values = summarize(window, world, device, trainee, state, norm.item())
                if main:
                    metrics.write("train", state.step, values)
                    bar.set_postfix(
                        loss=f"{values['loss']:.3f}", lr=f"{values['lr']:.1e}",
                        tok_s=f"{values['tgt_tok_s']:,.0f}",
                    )  # fmt: skip
                    if bar.disable:
                        log.info(log_line(state, values))
                window = dict.fromkeys(window, 0.0)

            # 5. Validate and checkpoint every valid_every steps (and at the end).
            if state.step % tc.valid_every == 0 or state.step == tc.max_steps:
                if main:
                    improved = validate_and_save(
                        trainee, state, valid_data, references, tokenizer, config, device,
                        precision, metrics, metadata,
                    )  # fmt: skip
                last_saved = state.step
                distributed.barrier(world, startup=True)  # the others wait for validation
                stop_early = tc.patience and state.bad_validations >= tc.patience
                if main and not improved and stop_early:
                    log.info("no better dev BLEU in %d validations: stopping early", tc.patience)
                if distributed.all_reduce(world, [float(bool(stop_early))], device)[0]:
                    break
        bar.close()
        if main and last_saved != state.step:
            if stop.signum is None:  # the end of the run: its last checkpoint may be the best
                validate_and_save(
                    trainee, state, valid_data, references, tokenizer, config, device,
                    precision, metrics, metadata,
                )  # fmt: skip
            else:  # stop fast: the scheduler is waiting
                save(run_dir, trainee, state, metadata)
                ckpt.prune_checkpoints(run_dir, tc.keep_last)
        if main and tc.average_last and stop.signum is None:
            available = len(ckpt.list_checkpoints(run_dir))
            path = average_run(run_dir, last=min(tc.average_last, available))
            log.info(
                "averaged the last %d checkpoints into %s", min(tc.average_last, available), path
            )
        if metrics is not None:
            end = {"train_seconds": state.train_seconds, "epoch": state.epoch}
            metrics.write("end", state.step, {**end, "precision": precision, "device": str(device)})
            metrics.close()
        if main and tc.report and stop.signum is None:
            # Test decoding at "auto" precision, as `mt evaluate` does: fp32 on CPU, bf16 on CUDA.
            log.info("wrote %s", write_report(run_dir, device=str(device)))
        if stop.signum is not None and main:
            log.info(
                "stopped by signal %d at step %d; checkpoint written; run the same command "
                "to resume", stop.signum, state.step,
            )  # fmt: skip
        return TrainResult(state, stop.signum)


def summarize(
    window: dict[str, float],
    world: World,
    device: torch.device,
    trainee: Trainee,
    state: TrainState,
    norm: float,
) -> dict[str, float]:
    """Average the logging window over ranks: loss, perplexity, lr, throughput."""
    loss, nll, tokens = distributed.all_reduce(
        world, [window["loss"], window["nll"], window["tokens"]], device
    )
    slowest = distributed.all_reduce(world, [window["time"]], device, op="max")[0]
    return {
        "loss": loss / tokens,
        "ppl": math.exp(min(nll / tokens, 100.0)),
        "lr": trainee.scheduler.get_last_lr()[0],
        "grad_norm": norm,
        "tgt_tok_s": tokens / slowest,  # all ranks together
        "rank_tgt_tok_s": window["tokens"] / window["time"],  # rank 0 alone
        "tokens_per_update": tokens / window["steps"],
        "data_seconds": window["data_time"],  # rank 0 waiting for batches
        "sync_seconds": window["sync_time"],  # rank 0 waiting for the other ranks
        "epoch": state.epoch,
        "overflow_steps": state.overflow_steps,
    }


def validate_and_save(
    trainee: Trainee,
    state: TrainState,
    valid_data: EncodedCorpus | None,
    references: list[str],
    tokenizer: Tokenizer,
    config: Config,
    device: torch.device,
    precision: str,
    metrics: MetricsLog,
    metadata: dict[str, str],
) -> bool:
    """Rank 0: validate (if there is a dev set), checkpoint, move `best`; True if improved."""
    improved = True  # without a dev set, the newest checkpoint is the best
    if valid_data is not None:
        t0 = time.perf_counter()
        scores = validate(
            trainee.model, valid_data, references, tokenizer, config, device, precision
        )
        scores["seconds"] = time.perf_counter() - t0
        state.train_seconds += scores["seconds"]
        improved = scores["bleu"] > state.best_bleu
        state.best_bleu = max(state.best_bleu, scores["bleu"])
        state.bad_validations = 0 if improved else state.bad_validations + 1
        metrics.write("valid", state.step, scores)
        log.info(
            "valid step %d | loss %.3f | ppl %.2f | BLEU %.2f (best %.2f) | %.1fs",
            state.step, scores["loss"], scores["ppl"], scores["bleu"], state.best_bleu,
            scores["seconds"],
        )  # fmt: skip
    run_dir = run_path(config)
    saved = save(run_dir, trainee, state, metadata)
    if improved:
        ckpt.set_best(run_dir, saved)
    ckpt.prune_checkpoints(run_dir, config.train.keep_last)
    return improved


def log_line(state: TrainState, values: dict[str, float]) -> str:
    """A compact progress line: step, loss, ppl, lr, tokens/s."""
    return (
        f"step {state.step} | epoch {state.epoch} | loss {values['loss']:.3f} | "
        f"ppl {values['ppl']:.2f} | lr {values['lr']:.2e} | {values['tgt_tok_s']:,.0f} tgt tok/s"
    )
