"""JSON log lines with the request's fields."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest

from service.logs import JsonFormatter, configure_logging


def test_lines_are_json_with_the_extra_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    configure_logging("info")
    try:
        logging.getLogger("multvae.access").info("request", extra={"route": "/x", "status": 200})
        logging.getLogger("multvae.test").debug("below the level")
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("multvae.test").exception("failed")
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["message"] for line in lines] == ["request", "failed"]
    assert lines[0]["route"] == "/x"
    assert lines[0]["status"] == 200
    assert lines[0]["level"] == "info"
    assert lines[0]["logger"] == "multvae.access"
    assert "ValueError: boom" in lines[1]["exc"]


def test_formatter_renders_values_json_cannot() -> None:
    record = logging.makeLogRecord({"msg": "m", "path": object(), "levelname": "INFO"})
    assert json.loads(JsonFormatter().format(record))["path"].startswith("<object object")
