"""JSON log lines with the request's fields."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from service.logs import JsonFormatter, configure_logging, timestamp

FIELDS = {"method": "POST", "route": "/recommend", "status": 200, "request_id": "r1"}


@pytest.fixture
def configured(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """configure_logging's setup, writing to a buffer; everything it changes restored."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "handlers", logger.handlers[:])
        monkeypatch.setattr(logger, "propagate", logger.propagate)
        monkeypatch.setattr(logger, "disabled", logger.disabled)
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    configure_logging("info")
    try:
        yield out
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


def test_lines_are_json_with_the_extra_fields(configured: io.StringIO) -> None:
    logging.getLogger("multvae.access").info("request", extra={"route": "/x", "status": 200})
    logging.getLogger("multvae.test").debug("below the level")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("multvae.test").exception("failed")
    lines = _lines(configured)
    assert [line["message"] for line in lines] == ["request", "failed"]
    assert lines[0]["route"] == "/x"
    assert lines[0]["status"] == 200
    assert lines[0]["level"] == "info"
    assert lines[0]["logger"] == "multvae.access"
    assert "ValueError: boom" in str(lines[1]["exc"])


def test_formatter_renders_values_json_cannot() -> None:
    record = logging.makeLogRecord({"msg": "m", "path": object(), "levelname": "INFO"})
    assert json.loads(JsonFormatter().format(record))["path"].startswith("<object object")


def _lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_access_lines_respect_the_level(configured: io.StringIO) -> None:
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("multvae.access").info("request", extra=FIELDS)
    assert configured.getvalue() == ""


def test_configuring_changes_no_process_wide_logging_flag(configured: io.StringIO) -> None:
    assert logging.logThreads
    assert logging.logProcesses
    record = logging.getLogger("multvae.access").makeRecord(
        "multvae.access", logging.INFO, __file__, 1, "request", (), None
    )
    assert record.threadName is not None


@pytest.mark.parametrize("created", [0.0, 1_700_000_000.5, 1_700_000_000.999, 1e9 + 0.0015])
def test_timestamps_are_iso_8601_utc_to_the_millisecond(created: float) -> None:
    expected = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
    assert timestamp(created) == expected
