"""File -> sparse matrix -> split -> train -> evaluate -> model version, in one call.

The data recipe (:class:`DataSpec`) is stored in the version's config.json, so the exact split
can be rebuilt later from the same file (:func:`split_for_version`), e.g. to score baselines
on the same held-out users.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from multvae.artifacts import ModelVersion, write_version
from multvae.device import resolve_device
from multvae.errors import DataError
from training.catalog import PRESETS, Preprocessing
from training.dataset import Split
from training.evaluate import Evaluation, evaluate_model, save_heldout
from training.preprocess import default_preprocessing, filter_interactions
from training.readers import read_interactions
from training.split import data_fingerprint, strong_generalisation_split
from training.train import TrainConfig, TrainResult, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSpec:
    """How to read, filter and split an interaction file; ``None`` fields use the defaults."""

    path: str
    format: str = "auto"
    user_col: str | None = None
    item_col: str | None = None
    rating_col: str | None = None
    count_col: str | None = None  # counts are clicks: never thresholded like ratings
    preset: str | None = None
    min_rating: float | None = None
    keep_all_ratings: bool = False  # binarise nothing, even when the file has ratings
    min_user_clicks: int | None = None
    min_item_users: int | None = None
    heldout_users: float | None = None  # count (>= 1) or fraction (< 1) per held-out group
    seed: int = 98765

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataSpec:
        return cls(**data)


@dataclass
class PreparedData:
    split: Split
    fingerprint: str
    preprocessing: Preprocessing
    filter_stats: dict[str, int]
    seconds: float


def preprocessing_for(
    spec: DataSpec, has_values: bool, source: str = ""
) -> tuple[Preprocessing, float | None]:
    """The filtering rules and held-out size a spec resolves to (preset, then explicit flags)."""
    if spec.preset is not None:
        if spec.preset not in PRESETS:
            raise DataError(f"unknown preset {spec.preset!r}; choose one of {sorted(PRESETS)}")
        preset = PRESETS[spec.preset]
        prep, heldout = preset.preprocessing, float(preset.n_heldout)
    else:
        prep, heldout = default_preprocessing(has_values, source), None
    if spec.keep_all_ratings:
        prep = replace(prep, min_rating=None)
    elif spec.min_rating is not None:
        prep = replace(prep, min_rating=spec.min_rating)
    if spec.min_user_clicks is not None:
        prep = replace(prep, min_user_clicks=spec.min_user_clicks)
    if spec.min_item_users is not None:
        prep = replace(prep, min_item_users=spec.min_item_users)
    if spec.heldout_users is not None:
        heldout = spec.heldout_users
    return prep, heldout


def prepare(spec: DataSpec) -> PreparedData:
    """Read, filter and split the file the spec names."""
    tic = time.perf_counter()
    raw = read_interactions(
        spec.path, spec.format,
        user_col=spec.user_col, item_col=spec.item_col,
        rating_col=spec.count_col or spec.rating_col,
    )
    # Play counts (MSD, --count-col) are clicks, not ratings: binarise them without a threshold.
    has_ratings = raw.value is not None and raw.source != "msd" and spec.count_col is None
    prep, heldout = preprocessing_for(spec, has_ratings, raw.source)
    kept, stats = filter_interactions(raw, prep)
    del raw
    n_heldout: int | float | None = heldout
    if heldout is not None and heldout >= 1:
        n_heldout = int(heldout)
    split = strong_generalisation_split(kept, n_heldout, seed=spec.seed)
    return PreparedData(
        split, data_fingerprint(kept), prep, stats, time.perf_counter() - tic
    )


def train_config_for(spec: DataSpec, **overrides: Any) -> TrainConfig:
    """The paper's exact training schedule under a paper preset, the adaptive defaults else."""
    preset = PRESETS.get(spec.preset or "")
    if preset is not None and preset.paper_epochs is not None:
        return TrainConfig.paper(**{"epochs": preset.paper_epochs, **overrides})
    return TrainConfig(**overrides)


@dataclass
class TrainedVersion:
    version: str | None
    result: TrainResult
    validation: Evaluation
    test: Evaluation
    data: PreparedData


