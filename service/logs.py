"""Structured logging: one JSON object per line on stderr, so pipelines need no parsing rules.

The handler writes synchronously. A ``QueueHandler`` with a listener thread was measured
(bench/serve_load.py, py-spy): every record woke the listener, which then competed with the
event loop for the GIL, costing more than the short write it was meant to move away.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

# Attributes every LogRecord has; anything else was passed with ``extra=`` and is a field.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
# uvicorn attaches an ANSI-coloured copy of its message; a JSON line needs only one.
_STANDARD.add("color_message")


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", ...extra fields}``; exceptions as ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = record.__dict__
        # The extra fields, found by one set operation and written in a stable (sorted) order.
        for key in sorted(fields.keys() - _STANDARD):
            if not key.startswith("_"):
                out[key] = fields[key]
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def configure_logging(level: str) -> None:
    """JSON lines on stderr for the root logger, ours and uvicorn's; replaces their handlers."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # Our access log replaces uvicorn's, which lacks the route template and cache outcome.
    logging.getLogger("uvicorn.access").disabled = True
    # One access line per request: skip what these JSON lines never show, the switches the
    # Logging HOWTO lists under "Optimization" (the caller's frame walk is the costly one).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
