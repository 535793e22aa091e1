"""The evaluation report: Table 1's data summary, the metrics with standard errors for the model
and every baseline, paired t-tests against the best baseline, the training curve (Figure 1
style) and NDCG@100 per fold-in activity quintile (Figure 3 style).

Files go to ``MODEL_DIR/reports/<version>/`` (:func:`report_dir`): report.md (images by
relative path), report.html (the same content, images embedded as base64, one self-contained
file) and the two PNGs. Not inside ``versions/<version>/``: a version is immutable once its
manifest is written (the service verifies it and may be reading it), and a report can be
regenerated with other baselines without touching what is served. Every file is written to a
temporary name and renamed, images first, so a reader never sees a half-written file or a
page whose images are missing.

Numbers are formatted exactly as ``format_evaluation`` prints them (``mean ± se``, 4 places),
so the report and ``multvae evaluate`` agree digit for digit.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from multvae.artifacts import ModelVersion, atomic_write
from training.baselines import BaselineResult
from training.evaluate import CUTOFF_KINDS, Evaluation, mean_se
from training.stats import PairedTest, paired_tests, quintile_tests

REPORTS = "reports"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
CURVE_PNG = "training_curve.png"
QUINTILE_PNG = "ndcg_quintiles.png"
METRICS = ("recall@20", "recall@50", "ndcg@100")
LABELS = {"recall@20": "Recall@20", "recall@50": "Recall@50", "ndcg@100": "NDCG@100"}
DISPLAY = {"popularity": "Popularity", "ease": "EASE", "wmf": "WMF (ALS)"}
SUMMARY_LABELS = {
    "users": "# of users",
    "items": "# of items",
    "interactions": "# of interactions",
    "density": "% of interactions (density)",
    "heldout_users": "# of held-out users (validation / test)",
}

Row = list[str]
MODEL_NAMES = {"multvae": "Mult-VAE", "multdae": "Mult-DAE", "recvae": "RecVAE"}


def report_dir(model_dir: Path | str, version: str) -> Path:
    return Path(model_dir) / REPORTS / version


# -- data summary (Table 1) ------------------------------------------------------------------


def data_summary(stats: Mapping[str, Any]) -> dict[str, Any]:
    """Table 1's rows from split statistics (``Split.stats``, or config.json's ``split``).

    Interactions are the clicks the split keeps: training users' plus held-out users' fold-in
    and targets on items the model knows. Without split statistics: the item count only.
    """
    if not {"users", "items", "train_clicks"} <= set(stats):
        return {"items": int(stats["items"])} if "items" in stats else {}
    clicks = int(stats["train_clicks"]) + sum(
        int(stats.get(f"{g}_{part}", 0)) for g in ("val", "test") for part in ("fold_in", "targets")
    )
    users, items = int(stats["users"]), int(stats["items"])
    return {
        "users": users,
        "items": items,
        "interactions": clicks,
        "density": clicks / max(1, users * items),
        "heldout_users": f"{stats.get('val_users', '?')} / {stats.get('test_users', '?')}",
    }


# -- tables ----------------------------------------------------------------------------------


def _name(key: str) -> str:
    return DISPLAY.get(key, key)


def _records(history: Sequence[Any]) -> list[dict[str, Any]]:
    return [asdict(r) if is_dataclass(r) and not isinstance(r, type) else dict(r) for r in history]


def best_baseline(baselines: Mapping[str, Evaluation]) -> str | None:
    """The strongest competitor: highest test NDCG@100."""
    if not baselines:
        return None
    return max(baselines, key=lambda n: baselines[n].per_user["ndcg@100"].mean())


def _metrics_table(
    methods: Mapping[str, Evaluation], params: Mapping[str, Mapping[str, Any]]
) -> list[Row]:
    # MRR (scored with --k) is one number per method: a column here, not a cut-off row.
    mrr = next(iter(methods.values())).mrr_metric
    metrics = (*METRICS, mrr) if mrr is not None else METRICS
    header = [LABELS.get(m, m.upper()) for m in metrics]
    rows = [["method", *header, "chosen on validation"]]
    for name, ev in methods.items():
        s = ev.summary()
        chosen = ", ".join(f"{k}={v}" for k, v in params.get(name, {}).items())
        cells = [mean_se(s[m]["mean"], s[m]["se"]) if m in s else "-" for m in metrics]
        rows.append([name, *cells, chosen or "-"])
    return rows


def _cutoff_table(methods: Mapping[str, Evaluation]) -> list[Row]:
    """``multvae evaluate --k``'s table for every method: one row per method and cut-off."""
    rows = [["method", "cut-off", *(label for _, label in CUTOFF_KINDS), "Coverage"]]
    for name, ev in methods.items():
        rows += [[name, f"@{k}", *cells] for k, cells in ev.cutoff_rows()]
    return rows


