"""Tests for mt.checkpoint: round trips, atomicity, listing/pruning, refusing hostile files."""

from __future__ import annotations

import errno
import itertools
import logging
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_model, save_file

from mt import checkpoint as ck
from mt.config import ModelConfig
from mt.errors import MtError
from mt.model import Transformer

META = {"tokenizer_sha256": "ab12cd34" + "0" * 56, "src_vocab": "20", "tgt_vocab": "20"}


def tiny(
    seed: int = 0, share: bool = True, src_vocab: int = 20, tgt_vocab: int = 20
) -> Transformer:
    """A tiny Transformer; different seeds give different weights."""
    torch.manual_seed(seed)
    shape = ModelConfig(
        dim=16,
        enc_layers=1,
        dec_layers=1,
        heads=2,
        ffn_dim=32,
        max_positions=32,
        share_embeddings=share,
    )
    return Transformer(shape, src_vocab, tgt_vocab)


def train_state(model: torch.nn.Module) -> dict:
    """A realistic training state: AdamW after one update, LambdaLR, GradScaler, counters, RNG."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda n: 1.0 / (n + 1))
    model(torch.tensor([[3, 4, 2]]), torch.tensor([[1, 5, 6]])).sum().backward()
    optimizer.step()
    scheduler.step()
    return {
        "train": {"step": 1, "epoch": 0, "best_bleu": None, "done": [1, 2]},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
    }


def assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Every tensor of the two state dicts is identical."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def save(run: Path, step: int, model: torch.nn.Module | None = None) -> ck.Checkpoint:
    """Save a checkpoint of `model` (a tiny one by default) at `step`."""
    return ck.save_checkpoint(run, step, model or tiny(step), {"step": step}, META)


def stray_files(run: Path) -> list[str]:
    """Temp files left in the checkpoints directory."""
    return sorted(p.name for p in (run / ck.CHECKPOINT_DIR).iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("share", [True, False])
def test_round_trip_restores_parameters_and_ties(tmp_path: Path, share: bool) -> None:
    vocab = (20, 20) if share else (20, 24)
    model = tiny(1, share, *vocab)
    state = train_state(model)
    saved = ck.save_checkpoint(tmp_path, 1000, model, state, META)
    assert saved.name == "step-00001000" and saved.step == 1000 and saved.run_dir == tmp_path
    assert saved.weights == tmp_path / "checkpoints" / "step-00001000.safetensors"

    fresh = tiny(2, share, *vocab)
    ck.load_weights(saved.weights, fresh, expected=META)
    assert_same(model, fresh)
    # The tie survives: output projection, target and (shared) source embeddings are one tensor.
    assert (fresh.src_embed.weight is fresh.tgt_embed.weight) == share
    fresh.tgt_embed.weight.data[3, 0] = 42.0
    assert (fresh.src_embed.weight[3, 0].item() == 42.0) == share

    loaded = ck.load_state(saved.state)
    assert loaded["train"] == state["train"]
    optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    optimizer.load_state_dict(loaded["optimizer"])  # shapes and groups line up
    assert ck.read_metadata(saved.weights)["step"] == "1000"
    assert ck.read_metadata(saved.weights)["tokenizer_sha256"] == META["tokenizer_sha256"]


def test_file_is_readable_by_safetensors_load_model(tmp_path: Path) -> None:
    model = tiny(1)
    ck.save_weights(tmp_path / "w.safetensors", model, {})
    fresh = tiny(2)
    load_model(fresh, tmp_path / "w.safetensors")
    assert_same(model, fresh)


def test_save_tensors_handles_shared_storage(tmp_path: Path) -> None:
    base = torch.arange(12.0)
    tensors = {"a": base.view(3, 4), "b": base.view(3, 4), "c": base[:4], "d": base.view(4, 3).t()}
    ck.save_tensors(tmp_path / "t.safetensors", tensors, {"note": "x"})
    with ck._open_weights(tmp_path / "t.safetensors") as f:
        assert sorted(f.keys()) == ["a", "c", "d"]  # b is an exact alias of a
        assert torch.equal(f.get_tensor("c"), base[:4])
        assert torch.equal(f.get_tensor("d"), base.view(4, 3).t())
    assert ck.read_metadata(tmp_path / "t.safetensors")["note"] == "x"


def test_list_latest_best_prune(tmp_path: Path) -> None:
    assert ck.list_checkpoints(tmp_path) == [] and ck.latest_checkpoint(tmp_path) is None
    assert ck.best_checkpoint(tmp_path) is None
    saved = [save(tmp_path, step) for step in (300, 100, 400, 200)]
    assert [c.step for c in ck.list_checkpoints(tmp_path)] == [100, 200, 300, 400]
    assert ck.latest_checkpoint(tmp_path) == saved[2]

    ck.set_best(tmp_path, saved[1])  # step 100
    assert (tmp_path / "checkpoints" / "best").read_text().strip() == "step-00000100"
    assert ck.best_checkpoint(tmp_path) == saved[1]

    deleted = ck.prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in deleted) == [
        "step-00000200.safetensors",
        "step-00000200.state.pt",
    ]
    assert [c.step for c in ck.list_checkpoints(tmp_path)] == [100, 300, 400]
    assert ck.prune_checkpoints(tmp_path, keep_last=2) == []


def test_prune_after_going_back_counts_only_the_steps_up_to_the_one_saved(
    tmp_path: Path,
) -> None:
    # A run resumed from step 100 while 300 and 400 stay (--resume went back): its own
    # checkpoints are the last; the later ones neither count nor push its new ones out.
    for step in (100, 300, 400, 200):
        save(tmp_path, step)
    assert ck.prune_checkpoints(tmp_path, keep_last=2, saved=200) == []
    save(tmp_path, 250)
    deleted = ck.prune_checkpoints(tmp_path, keep_last=2, saved=250)
    assert sorted(p.name for p in deleted) == [
        "step-00000100.safetensors",
        "step-00000100.state.pt",
    ]
    assert [c.step for c in ck.list_checkpoints(tmp_path)] == [200, 250, 300, 400]


def test_crash_while_writing_weights_keeps_previous(tmp_path: Path, monkeypatch) -> None:
    previous = save(tmp_path, 100)
    real_replace = os.replace

    def replace(src, dst):  # the state lands, then the process "dies" before the weights do
        if str(dst).endswith(".safetensors"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 200)
    monkeypatch.undo()

    assert not (tmp_path / "checkpoints" / "step-00000200.safetensors").exists()
    assert ck.list_checkpoints(tmp_path) == [previous]
    assert ck.latest_checkpoint(tmp_path) == previous
    assert stray_files(tmp_path) == []
    fresh = tiny(5)
    ck.load_weights(previous.weights, fresh, expected=META)
    assert_same(tiny(100), fresh)
    # The orphaned state file is crash debris: pruning removes it.
    assert (tmp_path / "checkpoints" / "step-00000200.state.pt").exists()
    deleted = ck.prune_checkpoints(tmp_path, keep_last=5)
    assert [p.name for p in deleted] == ["step-00000200.state.pt"]


def test_crash_inside_tensor_writer_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    previous = save(tmp_path, 100)

    def half_write(tensors, filename, metadata=None):  # writes part of the file, then fails
        Path(filename).write_bytes(b"\x00" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", half_write)
    with pytest.raises(MtError, match=r"step-00000200\.safetensors: cannot write \(disk full\)"):
        save(tmp_path, 200)
    monkeypatch.undo()
    assert ck.latest_checkpoint(tmp_path) == previous
    assert stray_files(tmp_path) == []
    # A killed trainer cannot clean up: its temp files are never listed, and the next trainer
    # removes them at its start (pruning leaves them: they could be another process's).
    (tmp_path / "checkpoints" / ".step-00000300.safetensors.dead.tmp").write_bytes(b"x")
    assert ck.latest_checkpoint(tmp_path) == previous
    ck.prune_checkpoints(tmp_path, keep_last=5)
    assert stray_files(tmp_path) == [".step-00000300.safetensors.dead.tmp"]
    ck.repair_checkpoints(tmp_path)
    assert stray_files(tmp_path) == []


def test_a_step_saved_again_stays_whole_when_the_new_weights_fail(
    tmp_path: Path, monkeypatch
) -> None:
    first = ck.save_checkpoint(tmp_path, 100, tiny(100), {"step": 100}, META, resume_point=True)

    def full(tensors, filename, metadata=None):  # the disk fills while the weights are written
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(MtError, match=r"step-00000100\.safetensors: cannot write"):
        save(tmp_path, 100, tiny(7))  # the resume point validated: saved again
    monkeypatch.undo()
    assert ck.list_checkpoints(tmp_path) == [first]  # its state untouched: still a pair
    assert ck.load_training_state(first) == {"step": 100}
    assert stray_files(tmp_path) == []
    fresh = tiny(5)
    ck.load_weights(first.weights, fresh, expected=META)
    assert_same(tiny(100), fresh)


def test_a_state_that_cannot_be_read_now_is_not_pruned_as_debris(
    tmp_path: Path, monkeypatch
) -> None:
    kept = [save(tmp_path, step) for step in (100, 200)]
    real = ck._state_id

    def flaky(path: Path) -> str:  # a network file system's passing error on one file
        if path.name == "step-00000100.state.pt":
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return real(path)

    monkeypatch.setattr(ck, "_state_id", flaky)
    with pytest.raises(OSError):
        ck.prune_checkpoints(tmp_path, keep_last=5)
    monkeypatch.undo()
    assert ck.list_checkpoints(tmp_path) == kept  # both whole, nothing deleted


class Payload:
    """A pickle that would create a marker file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["state", "weights"])
