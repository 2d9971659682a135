"""Read parallel corpora as raw (source, target) text pairs: no tokenization, no filtering.

A corpus is named by a spec string:

* a prefix ``data/multi30k/train`` -> ``train.<src>`` + ``train.<tgt>``; each file may be plain or
  gzipped (``train.de.gz``). When both ``train.de`` and ``train.de.gz`` exist the plain file wins:
  it is usually the one a user decompressed (and maybe edited) by hand.
* a ``.tsv`` or ``.tsv.gz`` file: one ``source<TAB>target`` pair per line, columns in
  (src_lang, tgt_lang) order.
* ``hf:NAME[:CONFIG][@SPLIT]``: a Hugging Face dataset, either a directory written by
  ``save_to_disk`` or anything ``datasets.load_dataset`` accepts (a local folder of data files
  is cached by its files' contents, not their times).

Lines lose only their trailing ``\\n`` or ``\\r\\n``, and the first line a UTF-8 byte order
mark; all other whitespace is kept.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import sys
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any

from mt.errors import DataError, MtError, first_line
from mt.files import file_sha256, stream_sha256

log = logging.getLogger("mt")

TSV_HEADERS = (["source", "target"], ["src", "tgt"])  # and the two languages, e.g. de, en

_HF_BATCH = 1000
# Bumped if the fingerprint recipe changes, so old caches are not reused by mistake.
_FINGERPRINT_VERSION = "mt-corpus-v2"  # v2: TSV headers (caches of v1 read them as data)


@dataclass(frozen=True)
class Corpus(ABC):
    """A parallel corpus named by a spec; yields validated (source, target) raw-text pairs."""

    spec: str
    src_lang: str
    tgt_lang: str

    @abstractmethod
    def pairs(self) -> Iterator[tuple[str, str]]:
        """Stream (source, target) pairs; raises DataError on the first invalid line."""

    def sources(self) -> list[str]:
        """All source sentences (for small dev/test sets)."""
        return [src for src, _ in self.pairs()]

    def targets(self) -> list[str]:
        """All target sentences (for small dev/test sets)."""
        return [tgt for _, tgt in self.pairs()]

    @abstractmethod
    def fingerprint(self) -> str:
        """A sha256 hex digest of the corpus contents, for use as a cache key."""

    @abstractmethod
    def describe(self) -> str:
        """A short human-readable name for messages."""

    def _combine(self, kind: str, parts: Iterable[str]) -> str:
        """Fold per-file digests with the kind and direction, so en->de differs from de->en."""
        header = [_FINGERPRINT_VERSION, kind, self.src_lang, self.tgt_lang]
        return hashlib.sha256("\n".join([*header, *parts]).encode()).hexdigest()


@dataclass(frozen=True)
class FilePairCorpus(Corpus):
    """Two line-aligned text files, one per language, each plain or gzipped."""

    src_path: Path
    tgt_path: Path

    def pairs(self) -> Iterator[tuple[str, str]]:
        """Stream pairs; a line-count mismatch is raised once the shorter file ends."""
        n_src = n_tgt = 0
        for src, tgt in zip_longest(_corpus_lines(self.src_path), _corpus_lines(self.tgt_path)):
            # Keep consuming the longer file after the shorter ends, to report both counts.
            n_src += src is not None
            n_tgt += tgt is not None
            if src is not None and tgt is not None:
                yield src, tgt
        if n_src != n_tgt:
            raise DataError(f"{self.src_path} has {n_src} lines but {self.tgt_path} has {n_tgt}")

    def fingerprint(self) -> str:
        """Digest of the decompressed text, so foo.de and foo.de.gz with equal text match."""
        return self._combine("files", [_text_digest(self.src_path), _text_digest(self.tgt_path)])

    def describe(self) -> str:
        """E.g. ``data/train.de.gz + data/train.en.gz``."""
        return f"{self.src_path} + {self.tgt_path}"


@dataclass(frozen=True)
class TsvCorpus(Corpus):
    """One file of ``source<TAB>target`` lines, plain or gzipped."""

    path: Path

    def pairs(self) -> Iterator[tuple[str, str]]:
        """Stream pairs; a line without exactly one tab is a DataError. A first line that
        names the columns (`de<TAB>en` for de-en, or `source<TAB>target`) is a header: skipped.
        A header naming the languages the other way round (`en<TAB>de` for de-en) says the
        target comes first: each line is read that way. Either is logged, once per process."""
        flip = False
        for number, line in enumerate(_corpus_lines(self.path), start=1):
            columns = line.split("\t")
            if number == 1 and (header := self._header(columns)) is not None:
                flip = header
                _note_header(self.path, tuple(columns), flip)
                continue
            if len(columns) != 2:
                raise DataError(
                    f"{self.path}: line {number} has {len(columns) - 1} tabs, "
                    "expected exactly 1 (source<TAB>target)"
                )
            yield (columns[1], columns[0]) if flip else (columns[0], columns[1])

    def fingerprint(self) -> str:
        """Digest of the decompressed text."""
        return self._combine("tsv", [_text_digest(self.path)])

    def _header(self, columns: list[str]) -> bool | None:
        """For a header line, whether it puts the target first; None for a line of data."""
        names = [c.strip().lower() for c in columns]
        src, tgt = self.src_lang.lower(), self.tgt_lang.lower()
        if names in ([src, tgt], *TSV_HEADERS):
            return False
        return True if names == [tgt, src] and src != tgt else None

    def describe(self) -> str:
        """The file's path."""
        return str(self.path)