def train_and_write(
    spec: DataSpec,
    config: TrainConfig,
    model_dir: Path | str,
    *,
    promote: bool = True,
    progress: bool = False,
    prepared: PreparedData | None = None,
    extra_metrics: dict[str, Any] | None = None,
) -> TrainedVersion:
    """Train on the spec's data and write a verified model version (CURRENT moves if promote).

    ``extra_metrics`` (e.g. a tuning search) is stored in metrics.json beside the scores.
    """
    data = prepared or prepare(spec)
    log.info("split: %s", data.split.stats)
    result = train(data.split, config, progress=progress)
    return write_trained(spec, config, model_dir, data, result, promote=promote,
                         extra_metrics=extra_metrics)  # fmt: skip


def write_trained(
    spec: DataSpec,
    config: TrainConfig,
    model_dir: Path | str,
    data: PreparedData,
    result: TrainResult,
    *,
    promote: bool = True,
    extra_metrics: dict[str, Any] | None = None,
    processes: int = 1,
) -> TrainedVersion:
    """Score a trained model on the validation and test users and write it as a verified
    model version (CURRENT moves if promote); ``extra_metrics`` go into metrics.json,
    ``processes`` (the ranks that trained it) into config.json's environment."""
    split = data.split
    validation = evaluate_model(result.model, split.validation)
    test = evaluate_model(result.model, split.test)
    device = resolve_device(config.device)
    metrics = {
        "validation": validation.to_json(),
        "test": test.to_json(),
        "best_epoch": result.best_epoch,
        "beta": result.beta,
        "train_seconds": result.seconds,
        "history": [asdict(r) for r in result.history],
        "anneal_search": [asdict(r) for r in result.anneal_search],
        "item_path": result.item_path,
        **(extra_metrics or {}),
    }
    extra = {
        "data": spec.to_dict(),
        "preprocessing": asdict(data.preprocessing),
        "split": {"seed": split.seed, **split.stats},
        "filter_stats": data.filter_stats,
        "data_fingerprint": data.fingerprint,
        "training": {**config.to_dict(), **asdict(result.plan)},  # as resolved on this data
        "train_config": config.to_dict(),  # as given: what `multvae retrain` reuses
        "beta": result.beta,
        "environment": {
            "torch": torch.__version__, "python": platform.python_version(),
            "device": str(device), "processes": processes,
        },
    }
    version = write_version(
        model_dir, result.model, split.items, metrics, extra,
        write_extra=lambda d: save_heldout(d / "heldout.npz", split.validation, split.test),
        promote=promote,
    )
    return TrainedVersion(version, result, validation, test, data)


def _recorded_spec(version: ModelVersion) -> DataSpec:
    try:
        return DataSpec.from_dict(version.config["data"])
    except (KeyError, TypeError) as exc:
        raise DataError(f"{version.path} records no data recipe in config.json") from exc


def recorded_data_path(version: ModelVersion) -> str:
    """The data file a version was trained on, when it is still there (DataError otherwise)."""
    path = _recorded_spec(version).path
    if not Path(path).exists():
        raise DataError(
            f"version {version.version} was trained on {path}, which is no longer there: "
            "pass --data with that file (or a copy of it)"
        )
    return path


def split_for_version(version: ModelVersion, data_path: str | None = None) -> Split:
    """Rebuild the split a version was trained on (optionally reading the data from elsewhere).

    The data must be what the version was trained on: its fingerprint (of the filtered
    interactions) must match the one recorded in config.json, else DataError.
    """
    spec = _recorded_spec(version)
    if data_path is not None:
        spec = replace(spec, path=data_path)
    prepared = prepare(spec)
    split = prepared.split
    recorded = version.config.get("data_fingerprint")
    if recorded is not None and prepared.fingerprint != recorded:
        raise DataError(
            f"{spec.path} is not the data version {version.version} was trained on: its "
            f"fingerprint is {prepared.fingerprint}, config.json records {recorded} (the file "
            "changed since training); pass --data with the original file"
        )
    if tuple(split.items.ids) != tuple(version.items.ids):
        raise DataError(
            f"{spec.path} does not rebuild the item vocabulary of version {version.version} "
            f"({len(split.items)} vs {len(version.items)} items): the data changed since training"
        )
    return split