def test_pickled_payload_is_refused_without_running(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    saved = save(tmp_path, 100)
    target = saved.state if kind == "state" else saved.weights
    target.write_bytes(pickle.dumps({"model": Payload(marker)}))
    if kind == "state":
        with pytest.raises(MtError, match=r"not a valid mt training state \("):
            ck.load_state(target)
    else:
        with pytest.raises(MtError, match=r"not a valid mt checkpoint \("):
            ck.load_weights(target, tiny())
    assert not marker.exists()


def test_torch_saved_payload_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "x.state.pt"
    torch.save({"a": Payload(marker)}, path)
    with pytest.raises(MtError) as err:
        ck.load_state(path)
    assert (
        str(err.value)
        == f"{path}: not a valid mt training state (unsupported global: posix.system)"
    )
    assert not marker.exists()
    path.write_bytes(pickle.dumps({"a": Payload(marker)}, protocol=2))  # plain pickle, no zip
    with pytest.raises(MtError) as err:
        ck.load_state(path)
    assert (
        str(err.value)
        == f"{path}: not a valid mt training state (unsupported global: posix.system)"
    )
    assert not marker.exists()


def test_truncated_files_are_refused(tmp_path: Path) -> None:
    saved = save(tmp_path, 100)
    for path in (saved.weights, saved.state):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MtError) as err:
        ck.load_weights(saved.weights, tiny())
    assert str(err.value).startswith(f"{saved.weights}: not a valid mt checkpoint (")
    with pytest.raises(MtError, match=r"not a valid mt training state \("):
        ck.load_state(saved.state)
    with pytest.raises(MtError, match="not a valid mt checkpoint"):
        ck.read_metadata(saved.weights)


