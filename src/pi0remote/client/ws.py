"""``ws://host:port/ws`` and ``wss://``: one pi0remote message per binary WebSocket message.

The sync pump drives the ``websockets`` package's sans-I/O ``ClientProtocol`` over a blocking socket (no
background thread, no hand-offs per call; each request frame masked and written in one system call); the
async pump is ``websockets.asyncio``. The token goes in the upgrade request's ``Authorization: Bearer``
header; then HELLO / METADATA as on every transport.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
from typing import Any

from ..errors import ConnectError, ConnectionLost, ProtocolError, RequestTimeout, TransportMismatch
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
from .translate import swap_scheme, translate, websockets_table, ws_status_error


@functools.cache
def _websockets() -> tuple[Any, Any, Any]:
    """``Frame``, ``Opcode`` and ``apply_mask`` of websockets, imported on first use (once, not per call)."""
    from websockets.frames import Frame, Opcode

    try:
        from websockets.speedups import apply_mask
    except ImportError:  # pure-Python build of websockets
        from websockets.utils import apply_mask
    return Frame, Opcode, apply_mask


class BlockingWebSocket:
    """websockets' sans-I/O client protocol over one blocking socket (also used by the openpi pump)."""

    def __init__(self, url: str, ws_url: str, timeout: float, max_message_bytes: int, tls: bool) -> None:
        self.url = url
        self.ws_url = ws_url
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self.tls = tls
        self.host, self.port = host_port(ws_url, 443 if tls else 80)
        self.sock: socket.socket | None = None
        self.idle: IdleCheck | None = None
        self.proto: Any = None
        self._buf = bytearray(1 << 18)
        self._fragments: list[bytes] = []
        self.text = False
        """Whether the last message returned by :meth:`recv_message` was a text message."""

    def _flush(self) -> None:
        assert self.sock is not None
        data = [d for d in self.proto.data_to_send() if d]
        if data:
            send_all(self.sock, *data, url=self.url)

    def _read(self) -> bytes:
        assert self.sock is not None
        n = recv_into(self.sock, memoryview(self._buf), self.url)
        return bytes(self._buf[:n])

    def _feed(self, data: bytes) -> list[Any]:
        self.proto.receive_data(data)
        events = self.proto.events_received()
        if self.proto.parser_exc is not None:
            raise translate(websockets_table(), self.proto.parser_exc, self.url)
        try:
            self._flush()  # pongs, close replies
        except ConnectionLost:
            if self.proto.close_rcvd is None:
                raise  # else the close frame in `events` says why
        return events

    def handshake(self, headers: dict[str, str] | None) -> list[Any]:
        """Connect and upgrade; returns the events that arrived with the response (openpi's metadata)."""
        from websockets.client import ClientProtocol
        from websockets.http11 import Response
        from websockets.uri import parse_uri

        self.sock = open_socket(self.url, self.host, self.port, self.timeout, tls=self.tls)
        self.idle = IdleCheck(self.sock, self.url)
        self.proto = ClientProtocol(parse_uri(self.ws_url), max_size=self.max_message_bytes)
        request = self.proto.connect()
        for name, value in (headers or {}).items():
            request.headers[name] = value
        self.proto.send_request(request)
        self._flush()
        response, pending, first = None, [], True
        while response is None:
            data = self._read()
            if first and not data.startswith(b"HTTP/"[: len(data)]):
                raise TransportMismatch(
                    f"{self.url} did not answer the WebSocket upgrade in HTTP: if this is a pi0remote "
                    f"TCP port, connect to {swap_scheme(self.url, 'tcp')}"
                )
            first = False
            for event in self._feed(data):
                if isinstance(event, Response):
                    response = event
                elif response is not None:
                    pending.append(event)
        if response.status_code != 101:
            raise ws_status_error(response.status_code, self.url)
        if self.proto.handshake_exc is not None:
            raise ConnectError(f"WebSocket handshake with {self.url} failed: {self.proto.handshake_exc}")
        return pending

    def send_message(self, message: Message, *, idle_input_ok: bool = False) -> None:
        """One binary message; ConnectionLost (not delivered) unless the WebSocket is open and quiet."""
        if self.proto is None or self.proto.state.name != "OPEN" or self.sock is None:
            raise ConnectionLost(f"the WebSocket to {self.url} is not open")
        sock = self.sock if idle_input_ok else check_not_stale(self.idle, self.url)
        send_all(sock, *masked_binary_frame(message), url=self.url)

    def drain(self) -> None:
        """Take in what arrived between exchanges (pings, a close) without waiting for more."""
        while self.idle is not None and self.idle.has_input():
            if self.message(self._feed(self._read())) is not None:
                raise ConnectionLost(f"{self.url} sent a message nobody asked for")

    def message(self, events: list[Any]) -> bytes | None:
        """The first complete data message in ``events``; raises on a close frame."""
        Frame, Opcode, _ = _websockets()
        for event in events:
            if not isinstance(event, Frame):
                continue
            if event.opcode == Opcode.CLOSE:
                from websockets.exceptions import ConnectionClosedError

                rcvd, sent = self.proto.close_rcvd, self.proto.close_sent
                exc = ConnectionClosedError(rcvd, sent, True if rcvd and sent else None)
                raise translate(websockets_table(), exc, self.url)
            if event.opcode in (Opcode.BINARY, Opcode.TEXT, Opcode.CONT):
                if event.opcode != Opcode.CONT:
                    self.text = event.opcode == Opcode.TEXT
                self._fragments.append(event.data)
                if event.fin:
                    data = self._fragments[0] if len(self._fragments) == 1 else b"".join(self._fragments)
                    self._fragments = []
                    return data
        return None

    def recv_message(self) -> bytes:
        while (data := self.message(self._feed(self._read()))) is None:
            pass
        return data

    def close(self) -> None:
        """Send a close frame if possible, then close the socket; never raises."""
        sock, proto = self.sock, self.proto
        self.sock = self.proto = self.idle = None
        self._fragments = []
        if sock is not None and proto is not None:
            try:
                proto.send_close()
                data = [d for d in proto.data_to_send() if d]
                if data:
                    send_all(sock, *data)
            except Exception:
                pass
        close_quietly(sock)


