"""Tests for mt.corpora: prefix, TSV and Hugging Face corpora."""

from __future__ import annotations

import gzip
import json
import logging
import os
from pathlib import Path

import pytest

from mt.corpora import Corpus, open_corpus, read_lines
from mt.errors import DataError

DE = ["Ein Hund läuft.", "  Zwei Katzen\t", "", "Ende\rmitte"]
EN = ["A dog runs.", "  Two cats\t", "", "End"]
PAIRS = list(zip(DE, EN, strict=True))


def _write(path: Path, lines: list[str], newline: str = "\n") -> Path:
    """Write lines as UTF-8, gzipped when the name ends in .gz."""
    data = "".join(line + newline for line in lines).encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def _prefix(tmp_path: Path, de_suffix: str = "", en_suffix: str = "") -> str:
    """A train.de/train.en prefix in tmp_path, each optionally gzipped."""
    _write(tmp_path / f"train.de{de_suffix}", DE)
    _write(tmp_path / f"train.en{en_suffix}", EN)
    return str(tmp_path / "train")


def test_plain_prefix_keeps_whitespace(tmp_path: Path) -> None:
    corpus = open_corpus(_prefix(tmp_path), "de", "en")
    assert isinstance(corpus, Corpus)
    assert list(corpus.pairs()) == PAIRS
    assert corpus.sources() == DE
    assert corpus.targets() == EN
    assert corpus.describe() == f"{tmp_path}/train.de + {tmp_path}/train.en"


def test_crlf_line_endings_are_stripped(tmp_path: Path) -> None:
    _write(tmp_path / "t.de", ["a", "b"], newline="\r\n")
    _write(tmp_path / "t.en", ["x", "y"])
    assert list(open_corpus(str(tmp_path / "t"), "de", "en").pairs()) == [("a", "x"), ("b", "y")]
    (tmp_path / "t.de").write_bytes(b"a\r\nb")  # no newline at the end: still two lines
    assert open_corpus(str(tmp_path / "t"), "de", "en").sources() == ["a", "b"]
    (tmp_path / "t.de").write_bytes(b"\xef\xbb\xbfa\n\xef\xbb\xbfb\n")  # a BOM opens line 1 only
    assert open_corpus(str(tmp_path / "t"), "de", "en").sources() == ["a", "\ufeffb"]


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_lines_splits_on_newline_only(tmp_path: Path, suffix: str) -> None:
    def lines(data: bytes) -> list[str]:
        path = tmp_path / f"f{suffix}"
        path.write_bytes(gzip.compress(data) if suffix else data)
        return list(read_lines(path))

    assert lines(b"a\r\nb\n") == ["a", "b"]
    assert lines(b"a\x0bb\x1cc\xc2\x85d\xe2\x80\xa8e\n") == ["a\x0bb\x1cc\x85d\u2028e"]
    assert lines(b"no final newline") == ["no final newline"]
    assert lines(b"\n\n") == ["", ""]
    assert lines(b"") == []
    assert lines(b"x\ry\n") == ["x\ry"]
    with pytest.raises(DataError, match=rf"^{tmp_path}/f{suffix}: line 2 is not valid UTF-8$"):
        lines(b"ok\nbad \xff\n")


def test_read_lines_names_what_it_cannot_read(tmp_path: Path) -> None:
    for path, problem in [
        (tmp_path / "none", "no such file"),
        (tmp_path, "is a directory, not a file"),
    ]:
        with pytest.raises(DataError) as err:
            list(read_lines(path))
        assert str(err.value) == f"{path}: {problem}"


