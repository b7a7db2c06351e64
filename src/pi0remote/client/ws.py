"""``ws://host:port/ws`` and ``wss://``: one pi0remote message per binary WebSocket message.

The sync client drives the ``websockets`` package's sans-I/O ``ClientProtocol`` over a blocking
socket: no background thread and no hand-offs per call. The token goes in the upgrade request's
``Authorization: Bearer`` header; then HELLO / METADATA as on every transport.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from .. import protocol
from ..errors import (
    AuthenticationError,
    ConnectError,
    ConnectionLost,
    MessageTooLarge,
    ProtocolError,
    RequestTimeout,
    TransportError,
)
from ._sock import async_with_retries, host_port, open_socket, recv_into, send_all, with_retries
from .base import AsyncTransport, Transport, _decode_reply


def close_blocking_websocket(sock: socket.socket | None, proto: Any) -> None:
    """Send a close frame if possible, then close the socket; never raises."""
    if sock is None:
        return
    try:
        proto.send_close()
        data = [d for d in proto.data_to_send() if d]
        if data:
            send_all(sock, *data)
    except Exception:
        pass
    try:
        sock.close()
    except OSError:
        pass


async def open_async_websocket(options: Any, url: str, headers: dict[str, str] | None) -> Any:
    """A ``websockets.asyncio`` connection with pi0remote's settings and bounded retries.

    ``options`` supplies ``timeout``, ``retries`` and ``max_message_bytes``; no compression, no pings.
    """
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    async def attempt() -> Any:
        try:
            return await connect(
                url,
                additional_headers=headers,
                max_size=options.max_message_bytes,
                compression=None,
                open_timeout=options.timeout,
                ping_interval=None,
            )
        except InvalidStatus as exc:
            raise upgrade_refused(exc.response.status_code) from exc

    return await async_with_retries(attempt, options.url, options.retries)


async def async_websocket_exchange(ws: Any, payload: bytes, timeout: float) -> bytes | str:
    """Send one message and await the next, translating websockets' failures into pi0remote errors."""
    import asyncio

    from websockets.exceptions import ConnectionClosed

    if ws is None:
        raise ConnectionLost("not connected")
    try:
        await ws.send(payload)
        return await asyncio.wait_for(ws.recv(), timeout)
    except asyncio.TimeoutError as exc:
        raise RequestTimeout("no reply within the timeout") from exc
    except ConnectionClosed as exc:
        rcvd = exc.rcvd
        raise _close_error(rcvd.code if rcvd else None, rcvd.reason if rcvd else "") from exc


def masked_binary_frame(message: bytes | list) -> list[bytes | memoryview]:
    """One client-to-server binary WebSocket frame (RFC 6455: FIN, masked) carrying ``message``.

    ``message`` may be a list of buffers (a scatter-gather pi0remote message): each part is masked on
    its own with the mask rotated to its offset, so the payload is copied once, by the masking itself,
    instead of being joined, masked and re-buffered. Returns the pieces for one ``sendmsg``.
    """
    try:
        from websockets.speedups import apply_mask
    except ImportError:  # pure-Python build of websockets
        from websockets.utils import apply_mask
    parts = message if isinstance(message, list) else [message]
    length = sum(len(p) for p in parts)
    mask = os.urandom(4)
    if length < 126:
        header = bytes((0x82, 0x80 | length))
    elif length < 1 << 16:
        header = bytes((0x82, 0x80 | 126)) + length.to_bytes(2, "big")
    else:
        header = bytes((0x82, 0x80 | 127)) + length.to_bytes(8, "big")
    frame: list[bytes | memoryview] = [header + mask]
    offset = 0
    for part in parts:
        shift = offset % 4
        frame.append(apply_mask(part, mask[shift:] + mask[:shift]))
        offset += len(part)
    return frame


def upgrade_refused(status: int) -> Exception:
    if status == 401:
        return AuthenticationError("server refused the WebSocket upgrade: missing or wrong token")
    return ConnectError(f"WebSocket upgrade refused: HTTP {status}")


def _close_error(code: int | None, reason: str) -> Exception:
    if code == 1009:
        return MessageTooLarge(f"server closed the WebSocket: message too big ({reason})")
    return ConnectionLost(f"server closed the WebSocket (code {code}: {reason})")


