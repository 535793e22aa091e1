"""What the offline commands print, and where: the format asked for, progress before the wait,
and no traceback when the reader of a pipe goes away."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from multvae_cli import main

MULTVAE = [sys.executable, "-m", "multvae_cli"]


def test_generate_writes_parquet_for_a_parquet_file(tmp_path: Path) -> None:
    # It wrote CSV into x.parquet.
    out = tmp_path / "x.parquet"
    assert main(["generate", "--shape", "small", "--out", str(out)]) == 0
    table = pq.read_table(out)
    assert {"userId", "movieId", "rating"} <= set(table.column_names)
    assert table.num_rows > 1000


@pytest.mark.parametrize(
    ("name", "extra", "message"),
    [
        ("x.json", [], "cannot tell the format from 'x.json'"),
        ("x.parquet", ["--format", "csv"], "--format csv but 'x.parquet' ends in .parquet"),
    ],
)
def test_generate_refuses_a_format_it_cannot_tell_or_that_contradicts_the_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, extra: list[str], message: str
) -> None:
    assert main(["generate", "--shape", "small", "--out", str(tmp_path / name), *extra]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / name).exists()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    data = root / "ratings.csv"
    assert main(["generate", "--shape", "small", "--out", str(data)]) == 0
    argv = ["train", "--data", str(data), "--out", str(root / "m"), "--epochs", "1",
            "--hidden-dims", "none", "--latent-dim", "8", "--device", "cpu", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    return root / "m"


@pytest.mark.slow
def test_train_prints_the_data_summary_before_training(model_dir: Path) -> None:
    # The summary came only after training had finished.
    data = model_dir.parent / "ratings.csv"
    argv = [*MULTVAE, "train", "--data", str(data), "--out", str(model_dir.parent / "m2"),
            "--epochs", "2", "--hidden-dims", "none", "--device", "cpu"]  # fmt: skip
    # stdout (the lines) and stderr (the epoch bar) in one stream, in the order written.
    merged = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            check=True)  # fmt: skip
    text = merged.stdout
    assert text.index("reading ") < text.index("data: ") < text.index("epoch")


def test_compare_json_into_a_closed_pipe_is_quiet(model_dir: Path) -> None:
    # `multvae compare ... --json | head` printed a BrokenPipeError traceback.
    proc = subprocess.Popen(
        [*MULTVAE, "compare", str(model_dir), str(model_dir), "--json", "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    proc.stdout.close()  # the reader is gone before anything is written (as `head` exits)
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err
    assert "BrokenPipe" not in err
    assert proc.returncode == 141  # as a shell reports a command ended by SIGPIPE
