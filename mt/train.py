"""`mt train`: one training loop, read top to bottom, with small named steps around it.

Data flows: corpora -> tokenizer -> encoded, cached data -> token-budget batches -> model ->
label-smoothed loss -> Adam + inverse-sqrt schedule (and cool-down) -> checkpoints, validation
BLEU.
Under torchrun every rank runs this loop on its share of each update; rank 0 alone writes.
What runs after training (checkpoint averaging, the report) is `mt.finish`'s job.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sacrebleu
import torch
from torch import Tensor
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from mt import checkpoint as ckpt
from mt import distributed, search
from mt.batching import (
    Batch,
    BatchSampler,
    MixtureSampler,
    Prefetcher,
    Update,
    collate,
    plan_updates,
)
from mt.bleu import DEFAULT_TOKENIZER, bleu_tokenizer
from mt.config import CONFIG_FILE, Config, TrainConfig, diff, load_config, save_config
from mt.corpora import Corpus
from mt.data import CorpusMix, EncodedCorpus, write_data_stats
from mt.device import (
    DTYPES,
    PrecisionChoice,
    autocast,
    configure_backends,
    give_back_freed_memory,
    machine_kind,
    memory_bytes,
    model_products,
    resolve_precision,
)
from mt.distributed import World, main_first
from mt.errors import ConfigError, MtError, first_line
from mt.files import atomic_directory
from mt.lock import hold_run_lock, job_id
from mt.loss import label_smoothed_nll
from mt.metrics import (
    MetricsLog,
    may_be_best,
    perplexity,
    read_metrics,
    selected_bleu,
    selection_scores,
)
from mt.model import Transformer, count_parameters, set_dropout
from mt.optim import Schedule, make_optimizer, make_scheduler
from mt.rundir import (
    TOKENIZER_DIR,
    TRAINED_ON,
    checkpoint_metadata,
    encode_directions,
    encode_train,
    open_directions,
    prepare_tokenizer,
    run_path,
    split_label,
)
from mt.tokenizer import LINE_BREAKS, Tokenizer, load_tokenizer

log = logging.getLogger("mt")

# Settings a resumed run may change; everything else in data/tokenizer/model must match.
# data.temperature and data.mixed_batches are not among them: the epoch being resumed was
# planned with them.
# data.select_direction only picks the best checkpoint (see reselect).
RESUMABLE_DATA_KEYS = {"valid", "test", "num_proc", "cache_dir", "select_direction"}
RESUMABLE_CORPUS_KEYS = {"valid", "test"}  # of each of data.corpora
# Model settings a run started from another run's checkpoint may change (fine-tuning).
FINE_TUNABLE = {"model.dropout", "model.attn_dropout"}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
PREFETCH_UPDATES = 2  # updates collated ahead of the training step, in a background thread
TRAIN_SETTINGS = "train_config"  # in a checkpoint's state: the train section it was trained with
AUTO_PRECISION = "auto_precision"  # in a checkpoint's state: what `auto` chose, on what machine


@dataclass
class TrainState:
    """Counters saved in every checkpoint, so that a resumed run continues exactly."""

    step: int = 0  # optimizer updates done (skipped ones not counted)
    epoch: int = 1  # current epoch (1-based)
    batches_done: int = 0  # batches of the current epoch consumed, by all ranks together
    world_size: int = 1  # ranks that trained up to this state
    best_bleu: float = -1.0  # best dev BLEU so far (of select_direction)
    select_direction: str = ""  # data.select_direction when best_bleu was measured
    bad_validations: int = 0  # validations since the best one (early stopping)
    overflow_steps: int = 0  # fp16 updates skipped because gradients overflowed
    oom_steps: int = 0  # updates skipped on every rank because one ran out of memory
    train_seconds: float = 0.0  # wall-clock spent in training steps and validation
    clock_step: int = 0  # updates done before train_seconds began (another run's, --resume)
    cooldown_start: int = 0  # updates done when the lr's cool-down began (train.cooldown)
    cooldown_steps: int = 0  # updates of the cool-down, fixed when it began (0: not begun)
    unvalidated: bool = False  # a signal stopped the run at a due validation: it runs on resume
    validated: bool = False  # this step was validated (a signal's fast stop skips it)
    data: str = ""  # fingerprint of the training data (CorpusMix.fingerprint): resume compares


@dataclass
class TrainResult:
    """How a run ended: its final state and, if a signal stopped it, the signal number."""

    state: TrainState
    signum: int | None = None
    device: str = "cpu"  # where it trained (the report decodes there)
    main: bool = True  # rank 0, which alone writes (and finishes the run)
    idle: bool = False  # the run was already at train.max_steps: nothing was done


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


# ---------------------------------------------------------------------------------------------
# The learner: the model and everything that updates it.


@dataclass
class Learner:
    """The model, its optimizer, schedule and loss scaler, on one rank's device and precision."""

    model: Transformer  # the bare model: checkpoints, validation
    step_model: Callable[..., Tensor]  # what the training step calls: the model, maybe compiled
    step_loss: Callable[..., tuple[Tensor, Tensor, Tensor]] | None  # compiled loss, if compiling
    optimizer: torch.optim.Optimizer
    schedule: Schedule  # the lr by update, which the scheduler reads
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    world: World
    device: torch.device
    precision: str
    label_smoothing: float
    clip_norm: float  # 0 = off
    ema: Transformer | None = None  # rank 0: the moving average of the weights, if kept
    ema_decay: float = 0.0

    @property
    def params(self) -> list[Tensor]:
        """The parameters the optimizer updates (tied ones once)."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @property
    def eval_model(self) -> Transformer:
        """What validation scores and checkpoints hold: the EMA of the weights if kept."""
        return self.ema if self.ema is not None else self.model


def build_learner(
    config: Config, vocab: tuple[int, int], world: World, device: torch.device, precision: str
) -> Learner:
    """Model (same initialisation on every rank), optimizer, schedule and loss scaler."""
    tc = config.train
    torch.manual_seed(tc.seed)
    model = Transformer(config.model, *vocab).to(device)
    distributed.broadcast_parameters(world, model)  # identical already; cheap insurance
    optimizer = make_optimizer(model, tc.lr, tc.betas, tc.eps, tc.weight_decay, device)
    schedule = Schedule(tc.lr, tc.warmup_steps)
    # Rank 0 alone validates and saves: the others would only spend time keeping an EMA.
    keep_ema = tc.ema_decay > 0 and world.is_main
    return Learner(
        model=model,
        step_model=torch.compile(model, dynamic=True) if tc.compile else model,
        step_loss=torch.compile(label_smoothed_nll, dynamic=True) if tc.compile else None,
        optimizer=optimizer,
        schedule=schedule,
        scheduler=make_scheduler(optimizer, schedule),
        scaler=loss_scaler(device, enabled=precision == "fp16"),
        world=world,
        device=device,
        precision=precision,
        label_smoothing=tc.label_smoothing,
        clip_norm=tc.clip_norm,
        ema=copy.deepcopy(model).requires_grad_(False).eval() if keep_ema else None,
        ema_decay=tc.ema_decay,
    )


@dataclass
class StepResult:
    """What one update's forward and backward passes gave, agreed on by every rank."""

    loss: Tensor  # this rank's summed loss (on the device; read when logging)
    nll: Tensor  # this rank's summed negative log-likelihood
    norm: float  # gradient norm before clipping (the same on every rank)
    out_of_memory: bool  # a rank ran out of memory: every rank skips the update
    stop: bool  # a rank was signalled: every rank stops after this update
    out_of_time: bool  # a rank reached train.max_minutes
    seconds: float  # training seconds before this update, the mean over ranks


def train_step(
    learner: Learner,
    batches: list[Batch],
    tokens: int,
    stop: bool,
    out_of_time: bool,
    seconds: float = 0.0,
    seeds: Sequence[int] = (),
) -> StepResult:
    """Forward and backward over this rank's micro-batches, then gradients summed over ranks.

    `seeds`, one per micro-batch, seed the random numbers (dropout) of each before its forward.

    Each micro-batch's summed loss is divided by the update's target tokens over all ranks
    (`tokens`), so accumulation and data parallelism give the gradient of one big batch. The
    gradients cross the network once, after the last backward, in one collective that also
    carries each rank's flags: a rank that ran out of memory anywhere in the step joins it with
    zero gradients and its flag set, so every rank skips the update instead of hanging. The
    same collective averages the ranks' training `seconds`, so that a decision on time (the
    cool-down's start) is the same on every rank. The host reads the device once per step: the
    summed flags and the gradient norm together.
    """
    loss_sum = torch.zeros((), device=learner.device)
    nll_sum = torch.zeros((), device=learner.device)
    out_of_memory = False
    try:
        for i, batch in enumerate(batches):
            if seeds:
                torch.manual_seed(seeds[i])
            loss, nll = forward_backward(learner, batch, tokens)
            loss_sum += loss
            nll_sum += nll
    except torch.cuda.OutOfMemoryError:
        out_of_memory = True
        free_memory(learner)
    flags = torch.zeros(4, device=learner.device)
    for i, raised in enumerate((out_of_memory, stop, out_of_time)):
        if raised:
            flags[i] = 1.0  # a fill with a scalar argument: no host-device copy
    flags[3] = seconds
    flags = distributed.sum_gradients(learner.world, learner.params, flags)
    learner.scaler.unscale_(learner.optimizer)
    norm = torch.nn.utils.clip_grad_norm_(learner.params, learner.clip_norm or math.inf)
    summed = torch.cat([flags, norm.reshape(1).float()]).tolist()  # the step's one host read
    raised = (value > 0 for value in summed[:3])
    return StepResult(loss_sum, nll_sum, summed[4], *raised, summed[3] / learner.world.world_size)


