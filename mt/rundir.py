"""A run directory: where a run keeps its config, tokenizer, caches and checkpoints.

Everything a run writes lives under `config.run_dir`; this module alone knows that layout, so
later commands need only the run directory: they open its corpora, its tokenizer and the
trained model it holds from here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from mt.batching import describe_epoch
from mt.checkpoint import Checkpoint, load_weights, resolve_checkpoint
from mt.config import CONFIG_FILE, Config, load_config
from mt.corpora import Corpus, open_corpus
from mt.data import EncodedCorpus, encode_corpus
from mt.errors import ConfigError, DataError
from mt.model import Transformer
from mt.tokenizer import (
    Tokenizer,
    describe_unk_rate,
    load_tokenizer,
    tokenizer_files,
    train_tokenizer,
)

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


def open_run(config: Config, splits: Sequence[str]) -> dict[str, Corpus]:
    """The corpora among `splits` that the config sets, and the run directory, checked early.

    Each corpus must exist (DataError naming its key) and the directory must be creatable,
    before any slow work starts.
    """
    corpora = {}
    for which in splits:
        if getattr(config.data, which):
            try:
                corpora[which] = open_split(config, which)
            except DataError as exc:
                raise DataError(f"data.{which}: {exc}") from None
    try:
        run_path(config).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or exc
        raise DataError(f"run_dir {config.run_dir}: cannot create ({reason})") from None
    return corpora


def prepare_tokenizer(config: Config) -> Tokenizer:
    """The run's tokenizer: loaded if the run has one, otherwise trained on the training data."""
    directory = run_path(config) / TOKENIZER_DIR
    wanted = config.tokenizer
    if all(p.exists() for p in tokenizer_files(directory, wanted.joint)):
        tokenizer = load_tokenizer(directory)
        size = tokenizer.src_vocab_size
        log.info("using the run's tokenizer in %s (%d pieces)", directory, size)
        if wanted.vocab_size not in (size, tokenizer.tgt_vocab_size):
            log.warning(
                "warning: the run's tokenizer has %d pieces, not tokenizer.vocab_size=%d; "
                "delete %s to retrain it",
                size,
                wanted.vocab_size,
                directory,
            )
        return tokenizer
    log.info(
        "training a %s tokenizer (%d pieces, joint=%s)",
        wanted.type,
        wanted.vocab_size,
        wanted.joint,
    )
    return train_tokenizer(open_split(config, "train"), directory, wanted, config.train.seed)


def find_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer of a run directory, of a tokenizer directory or beside a model file."""
    if not path.exists():
        raise DataError(f"{path}: no such run or tokenizer directory")
    directory = path.parent if path.is_file() else path
    if (directory / TOKENIZER_DIR).is_dir() or (directory / CONFIG_FILE).is_file():
        directory = directory / TOKENIZER_DIR
    return load_tokenizer(directory)


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


def prepare_data(config: Config, tokenizer: Tokenizer, corpora: dict[str, Corpus]) -> Iterator[str]:
    """Encode and cache each corpus (or find it cached), yielding its statistics as lines."""
    for which, corpus in corpora.items():
        data = encode_split(config, tokenizer, which)
        yield f"{which}: {data.stats.describe()}"
        yield f"{which}: {data.describe_tokens()}"
        if which == "train":
            train = config.train  # max_tokens >= data.max_len + 1: checked at config load
            yield f"train: {describe_epoch(data, train.max_tokens, train.seed)}"
        if which == "valid":
            yield f"valid: {describe_unk_rate(tokenizer, corpus)}"


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