def test_metadata_mismatches_are_refused(tmp_path: Path) -> None:
    saved = save(tmp_path, 100)
    path = saved.weights
    other_tok = {**META, "tokenizer_sha256": "ef567890" + "1" * 56}
    with pytest.raises(MtError) as err:
        ck.load_weights(path, tiny(), expected=other_tok)
    assert str(err.value) == (
        f"{path}: tokenizer differs from the run's (checkpoint sha256 ab12cd34…, run ef567890…)"
    )
    with pytest.raises(MtError) as err:
        ck.load_weights(path, tiny(), expected={**META, "tgt_vocab": "4000"})
    assert str(err.value) == f"{path}: target vocabulary has 20 entries but the model expects 4000"
    with pytest.raises(MtError, match="source vocabulary has 20 entries but the model expects 8"):
        ck.load_weights(path, tiny(), expected={**META, "src_vocab": "8"})
    with pytest.raises(MtError, match="does not record lang"):
        ck.load_weights(path, tiny(), expected={"lang": "de"})


def test_shape_and_name_mismatches_are_refused(tmp_path: Path) -> None:
    model = tiny(share=False, src_vocab=20, tgt_vocab=24)
    saved = ck.save_checkpoint(tmp_path, 100, model, {}, {})
    with pytest.raises(MtError) as err:
        ck.load_weights(saved.weights, tiny(share=False, src_vocab=20, tgt_vocab=28))
    assert str(err.value) == (
        f"{saved.weights}: tensor tgt_embed.weight has shape [24, 16] in the checkpoint "
        "but [28, 16] in the model"
    )
    with pytest.raises(MtError, match="lacks tensor weight, which the model has"):
        ck.load_weights(saved.weights, torch.nn.Linear(2, 2))
    # Tied (one stored embedding) into untied: the second embedding is missing.
    tied = save(tmp_path, 200)
    with pytest.raises(MtError, match=r"lacks tensor tgt_embed\.weight"):
        ck.load_weights(tied.weights, tiny(share=False))