@functools.cache  # once per header and process: a corpus is read several times (tokenizer, cache)
def _note_header(path: Path, columns: tuple[str, ...], flip: bool) -> None:
    """Log that a TSV file's first line was read as a header: skipped, and what order it gave."""
    order = ", and each line read as target<TAB>source" if flip else ""
    log.info("%s: line 1 is a header (%s): skipped%s", path, ", ".join(columns), order)


@dataclass(frozen=True)
class HfCorpus(Corpus):
    """One split of a Hugging Face dataset: a ``translation`` column or two language columns."""

    name: str
    split: str
    dataset: Any = field(compare=False, repr=False)  # a datasets.Dataset, imported lazily
    translation_column: bool = False

    def pairs(self) -> Iterator[tuple[str, str]]:
        """Stream pairs in batches straight from the Arrow table (never a whole Python list)."""
        columns = ["translation"] if self.translation_column else [self.src_lang, self.tgt_lang]
        row = 0
        batches = self.dataset.select_columns(columns).iter(batch_size=_HF_BATCH)
        while True:
            try:
                batch = next(batches, None)
            except (UnicodeDecodeError, ValueError, OSError) as exc:  # damaged Arrow data
                raise DataError(
                    f"{self.describe()}: unreadable after row {row} ({first_line(exc)})"
                ) from None
            if batch is None:
                return
            for src, tgt in self._batch_pairs(batch):
                row += 1
                if not isinstance(src, str) or not isinstance(tgt, str):
                    raise DataError(f"{self.describe()}: row {row} has a missing or non-text value")
                yield src, tgt

    def _batch_pairs(self, batch: dict[str, list[Any]]) -> Iterable[tuple[Any, Any]]:
        """The (source, target) values of one batch, whichever column layout is in use."""
        if not self.translation_column:
            return zip(batch[self.src_lang], batch[self.tgt_lang], strict=True)
        rows = (t or {} for t in batch["translation"])
        return ((t.get(self.src_lang), t.get(self.tgt_lang)) for t in rows)

    def fingerprint(self) -> str:
        """Digest of the Arrow files backing the split (or the dataset's own fingerprint)."""
        files = [Path(f["filename"]) for f in self.dataset.cache_files]
        # An in-memory dataset has no files; its datasets fingerprint is the best we have.
        parts = [file_sha256(f) for f in files] or [str(self.dataset._fingerprint)]
        layout = "translation" if self.translation_column else "columns"
        return self._combine("hf", [self.name, self.split, layout, *parts])

    def describe(self) -> str:
        """E.g. ``hf:wmt16:de-en@validation``."""
        return f"hf:{self.name}@{self.split}"


def open_corpus(spec: str, src_lang: str, tgt_lang: str, split: str = "train") -> Corpus:
    """Resolve a corpus spec; ``split`` is the default split, used only by ``hf:`` specs."""
    if spec.startswith("hf:"):
        return _open_hf(spec, src_lang, tgt_lang, split)
    if spec.endswith((".tsv", ".tsv.gz")):
        path = Path(spec)
        if not path.is_file():
            raise DataError(f"{spec}: {'not a regular file' if path.exists() else 'no such file'}")
        return TsvCorpus(spec, src_lang, tgt_lang, path)
    return _open_prefix(spec, src_lang, tgt_lang)


def check_stdin(inputs: dict[str, str | Path | None]) -> None:
    """MtError if more than one of the inputs (as the user names them) is "-": standard input."""
    named = [name for name, path in inputs.items() if path is not None and str(path) == "-"]
    if len(named) > 1:
        raise MtError(f"{' and '.join(named)} both read standard input (-): give one a file")


