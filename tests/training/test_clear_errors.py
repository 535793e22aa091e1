"""Bad input and a full disk end in one clear line and exit code 1, never a traceback."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from multvae_cli import main
from training.readers import read_interactions

ROWS = [(f"u{u}", f"i{(u * 7 + k) % 40}") for u in range(80) for k in range(8)]


def _csv(path: Path, encoding: str = "utf-8") -> Path:
    path.write_text("user,item\n" + "".join(f"{u},{i}\n" for u, i in ROWS), encoding=encoding)
    return path


def test_a_utf8_bom_header_is_read_like_any_other(tmp_path: Path) -> None:
    plain = read_interactions(_csv(tmp_path / "plain.csv"))
    bom = read_interactions(_csv(tmp_path / "bom.csv", encoding="utf-8-sig"))
    assert (bom.user == plain.user).all()
    assert bom.item_ids.tolist() == plain.item_ids.tolist()


def test_a_list_typed_parquet_id_column_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "lists.parquet"
    pq.write_table(pa.table({"user": [u for u, _ in ROWS], "item": [[i] for _, i in ROWS]}), path)
    assert main(["train", "--data", str(path), "--out", str(tmp_path / "m"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "column 'item' (item id) has type list<" in err
    assert "strings or integers, one interaction per row" in err
    assert "Traceback" not in err


def test_format_csv_on_a_parquet_file_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "clicks.parquet"
    pq.write_table(pa.table({"user": [u for u, _ in ROWS], "item": [i for _, i in ROWS]}), path)
    out = str(tmp_path / "m")
    assert main(["train", "--data", str(path), "--format", "csv", "--out", out, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.strip().endswith("is a Parquet file, not csv: pass --format parquet (or auto)")
    binary = tmp_path / "blob.csv"
    binary.write_bytes(b"\x00\x01\xffbinary\n" * 10)
    assert main(["train", "--data", str(binary), "--out", out, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "is not a csv text file: its first line is not UTF-8 text" in err
    assert "\\x00" not in err
    assert "\x00" not in err


def _no_bigger_files_than(limit: int) -> None:
    # EFBIG on any write past `limit` bytes: a full disk as the writer sees it (Python
    # ignores SIGXFSZ, so the write fails instead of killing the process).
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.slow
def test_training_onto_a_full_disk_is_one_line_and_exit_1(tmp_path: Path) -> None:
    data, models = _csv(tmp_path / "clicks.csv"), tmp_path / "models"
    run = subprocess.run(
        [sys.executable, "-m", "multvae_cli", "train", "--data", str(data), "--out", str(models),
         "--epochs", "1", "--hidden-dims", "none", "--latent-dim", "64", "--quiet",
         "--device", "cpu", "--heldout-users", "10"],
        capture_output=True, text=True, preexec_fn=lambda: _no_bigger_files_than(4096),
        timeout=300,
    )  # fmt: skip
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    # The first epoch's checkpoint hits the limit: training stops there, not after the run.
    # (A version that cannot be written: tests/multvae/test_artifacts.py.)
    assert last.startswith("multvae train: error: cannot write the training checkpoint")
    assert "file size limit" in last
    assert not (models / "CURRENT").exists()
    assert not any((models / "versions").glob("*"))  # no partial version
    assert [p.name for p in models.iterdir()] == []  # nor a partial checkpoint