def test_state_with_unloadable_objects_is_refused_at_save(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"state\['x'\] is a PosixPath|state\['x'\] is a Path"):
        ck.save_checkpoint(tmp_path, 1, tiny(), {"x": Path("a")}, META)
    assert ck.list_checkpoints(tmp_path) == []


def test_resolve_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first, second = save(run, 100), save(run, 200)
    assert ck.resolve_checkpoint(run) == second  # no best pointer: the latest
    ck.set_best(run, first)
    assert ck.resolve_checkpoint(run) == first  # the best wins
    assert ck.resolve_checkpoint(run / "checkpoints") == first
    assert ck.resolve_checkpoint(second.weights) == second
    assert ck.resolve_checkpoint(second.state) == second
    assert ck.resolve_checkpoint(run / "checkpoints" / "step-00000200") == second
    assert ck.resolve_checkpoint(run / "checkpoints" / "best") == first

    moved = tmp_path / "moved"
    run.rename(moved)  # relocatable: the pointer holds only a name
    assert (
        ck.resolve_checkpoint(moved).weights == moved / "checkpoints" / "step-00000100.safetensors"
    )

    for missing in (tmp_path / "nope", tmp_path / "empty"):
        if missing.name == "empty":
            missing.mkdir()
        with pytest.raises(MtError) as err:
            ck.resolve_checkpoint(missing)
        assert str(err.value) == (
            f"{missing}: no checkpoint found "
            "(expected a run directory, a checkpoints directory or a .safetensors file)"
        )


def test_dangling_best_pointer_is_an_error(tmp_path: Path) -> None:
    saved = save(tmp_path, 100)
    ck.set_best(tmp_path, saved)
    saved.weights.unlink()
    with pytest.raises(MtError, match="points to step-00000100, which does not exist"):
        ck.best_checkpoint(tmp_path)
    (tmp_path / "checkpoints" / "best").write_text("../../etc/passwd")
    with pytest.raises(MtError, match="not a checkpoint name"):
        ck.best_checkpoint(tmp_path)
    pointer = tmp_path / "checkpoints" / "best"
    pointer.write_bytes(b"step-\xc1\xff")
    with pytest.raises(MtError) as err:
        ck.resolve_checkpoint(pointer)
    assert str(err.value) == f"{pointer}: not a checkpoint name (not UTF-8 text)"


