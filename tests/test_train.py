"""The training loop on the tiny config: checkpoints, metrics, exact resume, bad states."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.waiting import read_until
from safetensors.torch import load_file

import mt.train as train_module
from mt import checkpoint as ckpt
from mt.config import Config, load_config
from mt.errors import ConfigError, MtError
from mt.metrics import read_metrics
from mt.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def tiny(run_dir: Path, *overrides: str) -> Config:
    """The tiny config writing to run_dir, with a shared encoded-data cache."""
    cache = run_dir.parent / "cache"
    return load_config(TINY, [f"run_dir={run_dir}", f"data.cache_dir={cache}", *overrides])


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = ckpt.latest_checkpoint(run_dir)
    assert latest is not None
    return load_file(latest.weights)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir, "train")}


def test_tiny_run_writes_a_complete_run_directory(tmp_path: Path) -> None:
    result = train(tiny(tmp_path / "run", "train.max_steps=30"))
    run = tmp_path / "run"
    assert result.state.step == 30 and result.signum is None
    assert (run / "config.yaml").exists()
    assert load_config(run / "config.yaml") == tiny(run, "train.max_steps=30")
    assert (run / "tokenizer" / "spm.model").exists()
    assert [c.step for c in ckpt.list_checkpoints(run)] == [15, 30]
    assert ckpt.best_checkpoint(run) is not None
    train_records = read_metrics(run, "train")
    assert [r["step"] for r in train_records] == [10, 20, 30]
    valid = read_metrics(run, "valid")
    assert [r["step"] for r in valid] == [15, 30]
    assert valid[1]["loss"] < valid[0]["loss"]  # dev loss falls
    assert all(0 <= r["bleu"] <= 100 and r["seconds"] >= 0 for r in valid)
    assert list((run / "tensorboard").iterdir())


def test_learning_rate_follows_the_schedule(tmp_path: Path) -> None:
    train(tiny(tmp_path / "run", "train.max_steps=20", "train.log_every=1"))
    records = read_metrics(tmp_path / "run", "train")
    # tiny.yaml: lr 3e-3, warm-up 5. The lr logged after update n is the one for update n + 1.
    for r in records:
        n = r["step"] + 1
        expected = 3e-3 * n / 5 if n < 5 else 3e-3 * (5 / n) ** 0.5
        assert r["lr"] == pytest.approx(expected, rel=1e-9)


def test_update_freq_two_equals_double_batch(tmp_path: Path) -> None:
    # Two micro-batches per update give the tokens of both in `tokens_per_update`.
    train(tiny(tmp_path / "a", "train.max_steps=4", "train.log_every=1", "train.update_freq=2"))
    train(tiny(tmp_path / "b", "train.max_steps=8", "train.log_every=1"))
    a = read_metrics(tmp_path / "a", "train")
    b = read_metrics(tmp_path / "b", "train")
    for i, record in enumerate(a):
        assert (
            record["tokens_per_update"]
            == b[2 * i]["tokens_per_update"] + b[2 * i + 1]["tokens_per_update"]
        )


def run_cli(run_dir: Path, *overrides: str) -> subprocess.Popen:
    cache = run_dir.parent / "cache"
    args = [sys.executable, "-m", "mt", "train", "--config", str(TINY), f"run_dir={run_dir}",
            f"data.cache_dir={cache}", *overrides]  # fmt: skip
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_step(proc: subprocess.Popen, step: int) -> bytes:
    """Wait until the run logs `step` (train.log_every=1): its stderr so far."""
    return read_until(proc.stderr, f"step {step} |")


RESUMED_STEPS = ["train.max_steps=80", "train.log_every=1"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of RESUMED_STEPS without interruption, which each resumed run must equal."""
    run = tmp_path_factory.mktemp("straight") / "run"
    train(tiny(run, *RESUMED_STEPS))
    return run


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_resume_after_signal_is_exact(straight: Path, tmp_path: Path, sig: int, code: int) -> None:
    split = tmp_path / "split"
    proc = run_cli(split, *RESUMED_STEPS)
    before = wait_for_step(proc, 5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    err = before + err
    assert proc.returncode == code, err.decode()
    stopped_at = ckpt.latest_checkpoint(split).step
    assert 5 <= stopped_at < 80
    assert b"Traceback" not in err

    result = train(tiny(split, *RESUMED_STEPS))  # resumes from the latest checkpoint
    assert result.state.step == 80
    assert losses(split) == losses(straight)  # every step's loss, before and after the stop
    a, b = weights(straight), weights(split)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical on CPU


def test_run_past_max_steps_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    train(tiny(tmp_path / "run", "train.max_steps=15"))
    caplog.set_level("INFO", logger="mt")
    result = train(tiny(tmp_path / "run", "train.max_steps=15"))
    assert result.state.step == 15
    assert "is already at step 15 (train.max_steps=15): nothing to do" in caplog.text


def test_changed_model_is_refused_on_resume(tmp_path: Path) -> None:
    train(tiny(tmp_path / "run", "train.max_steps=15"))
    with pytest.raises(ConfigError) as err:
        train(tiny(tmp_path / "run", "train.max_steps=30", "model.ffn_dim=128"))
    assert str(err.value) == (
        f"{tmp_path / 'run' / 'config.yaml'}: the run was started with other settings "
        "(model.ffn_dim: 64 -> 128); use a new run_dir, or restore those settings to resume"
    )
    # Training settings may change: this continues the run.
    assert train(tiny(tmp_path / "run", "train.max_steps=20")).state.step == 20


def test_changed_tokenizer_is_refused_on_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(tiny(run, "train.max_steps=15"))
    other = tmp_path / "other"
    train(tiny(other, "train.max_steps=1", "train.seed=2", "data.train=tests/data/tiny/valid"))
    (run / "tokenizer" / "spm.model").write_bytes((other / "tokenizer" / "spm.model").read_bytes())
    with pytest.raises(MtError, match=r"tokenizer differs from the run's"):
        train(tiny(run, "train.max_steps=30"))


def poisoned_loss(calls_to_poison: set[int] | None):
    """label_smoothed_nll, but NaN on the given calls (all calls for None)."""
    calls = {"n": 0}
    real = train_module.label_smoothed_nll

    def loss(logits: torch.Tensor, target: torch.Tensor, epsilon: float, pad_id: int = 0):
        calls["n"] += 1
        loss_sum, nll_sum, n = real(logits, target, epsilon, pad_id)
        if calls_to_poison is None or calls["n"] in calls_to_poison:
            loss_sum = loss_sum * float("nan")
        return loss_sum, nll_sum, n

    return loss


def test_non_finite_loss_stops_without_updating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    train(tiny(run, "train.max_steps=15"))
    before = weights(run)
    monkeypatch.setattr(train_module, "label_smoothed_nll", poisoned_loss({1}))
    with pytest.raises(MtError) as err:
        train(tiny(run, "train.max_steps=30"))
    crash = run / "checkpoints" / "crash-step-00000016.safetensors"
    assert str(err.value) == (
        f"non-finite loss or gradient at step 16; parameters were not updated; weights saved to "
        f"{crash} (try a lower train.lr or train.clip_norm)"
    )
    after = load_file(crash)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert ckpt.latest_checkpoint(run).step == 15  # the crash file is never resumed from


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cpu(tmp_path: Path, precision: str) -> None:
    result = train(tiny(tmp_path / "run", "train.max_steps=15", f"train.precision={precision}"))
    valid = read_metrics(tmp_path / "run", "valid")
    assert result.state.step == 15
    assert torch.isfinite(torch.tensor(valid[-1]["loss"]))
    assert all(torch.isfinite(t).all() for t in weights(tmp_path / "run").values())


def test_fp16_overflow_skips_steps_then_stops_at_the_floor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every gradient overflows: each step is skipped and halves the loss scale (65536 at start).
    monkeypatch.setattr(train_module, "label_smoothed_nll", poisoned_loss(None))
    config = tiny(
        tmp_path / "run", "train.max_steps=30", "train.precision=fp16", "train.min_loss_scale=10000"
    )
    with pytest.raises(MtError) as err:
        train(config)
    # 65536 -> 32768 -> 16384 -> 8192 < 10000 at step 3.
    assert str(err.value) == (
        "fp16 loss scale fell to 8192 at step 3 (below train.min_loss_scale=10000): gradients "
        "keep overflowing; use train.precision=bf16, or a lower train.lr"
    )


def test_fp16_skipped_steps_do_not_change_parameters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    train(tiny(run, "train.max_steps=15", "train.precision=fp16"))
    before = weights(run)
    monkeypatch.setattr(train_module, "label_smoothed_nll", poisoned_loss(None))
    result = train(tiny(run, "train.max_steps=17", "train.precision=fp16", "train.log_every=1"))
    assert result.state.overflow_steps == 2
    after = weights(run)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert read_metrics(run, "train")[-1]["overflow_steps"] == 2


@pytest.mark.slow
def test_sigterm_via_cli_leaves_resumable_checkpoint_and_clean_stderr(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = run_cli(run, "train.max_steps=100000", "train.log_every=1")
    wait_for_step(proc, 3)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert "run the same command to resume" in err.decode()
    state = ckpt.load_state(ckpt.latest_checkpoint(run).state)
    assert state["train"]["step"] == ckpt.latest_checkpoint(run).step


def test_early_stopping_on_patience(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bleus = iter([10.0, 12.0, 11.0, 11.5, 9.0, 20.0])

    def fake_validate(*args, **kwargs) -> dict[str, float]:
        return {"loss": 1.0, "nll": 1.0, "ppl": 2.7, "bleu": next(bleus)}

    monkeypatch.setattr(train_module, "validate", fake_validate)
    run = tmp_path / "run"
    result = train(tiny(run, "train.max_steps=100", "train.valid_every=5", "train.patience=2"))
    # Best 12.0 at step 10; 11.0 (step 15) and 11.5 (step 20) are not better: stop at step 20.
    assert result.state.step == 20
    assert result.state.best_bleu == 12.0
    assert ckpt.best_checkpoint(run).step == 10
    assert [r["bleu"] for r in read_metrics(run, "valid")] == [10.0, 12.0, 11.0, 11.5]


def test_time_limit_stops_with_a_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="mt")
    run = tmp_path / "run"
    result = train(tiny(run, "train.max_steps=1000", "train.max_minutes=0.00001"))
    assert 1 <= result.state.step < 5 and result.signum is None
    assert ckpt.latest_checkpoint(run).step == result.state.step
    assert f"reached train.max_minutes=1e-05 at step {result.state.step}" in caplog.text


def test_average_last_at_the_end(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(tiny(run, "train.max_steps=30", "train.keep_last=2", "train.average_last=2"))
    a, b = (weights_at(run, step) for step in (15, 30))
    average = load_file(run / "checkpoints" / "average.safetensors")
    assert all(torch.allclose(average[k], (a[k] + b[k]) / 2, atol=1e-7) for k in a)


def weights_at(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step-{step:08d}.safetensors")


def test_average_last_needs_the_checkpoints_kept(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.average_last=3 exceeds train\.keep_last=2"):
        tiny(tmp_path / "run", "train.keep_last=2", "train.average_last=3")


def test_out_of_memory_skips_the_update(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = train_module.label_smoothed_nll
    calls = {"n": 0}

    def loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "label_smoothed_nll", loss)
    run = tmp_path / "run"
    result = train(tiny(run, "train.max_steps=5", "train.valid_every=1000", "train.log_every=1"))
    assert result.state.step == 5 and result.state.oom_steps == 1
    assert [r["step"] for r in read_metrics(run, "train")] == [1, 2, 3, 4, 5]
