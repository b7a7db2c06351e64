"""Raw TCP listener: length-prefixed frames (pi0remote.protocol) over one persistent connection.

Bounds (``core.limits``): the connection is admitted by ``core.gate`` (total / per address); before
its HELLO authenticates it may send at most ``preauth_bytes`` and must do so within
``handshake_timeout``; frame buffers grow with the bytes that arrive; replies a client leaves unread
pause reading, and past ``max_outbound_bytes`` (or ``write_stall_timeout``) the connection is dropped.
"""

from __future__ import annotations

import asyncio
from typing import Any

from .. import protocol
from ..errors import AuthenticationError, ProtocolError
from .connection import MessageConnection, linger_close, set_nodelay
from .core import ServerCore, Session
from .limits import admit_transport

WRITE_HIGH_WATER = 1024 * 1024
"""Unsent reply bytes at which a connection stops reading and serving until its client catches up."""


class FramedStreamProtocol(asyncio.BufferedProtocol):
    """Frames arrive straight into their own buffers (``FrameDecoder``); each reply is one write."""

    transport_name = "tcp"

    def __init__(self, core: ServerCore, *, max_message_bytes: int, idle_timeout: float | None) -> None:
        self.core = core
        self.max_message_bytes = max_message_bytes
        self.idle_timeout = idle_timeout
        self.decoder = protocol.FrameDecoder(max_message_bytes, start_bytes=4096)
        self.transport: asyncio.Transport | None = None
        self.conn: MessageConnection | None = None
        self.session = Session(authenticated=False, transport=self.transport_name)
        self._addr: Any = None
        self._preauth = 0
        self._outbound_cap = core.outbound_cap

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._addr = admit_transport(self.core.gate, transport)
        if self._addr is None:
            return
        self.transport = transport
        self.core.transports.add(transport)
        set_nodelay(transport)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        limits = self.core.limits
        self.conn = MessageConnection(
            self.core,
            self.session,
            send=self._send,
            close=lambda: linger_close(transport),
            abort=transport.abort,
            idle_timeout=self.idle_timeout,
            pause=self._pause,
            handshake_timeout=limits.handshake_timeout,
            write_stall_timeout=limits.write_stall_timeout,
            write_buffered=transport.get_write_buffer_size,
        )

    def _pause(self, paused: bool) -> None:
        if self.transport is not None and not self.transport.is_closing():
            (self.transport.pause_reading if paused else self.transport.resume_reading)()

    def pause_writing(self) -> None:
        if self.conn is not None:
            self.conn.writing_paused(True)

    def resume_writing(self) -> None:
        if self.conn is not None:
            self.conn.writing_paused(False)

    def _send(self, message: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(protocol.frame_header(len(message)) + message)
            if transport.get_write_buffer_size() > self._outbound_cap:
                transport.abort()  # a client that does not read its replies

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.decoder.broken or self.conn is None:
            return protocol._scratch()  # discard whatever arrives before the close completes
        return self.decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if self.decoder.broken or self.conn is None or self.conn.closed:
            return
        try:
            self.decoder.buffer_updated(nbytes)
        except ProtocolError as exc:  # oversized or empty frame: the stream cannot be resynchronised
            self._send(self.core.error_message(exc))
            self.conn.shutdown()
            return
        while (message := self.decoder.pop()) is not None:
            self.conn.message_received(message)
        if not self.session.authenticated:
            self._preauth += nbytes
            if self._preauth > self.core.limits.preauth_bytes:
                self.decoder.broken = True
                exc = AuthenticationError("too many bytes before authenticating (send a HELLO first)")
                self._send(protocol.encode_error(exc))
                self.conn.shutdown()
        elif self.decoder.start_bytes < protocol.FrameDecoder.SCRATCH_BYTES:
            self.decoder.start_bytes = protocol.FrameDecoder.SCRATCH_BYTES

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._addr is not None:
            self.core.gate.release(self._addr)
            self._addr = None
        self.core.transports.discard(self.transport)
        if self.conn is not None:
            self.conn.connection_lost()
        self.transport = None


async def start(core: ServerCore, options: Any) -> Any:
    """The ``tcp://`` listener (:mod:`pi0remote.server.listener` protocol)."""
    from .listener import StreamListener

    loop = asyncio.get_running_loop()
    kwargs = options.listener_kwargs()
    srv = await loop.create_server(lambda: FramedStreamProtocol(core, **kwargs), options.host, options.port)
    listener = StreamListener(core, srv, [])
    listener.urls.append(f"tcp://{options.url_host}:{listener.port}")
    return listener
