"""Safe, atomic, self-describing checkpoints inside a run directory.

Layout (all names relative, so a run directory can be moved):
    run_dir/checkpoints/step-00001000.safetensors  model weights + metadata in the header
    run_dir/checkpoints/step-00001000.state.pt     training state (weights_only-loadable)
    run_dir/checkpoints/best                       pointer file: the best checkpoint's name

Every file is written to a hidden temp file in the same directory, fsynced and renamed over
its final name, so a crash never leaves a partial file under a final name. The state file is
written first and the weights last; the weights' header names the state saved with them (an id
read from the state's zip directory), so a checkpoint is complete when both files are present and
agree: a kill while a step is saved again never pairs new weights with an old state, or the
reverse. `best` always names a whole weights file: files are replaced by rename, never deleted
first. The header also holds a digest of the tensors, checked at load. Nothing here ever
unpickles code: weights are safetensors, states load with `weights_only=True`.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from mt.errors import MtError
from mt.files import atomic_path, fsync, write_errors

CHECKPOINT_DIR = "checkpoints"
BEST_FILE = "best"
WEIGHTS_SUFFIX = ".safetensors"
STATE_SUFFIX = ".state.pt"
AVERAGE_NAME = "average" + WEIGHTS_SUFFIX  # `mt average`'s output; a run's own at its end
_STEP_NAME = re.compile(r"step-(\d+)")
# Temp files of the files only a trainer writes (mt.files names temps `.NAME.<hex>.tmp`).
_TRAINER_TEMPS = (".step-*.tmp", ".best.*.tmp", ".crash-step-*.tmp")
DIGEST_KEY = "weights_xxh3_128"  # header entry: digest of the tensors, checked at load
STATE_KEY = "state_id"  # header entry: the id of the state file saved with the weights
RESUME_KEY = "resume_point"  # header entry: "true" on a signal's unvalidated checkpoint
# Header entry: the checkpoint that `--resume` named when the run that saved this one began, if
# it was the run's own (a run gone back): a restarted job finds where it got to from there.
ORIGIN_KEY = "resumed_from"
JOB_KEY = "job"  # header entry beside ORIGIN_KEY: that run's scheduler job and --resume, if any
_INTERNAL_KEYS = (DIGEST_KEY, STATE_KEY, RESUME_KEY, ORIGIN_KEY, JOB_KEY)  # not in read_metadata
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+)")  # how torch's weights_only unpickler names one
_DESCRIPTIONS = {  # metadata keys that get a readable mismatch message
    "src_vocab": "source vocabulary",
    "tgt_vocab": "target vocabulary",
}
# Temp files this process is writing or failed to remove: the only ones pruning may delete
# (another process, e.g. `mt average`, may be writing its own in the same directory).
_OWN_TEMPS: set[Path] = set()

log = logging.getLogger("mt")


class ReadError(MtError):
    """The OS failed to read a checkpoint file (a disk or network error): its bytes may be whole."""


@dataclass(frozen=True)
class Checkpoint:
    """A saved checkpoint: its weights file and (optional) training-state file."""

    weights: Path
    state: Path

    @classmethod
    def from_weights(cls, weights: Path) -> Checkpoint:
        """The checkpoint whose weights file is `weights` (its state file sits beside it)."""
        name = weights.name.removesuffix(WEIGHTS_SUFFIX)
        return cls(weights, weights.with_name(name + STATE_SUFFIX))

    @property
    def name(self) -> str:
        """E.g. "step-00001000"."""
        return self.weights.name.removesuffix(WEIGHTS_SUFFIX)

    @property
    def is_step(self) -> bool:
        """Whether its name is a training step's (step-N)."""
        return _STEP_NAME.fullmatch(self.name) is not None

    @property
    def step(self) -> int:
        """The training step in the name; MtError for files not named step-N."""
        match = _STEP_NAME.fullmatch(self.name)
        if match is None:
            raise MtError(f"{self.weights}: not a step checkpoint (expected step-NNNNNNNN)")
        return int(match.group(1))

    @property
    def run_dir(self) -> Path:
        """The run directory holding the checkpoints directory."""
        return self.weights.parent.parent


def checkpoint_dir(run_dir: Path) -> Path:
    """Where a run's checkpoints live."""
    return Path(run_dir) / CHECKPOINT_DIR