def forward_backward(learner: Learner, batch: Batch, tokens: int) -> tuple[Tensor, Tensor]:
    """One micro-batch: forward under autocast, float32 loss, backward; summed loss and nll."""
    batch = batch.to(learner.device)
    with autocast(learner.device, learner.precision):
        padded = batch.src_tokens != batch.src.numel()  # from collation: no device read
        logits = learner.step_model(batch.src, batch.tgt_in, padded=padded)  # (B, T, V)
    # Looked up at call time, so that tests can inject faults into the loss.
    loss_fn = learner.step_loss or label_smoothed_nll
    loss, nll, _ = loss_fn(logits, batch.tgt_out, learner.label_smoothing)
    learner.scaler.scale(loss / tokens).backward()
    return loss.detach(), nll.detach()


def free_memory(learner: Learner) -> None:
    """After an out-of-memory error: drop the step's gradients and return cached blocks."""
    learner.optimizer.zero_grad(set_to_none=True)
    if learner.device.type == "cuda":
        torch.cuda.empty_cache()


def optimizer_step(
    learner: Learner, state: TrainState, min_loss_scale: float, cooldown: int = 0
) -> bool:
    """Step optimizer and schedule; False if the fp16 scaler skipped an overflowed update.

    A skipped update does not count: neither the step nor the schedule advances. A `cooldown`
    of N begins the lr's cool-down after this update: the next N updates take it to zero.
    """
    scaler = learner.scaler
    scale = scaler.get_scale() if scaler.is_enabled() else 1.0
    scaler.step(learner.optimizer)
    scaler.update()
    learner.optimizer.zero_grad(set_to_none=True)
    if scaler.is_enabled() and scaler.get_scale() < scale:
        state.overflow_steps += 1
        if scaler.get_scale() < min_loss_scale:
            raise MtError(
                f"fp16 loss scale fell to {scaler.get_scale():g} after {state.overflow_steps} "
                f"overflowing updates at step {state.step} (below train.min_loss_scale="
                f"{min_loss_scale:g}): gradients keep overflowing; use train.precision=bf16, "
                "or a lower train.lr"
            )
        return False
    state.step += 1
    if cooldown:
        state.cooldown_start, state.cooldown_steps = state.step, cooldown
        sync_cooldown(learner, state)
    learner.scheduler.step()  # the lr of the next update
    update_ema(learner, state.step - state.clock_step)  # warmed up over this run's own updates
    return True


def out_of_time(tc: TrainConfig, seconds: float) -> bool:
    """Whether `seconds` of training have used up train.max_minutes (never, when it is 0)."""
    return bool(tc.max_minutes) and seconds >= 60 * tc.max_minutes


def cooldown_due(tc: TrainConfig, state: TrainState, seconds: float) -> int:
    """Updates of the cool-down if it begins after the update being applied; 0 if not yet.

    It begins after (1 - train.cooldown) of the steps, or of the minutes where train.max_minutes
    is set, whichever comes first: this run's own, from the step it started at (another run's,
    with --resume). On time, its length is the number of updates the minutes left will hold at
    the run's rate so far (validations included): the same schedule on every CPU, each cooling
    down over the updates it can make.
    """
    step = state.step + 1
    if not tc.cooldown or state.cooldown_steps or step >= tc.max_steps:
        return 0
    due = []
    if step >= tc.max_steps - math.floor(tc.cooldown * (tc.max_steps - state.clock_step)):
        due.append(tc.max_steps - step)
    budget = 60 * tc.max_minutes
    if budget and seconds >= (1 - tc.cooldown) * budget:
        rate = (step - state.clock_step) / seconds  # the updates this run's clock has timed
        due.append(max(math.floor((budget - seconds) * rate), 1))
    return min(due, default=0)


def sync_cooldown(learner: Learner, state: TrainState) -> None:
    """Give the schedule the cool-down `state` holds (none before it begins).

    Called where the cool-down begins and on resume, the two places `state` gets a new one.
    """
    learner.schedule.cooldown_start = state.cooldown_start
    learner.schedule.cooldown_steps = state.cooldown_steps


def cooled_down(learner: Learner, state: TrainState) -> bool:
    """Whether the run has made the last update of its cool-down (its lr reached zero)."""
    end = learner.schedule.cooldown_end
    return end is not None and state.step >= end


def ema_decay_at(decay: float, step: int) -> float:
    """The EMA's decay after `step` updates: (1 + step) / (10 + step) until that reaches `decay`.

    With a constant decay d the random initial weights keep a share d^step of the average
    (37% after 1,000 updates at 0.999); with this warm-up (Marian's, TensorFlow's) their share
    after t updates is 10! (t + 1)! / (t + 10)!, below 1e-9 after 100 updates.
    """
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(learner: Learner, step: int) -> None:
    """Move the EMA of the weights towards the weights after the run's update `step`."""
    if learner.ema is None:
        return
    weight = 1.0 - ema_decay_at(learner.ema_decay, step)
    # parameters() lists tied weights once, in the same order in the model and its deep copy.
    torch._foreach_lerp_(list(learner.ema.parameters()), list(learner.model.parameters()), weight)


def step_seed(seed: int, batch: int, step: int) -> int:
    """Dropout seed of a micro-batch: a function of (seed, its place among the update's
    batches, step), so resume needs no RNG state, and a batch gets the same dropout whichever
    rank and micro-batch it falls to (2 ranks train as 1 with update_freq 2). Hashed, so no two
    (batch, step) share one (a sum such as batch x 7,919 + step repeats 7,919 steps later)."""
    words = np.random.SeedSequence([seed, batch, step]).generate_state(1, np.uint64)
    return int(words[0] >> np.uint64(1))  # torch.manual_seed takes [0, 2^63)


def micro_batch_seeds(seed: int, world: World, step: int, micro_batches: int) -> list[int]:
    """The seeds of this rank's micro-batches: the update's batches are dealt out round the
    ranks, so its i-th is batch rank + i x ranks of the update."""
    batches = (world.rank + i * world.world_size for i in range(micro_batches))
    return [step_seed(seed, batch, step) for batch in batches]


# ---------------------------------------------------------------------------------------------
# The run: everything training needs, prepared once at its start.


@dataclass
class DevSet:
    """The dev set as validation sees it: pairs cut to the model's length, whole references.

    The dev set is never filtered. A sentence longer than the model takes is treated as
    `mt translate` treats it: its source cut to `max_len` pieces (and its target, for the loss),
    while BLEU compares with the whole reference, so dev BLEU stays comparable to `mt evaluate`.
    """

    data: EncodedCorpus
    references: list[str]
    max_len: int  # pieces per side: model.max_positions - 1, room for EOS / BOS
    tokenize: str = DEFAULT_TOKENIZER  # BLEU's tokenizer for the target language

    def pairs(self, indices: np.ndarray) -> list[tuple[list[int], list[int]]]:
        """The (source, target) ids of the given rows, cut to max_len pieces each."""
        return [(s[: self.max_len], t[: self.max_len]) for s, t in self.data.pairs(indices)]

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """Source and target lengths after the cut: (N,) each."""
        return np.minimum(self.data.src_lens, self.max_len), np.minimum(
            self.data.tgt_lens, self.max_len
        )


@dataclass
class Run:
    """Everything a training run has: its settings, data, learner, state and logs."""

    config: Config
    directory: Path
    tokenizer: Tokenizer
    train_data: CorpusMix  # the training corpus of every direction
    dev: dict[str, DevSet]  # by direction; rank 0 only: the others never validate
    metadata: dict[str, str]  # what a checkpoint must agree on with this run
    learner: Learner
    precision: PrecisionChoice  # how learner.precision was chosen (rank 0's record)
    state: TrainState
    metrics: MetricsLog | None = None  # rank 0 only, opened when training begins
    last_saved: int = -1  # the step of the last checkpoint written
    origin: str = ""  # the run's own checkpoint that --resume named, if any (resume_origin)
    job: str = ""  # its scheduler's job and --resume, with the origin (resume_job)
    window: dict[str, float] = field(default_factory=dict)  # the logging window's sums

    @property
    def world(self) -> World:
        """This process's place among the ranks."""
        return self.learner.world


def check_resumable(config: Config, run_dir: Path) -> None:
    """Refuse to continue a run whose data, tokenizer or model settings changed."""
    saved_path = run_dir / CONFIG_FILE
    if not saved_path.exists():
        return
    saved = load_config(saved_path)
    changes = [
        line
        for line in diff(saved, config, ["data", "tokenizer", "model"])
        if not resumable(line.split(":")[0])
    ]
    if changes:
        raise ConfigError(
            f"{saved_path}: the run was started with other settings ({'; '.join(changes)}); "
            "use a new run_dir, or restore those settings to resume"
        )


