"""The model version directory, the contract between training and the service.

    MODEL_DIR/
      versions/<version>/   model.safetensors, config.json, items.json, metrics.json,
                            manifest.json (sha256 of every other file)
      CURRENT               one line: the version to serve
      PREVIOUS              one line: the version CURRENT replaced (what a rollback returns
                            to; kept by garbage collection)

A version is written to a temporary directory, fsynced and renamed into place, so a reader
sees either nothing or the whole version; ``CURRENT`` is replaced atomically the same way.
A version is rebuilt from ``config.json`` alone and refused when any file fails its hash.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from multvae import __version__
from multvae.errors import ArtifactError, CurrentChangedError, NoModelError, VerificationError
from multvae.items import ItemIndex
from multvae.model import ModelConfig, MultVAE

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
ITEMS = "items.json"
METRICS = "metrics.json"
MANIFEST = "manifest.json"
CURRENT = "CURRENT"
PREVIOUS = "PREVIOUS"
POINTER_LOCK = ".pointers.lock"  # held while CURRENT / PREVIOUS move or versions are deleted
VERSIONS = "versions"
FILES = (WEIGHTS, CONFIG, ITEMS, METRICS)
STALE_TMP_SECONDS = 6 * 3600
# A version is a plain directory name: no separator, no leading dot (so no ".." and no
# temporary directory), nothing a shell or a log line would misread.
VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
VERSION_NAME_RULE = "1-128 characters from A-Z a-z 0-9 . _ -, not starting with a dot"
CURRENT_MAX_BYTES = 256


@dataclass(frozen=True)
class ModelVersion:
    """A loaded, verified model version."""

    version: str
    path: Path
    model: MultVAE
    items: ItemIndex
    config: dict[str, Any]
    metrics: dict[str, Any]

    @property
    def created_at(self) -> str:
        return str(self.config.get("created_at", ""))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")


def write_version(
    model_dir: Path | str,
    model: MultVAE,
    items: ItemIndex,
    metrics: dict[str, Any],
    extra_config: dict[str, Any] | None = None,
    *,
    write_extra: Callable[[Path], None] | None = None,
    promote: bool = True,
) -> str:
    """Write a new version atomically and (by default) point ``CURRENT`` at it; returns its name.

    ``extra_config`` (training config, data fingerprint, beta used...) is stored in config.json
    beside the architecture. ``write_extra(dir)`` may add files (e.g. the held-out users); they
    are hashed into the manifest like the rest. Nothing is visible under ``versions/`` until
    the rename.
    """
    model_dir = Path(model_dir)
    versions = model_dir / VERSIONS
    versions.mkdir(parents=True, exist_ok=True)
    created = datetime.now(UTC)
    tmp = versions / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / WEIGHTS))
        config = {
            "model": model.config.to_dict(),
            "n_items": model.config.n_items,
            "created_at": created.isoformat(),
            "code_version": __version__,
            **(extra_config or {}),
        }
        _write_json(tmp / CONFIG, config)
        # safetensors writes its file 0600; give it the mode every other file gets (the
        # umask's), so a service running as another user of the group can read all of them.
        os.chmod(tmp / WEIGHTS, stat.S_IMODE((tmp / CONFIG).stat().st_mode))
        items.save(tmp / ITEMS)
        _write_json(tmp / METRICS, metrics)
        if write_extra is not None:
            write_extra(tmp)
        names = sorted(p.name for p in tmp.iterdir() if p.is_file())
        hashes = {name: _sha256(tmp / name) for name in names}
        _write_json(tmp / MANIFEST, {"files": hashes})
        for name in (*names, MANIFEST):
            _fsync_file(tmp / name)
        _fsync_dir(tmp)
        content = hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()
        # Microseconds keep versions written within one second in creation order.
        version = f"{created.strftime('%Y%m%dT%H%M%S%fZ')}-{content[:8]}"
        final = versions / version
        if final.exists():
            raise FileExistsError(f"model version {final} already exists")
        os.rename(tmp, final)
        _fsync_dir(versions)
    except (OSError, SafetensorError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, FileExistsError):
            raise
        # A full disk or a read-only volume: say where and why, not a serialiser's traceback.
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ArtifactError(
            f"cannot write a model version into {versions}: {why}; nothing was written "
            "(free space or pick another --out)"
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if promote:
        set_current(model_dir, version)
    return version


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` all at once: temp file, fsync, rename, fsync the dir.

    Readers see the old content or the new, never a partial file; on failure nothing changes.
    """
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def pointer_lock(model_dir: Path | str) -> Iterator[None]:
    """Hold the model directory's pointer lock (``flock``, across processes).

    Every move of ``CURRENT`` (promote, rollback, a retrain's promotion) and every deletion of
    old versions happens under it, so a decision read from the pointers ("CURRENT is A", "V is
    not protected") still holds when it is acted on. It is held for milliseconds, never for a
    training run: an operator's rollback waits at most for another pointer move.
    """
    fd = os.open(Path(model_dir) / POINTER_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def set_current(model_dir: Path | str, version: str, *, replacing: str | None = None) -> None:
    """Atomically point ``CURRENT`` at an existing, verified version.

    The version it replaces is first recorded in ``PREVIOUS`` (atomically too), so that
    :func:`rollback` can return to it. A crash between the two writes leaves ``PREVIOUS``
    naming the version that still serves, which :func:`rollback` refuses by name.

    With ``replacing``, a compare-and-swap: ``CURRENT`` moves only if it still names that
    version, else :class:`CurrentChangedError` (a retrain that compared its candidate with A
    must not replace B, which an operator promoted or rolled back to in the meantime).
    """
    model_dir = Path(model_dir)
    with pointer_lock(model_dir):
        replaced = current_version(model_dir)
        if replacing is not None and replaced != replacing:
            raise CurrentChangedError(
                f"{model_dir}: CURRENT is {replaced}, no longer {replacing}, so {version} "
                f"(which was compared with {replacing}) was not promoted; promote it by hand "
                "with `multvae promote` if it should serve"
            )
        _point_current(model_dir, version, replaced)


def _point_current(model_dir: Path, version: str, replaced: str | None) -> None:
    verify_version(version_path(model_dir, version))
    if replaced is not None and replaced != version:
        atomic_write(model_dir / PREVIOUS, (replaced + "\n").encode())
    atomic_write(model_dir / CURRENT, (version + "\n").encode())


def version_path(model_dir: Path | str, version: str) -> Path:
    """``model_dir/versions/<version>``, refusing any name that would lead elsewhere.

    The name must be a plain directory name (:data:`VERSION_NAME`); a symlink under
    ``versions/`` is followed only when it stays inside ``versions/``. Errors never echo
    more of the name than its length, since it may come from a file that is not ours.
    """
    model_dir = Path(model_dir)
    if not VERSION_NAME.fullmatch(version):
        raise ArtifactError(
            f"{len(version)}-character model version name refused: a version must be a plain "
            f"directory name under {model_dir / VERSIONS} ({VERSION_NAME_RULE})"
        )
    path = model_dir / VERSIONS / version
    if path.is_symlink() and path.resolve().parent != (model_dir / VERSIONS).resolve():
        raise ArtifactError(f"{path} is a symlink leading outside {model_dir / VERSIONS}: refused")
    return path


def _read_pointer(model_dir: Path, pointer: str) -> str | None:
    """The version the pointer file ``model_dir/pointer`` names, or None when there is none.

    The pointer must be a small file inside the model directory holding one version name;
    anything else is an :class:`ArtifactError` that does not quote the file's content.
    """
    path = model_dir / pointer
    try:
        if path.is_symlink() and not path.resolve().is_relative_to(model_dir.resolve()):
            raise ArtifactError(f"{path} is a symlink leading outside {model_dir}: refused")
        with path.open("rb") as fh:
            raw = fh.read(CURRENT_MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ArtifactError(
            f"{path} cannot be read ({exc.strerror or type(exc).__name__}); it must hold one "
            "version name"
        ) from exc
    try:
        name = raw.decode().strip()
    except UnicodeDecodeError:
        name = "\0"  # not a name; the check below refuses it without showing the bytes
    if not name:
        return None
    if len(raw) > CURRENT_MAX_BYTES or not VERSION_NAME.fullmatch(name):
        raise ArtifactError(
            f"{path} does not hold a model version name ({len(raw)}"
            f"{'+' if len(raw) > CURRENT_MAX_BYTES else ''} bytes, not shown): it must be one "
            f"line naming a directory under {model_dir / VERSIONS} ({VERSION_NAME_RULE})"
        )
    return name


def current_version(model_dir: Path | str) -> str | None:
    """The version ``CURRENT`` names, or None when there is no pointer."""
    return _read_pointer(Path(model_dir), CURRENT)


def previous_version(model_dir: Path | str) -> str | None:
    """The version ``CURRENT`` replaced last, or None when it never moved."""
    return _read_pointer(Path(model_dir), PREVIOUS)


def rollback(model_dir: Path | str) -> tuple[str, str]:
    """Point ``CURRENT`` back at the version it replaced; returns (from, to).

    The version rolled back from becomes ``PREVIOUS``, so a second rollback undoes the first.
    """
    model_dir = Path(model_dir)
    with pointer_lock(model_dir):
        current = current_version(model_dir)
        previous = previous_version(model_dir)
        if current is None:
            raise NoModelError(f"{model_dir} has no {CURRENT} version to roll back from")
        if previous is None or previous == current:
            raise ArtifactError(
                f"{model_dir}: {CURRENT} ({current}) has not replaced another version, so "
                "there is nothing to roll back to; pick one with `multvae promote MODEL_DIR "
                "VERSION`"
            )
        if not version_path(model_dir, previous).is_dir():
            raise NoModelError(
                f"{model_dir}: the version {CURRENT} replaced, {previous}, is no longer under "
                f"{VERSIONS}/; pick one of the remaining versions with `multvae promote`"
            )
        _point_current(model_dir, previous, current)
    return current, previous


def list_versions(model_dir: Path | str) -> list[str]:
    """Complete versions, oldest first (names start with a UTC timestamp)."""
    versions = Path(model_dir) / VERSIONS
    if not versions.is_dir():
        return []
    return sorted(p.name for p in versions.iterdir() if p.is_dir() and not p.name.startswith("."))


def verify_version(path: Path) -> dict[str, str]:
    """Check every file against the manifest; returns the manifest's hashes."""
    if not path.is_dir():
        raise NoModelError(f"model version directory {path} does not exist")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        hashes: dict[str, str] = manifest["files"]
    except FileNotFoundError as exc:
        raise VerificationError(f"{path} has no {MANIFEST}: an incomplete version") from exc
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise VerificationError(f"{path / MANIFEST} is not a valid manifest: {exc}") from exc
    for name in FILES:
        if name not in hashes:
            raise VerificationError(f"{path / MANIFEST} lists no hash for {name}")
    for name in hashes:
        file = path / name
        if not file.is_file():
            raise VerificationError(f"{file} is missing")
        actual = _sha256(file)
        if actual != hashes[name]:
            raise VerificationError(
                f"{file} fails verification: sha256 {actual[:12]}... but the manifest says "
                f"{hashes[name][:12]}...; the file was altered or partly written"
            )
    return hashes


def load_version(
    model_dir: Path | str, version: str | None = None, device: torch.device | str = "cpu"
) -> ModelVersion:
    """Load and verify ``version`` (default: the one ``CURRENT`` names), in eval mode."""
    model_dir = Path(model_dir)
    if version is None:
        version = current_version(model_dir)
        if version is None:
            raise NoModelError(
                f"{model_dir} has no {CURRENT} file: train a model first "
                f"(multvae train --out {model_dir})"
            )
    path = version_path(model_dir, version)
    verify_version(path)
    try:
        config = json.loads((path / CONFIG).read_text())
        model_config = ModelConfig.from_dict(config["model"])
        items = ItemIndex.load(path / ITEMS)
        metrics = json.loads((path / METRICS).read_text())
        model = MultVAE(model_config)
        model.load_state_dict(load_file(str(path / WEIGHTS)))
    except (KeyError, TypeError, ValueError, RuntimeError, SafetensorError) as exc:
        raise VerificationError(f"{path} verifies but cannot be rebuilt: {exc}") from exc
    if len(items) != model_config.n_items:
        raise VerificationError(
            f"{path}: items.json has {len(items)} items, the model {model_config.n_items}"
        )
    model.to(device).eval()
    return ModelVersion(version, path, model, items, config, metrics)


def remove_old_versions(model_dir: Path | str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` versions; returns the deleted ones, oldest first.

    Whatever ``keep`` is, never deleted: the version ``CURRENT`` names, the version it
    replaced (``PREVIOUS``, the rollback target) and every version written since the last
    promotion (``CURRENT``'s modification time): a candidate being evaluated, one kept for
    inspection or one a killed run left behind waits for the next promotion. Temporary files
    and directories left by an interrupted write are removed once they are
    :data:`STALE_TMP_SECONDS` old, when no writer can still be filling them.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    model_dir = Path(model_dir)
    with pointer_lock(model_dir):  # no promote may pick a version while it is being deleted
        versions = list_versions(model_dir)
        protected = {current_version(model_dir), previous_version(model_dir)}
        try:
            promoted_at = (model_dir / CURRENT).stat().st_mtime_ns
        except FileNotFoundError:
            promoted_at = None  # never promoted: everything is younger than the last promotion
        for version in versions:
            if promoted_at is None or (
                (model_dir / VERSIONS / version).stat().st_mtime_ns > promoted_at
            ):
                protected.add(version)
        removable = [v for v in versions[: max(0, len(versions) - keep)] if v not in protected]
        for version in removable:
            shutil.rmtree(model_dir / VERSIONS / version)
    # Half-written versions and pointers of a killed writer.
    remove_stale_temporaries(model_dir / VERSIONS, ".tmp-*")
    remove_stale_temporaries(model_dir, ".*.tmp-*")
    return removable


def remove_stale_temporaries(directory: Path, pattern: str) -> list[Path]:
    """Delete entries of ``directory`` matching ``pattern`` not modified for
    :data:`STALE_TMP_SECONDS` (temporaries of a killed writer); returns them."""
    cutoff = time.time() - STALE_TMP_SECONDS
    removed = []
    for tmp in directory.glob(pattern):
        try:
            if tmp.lstat().st_mtime >= cutoff:
                continue  # a writer may still be filling it
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        except FileNotFoundError:
            continue  # its writer renamed or removed it meanwhile
        removed.append(tmp)
    return removed
