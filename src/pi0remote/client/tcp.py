"""``tcp://host:port``: length-prefixed frames over one persistent TCP connection (TCP_NODELAY).

Two byte pumps over :class:`pi0remote.protocol.FrameDecoder`: a blocking socket (sync) and an
``asyncio.BufferedProtocol`` (async); each frame is written in one system call and a large reply is
received straight into its own buffer.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from .. import protocol
from ..errors import ConnectionLost, MessageTooLarge, RequestTimeout, TransportMismatch
from ._sock import (
    IdleCheck,
    check_not_stale,
    close_quietly,
    host_port,
    idle_check_for,
    open_socket,
    recv_into,
    send_all,
    transport_stale,
)
from .session import AsyncBytePump, BytePump, Message, TransportOptions
from .translate import SOCKET, swap_scheme, translate

DEFAULT_PORT = 8765


def framed(message: Message) -> list[Any]:
    """The frame header and the message's buffers, for one scatter-gather write."""
    if isinstance(message, list):
        return [protocol.frame_header(sum(map(len, message))), *message]
    return [protocol.frame_header(len(message)), message]


def framing_error(decoder: protocol.FrameDecoder, exc: MessageTooLarge, url: str) -> Exception:
    """A too-large frame whose header is HTTP's ``HTTP/`` is another transport answering."""
    if protocol.looks_like_http(decoder.rejected_header):
        return TransportMismatch(
            f"{url} answered in HTTP where a pi0remote TCP frame was expected: this looks like the "
            f"HTTP/WebSocket port; connect to {swap_scheme(url, 'http')} or {swap_scheme(url, 'ws')}"
        )
    return exc


class TcpPump(BytePump):
    scheme = "tcp"
    accepts_parts = True

    def __init__(self, options: TransportOptions) -> None:
        super().__init__(options)
        self.host, self.port = host_port(options.url, DEFAULT_PORT)
        self.sock: socket.socket | None = None
        self.idle: IdleCheck | None = None
        self.decoder = protocol.FrameDecoder(options.max_message_bytes)

    def open(self) -> None:
        self.sock = open_socket(self.url, self.host, self.port, self.options.timeout)
        self.idle = IdleCheck(self.sock, self.url)
        self.decoder = protocol.FrameDecoder(self.options.max_message_bytes)

    def send(self, message: Message) -> None:
        send_all(check_not_stale(self.idle, self.url), *framed(message), url=self.url)

    def receive(self) -> bytearray:
        decoder, sock = self.decoder, self.sock
        if sock is None:
            raise ConnectionLost(f"not connected to {self.url}")
        try:
            while (message := decoder.pop()) is None:
                decoder.buffer_updated(recv_into(sock, decoder.get_buffer(), self.url))
        except MessageTooLarge as exc:
            raise framing_error(decoder, exc, self.url) from exc
        return message

    def close(self) -> None:
        close_quietly(self.sock)
        self.sock = self.idle = None


class _FrameProtocol(asyncio.BufferedProtocol):
    """Frames straight into :class:`FrameDecoder`'s buffers; ``next_message()`` awaits the next one."""

    def __init__(self, max_message_bytes: int) -> None:
        self.decoder = protocol.FrameDecoder(max_message_bytes)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future | None = None
        self.failure: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self.decoder.buffer_updated(nbytes)
        except Exception as exc:  # a framing error: nothing after it can be trusted
            self._fail(exc)
            if self.transport is not None:
                self.transport.close()
            return
        if self.decoder.has_message:
            self._wake()

    def eof_received(self) -> bool:
        self._fail(ConnectionLost("server closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionLost(f"connection lost: {exc or 'closed'}"))

    def _fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def next_message(self, timeout: float) -> bytearray:
        while (message := self.decoder.pop()) is None:
            if self.failure is not None:
                raise self.failure
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self.waiter, timeout)
            finally:
                self.waiter = None
        return message


class AsyncTcpPump(AsyncBytePump):
    scheme = "tcp"
    # one buffer: asyncio may keep a not-yet-written part past the call, and the caller owns the camera
    accepts_parts = False

    def __init__(self, options: TransportOptions) -> None:
        super().__init__(options)
        self.host, self.port = host_port(options.url, DEFAULT_PORT)
        self.proto: _FrameProtocol | None = None
        self.idle: IdleCheck | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        limit = self.options.max_message_bytes
        try:
            _, self.proto = await asyncio.wait_for(
                loop.create_connection(lambda: _FrameProtocol(limit), self.host, self.port),
                self.options.timeout,
            )
        except Exception as exc:
            raise translate(SOCKET, exc, self.url, connecting=True) from exc
        self.idle = idle_check_for(self.proto.transport, self.url)

    async def send(self, message: Message) -> None:
        proto = self.proto
        if proto is None or proto.failure is not None or transport_stale(proto.transport, self.idle):
            raise ConnectionLost(f"{self.url} closed the connection while it was idle")
        proto.transport.writelines(framed(message))

    async def receive(self) -> bytearray:
        proto = self.proto
        if proto is None:
            raise ConnectionLost(f"not connected to {self.url}")
        try:
            return await proto.next_message(self.options.timeout)
        except MessageTooLarge as exc:
            raise framing_error(proto.decoder, exc, self.url) from exc
        except asyncio.TimeoutError as exc:
            raise RequestTimeout(f"no reply from {self.url} within {self.options.timeout:g}s") from exc
        except (OSError, EOFError) as exc:
            raise translate(SOCKET, exc, self.url) from exc

    async def close(self) -> None:
        proto, self.proto = self.proto, None
        if proto is not None and proto.transport is not None:
            proto.transport.close()


TcpTransport = TcpPump
AsyncTcpTransport = AsyncTcpPump

__all__ = ["AsyncTcpPump", "TcpPump"]