def resume_target(resume: Path | None, config: Config) -> Path | None:
    """The checkpoint a run starts from: `resume`, unless the same command again (a requeued
    job) should go on instead of going back to where it began. That is, for another run's
    checkpoint, when this run has checkpoints of its own: its latest (None); for one of this
    run's, in a job that its scheduler restarted: the latest that job saved (see
    latest_descendant; pruning may have deleted the one `resume` names since)."""
    here = run_path(config)
    if resume is None:
        return None
    origin = own_checkpoint(resume, config)
    if origin is not None:
        restarted = distributed.restarted() and origin.is_step
        went_on = ckpt.latest_descendant(here, origin, resume_job(resume)) if restarted else None
        if went_on is None:
            return resume
        log.info(f"{here} goes on from its own {went_on.name}; --resume {resume} began it")
        return went_on.weights
    ckpt.resolve_checkpoint(resume)  # another run's: MtError if there is none
    latest = ckpt.latest_checkpoint(here)
    if latest is None:
        return resume
    log.info(f"{here} goes on from its own {latest.name}; --resume {resume} began it")
    return None


def resume_job(resume: Path | None) -> str:
    """What a run gone back records of its command (with its origin, see latest_descendant):
    its scheduler's job and its --resume, the same in each restart of that command and other
    for another command of the job (several in one allocation, a reused rendezvous id); ""
    outside a scheduler's job."""
    job = job_id()
    return f"{job} --resume {Path(resume).resolve()}" if job and resume is not None else ""


def check_resume_state(asked: Path | None, resume: Path | None) -> None:
    """MtError now, not after the data, if `resume` (what `--resume asked` led to) has no
    checkpoint or no training state."""
    if resume is not None:
        state = ckpt.resolve_checkpoint(resume).state
        if not state.is_file():
            raise MtError(f"--resume {asked}: {state} is missing (resuming needs it)")


def own_checkpoint(resume: Path, config: Config) -> ckpt.Checkpoint | None:
    """The checkpoint of this run that `resume` names, else None: one found, or the path of a
    step checkpoint in the run's checkpoints directory that is no longer there."""
    try:
        chosen = ckpt.resolve_checkpoint(resume)
    except MtError:
        path = Path(resume)
        if not path.name.endswith(ckpt.WEIGHTS_SUFFIX):
            path = path.with_name(path.name + ckpt.WEIGHTS_SUFFIX)
        chosen = ckpt.Checkpoint.from_weights(path)
        if not chosen.is_step:
            return None
    here = ckpt.checkpoint_dir(run_path(config)).resolve()
    return chosen if chosen.weights.parent.resolve() == here else None


def resume_origin(resume: Path | None, config: Config) -> str:
    """The name of `resume`'s checkpoint if it is one of this run's (a run gone back): the
    origin its checkpoints record, for resume_target in a restarted job. Else ""."""
    origin = None if resume is None else own_checkpoint(resume, config)
    return "" if origin is None else origin.name


def start_from(checkpoint: ckpt.Checkpoint, config: Config) -> None:
    """Before any data work, for a checkpoint of another run: refuse another model shape or
    tokenizer, and give a run that has no tokenizer the checkpoint run's (its vocabulary)."""
    source, here = checkpoint.run_dir, run_path(config)
    if source.resolve() == here.resolve():
        return
    saved = source / CONFIG_FILE
    changes = diff(load_config(saved), config, ["model"]) if saved.is_file() else []
    changes = [c for c in changes if c.split(":")[0] not in FINE_TUNABLE]
    if changes:
        raise ConfigError(
            f"--resume {checkpoint.weights}: its run has other model settings "
            f"({'; '.join(changes)}); set them as that run's to start from it"
        )
    theirs, mine = source / TOKENIZER_DIR, here / TOKENIZER_DIR
    wanted = ckpt.read_metadata(checkpoint.weights).get("tokenizer_sha256")
    if mine.exists():
        if wanted and load_tokenizer(mine).fingerprint() != wanted:
            raise ConfigError(
                f"--resume {checkpoint.weights}: its vocabulary is not this run's tokenizer "
                f"({mine}); start a new run_dir, which takes the checkpoint run's tokenizer"
            )
    elif theirs.is_dir():
        with atomic_directory(mine) as temp:
            # Without its record of the data: this run trains on other data by design.
            shutil.copytree(
                theirs, temp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(TRAINED_ON)
            )
        log.info("using the tokenizer of %s, whose checkpoint this run starts from", source)
    elif wanted:  # a tokenizer trained now would not be its vocabulary: refused after hours
        raise ConfigError(
            f"--resume {checkpoint.weights}: no tokenizer in its run ({theirs}) or in this one "
            f"({mine}); copy the tokenizer it was trained with to {mine}"
        )


def resumable(key: str) -> bool:
    """Whether a resumed run may change this key of the data, tokenizer or model sections."""
    if key.startswith("data.corpora["):  # e.g. data.corpora[2].valid
        return key.rsplit(".", 1)[1] in RESUMABLE_CORPUS_KEYS
    return key.removeprefix("data.") in RESUMABLE_DATA_KEYS


Prepared = tuple[Tokenizer, CorpusMix, dict[str, EncodedCorpus]]


def prepare(config: Config, world: World) -> Prepared:
    """Check the config against the run's, train or load the tokenizer, encode the corpora."""
    if world.is_main:
        check_resumable(config, run_path(config))
    tokenizer = prepare_tokenizer(config)
    train_data = encode_train(config, tokenizer)
    valid_data = encode_directions(config, tokenizer, "valid")
    return tokenizer, train_data, valid_data


