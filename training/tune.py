"""``multvae tune``: hyperparameter search on the validation users with Optuna.

Every trial trains one configuration (:func:`training.train.train`, early stopping as in
``multvae train``) and scores it by its best validation NDCG@100; hopeless trials are pruned on
the per-epoch validation curve (median rule). The first trials are the defaults of each model
kind searched, so the search can only improve on ``multvae train``. The study lives in SQLite
under the model directory (``MODEL_DIR/tune/study.db``), so a search stopped by Ctrl-C or by
its time budget resumes with ``--resume``. At the end the best trial's configuration is trained
again (same seed, same result), with the item-item path of ``multvae train`` when ``base``
has one (:mod:`training.itempath`; trials train the network alone, the path is fitted once to
the winner), and written as a normal version whose metrics.json holds the whole search.

The search space (:func:`suggest`; docs/tuning.md gives the reasons):

=================  ===========================================================
model              multvae, multdae, recvae
hidden layers      multvae/multdae: 0-2 layers; recvae: 1-5 dense layers
hidden width       300, 600, 1000
latent_dim         64, 128, 200, 400
dropout            0.0-0.8 (input dropout)
lr                 1e-4 - 3e-3, log scale
weight_decay       1e-6 - 1.0, log scale (L2 weight, scaled by 1 / batch size)
anneal_cap         0.0-1.0 (multvae only)
anneal_fraction    0.1-1.0: share of training until beta reaches its cap (multvae)
gamma              1e-3 - 3e-2, log scale (recvae: beta_u = gamma * |x_u|)
batch_size         the default rule (<= 500 users, split evenly), 100, 250
=================  ===========================================================
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna

from multvae.artifacts import current_version
from multvae.errors import TrainingError
from multvae.model import MODEL_KINDS, ModelKind
from training.pipeline import DataSpec, PreparedData, TrainedVersion, prepare, train_and_write
from training.train import EpochRecord, TrainConfig, plan, train

STUDY_DIR = "tune"
STUDY_FILE = "study.db"
STUDY_NAME = "multvae-tune"
# The median pruner compares a trial's validation curve with the finished trials' at the same
# epoch, after a few trials have finished and past the first epochs (which are noisy).
PRUNER_STARTUP_TRIALS = 3
PRUNER_WARMUP_EPOCHS = 10
WIDTHS = (300, 600, 1000)
LATENT_DIMS = (64, 128, 200, 400)
BATCH_SIZES = (0, 100, 250)  # 0: the default rule (at most 500 users, split evenly)


def parse_duration(text: str) -> float:
    """``"90s"``, ``"30m"``, ``"1.5h"`` or plain seconds -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text.lower())
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a duration: give e.g. 90s, 30m, 1.5h or seconds")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def default_params(config: TrainConfig, n_train_users: int) -> dict[str, Any]:
    """``config`` (a default configuration) as a point of the search space, to enqueue."""
    resolved = plan(config, n_train_users)
    hidden = resolved.hidden_dims
    params: dict[str, Any] = {
        "model": resolved.model,
        "hidden_width": hidden[0] if hidden else 600,
        "latent_dim": config.latent_dim,
        "dropout": config.dropout,
        "lr": config.lr,
        "weight_decay": max(resolved.weight_decay, 1e-6),
        "batch_size": config.batch_size or 0,
    }
    if resolved.model == "recvae":
        params.update(recvae_layers=len(hidden), gamma=config.gamma)
    else:
        params["hidden_layers"] = len(hidden)
    if resolved.model == "multvae" and isinstance(config.anneal_cap, float | int):
        params.update(anneal_cap=float(config.anneal_cap), anneal_fraction=config.anneal_fraction)
    return params


def suggest(
    trial: optuna.Trial | optuna.trial.FixedTrial, base: TrainConfig, models: Sequence[ModelKind]
) -> TrainConfig:
    """One point of the search space (module doc) on top of ``base`` (seed, device)."""
    model = trial.suggest_categorical("model", list(models))
    width = trial.suggest_categorical("hidden_width", list(WIDTHS))
    if model == "recvae":
        depth = trial.suggest_int("recvae_layers", 1, 5)
    else:
        depth = trial.suggest_int("hidden_layers", 0, 2)
    fields: dict[str, Any] = {
        "model": model,
        "hidden_dims": (width,) * depth,
        "latent_dim": trial.suggest_categorical("latent_dim", list(LATENT_DIMS)),
        "dropout": trial.suggest_float("dropout", 0.0, 0.8),
        "lr": trial.suggest_float("lr", 1e-4, 3e-3, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1.0, log=True),
        "batch_size": trial.suggest_categorical("batch_size", list(BATCH_SIZES)) or None,
    }
    if model == "multvae":
        fields["anneal_cap"] = trial.suggest_float("anneal_cap", 0.0, 1.0)
        fields["anneal_fraction"] = trial.suggest_float("anneal_fraction", 0.1, 1.0)
    if model == "recvae":
        fields["gamma"] = trial.suggest_float("gamma", 1e-3, 3e-2, log=True)
    return replace(base, **fields)


