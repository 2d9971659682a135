"""Speed of mt against Hugging Face `MarianMTModel`: training, beam search, memory, FLOP/s.

    .venv/bin/python scripts/bench.py                            # prints a Markdown section
    .venv/bin/python scripts/bench.py --write docs/benchmarks.md # ... and puts it in the file

Both systems get the same architecture (post-norm, 3+3 layers, D 256, 4 heads, FFN 1024, ReLU,
sinusoidal positions, three-way tied 8k joint vocabulary, dropout 0.1), the same initial
weights (mt's initialisation copied into the Marian model, `mt.export.hf.marian_from_mt`), the same
padded batches (built once by mt's pipeline: tokenizer, encode_corpus, BatchSampler, collate)
and the same loss (`mt.loss.label_smoothed_nll` on the logits), Adam (0.9, 0.98), clipping at
1.0 and the inverse-sqrt schedule. mt trains through its own `train_step` and
`optimizer_step`; Marian through a plain PyTorch loop with fused AdamW (Trainer's default for
torch >= 2.8) and `use_cache=False`. So only the model code (and its optimizer wiring) differs.

Every measurement runs in a fresh child process (`--phase`), so its peak RSS (ru_maxrss) is
its own; training figures are medians over `--repeats` children (the systems in turn within each
repeat), decoding figures medians over `--repeats` passes after an untimed one, in one child per
system and precision.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from mt.batching import BatchSampler, collate, collate_source, source_batches  # noqa: E402
from mt.config import Config, load_config  # noqa: E402
from mt.corpora import read_lines  # noqa: E402
from mt.device import cpu_has_amx, cpu_model, keep_freed_memory  # noqa: E402
from mt.distributed import World  # noqa: E402
from mt.export.hf import generation_config, marian_from_mt  # noqa: E402
from mt.loss import label_smoothed_nll  # noqa: E402
from mt.model import Transformer, count_parameters  # noqa: E402
from mt.optim import Schedule, make_scheduler  # noqa: E402
from mt.packing import pack  # noqa: E402
from mt.rundir import encode_split, load_trained, prepare_tokenizer  # noqa: E402
from mt.search import max_lengths, strip  # noqa: E402
from mt.tokenizer import Tokenizer, load_tokenizer  # noqa: E402
from mt.translate import Translator, decode_settings, encode_sources  # noqa: E402
from mt.vocab import EOS_ID, PAD_ID  # noqa: E402

SECTION = "## Speed: mt vs Hugging Face Marian"
DEVICE = torch.device("cpu")
# hf-malloc: Marian with the glibc malloc setting mt applies on CPU (mt.device.keep_freed_memory),
# so that the model code alone is compared too.
SYSTEMS = {"mt": "mt", "hf": "HF Marian", "hf-malloc": "HF Marian, mt's malloc setting"}
RATIOS = {"hf": "mt / HF", "hf-malloc": "mt / HF (same malloc)"}
TEST_PREFIX = "test_2016_flickr"


# ---------------------------------------------------------------------------------------------
# The Marian twin of an mt model: `marian_from_mt` (mt/export/hf.py)


def hf_logits(hf: Any, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
    """Teacher-forced Marian logits (B, T, V) for mt's padded tensors."""
    out = hf(input_ids=src, attention_mask=src != PAD_ID, decoder_input_ids=tgt_in, use_cache=False)
    return out.logits


# ---------------------------------------------------------------------------------------------
# Settings shared by the parent and its children


# --smoke's model: small enough that the run tests the script's plumbing, not the machine.
SMOKE_SHAPE = [
    "model.dim=64",
    "model.ffn_dim=128",
    "model.heads=2",
    "model.enc_layers=2",
    "model.dec_layers=2",
]


def bench_config(spec: dict[str, Any]) -> Config:
    """The mt config of the comparison (multi30k.yaml, post-norm, dropout 0.1, fp32, no EMA:
    the HF loop keeps no average of the weights)."""
    data = Path(spec["data"])
    overrides = [
        f"run_dir={spec['workdir']}",
        f"data.train={data / 'train'}",
        f"data.valid={data / 'val'}",
        f"data.test={data / TEST_PREFIX}",
        "model.prenorm=false",
        "model.dropout=0.1",
        f"tokenizer.vocab_size={spec['vocab_size']}",
        f"train.max_tokens={spec['max_tokens']}",
        "train.precision=fp32",
        "train.device=cpu",
        "train.compile=false",
        "train.update_freq=1",
        "train.ema_decay=0",
        *spec.get("shape", []),
    ]
    return load_config(ROOT / "configs" / "multi30k.yaml", overrides)