def step_name(step: int) -> str:
    """The checkpoint name for a step, zero-padded so names sort like steps."""
    return f"step-{step:08d}"


# --- atomic writes -------------------------------------------------------------------------


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Run `write(temp)` on a temp file beside `path`, then rename it to `path` (mt.files)."""
    with _own_temp(path) as temp:
        write(temp)


@contextlib.contextmanager
def _own_temp(path: Path) -> Iterator[Path]:
    """mt.files.atomic_path, its temp listed as this process's while it exists."""
    with atomic_path(path) as temp:
        _OWN_TEMPS.add(temp.absolute())
        yield temp
    _OWN_TEMPS.discard(temp.absolute())  # renamed into place (a failure leaves it listed)


def _write_text(path: Path, text: str) -> None:
    """Atomically replace a small text file."""
    _atomic_write(path, lambda temp: temp.write_bytes(text.encode("utf-8")))


# --- weights --------------------------------------------------------------------------------


def _dedupe(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Tensors safetensors can store: exact aliases kept once, overlapping views cloned."""
    views: set[tuple[Any, ...]] = set()
    storages: set[tuple[Any, ...]] = set()
    out: dict[str, Tensor] = {}
    for name in sorted(tensors):  # sorted: the alias kept is the same one save_model keeps
        tensor = tensors[name].detach()
        if tensor.numel() == 0:  # empty tensors have no storage to share
            out[name] = tensor.cpu()
            continue
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        view = (*storage, tensor.storage_offset(), tensor.dtype, tensor.shape, tensor.stride())
        if view in views:
            continue  # a tied weight: the loader restores it through the model's own tie
        if storage in storages:
            tensor = tensor.clone()  # shares memory without being identical: store a copy
        views.add(view)
        storages.add(storage)
        out[name] = tensor.contiguous().cpu()
    return out


def _digest(tensors: dict[str, Tensor]) -> str:
    """xxh3-128 of the tensors' names, dtypes, shapes and bytes, in name order."""
    # xxh3, not SHA-256: it detects corruption as well and costs a small part of a save.
    hasher = xxhash.xxh3_128()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        hasher.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}\n".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return hasher.hexdigest()


def _write_flat(path: Path, flat: dict[str, Tensor], metadata: dict[str, str], digest: str) -> None:
    """Atomically write deduplicated tensors, their metadata and their digest as safetensors."""
    _atomic_write(Path(path), lambda temp: _save_flat(temp, flat, metadata, digest))


def _save_flat(path: Path, flat: dict[str, Tensor], metadata: dict[str, str], digest: str) -> None:
    """Write deduplicated tensors, their metadata and their digest to `path` as safetensors."""
    header = {"format": "pt", **{key: str(value) for key, value in metadata.items()}}
    header[DIGEST_KEY] = digest  # always this file's own: copied metadata may carry another
    save_file(flat, str(path), metadata=header)


def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Atomically write tensors (tied ones stored once) and metadata, with their digest."""
    flat = _dedupe(tensors)
    _write_flat(path, flat, metadata, _digest(flat))


def save_weights(
    path: Path, model: nn.Module | dict[str, Tensor], metadata: dict[str, str]
) -> None:
    """Atomically write a model's weights (unwrap DDP/compile first) as safetensors."""
    tensors = model.state_dict() if isinstance(model, nn.Module) else model
    save_tensors(path, tensors, metadata)


def _reason(exc: BaseException) -> str:
    """A short one-line reason from a library exception (torch's can span many lines)."""
    text = str(exc)
    refused = _REFUSED_GLOBAL.search(text)
    if refused:  # what a pickle payload would have called, e.g. posix.system
        return f"unsupported global: {refused.group(1)}"
    if "Weights only load failed" in text:  # torch's boilerplate; its reason is the last paragraph
        text = text.split("Check the documentation")[0].strip().split("\n\n")[-1]
    text = " ".join(text.split())
    if not text:
        return type(exc).__name__
    return text if len(text) <= 120 else text[:119] + "…"


