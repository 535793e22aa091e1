"""The report: files exist, carry the numbers evaluate prints, and the plots are real PNGs."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from training.evaluate import Evaluation, format_evaluation
from training.report import (
    CURVE_PNG,
    QUINTILE_PNG,
    data_summary,
    report_dir,
    write_report,
)
from training.train import EpochRecord

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def evaluation(seed: int, shift: float, n: int = 40) -> Evaluation:
    rng = np.random.default_rng(seed)
    sizes = np.random.default_rng(0).integers(4, 120, n).astype(np.int64)  # same users
    base = np.random.default_rng(1).random(n)
    ndcg = np.clip(base + shift + rng.normal(0, 0.02, n), 0, 1)
    return Evaluation(
        {"recall@20": ndcg * 0.9, "recall@50": np.sqrt(ndcg), "ndcg@100": ndcg}, sizes
    )


def history(n: int = 12) -> list[EpochRecord]:
    return [
        EpochRecord(e, 10 * e, 500.0 - e, min(0.2, e / 40), 0.3 + 0.01 * e, 0.1, 1000.0)
        for e in range(1, n + 1)
    ]


STATS = {
    "users": 938,
    "items": 1415,
    "train_clicks": 43606,
    "val_fold_in": 4839,
    "val_targets": 1161,
    "test_fold_in": 4612,
    "test_targets": 1105,
    "val_users": 100,
    "test_users": 100,
}


def assert_png(data: bytes) -> None:
    assert data.startswith(PNG_MAGIC)
    image = imread(io.BytesIO(data), format="png")  # decodes, so the file is a whole PNG
    assert image.ndim == 3
    assert image.shape[0] > 100
    assert image.shape[1] > 100


@pytest.fixture
def written(tmp_path: Path) -> tuple[Path, Path, Evaluation, dict[str, Evaluation]]:
    model = evaluation(2, 0.05)
    baselines = {"popularity": evaluation(3, -0.2), "ease": evaluation(4, 0.0)}
    md, page = write_report(
        report_dir(tmp_path, "v1"),
        model,
        baselines,
        history(),
        data_summary(STATS),
        anneal_search=history(20),
        best_epoch=9,
        baseline_params={"ease": {"l2": 200.0}},
        title="Evaluation report: v1",
    )
    return md, page, model, baselines


def test_report_files_exist_next_to_the_version(
    written: tuple[Path, Path, Evaluation, dict[str, Evaluation]], tmp_path: Path
) -> None:
    md, page, _, _ = written
    assert md.parent == tmp_path / "reports" / "v1"
    assert page.parent == md.parent
    names = sorted(p.name for p in md.parent.iterdir())
    assert names == sorted(["report.md", "report.html", CURVE_PNG, QUINTILE_PNG])  # no temps


def test_report_contains_the_numbers_evaluate_prints(
    written: tuple[Path, Path, Evaluation, dict[str, Evaluation]],
) -> None:
    md, page, model, baselines = written
    text, document = md.read_text(), page.read_text()
    for ev in (model, *baselines.values()):
        printed = format_evaluation("test", ev)
        numbers = re.findall(r"\d\.\d{4} ± \d\.\d{4}", printed)
        assert len(numbers) == 3 + 5  # three metrics, five quintiles
        for number in numbers:
            assert number in text
            assert number in document
    assert "EASE" in text
    assert "l2=200.0" in text
    assert "Paired t-tests: Mult-VAE vs the best baseline, EASE" in text
    # Table 1: 938 users, 1,415 items, 55,323 interactions, density 4.17 %.
    assert "55,323" in text
    assert "4.17%" in text


def test_markdown_links_and_html_embeds_valid_pngs(
    written: tuple[Path, Path, Evaluation, dict[str, Evaluation]],
) -> None:
    md, page, _, _ = written
    text = md.read_text()
    for name in (CURVE_PNG, QUINTILE_PNG):
        assert f"]({name})" in text
        assert_png((md.parent / name).read_bytes())
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page.read_text())
    assert len(embedded) == 2
    for b64 in embedded:
        assert_png(base64.b64decode(b64))
    assert base64.b64decode(embedded[0]) == (md.parent / CURVE_PNG).read_bytes()


def test_stars_mark_a_clear_win_and_not_a_tie(tmp_path: Path) -> None:
    model = evaluation(2, 0.0)
    same = Evaluation({k: v.copy() for k, v in model.per_user.items()}, model.fold_in_sizes)
    md, _ = write_report(tmp_path / "tie", model, {"ease": same}, [], data_summary(STATS))
    text = md.read_text()
    assert paired_row(text).endswith("| +0.0000 ± 0.0000 | 0.00 | 1 | n.s. |")
    assert "no training curve" in text
    assert not (tmp_path / "tie" / CURVE_PNG).exists()

    clear = evaluation(2, 0.3)
    md, _ = write_report(tmp_path / "win", clear, {"ease": model}, [], data_summary(STATS))
    assert paired_row(md.read_text()).endswith(" | *** |")


def paired_row(markdown: str) -> str:
    """The NDCG@100 row of the paired t-test table."""
    section = markdown.split("## Paired t-tests")[1].split("##")[0]
    return next(line for line in section.splitlines() if line.startswith("| NDCG@100 |"))


def test_report_without_baselines(tmp_path: Path) -> None:
    md, page = write_report(tmp_path, evaluation(2, 0.0), {}, history(), data_summary(STATS))
    assert "No baselines were scored" in md.read_text()
    assert page.is_file()


# -- through the command line: train, then evaluate --baselines --report --------------------


def write_block_csv(path: Path, seed: int = 0) -> None:
    """200 users, two tastes of 20 items each; every user rates 8 items of their block 5."""
    rng = np.random.default_rng(seed)
    lines = ["userId,movieId,rating"]
    for u in range(200):
        for j in rng.choice(20, 8, replace=False):
            lines.append(f"{u},{(u % 2) * 20 + j},5")
    path.write_text("\n".join(lines) + "\n")


def test_evaluate_with_baselines_writes_the_report_it_prints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from multvae_cli import main

    data, model_dir = tmp_path / "ratings.csv", tmp_path / "model"
    write_block_csv(data)
    argv = ["train", "--data", str(data), "--out", str(model_dir), "--heldout-users", "20"]
    assert main([*argv, "--epochs", "3", "--quiet"]) == 0
    capsys.readouterr()

    argv = ["evaluate", str(model_dir), "--data", str(data), "--report"]
    assert main([*argv, "--baselines", "popularity,ease"]) == 0
    printed = capsys.readouterr().out
    reports = list((model_dir / "reports").iterdir())
    assert len(reports) == 1
    assert (model_dir / "versions" / reports[0].name).is_dir()  # named after the version
    text = (reports[0] / "report.md").read_text()
    numbers = re.findall(r"\d\.\d{4} ± \d\.\d{4}", printed)
    assert len(numbers) == 3 * 8  # model, popularity, EASE: three metrics and five quintiles
    assert all(n in text for n in numbers)
    assert "| EASE |" in text
    assert "| # of users | 200 |" in text
    assert_png((reports[0] / CURVE_PNG).read_bytes())
    assert f"report: {reports[0] / 'report.md'}" in printed


def test_evaluate_baselines_reuses_the_recorded_data_while_it_is_unchanged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # It used to refuse without --data although config.json records the file.
    from multvae_cli import main

    data, model_dir = tmp_path / "ratings.csv", tmp_path / "model"
    write_block_csv(data)
    argv = ["train", "--data", str(data), "--out", str(model_dir), "--heldout-users", "20"]
    assert main([*argv, "--epochs", "2", "--quiet"]) == 0
    capsys.readouterr()

    evaluate = ["evaluate", str(model_dir), "--baselines", "popularity", "--json"]
    assert main(evaluate) == 0
    out, err = capsys.readouterr()
    assert f"re-reading {data}" in err
    result = json.loads(out)
    assert result["data"] == str(data)
    assert result["baselines"]["popularity"]["test"]["users"] == 20

    write_block_csv(data, seed=1)  # same users and items, other clicks: a changed file
    assert main(evaluate) == 1
    err = capsys.readouterr().err
    assert f"{data} is not the data version" in err
    assert "fingerprint" in err
    assert "pass --data with the original file" in err

    data.unlink()
    assert main(evaluate) == 1
    err = capsys.readouterr().err
    assert f"was trained on {data}, which is no longer there" in err


def test_a_one_user_group_reports_its_undefined_standard_error(tmp_path: Path) -> None:
    one = Evaluation({m: np.array([0.5]) for m in ("recall@20", "recall@50", "ndcg@100")},
                     np.array([7]))
    assert "0.5000 ± n/a" in format_evaluation("test", one)
    md, _ = write_report(tmp_path, one, {"popularity": one}, [], data_summary(STATS))
    assert "0.5000 ± n/a" in md.read_text()


def test_evaluate_at_cutoffs_prints_reports_and_serialises_the_same_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from multvae_cli import main

    data, model_dir = tmp_path / "ratings.csv", tmp_path / "model"
    write_block_csv(data)
    argv = ["train", "--data", str(data), "--out", str(model_dir), "--heldout-users", "20",
            "--model", "multvae"]  # fmt: skip
    assert main([*argv, "--epochs", "3", "--quiet"]) == 0
    capsys.readouterr()

    argv = ["evaluate", str(model_dir), "--data", str(data), "--k", "10,5", "--report"]
    assert main([*argv, "--baselines", "popularity"]) == 0
    printed = capsys.readouterr().out
    assert "Precision" in printed
    assert "Coverage" in printed
    assert "MRR@40" in printed  # 40 items: the ranking is the whole catalogue
    text = next((model_dir / "reports").iterdir()).joinpath("report.md").read_text()
    assert "| Mult-VAE | @5 |" in text
    assert "| Popularity | @10 |" in text
    rows = [line.split() for line in printed.splitlines() if line.startswith("  @")]
    assert len(rows) == 2 * 2  # model and popularity at two cut-offs
    for row in rows:  # "@5 0.1000 ± 0.0688 ... 0.7750": the report's row, digit for digit
        assert " | ".join([row[0], *(" ".join(row[i:i + 3]) for i in (1, 4, 7)), row[10]]) in text

    assert main(["evaluate", str(model_dir), "--k", "5,10", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["test"]
    assert {"recall@5", "ndcg@10", "precision@5", "mrr@40", "ndcg@100"} <= set(out["metrics"])
    assert set(out["coverage"]) == {"coverage@5", "coverage@10"}
    assert 0.0 < out["coverage"]["coverage@5"] <= out["coverage"]["coverage@10"] <= 1.0

    with pytest.raises(SystemExit):
        main(["evaluate", str(model_dir), "--k", "10,top"])
    assert "comma-separated whole numbers >= 1, e.g. 10,20,50,100" in capsys.readouterr().err