def _test_row(label: str, t: PairedTest) -> Row:
    tval = f"{t.t:.2f}" if np.isfinite(t.t) else ("inf" if t.t > 0 else "-inf")
    return [
        label,
        f"{t.mean_a:.4f}",
        f"{t.mean_b:.4f}",
        t.diff_text,
        tval,
        f"{t.p:.3g}",
        t.stars or "n.s.",
    ]


def _tests_table(model: str, base: str, tests: Mapping[str, PairedTest]) -> list[Row]:
    rows = [["metric", model, base, "difference ± se", "t", "p", ""]]
    rows += [_test_row(LABELS[m], tests[m]) for m in METRICS if m in tests]
    return rows


def _quintile_table(
    methods: Mapping[str, Evaluation], tests: Sequence[PairedTest] | None
) -> list[Row]:
    first = next(iter(methods.values()))
    header = ["fold-in quintile", *methods]
    if tests is not None:
        header += ["p (model vs best baseline)"]
    rows = [header]
    per_method = {n: ev.quintiles() for n, ev in methods.items()}
    for i, q in enumerate(first.quintiles()):
        label = f"Q{q['quintile']}: {q['min_clicks']}-{q['max_clicks']} clicks, {q['users']} users"
        row = [label, *(mean_se(per_method[n][i]["mean"], per_method[n][i]["se"]) for n in methods)]
        if tests is not None:
            row.append(f"{tests[i].p:.3g} {tests[i].stars}".strip())
        rows.append(row)
    return rows


def _md_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def _html_table(rows: list[Row]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:]
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# -- plots -----------------------------------------------------------------------------------