@contextlib.contextmanager
def _read_errors(path: Path) -> Iterator[None]:
    """Turn an OSError while reading `path` into ReadError, one line naming the file."""
    try:
        yield
    except OSError as exc:  # safetensors' (Rust) carry no strerror: "... (os error 5)"
        raise ReadError(f"{path}: cannot read ({exc.strerror or _reason(exc)})") from None


def _open_weights(path: Path) -> Any:
    """Open a safetensors file lazily; MtError if it is missing or not a safetensors file,
    ReadError if the OS fails to read it."""
    if not path.is_file():
        raise MtError(f"{path}: no such checkpoint file")
    with _read_errors(path):
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except OSError:
            raise  # not a fault of its bytes
        except Exception as exc:  # the safetensors parser only reads a JSON header: nothing runs
            raise MtError(f"{path}: not a valid mt checkpoint ({_reason(exc)})") from exc


def _header(path: Path) -> dict[str, str]:
    """All the metadata in a safetensors header, this module's own entries included."""
    with _open_weights(path) as handle:
        return dict(handle.metadata() or {})


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata in a safetensors header (not the per-file digest and state id)."""
    header = _header(Path(path))
    return {key: value for key, value in header.items() if key not in _INTERNAL_KEYS}


def _mismatch(path: Path, key: str, found: str | None, expected: str) -> str:
    """One line saying how a checkpoint's metadata entry differs from what the run expects."""
    if found is None:
        return f"{path}: checkpoint does not record {key} (the run expects {expected})"
    if key == "tokenizer_sha256":
        return (
            f"{path}: tokenizer differs from the run's "
            f"(checkpoint sha256 {found[:8]}…, run {expected[:8]}…)"
        )
    if key in _DESCRIPTIONS:
        return f"{path}: {_DESCRIPTIONS[key]} has {found} entries but the model expects {expected}"
    return f"{path}: {key} is {found!r} in the checkpoint but {expected!r} in the run"


def _check_metadata(path: Path, found: dict[str, str], expected: dict[str, str]) -> None:
    """MtError on the first expected metadata entry the file lacks or disagrees with."""
    for key, value in expected.items():
        if found.get(key) != str(value):
            raise MtError(_mismatch(path, key, found.get(key), str(value)))


def _aliases(state: dict[str, Tensor]) -> dict[str, list[str]]:
    """For each state-dict name, every name (itself included) that is the very same tensor."""
    groups: dict[tuple[Any, ...], list[str]] = collections.defaultdict(list)
    for name, tensor in state.items():
        key = (tensor.device, tensor.data_ptr(), tensor.dtype, tensor.shape, tensor.stride())
        groups[key if tensor.numel() else (name,)].append(name)  # empty: no storage to tie
    return {name: group for group in groups.values() for name in group}


def _plan_load(path: Path, handle: Any, model_state: dict[str, Tensor]) -> dict[str, str]:
    """Map each model tensor to the file tensor holding it; MtError on missing/extra/shape."""
    stored = set(handle.keys())
    aliases = _aliases(model_state)
    plan: dict[str, str] = {}
    for name, tensor in model_state.items():
        source = next((alias for alias in aliases[name] if alias in stored), None)
        if source is None:
            raise MtError(f"{path}: checkpoint lacks tensor {name}, which the model has")
        shape = list(handle.get_slice(source).get_shape())
        if shape != list(tensor.shape):
            raise MtError(
                f"{path}: tensor {name} has shape {shape} in the checkpoint "
                f"but {list(tensor.shape)} in the model"
            )
        plan[name] = source
    extra = sorted(stored - set(plan.values()))
    if extra:
        raise MtError(f"{path}: checkpoint has tensor {extra[0]}, which the model lacks")
    return plan


def _check_finite(path: Path, plan: dict[str, str], stored: dict[str, Tensor]) -> None:
    """MtError naming the first model tensor that holds an inf or a NaN."""
    for name, source in plan.items():
        if not bool(torch.isfinite(stored[source]).all()):
            raise MtError(
                f"{path}: tensor {name} holds non-finite values (inf/nan); the model diverged"
            )


def _check_digest(path: Path, header: dict[str, str], stored: dict[str, Tensor]) -> None:
    """MtError unless the stored tensors have the digest the header holds."""
    # Files written before digests were stored (or by other tools) have none to check.
    if DIGEST_KEY in header and _digest(stored) != header[DIGEST_KEY]:
        raise MtError(f"{path}: corrupt checkpoint (weights digest mismatch)")


