"""Structured logging: one JSON object per line on stderr, so pipelines need no parsing rules.

The handler writes synchronously. A ``QueueHandler`` with a listener thread was measured
(under HTTP load, py-spy): every record woke the listener, which then competed with the
event loop for the GIL, costing more than the short write it was meant to move away.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from typing import Any

import orjson

# Attributes every LogRecord has; anything else was passed with ``extra=`` and is a field.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
# uvicorn attaches an ANSI-coloured copy of its message; a JSON line needs only one.
_STANDARD.add("color_message")


@functools.lru_cache(maxsize=2)
def _second(epoch_s: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch_s))


def timestamp(created: float) -> str:
    """``created`` in ISO 8601, UTC, to the millisecond; the date and time up to the second
    change once a second, so they are formatted once a second (the dearest part of a line)."""
    epoch_s, ms = divmod(int(created * 1000), 1000)
    return f"{_second(epoch_s)}.{ms:03d}+00:00"


def render(created: float, level: str, logger: str, message: str, fields: dict[str, Any]) -> str:
    """One JSON line: ``{"ts", "level", "logger", "message", ...fields in sorted order}``."""
    out: dict[str, Any] = {
        "ts": timestamp(created),
        "level": level,
        "logger": logger,
        "message": message,
    }
    for key in sorted(fields):
        if not key.startswith("_"):
            out[key] = fields[key]
    return orjson.dumps(out, default=str).decode()


class JsonFormatter(logging.Formatter):
    """:func:`render` for a log record: ``extra=`` fields included, exceptions as ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        attributes = record.__dict__
        fields = {key: attributes[key] for key in attributes.keys() - _STANDARD}
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        return render(
            record.created, record.levelname.lower(), record.name, record.getMessage(), fields
        )


class JsonLinesHandler(logging.StreamHandler):
    """The handler :func:`configure_logging` installs: :class:`JsonFormatter` lines on stderr."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(JsonFormatter())


def configure_logging(level: str) -> None:
    """JSON lines on stderr for the root logger, ours and uvicorn's; replaces their handlers."""
    root = logging.getLogger()
    root.handlers[:] = [JsonLinesHandler()]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # Our access log replaces uvicorn's, which lacks the route template and cache outcome.
    logging.getLogger("uvicorn.access").disabled = True