def _png(fig: Figure) -> bytes:
    # FigureCanvasAgg directly: no pyplot global state, works headless and in threads.
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def training_curve_png(
    history: Sequence[Any], anneal_search: Sequence[Any] = (), best_epoch: int | None = None
) -> bytes:
    """Figure 1 style: validation NDCG@100 (left axis) and beta (right axis) per epoch."""
    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.add_subplot()
    beta_ax = ax.twinx()
    runs = [("training run", _records(history), "C0")]
    if anneal_search:
        runs.insert(0, ("anneal search (beta -> 1)", _records(anneal_search), "C7"))
    for label, recs, color in runs:
        epochs = [r["epoch"] for r in recs]
        ax.plot(
            epochs, [r["val_ndcg_at_100"] for r in recs], color=color, label=f"NDCG@100, {label}"
        )
        betas = [r["beta"] for r in recs]
        if any(betas):  # the DAE has no beta
            beta_ax.plot(epochs, betas, color=color, ls="--", lw=1, label=f"beta, {label}")
    if best_epoch is not None:
        ax.axvline(best_epoch, color="C3", ls=":", lw=1, label=f"best epoch ({best_epoch})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation NDCG@100")
    beta_ax.set_ylabel("beta (dashed)")
    handles = ax.get_legend_handles_labels()
    beta_handles = beta_ax.get_legend_handles_labels()
    ax.legend(handles[0] + beta_handles[0], handles[1] + beta_handles[1], fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    ax.set_title("Validation NDCG@100 and beta per epoch")
    return _png(fig)


def quintile_png(
    methods: Mapping[str, Evaluation],
    tests: Sequence[PairedTest] | None = None,
    against: str = "the best baseline",
) -> bytes:
    """Figure 3 style: NDCG@100 per fold-in activity quintile, one bar per method, 1 se bars,
    stars from the paired t-test of the first method against the best baseline."""
    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.add_subplot()
    first = next(iter(methods.values())).quintiles()
    x = np.arange(len(first))
    width = 0.8 / len(methods)
    tops = np.zeros(len(first))
    for i, (name, ev) in enumerate(methods.items()):
        qs = ev.quintiles()
        means = np.array([q["mean"] for q in qs])
        ses = np.array([q["se"] or 0.0 for q in qs])  # no error bar where it is undefined
        ax.bar(
            x + (i - (len(methods) - 1) / 2) * width,
            means,
            width,
            yerr=ses,
            capsize=2,
            label=name,
            color=f"C{i}",
        )
        tops = np.maximum(tops, means + ses)
    if tests is not None:
        for xi, (top, t) in enumerate(zip(tops, tests, strict=True)):
            if t.stars:
                ax.text(xi, top + 0.01, t.stars, ha="center", va="bottom", fontsize=11)
    ax.set_xticks(x, [f"{q['min_clicks']}-{q['max_clicks']}" for q in first])
    ax.set_xlabel("fold-in clicks (activity quintile, low to high)")
    ax.set_ylabel("NDCG@100 (test users)")
    ax.set_ylim(0, max(0.05, float(tops.max()) * 1.15))
    # Below the axes: inside, it would hide the error bars and stars of some quintile.
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=len(methods))
    ax.grid(axis="y", alpha=0.3)
    if tests is not None:
        ax.set_title(f"NDCG@100 by activity; stars: {next(iter(methods))} vs {against}")
    return _png(fig)


def _search_table(trials: Sequence[Mapping[str, Any]]) -> list[Row]:
    rows: list[Row] = [["trial", "state", "validation NDCG@100", "epochs", "parameters"]]
    for t in trials:
        score = t.get("val_ndcg@100")
        params = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in t["params"].items()
        )
        rows.append([str(t["number"]), t["state"], "-" if score is None else f"{score:.4f}",
                     str(t.get("epochs", "-")), params])
    return rows


# -- writing ---------------------------------------------------------------------------------


