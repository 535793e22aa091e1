"""Structured logging: one JSON object per line on stderr, so pipelines need no parsing rules.

The handler writes synchronously. A ``QueueHandler`` with a listener thread was measured
(bench/serve_load.py, py-spy): every record woke the listener, which then competed with the
event loop for the GIL, costing more than the short write it was meant to move away.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any

import orjson

# Attributes every LogRecord has; anything else was passed with ``extra=`` and is a field.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
# uvicorn attaches an ANSI-coloured copy of its message; a JSON line needs only one.
_STANDARD.add("color_message")


def render(created: float, level: str, logger: str, message: str, fields: dict[str, Any]) -> str:
    """One JSON line: ``{"ts", "level", "logger", "message", ...fields in sorted order}``."""
    out: dict[str, Any] = {
        "ts": datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds"),
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

    def write_line(self, line: str) -> None:
        with self.lock or contextlib.nullcontext():
            self.stream.write(line + self.terminator)
            self.stream.flush()


class AccessLog:
    """The access log: one line per request, on the logger ``multvae.access``.

    Through ``Logger.info`` a line cost ~20 µs inside a request (a LogRecord, the handler
    chain and its locks, on code the request path keeps evicting from the CPU caches). When
    logging would hand the line to nothing but the :class:`JsonLinesHandler` that
    :func:`configure_logging` installs, the same line is rendered and written here directly.
    Any other setup (another handler or a filter on the way, a level above INFO, pytest's
    caplog) takes the ordinary logging path.
    """

    def __init__(self, name: str = "multvae.access") -> None:
        self.logger = logging.getLogger(name)

    def info(self, message: str, fields: dict[str, Any]) -> None:
        handler = self._direct_handler()
        if handler is None:
            self.logger.info(message, extra=fields)
            return
        try:
            handler.write_line(render(time.time(), "info", self.logger.name, message, fields))
        except Exception:  # a closed or broken stream: reported as StreamHandler.emit would
            record = logging.makeLogRecord(
                {"name": self.logger.name, "msg": message, "levelno": logging.INFO,
                 "levelname": "INFO", **fields}
            )  # fmt: skip
            handler.handleError(record)

    def _direct_handler(self) -> JsonLinesHandler | None:
        """The only handler an INFO line on this logger would reach, if it is ours."""
        if not self.logger.isEnabledFor(logging.INFO):
            return None
        found: JsonLinesHandler | None = None
        node: logging.Logger | None = self.logger
        while node is not None:
            if node.filters:
                return None
            for handler in node.handlers:
                if found is not None or type(handler) is not JsonLinesHandler:
                    return None
                if handler.filters or handler.level > logging.INFO:
                    return None
                if type(handler.formatter) is not JsonFormatter:  # reformatted by someone
                    return None
                found = handler
            node = node.parent if node.propagate else None
        return found


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
    # One access line per request: skip what these JSON lines never show, the switches the
    # Logging HOWTO lists under "Optimization" (the caller's frame walk is the costly one).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
