"""One write per response: the coalescing transport under multvae serve's HTTP protocol."""

from __future__ import annotations

import asyncio

import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from service.transport import FLUSH_AT, CoalescingTransport, HttpProtocol

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Recording(asyncio.Transport):
    """Records what reaches the 'socket'."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.events: list[str] = []
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        self.events.append("write")

    def close(self) -> None:
        self.closing = True
        self.events.append("close")

    def abort(self) -> None:
        self.closing = True
        self.events.append("abort")

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("127.0.0.1", 1234)}.get(name, default)


async def _next_step() -> None:
    await asyncio.sleep(0)


async def test_writes_of_one_step_leave_as_one_write_in_order() -> None:
    real = Recording()
    transport = CoalescingTransport(real, asyncio.get_running_loop())
    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    transport.write(bytearray(b"{}"))
    assert real.writes == []  # not yet: the step is not over
    assert transport.get_write_buffer_size() == 40  # buffered bytes count as unsent
    await _next_step()
    assert real.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    transport.writelines([b"a", b"b"])  # the next response: its own write
    await _next_step()
    assert real.writes[1:] == [b"ab"]


async def test_close_sends_what_is_buffered_first() -> None:
    real = Recording()
    transport = CoalescingTransport(real, asyncio.get_running_loop())
    transport.write(b"last response")
    transport.close()
    assert real.events == ["write", "close"]
    assert real.writes == [b"last response"]
    await _next_step()  # the scheduled flush finds nothing left
    assert real.events == ["write", "close"]


async def test_abort_and_a_closing_socket_drop_unsent_data() -> None:
    real = Recording()
    transport = CoalescingTransport(real, asyncio.get_running_loop())
    transport.write(b"never sent")
    transport.abort()
    await _next_step()
    assert real.events == ["abort"]
    other = Recording()
    transport = CoalescingTransport(other, asyncio.get_running_loop())
    transport.write(b"too late")
    other.closing = True  # the peer went away before the step ended
    await _next_step()
    assert other.writes == []
    assert transport.is_closing()


async def test_everything_else_is_the_real_transports() -> None:
    transport = CoalescingTransport(Recording(), asyncio.get_running_loop())
    assert transport.get_extra_info("peername") == ("127.0.0.1", 1234)
    assert transport.get_extra_info("sockname", "none") == "none"


async def test_a_large_body_goes_out_at_once_so_flow_control_sees_it() -> None:
    real = Recording()
    transport = CoalescingTransport(real, asyncio.get_running_loop())
    transport.write(b"head")
    transport.write(b"x" * FLUSH_AT)  # a streamed or large body: no waiting for the step
    assert real.writes == [b"head" + b"x" * FLUSH_AT]
    assert transport.get_write_buffer_size() == 0


async def test_a_half_close_sends_the_buffered_response_first() -> None:
    # uvloop may close the real transport itself once the client's FIN is handled.
    async def app(scope: object, receive: object, send: object) -> None: ...

    protocol = HttpProtocol(Config(app=app), ServerState(), {})
    real = Recording()
    protocol.connection_made(real)
    protocol.transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert real.writes == []
    protocol.eof_received()
    assert real.writes == [b"HTTP/1.1 200 OK\r\n\r\n"]
