"""`mt export`: a trained model as a CTranslate2 model or a Hugging Face `MarianMTModel`.

Both exports compute mt's function (teacher-forced log-probabilities equal to ~1e-6); what can
differ is the search around it. mt's specifics, which each format reproduces:

- Embeddings are scaled by sqrt(D); the output projection is the target embedding, no bias.
- Positions: mt's table has sin on even and cos on odd dims (`ct2.py` stores it, `hf.py`
  permutes the residual dimensions to Marian's own table).
- The key projection has no bias: the exports give it zeros.
- Ids pad 0, unk 1, bos 2, eos 3: the decoder starts from BOS, sources end with EOS.

One file per job: `ct2.py` converts to CTranslate2, `ct2_search.py` translates with the result
as mt would, `hf.py` converts to Marian, `readme.py` writes the README beside each export.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from mt.checkpoint import Checkpoint
from mt.config import CONFIG_FILE
from mt.errors import MtError
from mt.export.ct2 import check_quantization, import_ctranslate2, save_ct2
from mt.export.hf import import_transformers, marian_obstacle, save_marian
from mt.export.readme import ct2_readme, hf_readme
from mt.files import atomic_directory
from mt.rundir import TOKENIZER_DIR, load_trained, model_checkpoint

log = logging.getLogger("mt")

FORMATS = ("ct2", "hf")


def check_output(out: Path, force: bool, weights: Path) -> None:
    """MtError if OUT cannot take the export: a file, non-empty without --force, the run, the
    working directory, or under something that is not a directory."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MtError(f"{out}: exists and is not a directory")
    parent = Path(os.path.realpath(out)).parent
    if parent.exists() and not parent.is_dir():
        raise MtError(f"{out}: {parent} is not a directory")
    if Path.cwd().resolve().is_relative_to(Path(os.path.realpath(out))):
        raise MtError(f"{out}: the working directory (or above it); name a directory to create")
    if out.is_dir() and weights.resolve().is_relative_to(out.resolve()):
        raise MtError(f"{out}: holds the checkpoint being exported; choose another directory")
    run = Checkpoint.from_weights(weights).run_dir
    needed = [run / CONFIG_FILE, run / TOKENIZER_DIR, run / "checkpoints"]  # --force replaces OUT
    if out.is_dir() and any(p.resolve().is_relative_to(out.resolve()) for p in needed):
        raise MtError(f"{out}: holds files of the run being exported; choose another directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise MtError(f"{out}: exists and is not empty; use --force to replace it")


def _utf8(path: Path) -> bool:
    """Whether the path's bytes are UTF-8 (a name from the file system need not be)."""
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def check_format(fmt: str, quantization: str | None) -> None:
    """MtError for an unknown format, a misplaced --quantization or a missing library."""
    if fmt not in FORMATS:
        raise MtError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if fmt == "ct2":
        import_ctranslate2()  # before the model loads
        check_quantization(quantization)
        return
    if quantization is not None:
        raise MtError("--quantization applies to --format ct2 only")
    import_transformers()


def export_model(
    run: Path,
    out: Path,
    fmt: str,
    quantization: str | None = None,
    force: bool = False,
) -> Path:
    """`mt export`: a run's model (see model_checkpoint) or a checkpoint to OUT, atomically."""
    check_format(fmt, quantization)
    check_output(out, force, model_checkpoint(Path(run)).weights)  # before loading anything
    config, tokenizer, model, checkpoint = load_trained(Path(run), torch.device("cpu"))
    if fmt == "hf" and (reason := marian_obstacle(model)) is not None:
        raise MtError(f"mt export --format hf: {reason}; use --format ct2")
    if fmt == "hf" and not _utf8(Path(os.path.realpath(out))):
        # transformers hands SentencePiece file names, which it takes in UTF-8 only.
        raise MtError(f"{out}: the Hugging Face export needs a directory whose path is UTF-8")
    with atomic_directory(Path(out), replace=force) as temp:
        if fmt == "ct2":
            save_ct2(model, tokenizer, temp, quantization)
            for path in tokenizer.paths:  # the SentencePiece model(s), under mt's names
                shutil.copyfile(path, temp / path.name)
            readme = ct2_readme(config, tokenizer, checkpoint.weights, quantization)
        else:
            save_marian(model, tokenizer, config, temp)
            readme = hf_readme(config, tokenizer, checkpoint.weights)
        (temp / "README.md").write_text(readme, encoding="utf-8")
    log.info("exported %s to %s (%s)", checkpoint.weights, out, fmt)
    return Path(out)