def read_lines(path: str | Path) -> Iterator[str]:
    """Yield the lines of a plain or ``.gz`` file, or of stdin for ``-``, without line endings.

    Only ``\\n`` (or ``\\r\\n``) ends a line, not the other breaks ``str.splitlines()`` knows
    (``\\x0b``, ``\\x85``, ``\\u2028``...), so line N is line N for wc -l, paste and sacrebleu too.
    """
    if str(path) == "-":
        if sys.stdin is None:  # started with stdin closed (<&-)
            raise DataError("stdin: closed; give a file")
        for number, raw in enumerate(sys.stdin.buffer, start=1):
            yield _decode(raw, input_name(path), number)
        return
    path, number = Path(path), 0
    try:
        with _open_binary(path) as stream:
            for number, raw in enumerate(stream, start=1):
                yield _decode(raw, path, number)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a file") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: corrupt gzip data after line {number} ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def input_name(path: str | Path) -> str:
    """How messages name an input of read_lines: its path, or stdin for ``-``."""
    return "stdin" if str(path) == "-" else str(path)


def _open_binary(path: Path) -> Any:
    """Open a file for binary reading, decompressing ``.gz`` transparently."""
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _corpus_lines(path: Path) -> Iterator[str]:
    """read_lines for a corpus file: a NUL byte is an error (valid UTF-8, but never in text:
    UTF-16 without a BOM, or binary data). Text to translate may hold one: it is passed on."""
    for number, line in enumerate(read_lines(path), start=1):
        if "\x00" in line:
            raise DataError(f"{path}: line {number} holds a NUL byte (mt reads UTF-8 text)")
        yield line


def _decode(raw: bytes, path: Path | str, number: int) -> str:
    """Strip one ``\\n`` or ``\\r\\n`` and decode UTF-8, naming the line on failure.

    A byte order mark opening the first line (editors on Windows write one) is not text: it
    would stay in references and in text to translate.
    """
    if raw.endswith(b"\n"):
        raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
    if number == 1:
        raw = raw.removeprefix(b"\xef\xbb\xbf")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: line {number} is not valid UTF-8") from None


def _open_prefix(spec: str, src_lang: str, tgt_lang: str) -> FilePairCorpus:
    """Find ``<spec>.<lang>`` or ``<spec>.<lang>.gz`` for both languages."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for lang in (src_lang, tgt_lang):
        tried = [Path(f"{spec}.{lang}"), Path(f"{spec}.{lang}.gz")]
        files = [p for p in tried if p.is_file()]
        odd = [p for p in tried if p.exists() and not p.is_file()]
        if not files:
            what = f"{odd[0]} is not a regular file" if odd else f"no {lang} file"
            missing.append(f"{what} (tried {tried[0]}, {tried[1]})")
            continue
        if len(files) == 2:
            log.warning("warning: %s and %s both exist; reading %s", *files, files[0])
        found[lang] = files[0]
    if missing:
        raise DataError(f"corpus {spec}: " + "; ".join(missing))
    return FilePairCorpus(spec, src_lang, tgt_lang, found[src_lang], found[tgt_lang])


def _text_digest(path: Path) -> str:
    """sha256 of a file's decompressed bytes."""
    try:
        with _open_binary(path) as stream:
            return stream_sha256(stream)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: corrupt gzip data ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _parse_hf_spec(spec: str, default_split: str) -> tuple[str, str | None, str | None, str]:
    """Split ``hf:NAME[:CONFIG][@SPLIT]`` into (name, config, explicit split, split to use)."""
    body, at, explicit = spec.removeprefix("hf:").partition("@")
    name, _, config = body.partition(":")
    if not name or (at and not explicit):
        raise DataError(f"{spec}: expected hf:NAME[:CONFIG][@SPLIT]")
    return name, config or None, explicit or None, explicit or default_split


def _open_hf(spec: str, src_lang: str, tgt_lang: str, default_split: str) -> HfCorpus:
    """Load one split of a Hugging Face dataset and check its columns."""
    name, config, explicit, split = _parse_hf_spec(spec, default_split)
    label = f"{name}:{config}" if config else name
    if _is_saved(Path(name)):
        dataset = _split_of_saved(_load_saved(name), name, explicit, split)
    else:  # a hub name, or a local directory of data files (json, csv, parquet ...)
        local = Path(name).is_dir()
        if local:
            _check_no_tsv(Path(name))
        dataset = _load_hub(name, config, split, _local_cache(Path(name)) if local else None)
    translation = _check_columns(dataset, f"hf:{label}", src_lang, tgt_lang)
    return HfCorpus(spec, src_lang, tgt_lang, label, split, dataset, translation)


def _check_no_tsv(directory: Path) -> None:
    """DataError for a folder whose data files are mostly TSV (datasets reads the folder in its
    most common format): datasets reads TSV as quoted CSV (a quote in a sentence is dropped, or
    swallows the lines to the next one; "NA" becomes missing), where mt reads a .tsv corpus line
    by line."""
    kinds: dict[str, list[Path]] = {}
    for path in _data_files(directory):
        suffixes = [x for x in path.suffixes if x != ".gz"]  # train.tsv.gz is TSV
        kinds.setdefault(suffixes[-1] if suffixes else "", []).append(path)
    tsv = kinds.get(".tsv", [])
    if tsv and len(tsv) >= max(len(files) for files in kinds.values()):
        raise DataError(
            f"hf:{directory}: {tsv[0]} is TSV, which datasets would read as quoted CSV; name "
            "the .tsv file itself as the corpus, without hf: (mt reads it line by line)"
        )