def test_save_crash_is_not_listed(tmp_path: Path) -> None:
    path = ck.save_crash(tmp_path, 7, tiny())
    assert path.is_file() and ck.read_metadata(path)["step"] == "7"
    assert ck.list_checkpoints(tmp_path) == []


# --- faults: kills, foreign temp files, dangling pointers, corruption, divergence ------------

# state tag -> seed of the weights saved with it
TAGS = {"100": 100, "200-old": 200, "200-new": 999}
CHILD = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
import test_checkpoint
test_checkpoint.kill_at_each_boundary(Path(sys.argv[1]))
"""


def resave_and_die(run: Path, boundary: int) -> None:
    """Save step 200 again as training does, SIGKILLed before rename or unlink `boundary`."""
    done = 0

    def killing(op):
        def wrapped(*args, **kwargs):
            nonlocal done
            if done == boundary:
                os.kill(os.getpid(), signal.SIGKILL)
            done += 1
            return op(*args, **kwargs)

        return wrapped

    os.replace, os.unlink = killing(os.replace), killing(os.unlink)
    saved = ck.save_checkpoint(run, 200, tiny(TAGS["200-new"]), {"tag": "200-new"}, META)
    ck.set_best(run, saved)  # the dev score improved
    ck.prune_checkpoints(run, keep_last=1)


def kill_at_each_boundary(root: Path) -> None:
    """In a child: forks re-save copies of root/setup, killed at boundary 0, 1, ... until one
    lives to the end; prints that one's number."""
    torch.set_num_threads(1)  # no thread pool: forking is safe
    for boundary in itertools.count():
        run = root / f"run-{boundary}"
        shutil.copytree(root / "setup", run)
        pid = os.fork()
        if pid == 0:
            resave_and_die(run, boundary)
            os._exit(0)
        status = os.waitpid(pid, 0)[1]
        if os.WIFEXITED(status):
            print(boundary, flush=True)
            return
        assert os.WTERMSIG(status) == signal.SIGKILL


def check_invariants(run: Path) -> None:
    """`best` names a complete checkpoint; every complete one pairs weights with their state."""
    complete = ck.list_checkpoints(run)
    assert ck.best_checkpoint(run) in complete
    assert ck.resolve_checkpoint(run) == ck.best_checkpoint(run)
    assert ck.latest_checkpoint(run) == complete[-1]
    for saved in complete:
        tag = ck.load_state(saved.state)["tag"]
        fresh = tiny(1)
        ck.load_weights(saved.weights, fresh, expected=META)
        assert_same(fresh, tiny(TAGS[tag]))
        assert saved.step == int(tag[:3])


@pytest.mark.slow
def test_kill_at_every_write_boundary_keeps_best_and_pairs(tmp_path: Path) -> None:
    setup = tmp_path / "setup"
    ck.save_checkpoint(setup, 100, tiny(TAGS["100"]), {"tag": "100"}, META)
    ck.set_best(setup, ck.save_checkpoint(setup, 200, tiny(200), {"tag": "200-old"}, META))
    child = [sys.executable, "-c", CHILD.format(tests=str(Path(__file__).parent)), str(tmp_path)]
    whole = int(subprocess.run(child, capture_output=True, text=True, check=True).stdout)
    assert whole >= 5  # at least: the state, the weights, `best`, the pruned step's two files

    check_invariants(tmp_path / f"run-{whole}")  # not killed: the new step 200 is the best
    assert [c.step for c in ck.list_checkpoints(tmp_path / f"run-{whole}")] == [200]
    assert ck.load_state(ck.best_checkpoint(tmp_path / f"run-{whole}").state)["tag"] == "200-new"
    for run in (tmp_path / f"run-{k}" for k in range(whole)):
        check_invariants(run)
        ck.repair_checkpoints(run)  # the next trainer's start: no debris is left
        ck.prune_checkpoints(run, keep_last=5)
        check_invariants(run)
        assert stray_files(run) == []
        for state in (run / "checkpoints").glob("*.state.pt"):  # no unpaired state remains
            assert ck.Checkpoint(ck._weights_of(state), state) in ck.list_checkpoints(run)


