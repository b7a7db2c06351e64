"""``tcp://host:port``: length-prefixed frames over one persistent TCP connection (TCP_NODELAY)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from .. import protocol
from ..errors import ConnectionLost, RequestTimeout
from ._sock import async_with_retries, host_port, open_socket, recv_into, send_all, with_retries
from .base import AsyncTransport, Transport, _decode_reply

DEFAULT_PORT = 8765


class FramedSocket:
    """A blocking socket speaking pi0remote frames (each frame written in one system call)."""

    def __init__(self, sock: socket.socket, max_message_bytes: int) -> None:
        self.sock = sock
        self.decoder = protocol.FrameDecoder(max_message_bytes)

    def send(self, message: bytes | list) -> None:
        if isinstance(message, list):
            send_all(self.sock, protocol.frame_header(sum(len(p) for p in message)), *message)
        else:
            send_all(self.sock, protocol.frame_header(len(message)), message)

    def recv(self) -> bytearray:
        decoder = self.decoder
        while (message := decoder.pop()) is None:
            decoder.buffer_updated(recv_into(self.sock, decoder.get_buffer()))
        return message

    def roundtrip(self, message: bytes | list) -> tuple[int, memoryview]:
        self.send(message)
        return protocol.split_message(self.recv())

    def hello(self, token: str | None) -> dict[str, Any]:
        kind, body = self.roundtrip(protocol.encode_message(protocol.HELLO, protocol.hello_body(token)))
        return _decode_reply(kind, body, protocol.METADATA)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class TcpTransport(Transport):
    scheme = "tcp"
    accepts_parts = True

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        self.host, self.port = host_port(url, DEFAULT_PORT)
        self.conn: FramedSocket | None = None

    def open(self) -> dict[str, Any]:
        sock = with_retries(lambda: open_socket(self.host, self.port, self.timeout), self.url, self.retries)
        self.conn = FramedSocket(sock, self.max_message_bytes)
        try:
            return self.conn.hello(self.token)
        except BaseException:
            self.close()
            raise

    def roundtrip(self, message: bytes | list) -> tuple[int, memoryview]:
        if self.conn is None:
            raise ConnectionLost("not connected")
        return self.conn.roundtrip(message)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class AsyncTcpTransport(AsyncTransport):
    scheme = "tcp"

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        self.host, self.port = host_port(url, DEFAULT_PORT)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> dict[str, Any]:
        self.reader, self.writer = await async_with_retries(
            lambda: asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, limit=2**20), self.timeout
            ),
            self.url,
            self.retries,
        )
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        kind, body = await self.roundtrip(
            protocol.encode_message(protocol.HELLO, protocol.hello_body(self.token))
        )
        return _decode_reply(kind, body, protocol.METADATA)

    async def _exchange(self, message: bytes) -> tuple[int, memoryview]:
        assert self.reader is not None and self.writer is not None
        self.writer.writelines([protocol.frame_header(len(message)), message])
        await self.writer.drain()
        (length,) = protocol.HEADER.unpack(await self.reader.readexactly(protocol.HEADER.size))
        if length > self.max_message_bytes:
            raise ConnectionLost(f"reply of {length} bytes exceeds the limit")
        return protocol.split_message(await self.reader.readexactly(length))

    async def roundtrip(self, message: bytes) -> tuple[int, memoryview]:
        if self.writer is None:
            raise ConnectionLost("not connected")
        try:
            return await asyncio.wait_for(self._exchange(message), self.timeout)
        except asyncio.TimeoutError as exc:
            raise RequestTimeout("no reply within the timeout") from exc
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise ConnectionLost(f"connection lost: {exc}") from exc

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except (OSError, ConnectionError):
                pass
            self.writer = self.reader = None
