"""A run directory: where a run keeps its config, tokenizer, caches and checkpoints.

Everything a run writes lives under `config.run_dir`; this module alone knows that layout, so
later commands need only the run directory: they open its corpora, its tokenizer and the
trained model it holds from here.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mt.batching import BatchSampler, MixtureSampler, describe_epoch
from mt.checkpoint import (
    AVERAGE_NAME,
    CHECKPOINT_DIR,
    Checkpoint,
    averaged_steps,
    checkpoint_dir,
    load_weights,
    resolve_checkpoint,
    weights_checkpoints,
)
from mt.config import (
    CONFIG_FILE,
    Config,
    TokenizerConfig,
    load_config,
    written_by_mt,
)
from mt.corpora import Corpus, open_corpus
from mt.errors import ConfigError, DataError, MtError
from mt.files import atomic_write_bytes
from mt.metrics import TENSORBOARD_DIR
from mt.model import Transformer
from mt.tokenizer import (
    JOINT_FILE,
    SRC_FILE,
    TGT_FILE,
    Tokenizer,
    describe_unk_rate,
    load_model_file,
    load_tokenizer,
    tokenizer_files,
    train_multilingual_tokenizer,
    train_tokenizer,
)

if TYPE_CHECKING:
    from mt.data import CorpusMix, EncodedCorpus

log = logging.getLogger("mt")

TOKENIZER_DIR = "tokenizer"
TRAINED_ON = "trained_on.json"  # in TOKENIZER_DIR: the training data `mt train` trained it on
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


def check_config_file(path: Path, config: Config) -> None:
    """ConfigError if `path` is the run's config.yaml but not as mt wrote it.

    `mt train` rewrites that file with the resolved config (overrides included, comments
    gone), so a hand-written config must live elsewhere.
    """
    own = run_path(config) / CONFIG_FILE
    if not own.is_file() or own.resolve() != Path(path).resolve():
        return
    if not written_by_mt(own.read_text(encoding="utf-8"), load_config(path)):
        raise ConfigError(
            f"{path}: the run's own {CONFIG_FILE}, which mt train rewrites with the resolved "
            f"config; keep yours outside {config.run_dir} (e.g. in configs/)"
        )


def open_split(config: Config, which: str) -> Corpus:
    """The `train`, `valid` or `test` corpus of a run with one direction."""
    (direction, *others) = config.data.directions()
    if others:
        names = ", ".join(config.data.direction_names())
        raise ConfigError(f"the run has several directions ({names}): name one")
    spec = getattr(direction, which)
    if not spec:
        raise ConfigError(f"data.{which} is empty: set it in the config or as data.{which}=...")
    return open_corpus(spec, direction.src_lang, direction.tgt_lang, split=SPLITS[which])


def corpus_key(config: Config, which: str, index: int = 0) -> str:
    """The config key that names direction `index`'s `which` corpus, for errors about it:
    data.<which>, data.corpora[i].<which>, or data.<which> for data.corpora[i]."""
    key = f"data.{which}"
    if config.data.corpora:
        own = getattr(config.data.corpora[index], which)
        key = f"data.corpora[{index}].{which}" if own else f"{key} for data.corpora[{index}]"
    return key


def open_directions(
    config: Config, which: str, tsv_readers: dict[Path, str] | None = None
) -> dict[str, Corpus]:
    """The `which` corpus of every direction that has one, by direction (e.g. ``de-en``).

    A missing corpus is a DataError naming its key: data.<which> (for data.corpora[i]), or
    data.corpora[i].<which>.
    So is a .tsv file read by two directions (its columns are one direction's), however its
    path is spelled, here or in the splits opened before with the same `tsv_readers`.
    """
    corpora: dict[str, Corpus] = {}
    tsv_direction = {} if tsv_readers is None else tsv_readers  # a .tsv file -> its direction
    for i, direction in enumerate(config.data.directions()):
        spec = getattr(direction, which)
        if not spec:
            continue
        key = corpus_key(config, which, i)
        name = direction.direction
        tsv = Path(spec).resolve() if spec.endswith((".tsv", ".tsv.gz")) else None
        if tsv is not None and tsv_direction.setdefault(tsv, name) != name:
            raise DataError(
                f"{key}: {spec}: a .tsv file holds one direction (source, tab, target), and "
                f"{tsv_direction[tsv]} reads this one: give {name} its own"
            )
        try:
            corpora[name] = open_corpus(
                spec, direction.src_lang, direction.tgt_lang, split=SPLITS[which]
            )
        except DataError as exc:
            raise DataError(f"{key}: {exc}") from None
    return corpora


def open_run(config: Config, splits: Sequence[str]) -> dict[str, dict[str, Corpus]]:
    """{split: {direction: corpus}} for the `splits` the config sets, and the run directory.

    Each corpus must exist (DataError naming its key), dev and test sets must read whole, and
    the run directory must take files (and the cache directory, unless it exists), before any
    slow work starts.
    """
    corpora = {}
    tsv_readers: dict[Path, str] = {}
    for which in splits:
        found = open_directions(config, which, tsv_readers)
        if found:
            corpora[which] = found
        if which != "train":  # small: read whole now, so that a bad line stops no long job late
            for direction, corpus in found.items():
                check_readable(corpus, split_label(config, which, direction))
    run = run_path(config)
    check_writable(run, "run_dir", create=True)
    for written in (checkpoint_dir(run), run / TENSORBOARD_DIR):  # a resumed run writes in these
        if written.exists():
            check_writable(written, "run_dir")
    cache = cache_dir(config)
    # An existing cache may be read-only (a shared, finished one) where the run has its
    # tokenizer: its complete entries are only read, and encoding checks that it takes files
    # once an entry must be built. A tokenizer still to train makes every entry new.
    if not (cache.is_dir() and has_tokenizer(config)):
        check_writable(cache, "data.cache_dir" if config.data.cache_dir else "run_dir")
    return corpora


def check_writable(directory: Path, key: str, create: bool = False) -> None:
    """DataError naming `key` unless `directory` (made now if `create`) takes new files; one
    not made yet must be possible to make: its nearest existing parent must take them."""
    if directory.exists() and not directory.is_dir():
        raise DataError(f"{key} {directory}: not a directory")
    try:
        if create:
            directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{key} {directory}: cannot create ({exc.strerror or exc})") from None
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    if not existing.is_dir():
        raise DataError(f"{key} {directory}: cannot create ({existing} is not a directory)")
    try:
        tempfile.TemporaryFile(dir=existing).close()  # a file made and removed: a probe
    except OSError as exc:
        reason = exc.strerror or exc
        raise DataError(f"{key} {directory}: cannot write files in {existing} ({reason})") from None


def check_readable(corpus: Corpus, label: str) -> None:
    """Read every pair of `corpus`: DataError, prefixed with its `label`, at the first bad one
    or if it has none."""
    try:
        # Read through, counting; the reader raises at a bad line.
        count = sum(1 for _ in corpus.pairs())
    except DataError as exc:
        raise DataError(f"{label}: {exc}") from None
    if count == 0:
        raise DataError(f"{label}: {corpus.describe()}: no sentence pairs")


def has_tokenizer(config: Config) -> bool:
    """Whether the run has a tokenizer of the kind its config asks for (else one is trained)."""
    directory = run_path(config) / TOKENIZER_DIR
    return all(p.exists() for p in tokenizer_files(directory, config.tokenizer.joint))


def prepare_tokenizer(config: Config) -> Tokenizer:
    """The run's tokenizer: loaded if the run has one, otherwise trained on the training data."""
    directory = run_path(config) / TOKENIZER_DIR
    wanted = config.tokenizer
    has = has_tokenizer(config)
    if not has and all(p.exists() for p in tokenizer_files(directory, not wanted.joint)):
        # Training one of the other kind would replace the one the run's checkpoints need.
        kind = "joint" if not wanted.joint else "one per side"
        raise ConfigError(
            f"tokenizer.joint={str(wanted.joint).lower()}: the run's tokenizer in {directory} is "
            f"{kind}; delete it to train another (the run's checkpoints need it)"
        )
    if has:
        tokenizer = load_tokenizer(directory)
        log.info("using the run's tokenizer in %s (%d pieces)", directory, tokenizer.src_vocab_size)
        for difference in [*retrain_hints(tokenizer, wanted), *other_data(config, directory)]:
            log.warning("warning: %s; delete %s to retrain it", difference, directory)
        check_tags(tokenizer, config, directory)
        return tokenizer
    log.info(
        "training a %s tokenizer (%d pieces, joint=%s)",
        wanted.type,
        wanted.vocab_size,
        wanted.joint,
    )
    seed = config.train.seed
    if len(config.data.directions()) == 1:
        tokenizer = train_tokenizer(open_split(config, "train"), directory, wanted, seed)
    else:
        corpora = list(open_directions(config, "train").values())
        temperature = config.data.temperature
        tokenizer = train_multilingual_tokenizer(corpora, directory, wanted, seed, temperature)
    record = json.dumps(training_data(config), indent=1, ensure_ascii=False) + "\n"
    atomic_write_bytes(directory / TRAINED_ON, record.encode())
    return tokenizer


def training_data(config: Config) -> dict[str, str]:
    """Each direction's training data as the config names it, local paths made absolute."""

    def spelled(spec: str) -> str:
        return spec if spec.startswith("hf:") else str(Path(spec).resolve())

    return {c.direction: spelled(c.train) for c in config.data.directions()}


def other_data(config: Config, directory: Path) -> list[str]:
    """How the data `mt train` trained the tokenizer in `directory` on differs from the run's
    (a tokenizer trained otherwise, or copied from the run a fine-tuning starts from: none)."""
    trained_on = read_json_object(directory / TRAINED_ON)
    now = training_data(config)
    if not trained_on or trained_on == now:
        return []

    def spelled(data: dict[str, str]) -> str:
        return ", ".join(f"{direction} {spec}" for direction, spec in data.items())

    return [f"the run's tokenizer was trained on {spelled(trained_on)}, not {spelled(now)}"]


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object a run keeps in a file ({} without one); MtError naming the file where it is
    damaged or, edited by hand, holds another kind of value."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # a file cut short, or bytes that are not UTF-8
        raise MtError(f"{path}: damaged, not JSON ({exc})") from None
    except OSError as exc:
        raise MtError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise MtError(f"{path}: damaged, not a JSON object")
    return data


def retrain_hints(tokenizer: Tokenizer, wanted: TokenizerConfig) -> list[str]:
    """How the settings a tokenizer was trained with differ from `wanted`, one line each."""

    def spelled(value: object) -> str:
        return str(value).lower() if isinstance(value, bool) else str(value)

    out = []
    for key, value in tokenizer.trained_with().items():
        setting = getattr(wanted, key)
        if value != (round(setting, 6) if isinstance(setting, float) else setting):
            out.append(
                f"the run's tokenizer was trained with tokenizer.{key}={spelled(value)}, "
                f"not {spelled(setting)}"
            )
    return out


def check_tags(tokenizer: Tokenizer, config: Config, directory: Path) -> None:
    """DataError unless the tokenizer has a tag for each target language (none for one).

    More tags than targets are those of a multilingual model fine-tuned on some of its
    directions (--resume): its sources are tagged as before.
    """
    targets = config.data.target_languages()
    if set(targets) <= set(tokenizer.tags) if len(targets) > 1 else not tokenizer.tags:
        return
    has = ", ".join(tokenizer.tags) or "none"
    problem = (
        f"{directory}: the tokenizer has target-language tags for {has}, but the run "
        f"translates into {', '.join(targets)}"
    )
    if len(targets) == 1:  # a model with tags reads a tag before every source
        raise DataError(
            f"{problem}; a model with tags translates into two languages or more (name them "
            "in data.corpora), or delete the tokenizer to train a model without tags"
        )
    raise DataError(f"{problem}; delete it to retrain it")


TOKENIZER_FILES = (JOINT_FILE, SRC_FILE, TGT_FILE)  # a tokenizer directory's: it loads whole


def find_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer of a run directory, of a tokenizer directory (or one of its files), or a
    SentencePiece model file of another name for both sides."""
    if not path.exists():
        raise DataError(f"{path}: no such run or tokenizer directory")
    if path.is_file() and path.suffix == ".model" and path.name not in TOKENIZER_FILES:
        return load_model_file(path)
    directory = path.parent if path.is_file() else path
    if (directory / TOKENIZER_DIR).is_dir() or (directory / CONFIG_FILE).is_file():
        directory = directory / TOKENIZER_DIR
    return load_tokenizer(directory)


def cache_dir(config: Config) -> Path:
    """Where encoded corpora are cached."""
    return Path(config.data.cache_dir) if config.data.cache_dir else run_path(config) / "cache"


def encode_split(config: Config, tokenizer: Tokenizer, which: str) -> EncodedCorpus:
    """The encoded `which` corpus of a run with one direction (see encode)."""
    return encode(config, tokenizer, which, open_split(config, which), corpus_key(config, which))


def encode_directions(config: Config, tokenizer: Tokenizer, which: str) -> dict[str, EncodedCorpus]:
    """The encoded `which` corpus of every direction that has one, by direction."""
    corpora = open_directions(config, which)
    return {
        name: encode(config, tokenizer, which, c, direction_key(config, which, name))
        for name, c in corpora.items()
    }


def direction_key(config: Config, which: str, direction: str) -> str:
    """corpus_key of the direction named `direction` (e.g. ``de-en``)."""
    names = [d.direction for d in config.data.directions()]
    return corpus_key(config, which, names.index(direction))


def encode_train(config: Config, tokenizer: Tokenizer) -> CorpusMix:
    """The training corpora of every direction, encoded and filtered, to sample batches from."""
    return train_mix(config, encode_directions(config, tokenizer, "train"))


def train_mix(config: Config, parts: dict[str, EncodedCorpus]) -> CorpusMix:
    """The encoded training corpora of the directions (by name), mixed as the config says."""
    from mt.data import CorpusMix

    weights = [c.weight for c in config.data.directions()]
    return CorpusMix(parts, weights, config.data.temperature)


def encode(
    config: Config, tokenizer: Tokenizer, which: str, corpus: Corpus, key: str
) -> EncodedCorpus:
    """The encoded (and, for training data only, filtered) corpus, from the cache when possible.

    `key` is the config key that names the corpus (corpus_key), for the error if none is left.
    """
    # Imported here: the data cache needs `datasets`, whose import takes seconds that commands
    # which only load a trained model (translate, evaluate, serve, export) need not pay.
    from mt.data import encode_corpus

    encoded = encode_corpus(
        corpus,
        tokenizer,
        cache_dir(config),
        config.data,
        filter_lengths=which == "train",
    )
    if len(encoded) == 0:  # nothing to sample batches from: training would never take a step
        raise DataError(
            f"{key}: {corpus.describe()}: no pairs left to train on, "
            f"{encoded.stats.describe()} (see data.max_len and data.max_ratio)"
        )
    return encoded


def prepare_data(
    config: Config, tokenizer: Tokenizer, corpora: dict[str, dict[str, Corpus]]
) -> Iterator[str]:
    """Encode and cache each corpus (or find it cached), yielding its statistics as lines.

    A run with several directions names the direction on each line (``train de-en: ...``).
    """
    several = len(config.data.directions()) > 1
    train_parts: dict[str, EncodedCorpus] = {}
    for which, directions in corpora.items():
        for name, corpus in directions.items():
            data = encode(config, tokenizer, which, corpus, direction_key(config, which, name))
            label = split_label(config, which, name)
            yield f"{label}: {data.stats.describe()}"
            yield f"{label}: {data.describe_tokens()}"
            if which == "train":
                train_parts[name] = data
                train = config.train  # max_tokens >= data.max_len + 1: checked at config load
                sampler = BatchSampler(data.src_lens, data.tgt_lens, train.max_tokens, train.seed)
                yield f"{label}: {describe_epoch(data, sampler)}"
            if which == "valid":
                yield f"{label}: {describe_unk_rate(tokenizer, corpus)}"
    if several and train_parts:
        mix = train_mix(config, train_parts)  # encoded above: not hashed and read again
        chances = zip(mix.parts, mix.probabilities(), strict=True)
        shares = ", ".join(f"{name} {p:.1%}" for name, p in chances)
        temperature = f"data.temperature={config.data.temperature:g}"
        if not config.data.mixed_batches:
            yield f"train: batches drawn from {shares} ({temperature})"
        else:
            train = config.train
            mixture = MixtureSampler.of(mix, train.max_tokens, train.seed, mixed=True)
            yield f"train: sentences drawn from {shares} ({temperature})"
            yield f"train: {describe_epoch(mix, mixture)}"


def split_label(config: Config, which: str, direction: str) -> str:
    """How messages name a corpus: ``valid``, or ``valid de-en`` in a run of several directions."""
    return f"{which} {direction}" if len(config.data.directions()) > 1 else which


def checkpoint_metadata(tokenizer: Tokenizer) -> dict[str, str]:
    """What a checkpoint must agree on with the run that loads it."""
    return {
        "tokenizer_sha256": tokenizer.fingerprint(),
        "src_vocab": str(tokenizer.src_vocab_size),
        "tgt_vocab": str(tokenizer.tgt_vocab_size),
    }


def run_average(run_dir: Path) -> Checkpoint | None:
    """The average a run made of its last checkpoints at its end, if it is still the run's model.

    Only a run that averages (train.average_last) has one, and only until the run trains on
    (a resumed run's new checkpoints, a signal's resume point among them, are not in it): an
    average of steps left behind is not. Checkpoints of later steps saved before it stand
    aside: those a run gone back with --resume leaves (its average stops before them). Steps
    decide first, times only then, so a copy that does not keep times keeps the model.
    """
    average = Checkpoint.from_weights(Path(run_dir) / CHECKPOINT_DIR / AVERAGE_NAME)
    if not average.weights.is_file() or not load_run_config(run_dir).train.average_last:
        return None
    last = max(averaged_steps(average.weights), default=-1)
    made = average.weights.stat().st_mtime_ns
    later = [c for c in weights_checkpoints(run_dir) if c.step > last]
    return None if any(c.weights.stat().st_mtime_ns > made for c in later) else average


def model_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint that translates for `path`: a run's model, or the checkpoint path names.

    A run's model (`path` a run directory or its checkpoints directory) is what its report
    scores: its average (run_average) where it has one, else its best checkpoint, else its
    latest. Any other path is a checkpoint's (see resolve_checkpoint).
    """
    path = Path(path)
    if (path / CHECKPOINT_DIR).is_dir():
        run_dir = path
    elif path.is_dir() and path.name == CHECKPOINT_DIR:
        run_dir = path.parent
    else:
        return resolve_checkpoint(path)
    average = run_average(run_dir) if (run_dir / CONFIG_FILE).is_file() else None
    return average or resolve_checkpoint(path)


def load_trained(
    path: Path, device: torch.device
) -> tuple[Config, Tokenizer, Transformer, Checkpoint]:
    """A trained model in eval mode, from a run dir, a checkpoints dir or a .safetensors file.

    The config and tokenizer come from the run directory holding the checkpoints directory, so
    an averaged checkpoint (a weights file without a training state) loads like any other.
    """
    checkpoint = model_checkpoint(Path(path))
    run_dir = checkpoint.run_dir
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(
            f"{checkpoint.weights}: not in a run's {CHECKPOINT_DIR} directory (no {CONFIG_FILE} "
            f"in {run_dir}); a model file loads from RUN/{CHECKPOINT_DIR}/, beside the run's "
            "config and tokenizer"
        )
    config = load_run_config(run_dir)
    tokenizer = load_tokenizer(run_dir / TOKENIZER_DIR)
    model = Transformer(config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    # Weights only: the training state (optimizer etc.) is never needed to translate.
    load_weights(checkpoint.weights, model, expected=checkpoint_metadata(tokenizer))
    model.to(device).eval()
    return config, tokenizer, model, checkpoint