def test_pruning_removes_only_this_process_temp_files(tmp_path: Path, monkeypatch) -> None:
    save(tmp_path, 100)
    foreign = tmp_path / "checkpoints" / ".average.safetensors.1a2b3c4d.tmp"  # `mt average`'s
    foreign.write_bytes(b"in flight")

    def half_write(tensors, filename, metadata=None):  # writes part of the file, then fails
        Path(filename).write_bytes(b"\x00" * 100)
        raise OSError(errno.EIO, "I/O error")

    def stuck(self, missing_ok=False):  # and the clean-up fails too: the temp file stays
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(ck, "save_file", half_write)
    monkeypatch.setattr(Path, "unlink", stuck)
    with pytest.raises(PermissionError):
        save(tmp_path, 200)
    monkeypatch.undo()
    own = [name for name in stray_files(tmp_path) if name != foreign.name]
    assert [name.split(".")[2] for name in own] == ["safetensors", "state"]  # neither renamed

    deleted = ck.prune_checkpoints(tmp_path, keep_last=5)
    assert [p.name for p in deleted] == own
    assert stray_files(tmp_path) == [foreign.name]
    assert foreign.read_bytes() == b"in flight"


def test_weights_with_another_saves_state_are_not_a_checkpoint(tmp_path: Path) -> None:
    kept, other = save(tmp_path / "a", 100), save(tmp_path / "b", 100, tiny(7))
    shutil.copyfile(other.state, kept.state)  # what a kill between two renames could pair
    assert ck.list_checkpoints(tmp_path / "a") == []
    with pytest.raises(MtError) as err:  # e.g. `mt train --resume RUN/checkpoints/step-100`
        ck.load_training_state(kept)
    assert str(err.value) == (
        f"{kept.state}: not the training state saved with step-00000100.safetensors "
        "(a save was interrupted); resume from another checkpoint"
    )
    assert ck.load_training_state(other)["step"] == 100
    assert ck.prune_checkpoints(tmp_path / "a", keep_last=5) == [kept.weights, kept.state]


def test_dangling_best_falls_back_and_is_repaired(tmp_path: Path, caplog) -> None:
    first, second = save(tmp_path, 100), save(tmp_path, 200)
    ck.set_best(tmp_path, first)
    first.weights.unlink()  # an older version killed while saving, or a manual deletion
    pointer = tmp_path / "checkpoints" / "best"
    dangling = f"{pointer}: points to step-00000100, which does not exist"
    with caplog.at_level(logging.WARNING, logger="mt"):
        assert ck.resolve_checkpoint(tmp_path) == second
        assert caplog.messages == [f"{dangling}; using the latest checkpoint, step-00000200"]
        assert ck.prune_checkpoints(tmp_path, keep_last=1) == [first.state]
        caplog.clear()
        ck.repair_checkpoints(tmp_path)
        assert caplog.messages == [
            f"{dangling}; pointed it at the latest complete checkpoint, step-00000200 "
            "(none left has a dev score)"
        ]
        assert ck.best_checkpoint(tmp_path) == second
        caplog.clear()
        second.weights.unlink()  # nothing complete is left: the pointer goes
        ck.repair_checkpoints(tmp_path)
        assert caplog.messages == [
            f"{pointer}: points to step-00000200, which does not exist; "
            "removed it (no complete checkpoint is left)"
        ]
    assert not pointer.exists()