def test_gzipped_prefix_matches_plain(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    plain = open_corpus(_prefix(tmp_path / "p"), "de", "en")
    gzipped = open_corpus(_prefix(tmp_path / "g", ".gz", ".gz"), "de", "en")
    assert gzipped.describe() == f"{tmp_path}/g/train.de.gz + {tmp_path}/g/train.en.gz"
    assert list(gzipped.pairs()) == list(plain.pairs())
    # The fingerprint hashes decompressed text: same text, same key, however it is stored.
    assert gzipped.fingerprint() == plain.fingerprint()


def test_plain_file_wins_over_gz_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = _prefix(tmp_path)
    _write(tmp_path / "train.de.gz", ["other"] * len(DE))
    assert open_corpus(spec, "de", "en").sources() == DE
    plain, gzipped = tmp_path / "train.de", tmp_path / "train.de.gz"
    assert caplog.messages == [f"warning: {plain} and {gzipped} both exist; reading {plain}"]


def test_mixed_plain_and_gz(tmp_path: Path) -> None:
    assert list(open_corpus(_prefix(tmp_path, "", ".gz"), "de", "en").pairs()) == PAIRS


def test_direction_swaps_pairs_and_fingerprint(tmp_path: Path) -> None:
    spec = _prefix(tmp_path)
    forward, backward = open_corpus(spec, "de", "en"), open_corpus(spec, "en", "de")
    assert list(backward.pairs()) == [(en, de) for de, en in PAIRS]
    assert forward.fingerprint() != backward.fingerprint()


def test_line_count_mismatch(tmp_path: Path) -> None:
    _write(tmp_path / "train.de.gz", ["a", "b", "c"])
    _write(tmp_path / "train.en.gz", ["x", "y"])
    corpus = open_corpus(str(tmp_path / "train"), "de", "en")
    with pytest.raises(DataError) as err:
        list(corpus.pairs())
    assert str(err.value) == (
        f"{tmp_path}/train.de.gz has 3 lines but {tmp_path}/train.en.gz has 2"
    )
    corpus = open_corpus(str(tmp_path / "train"), "en", "de")
    with pytest.raises(DataError, match=r"train\.en\.gz has 2 lines but .*train\.de\.gz has 3$"):
        list(corpus.pairs())


def test_invalid_utf8_names_line(tmp_path: Path) -> None:
    _write(tmp_path / "train.en", ["a", "b", "c"])
    (tmp_path / "train.de").write_bytes(b"eins\nzwei\ndr\xffei\n")
    with pytest.raises(DataError) as err:
        list(open_corpus(str(tmp_path / "train"), "de", "en").pairs())
    assert str(err.value) == f"{tmp_path}/train.de: line 3 is not valid UTF-8"


def test_corrupt_gzip(tmp_path: Path) -> None:
    _write(tmp_path / "train.en", ["a"])
    (tmp_path / "train.de.gz").write_bytes(b"not gzip at all\n")
    with pytest.raises(DataError, match=r"train\.de\.gz: corrupt gzip data after line 0"):
        list(open_corpus(str(tmp_path / "train"), "de", "en").pairs())


def test_missing_files(tmp_path: Path) -> None:
    _write(tmp_path / "train.de", ["a"])
    spec = str(tmp_path / "train")
    with pytest.raises(DataError) as err:
        open_corpus(spec, "de", "en")
    assert str(err.value) == (f"corpus {spec}: no en file (tried {spec}.en, {spec}.en.gz)")
    with pytest.raises(DataError, match=r"no fr file .*; no cs file"):
        open_corpus(spec, "fr", "cs")
    (tmp_path / "train.en").mkdir()  # exists, but nothing to read lines from
    with pytest.raises(DataError) as err:
        open_corpus(spec, "de", "en")
    assert str(err.value) == (
        f"corpus {spec}: {spec}.en is not a regular file (tried {spec}.en, {spec}.en.gz)"
    )
    (tmp_path / "x.tsv").mkdir()
    with pytest.raises(DataError) as err:
        open_corpus(str(tmp_path / "x.tsv"), "de", "en")
    assert str(err.value) == f"{tmp_path / 'x.tsv'}: not a regular file"


def test_a_nul_byte_is_not_text(tmp_path: Path) -> None:
    _write(tmp_path / "train.en", ["a", "b"])
    # ASCII text as UTF-16LE: valid UTF-8 byte by byte, but a NUL after every letter.
    (tmp_path / "train.de").write_bytes("eins\nzwei\n".encode("utf-16-le"))
    with pytest.raises(DataError) as err:
        list(open_corpus(str(tmp_path / "train"), "de", "en").pairs())
    assert str(err.value) == f"{tmp_path}/train.de: line 1 holds a NUL byte (mt reads UTF-8 text)"


def test_fingerprint_changes_with_one_byte(tmp_path: Path) -> None:
    spec = _prefix(tmp_path)
    before = open_corpus(spec, "de", "en").fingerprint()
    assert open_corpus(spec, "de", "en").fingerprint() == before
    path = tmp_path / "train.en"
    data = bytearray(path.read_bytes())
    data[0] ^= 0x01
    path.write_bytes(bytes(data))
    assert open_corpus(spec, "de", "en").fingerprint() != before


@pytest.mark.parametrize("name", ["c.tsv", "c.tsv.gz"])
def test_tsv(tmp_path: Path, name: str) -> None:
    rows = [("Ein Hund läuft.", "A dog runs."), ("  zwei ", " two  "), ("", "")]
    path = _write(tmp_path / name, [f"{de}\t{en}" for de, en in rows])
    corpus = open_corpus(str(path), "de", "en")
    assert list(corpus.pairs()) == rows
    assert corpus.describe() == str(path)
    assert len(corpus.fingerprint()) == 64


@pytest.mark.parametrize("header", ["de\ten", "DE\tEN", "source\ttarget", "src\ttgt"])
def test_a_tsv_header_is_skipped(
    tmp_path: Path, header: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = _write(tmp_path / "c.tsv", [header, "Ein Hund\tA dog", "de\ten"])
    pairs = [("Ein Hund", "A dog"), ("de", "en")]  # only the first line can be a header
    corpus = open_corpus(str(path), "de", "en")
    with caplog.at_level(logging.INFO, logger="mt"):
        assert list(corpus.pairs()) == pairs
        assert list(corpus.pairs()) == pairs  # read again (as for the tokenizer, then the cache)
    names = header.replace("\t", ", ")
    assert caplog.messages == [f"{path}: line 1 is a header ({names}): skipped"]  # said once


def test_a_header_naming_the_target_first_reads_each_line_that_way(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _write(tmp_path / "c.tsv", ["DE\ten", "Ein Hund\tA dog", "Eine Katze\tA cat"])
    with caplog.at_level(logging.INFO, logger="mt"):
        assert list(open_corpus(str(path), "en", "de").pairs()) == [
            ("A dog", "Ein Hund"), ("A cat", "Eine Katze")
        ]  # fmt: skip
        assert list(open_corpus(str(path), "de", "en").pairs())[:1] == [("Ein Hund", "A dog")]
        _write(path, ["de\tfr", "Ein Hund\tUn chien"])  # other languages: data
        assert list(open_corpus(str(path), "en", "de").pairs())[:1] == [("de", "fr")]
    assert caplog.messages == [
        f"{path}: line 1 is a header (DE, en): skipped, and each line read as target<TAB>source",
        f"{path}: line 1 is a header (DE, en): skipped",
    ]


def test_tsv_bad_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.tsv", ["a\tb", "no tab here", "c\td"])
    with pytest.raises(DataError) as err:
        list(open_corpus(str(path), "de", "en").pairs())
    assert str(err.value) == (f"{path}: line 2 has 0 tabs, expected exactly 1 (source<TAB>target)")
    _write(path, ["a\tb\tc"])
    with pytest.raises(DataError, match=r"c\.tsv: line 1 has 2 tabs"):
        list(open_corpus(str(path), "de", "en").pairs())


def test_tsv_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"^.*nope\.tsv: no such file$"):
        open_corpus(str(tmp_path / "nope.tsv"), "de", "en")


datasets = pytest.importorskip("datasets")


def _save(dataset: object, path: Path) -> str:
    """save_to_disk without the progress bar noise."""
    datasets.disable_progress_bars()
    dataset.save_to_disk(str(path))  # type: ignore[attr-defined]
    return str(path)


def test_hf_translation_column(tmp_path: Path) -> None:
    rows = [{"de": de, "en": en} for de, en in PAIRS]
    path = _save(datasets.Dataset.from_dict({"translation": rows, "id": [1, 2, 3, 4]}), tmp_path)
    corpus = open_corpus(f"hf:{path}", "en", "de", split="validation")
    assert list(corpus.pairs()) == [(en, de) for de, en in PAIRS]
    assert corpus.describe() == f"hf:{path}@validation"
    assert len(corpus.fingerprint()) == 64


def test_hf_two_columns(tmp_path: Path) -> None:
    path = _save(datasets.Dataset.from_dict({"de": DE, "en": EN}), tmp_path / "d")
    corpus = open_corpus(f"hf:{path}", "de", "en")
    assert list(corpus.pairs()) == PAIRS
    with pytest.raises(DataError) as err:
        open_corpus(f"hf:{path}", "de", "fr")
    assert str(err.value) == (
        f"hf:{path}: needs a 'translation' column or 'de' and 'fr' columns (columns: de, en)"
    )
    with pytest.raises(DataError, match="single dataset without splits; remove '@test'"):
        open_corpus(f"hf:{path}@test", "de", "en")


def test_hf_a_translation_column_of_plain_text(tmp_path: Path) -> None:
    # A column called "translation" that holds text: the language columns are read, and
    # without them the error says what the column is, not an AttributeError.
    rows = {"de": DE, "en": EN, "translation": ["note"] * len(DE)}
    path = _save(datasets.Dataset.from_dict(rows), tmp_path / "notes")
    assert list(open_corpus(f"hf:{path}", "de", "en").pairs()) == PAIRS
    with pytest.raises(DataError) as err:
        open_corpus(f"hf:{path}", "de", "fr")
    assert str(err.value) == (
        f"hf:{path}: column 'translation' is not a mapping of languages (Value); needs one "
        "with de and fr, or 'de' and 'fr' columns"
    )
    variable = datasets.Features(
        {"translation": datasets.TranslationVariableLanguages(languages=["de", "en"])}
    )
    rows = {"translation": [{"de": "a", "en": "b"}]}
    path = _save(datasets.Dataset.from_dict(rows, features=variable), tmp_path / "variable")
    with pytest.raises(DataError, match=r"mapping of languages \(TranslationVariableLanguages\)"):
        open_corpus(f"hf:{path}", "de", "en")


def test_hf_dataset_dict_splits(tmp_path: Path) -> None:
    def part(n: int) -> object:
        return datasets.Dataset.from_dict({"translation": [{"de": f"d{n}", "en": f"e{n}"}]})

    splits = {"train": part(0), "validation": part(1), "test": part(2)}
    path = _save(datasets.DatasetDict(splits), tmp_path / "dd")
    assert list(open_corpus(f"hf:{path}", "de", "en").pairs()) == [("d0", "e0")]
    assert open_corpus(f"hf:{path}", "de", "en", split="test").sources() == ["d2"]
    # An explicit @split beats the caller's default.
    explicit = open_corpus(f"hf:{path}@validation", "de", "en", split="test")
    assert explicit.sources() == ["d1"]
    train = open_corpus(f"hf:{path}", "de", "en")
    assert explicit.fingerprint() != train.fingerprint()
    with pytest.raises(DataError) as err:
        open_corpus(f"hf:{path}@dev", "de", "en")
    assert str(err.value) == f"hf:{path}: no split 'dev' (splits: test, train, validation)"
    with pytest.raises(DataError, match="translation column has languages de, en; needs fr and en"):
        open_corpus(f"hf:{path}", "fr", "en")


def test_hf_damaged_arrow_data_is_one_line(tmp_path: Path) -> None:
    rows = {"de": ["x" * 100] * 200, "en": ["y" * 100] * 200}
    path = _save(datasets.Dataset.from_dict(rows), tmp_path / "saved")
    (arrow,) = Path(path).glob("*.arrow")
    data = bytearray(arrow.read_bytes())
    middle = len(data) // 4  # inside the de column's 20,000 bytes of text: no longer UTF-8
    data[middle : middle + 8] = b"\xff" * 8
    arrow.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"^hf:.*saved@train: unreadable after row 0 \("):
        list(open_corpus(f"hf:{path}", "de", "en").pairs())


def test_hf_fingerprint_follows_contents(tmp_path: Path) -> None:
    first = _save(datasets.Dataset.from_dict({"de": ["a"], "en": ["b"]}), tmp_path / "1")
    second = _save(datasets.Dataset.from_dict({"de": ["a"], "en": ["c"]}), tmp_path / "2")
    assert (
        open_corpus(f"hf:{first}", "de", "en").fingerprint()
        != open_corpus(f"hf:{second}", "de", "en").fingerprint()
    )


def jsonl_folder(tmp_path: Path) -> tuple[Path, list[str]]:
    """A local folder of data files: train.jsonl (PAIRS) and test.jsonl (the first); its lines."""
    folder = tmp_path / "jsonl"
    folder.mkdir()
    lines = [json.dumps({"translation": {"de": de, "en": en}}) for de, en in PAIRS]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "test.jsonl").write_text(lines[0] + "\n", encoding="utf-8")
    datasets.disable_progress_bars()
    return folder, lines


