"""Raw TCP listener: length-prefixed frames (pi0remote.protocol) over one persistent connection."""

from __future__ import annotations

import asyncio
from typing import Any

from .. import protocol
from ..errors import ProtocolError
from .connection import MessageConnection, linger_close, set_nodelay
from .core import ServerCore, Session


class FramedStreamProtocol(asyncio.BufferedProtocol):
    """Frames arrive straight into their own buffers (``FrameDecoder``); each reply is one write."""

    transport_name = "tcp"

    def __init__(self, core: ServerCore, *, max_message_bytes: int, idle_timeout: float | None) -> None:
        self.core = core
        self.max_message_bytes = max_message_bytes
        self.idle_timeout = idle_timeout
        self.decoder = protocol.FrameDecoder(max_message_bytes)
        self.transport: asyncio.Transport | None = None
        self.conn: MessageConnection | None = None
        self._sink = bytearray(65536)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.core.transports.add(transport)
        set_nodelay(transport)
        self.conn = MessageConnection(
            self.core,
            Session(authenticated=False, transport=self.transport_name),
            send=self._send,
            close=lambda: linger_close(transport),
            idle_timeout=self.idle_timeout,
            pause=self._pause,
        )

    def _pause(self, paused: bool) -> None:
        if self.transport is not None:
            (self.transport.pause_reading if paused else self.transport.resume_reading)()

    def _send(self, message: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(protocol.frame_header(len(message)) + message)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.decoder.broken:
            return memoryview(self._sink)  # discard whatever arrives before the close completes
        return self.decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if self.decoder.broken or self.conn is None:
            return
        try:
            self.decoder.buffer_updated(nbytes)
        except ProtocolError as exc:  # oversized or empty frame: the stream cannot be resynchronised
            self._send(self.core.error_message(exc))
            self.conn.shutdown()
            return
        while (message := self.decoder.pop()) is not None:
            self.conn.message_received(message)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
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