def masked_binary_frame(message: bytes | list) -> list[bytes | memoryview]:
    """One client-to-server binary WebSocket frame (RFC 6455: FIN, masked) carrying ``message``.

    ``message`` may be a list of buffers (a scatter-gather pi0remote message): each part is masked on
    its own with the mask rotated to its offset, so the payload is copied once, by the masking itself,
    instead of being joined, masked and re-buffered. Returns the pieces for one ``sendmsg``.
    """
    apply_mask = _websockets()[2]
    parts = message if isinstance(message, list) else [message]
    length = sum(map(len, parts))
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


class WsPump(BytePump):
    scheme = "ws"
    accepts_parts = True
    token_in_headers = True

    def __init__(self, options: TransportOptions) -> None:
        super().__init__(options)
        tls = options.url.lower().startswith("wss://")
        self.ws = BlockingWebSocket(options.url, options.url, options.timeout, options.max_message_bytes, tls)

    def open(self) -> None:
        token = self.options.token
        self.ws.handshake({"Authorization": f"Bearer {token}"} if token is not None else None)

    def send(self, message: Message) -> None:
        self.ws.send_message(message)

    def receive(self) -> bytes:
        data = self.ws.recv_message()
        if self.ws.text:
            raise ProtocolError(f"{self.url} sent a text WebSocket message")
        return data

    def close(self) -> None:
        self.ws.close()


async def open_async_websocket(url: str, options: TransportOptions, headers: dict[str, str] | None) -> Any:
    """A ``websockets.asyncio`` connection with pi0remote's settings: no compression, no pings."""
    from websockets.asyncio.client import connect

    try:
        return await connect(
            url,
            additional_headers=headers,
            max_size=options.max_message_bytes,
            compression=None,
            open_timeout=options.timeout,
            ping_interval=None,
        )
    except Exception as exc:
        raise translate(websockets_table(), exc, options.url, connecting=True) from exc


async def async_ws_send(ws: Any, payload: Any, url: str, idle: IdleCheck | None = None) -> None:
    """Send one message; ConnectionLost (not delivered) when the WebSocket is no longer open."""
    from websockets.protocol import State

    if ws is None or ws.protocol.state is not State.OPEN or transport_stale(ws.transport, idle):
        raise ConnectionLost(f"the WebSocket to {url} is not open")
    try:
        await ws.send(payload)
    except Exception as exc:
        raise translate(websockets_table(), exc, url) from exc


async def async_ws_recv(ws: Any, timeout: float, url: str) -> bytes | str:
    if ws is None:
        raise ConnectionLost(f"not connected to {url}")
    try:
        return await asyncio.wait_for(ws.recv(), timeout)
    except asyncio.TimeoutError as exc:
        raise RequestTimeout(f"no reply from {url} within {timeout:g}s") from exc
    except Exception as exc:
        raise translate(websockets_table(), exc, url) from exc


async def close_async_websocket(ws: Any) -> None:
    if ws is not None:
        try:
            await ws.close()
        except Exception:
            pass


class AsyncWsPump(AsyncBytePump):
    scheme = "ws"
    token_in_headers = True

    def __init__(self, options: TransportOptions) -> None:
        super().__init__(options)
        self.ws: Any = None
        self.idle: IdleCheck | None = None

    async def open(self) -> None:
        token = self.options.token
        headers = {"Authorization": f"Bearer {token}"} if token is not None else None
        self.ws = await open_async_websocket(self.url, self.options, headers)
        self.idle = idle_check_for(self.ws.transport, self.url)

    async def send(self, message: Message) -> None:
        await async_ws_send(self.ws, message, self.url, self.idle)

    async def receive(self) -> bytes:
        data = await async_ws_recv(self.ws, self.options.timeout, self.url)
        if isinstance(data, str):
            raise ProtocolError(f"{self.url} sent a text WebSocket message")
        return data

    async def close(self) -> None:
        ws, self.ws = self.ws, None
        await close_async_websocket(ws)


WsTransport = WsPump
AsyncWsTransport = AsyncWsPump

__all__ = ["AsyncWsPump", "BlockingWebSocket", "WsPump", "masked_binary_frame"]
