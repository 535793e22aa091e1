"""Per-request plumbing: request id, body size limit, latency metrics, access log, JSON 500s.

A plain ASGI middleware (not ``BaseHTTPMiddleware``) because it wraps every request and must
stay cheap. It sits inside Starlette's error middleware, so it also turns an unexpected
exception into a JSON 500 that still carries the request id. A body above
``MULTVAE_MAX_BODY_BYTES`` (declared, or counted while it streams in) is refused with a 413.
A client that hangs up while its body is read is no server error: it is recorded as 499
(client closed request), the nginx convention, and nothing is sent. A body that stops
arriving for ``MULTVAE_BODY_TIMEOUT_S`` (a slow or stalled upload, a Content-Length larger than
what is sent) is answered 408. A request still running when uvicorn's graceful-shutdown period
ends is cancelled by uvicorn; if nothing was sent yet it is answered 503 (retry elsewhere),
not a 500 with a traceback.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import Metrics

access_log = logging.getLogger("multvae.access")
log = logging.getLogger("multvae.error")

HEADER = b"x-request-id"
# A client-supplied id is echoed only when it is short and printable, so it cannot inject
# anything into headers or log lines.
_VALID_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")

CLIENT_CLOSED = 499
# The method label takes one of these or "other": a client can send any token as a method.
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


@dataclass
class AccessInfo:
    """Filled in by the handler (``request.state.access``) and logged after the response."""

    request_id: str
    cache: str | None = None  # "hit", "miss", "mixed" (batch), "off"
    model_version: str | None = None


# Generated ids: a random per-process prefix and a counter. Unique across replicas with
# overwhelming probability, and no urandom syscall per request as uuid4 would make.
_PREFIX = uuid.uuid4().hex[:16]
_counter = itertools.count(1)


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == HEADER and _VALID_ID.fullmatch(value):
            return str(value.decode("ascii"))
    return f"{_PREFIX}{next(_counter):016x}"


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def _json_response(status: int, detail: str) -> tuple[Message, Message]:
    body = orjson.dumps({"detail": detail})
    start: Message = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
    }
    return start, {"type": "http.response.body", "body": body}


class RequestMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        log_access: bool,
        max_body_bytes: int,
        body_timeout_s: float = 10.0,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.log_access = log_access
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.too_large = (
            f"the body exceeds {max_body_bytes} bytes (MULTVAE_MAX_BODY_BYTES); send fewer items"
        )
        self.too_slow = (
            f"the request body stopped arriving for {body_timeout_s:g} s "
            "(MULTVAE_BODY_TIMEOUT_S): send the whole body, as long as its Content-Length says"
        )
        # Label children by (route, method, status): a bounded set (templates x methods x
        # statuses), and ``labels()`` takes a lock and builds a tuple on every call.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tic = time.perf_counter()
        info = AccessInfo(_request_id(scope))
        scope.setdefault("state", {})["access"] = info
        header = (HEADER, info.request_id.encode("ascii"))
        status = 500
        started = False
        received = 0
        declared = _declared_length(scope)
        gone = False  # the client hung up before its body was complete
        body_done = False

        async def limited_receive() -> Message:
            nonlocal received, gone, body_done
            if declared is not None and declared > self.max_body_bytes:
                raise HTTPException(413, self.too_large)
            if body_done:  # waiting for a disconnect, not for the body: no deadline
                return await receive()
            try:
                async with asyncio.timeout(self.body_timeout_s):
                    message = await receive()
            except TimeoutError:
                raise HTTPException(408, self.too_slow, {"connection": "close"}) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise HTTPException(413, self.too_large)
                body_done = not message.get("more_body", False)
            elif message["type"] == "http.disconnect":
                gone = True
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if gone:  # whatever the app answers to a body cut short, nobody will read it
                status = CLIENT_CLOSED
                return
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, limited_receive, send_with_id)
        except ClientDisconnect:
            # Nobody is left to answer; a client's hang-up is neither an error nor a 5xx.
            status = CLIENT_CLOSED
        except asyncio.CancelledError:
            # uvicorn cancels the requests still running when its graceful-shutdown period
            # ends (e.g. a client still uploading). That is the server going away, not a
            # failure: answer 503 if nothing was sent yet, and end the task quietly.
            if not started and not gone:
                status = 503
                start, body = _json_response(
                    503, "the server is shutting down; retry the request (another replica)"
                )
                start["headers"].append((b"connection", b"close"))
                await send_with_id(start)
                await send(body)
        except Exception:
            log.exception("unhandled error", extra={"request_id": info.request_id})
            if not started:
                start, body = _json_response(
                    500, f"internal error; quote request id {info.request_id}"
                )
                await send_with_id(start)
                await send(body)
            status = 500
        finally:
            self._record(scope, info, status, time.perf_counter() - tic)

    def _record(self, scope: Scope, info: AccessInfo, status: int, seconds: float) -> None:
        route: Any = scope.get("route")
        # The template, never the raw path: a raw path is an unbounded label.
        template = getattr(route, "path", None) or "unmatched"
        method = scope["method"]
        label = method if method in _METHODS else "other"
        children = self._children.get((template, label, status))
        if children is None:
            labels = (template, label, str(status))
            # No latency histogram (18 series each) for what matched no route: whatever a
            # client sends there stays one counter per method and status.
            latency = self.metrics.latency.labels(*labels) if route is not None else None
            children = (self.metrics.requests.labels(*labels), latency)
            self._children[(template, label, status)] = children
        children[0].inc()
        if children[1] is not None:
            children[1].observe(seconds)
        if self.log_access and access_log.isEnabledFor(logging.INFO):
            fields = {
                "method": method,
                "route": template,
                "status": status,
                "latency_ms": round(seconds * 1000, 3),
                "cache": info.cache,
                "model_version": info.model_version,
                "request_id": info.request_id,
            }
            # Logger.info() would also walk the stack for the caller's file and line, which
            # an access line never shows; makeRecord + handle is the same record without it.
            record = access_log.makeRecord(
                access_log.name, logging.INFO, __file__, 0, "request", (), None, extra=fields
            )
            access_log.handle(record)
