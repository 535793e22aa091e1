"""Errors raised by the shared core and the training package.

    MultVAEError                 base of everything we raise on purpose
     ├── ArtifactError           a model directory or version cannot be used
     │    ├── NoModelError       no CURRENT pointer, or it names a missing version
     │    └── VerificationError  a file is missing, altered or unreadable (manifest mismatch)
     ├── DataError               input data cannot be read or used
     │    └── MalformedLineError one line of an input file is not what its format says
     ├── TrainingError           training cannot go on (NaN/inf loss, no validation users)
     ├── UnknownItemError        an item id the model version was not trained on
     └── DeviceError             the requested device does not exist here

Messages name the offending value and say what is accepted or how to fix it.
"""

from __future__ import annotations

from pathlib import Path


class MultVAEError(Exception):
    """Base class of every error this project raises on purpose."""


class ArtifactError(MultVAEError):
    """A model directory or model version cannot be used."""


class NoModelError(ArtifactError):
    """The model directory has no servable version."""


class CurrentChangedError(ArtifactError):
    """CURRENT moved between a decision and the swap it was made for (see set_current)."""


class VerificationError(ArtifactError):
    """A model version's files do not match its manifest."""


class DataError(MultVAEError):
    """Input interaction data cannot be read or used."""


class MalformedLineError(DataError):
    """A line of an input file does not match the expected layout."""

    def __init__(self, path: Path | str, line: int, expected: str, got: str) -> None:
        self.path = str(path)
        self.line = line
        shown = got if len(got) <= 120 else got[:117] + "..."
        super().__init__(f"{path}, line {line}: expected {expected}, got {shown!r}")


class TrainingError(MultVAEError):
    """Training cannot continue."""


class UnknownItemError(MultVAEError):
    """An item id the model version does not know."""


class DeviceError(MultVAEError):
    """The requested torch device is not available."""