def read_verified(path: Path) -> dict[str, Tensor]:
    """Every tensor of a weights file as stored (tied ones once), digest and values checked."""
    path = Path(path)
    with _open_weights(path) as handle:
        header = dict(handle.metadata() or {})
        stored = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    _check_digest(path, header, stored)
    _check_finite(path, {name: name for name in stored}, stored)
    return stored


def load_weights(
    path: Path,
    model: nn.Module,
    expected: dict[str, str] | None = None,
    allow_nonfinite: bool = False,
) -> None:
    """Load verified weights into `model`; `allow_nonfinite` only to inspect a diverged model."""
    path = Path(path)
    model_state = model.state_dict()
    with _open_weights(path) as handle:
        header = dict(handle.metadata() or {})
        _check_metadata(path, header, expected or {})
        plan = _plan_load(path, handle, model_state)
        stored = {source: handle.get_tensor(source) for source in set(plan.values())}
    _check_digest(path, header, stored)
    if not allow_nonfinite:
        _check_finite(path, plan, stored)
    # Copies into the existing parameters, so tied weights stay one tensor.
    model.load_state_dict({name: stored[source] for name, source in plan.items()}, strict=True)


# --- training state -------------------------------------------------------------------------

_PLAIN = (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device)
_CONTAINERS = (dict, collections.OrderedDict, list, tuple, set, torch.Size)


def _check_plain(value: Any, where: str = "state") -> None:
    """TypeError unless torch.load(weights_only=True) can read `value` back (caught at save)."""
    if isinstance(value, Tensor) or type(value) in _PLAIN:
        return
    if type(value) not in _CONTAINERS:
        raise TypeError(f"{where} is a {type(value).__name__}, which weights_only loading refuses")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(key, f"{where} key {key!r}")
            _check_plain(item, f"{where}[{key!r}]")
    else:
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")


def load_state(path: Path) -> dict[str, Any]:
    """A training state saved by save_checkpoint; never runs code stored in the file."""
    path = Path(path)
    if not path.is_file():
        raise MtError(f"{path}: no such training state file")
    try:
        with warnings.catch_warnings():  # a hostile file's protocol warning is noise here
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses any global it does not allow: nothing runs
        raise MtError(f"{path}: not a valid mt training state ({_reason(exc)})") from exc
    if not isinstance(state, dict):
        raise MtError(f"{path}: not a valid mt training state (a {type(state).__name__})")
    return state


# --- checkpoints ----------------------------------------------------------------------------


def _state_id(path: Path) -> str:
    """An id of a torch.save file, from its zip directory: cheap to read, new with each save.

    The directory lists every record with its CRC-32 and size (torch names the records after
    the temp file it wrote, and adds a serialization id), so two saves never share an id.
    """
    with zipfile.ZipFile(path) as archive:
        records = [f"{i.filename}:{i.CRC:08x}:{i.file_size}" for i in archive.infolist()]
    return hashlib.sha256("\n".join(records).encode()).hexdigest()[:32]


def _is_complete(ckpt: Checkpoint) -> bool:
    """Weights and state present, and the state is the one saved with those weights."""
    if not (ckpt.weights.is_file() and ckpt.state.is_file()):
        return False
    try:
        recorded = _header(ckpt.weights).get(STATE_KEY)
    except MtError:
        return True  # listed, so that loading it says what is wrong with the file
    if recorded is None:  # saved before states were named: trusted as before
        return True
    try:  # an OSError (a disk or network error) is raised: taken for debris, pruning deletes
        return _state_id(ckpt.state) == recorded
    except zipfile.BadZipFile:
        return False


def _state_damage(path: Path) -> str | None:
    """What is wrong with a state file's bytes (a record whose CRC-32 fails), or None;
    ReadError if the OS fails to read it (a disk or network error: the bytes may be whole)."""
    try:
        with _read_errors(path), zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError) as exc:
        return f"{path}: not a valid mt training state ({_reason(exc)})"
    return None if bad is None else f"{path}: damaged (its record {bad} fails its CRC check)"