def test_hf_a_local_directory_of_data_files(tmp_path: Path) -> None:
    files, lines = jsonl_folder(tmp_path)
    assert list(open_corpus(f"hf:{files}", "de", "en").pairs()) == PAIRS
    assert list(open_corpus(f"hf:{files}", "de", "en", split="test").pairs()) == PAIRS[:1]
    # Rewritten with its old time (cp -p, rsync -a): datasets' cache would serve the old text.
    when = (files / "test.jsonl").stat().st_mtime_ns
    (files / "test.jsonl").write_text(lines[1] + "\n", encoding="utf-8")
    os.utime(files / "test.jsonl", ns=(when, when))
    assert list(open_corpus(f"hf:{files}", "de", "en", split="test").pairs()) == PAIRS[1:2]


def test_hf_a_folder_of_tsv_files_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "tsv"
    folder.mkdir()
    # datasets would drop these quotes (as CSV), where a .tsv corpus keeps them
    (folder / "train.tsv").write_text('de\ten\n"Ja", sagte er.\t"Yes," he said.\n')
    with pytest.raises(DataError) as err:
        open_corpus(f"hf:{folder}", "de", "en")
    assert str(err.value) == (
        f"hf:{folder}: {folder / 'train.tsv'} is TSV, which datasets would read as quoted CSV; "
        "name the .tsv file itself as the corpus, without hf: (mt reads it line by line)"
    )
    pairs = list(open_corpus(str(folder / "train.tsv"), "de", "en").pairs())
    assert pairs == [('"Ja", sagte er.', '"Yes," he said.')]
    # A stray .tsv beside data files of another format, which datasets reads: taken.
    files, _ = jsonl_folder(tmp_path)
    (files / "stats.tsv").write_text("pairs\t2\n")
    assert list(open_corpus(f"hf:{files}", "de", "en").pairs()) == PAIRS


