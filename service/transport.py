"""uvicorn's HTTP protocol, writing each response with one system call.

uvicorn's httptools protocol writes a response's head (status line and headers) when the app
sends ``http.response.start`` and its body on ``http.response.body``: two ``send`` calls per
response. Each of them also runs the receiving side's network stack on loopback and, on a VM,
wakes the peer through the hypervisor; py-spy put a quarter of a cache hit's server time on
the first one. :class:`HttpProtocol` wraps each connection's transport so that the writes of
one event-loop step leave together at the end of that step: on the benchmark machine a cache
hit went from 224-267 to 192-196 µs of server CPU (bench/RESULTS.md).

``multvae serve`` uses it; under plain uvicorn pass ``--http service.transport:HttpProtocol``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Buffered bytes that are written at once rather than at the end of the step: far above a
# JSON response, at the size where a socket's send buffer starts to matter.
FLUSH_AT = 64 * 1024


class CoalescingTransport(asyncio.Transport):
    """A transport whose ``write`` calls within one loop step reach the socket as one write.

    Everything else is the wrapped transport's. Data is never reordered: ``close`` sends what
    is buffered first; ``abort`` drops it, as an abort drops any unsent data. Once
    ``FLUSH_AT`` bytes are buffered they go out at once, so back-pressure still works.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._buffer: list[bytes] = []
        self._buffered = 0  # bytes in _buffer

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._buffer:
            self._loop.call_soon(self.flush)
        chunk = bytes(data)  # a copy only for mutable buffers
        self._buffer.append(chunk)
        self._buffered += len(chunk)
        if self._buffered >= FLUSH_AT:
            # A large or streamed body goes out now, so that the real transport's flow
            # control (pause_writing, which makes uvicorn wait for the client) sees it.
            self.flush()

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        for data in list_of_data:
            self.write(data)

    def flush(self) -> None:
        """Hand what is buffered to the socket now (one ``writev`` on uvloop, no copy)."""
        if not self._buffer:
            return
        buffered, self._buffer, self._buffered = self._buffer, [], 0
        if not self._transport.is_closing():
            self._transport.writelines(buffered)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._buffer, self._buffered = [], 0
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + self._buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a :class:`CoalescingTransport`."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Flow control (pause/resume reading) keeps the real transport uvicorn gave it.
        self.transport = CoalescingTransport(transport, self.loop)

    def eof_received(self) -> None:
        # The client half-closed: uvloop may close the real transport itself right after
        # this, before the end-of-step flush, so a buffered response must leave now.
        if isinstance(self.transport, CoalescingTransport):
            self.transport.flush()
        super().eof_received()