def _data_files(directory: Path) -> list[Path]:
    """The files under a local folder for datasets, sorted, hidden ones left out (as it does)."""
    return [
        path
        for path in sorted(directory.rglob("*"))
        if path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(directory).parts)
    ]


def _is_saved(directory: Path) -> bool:
    """Whether `directory` holds what ``save_to_disk`` writes (a Dataset or a DatasetDict)."""
    return (directory / "dataset_dict.json").is_file() or (directory / "state.json").is_file()


def _load_saved(name: str) -> Any:
    """``datasets.load_from_disk`` with its errors turned into one-line DataErrors."""
    import datasets  # slow to import; only hf: specs need it

    try:
        return datasets.load_from_disk(name)
    except Exception as exc:  # a damaged save raises many types (KeyError for a bare state.json)
        raise DataError(f"hf:{name}: not a readable saved dataset ({first_line(exc)})") from None


def _split_of_saved(loaded: Any, name: str, explicit: str | None, split: str) -> Any:
    """Pick the split from a saved DatasetDict; a single saved Dataset is used as is."""
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"hf:{name}: no split '{split}' (splits: {', '.join(sorted(loaded))})")
        return loaded[split]
    # A single Dataset has no splits to choose from, so an explicit @split cannot be honoured.
    if explicit is not None and str(loaded.split) != explicit:
        raise DataError(f"hf:{name}: is a single dataset without splits; remove '@{explicit}'")
    return loaded


def _local_cache(directory: Path) -> str:
    """A datasets cache directory for a local folder of data files, named by their contents.

    datasets keys its cache of such a folder by the files' paths and modification times, so a
    file rewritten with its old time (``cp -p``, ``rsync -a``, an unpacked archive) would be
    read from the cache of its old contents. Named by the contents, a changed file builds anew.
    """
    import datasets

    digest = hashlib.sha256()
    for path in _data_files(directory):
        try:
            digest.update(f"{path.relative_to(directory)}\n{file_sha256(path)}\n".encode())
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return str(Path(datasets.config.HF_DATASETS_CACHE) / "mt-local" / digest.hexdigest()[:32])


def _load_hub(name: str, config: str | None, split: str, cache_dir: str | None = None) -> Any:
    """``datasets.load_dataset`` for one split, errors turned into one-line DataErrors.

    `cache_dir` replaces datasets' own (see _local_cache).
    """
    import datasets
    from huggingface_hub.utils import logging as hub_logging

    # Its warnings are retries of a Hub it cannot reach, each printed twice (by its handler and
    # by mt's); the failure that ends them is reported below, in one line.
    hub_logging.set_verbosity_error()
    label = f"{name}:{config}" if config else name
    try:
        return datasets.load_dataset(name, config, split=split, cache_dir=cache_dir)
    except Exception as exc:  # datasets raises many unrelated types; all mean "cannot load"
        raise DataError(f"hf:{label}: cannot load split '{split}' ({first_line(exc)})") from None


def _languages(feature: Any) -> list[str] | None:
    """The languages of a ``translation`` column, or None for another kind of column.

    Datasets built from dicts have a dict feature; hub ones (wmt) a Translation feature. A
    TranslationVariableLanguages column holds parallel lists instead, which mt does not read.
    """
    import datasets

    if isinstance(feature, dict):
        return [str(lang) for lang in feature]
    if isinstance(feature, datasets.Translation):
        return list(feature.languages)
    return None


def _check_columns(dataset: Any, label: str, src_lang: str, tgt_lang: str) -> bool:
    """True for a ``translation`` column, False for two language columns; else DataError."""
    features = dataset.features
    if "translation" in features:
        langs = _languages(features["translation"])
        if langs is None and src_lang in features and tgt_lang in features:
            return False  # a column that happens to be called "translation"
        if langs is None:
            raise DataError(
                f"{label}: column 'translation' is not a mapping of languages "
                f"({type(features['translation']).__name__}); needs one with {src_lang} and "
                f"{tgt_lang}, or '{src_lang}' and '{tgt_lang}' columns"
            )
        if src_lang in langs and tgt_lang in langs:
            return True
        raise DataError(
            f"{label}: translation column has languages {', '.join(map(str, langs))}; "
            f"needs {src_lang} and {tgt_lang}"
        )
    if src_lang in features and tgt_lang in features:
        return False
    raise DataError(
        f"{label}: needs a 'translation' column or '{src_lang}' and '{tgt_lang}' columns "
        f"(columns: {', '.join(dataset.column_names)})"
    )