def damage(ckpt: Checkpoint) -> str | None:
    """What is wrong with a complete checkpoint's bytes, or None: weights that do not match
    their digest, a state record that fails its CRC-32 (a disk or copy that changed them).
    ReadError where the OS fails to read them: that says nothing of the bytes."""
    try:
        read_verified(ckpt.weights)
    except ReadError:
        raise
    except MtError as exc:
        return str(exc)
    return _state_damage(ckpt.state)


def load_training_state(ckpt: Checkpoint) -> dict[str, Any]:
    """The training state saved with `ckpt`'s weights; MtError if it is another save's."""
    if ckpt.state.is_file() and not _is_complete(ckpt):
        raise MtError(
            f"{ckpt.state}: not the training state saved with {ckpt.weights.name} "
            "(a save was interrupted); resume from another checkpoint"
        )
    if ckpt.state.is_file() and (problem := _state_damage(ckpt.state)):
        raise MtError(f"{problem}; resume from another checkpoint")
    return load_state(ckpt.state)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    state: dict[str, Any],
    metadata: dict[str, str],
    resume_point: bool = False,
    origin: str = "",
    job: str = "",
) -> Checkpoint:
    """Atomically write the state, then the weights (naming that state), of checkpoint `step`.

    A `resume_point` (a signal's checkpoint, between validations) is kept only until a later
    checkpoint is saved, and is never one of the last checkpoints averaged: a run stopped and
    resumed keeps and averages the checkpoints an uninterrupted one does. `origin` names the
    run's own checkpoint that its `--resume` named, if any, and `job` that run's scheduler job and
    `--resume` (latest_descendant).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    _check_plain(state)  # fail now, not when a resume finds the state unreadable
    directory = checkpoint_dir(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpoint.from_weights(directory / (step_name(step) + WEIGHTS_SUFFIX))
    # Saving again the step `best` names (after resuming an older checkpoint): its pair is
    # incomplete between the two renames, so `best` names another complete one meanwhile.
    stand_in = _stand_in(directory, ckpt)
    if stand_in is not None:
        set_best(run_dir, stand_in)
    flat = _dedupe(model.state_dict())
    header = {"step": str(step), **metadata}
    if resume_point:
        header[RESUME_KEY] = "true"
    if origin:
        header[ORIGIN_KEY] = origin
        if job:
            header[JOB_KEY] = job
    # Both files are written whole and synced before either replaces its namesake: a step saved
    # again (a resume point validated, a run gone back) is broken only between the two renames,
    # not while the weights are written (a kill, a full disk). The weights' rename comes last:
    # it marks the pair complete.
    with ThreadPoolExecutor(max_workers=1) as pool, _own_temp(ckpt.weights) as weights_temp:
        # xxhash releases the GIL: the weights are hashed while the state is written and synced.
        digest = pool.submit(_digest, flat)
        with _own_temp(ckpt.state) as state_temp:
            torch.save(state, state_temp)
            fsync(state_temp)
            header[STATE_KEY] = _state_id(state_temp)
            with write_errors(ckpt.weights, weights_temp):  # named as the weights' failure
                _save_flat(weights_temp, flat, header, digest.result())
                fsync(weights_temp)
    if stand_in is not None:
        set_best(run_dir, ckpt)
    return ckpt


def _stand_in(directory: Path, ckpt: Checkpoint) -> Checkpoint | None:
    """While `ckpt`, which `best` names, is saved again: the checkpoint `best` names instead."""
    best = _best_or_none(directory)
    if best is None or best.name != ckpt.name:
        return None
    others = [other for other in _complete_in(directory) if other.name != ckpt.name]
    return others[-1] if others else None  # with none, `best` keeps naming whole weights


def save_crash(run_dir: Path, step: int, model: nn.Module) -> Path:
    """Weights for post-mortem only (never listed or resumed): checkpoints/crash-step-N."""
    directory = checkpoint_dir(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"crash-{step_name(step)}{WEIGHTS_SUFFIX}"
    save_weights(path, model, {"step": str(step), "crash": "non-finite loss or gradient"})
    return path


def _complete_in(directory: Path) -> list[Checkpoint]:
    """Complete step checkpoints in a checkpoints directory, oldest first."""
    found = []
    for weights in directory.glob("step-*" + WEIGHTS_SUFFIX):
        ckpt = Checkpoint.from_weights(weights)
        if ckpt.is_step and _is_complete(ckpt):
            found.append(ckpt)
    return sorted(found, key=lambda ckpt: ckpt.step)


def _weights_in(directory: Path) -> list[Checkpoint]:
    """Step checkpoints with weights, with or without their training state, oldest first.

    Weights alone are enough to decode or average: runs are often shipped without the states.
    """
    found = (Checkpoint.from_weights(w) for w in directory.glob("step-*" + WEIGHTS_SUFFIX))
    return sorted((c for c in found if c.is_step), key=lambda ckpt: ckpt.step)


def latest_descendant(run_dir: Path, origin: Checkpoint, job: str = "") -> Checkpoint | None:
    """Where a job that went back to one of the run's checkpoints got to before its scheduler
    restarted it: the latest complete checkpoint that a run gone back saved under `job` (its
    scheduler job and `--resume`, whatever that names now: a run directory's best moves), or
    without a job, the latest after `origin` saved by runs that `--resume origin` began. None
    if there is none."""

    def went_on(header: dict[str, str]) -> bool:
        if job:
            return header.get(JOB_KEY) == job and ORIGIN_KEY in header
        return header.get(ORIGIN_KEY) == origin.name

    later = [c for c in list_checkpoints(run_dir) if job or c.step > origin.step]
    for ckpt in reversed(later):
        try:
            if went_on(_header(ckpt.weights)):
                return ckpt
        except MtError:  # unreadable: not one to resume from
            continue
    return None


def is_resume_point(ckpt: Checkpoint) -> bool:
    """Whether `ckpt` was saved as a resume point (see save_checkpoint)."""
    try:
        return _header(ckpt.weights).get(RESUME_KEY) == "true"
    except MtError:
        return False  # listed as any other, so that loading it says what is wrong


def averaged_steps(path: Path) -> list[int]:
    """The steps of the checkpoints an average was made of (its header's `averaged` names)."""
    names = read_metadata(path).get("averaged", "").split(",")
    return [int(match.group(1)) for name in names if (match := _STEP_NAME.fullmatch(name))]


def weights_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """A run's step checkpoints that have weights (see _weights_in), oldest first."""
    return _weights_in(checkpoint_dir(run_dir))


def list_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """Complete step checkpoints (weights and the state saved with them), oldest first."""
    return _complete_in(checkpoint_dir(run_dir))


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The complete checkpoint with the highest step, or None."""
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def set_best(run_dir: Path, ckpt: Checkpoint) -> None:
    """Atomically point `checkpoints/best` at `ckpt`."""
    directory = checkpoint_dir(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    _write_text(directory / BEST_FILE, ckpt.name + "\n")


def _follow_pointer(pointer: Path) -> Checkpoint:
    """The checkpoint a `best` pointer file names; MtError if it names nothing valid."""
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise MtError(f"{pointer}: not a checkpoint name (not UTF-8 text)") from None
    # A bare name only: a pointer must not lead outside its checkpoints directory.
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise MtError(f"{pointer}: not a checkpoint name: {name!r}")
    ckpt = Checkpoint.from_weights(pointer.parent / (name + WEIGHTS_SUFFIX))
    if not ckpt.weights.is_file():
        raise MtError(f"{pointer}: points to {name}, which does not exist")
    return ckpt


def _best_in(directory: Path) -> Checkpoint | None:
    """The checkpoint a checkpoints directory's `best` pointer names, or None without one."""
    pointer = directory / BEST_FILE
    return _follow_pointer(pointer) if pointer.is_file() else None


def _best_or_none(directory: Path) -> Checkpoint | None:
    """What `best` names, or None without a pointer or with one that names nothing valid."""
    try:
        return _best_in(directory)
    except MtError:
        return None


def best_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The checkpoint `checkpoints/best` points to, or None without a pointer."""
    return _best_in(checkpoint_dir(run_dir))


def best_step(run_dir: Path) -> int | None:
    """The step of the checkpoint `best` names, or None without a pointer that names one."""
    best = _best_or_none(checkpoint_dir(run_dir))
    return best.step if best is not None and best.is_step else None


def prune_checkpoints(run_dir: Path, keep_last: int, saved: int | None = None) -> list[Path]:
    """Delete step checkpoints older than the last `keep_last` (never the best), resume points
    of steps before `saved` (the step just saved; default: the latest), and crash debris.
    Neither resume points nor checkpoints after `saved` (a run gone back with --resume) are
    counted among the last; those after `saved` stay."""
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0, got {keep_last}")
    directory = checkpoint_dir(run_dir)
    best = _best_or_none(directory)  # a dangling pointer protects nothing (repair_checkpoints)
    complete = list_checkpoints(run_dir)
    newest = saved if saved is not None else complete[-1].step if complete else 0
    kept = [c for c in complete if not is_resume_point(c) and c.step <= newest]
    superseded = [c for c in complete if is_resume_point(c) and c.step < newest]
    doomed = superseded + kept[: max(len(kept) - keep_last, 0)]
    deleted: list[Path] = []
    for ckpt in doomed:
        if best is not None and ckpt.name == best.name:
            continue
        for path in (ckpt.weights, ckpt.state):  # weights first: it marks the checkpoint whole
            path.unlink(missing_ok=True)
            deleted.append(path)
    return deleted + _remove_debris(directory, {c.name for c in complete}, best)


def _remove_debris(directory: Path, complete: set[str], best: Checkpoint | None) -> list[Path]:
    """Delete what interrupted saves leave: unpaired states and this process's temp files."""
    deleted = []
    for state in sorted(directory.glob("step-*" + STATE_SUFFIX)):
        ckpt = Checkpoint.from_weights(_weights_of(state))
        if ckpt.name in complete or (best is not None and ckpt.name == best.name):
            continue
        # A state without weights, or weights saved with another state (a kill between
        # the two renames of a step saved again): neither can be resumed from.
        for path in (ckpt.weights, ckpt.state):
            if path.exists():
                path.unlink()
                deleted.append(path)
    # Only this process's temps: another process may be writing its own here right now.
    for temp in sorted(t for t in _OWN_TEMPS if t.parent == directory.absolute()):
        if temp.exists():
            temp.unlink()
            deleted.append(temp)
        _OWN_TEMPS.discard(temp)
    return deleted


def repair_checkpoints(run_dir: Path, scores: dict[int, float] | None = None) -> None:
    """At the start of training, holding the run lock: clear a killed trainer's debris.

    Removes the temp files of step checkpoints, `best` and crash dumps (only a trainer writes
    those, and the lock says none other is alive), sets damaged latest checkpoints aside, and
    points a dangling `best` at the complete checkpoint with the best of `scores` (the dev BLEU
    that picks the best, by step), else at the latest complete one, with a warning.
    """
    directory = checkpoint_dir(run_dir)
    for pattern in _TRAINER_TEMPS:
        for temp in directory.glob(pattern):
            temp.unlink(missing_ok=True)
    _warn_unresumable(run_dir)
    _set_aside_damaged(run_dir)
    try:
        _best_in(directory)
    except MtError as exc:
        _repoint_best(run_dir, str(exc), scores or {})


def _repoint_best(run_dir: Path, problem: str, scores: dict[int, float]) -> None:
    """Point a `best` that names nothing valid (`problem`) at the complete checkpoint with the
    best of `scores`, else at the latest (a run without a dev set: its newest is its best), or
    remove it if none is left; a warning says which."""
    complete = list_checkpoints(run_dir)
    scored = [c for c in complete if c.step in scores]
    if scored:
        best = max(scored, key=lambda c: scores[c.step])  # in step order: the earliest of equals
        set_best(run_dir, best)
        log.warning(
            f"{problem}; pointed it at the best-scoring checkpoint left, {best.name} "
            f"(dev BLEU {scores[best.step]:.2f})"
        )
    elif complete:
        set_best(run_dir, complete[-1])
        log.warning(
            f"{problem}; pointed it at the latest complete checkpoint, {complete[-1].name} "
            "(none left has a dev score)"
        )
    else:
        (checkpoint_dir(run_dir) / BEST_FILE).unlink()
        log.warning("%s; removed it (no complete checkpoint is left)", problem)


def _set_aside_damaged(run_dir: Path) -> None:
    """Rename damaged latest checkpoints to damaged-step-N (kept for a look, never listed),
    with a warning: training goes on from the latest whole one, not from bad bytes. MtError
    when none is whole (a run would start over, and its metrics with it)."""
    damaged: list[tuple[Checkpoint, str]] = []
    whole = None
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            problem = damage(ckpt)
        except ReadError as exc:  # a whole checkpoint set aside would be lost to the run
            raise MtError(
                f"{exc}; no checkpoint was set aside: run again once the file system reads it"
            ) from None
        if problem is None:
            whole = ckpt
            break
        damaged.append((ckpt, problem))
    if damaged and whole is None:
        raise MtError(
            f"{damaged[0][1]}; no checkpoint of {run_dir} is whole: restore them from a copy, "
            f"or delete {checkpoint_dir(run_dir)} to train from the start"
        )
    for ckpt, problem in damaged:
        aside = _free_name(ckpt.weights.with_name("damaged-" + ckpt.name))
        for path in (ckpt.weights, ckpt.state):  # weights first: they mark it complete
            path.rename(path.with_name(aside.name + path.name.removeprefix(ckpt.name)))
        log.warning(f"{problem}; renamed it {aside.name}, training goes on from {whole.name}")


def _free_name(base: Path) -> Path:
    """`base`, or `base.2`, `base.3`... : the first name no file of the checkpoint has."""
    name, n = base, 1
    while any(name.with_name(name.name + s).exists() for s in (WEIGHTS_SUFFIX, STATE_SUFFIX)):
        n += 1
        name = base.with_name(f"{base.name}.{n}")
    return name


def _warn_unresumable(run_dir: Path) -> None:
    """Warn of step weights newer than the latest complete checkpoint: training skips them."""
    latest = latest_checkpoint(run_dir)
    since = "the start" if latest is None else latest.name
    for weights in sorted(checkpoint_dir(run_dir).glob("step-*" + WEIGHTS_SUFFIX)):
        ckpt = Checkpoint.from_weights(weights)
        if ckpt.is_step and (latest is None or ckpt.step > latest.step) and not _is_complete(ckpt):
            log.warning(
                "%s: its training state %s is missing or not the one saved with it (an "
                "interrupted save, or a damaged file); training goes on from %s",
                weights,
                ckpt.state.name,
                since,
            )


def _weights_of(state: Path) -> Path:
    """The weights file beside a state file."""
    return state.with_name(state.name.removesuffix(STATE_SUFFIX) + WEIGHTS_SUFFIX)


def _preferred_in(directory: Path) -> Checkpoint | None:
    """A checkpoints directory's best checkpoint, else its latest weights, to decode with.

    A `best` that names nothing valid (an older version's kill, a manual deletion) gives way
    to the latest weights, with a warning.
    """
    try:
        best = _best_in(directory)
    except MtError as exc:
        found = _weights_in(directory)
        if not found:
            raise
        log.warning("%s; using the latest checkpoint, %s", exc, found[-1].name)
        return found[-1]
    if best is not None:
        return best
    found = _weights_in(directory)
    return found[-1] if found else None


def resolve_checkpoint(path: Path) -> Checkpoint:
    """A checkpoint from a run dir (best, else latest), checkpoints dir, file or name."""
    path = Path(path)
    found: Checkpoint | None = None
    if path.is_dir():
        if (path / CHECKPOINT_DIR).is_dir():
            found = _preferred_in(path / CHECKPOINT_DIR)
        else:  # a checkpoints directory, or any directory holding step checkpoints
            found = _preferred_in(path)
    elif path.is_file() and path.name.endswith(WEIGHTS_SUFFIX):
        found = Checkpoint.from_weights(path)
    elif path.is_file() and path.name.endswith(STATE_SUFFIX) and _weights_of(path).is_file():
        found = Checkpoint.from_weights(_weights_of(path))
    elif path.is_file() and path.name == BEST_FILE:
        found = _follow_pointer(path)
    elif path.with_name(path.name + WEIGHTS_SUFFIX).is_file():  # a name: .../step-00001000
        found = Checkpoint.from_weights(path.with_name(path.name + WEIGHTS_SUFFIX))
    if found is None:
        raise MtError(
            f"{path}: no checkpoint found "
            "(expected a run directory, a checkpoints directory or a .safetensors file)"
        )
    return found
