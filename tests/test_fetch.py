"""Tests for mt.fetch: Multi30k download from a loopback HTTP server or a local mirror."""

from __future__ import annotations

import errno
import gzip
import hashlib
import os
import shutil
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from helpers.corpus import MULTI30K_DE_EN as DE_EN

from mt import fetch
from mt.errors import DataError, MtError


class _Handler(SimpleHTTPRequestHandler):
    """Serves a directory and records every path requested."""

    requests: list[str]

    def do_GET(self) -> None:
        self.requests.append(self.path)
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep test output quiet


@pytest.fixture
def de_en(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory of small made-up de/en Multi30k files, pinned as the real ones are: their
    checksums and line counts stand in for the real ones' (which CI machines do not have)."""
    files = tmp_path / "de-en"
    files.mkdir()
    lines = {"train": 7, "val": 3, "test_2016_flickr": 2}
    pinned = dict(fetch.MULTI30K_FILES)
    for name in DE_EN:
        split, lang = name.split(".")[:2]
        text = "".join(f"{lang} {split} {i}\n" for i in range(lines[split])).encode()
        (files / name).write_bytes(gzip.compress(text, mtime=0))
        pinned[name] = hashlib.sha256((files / name).read_bytes()).hexdigest()
    monkeypatch.setattr(fetch, "MULTI30K_FILES", pinned)
    monkeypatch.setattr(fetch, "MULTI30K_LINES", lines)
    return files


@pytest.fixture
def served(de_en: Path, tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """(base URL, served directory holding the de/en files, list of requested paths)."""
    root = tmp_path / "server"
    root.mkdir()
    for name in DE_EN:
        shutil.copyfile(de_en / name, root / name)
    requests: list[str] = []
    handler = type("Handler", (_Handler,), {"requests": requests})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/raw/", root, requests
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def _no_env_mirror(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(fetch.MIRROR_ENV, raising=False)


def _base_url(served: tuple[str, Path, list[str]]) -> str:
    """The server's root URL (the fixture's URL has a /raw/ path to check URL joining)."""
    return served[0].removesuffix("raw/")


def test_fetch_from_server(
    served: tuple[str, Path, list[str]], de_en: Path, tmp_path: Path
) -> None:
    _, _, requests = served
    dest = tmp_path / "out"
    paths = fetch.fetch_multi30k(dest, ("de", "en"), mirror=_base_url(served), progress=False)
    assert paths == [dest / name for name in DE_EN]
    assert sorted(p.name for p in dest.iterdir()) == sorted(DE_EN)
    for name in DE_EN:
        assert (dest / name).read_bytes() == (de_en / name).read_bytes()
    assert sorted(requests) == sorted(f"/{name}" for name in DE_EN)


def test_second_fetch_skips(
    served: tuple[str, Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "out"
    fetch.fetch_multi30k(dest, ("de",), mirror=_base_url(served), progress=False)
    served[2].clear()
    fetch.fetch_multi30k(dest, ("de",), mirror=_base_url(served), progress=False)
    assert served[2] == []
    assert "train.de.gz: up to date" in capsys.readouterr().err


def test_resume_and_repair(
    served: tuple[str, Path, list[str]], de_en: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    shutil.copyfile(de_en / "train.de.gz", dest / "train.de.gz")
    (dest / "val.de.gz").write_bytes(b"stale partial download")
    fetch.fetch_multi30k(dest, ("de",), mirror=_base_url(served), progress=False)
    assert sorted(served[2]) == ["/test_2016_flickr.de.gz", "/val.de.gz"]
    assert (dest / "val.de.gz").read_bytes() == (de_en / "val.de.gz").read_bytes()


def test_checksum_mismatch(served: tuple[str, Path, list[str]], tmp_path: Path) -> None:
    base, root = _base_url(served), served[1]
    (root / "val.de.gz").write_bytes(b"corrupted")
    dest = tmp_path / "out"
    with pytest.raises(DataError) as err:
        fetch.fetch_multi30k(dest, ("de",), mirror=base, progress=False)
    expected = fetch.MULTI30K_FILES["val.de.gz"]
    got = hashlib.sha256(b"corrupted").hexdigest()
    message = f"{base}val.de.gz: checksum mismatch (expected {expected}, got {got})"
    assert str(err.value) == message
    # train.de.gz came first and is fine; nothing else, not even a temp file, is left.
    assert [p.name for p in dest.iterdir()] == ["train.de.gz"]


def test_http_error(served: tuple[str, Path, list[str]], tmp_path: Path) -> None:
    base, root = _base_url(served), served[1]
    (root / "train.de.gz").unlink()
    with pytest.raises(DataError) as err:
        fetch.fetch_multi30k(tmp_path / "out", ("de",), mirror=base, progress=False)
    assert str(err.value) == f"{base}train.de.gz: HTTP error 404 (File not found)"
    assert not (tmp_path / "out").exists()  # created for the fetch, left empty: removed


def test_a_full_disk_names_the_file_not_the_download(
    de_en: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest, real_open = tmp_path / "out", Path.open

    class FullDisk:
        def __init__(self, file: Any) -> None:
            self.file = file

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *exc: object) -> None:
            self.file.close()

    def open_full(path: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        file = real_open(path, mode, *args, **kwargs)
        return FullDisk(file) if mode == "wb" and path.parent == dest else file

    monkeypatch.setattr(Path, "open", open_full)
    with pytest.raises(MtError) as err:
        fetch.fetch_multi30k(dest, ("de",), mirror=str(de_en), progress=False)
    # Not "cannot download", nor advice to use a mirror: the disk is full.
    assert str(err.value) == f"{dest / 'train.de.gz'}: cannot write (No space left on device)"
    assert not dest.exists()


def test_unreachable(tmp_path: Path) -> None:
    # Port 9 (discard) on loopback: nothing listens there, so the connection is refused.
    with pytest.raises(DataError, match=r"^http://127\.0\.0\.1:9/train\.de\.gz: cannot download"):
        fetch.fetch_multi30k(tmp_path, ("de",), mirror="http://127.0.0.1:9", progress=False)


def test_offline_without_a_mirror_says_how_to_use_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetch, "MULTI30K_URL", "http://127.0.0.1:9/")  # the default, unreachable
    monkeypatch.delenv(fetch.MIRROR_ENV, raising=False)
    with pytest.raises(DataError) as err:
        fetch.fetch_multi30k(tmp_path / "out", ("de",), progress=False)
    assert str(err.value).startswith("http://127.0.0.1:9/train.de.gz: cannot download (")
    assert str(err.value).endswith(
        "); without internet, set MT_DATA_MIRROR (or --mirror) to a directory or URL holding "
        "the files"
    )
    assert not (tmp_path / "out").exists()


def test_local_directory_mirror(
    served: tuple[str, Path, list[str]], de_en: Path, tmp_path: Path
) -> None:
    root = served[1]
    dest = tmp_path / "out"
    fetch.fetch_multi30k(dest, ("en",), mirror=str(root), progress=False)
    assert (dest / "val.en.gz").read_bytes() == (de_en / "val.en.gz").read_bytes()
    assert served[2] == []
    (root / "test_2016_flickr.en.gz").unlink()
    (dest / "test_2016_flickr.en.gz").unlink()
    with pytest.raises(DataError) as err:  # found missing before anything is copied
        fetch.fetch_multi30k(dest, ("en", "de"), mirror=str(root), progress=False)
    assert str(err.value) == f"mirror {root}: no test_2016_flickr.en.gz"
    assert sorted(p.name for p in dest.iterdir()) == ["train.en.gz", "val.en.gz"]


def test_a_malformed_mirror_url_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "out"
    with pytest.raises(DataError) as err:
        fetch.fetch_multi30k(dest, ("de",), mirror="http://[::1", progress=False)
    assert str(err.value) == "--mirror http://[::1: not a valid URL (Invalid IPv6 URL)"
    monkeypatch.setenv(fetch.MIRROR_ENV, "http://[::1")
    with pytest.raises(DataError, match=rf"^{fetch.MIRROR_ENV} http://\[::1: not a valid URL"):
        fetch.fetch_multi30k(dest, ("de",), progress=False)
    assert not dest.exists()


def test_env_mirror(
    served: tuple[str, Path, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = served[0]  # the /raw/ path does not exist: proves the env URL is joined correctly
    monkeypatch.setenv(fetch.MIRROR_ENV, url)
    with pytest.raises(DataError, match=r"/raw/train\.de\.gz: HTTP error 404"):
        fetch.fetch_multi30k(tmp_path / "out", ("de",), progress=False)
    monkeypatch.setenv(fetch.MIRROR_ENV, _base_url(served))
    fetch.fetch_multi30k(tmp_path / "out", ("de",), progress=False)
    assert len(served[2]) == 1 + 3


def test_unknown_language(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        fetch.fetch_multi30k(tmp_path, ("de", "xx"), progress=False)
    assert str(err.value) == "unknown Multi30k language(s): xx (valid: de, en, fr, cs)"
    assert list(tmp_path.iterdir()) == []


def test_unpinned_language_checks_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # cs has no pinned checksum: a well-formed gzip with the right line count is accepted.
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for split, lines in fetch.MULTI30K_LINES.items():
        (mirror / f"{split}.cs.gz").write_bytes(gzip.compress(b"Pes.\n" * lines))
    dest = tmp_path / "out"
    fetch.fetch_multi30k(dest, ("cs",), mirror=str(mirror), progress=False)
    assert "warning: val.cs.gz: no pinned checksum" in capsys.readouterr().err
    assert (dest / "val.cs.gz").read_bytes() == (mirror / "val.cs.gz").read_bytes()
    (mirror / "val.cs.gz").write_bytes(gzip.compress(b"x\n" * 10))
    (dest / "val.cs.gz").unlink()
    with pytest.raises(DataError) as err:
        fetch.fetch_multi30k(dest, ("cs",), mirror=str(mirror), progress=False)
    assert str(err.value) == f"{mirror}/val.cs.gz: expected 1014 lines, got 10"
    (mirror / "val.cs.gz").write_bytes(b"plain text")
    with pytest.raises(DataError, match=r"val\.cs\.gz: not a valid gzip file"):
        fetch.fetch_multi30k(dest, ("cs",), mirror=str(mirror), progress=False)
    assert not (dest / "val.cs.gz").exists()


def test_french_is_pinned(tmp_path: Path) -> None:
    # A French file of the right format and line count but other bytes is refused by its sum.
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for split, lines in fetch.MULTI30K_LINES.items():
        (mirror / f"{split}.fr.gz").write_bytes(gzip.compress(b"Un chien.\n" * lines))
    with pytest.raises(DataError) as err:
        fetch.fetch_multi30k(tmp_path / "out", ("fr",), mirror=str(mirror), progress=False)
    expected = fetch.MULTI30K_FILES["train.fr.gz"]
    got = hashlib.sha256((mirror / "train.fr.gz").read_bytes()).hexdigest()
    assert str(err.value) == (
        f"{mirror}/train.fr.gz: checksum mismatch (expected {expected}, got {got})"
    )


def test_fetch_french(multi30k: Path, tmp_path: Path) -> None:
    if not (multi30k / "train.fr.gz").is_file():
        pytest.skip(f"no French Multi30k files in {multi30k}")
    dest = tmp_path / "real"
    paths = fetch.fetch_data("multi30k", dest, "de,en,fr", mirror=str(multi30k), progress=False)
    assert [p.name for p in paths] == fetch.multi30k_names(["de", "en", "fr"])
    for path in paths:
        assert path.read_bytes() == (multi30k / path.name).read_bytes()