def test_a_damaged_newest_state_is_skipped_with_a_warning(tmp_path: Path, caplog) -> None:
    first, second = save(tmp_path, 100), save(tmp_path, 200)
    ck.set_best(tmp_path, second)
    with second.state.open("r+b") as state:
        state.truncate(1000)  # a damaged file; its weights are whole
    with caplog.at_level(logging.WARNING, logger="mt"):
        ck.repair_checkpoints(tmp_path)
    assert caplog.messages == [
        f"{second.weights}: its training state step-00000200.state.pt is missing or not the one "
        "saved with it (an interrupted save, or a damaged file); training goes on from "
        "step-00000100"
    ]
    assert ck.latest_checkpoint(tmp_path) == first
    assert second.weights.is_file() and ck.best_checkpoint(tmp_path) == second  # still decodable
    caplog.clear()
    second.state.unlink()
    first.state.unlink()
    with caplog.at_level(logging.WARNING, logger="mt"):
        ck.repair_checkpoints(tmp_path)
    assert [m.split(": ")[0] for m in caplog.messages] == [str(first.weights), str(second.weights)]
    assert all(m.endswith("training goes on from the start") for m in caplog.messages)


def tensor_data_offset(path: Path) -> int:
    """Where a safetensors file's tensor bytes start (after its 8-byte length and JSON header)."""
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def test_flipped_byte_is_a_corrupt_checkpoint(tmp_path: Path) -> None:
    saved = save(tmp_path, 100)
    data = bytearray(saved.weights.read_bytes())
    data[tensor_data_offset(saved.weights) + 1000] ^= 0x01  # one bit, inside a tensor
    saved.weights.write_bytes(bytes(data))
    with pytest.raises(MtError) as err:
        ck.load_weights(saved.weights, tiny(), expected=META)
    assert str(err.value) == f"{saved.weights}: corrupt checkpoint (weights digest mismatch)"
    assert ck.read_metadata(saved.weights)["step"] == "100"  # the header is untouched


def test_weights_without_digest_still_load(tmp_path: Path) -> None:
    model = tiny(3)
    path = tmp_path / "other-tool.safetensors"  # e.g. written before digests, or by another tool
    save_file(ck._dedupe(model.state_dict()), str(path), metadata=META)
    fresh = tiny(4)
    ck.load_weights(path, fresh, expected=META)
    assert_same(model, fresh)


def test_non_finite_weights_are_refused(tmp_path: Path) -> None:
    model = tiny(1)
    with torch.no_grad():
        model.decoder[0].ffn.fc1.weight[2, 3] = float("inf")
    saved = save(tmp_path, 100, model)
    with pytest.raises(MtError) as err:
        ck.load_weights(saved.weights, tiny(), expected=META)
    assert str(err.value) == (
        f"{saved.weights}: tensor decoder.0.ffn.fc1.weight holds non-finite values "
        "(inf/nan); the model diverged"
    )
    # The crash dump keeps them on purpose: refused for use, loadable for inspection only.
    crash = ck.save_crash(tmp_path, 7, model)
    with pytest.raises(MtError, match=r"decoder\.0\.ffn\.fc1\.weight holds non-finite values"):
        ck.load_weights(crash, tiny())
    inspected = tiny(2)
    ck.load_weights(crash, inspected, allow_nonfinite=True)
    assert_same(model, inspected)