class WsTransport(Transport):
    scheme = "ws"
    accepts_parts = True

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        self.tls = url.startswith("wss://")
        self.host, self.port = host_port(url, 443 if self.tls else 80)
        self.sock: socket.socket | None = None
        self.proto: Any = None
        self._buf = bytearray(1 << 18)
        self._fragments: list[bytes] = []

    def _flush(self) -> None:
        assert self.sock is not None
        data = [d for d in self.proto.data_to_send() if d]
        if data:
            send_all(self.sock, *data)

    def _pump(self) -> list[Any]:
        """Read once from the socket; return the protocol events it completed."""
        assert self.sock is not None
        n = recv_into(self.sock, memoryview(self._buf))
        self.proto.receive_data(bytes(self._buf[:n]))
        events = self.proto.events_received()
        try:
            self._flush()  # pongs, close replies
        except TransportError:
            if self.proto.close_rcvd is None:
                raise  # else the close frame in `events` says why, and the roundtrip reports it
        return events

    def open(self) -> dict[str, Any]:
        from websockets.client import ClientProtocol
        from websockets.http11 import Response
        from websockets.uri import parse_uri

        self.sock = with_retries(
            lambda: open_socket(self.host, self.port, self.timeout, tls=self.tls), self.url, self.retries
        )
        try:
            self.proto = ClientProtocol(parse_uri(self.url), max_size=self.max_message_bytes)
            request = self.proto.connect()
            if self.token is not None:
                request.headers["Authorization"] = f"Bearer {self.token}"
            self.proto.send_request(request)
            self._flush()
            response = None
            while response is None:
                for event in self._pump():
                    if isinstance(event, Response):
                        response = event
            if response.status_code != 101:
                raise upgrade_refused(response.status_code)
            if self.proto.handshake_exc is not None:
                raise ConnectError(f"WebSocket handshake failed: {self.proto.handshake_exc}")
            kind, body = self.roundtrip(protocol.encode_message(protocol.HELLO, protocol.hello_body(None)))
            return _decode_reply(kind, body, protocol.METADATA)
        except BaseException:
            self.close()
            raise

    def roundtrip(self, message: bytes | list) -> tuple[int, memoryview]:
        from websockets.frames import Frame, Opcode

        if self.sock is None or self.proto is None:
            raise ConnectionLost("not connected")
        if self.proto.state.name != "OPEN":
            raise ConnectionLost(f"WebSocket is {self.proto.state.name.lower()}")
        send_all(self.sock, *masked_binary_frame(message))
        while True:
            for event in self._pump():
                if not isinstance(event, Frame):
                    continue
                if event.opcode == Opcode.CLOSE:
                    close = self.proto.close_rcvd
                    raise _close_error(close.code if close else None, close.reason if close else "")
                if event.opcode in (Opcode.BINARY, Opcode.TEXT, Opcode.CONT):
                    self._fragments.append(event.data)
                    if event.fin:
                        data = self._fragments[0] if len(self._fragments) == 1 else b"".join(self._fragments)
                        self._fragments = []
                        return protocol.split_message(data)
            if self.proto.close_exc is not None and self.proto.state.name == "CLOSED":
                raise ConnectionLost("WebSocket closed")

    def close(self) -> None:
        close_blocking_websocket(self.sock, self.proto)
        self.sock = None
        self.proto = None


class AsyncWsTransport(AsyncTransport):
    scheme = "ws"

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        self.ws: Any = None

    async def open(self) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token is not None else None
        self.ws = await open_async_websocket(self, self.url, headers)
        kind, body = await self.roundtrip(protocol.encode_message(protocol.HELLO, protocol.hello_body(None)))
        return _decode_reply(kind, body, protocol.METADATA)

    async def roundtrip(self, message: bytes) -> tuple[int, memoryview]:
        data = await async_websocket_exchange(self.ws, message, self.timeout)
        if isinstance(data, str):
            raise ProtocolError("server sent a text WebSocket message")
        return protocol.split_message(data)

    async def close(self) -> None:
        if self.ws is not None:
            try:
                await self.ws.close()
            except Exception:
                pass
            self.ws = None
