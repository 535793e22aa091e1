"""JSON log lines with the request's fields."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest

from service.logs import AccessLog, JsonFormatter, JsonLinesHandler, configure_logging

FIELDS = {"method": "POST", "route": "/recommend", "status": 200, "request_id": "r1"}


@pytest.fixture
def configured(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """configure_logging's setup, writing to a buffer; everything it changes restored."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    for flag in ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing"):
        monkeypatch.setattr(logging, flag, getattr(logging, flag))
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


def _only_ours() -> None:
    # pytest adds its capture handler to the root logger for each test's call phase, after
    # the fixtures ran: a service process has only the one configure_logging installs.
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if isinstance(h, JsonLinesHandler)]


def _lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_access_lines_skip_the_logging_machinery_and_read_the_same(
    configured: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    _only_ours()
    access = AccessLog("multvae.access.test")
    assert isinstance(access._direct_handler(), JsonLinesHandler)
    logging.getLogger("multvae.access.test").info("request", extra=FIELDS)  # the logging path
    calls: list[object] = []
    monkeypatch.setattr(logging.Logger, "handle", lambda *a: calls.append(a))
    access.info("request", dict(FIELDS))  # the direct path: Logger.handle is never reached
    assert calls == []
    through_logging, direct = _lines(configured)
    assert str(through_logging.pop("ts"))[:10] == str(direct.pop("ts"))[:10]  # ISO dates
    assert list(direct) == list(through_logging)  # same keys in the same order
    assert direct == through_logging == {
        "level": "info", "logger": "multvae.access.test", "message": "request", **FIELDS
    }  # fmt: skip


def test_access_lines_reach_any_other_handler_through_logging(configured: io.StringIO) -> None:
    seen: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    _only_ours()
    extra = Collect()
    logging.getLogger("multvae").addHandler(extra)
    try:
        access = AccessLog()
        assert access._direct_handler() is None
        access.info("request", dict(FIELDS))
    finally:
        logging.getLogger("multvae").removeHandler(extra)
    assert [r.__dict__["request_id"] for r in seen] == ["r1"]
    assert _lines(configured)[0]["route"] == "/recommend"  # and still on stderr


def test_access_lines_respect_the_level(configured: io.StringIO) -> None:
    logging.getLogger().setLevel(logging.WARNING)
    AccessLog().info("request", dict(FIELDS))
    assert configured.getvalue() == ""


def test_a_failing_stream_is_reported_once_not_written_twice(
    configured: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    class FailingFlush(io.StringIO):
        def flush(self) -> None:
            raise BlockingIOError("the pipe is full")

    _only_ours()
    [handler] = logging.getLogger().handlers
    assert isinstance(handler, JsonLinesHandler)
    stream = FailingFlush()
    monkeypatch.setattr(handler, "stream", stream)
    reported: list[logging.LogRecord] = []
    monkeypatch.setattr(handler, "handleError", reported.append)
    AccessLog().info("request", dict(FIELDS))
    assert len(stream.getvalue().splitlines()) == 1  # written once, not again via logging
    assert [r.__dict__["request_id"] for r in reported] == ["r1"]