def test_a_local_dataset_folder_is_hashed_once_per_process_while_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mt import files as files_module

    folder, lines = jsonl_folder(tmp_path)
    hashed: list[str] = []
    real = files_module.stream_sha256

    def counting(stream):  # type: ignore[no-untyped-def]
        hashed.append(Path(stream.name).name)
        return real(stream)

    monkeypatch.setattr(files_module, "stream_sha256", counting)
    for split in ("train", "test", "train"):
        open_corpus(f"hf:{folder}", "de", "en", split=split)
    assert sorted(hashed) == ["test.jsonl", "train.jsonl"]  # each file once, not once per split
    when = (folder / "test.jsonl").stat().st_mtime_ns
    (folder / "test.jsonl").write_text(lines[1] + "\n", encoding="utf-8")
    os.utime(folder / "test.jsonl", ns=(when, when))  # rewritten with its old time
    assert list(open_corpus(f"hf:{folder}", "de", "en", split="test").pairs()) == PAIRS[1:2]
    assert sorted(hashed) == ["test.jsonl", "test.jsonl", "train.jsonl"]


def test_hf_a_damaged_saved_dataset_is_one_line(tmp_path: Path) -> None:
    path = _save(datasets.Dataset.from_dict({"de": DE, "en": EN}), tmp_path / "d")
    (Path(path) / "state.json").write_text("{}", encoding="utf-8")
    with pytest.raises(DataError) as err:
        open_corpus(f"hf:{path}", "de", "en")
    assert str(err.value).startswith(f"hf:{path}: not a readable saved dataset (")


def test_hf_hub_errors_are_one_line(
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from huggingface_hub.utils import logging as hub_logging

    def fail(*args: object, **kwargs: object) -> None:
        # What an unreachable Hub does first: a warning per retry, through its own handler.
        hub_logging.get_logger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        raise FileNotFoundError("Couldn't find dataset nope/x\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(DataError) as err:
        open_corpus("hf:nope/x:de-en", "de", "en", split="test")
    assert str(err.value) == (
        "hf:nope/x:de-en: cannot load split 'test' (Couldn't find dataset nope/x)"
    )
    assert "Retrying" not in capfd.readouterr().err and "Retrying" not in caplog.text


def test_hf_bad_spec() -> None:
    with pytest.raises(DataError, match=r"expected hf:NAME\[:CONFIG\]\[@SPLIT\]"):
        open_corpus("hf:", "de", "en")