def write_report(
    out_dir: Path | str,
    model_eval: Evaluation,
    baseline_evals: Mapping[str, Evaluation],
    history: Sequence[Any],
    data: Mapping[str, Any],
    *,
    model_name: str = "Mult-VAE",
    title: str = "Evaluation report",
    anneal_search: Sequence[Any] = (),
    best_epoch: int | None = None,
    baseline_params: Mapping[str, Mapping[str, Any]] | None = None,
    search: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write report.md, report.html and the PNGs into ``out_dir``; returns (md, html) paths.

    ``history``/``anneal_search``: EpochRecords or their dicts (metrics.json's ``history``).
    ``data``: :func:`data_summary`'s mapping. Baselines are keyed by name (popularity, ease,
    wmf); every evaluation must cover the same test users in the same order. ``search``:
    metrics.json's ``search`` of a version written by ``multvae tune``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    methods = {model_name: model_eval, **{_name(k): v for k, v in baseline_evals.items()}}
    params = {_name(k): dict(v) for k, v in (baseline_params or {}).items()}
    best = best_baseline(baseline_evals)
    tests = q_tests = None
    if best is not None:
        tests = paired_tests(model_eval, baseline_evals[best])
        q_tests = quintile_tests(model_eval, baseline_evals[best])

    sections: list[tuple[str, str | list[Row]]] = []  # (heading, table rows or paragraph)
    summary_rows = [["", "value"]] + [
        [
            SUMMARY_LABELS.get(k, k.replace("_", " ")),
            f"{v:.2%}" if k == "density" else (f"{v:,}" if isinstance(v, int) else str(v)),
        ]
        for k, v in data.items()
    ]
    sections.append(("Data (Table 1)", summary_rows))
    sections.append(
        (
            f"Test metrics ({model_eval.n_users} users, mean ± standard error)",
            _metrics_table(methods, params),
        )
    )
    if model_eval.cutoffs:
        ks = ", ".join(str(k) for k in model_eval.cutoffs)
        sections.append((f"Test metrics at cut-offs {ks} (coverage: share of the catalogue "
                         "in anyone's top k)", _cutoff_table(methods)))
    if best is not None and tests is not None:
        sections.append(
            (
                f"Paired t-tests: {model_name} vs the best baseline, {_name(best)}",
                _tests_table(model_name, _name(best), tests),
            )
        )
    else:
        sections.append(("Paired t-tests", "No baselines were scored (pass --baselines)."))
    sections.append(
        ("NDCG@100 by fold-in activity quintile (Figure 3)", _quintile_table(methods, q_tests))
    )
    if search:
        sections.append(
            (
                f"Hyperparameter search (multvae tune: {len(search['trials'])} trials, "
                f"best {search['best_trial']})",
                _search_table(search["trials"]),
            )
        )

    images: list[tuple[str, str, bytes]] = []
    if history:
        images.append(
            (
                "Training curve (Figure 1)",
                CURVE_PNG,
                training_curve_png(history, anneal_search, best_epoch),
            )
        )
    images.append(
        (
            "NDCG@100 by activity quintile",
            QUINTILE_PNG,
            quintile_png(methods, q_tests, _name(best or "")),
        )
    )
    note = (
        "Stars: paired t-test, * p < 0.05, ** p < 0.01, *** p < 0.001 (as in the paper's "
        "Figure 3); n.s. = not significant. Error bars are one standard error."
    )
    if not history:
        note += " No training history was recorded, so there is no training curve."
        (out / CURVE_PNG).unlink(missing_ok=True)  # a stale one from an earlier report

    md = [f"# {title}", ""]
    page = [f"<h1>{html.escape(title)}</h1>"]
    for heading, body in sections:
        md += [f"## {heading}", "", body if isinstance(body, str) else _md_table(body), ""]
        page.append(f"<h2>{html.escape(heading)}</h2>")
        page.append(f"<p>{html.escape(body)}</p>" if isinstance(body, str) else _html_table(body))
    md += ["## Figures", ""]
    page.append("<h2>Figures</h2>")
    for caption, name, png in images:
        atomic_write(out / name, png)
        md += [f"![{caption}]({name})", ""]
        b64 = base64.b64encode(png).decode("ascii")
        page.append(
            f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    md += [note, ""]
    page.append(f"<p>{html.escape(note)}</p>")
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:"
        "collapse}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}"
        "img{max-width:100%}"
    )
    document = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>'
        f"{html.escape(title)}</title><style>{style}</style></head><body>"
        + "\n".join(page)
        + "</body></html>\n"
    )
    md_path, html_path = out / REPORT_MD, out / REPORT_HTML
    atomic_write(md_path, "\n".join(md).encode())
    atomic_write(html_path, document.encode())
    return md_path, html_path


def write_version_report(
    model_dir: Path | str,
    version: ModelVersion,
    model_eval: Evaluation,
    baselines: Mapping[str, BaselineResult],
) -> tuple[Path, Path]:
    """:func:`write_report` for a loaded model version into ``MODEL_DIR/reports/<version>/``.

    History, beta search and data summary come from the version's metrics.json/config.json.
    """
    metrics, config = version.metrics, version.config
    kind = config.get("model", {}).get("kind", "multvae")
    return write_report(
        report_dir(model_dir, version.version),
        model_eval,
        {name: r.test for name, r in baselines.items()},
        metrics.get("history", []),
        data_summary({"items": len(version.items), **config.get("split", {})}),
        model_name=MODEL_NAMES.get(kind, kind),
        title=f"Evaluation report: model version {version.version}",
        anneal_search=metrics.get("anneal_search", []),
        best_epoch=metrics.get("best_epoch"),
        baseline_params={name: r.params for name, r in baselines.items()},
        search=metrics.get("search"),
    )