def flip_a_byte_of(state: Path, record_suffix: str) -> str:
    """Change one byte inside a record of a torch.save file (its zip directory intact)."""
    with zipfile.ZipFile(state) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(record_suffix))
    data = bytearray(state.read_bytes())
    local = info.header_offset  # its local header: 30 bytes, then its name and extra field
    name_length, extra_length = struct.unpack("<HH", data[local + 26 : local + 30])
    data[local + 30 + name_length + extra_length + info.file_size // 2] ^= 0x40
    state.write_bytes(bytes(data))
    return info.filename


@pytest.mark.parametrize("damaged", ["state", "weights"])
def test_a_damaged_latest_checkpoint_is_set_aside_and_training_goes_on_from_the_one_before(
    tmp_path: Path, damaged: str, caplog: pytest.LogCaptureFixture
) -> None:
    save(tmp_path, 100)
    model = tiny(2)
    latest = ck.save_checkpoint(tmp_path, 200, model, train_state(model), META)
    if damaged == "state":
        record = flip_a_byte_of(latest.state, "/data/0")  # a tensor's bytes, not the directory
        problem = f"{latest.state}: damaged (its record {record} fails its CRC check)"
        with pytest.raises(MtError) as err:  # as --resume would load it
            ck.load_training_state(latest)
        assert str(err.value) == f"{problem}; resume from another checkpoint"
    else:
        data = latest.weights.read_bytes()
        latest.weights.write_bytes(data[:-8] + bytes(8))  # the last tensor's bytes zeroed
        problem = f"{latest.weights}: corrupt checkpoint (weights digest mismatch)"
    assert ck.latest_checkpoint(tmp_path) == latest  # listed: its directory and header agree
    with caplog.at_level(logging.WARNING, logger="mt"):
        ck.repair_checkpoints(tmp_path)
    assert caplog.messages == [
        f"{problem}; renamed it damaged-step-00000200, training goes on from step-00000100"
    ]
    assert ck.latest_checkpoint(tmp_path).step == 100
    names = sorted(p.name for p in (tmp_path / ck.CHECKPOINT_DIR).iterdir())
    assert "damaged-step-00000200.safetensors" in names
    assert "damaged-step-00000200.state.pt" in names


def test_with_no_whole_checkpoint_left_the_start_is_refused(tmp_path: Path) -> None:
    for step in (100, 200):
        saved = save(tmp_path, step)
        data = saved.weights.read_bytes()
        saved.weights.write_bytes(data[:-8] + bytes(8))
    with pytest.raises(MtError) as err:  # not a silent start from scratch
        ck.repair_checkpoints(tmp_path)
    weights = tmp_path / ck.CHECKPOINT_DIR / "step-00000200.safetensors"
    assert str(err.value) == (
        f"{weights}: corrupt checkpoint (weights digest mismatch); no checkpoint of {tmp_path} "
        f"is whole: restore them from a copy, or delete {tmp_path / ck.CHECKPOINT_DIR} to train "
        "from the start"
    )
    assert [c.step for c in ck.list_checkpoints(tmp_path)] == [100, 200]  # nothing renamed


def test_a_checkpoint_damaged_twice_at_one_step_keeps_both_copies(tmp_path: Path) -> None:
    save(tmp_path, 100)
    for _ in range(2):
        saved = save(tmp_path, 200)
        data = saved.weights.read_bytes()
        saved.weights.write_bytes(data[:-8] + bytes(8))
        ck.repair_checkpoints(tmp_path)
    names = sorted(p.name for p in (tmp_path / ck.CHECKPOINT_DIR).glob("damaged-*"))
    assert names == [
        "damaged-step-00000200.2.safetensors",
        "damaged-step-00000200.2.state.pt",
        "damaged-step-00000200.safetensors",
        "damaged-step-00000200.state.pt",
    ]


@pytest.mark.parametrize("failing", ["weights", "state"])
def test_a_read_error_while_checking_for_damage_stops_and_sets_nothing_aside(
    tmp_path: Path, failing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, latest = save(tmp_path, 100), save(tmp_path, 200)
    path = getattr(latest, failing)

    def unreadable(*args: object, **kwargs: object) -> None:  # a network file system's error
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))

    if failing == "weights":
        real = ck.safe_open
        monkeypatch.setattr(
            ck, "safe_open", lambda p, **kw: unreadable() if p == str(path) else real(p, **kw)
        )
    else:
        monkeypatch.setattr(zipfile.ZipFile, "testzip", unreadable)
    with pytest.raises(MtError) as err:
        ck.repair_checkpoints(tmp_path)
    assert str(err.value) == (
        f"{path}: cannot read (Input/output error); no checkpoint was set aside: "
        "run again once the file system reads it"
    )
    monkeypatch.undo()
    assert ck.list_checkpoints(tmp_path) == [first, latest]  # both where they were
    assert list((tmp_path / ck.CHECKPOINT_DIR).glob("damaged-*")) == []
