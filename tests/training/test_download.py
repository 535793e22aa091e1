"""`multvae data download`: against a local HTTP server serving fixture archives, never the
real hosts. Resume (HTTP Range), sha256, unpacking, the offline message, then training."""

from __future__ import annotations

import hashlib
import io
import socket
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from multvae_cli import main
from training.download import DATASETS


def ml100k_zip() -> bytes:
    """ml-100k.zip's layout: ml-100k/u.data (user, item, rating, time) and u.item titles."""
    rng = np.random.default_rng(0)
    lines = [
        f"{u}\t{(u % 2) * 15 + j + 1}\t{5 if j % 3 else 2}\t881250949"
        for u in range(1, 81)
        for j in rng.choice(15, 9, replace=False)
    ]
    titles = [f"{i}|Movie {i} (1995)|01-Jan-1995||http://x|0" for i in range(1, 31)]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ml-100k/u.data", "\n".join(lines) + "\n")
        zf.writestr("ml-100k/u.item", "\n".join(titles) + "\n")
    return buf.getvalue()


def msd_zip() -> bytes:
    """train_triplets.txt.zip: the triplets file at the archive's root."""
    lines = [f"u{u:03d}\tSOAAA{i:03d}\t{1 + (u + i) % 4}" for u in range(30) for i in range(6)]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("train_triplets.txt", "\n".join(lines) + "\n")
    return buf.getvalue()


@dataclass
class Mirror:
    url: str
    files: dict[str, bytes]
    ranges: list[str | None] = field(default_factory=list)  # Range header of each GET
    cut_first_at: int | None = None  # the first response stops after this many bytes


@pytest.fixture
def mirror() -> Iterator[Mirror]:
    state = Mirror("", {})

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = state.files.get(self.path.rsplit("/", 1)[-1])
            if body is None:
                self.send_error(404)
                return
            wanted = self.headers.get("Range")
            state.ranges.append(wanted)
            start = int(wanted.removeprefix("bytes=").rstrip("-")) if wanted else 0
            self.send_response(206 if wanted else 200)
            if wanted:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            if state.cut_first_at is not None and len(state.ranges) == 1:
                self.wfile.write(body[start : state.cut_first_at])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)  # the connection drops mid-file
                self.close_connection = True
                return
            self.wfile.write(body[start:])

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/mirror"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_an_interrupted_download_resumes_is_checked_unpacked_and_trains(
    mirror: Mirror, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = ml100k_zip()
    digest = hashlib.sha256(archive).hexdigest()
    mirror.files["ml-100k.zip"] = archive
    mirror.cut_first_at = len(archive) // 2
    to = tmp_path / "data"

    argv = ["data", "download", "ml-100k", "--to", str(to), "--base-url", mirror.url,
            "--sha256", digest, "--quiet"]  # fmt: skip
    assert main(argv) == 0

    assert mirror.ranges == [None, f"bytes={len(archive) // 2}-"]  # resumed, not restarted
    out = capsys.readouterr().out
    assert f"multvae train --data {to / 'ml-100k'} --preset ml-100k" in out
    assert (to / "ml-100k" / "u.data").is_file()
    assert not list(to.glob("*.part"))
    assert main(argv) == 0  # a second run finds it and fetches nothing
    assert "already there" in capsys.readouterr().out
    assert len(mirror.ranges) == 2

    models = tmp_path / "models"
    train = ["train", "--data", str(to / "ml-100k"), "--out", str(models), "--heldout-users",
             "10", "--epochs", "1", "--device", "cpu", "--quiet"]  # fmt: skip
    assert main(train) == 0
    out = capsys.readouterr().out
    assert "20 items" in out  # u.data read as MovieLens-100K, filtered as usual
    assert "(CURRENT)" in out


def test_the_published_digest_refuses_another_archive(
    mirror: Mirror,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mirror.files["ml-100k.zip"] = ml100k_zip()  # not GroupLens's archive
    monkeypatch.setenv("MULTVAE_DATA_BASE_URL", mirror.url)
    to = tmp_path / "data"
    assert main(["data", "download", "ml-100k", "--to", str(to), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"expected {DATASETS['ml-100k'].sha256}" in err
    assert "partial file was removed" in err
    assert not (to / "ml-100k").exists()
    assert not list(to.glob("*.part"))  # a corrupt file is not resumed next time


def test_without_a_published_digest_the_digest_is_printed(
    mirror: Mirror, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = msd_zip()
    mirror.files["train_triplets.txt.zip"] = archive
    to = tmp_path / "data"
    argv = ["data", "download", "msd", "--to", str(to), "--base-url", mirror.url, "--quiet"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    digest = hashlib.sha256(archive).hexdigest()
    assert f"no published sha256 is known for msd; the archive's is {digest}" in err
    assert (to / "msd" / "train_triplets.txt").is_file()
    assert f"--data {to / 'msd'} --preset msd" in out


def test_offline_is_a_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["data", "download", "ml-1m", "--to", str(tmp_path), "--base-url",
            f"http://127.0.0.1:{port}", "--quiet"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"cannot reach http://127.0.0.1:{port}/ml-1m.zip" in err
    assert "offline" in err
    assert "--archive FILE" in err


def test_an_archive_fetched_elsewhere_is_checked_and_unpacked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = tmp_path / "ml-100k.zip"
    archive.write_bytes(ml100k_zip())
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    argv = ["data", "download", "ml-100k", "--to", str(tmp_path / "data"),
            "--archive", str(archive), "--sha256", digest]  # fmt: skip
    assert main(argv) == 0
    assert (tmp_path / "data" / "ml-100k" / "u.item").is_file()
    assert archive.is_file()  # the user's file is left alone
