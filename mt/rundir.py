"""A run directory: where a run keeps its config, tokenizer, caches and checkpoints.

Everything a run writes lives under `config.run_dir`; this module alone knows that layout, so
later commands need only the run directory: they open its corpora, its tokenizer and the
trained model it holds from here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mt.checkpoint import Checkpoint, load_weights, resolve_checkpoint
from mt.config import CONFIG_FILE, Config, load_config
from mt.corpora import Corpus, open_corpus
from mt.data import EncodedCorpus, encode_corpus
from mt.errors import ConfigError
from mt.model import Transformer
from mt.tokenizer import Tokenizer, load_tokenizer, tokenizer_files, train_tokenizer

log = logging.getLogger("mt")

TOKENIZER_DIR = "tokenizer"
SPLITS = {"train": "train", "valid": "validation", "test": "test"}  # config key -> HF split


def run_path(config: Config) -> Path:
    """The run directory."""
    return Path(config.run_dir)


def load_run_config(run_dir: str | Path) -> Config:
    """The resolved config saved in a run directory."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise ConfigError(f"{run_dir}: not a run directory (no {CONFIG_FILE})")
    return load_config(path)


def open_split(config: Config, which: str) -> Corpus:
    """The `train`, `valid` or `test` corpus named in the config."""
    spec = getattr(config.data, which)
    if not spec:
        raise ConfigError(f"data.{which} is empty: set it in the config or as data.{which}=...")
    return open_corpus(spec, config.data.src_lang, config.data.tgt_lang, split=SPLITS[which])


def prepare_tokenizer(config: Config) -> Tokenizer:
    """The run's tokenizer: loaded if the run has one, otherwise trained on the training data."""
    directory = run_path(config) / TOKENIZER_DIR
    if all(p.exists() for p in tokenizer_files(directory, config.tokenizer.joint)):
        return load_tokenizer(directory)
    t = config.tokenizer
    log.info("training a %s tokenizer (%d pieces, joint=%s)", t.type, t.vocab_size, t.joint)
    return train_tokenizer(
        open_split(config, "train"),
        directory,
        vocab_size=t.vocab_size,
        model_type=t.type,
        joint=t.joint,
        character_coverage=t.character_coverage,
        byte_fallback=t.byte_fallback,
        input_sentence_size=t.input_sentence_size,
        seed=config.train.seed,
    )


def cache_dir(config: Config) -> Path:
    """Where encoded corpora are cached."""
    return Path(config.data.cache_dir) if config.data.cache_dir else run_path(config) / "cache"


def encode_split(config: Config, tokenizer: Tokenizer, which: str) -> EncodedCorpus:
    """The encoded (and, for training data only, filtered) corpus, from the cache when possible."""
    return encode_corpus(
        open_split(config, which),
        tokenizer,
        cache_dir(config),
        filter=which == "train",
        max_len=config.data.max_len,
        max_ratio=config.data.max_ratio,
        num_proc=config.data.num_proc,
    )


def checkpoint_metadata(tokenizer: Tokenizer) -> dict[str, str]:
    """What a checkpoint must agree on with the run that loads it."""
    return {
        "tokenizer_sha256": tokenizer.fingerprint(),
        "src_vocab": str(tokenizer.src_vocab_size),
        "tgt_vocab": str(tokenizer.tgt_vocab_size),
    }


def load_trained(
    path: Path, device: torch.device
) -> tuple[Config, Tokenizer, Transformer, Checkpoint]:
    """A trained model in eval mode, from a run dir, a checkpoints dir or a .safetensors file.

    The config and tokenizer come from the run directory holding the checkpoints directory, so
    an averaged checkpoint (a weights file without a training state) loads like any other.
    """
    checkpoint = resolve_checkpoint(Path(path))
    run_dir = checkpoint.run_dir
    config = load_run_config(run_dir)
    tokenizer = load_tokenizer(run_dir / TOKENIZER_DIR)
    model = Transformer(config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    # Weights only: the training state (optimizer etc.) is never needed to translate.
    load_weights(checkpoint.weights, model, expected=checkpoint_metadata(tokenizer))
    model.to(device).eval()
    return config, tokenizer, model, checkpoint