def rss_mib() -> float:
    """Current resident set size of this process, MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """High-water mark of this process's resident set size, MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def autocast(precision: str) -> Any:
    """bf16 autocast on CPU, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def test_files(spec: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The test set's sources and references, cut to spec['sentences'] when positive."""
    data = Path(spec["data"])
    src = list(read_lines(data / f"{TEST_PREFIX}.de.gz"))
    ref = list(read_lines(data / f"{TEST_PREFIX}.en.gz"))
    n = spec["sentences"] or len(src)
    return src[:n], ref[:n]


# ---------------------------------------------------------------------------------------------
# Child phase: training


def train_phase(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one system for warmup + steps updates on the saved batches; time the last `steps`."""
    from mt.train import TrainState, build_learner, optimizer_step, step_seed, train_step

    torch.set_num_threads(spec["threads"])
    allocator(spec)
    config = bench_config(spec)
    tc = config.train
    tokenizer = load_tokenizer(Path(spec["workdir"]) / "tokenizer")
    batches = torch.load(spec["batches"], weights_only=False)
    precision = spec["precision"]
    world = World()
    if spec["system"] == "mt":
        vocab = (tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
        learner = build_learner(config, vocab, world, DEVICE, precision)
        state = TrainState()

        def step(batch: Any) -> tuple[float, float]:
            result = train_step(learner, [batch], batch.tgt_tokens, False, False)
            optimizer_step(learner, state, tc.min_loss_scale)
            return result.loss.item(), result.norm

    else:
        _quiet_transformers()
        torch.manual_seed(tc.seed)  # the very initialisation `build` gives mt
        mt_model = Transformer(config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
        hf = marian_from_mt(mt_model)
        del mt_model
        hf.train()
        params = [p for p in hf.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=tc.lr, betas=tc.betas, eps=tc.eps, weight_decay=tc.weight_decay, fused=True
        )
        scheduler = make_scheduler(optimizer, Schedule(tc.lr, tc.warmup_steps))

        def step(batch: Any) -> tuple[float, float]:
            with autocast(precision):
                logits = hf_logits(hf, batch.src, batch.tgt_in)
            loss, _, _ = label_smoothed_nll(logits, batch.tgt_out, tc.label_smoothing)
            (loss / batch.tgt_tokens).backward()
            norm = torch.nn.utils.clip_grad_norm_(params, tc.clip_norm or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            return loss.item(), norm.item()

    rss_before = rss_mib()
    times, losses = [], []
    for i, batch in enumerate(batches):
        torch.manual_seed(step_seed(tc.seed, 0, i))  # as mt's loop does before every update
        start = time.perf_counter()
        loss, norm = step(batch)
        times.append(time.perf_counter() - start)
        if not math.isfinite(norm):
            raise RuntimeError(f"{spec['system']}: non-finite gradient at step {i + 1}")
        losses.append(loss / batch.tgt_tokens)
    warm = spec["warmup"]
    return {
        "seconds": sum(times[warm:]),
        "tokens": sum(b.tgt_tokens for b in batches[warm:]),
        "step_times": times,
        "losses": losses,
        "rss_before": rss_before,
        "peak_rss": peak_rss_mib(),
    }


# ---------------------------------------------------------------------------------------------
# Child phase: decoding


def decode_model(spec: dict[str, Any]) -> tuple[Config, Tokenizer, Transformer, str]:
    """The post-norm mt model to decode with: a trained run, or mt's initialisation."""
    if spec.get("run"):
        config, tokenizer, model, checkpoint = load_trained(Path(spec["run"]), DEVICE)
        if config.model.prenorm:
            raise SystemExit(
                f"--run {spec['run']}: a pre-norm model has no Marian twin (Marian is post-norm)"
            )
        return config, tokenizer, model, str(checkpoint.weights)
    config = bench_config(spec)
    tokenizer = load_tokenizer(Path(spec["workdir"]) / "tokenizer")
    torch.manual_seed(config.train.seed)
    model = Transformer(config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    return config, tokenizer, model.eval(), "random initialisation (seed 1)"


class RowLimits:
    """A LogitsProcessor giving every generate() row mt's own length limit (EOS included).

    As in mt's `step_logprobs`: a row that reaches its limit may only end, keeping EOS's score.
    generate() has one max_new_tokens per call; this makes each sentence stop where mt's does.
    """

    def __init__(self, limits: torch.Tensor, rows_per_sentence: int) -> None:
        self.limits = limits.repeat_interleave(rows_per_sentence)  # (B*K,)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.size(1) - 1  # tokens generated so far (after the start token)
        at_limit = step + 1 >= self.limits  # (B*K,)
        if bool(at_limit.any()):
            eos = scores[:, EOS_ID].clone()
            scores = scores.masked_fill(at_limit.unsqueeze(1), -math.inf)
            scores[:, EOS_ID] = torch.where(at_limit, eos, scores[:, EOS_ID])
        return scores


@torch.no_grad()
def hf_translate(
    hf: Any, lines: list[str], tokenizer: Tokenizer, decode: Any, precision: str, limit: int
) -> list[list[int]]:
    """Marian generate() over mt translate's batches, with mt's per-sentence length limits.

    max_new_tokens is the batch's largest limit; `RowLimits` ends each sentence at its own.
    """
    from transformers import LogitsProcessorList

    ids = encode_sources(lines, tokenizer, limit)
    outputs: list[list[int]] = [[] for _ in lines]
    gen = generation_config(decode, limit + 1)  # mt's search settings, as the hf export has them
    gen.forced_eos_token_id = None  # RowLimits forces EOS at each row's limit, with EOS's score
    for batch in source_batches(ids, decode.max_tokens):
        src = collate_source([ids[i] for i in batch], batch).src
        limits = max_lengths(src, decode.max_len_a, decode.max_len_b, limit)  # (B,)
        with autocast(precision):
            out = hf.generate(
                input_ids=src,
                attention_mask=src != PAD_ID,
                generation_config=gen,
                max_new_tokens=int(limits.max()),
                logits_processor=LogitsProcessorList([RowLimits(limits, decode.beam)]),
            )
        for i, row in zip(batch, strip(out[:, 1:]), strict=True):  # drop the start token
            outputs[i] = row
    return outputs


def decode_phase(spec: dict[str, Any]) -> dict[str, Any]:
    """Beam-search the test set `repeats` times with one system; median time, outputs, RSS."""
    torch.set_num_threads(spec["threads"])
    allocator(spec)
    config, tokenizer, model, weights = decode_model(spec)
    decode = decode_settings(config, beam=spec["beam"], nbest=1)
    precision = spec["precision"]
    sources, _ = test_files(spec)
    limit = model.max_positions - 1
    if spec["system"].startswith("hf"):
        _quiet_transformers()
        hf = marian_from_mt(model).eval()
        del model

        def run() -> list[list[int]]:
            return hf_translate(hf, sources, tokenizer, decode, precision, limit)

    else:
        pack(model, DEVICE, precision)  # as `mt translate` decodes

        def run() -> list[list[int]]:
            outs = Translator(tokenizer, model, decode, DEVICE, precision).translate(sources)
            return [o[0].tokens if o else [] for o in outs]

    rss_before = rss_mib()
    outputs = run()  # untimed: the first pass builds oneDNN's kernels for each batch shape
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        outputs = run()
        times.append(time.perf_counter() - start)
    return {
        "times": times,
        "seconds": statistics.median(times),
        "outputs": outputs,
        "texts": tokenizer.decode_tgt(outputs),
        "tokens": sum(len(o) + 1 for o in outputs),
        "weights": weights,
        "rss_before": rss_before,
        "peak_rss": peak_rss_mib(),
    }


def allocator(spec: dict[str, Any]) -> None:
    """mt's CPU malloc setting, as `mt train` and `mt translate` apply it, unless plain HF."""
    if spec["system"] != "hf":
        keep_freed_memory()


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()


# ---------------------------------------------------------------------------------------------
# Parent: data, children, checks, FLOPs, profile, report


def child(phase: str, spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Run one phase in a fresh interpreter; its JSON result."""
    name = f"{phase}-{spec['system']}-{spec['precision']}-{spec.get('repeat', 0)}"
    return run_phase(__file__, phase, name, spec, workdir)


def children(phase: str, specs: list[dict[str, Any]], workdir: Path, workers: int) -> Iterator:
    """Results of `child` for each spec, in order; with workers > 1, run concurrently.

    workers=0 runs each phase in this process, for --smoke, whose memory figures mean nothing.
    """
    if not workers:
        yield from map(train_phase if phase == "train" else decode_phase, specs)
        return
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(child, phase, spec, workdir) for spec in specs]
        for future in futures:
            yield future.result()


def run_phase(
    script: str, phase: str, name: str, spec: dict[str, Any], workdir: Path
) -> dict[str, Any]:
    """Run `script --phase phase` on `spec` in a fresh interpreter (own peak RSS); its result."""
    spec_path, result_path = workdir / f"{name}.spec.json", workdir / f"{name}.result.json"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    args = [sys.executable, script, "--phase", phase, "--spec", str(spec_path)]
    args += ["--result", str(result_path)]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{Path(script).stem}: the {name} phase failed (exit {proc.returncode})")
    return json.loads(result_path.read_text())


def log(message: str) -> None:
    """Progress on stderr (stdout carries only the Markdown)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def find_data(given: str | None) -> Path:
    """The Multi30k directory: --data, else data/multi30k, else ../shared/data/multi30k."""
    candidates = (
        [Path(given)] if given else [ROOT / "data/multi30k", ROOT / "../shared/data/multi30k"]
    )
    for path in candidates:
        if (path / "train.de.gz").is_file() or (path / "train.de").is_file():
            return path.resolve()
    raise SystemExit(f"bench: no Multi30k found (tried {', '.join(map(str, candidates))})")


def smoke_data(data: Path, workdir: Path, n: int) -> Path:
    """The first n training pairs and the test set, for --smoke."""
    out = workdir / "smoke-data"
    out.mkdir(parents=True, exist_ok=True)
    for lang in ("de", "en"):
        lines = list(read_lines(data / f"train.{lang}.gz"))[:n]
        (out / f"train.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
        for split in ("val", TEST_PREFIX):
            (out / f"{split}.{lang}.gz").write_bytes((data / f"{split}.{lang}.gz").read_bytes())
    return out


def prepare_batches(spec: dict[str, Any], n_batches: int) -> tuple[list[Any], Config]:
    """The tokenizer (trained once into the workdir) and the first n_batches of epoch 1."""
    config = bench_config(spec)
    tokenizer = prepare_tokenizer(config)
    train_data = encode_split(config, tokenizer, "train")
    sampler = BatchSampler(
        train_data.src_lens, train_data.tgt_lens, config.train.max_tokens, config.train.seed
    )
    indices = sampler.epoch_batches(1)
    if len(indices) < n_batches:
        raise SystemExit(f"bench: only {len(indices)} batches, {n_batches} needed")
    batches = [collate(train_data.pairs(b), b) for b in indices[:n_batches]]
    torch.save(batches, spec["batches"])
    return batches, config


def train_flops(batches: list[Any], config: Config, vocab: int) -> float:
    """Matmul FLOPs of forward + backward (3x forward) over the padded batch shapes.

    Per layer and position, forward (2 FLOPs per multiply-add): encoder 8D^2 + 4DF plus
    attention 4SD per query; decoder 12D^2 + 4DF per target position, 4D^2 per source position
    (cross keys/values), attention 4TD + 4SD per query; output projection 2DV per target
    position. Padding is counted: it is work both systems do. Causal masking is not discounted.
    """
    m = config.model
    D, F = m.dim, m.ffn_dim
    total = 0.0
    for b in batches:
        B, S = b.src.shape
        T = b.tgt_in.shape[1]
        enc = m.enc_layers * B * S * (8 * D * D + 4 * D * F + 4 * S * D)
        dec = (
            m.dec_layers
            * B
            * (T * (12 * D * D + 4 * D * F + 4 * T * D + 4 * S * D) + S * 4 * D * D)
        )
        total += enc + dec + B * T * 2 * D * vocab
    return 3 * total


# Matmul shapes whose best rate is the reference for model FLOP/s: a square one, and the
# model's FFN matmuls at a full batch (a 2048-square fp32 matmul runs at half the rate of
# these on some CPUs, so a single shape would understate what this CPU can do).
MATMUL_SHAPES = {
    "2048 x 2048 x 2048": (2048, 2048, 2048),
    "4096 x 256 x 1024 (FFN in)": (4096, 256, 1024),
    "4096 x 1024 x 256 (FFN out)": (4096, 1024, 256),
}
MATMUL_REPEATS = 20


def matmul_rate(dtype: torch.dtype, shape: tuple[int, int, int], repeats: int) -> float:
    """FLOP/s of an (m x k) @ (k x n) matmul here: median of `repeats` after up to 5 warm-ups."""
    m, k, n = shape
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    c = torch.empty(m, n, dtype=dtype)  # no fresh (page-faulting) output buffer per call
    for _ in range(min(5, repeats)):
        torch.mm(a, b, out=c)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=c)
        times.append(time.perf_counter() - start)
    return 2 * m * k * n / statistics.median(times)


def matmul_rates(
    precisions: list[str], repeats: int = MATMUL_REPEATS
) -> dict[str, dict[str, float]]:
    """{precision: {shape: FLOP/s}} for the precisions benchmarked (fp32, bf16).

    Only those: on a CPU without bf16 units one bf16 2048-square product takes many seconds.
    """
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    return {
        p: {name: matmul_rate(dtypes[p], sh, repeats) for name, sh in MATMUL_SHAPES.items()}
        for p in precisions
    }


def equivalence(spec: dict[str, Any], batch: Any, sentences: int) -> dict[str, Any]:
    """Check that the Marian twin is the same function: logits and greedy outputs."""
    _quiet_transformers()
    config, tokenizer, model, _ = decode_model(spec)
    hf = marian_from_mt(model).eval()
    vocab = model.tgt_embed.num_embeddings  # a --run may have a smaller vocabulary
    src, tgt_in = batch.src.clamp(max=vocab - 1), batch.tgt_in.clamp(max=vocab - 1)
    with torch.no_grad():
        ours = model(src, tgt_in)
        theirs = hf_logits(hf, src, tgt_in)
    diff = float((ours - theirs).abs().max() / ours.abs().max())
    greedy = decode_settings(config, beam=1, nbest=1)
    sources, _ = test_files({**spec, "sentences": sentences})
    mine = [o[0].tokens for o in Translator(tokenizer, model, greedy, DEVICE).translate(sources)]
    hf_out = hf_translate(hf, sources, tokenizer, greedy, "fp32", model.max_positions - 1)
    same = sum(a == b for a, b in zip(mine, hf_out, strict=True))
    return {"max_rel_logit_diff": diff, "greedy_same": same, "greedy_total": len(sources)}


def profile_mt_step(spec: dict[str, Any], batches: list[Any], top: int = 10) -> list[dict]:
    """Self CPU time of the ops in one fp32 mt training step (after two unprofiled steps)."""
    from torch.profiler import ProfilerActivity, profile

    from mt.train import TrainState, build_learner, optimizer_step, train_step

    config = bench_config(spec)
    tokenizer = load_tokenizer(Path(spec["workdir"]) / "tokenizer")
    vocab = (tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    learner = build_learner(config, vocab, World(), DEVICE, "fp32")
    state = TrainState()

    def step(batch: Any) -> None:
        train_step(learner, [batch], batch.tgt_tokens, False, False)
        optimizer_step(learner, state, config.train.min_loss_scale)

    for batch in batches[:2]:
        step(batch)
    batch = batches[2]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(batch)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    return [
        {
            "name": e.key,
            "self_ms": e.self_cpu_time_total / 1000,
            "share": e.self_cpu_time_total / total,
            "calls": e.count,
        }
        for e in events[:top]
    ] + [{"total_ms": total / 1000, "batch": [*batch.src.shape, batch.tgt_in.shape[1]]}]


def machine() -> str:
    """CPU model, cores, torch/transformers/Python versions."""
    import transformers

    isa = torch.backends.cpu.get_cpu_capability()
    return (
        f"{cpu_model()} ({isa}, {'with' if cpu_has_amx() else 'no'} AMX), {os.cpu_count()} cores; "
        f"torch {torch.__version__}, "
        f"transformers {transformers.__version__}, Python {platform.python_version()}"
    )


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def report(args: argparse.Namespace, spec: dict[str, Any], res: dict[str, Any]) -> str:
    """The Markdown section."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python scripts/bench.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        SECTION,
        "",
        f"Measured {now} on {machine()}; {spec['threads']} torch threads. Command: `{cmd.strip()}`"
        + (" (smoke run: the numbers mean nothing)" if args.smoke else ""),
        "",
        f"Same model in both: post-norm Transformer, {res['layers']} layers, D {res['dim']}, "
        f"{res['heads']} heads, FFN {res['ffn']}, ReLU, sinusoidal positions, tied "
        f"{res['vocab']:,}-piece joint vocabulary ({res['params']:,} parameters), dropout 0.1; "
        f"mt's initial weights copied into `MarianMTModel` (`marian_from_mt` in "
        f"mt/export/hf.py). Same batches: the first {spec['warmup'] + spec['steps']} batches "
        f"of mt's epoch 1 on Multi30k train (max_tokens {spec['max_tokens']}), built once by "
        "mt's pipeline and fed as the same padded tensors to both; same loss "
        "(`mt.loss.label_smoothed_nll`, eps 0.1, on the logits), Adam (0.9, 0.98) fused, clip 1.0, "
        "inverse-sqrt schedule. mt runs its own `train_step` + `optimizer_step`; Marian a plain "
        "loop (forward with `use_cache=False`, loss / tokens, backward, clip, step).",
        "",
        "Equivalence check (fp32, eval mode): max |logit difference| / max |logit| = "
        f"{res['check']['max_rel_logit_diff']:.1e} on a training batch; greedy outputs identical "
        f"on {res['check']['greedy_same']} of {res['check']['greedy_total']} test sentences.",
        "",
        f"### Training: {spec['steps']} steps after {spec['warmup']} warm-up steps, median of "
        f"{args.repeats} runs, each in a fresh process",
        "",
        "Target tokens/s: non-pad target tokens of the timed steps / their wall time. Peak RSS: "
        "the process's ru_maxrss (Python, torch, data and model included; the HF process also "
        "imports transformers); growth: peak minus RSS just before the first step. Model FLOP/s: "
        f"matmul FLOPs of forward + backward on the padded shapes ({res['gflop_per_step']:.0f} "
        "GFLOP per step on average, see `train_flops`) / time, against the best matmul rate "
        "measured here in the same precision (table below). Last loss: label-smoothed loss per "
        "target token of the last step: same data, initial weights and per-step seed, but "
        "different dropout masks (mt draws its CPU masks from its own random words, see "
        "`mt.model.Dropout`), so the losses agree only statistically. mt applies its glibc malloc "
        "setting (`mt.device.keep_freed_memory`, as `mt train` and `mt translate` do); the "
        "'same malloc' rows give Marian that setting too, so they compare the model code alone.",
        "",
        "| precision | system | target tok/s | ms / step | peak RSS MiB | growth MiB "
        "| GFLOP/s | of matmul rate | last loss |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for prec in spec["precisions"]:
        rows = res["train"][prec]  # system -> figures
        for system in SYSTEMS:
            r = rows[system]
            lines.append(
                f"| {prec} | {SYSTEMS[system]} | {r['tok_s']:,.0f} | {r['ms_step']:,.0f} | "
                f"{r['peak_rss']:,.0f} | {r['growth']:,.0f} | {r['gflops']:,.1f} | "
                f"{r['of_peak']:.1%} | {r['last_loss']:.3f} |"
            )
        for other, name in RATIOS.items():
            a, b = rows["mt"], rows[other]
            lines.append(
                f"| {prec} | **{name}** | **{ratio(a['tok_s'], b['tok_s'])}** | "
                f"{ratio(a['ms_step'], b['ms_step'])} | {ratio(a['peak_rss'], b['peak_rss'])} | "
                f"{ratio(a['growth'], b['growth'])} | | | |"
            )
    lines += [
        "",
        f"| torch.mm, m x k x n (GFLOP/s, median of {MATMUL_REPEATS}) | "
        + " | ".join(res["matmul"])
        + " |",
        "|---|" + "---:|" * len(res["matmul"]),
        *(
            f"| {shape} | "
            + " | ".join(f"{rates[shape] / 1e9:,.0f}" for rates in res["matmul"].values())
            + " |"
            for shape in MATMUL_SHAPES
        ),
        "",
        f"### Decoding: {res['sentences']:,} sentences of {TEST_PREFIX}, beam {spec['beam']}, "
        f"median of {spec['decode_repeats']} passes",
        "",
        f"Weights: {res['decode_weights']}. mt: `mt.translate.Translator.translate` (batches of "
        "decode.max_tokens 8192 source tokens, length-sorted; limit 1.2 x source length + 10 "
        "tokens, EOS included, per sentence; GNMT length penalty 0.6). HF: `generate("
        "num_beams=5, early_stopping=True, length_penalty=0.6, "
        "suppress_tokens=[PAD, BOS])` on the same batches, `max_new_tokens` = the largest of "
        "mt's limits in the batch and a logits processor (`RowLimits`) that ends each sentence at "
        "mt's limit for it, as mt does. Both times include tokenising; mt's also detokenising "
        "(its search returns text; HF's ids are detokenised after the clock stops)."
        + (
            " With random weights no hypothesis ends early: every sentence is decoded to its "
            "length limit, a fixed workload for both (BLEU is meaningless)."
            if not spec.get("run")
            else ""
        ),
        "",
        "| precision | system | seconds | sentences/s | target tok/s | peak RSS MiB | BLEU |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for prec in spec["decode_precisions"]:
        rows = res["decode"][prec]  # system -> figures
        for system in SYSTEMS:
            r = rows[system]
            lines.append(
                f"| {prec} | {SYSTEMS[system]} | {r['seconds']:.1f} | {r['sent_s']:.1f} | "
                f"{r['tok_s']:,.0f} | {r['peak_rss']:,.0f} | {r['bleu']:.2f} |"
            )
        for other, name in RATIOS.items():
            a, b = rows["mt"], rows[other]
            lines.append(
                f"| {prec} | **{name}** | {ratio(a['seconds'], b['seconds'])} | "
                f"**{ratio(a['sent_s'], b['sent_s'])}** | {ratio(a['tok_s'], b['tok_s'])} | "
                f"{ratio(a['peak_rss'], b['peak_rss'])} | |"
            )
    same = ", ".join(f"{p} {n:,} of {res['sentences']:,}" for p, n in res["decode_same"].items())
    lines += ["", f"Beam search outputs identical (mt vs HF): {same}."]
    if res.get("profile"):
        *top, total = res["profile"]
        B, S, T = total["batch"]
        lines += [
            "",
            f"### Where mt's training step goes (fp32, one step, batch {B} x {S} source / "
            f"{T} target, torch.profiler)",
            "",
            f"Top {len(top)} ops by self CPU time; {total['total_ms']:,.0f} ms in all.",
            "",
            "| op | self CPU ms | share | calls |",
            "|---|---:|---:|---:|",
            *(
                f"| `{e['name']}` | {e['self_ms']:,.1f} | {e['share']:.1%} | {e['calls']} |"
                for e in top
            ),
        ]
    return "\n".join(wrap(line) for line in lines) + "\n"


def wrap(line: str, width: int = 100) -> str:
    """Prose lines wrapped at `width` like the rest of the docs; tables and headings kept."""
    if line.startswith(("|", "#")) or len(line) <= width:
        return line
    return textwrap.fill(line, width, break_long_words=False, break_on_hyphens=False)


# Closes a section a script wrote: what a person adds below it (a ### of other measurements)
# stays when the script writes its section again.
END_MARK = "<!-- end of the section its script writes; what follows stays when it rewrites it -->"


def section_end(lines: list[str], start: int, level: int) -> int:
    """Where the section whose heading of `level` is lines[start] ends: after its END_MARK,
    else at the next heading of its level or above (outside code blocks)."""
    ends = tuple("#" * n + " " for n in range(1, level + 1))
    fenced = False
    for j in range(start + 1, len(lines)):
        if lines[j].startswith("```"):
            fenced = not fenced
        elif not fenced and lines[j].rstrip() == END_MARK:
            return j + 1
        elif not fenced and lines[j].startswith(ends):
            return j
    return len(lines)


def write_section(path: Path, section: str, heading: str = SECTION) -> None:
    """Put `section` into the Markdown file, replacing the one under the same `heading`.

    The old section ends at its END_MARK, or without one at the next heading of its level or
    above (its subsections go with it). The new one ends with END_MARK.
    """
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    section = section + END_MARK + "\n"
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        level = len(heading) - len(heading.lstrip("#"))
        after = "".join(lines[section_end(lines, start, level) :]).lstrip("\n")
        new = "".join(lines[:start]) + section + ("\n" + after if after else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new, encoding="utf-8")
    tmp.replace(path)


def publish(section: str, write: str | None, heading: str) -> None:
    """Print a benchmark's Markdown section and, given a file, replace its section there."""
    print(section, end="")
    if write:
        write_section(Path(write), section, heading=heading)
        log(f"wrote {write}")


def main_bench(args: argparse.Namespace) -> None:
    """Prepare, measure in children, check, profile and report."""
    import sacrebleu

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    data = find_data(args.data)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    if args.smoke:
        data = smoke_data(data, workdir, 2000)
    precisions = args.precisions.split(",")
    decode_precisions = args.decode_precisions.split(",")
    spec = {
        "data": str(data),
        "workdir": str(workdir),
        "vocab_size": 1000 if args.smoke else 8000,
        "max_tokens": args.max_tokens,
        "threads": threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "batches": str(workdir / "batches.pt"),
        "beam": args.beam,
        "sentences": args.sentences,
        "run": str(Path(args.run).resolve()) if args.run else None,
        "precisions": precisions,
        "decode_precisions": decode_precisions,
        "decode_repeats": args.decode_repeats,
        "shape": SMOKE_SHAPE if args.smoke else [],
    }
    log(f"data {data}, workdir {workdir}, {threads} threads")
    batches, config = prepare_batches(spec, args.warmup + args.steps)
    tokenizer = load_tokenizer(workdir / "tokenizer")
    vocab = tokenizer.tgt_vocab_size
    flops = train_flops(batches[args.warmup :], config, vocab)
    res: dict[str, Any] = {"train": {}, "decode": {}, "decode_same": {}, "vocab": vocab}
    shape = config.model
    res.update(
        layers=f"{shape.enc_layers}+{shape.dec_layers}",
        dim=shape.dim,
        heads=shape.heads,
        ffn=shape.ffn_dim,
    )
    res["params"] = count_parameters(Transformer(shape, vocab, vocab))
    res["gflop_per_step"] = flops / args.steps / 1e9

    log("matmul rate")
    res["matmul"] = matmul_rates(precisions, 2 if args.smoke else MATMUL_REPEATS)
    workers = 0 if args.smoke else 1  # --smoke: phases in this process; its figures mean nothing
    for prec in precisions:
        res["train"][prec] = {}
        # Systems in turn within each repeat, so that the machine's drift touches them alike.
        jobs = [(system, repeat) for repeat in range(args.repeats) for system in SYSTEMS]
        specs = [{**spec, "system": s, "precision": prec, "repeat": r} for s, r in jobs]
        done = list(zip(jobs, children("train", specs, workdir, workers), strict=True))
        for system in SYSTEMS:
            runs = [out for (s, _), out in done if s == system]
            for repeat, out in enumerate(runs):
                rate = out["tokens"] / out["seconds"]
                log(f"train {system} {prec} run {repeat + 1}/{args.repeats}: {rate:,.0f} tok/s, "
                    f"peak {out['peak_rss']:,.0f} MiB")  # fmt: skip
            med = statistics.median
            tok_s = med(r["tokens"] / r["seconds"] for r in runs)
            gflops = med(flops / r["seconds"] for r in runs) / 1e9
            res["train"][prec][system] = {
                "tok_s": tok_s,
                "ms_step": med(1000 * r["seconds"] / args.steps for r in runs),
                "peak_rss": med(r["peak_rss"] for r in runs),
                "growth": med(r["peak_rss"] - r["rss_before"] for r in runs),
                "gflops": gflops,
                "of_peak": gflops * 1e9 / max(res["matmul"][prec].values()),
                "last_loss": med(r["losses"][-1] for r in runs),
            }

    log("equivalence check")
    res["check"] = equivalence(spec, batches[0], 10 if args.smoke else 100)
    _, references = test_files(spec)
    res["sentences"] = len(references)
    for prec in decode_precisions:
        res["decode"][prec] = {}
        outputs = {}
        specs = [{**spec, "system": s, "precision": prec, "repeats": args.decode_repeats}
                 for s in SYSTEMS]  # fmt: skip
        for system, out in zip(SYSTEMS, children("decode", specs, workdir, workers), strict=True):
            res["decode_weights"] = out["weights"]
            outputs[system] = out["outputs"]
            res["decode"][prec][system] = {
                "seconds": out["seconds"],
                "sent_s": len(references) / out["seconds"],
                "tok_s": out["tokens"] / out["seconds"],
                "peak_rss": out["peak_rss"],
                "bleu": sacrebleu.corpus_bleu(out["texts"], [references]).score,
            }
            log(f"decode {system} {prec} ({args.decode_repeats} passes): {out['seconds']:.1f} s")
        same = sum(a == b for a, b in zip(outputs["mt"], outputs["hf"], strict=True))
        res["decode_same"][prec] = same
    if not args.no_profile:
        log("profile of one mt step")
        res["profile"] = profile_mt_step(spec, batches)
    res["spec"] = spec
    (workdir / "results.json").write_text(json.dumps(res, indent=1))
    section = report(args, spec, res)
    print(section, end="")
    if args.write:
        write_section(Path(args.write), section)
        log(f"wrote {args.write}")


def main() -> None:
    """Parse arguments; run the benchmark, or one child phase of it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="Multi30k directory (default data/multi30k or "
                        "../shared/data/multi30k)")  # fmt: skip
    parser.add_argument("--workdir", help="tokenizer, caches, batches (runs/bench[-smoke])")
    parser.add_argument("--steps", type=int, default=15, help="timed training steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--repeats", type=int, default=3, help="training runs per figure")
    parser.add_argument("--max-tokens", type=int, default=4096, help="batch token budget")
    parser.add_argument("--precisions", help="training precisions (default fp32,bf16)")
    parser.add_argument("--decode-precisions", help="decoding precisions (default fp32,bf16)")
    parser.add_argument("--decode-repeats", type=int, default=3)
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--sentences", type=int, default=0, help="test sentences (0 = all)")
    parser.add_argument("--run", help="a trained post-norm mt run to decode with")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="seconds-long run for tests")
    parser.add_argument("--write", help="Markdown file whose section to replace")
    parser.add_argument("--phase", choices=["train", "decode"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        spec = json.loads(Path(args.spec).read_text())
        result = (train_phase if args.phase == "train" else decode_phase)(spec)
        Path(args.result).write_text(json.dumps(result))
        return
    both = "fp32" if args.smoke else "fp32,bf16"
    args.precisions = args.precisions or both
    args.decode_precisions = args.decode_precisions or both
    args.workdir = args.workdir or ("runs/bench-smoke" if args.smoke else "runs/bench")
    if args.smoke:  # a different workdir: its tokenizer is a small one, on 2,000 pairs
        args.steps, args.warmup, args.repeats, args.decode_repeats = 2, 1, 1, 1
        args.sentences = args.sentences or 20
        args.max_tokens = min(args.max_tokens, 1024)
    main_bench(args)


if __name__ == "__main__":
    main()