@dataclass
class TuneResult:
    study: optuna.Study
    best: TrainConfig
    trained: TrainedVersion
    search: list[dict[str, Any]]


def study_path(model_dir: Path | str) -> Path:
    return Path(model_dir) / STUDY_DIR / STUDY_FILE


def open_study(model_dir: Path | str, spec: DataSpec, resume: bool, seed: int) -> optuna.Study:
    """Create the study under ``model_dir``, or reopen it with ``resume`` (same data only)."""
    path = study_path(model_dir)
    if path.exists() and not resume:
        raise TrainingError(
            f"{path} already holds a search: pass --resume to continue it, or remove it to "
            "start over"
        )
    if resume and not path.exists():
        raise TrainingError(f"--resume: there is no search to resume at {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name=STUDY_NAME,
        storage=f"sqlite:///{path}",
        direction="maximize",
        load_if_exists=resume,
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(
            n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=PRUNER_WARMUP_EPOCHS
        ),
    )
    recorded = study.user_attrs.get("data")
    if recorded is None:
        study.set_user_attr("data", spec.to_dict())
    elif recorded != spec.to_dict():
        raise TrainingError(
            f"{path} is a search on other data ({recorded['path']!r}, seed {recorded['seed']}); "
            "--resume needs the same data flags"
        )
    return study


def search_table(study: optuna.Study) -> list[dict[str, Any]]:
    """Every trial: number, state, parameters, best validation NDCG@100, seconds."""
    rows = []
    for t in study.trials:
        seconds = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete is not None and t.datetime_start is not None
            else None
        )
        rows.append(
            {
                "number": t.number,
                "state": t.state.name.lower(),
                "params": t.params,
                "val_ndcg@100": t.value,
                "epochs": len(t.intermediate_values),
                "seconds": seconds,
            }
        )
    return rows


def _finished(study: optuna.Study) -> int:
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=done))


def tune(
    spec: DataSpec,
    base: TrainConfig,
    model_dir: Path | str,
    *,
    trials: int | None,
    time_budget: float | None,
    resume: bool = False,
    promote: bool = False,
    progress: bool = False,
    models: Sequence[ModelKind] = MODEL_KINDS,
    prepared: PreparedData | None = None,
) -> TuneResult:
    """Search until the study has ``trials`` finished trials or ``time_budget`` seconds pass
    (no trial starts after it), then train and write the best configuration as a version;
    CURRENT moves to it only with ``promote`` or when the directory has no CURRENT yet."""
    if trials is None and time_budget is None:
        raise TrainingError("give --trials, --time-budget or both: the search needs a bound")
    data = prepared or prepare(spec)
    study = open_study(model_dir, spec, resume, base.seed)
    if not study.trials:
        # The search starts from each kind's defaults, the kind `multvae train` would pick
        # first (a budget that ends early has at least that one): it can only improve on them.
        n_train = data.split.train.shape[0]
        default = plan(base, n_train).model
        for kind in sorted(models, key=lambda k: k != default):
            study.enqueue_trial(default_params(replace(base, model=kind), n_train))

    def objective(trial: optuna.Trial) -> float:
        config = suggest(trial, base, models)

        def report(record: EpochRecord) -> None:
            trial.report(record.val_ndcg_at_100, record.epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

        # Trials compare networks; the item-item path is fitted once, to the winner.
        return train(data.split, replace(config, item_neighbours=0),
                     on_epoch=report).best_val_ndcg  # fmt: skip

    remaining = None if trials is None else max(0, trials - _finished(study))
    if remaining != 0:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study.optimize(
            objective,
            n_trials=remaining,
            timeout=time_budget,
            show_progress_bar=progress,
            catch=(TrainingError,),  # a diverging configuration is a bad trial, not the end
        )
    try:
        best_trial = study.best_trial
    except ValueError:
        raise TrainingError(
            f"no trial finished within the budget; the study at {study_path(model_dir)} can "
            "be resumed with --resume and a larger --time-budget"
        ) from None
    best = suggest(optuna.trial.FixedTrial(best_trial.params), base, models)
    search = search_table(study)
    logging.getLogger(__name__).info("training trial %d's configuration", best_trial.number)
    trained = train_and_write(
        spec,
        best,
        model_dir,
        promote=promote or current_version(model_dir) is None,
        progress=progress,
        prepared=data,
        extra_metrics={
            "search": {
                "best_trial": best_trial.number,
                "best_val_ndcg@100": best_trial.value,
                "study": str(study_path(model_dir)),
                "trials": search,
            },
        },
    )
    return TuneResult(study, best, trained, search)