def start(
    config: Config,
    resume: Path | None,
    world: World,
    device: torch.device,
    stack: contextlib.ExitStack,
) -> Run:
    """Lock the run directory, prepare tokenizer and data, build the learner, restore.

    Rank 0 holds the lock until `stack` closes, and repairs the checkpoints first; the one
    restored is then chosen: what resume_target makes of `resume`, else the run's latest.
    """
    # Each rank checks on its own: one that fails tells the others, which would wait for it
    # in the first collective until the start-up timeout.
    with distributed.together(world, device, "checking the run"):
        configure_backends(device)
        check_trainable(config)
        check_fits(config, device)
        if config.train.compile:
            check_compile(device)
        if resume is not None and own_checkpoint(resume, config) is None:
            check_resume_state(resume, resume)  # another run's: before the lock file is written
    asked = resume

    def prepare_run() -> tuple[Path | None, Prepared]:
        if world.is_main:  # before anything is written: a second trainer stops here
            stack.enter_context(hold_run_lock(run_path(config)))
            valid = read_metrics(run_path(config), "valid")
            scores = selection_scores(valid, config.data.select_direction)
            ckpt.repair_checkpoints(run_path(config), scores)
        # Chosen after the repair, which may set aside the checkpoint it would choose.
        target = resume_target(asked, config)
        check_resume_state(asked, target)
        if world.is_main and target is not None:
            start_from(ckpt.resolve_checkpoint(target), config)
        return target, prepare(config, world)

    resume, (tokenizer, train_data, valid_data) = main_first(world, device, prepare_run)
    vocab = (tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    with distributed.together(world, device, "reading the checkpoint"):
        checkpoint, payload = restore_point(resume, config)
    # Before the learner is built: a resumed run keeps the precision `auto` chose for it.
    precision = run_precision(config, vocab[1], world, device, payload.get(AUTO_PRECISION))
    learner = build_learner(config, vocab, world, device, precision.precision)
    with distributed.together(world, device, "restoring the run"):  # rank 0's work: files
        run = Run(
            config=config,
            directory=run_path(config),
            tokenizer=tokenizer,
            train_data=train_data,
            dev=dev_sets(config, valid_data, learner.model) if world.is_main else {},
            metadata=checkpoint_metadata(tokenizer),
            learner=learner,
            precision=precision,
            state=TrainState(
                world_size=world.world_size,
                select_direction=config.data.select_direction,
                data=train_data.fingerprint(),
            ),
            origin=resume_origin(asked, config),
            job=resume_job(asked),
        )
        clear_window(run)
        if checkpoint is not None:
            if resume and world.is_main:
                warn_later_checkpoints(checkpoint, run.directory)
            run.state = restore(checkpoint, payload, run)
            # A validated checkpoint needs no second validation should the run end where it is.
            run.last_saved = run.state.step if run.state.validated else -1
    check_same_start(run)
    share_best(run)
    return run


def share_best(run: Run) -> None:
    """Every rank takes rank 0's best dev BLEU and validations since it, which only rank 0
    restores anew (reselect): early stopping (train.patience) must stop all ranks or none."""
    state, main = run.state, run.world.is_main
    values = [state.best_bleu, float(state.bad_validations)] if main else [0.0, 0.0]
    best, bad = distributed.all_reduce(run.world, values, run.learner.device, startup=True)
    state.best_bleu, state.bad_validations = best, int(bad)


def check_same_start(run: Run) -> None:
    """MtError on every rank unless all start from the same step with the same training data.

    A run directory each node sees its own copy of (node-local disk) resumes rank 0 alone and
    trains on garbage; training files that differ between nodes (a stale or cut copy) plan
    other batches on each rank, and end an epoch on one while another waits for gradients.
    """
    step = float(run.state.step)
    data = float(int(run.train_data.fingerprint()[:12], 16))  # 48 bits: exact in a float64
    highest, lowest, most, least = distributed.all_reduce(
        run.world, [step, -step, data, -data], run.learner.device, op="max", startup=True
    )
    if highest != -lowest:
        raise MtError(
            f"rank {run.world.rank}: the ranks start from different steps ({-lowest:,.0f} to "
            f"{highest:,.0f}; this one {step:,.0f}): train.run_dir must be on storage that "
            "every node shares"
        )
    if most != -least:
        raise MtError(
            f"rank {run.world.rank}: the ranks read different training data (this one "
            f"{len(run.train_data):,} pairs, {run.train_data.describe_tokens()}): the training "
            "corpora must hold the same data on every node"
        )


def check_trainable(config: Config) -> None:
    """ConfigError for what only training needs, checked as a run starts (not at load: a run's
    saved config must still load to translate with): a dev set for patience and selection."""
    data, patience = config.data, config.train.patience
    if patience and not any(c.valid for c in data.directions()):
        raise ConfigError(f"train.patience={patience} needs a dev set (data.valid) to stop on")
    chosen = [c for c in data.directions() if c.direction == data.select_direction]
    if chosen and not chosen[0].valid:
        raise ConfigError(
            f"data.select_direction={data.select_direction!r}: that direction has no dev set "
            "(data.valid, or its corpus's valid)"
        )


TRAINING_BYTES = 16  # per parameter: fp32 weights, their gradients and Adam's two moments


def check_compile(device: torch.device) -> None:
    """ConfigError unless torch.compile works here, found by compiling and running a tiny
    function: a machine without a working compiler (a slim image without gcc) would otherwise
    fail at the first update, after the tokenizer and data work."""
    try:
        torch.compile(_twice_plus_one)(torch.ones(2, device=device))
    except Exception as exc:  # inductor's failures have no common base but Exception
        raise ConfigError(
            f"train.compile=true: torch.compile fails on this machine ({first_line(exc)}); "
            "set train.compile=false"
        ) from None


def _twice_plus_one(x: Tensor) -> Tensor:
    return x * 2 + 1


def check_fits(config: Config, device: torch.device) -> None:
    """ConfigError, before any tokenizer or data work, for a model that cannot fit in memory to
    train (a typo such as model.ffn_dim=204800 or model.max_positions=10**12). Its parameters
    are counted from below (the feed-forward layers' weights alone), so no model that fits is
    refused."""
    m = config.model
    layers = m.enc_layers + m.dec_layers
    parameters = layers * 2 * m.dim * m.ffn_dim
    need, have = TRAINING_BYTES * parameters, memory_bytes(device)
    table = 4 * m.max_positions * m.dim  # the sinusoidal positions, float32
    if have is not None and table > have:
        raise ConfigError(
            f"model.max_positions={m.max_positions:,}: its positional table of "
            f"{m.max_positions:,} x {m.dim} needs {table / 2**30:,.1f} GiB; {device} has "
            f"{have / 2**30:,.1f} GiB"
        )
    if have is not None and need > have:
        raise ConfigError(
            f"model: {layers} layers of dim {m.dim} and ffn_dim {m.ffn_dim} make at least "
            f"{parameters:,} parameters, {need / 2**30:,.1f} GiB to train (weights, gradients "
            f"and Adam's moments); {device} has {have / 2**30:,.1f} GiB"
        )


def warn_later_checkpoints(checkpoint: ckpt.Checkpoint, run_dir: Path) -> None:
    """Warn when --resume goes back: the run's later checkpoints stay, the latest resumed next."""
    if not checkpoint.is_step:
        return
    later = [c.name for c in ckpt.list_checkpoints(run_dir) if c.step > checkpoint.step]
    if later:
        log.warning(
            f"warning: --resume {checkpoint.name} goes back; the run's later checkpoints "
            f"({', '.join(later)}) stay, and a run without --resume continues from the latest: "
            "delete them to abandon them"
        )


def restore_point(
    resume: Path | None, config: Config
) -> tuple[ckpt.Checkpoint | None, dict[str, Any]]:
    """The checkpoint a run starts from (`resume`, else the run's latest, else none) and its
    training state (empty for none)."""
    run_dir = run_path(config)
    checkpoint = ckpt.resolve_checkpoint(resume) if resume else ckpt.latest_checkpoint(run_dir)
    return checkpoint, ckpt.load_training_state(checkpoint) if checkpoint else {}


def run_precision(
    config: Config,
    tgt_vocab: int,
    world: World,
    device: torch.device,
    recorded: dict[str, str] | None,
) -> PrecisionChoice:
    """The run's precision: rank 0 resolves it (`auto` on CPU times the model's products),
    unless it keeps the choice `recorded` in the checkpoint it resumes (kept_precision).

    The other ranks take rank 0's choice: timing on every rank at once would only measure
    their contention, and a rank that chose otherwise would train differently.
    """
    choice = kept_precision(config, device, recorded) if world.is_main else None
    if choice is None:
        dim, ffn_dim, rows = config.model.dim, config.model.ffn_dim, config.train.max_tokens
        products = model_products(dim, ffn_dim, tgt_vocab) if world.is_main else None
        choice = resolve_precision(config.train.precision, device, products, rows)
    if not world.distributed:
        return choice
    names = list(DTYPES)
    mine = float(names.index(choice.precision)) if world.is_main else 0.0
    agreed = distributed.all_reduce(world, [mine], device, startup=True)[0]
    return dataclasses.replace(choice, precision=names[int(agreed)])


def kept_precision(
    config: Config, device: torch.device, recorded: dict[str, str] | None
) -> PrecisionChoice | None:
    """`auto`'s choice `recorded` in the checkpoint a run resumes, where it was made on this
    kind of machine (machine_kind); None where the precision is to be resolved now.

    Timed again, a busy CPU's noise could choose the other precision, and a run that switches
    mid-run does not end as an uninterrupted one would. On another kind of machine it is timed
    anew: there bf16 may run emulated, hundreds of times slower.
    """
    if config.train.precision != "auto" or not recorded:
        return None  # asked for, a new run, or a checkpoint saved before states recorded it
    machine, before = machine_kind(device), recorded.get("machine", "")
    if before == machine:
        why = f"the checkpoint resumed was trained in it on this kind of machine ({machine})"
        return PrecisionChoice(recorded["precision"], "kept", why=why)
    log.info(
        f"precision: auto chose {recorded['precision']} on another kind of machine ({before}; "
        f"this one is {machine}): choosing anew"
    )
    return None


def dev_sets(
    config: Config, valid_data: dict[str, EncodedCorpus], model: Transformer
) -> dict[str, DevSet]:
    """Each direction's dev set with its references; says how many are longer than the model."""
    corpora, max_len = open_directions(config, "valid"), model.max_positions - 1
    devs = {}
    for name, data in valid_data.items():
        corpus = corpora[name]
        references = dev_references(corpus, data)
        devs[name] = DevSet(data, references, max_len, bleu_tokenizer(corpus.tgt_lang))
        report_long(data, max_len, split_label(config, "dev", name), "validation")
    return devs


def dev_references(corpus: Corpus, data: EncodedCorpus) -> list[str]:
    """The dev set's references, one per pair of its encoded copy: MtError where they differ
    (a cache entry from code that read the file otherwise), not a failure at validation."""
    references = corpus.targets()
    if len(references) != len(data):
        raise MtError(
            f"{corpus.describe()}: {len(references):,} pairs, but its encoded copy in the cache "
            f"({data.key}) has {len(data):,}: delete that entry of data.cache_dir and run again"
        )
    return references


def report_long(data: EncodedCorpus, max_len: int, name: str, user: str) -> None:
    """Log once how many sentences of a never-filtered set exceed the model's length."""
    src = int(np.count_nonzero(data.src_lens > max_len))
    tgt = int(np.count_nonzero(data.tgt_lens > max_len))
    if src or tgt:
        log.warning(
            f"{name}: {src:,} of {len(data):,} sources and {tgt:,} targets are longer than the "
            f"model's {max_len} pieces; {user} cuts them to {max_len} pieces, as mt translate "
            "does (BLEU compares with whole references)"
        )


def restore(checkpoint: ckpt.Checkpoint, payload: dict[str, Any], run: Run) -> TrainState:
    """Load a checkpoint and its training state `payload` (restore_point) into the learner;
    returns its TrainState, on this run's world size."""
    learner = run.learner
    restore_weights(learner, checkpoint, payload, run.metadata)
    learner.optimizer.load_state_dict(payload["optimizer"])
    learner.scheduler.load_state_dict(payload["scheduler"])
    restore_scaler(learner, payload["scaler"])
    restore_window(run, payload.get("window", {}))
    saved = dict(payload["train"])
    if "world_size" not in saved:  # older checkpoints counted batches per rank
        saved["batches_done"] *= run.world.world_size
    state = TrainState(**saved)
    ranks = run.world.world_size
    moved = "" if state.world_size == ranks else f", re-sharded from {state.world_size}"
    log.info(
        f"resumed from {checkpoint.weights} (step {state.step}, epoch {state.epoch}, "
        f"{ranks} ranks{moved})"
    )
    state.world_size = run.world.world_size
    if checkpoint.weights.parent.resolve() != ckpt.checkpoint_dir(run.directory).resolve():
        state = started_anew(state, run)
        clear_window(run)  # the other run's updates since its last log line are not this one's
    check_same_data(state, run)
    before = trained_with(checkpoint, payload)
    warn_replanned(state, run, before)
    warn_new_warmup(state, run, before)
    sync_cooldown(learner, state)
    apply_optimizer_settings(learner, run.config.train)
    repoint_best(checkpoint, state, run)  # first: it repairs `best` by the saved choice
    forget_later_best(checkpoint, state, run)
    reselect(state, run)
    return state


def repoint_best(checkpoint: ckpt.Checkpoint, state: TrainState, run: Run) -> None:
    """Point `best` at the run's latest checkpoint if it was saved as the best, but `best` was
    never moved to it (a kill or a full disk between the two): later checkpoints would have to
    beat its score before `best` moved, and pruning would delete it."""
    if not (run.world.is_main and state.validated and state.bad_validations == 0):
        return
    latest, best = ckpt.latest_checkpoint(run.directory), ckpt.best_checkpoint(run.directory)
    if latest is None or latest.weights.resolve() != checkpoint.weights.resolve():
        return  # another run's, or an earlier one of this run, resumed on purpose
    if best is None or best.step != latest.step:
        ckpt.set_best(run.directory, latest)
        log.warning(f"warning: {latest.name} was saved as the best; checkpoints/best now says so")


def forget_later_best(checkpoint: ckpt.Checkpoint, state: TrainState, run: Run) -> None:
    """After --resume went back to one of the run's checkpoints: point `best` at the best of
    those up to it (choose_best; the one resumed where none has a dev score), not at a later
    one. The steps after it are trained again: a later one is of the steps left behind."""
    named = ckpt.best_step(run.directory)
    if not (run.world.is_main and run.origin) or named is None or named <= state.step:
        return
    best = choose_best(state, run)
    if best is None:
        best = checkpoint
        ckpt.set_best(run.directory, best)
    log.warning(
        f"warning: checkpoints/best named {ckpt.step_name(named)}, later than {checkpoint.name} "
        f"resumed; it now names {best.name}, the best up to that step"
    )


def started_anew(state: TrainState, run: Run) -> TrainState:
    """What a new run keeps of another run's state: its step, and its place in the data if it
    trains on the same data. Its best, time (train.max_minutes), cool-down and counts are its
    own."""
    fresh = TrainState(step=state.step, world_size=state.world_size, clock_step=state.step)
    if state.data == run.train_data.fingerprint():
        fresh.epoch, fresh.batches_done, fresh.data = state.epoch, state.batches_done, state.data
    return fresh


def apply_optimizer_settings(learner: Learner, train: TrainConfig) -> None:
    """Make a restored optimizer use the config's train.lr, betas, eps and weight_decay.

    A state holds those it was saved with: a rerun or a fine-tune with other ones (a lower
    lr, say) would train with the old ones and log the new. The lr of the next update is
    recomputed from the schedule as the scheduler computes it, so unchanged settings resume
    exactly.
    """
    scheduler = learner.scheduler
    scheduler.base_lrs = [train.lr] * len(learner.optimizer.param_groups)
    for group, rate in zip(learner.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group.update(
            initial_lr=train.lr,
            betas=tuple(train.betas),
            eps=train.eps,
            weight_decay=train.weight_decay,
            lr=train.lr * rate(scheduler.last_epoch),  # as LambdaLR.get_lr
        )


def check_same_data(state: TrainState, run: Run) -> None:
    """Warn when the training files changed since `state` was saved; `state` takes the new data."""
    data = run.train_data.fingerprint()
    if state.data and state.data != data and run.world.is_main:
        log.warning(
            f"warning: data.train: the training text changed since step {state.step} was "
            "saved; training goes on with the new text, in other batches than an uninterrupted "
            "run's"
        )
    state.data = data


def trained_with(checkpoint: ckpt.Checkpoint, payload: dict[str, Any]) -> dict[str, Any]:
    """The train settings `checkpoint` was trained with: those its state records, else (saved
    before states recorded them) its run's config.yaml, which each start rewrites, or none."""
    if TRAIN_SETTINGS in payload:
        return dict(payload[TRAIN_SETTINGS])
    saved = checkpoint.run_dir / CONFIG_FILE
    return dataclasses.asdict(load_config(saved).train) if saved.is_file() else {}


def changed_settings(before: dict[str, Any], now: TrainConfig, keys: Sequence[str]) -> list[str]:
    """Each of `keys` that differs from the settings `before`, as "train.KEY (OLD -> NEW)"."""
    values = [(key, before[key], getattr(now, key)) for key in keys if key in before]
    return [f"train.{key} ({old} -> {new})" for key, old, new in values if old != new]


def warn_replanned(state: TrainState, run: Run, before: dict[str, Any]) -> None:
    """Warn when a run resumed mid-epoch batches the rest of the epoch anew: its position is a
    count of batches, which another max_tokens or seed lays out otherwise. `before`: the train
    settings of the checkpoint it resumes (this run's, or another's that it starts from)."""
    if not (state.batches_done and run.world.is_main):
        return
    changes = changed_settings(before, run.config.train, ("max_tokens", "seed"))
    if changes:
        log.warning(
            f"warning: {' and '.join(changes)} changed in epoch {state.epoch}: the rest of it is "
            "batched anew, so some of its pairs come twice and others not at all (the next "
            "epochs are whole)"
        )


def warn_new_warmup(state: TrainState, run: Run, before: dict[str, Any]) -> None:
    """Warn when train.warmup_steps differs from the checkpoint's: the learning rate of every
    later update is the new schedule's (apply_optimizer_settings), not the one it trained on."""
    changes = changed_settings(before, run.config.train, ("warmup_steps",))
    if changes and run.world.is_main:
        log.warning(
            f"warning: {changes[0]} changed since step {state.step} was saved: the learning "
            f"rate follows the new schedule from step {state.step + 1} on"
        )


def reselect(state: TrainState, run: Run) -> None:
    """Choose the best checkpoint anew if data.select_direction changed since `state`.

    The best of the validated checkpoints still on disk by the new choice (the earliest of
    equals, as validations choose) becomes `best`, its dev BLEU the one to beat, and the
    validations since it the count that early stopping (train.patience) goes by.
    """
    select = run.config.data.select_direction
    if state.select_direction == select or not run.world.is_main:
        return
    state.select_direction = select
    best = choose_best(state, run)
    if best is not None:
        log.info(f"data.select_direction={select!r}: the best checkpoint is now {best.name}")


def choose_best(state: TrainState, run: Run) -> ckpt.Checkpoint | None:
    """Point `best` at the best validated checkpoint on disk up to `state.step` (the earliest of
    equals, as validations choose) and make its dev BLEU the one to beat, and the validations
    since it the count that early stopping (train.patience) goes by; the chosen one, or None
    when no checkpoint on disk was validated.
    """
    valid = read_metrics(run.directory, "valid")
    scores = selection_scores(valid, run.config.data.select_direction)
    bleu = {step: score for step, score in scores.items() if step <= state.step}
    if not state.validated:
        bleu.pop(state.step, None)  # its record, if any, is of weights this save replaced
    saved = [c for c in ckpt.weights_checkpoints(run.directory) if c.step in bleu]
    if not saved:
        state.best_bleu = max(bleu.values(), default=-1.0)
        return None
    best = max(saved, key=lambda c: bleu[c.step])  # in step order: the earliest of equals
    ckpt.set_best(run.directory, best)
    state.best_bleu = bleu[best.step]
    state.bad_validations = len({r["step"] for r in valid if best.step < r["step"] <= state.step})
    return best


def restore_weights(
    learner: Learner,
    checkpoint: ckpt.Checkpoint,
    payload: dict[str, object],
    metadata: dict[str, str],
) -> None:
    """The weights to train on and, if kept, their EMA; either may be turned on or off.

    A run that kept an EMA saved it as the weights file and its trained weights in the state.
    The EMA starts from the weights file: the EMA saved, or the trained weights of a run that
    kept none.
    """
    ckpt.load_weights(checkpoint.weights, learner.model, expected=metadata)
    if learner.ema is not None:
        learner.ema.load_state_dict(learner.model.state_dict())
    if "model" in payload:
        learner.model.load_state_dict(payload["model"])


def loss_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """fp16's loss scaler, its scale made now: a rank whose first update runs out of memory
    before scaling a loss, or has no batch, still unscales (GradScaler makes it lazily)."""
    scaler = torch.amp.GradScaler(device.type, enabled=enabled)
    scaler.scale(torch.zeros((), device=device))
    return scaler


def restore_scaler(learner: Learner, saved: dict[str, object]) -> None:
    """Restore the fp16 loss scaler; a run may switch precision when it resumes."""
    if learner.scaler.is_enabled() and not saved:
        log.info("resuming in fp16 from a run without loss scaling: a new loss scale starts")
        return
    learner.scaler.load_state_dict(saved)  # a disabled scaler ignores what it is given


# ---------------------------------------------------------------------------------------------
# The loop.


def train(config: Config, resume: Path | None = None) -> TrainResult:
    """Train as configured (one process, or one rank under torchrun); resumes if it can."""
    tc = config.train
    world, device = distributed.setup(tc.device, tc.dist_timeout, tc.dist_startup_timeout)
    if not world.is_main:
        log.setLevel(logging.WARNING)  # rank 0 alone logs progress; errors still print everywhere
    try:
        with contextlib.ExitStack() as stack:  # the run lock, the metrics log
            run = start(config, resume, world, device, stack)
            if (why := why_done(run)) and not run.state.validated:
                # A signal stopped it at its end: validate, save, end record; a signal now waits
                # for the save, as in the loop (one that breaks it off would break the step's
                # checkpoint, which is saved again), then stops the run before its average and
                # report, which the next run (idle) makes.
                with StopSignals() as stop:
                    begin(run, stack)
                    end(run, None)
                return TrainResult(run.state, stop.signum, str(device), world.is_main)
            if why:
                at = f"{run.directory} is already at step {run.state.step}"
                log.info(f"{at} ({why}): nothing to do")
                if world.is_main:
                    record_missing_end(run)
                return TrainResult(run.state, None, str(device), world.is_main, idle=True)
            begin(run, stack)
            return loop(run)
    finally:
        distributed.teardown(world)


def end_values(run: Run) -> dict[str, Any]:
    """The end record: training time (from step clock_step: another run's before), epoch,
    precision and device."""
    state, learner = run.state, run.learner
    return {
        "train_seconds": state.train_seconds,
        "clock_step": state.clock_step,
        "epoch": state.epoch,
        "precision": learner.precision,
        "device": str(learner.device),
    }


def record_missing_end(run: Run) -> None:
    """Write the end record of a run killed after its last checkpoint, before that record."""
    if any(r["step"] == run.state.step for r in read_metrics(run.directory, "end")):
        return
    with contextlib.closing(MetricsLog(run.directory, resume_step=run.state.step)) as metrics:
        metrics.write("end", run.state.step, end_values(run))


def why_done(run: Run) -> str:
    """Why a restored run has nothing left to do, or "" if it goes on."""
    tc, state = run.config.train, run.state
    if state.step >= tc.max_steps:
        return f"train.max_steps={tc.max_steps}"
    if cooled_down(run.learner, state):
        return "the end of its lr cool-down; a run that cooled down does not go on"
    if tc.patience and state.bad_validations >= tc.patience:
        return f"it stopped early, train.patience={tc.patience}; a larger patience goes on"
    # Every rank restored the same train_seconds and position, so they all agree.
    if out_of_time(tc, state.train_seconds):
        return f"train.max_minutes={tc.max_minutes:g}"
    if tc.max_epochs and state.epoch >= tc.max_epochs and epoch_done(run):
        return f"train.max_epochs={tc.max_epochs}"
    return ""


def epoch_done(run: Run) -> bool:
    """Whether the run has trained on every batch of its current epoch."""
    tc = run.config.train
    sampler = MixtureSampler.of(
        run.train_data, tc.max_tokens, tc.seed, run.config.data.mixed_batches
    )
    return run.state.batches_done >= len(sampler.epoch_batches(run.state.epoch))


UNK_WARNING = 0.01  # a dev set with more unknown pieces than this gets a warning


def warn_unknown_pieces(config: Config, stats: dict[str, Any]) -> None:
    """Warn of dev sets the tokenizer cannot spell (a language it was not trained on?)."""
    for name, direction in stats["directions"].items():
        rates = dict(
            zip(("source", "target"), direction.get("valid_unk_rate", (0.0, 0.0)), strict=True)
        )
        for side, rate in rates.items():
            if rate > UNK_WARNING:
                log.warning(
                    f"warning: {split_label(config, 'valid', name)}: {rate:.1%} of the {side} "
                    "pieces are unknown to the tokenizer (was it trained without that language? "
                    f"delete {run_path(config) / TOKENIZER_DIR} to retrain it)"
                )


def begin(run: Run, stack: contextlib.ExitStack) -> None:
    """Rank 0: record the accepted config, open the metrics log, describe the run (the
    others wait to hear that it did)."""
    with distributed.together(run.world, run.learner.device, "beginning the run"):
        if run.world.is_main:
            describe_start(run, stack)


def describe_start(run: Run, stack: contextlib.ExitStack) -> None:
    """begin's work on rank 0."""
    config, learner = run.config, run.learner
    save_config(config, run.directory / CONFIG_FILE)
    # Records of steps after the checkpoint resumed from are dropped: they are run again.
    state = run.state
    metrics = MetricsLog(run.directory, resume_step=state.step, revalidate=state.unvalidated)
    run.metrics = stack.enter_context(contextlib.closing(metrics))
    for name, test in encode_directions(config, run.tokenizer, "test").items():
        max_len = learner.model.max_positions - 1
        report_long(test, max_len, split_label(config, "test", name), "the report")
    stats = write_data_stats(
        run.directory, run.train_data, run.tokenizer, open_directions(config, "valid")
    )
    warn_unknown_pieces(config, stats)
    tc = config.train
    log.info("train: %s", run.train_data.stats.describe())
    log.info("model: %s parameters", f"{count_parameters(learner.model):,}")
    log.info("precision: %s", run.precision.describe())
    metrics.write("precision", run.state.step, run.precision.record())
    ranks = run.world.world_size
    per_update = f"{tc.max_tokens} x {tc.update_freq} x {ranks} ranks"
    log.info(
        f"up to {tc.max_tokens * tc.update_freq * ranks} tokens (padding included) per update "
        f"= {per_update}; {learner.precision} on {learner.device}"
    )
    if tc.cooldown:
        share = f"train.max_steps={tc.max_steps}"
        if tc.max_minutes:
            share = f"train.max_minutes={tc.max_minutes:g} (or of {share}, if sooner)"
        log.info(f"lr cool-down: linearly to 0 over the last {tc.cooldown:.0%} of {share}")
    if tc.initial_dropout_steps and state.step < tc.initial_dropout_steps:
        log.info(
            f"dropout {tc.initial_dropout:g} for updates 1-{tc.initial_dropout_steps}, "
            f"then {config.model.dropout:g} (train.initial_dropout)"
        )
    elif tc.initial_dropout_steps:  # counted from update 1 of the run it started from, if any
        log.info(
            f"dropout {config.model.dropout:g}: the run goes on from update {state.step}, past "
            f"train.initial_dropout_steps={tc.initial_dropout_steps}"
        )


def dropout_at(config: Config, step: int) -> float:
    """The dropout of the update after `step` updates: a function of the step alone, so resumed
    and multi-rank runs follow the same schedule."""
    tc = config.train
    return tc.initial_dropout if step < tc.initial_dropout_steps else config.model.dropout


def loop(run: Run) -> TrainResult:
    """Train until max_steps, max_epochs, max_minutes, early stopping or a signal."""
    tc, state, learner = run.config.train, run.state, run.learner
    updates = next_updates(run)
    quiet = not (run.world.is_main and sys.stderr.isatty())
    bar = tqdm(total=tc.max_steps, initial=state.step, desc="train", disable=quiet)
    # Log lines go through tqdm.write, so they print above the bar instead of through it.
    with StopSignals() as stop, logging_redirect_tqdm(loggers=[logging.root]):
        try:
            # The validation a signal put off (see `end`) comes first, as it would have.
            why = validate_and_save(run, stop) if state.unvalidated else ""
            halted = why == "signal"
            while not why and state.step < tc.max_steps:
                # 1. This rank's micro-batches of the next update, collated in the background.
                t0 = time.perf_counter()
                update = next(updates, None)
                if update is None:
                    log.info("reached train.max_epochs=%d", tc.max_epochs)
                    break
                waited = time.perf_counter() - t0
                # 2. Forward, backward, gradients summed. Dropout depends on (seed, batch, step).
                set_dropout(learner.model, dropout_at(run.config, state.step))
                late = out_of_time(tc, state.train_seconds)
                result = train_step(
                    learner,
                    update.batches,
                    update.tokens,
                    bool(stop.signum),
                    late,
                    state.train_seconds,
                    micro_batch_seeds(tc.seed, run.world, state.step, len(update.batches)),
                )
                state.epoch, state.batches_done = update.epoch, update.done
                # 3. The update itself, unless a rank ran out of memory or gradients overflowed.
                stepped = apply(run, result)
                elapsed = time.perf_counter() - t0
                state.train_seconds += elapsed
                if stepped:
                    add_to_window(run, result, update, elapsed, waited)
                    bar.update(1)
                # 4. Log every log_every steps; stop if a rank must (its checkpoint keeps the
                # window, so a resumed run logs what an uninterrupted one would).
                if stepped and (state.step % tc.log_every == 0 or state.step == tc.max_steps):
                    log_window(run, bar)
                if result.stop:
                    halted = True  # every rank agrees on result.stop, not on stop.signum
                    stop.signum = stop.signum or signal.SIGTERM
                    break
                if result.out_of_time:
                    log.info("reached train.max_minutes=%g at step %d", tc.max_minutes, state.step)
                    break
                if cooled_down(learner, state):
                    log.info("the lr's cool-down ended at step %d", state.step)
                    break
                # 5. Validate and checkpoint every valid_every steps.
                if stepped and validation_due(run):
                    why = validate_and_save(run, stop)
                    if why:  # early stopping, or a signal that came meanwhile: it is saved
                        halted = why == "signal"
                        break
                    # Its time counts: the ranks now agree on a clock that may have run out.
                    if out_of_time(tc, state.train_seconds):
                        log.info(
                            "reached train.max_minutes=%g at step %d", tc.max_minutes, state.step
                        )
                        break
            # 6. A run that ends here logs the updates since its last log line (a signalled
            # run's checkpoint keeps them for its resumption). Every rank has the same step.
            if not halted and state.step % tc.log_every and state.step < tc.max_steps:
                log_window(run, bar)
        finally:
            updates.close()
            bar.close()
        end(run, stop.signum)
    return TrainResult(state, stop.signum, str(learner.device), run.world.is_main)


def next_updates(run: Run) -> Prefetcher[Update]:
    """This rank's updates from the saved position on, collated (and pinned) in a thread."""
    tc, state, world = run.config.train, run.state, run.world
    data = run.train_data
    sampler = MixtureSampler.of(data, tc.max_tokens, tc.seed, run.config.data.mixed_batches)
    position = (state.epoch, state.batches_done)
    plan = plan_updates(
        sampler, data, position, tc.max_epochs, tc.update_freq, world.rank, world.world_size
    )
    pin = run.learner.device.type == "cuda"
    return Prefetcher(plan, PREFETCH_UPDATES, pin_update if pin else None)


def pin_update(update: Update) -> Update:
    """The update with page-locked batches, so that copies to the GPU do not block."""
    return dataclasses.replace(update, batches=[b.pin_memory() for b in update.batches])


def apply(run: Run, result: StepResult) -> bool:
    """Apply the update the step computed; False if it was skipped on every rank."""
    state, learner = run.state, run.learner
    if result.out_of_memory:
        learner.optimizer.zero_grad(set_to_none=True)
        # The step unscaled: end the scaler's update too (same scale), or the next unscale fails.
        learner.scaler.update(learner.scaler.get_scale())
        state.oom_steps += 1
        if run.world.is_main:
            log.warning(
                f"step {state.step + 1}: a rank ran out of memory; every rank skipped this "
                f"update ({state.oom_steps} so far; lower train.max_tokens if this recurs)"
            )
        return False
    if learner.precision != "fp16" and not math.isfinite(result.norm):
        # Gradients are summed over ranks before the norm: every rank stops at the same step.
        main = run.world.is_main
        crash = (
            ckpt.save_crash(run.directory, state.step + 1, learner.model)
            if main
            else "rank 0's file"
        )
        raise MtError(
            f"non-finite loss or gradient at step {state.step + 1}; parameters were not "
            f"updated; weights saved to {crash} (try a lower train.lr or train.clip_norm)"
        )
    cooldown = cooldown_due(run.config.train, state, result.seconds)
    stepped = optimizer_step(learner, state, run.config.train.min_loss_scale, cooldown)
    if stepped and cooldown:
        record_cooldown(run, result.seconds)
    return stepped


def record_cooldown(run: Run, seconds: float) -> None:
    """Log the cool-down that begins after this update, and record it in the metrics."""
    state, schedule = run.state, run.learner.schedule
    lr = schedule(state.step)
    log.info(
        f"lr cool-down: from {lr:.2e} after update {state.step:,} to 0 over the next "
        f"{state.cooldown_steps:,} updates ({seconds / 60:.1f} minutes trained)"
    )
    if run.metrics is not None:
        values = {"steps": state.cooldown_steps, "lr": lr, "train_seconds": seconds}
        run.metrics.write("cooldown", state.step, values)


# ---------------------------------------------------------------------------------------------
# Logging, validation, checkpoints.

WINDOW_KEYS = ("loss", "nll", "tokens", "time", "data_time", "steps", "grad_norm")


def clear_window(run: Run) -> None:
    """Start a new logging window."""
    run.window = dict.fromkeys(WINDOW_KEYS, 0.0)
    run.window["loss"] = run.window["nll"] = torch.zeros((), device=run.learner.device)


def add_to_window(
    run: Run, result: StepResult, update: Update, elapsed: float, waited: float
) -> None:
    """Add one update to the logging window (losses stay on the device until logged)."""
    w = run.window
    w["loss"] = w["loss"] + result.loss
    w["nll"] = w["nll"] + result.nll
    w["tokens"] += sum(b.tgt_tokens for b in update.batches)
    w["time"] += elapsed
    w["data_time"] += waited
    w["steps"] += 1
    w["grad_norm"] = result.norm  # the last update's


def expected_end(tc: TrainConfig, state: TrainState, seconds_per_step: float) -> int:
    """The step a run will end at: train.max_steps, or sooner where train.max_minutes runs out
    first at `seconds_per_step` (what the progress bar's total and time left go by)."""
    if not tc.max_minutes or seconds_per_step <= 0:
        return tc.max_steps
    left = max(tc.max_minutes * 60 - state.train_seconds, 0.0)
    return min(tc.max_steps, state.step + int(left / seconds_per_step))


def log_window(run: Run, bar: tqdm) -> None:
    """Average the window over ranks, write it to the metrics and the progress bar, clear it."""
    values = summarize(run)
    if run.metrics is not None and values is not None:
        run.metrics.write("train", run.state.step, values)
        if run.window["steps"]:
            pace = run.window["time"] / run.window["steps"]
            bar.total = expected_end(run.config.train, run.state, pace)
        bar.set_postfix(
            loss=f"{values['loss']:.3f}",
            lr=f"{values['lr']:.1e}",
            tok_s=f"{values['tgt_tok_s']:,.0f}",
        )
        if bar.disable:
            log.info(log_line(run.state, values))
    clear_window(run)


def window_totals(run: Run) -> dict[str, float]:
    """The logging window summed over ranks (time: the slowest rank's); every rank calls this."""
    w, world, device = run.window, run.world, run.learner.device
    local = [float(w["loss"]), float(w["nll"]), w["tokens"]]
    loss, nll, tokens = distributed.all_reduce(world, local, device)
    slowest = distributed.all_reduce(world, [w["time"]], device, op="max")[0]
    return {**w, "loss": loss, "nll": nll, "tokens": tokens, "time": slowest}


def saved_window(run: Run) -> dict[str, Any]:
    """What a checkpoint keeps of the logging window: its totals, and each rank's own losses.

    Every rank calls this. With its own sums back, each rank goes on adding its losses as an
    uninterrupted run does, so the window's loss is the same to the last bit.
    """
    w, world = run.window, run.world
    own = distributed.gather_values(world, [float(w["loss"]), float(w["nll"])], run.learner.device)
    return {**window_totals(run), "rank_losses": own}


def restore_window(run: Run, saved: dict[str, Any]) -> None:
    """Continue a saved logging window: rank 0 holds all ranks' counts, each rank its losses.

    A checkpoint from another number of ranks (or an older one) gives rank 0 all the losses.
    """
    clear_window(run)
    totals = {k: v for k, v in saved.items() if k != "rank_losses"}
    own = saved.get("rank_losses")
    if run.world.is_main and totals:
        run.window.update(totals)
    if own is not None and len(own) == run.world.world_size:
        totals = dict(zip(("loss", "nll"), own[run.world.rank], strict=True))
    elif not run.world.is_main:
        return
    for key in ("loss", "nll"):
        if key in totals:
            run.window[key] = torch.tensor(totals[key], device=run.learner.device)


def summarize(run: Run) -> dict[str, float] | None:
    """The logging window over all ranks: loss, perplexity, lr, throughput; None if empty."""
    w = window_totals(run)
    tokens = w["tokens"]
    if not tokens or not run.world.is_main:  # the rest is rank 0's (its log line)
        return None
    return {
        "loss": w["loss"] / tokens,
        "ppl": perplexity(w["nll"] / tokens),
        "lr": run.learner.schedule(run.state.step),  # of the update just made
        "grad_norm": w["grad_norm"],
        "tgt_tok_s": tokens / w["time"],  # all ranks together
        "rank_tgt_tok_s": run.window["tokens"] / run.window["time"],  # rank 0 alone
        "tokens_per_update": tokens / w["steps"],
        "data_seconds": w["data_time"],  # rank 0 waiting for its batches
        "epoch": run.state.epoch,
        "overflow_steps": run.state.overflow_steps,
    }


def log_line(state: TrainState, values: dict[str, float]) -> str:
    """A compact progress line: step, loss, ppl, lr, tokens/s."""
    return (
        f"step {state.step} | epoch {state.epoch} | loss {values['loss']:.3f} | "
        f"ppl {values['ppl']:.2f} | lr {values['lr']:.2e} | {values['tgt_tok_s']:,.0f} tgt tok/s"
    )


def validation_due(run: Run) -> bool:
    """Whether the step just taken is one to validate and checkpoint at."""
    tc, step = run.config.train, run.state.step
    return step % tc.valid_every == 0 or step == tc.max_steps


def validate_and_save(run: Run, stop: StopSignals) -> str:
    """Validate and checkpoint on rank 0 while the others wait; why training stops now, if it
    does: "early" (train.patience), "signal" (a rank was signalled meanwhile: the step is saved,
    so every rank stops at once, as after a signal at a step, instead of one update and one
    checkpoint more), else "".

    The others then take rank 0's clock, which counted the validation (a cool-down planned on
    their own would run out of time before it ends). If rank 0 fails here, it tells them, so
    that they stop at once instead of waiting out train.dist_startup_timeout.
    """
    tc, state, world = run.config.train, run.state, run.world
    state.unvalidated, state.validated = False, True
    window = saved_window(run)
    device = run.learner.device
    if world.is_main:
        try:
            check_finite_weights(run)
            validate_then_save(run, window)
        except BaseException:  # a second Ctrl-C too
            with contextlib.suppress(MtError):  # rank 0's own error is the one to report
                distributed.all_reduce(world, [1.0, 0.0], device, op="max", startup=True)
            raise
    run.last_saved = state.step
    # The others wait for validation on the start-up group (it may take long).
    failed, seconds = distributed.all_reduce(
        world, [0.0, state.train_seconds], device, op="max", startup=True
    )
    if failed:
        raise MtError(
            f"rank {world.rank}: rank 0 failed while validating or saving (see its error)"
        )
    state.train_seconds = seconds
    if device.type == "cpu":
        give_back_freed_memory()  # what validation freed (see there)
    stop_early = bool(tc.patience) and state.bad_validations >= tc.patience
    if stop_early and world.is_main:
        log.info("no better dev BLEU in %d validations: stopping early", tc.patience)
    early, signalled = distributed.all_reduce(
        world, [float(stop_early), float(stop.signum is not None)], device, op="max"
    )
    if early:  # the run is over: a signal meanwhile changes nothing
        return "early"
    if signalled:
        stop.signum = stop.signum or signal.SIGTERM  # the ranks not signalled stop alike
        return "signal"
    return ""


class ValidationOutOfMemory(MtError):
    """Validation ran out of GPU memory (the message says which settings size it)."""


def validate_then_save(run: Run, window: dict[str, Any]) -> None:
    """Validate, then checkpoint (as the best if it is); a validation that runs out of GPU
    memory saves the step first, unvalidated, so that the updates since the last save stay."""
    try:
        improved = record_validation(run)
    except ValidationOutOfMemory:
        save_unvalidated(run, window)
        raise
    t0 = time.perf_counter()
    save(run, window, best=improved)
    # train.max_minutes counts saving too (a large model's checkpoints on a network disk take
    # minutes); the checkpoint itself records the clock as it was before it was written.
    run.state.train_seconds += time.perf_counter() - t0


def save_unvalidated(run: Run, window: dict[str, Any]) -> None:
    """Checkpoint the updates since the last save, the validation left for the resumed run to
    do first (as after a signal at a due validation), with the GPU memory validation held freed."""
    run.state.unvalidated, run.state.validated = True, False
    if run.learner.device.type == "cuda":
        torch.cuda.empty_cache()
    save(run, window, best=False)


def check_finite_weights(run: Run) -> None:
    """Stop before a checkpoint could hold weights that are not finite (a diverged update)."""
    model = run.learner.model
    finite = torch.stack([p.isfinite().all() for p in model.parameters()])
    if bool(finite.all()):
        return
    name = next(n for n, p in model.named_parameters() if not p.isfinite().all())
    crash = ckpt.save_crash(run.directory, run.state.step, model)
    raise MtError(
        f"weights are not finite after step {run.state.step} ({name} holds inf or nan); no "
        f"checkpoint written; weights saved to {crash} (try a lower train.lr or train.clip_norm)"
    )


def record_validation(run: Run) -> bool:
    """Score the dev set, log it and update the best score; True if this is the best so far.

    Without a dev set the newest checkpoint counts as the best. A dev loss that is not finite
    never makes a checkpoint the best.
    """
    state = run.state
    if not run.dev:
        return True
    t0 = time.perf_counter()
    try:
        scores = validate(run)
    except torch.cuda.OutOfMemoryError:  # left here, with the tensors its frames hold
        scores = None
    if scores is None:  # one line, naming what sizes validation
        tc, decode = run.config.train, run.config.decode
        raise ValidationOutOfMemory(
            f"validation at step {state.step:,} ran out of GPU memory: lower "
            f"train.valid_max_tokens (now {tc.valid_max_tokens:,}) or decode.valid_beam (now "
            f"{decode.valid_beam}) and run again (step {state.step:,} is saved: the run "
            "resumes from it, validating it first)"
        )
    scores["seconds"] = time.perf_counter() - t0
    state.train_seconds += scores["seconds"]
    bleu = selected_bleu(scores, run.config.data.select_direction)
    improved = may_be_best(scores) and bleu > state.best_bleu
    state.best_bleu = bleu if improved else state.best_bleu
    state.bad_validations = 0 if improved else state.bad_validations + 1
    run.metrics.write("valid", state.step, scores)
    selected = run.config.data.select_direction
    # The best is of the BLEU that selects checkpoints: show that one beside the mean.
    mean = f"BLEU {scores['bleu']:.2f} | {selected} " if f"{selected}/bleu" in scores else ""
    log.info(
        f"valid step {state.step} | loss {scores['loss']:.3f} | ppl {scores['ppl']:.2f} | "
        f"{mean}BLEU {bleu:.2f} (best {state.best_bleu:.2f}) | {scores['seconds']:.1f}s"
    )
    return improved


def validate(run: Run) -> dict[str, float]:
    """Dev scores: of the one direction, or their means and each as `de-en/bleu` etc."""
    per = {name: validate_direction(run, dev) for name, dev in run.dev.items()}
    if len(per) == 1:
        return next(iter(per.values()))
    scores = {key: float(np.mean([s[key] for s in per.values()])) for key in ("loss", "nll")}
    scores["bleu"] = float(np.mean([s["bleu"] for s in per.values()]))
    scores["ppl"] = perplexity(scores["nll"])
    for name, direction in per.items():
        scores.update({f"{name}/{key}": value for key, value in direction.items()})
    return scores


@torch.no_grad()
def validate_direction(run: Run, dev: DevSet) -> dict[str, float]:
    """Dev loss and perplexity (teacher forcing) and BLEU of batched greedy or beam search."""
    learner, config = run.learner, run.config
    model, device = learner.eval_model, learner.device
    training = model.training  # the EMA copy stays in eval mode, the trained model goes back
    model.eval()
    budget = max(config.train.valid_max_tokens, dev.max_len + 1)
    sampler = BatchSampler(*dev.lengths(), budget, shuffle=False)
    hypotheses = [""] * len(dev.references)
    loss_sum = nll_sum = 0.0
    tokens = 0
    for indices in sampler.epoch_batches(1):
        batch = collate(dev.pairs(indices), indices).to(device)
        with autocast(device, learner.precision):
            logits = model(batch.src, batch.tgt_in, padded=batch.src_tokens != batch.src.numel())
            found = search.decode(model, batch.src, config.decode.for_validation())
        loss, nll, _ = label_smoothed_nll(logits, batch.tgt_out, learner.label_smoothing)
        loss_sum, nll_sum = loss_sum + loss.item(), nll_sum + nll.item()
        tokens += batch.tgt_tokens
        output = run.tokenizer.decode_tgt([hyps[0].tokens for hyps in found])
        for index, text in zip(indices.tolist(), output, strict=True):
            # As `mt translate` prints it: sacreBLEU's 13a joins "well-\nknown" into one word.
            hypotheses[index] = text.translate(LINE_BREAKS) if dev.data.src_lens[index] else ""
    model.train(training)
    bleu = sacrebleu.corpus_bleu(hypotheses, [dev.references], tokenize=dev.tokenize)
    nll = nll_sum / max(tokens, 1)
    return {
        "loss": loss_sum / max(tokens, 1),
        "nll": nll,
        "ppl": perplexity(nll),
        "bleu": bleu.score,
    }


def save(run: Run, window: dict[str, Any], best: bool) -> ckpt.Checkpoint:
    """Write a complete checkpoint (weights, and all a resume needs), move `best`, prune."""
    learner, state = run.learner, run.state
    payload = {
        "train": dataclasses.asdict(state),
        "window": window,  # the logging window so far, summed over ranks
        "optimizer": learner.optimizer.state_dict(),
        "scheduler": learner.scheduler.state_dict(),
        "scaler": learner.scaler.state_dict(),
        TRAIN_SETTINGS: dataclasses.asdict(run.config.train),  # what a resume compares
    }
    if run.config.train.precision == "auto":  # what a resume on this kind of machine keeps
        machine = machine_kind(learner.device)
        payload[AUTO_PRECISION] = {"precision": learner.precision, "machine": machine}
    if learner.ema is not None:  # decoders load the EMA: the weights file holds it
        payload["model"] = learner.model.state_dict()  # the weights training continues from
    model = learner.eval_model
    resume_point = not state.validated  # a signal's: kept until the next checkpoint
    named = ckpt.best_step(run.directory)
    # The records up to this step first: after a power loss, a checkpoint on disk without them
    # would resume past them, and they would never be written again.
    if run.metrics is not None:
        run.metrics.sync()
    saved = ckpt.save_checkpoint(
        run.directory,
        state.step,
        model,
        payload,
        run.metadata,
        resume_point,
        run.origin,
        run.job,
    )
    if best:
        ckpt.set_best(run.directory, saved)
    elif named == saved.step:  # a run gone back with --resume replaced the best's weights
        choose_best(state, run)
    ckpt.prune_checkpoints(run.directory, run.config.train.keep_last, saved.step)
    return saved


def end(run: Run, signum: int | None) -> None:
    """The last checkpoint (validated, unless a signal asks to stop fast) and the end record."""
    state = run.state
    if run.last_saved != state.step:
        state.unvalidated = signum is not None and validation_due(run)
        state.validated = signum is None
        window = saved_window(run)
        # The others must not exit as if it were written (after a signal: requeued for nothing).
        with distributed.together(run.world, run.learner.device, "writing the last checkpoint"):
            if run.world.is_main:
                check_finite_weights(run)
                # The end of the run is validated: its last checkpoint may be the best. After
                # a signal, stop fast: the scheduler is waiting.
                if signum is None:
                    validate_then_save(run, window)
                else:
                    save(run, window, best=False)
    # A signalled run ends when it resumes, unless it is done: validated at its last step.
    done = state.step >= run.config.train.max_steps and state.validated
    if run.metrics is not None and (signum is None or done):
        run.metrics.write("end", state.step, end_values(run))
    if signum is not None and run.world.is_main:
        log.info(
            "stopped by signal %d at step %d; checkpoint written; run the same command to resume",
            signum,
            state.step,
        )
