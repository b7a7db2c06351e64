"""HTTP/1.1 and WebSocket on one port.

``POST /infer`` (msgpack body in, msgpack reply out), ``POST /reset``, ``GET /metadata``,
``GET /healthz`` (all answered by :meth:`ServerCore.handle_http`, the dispatch the ASGI app of a
deployment shares) and ``GET /ws`` (WebSocket upgrade; the WebSocket side is the ``websockets``
package's sans-I/O protocol, its messages go to :meth:`ServerCore.handle` like TCP's). Persistent connections, ``Expect: 100-continue``, bodies bounded by the
server's message size limit. A small hand-written HTTP/1.1 parser instead of an ASGI stack: it serves
only these endpoints and costs a fraction of a framework's per-request Python (docs/decisions.md).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from .. import protocol
from ..errors import (
    MessageTooLarge,
    Pi0RemoteError,
    ProtocolError,
    TransportMismatch,
    to_wire,
)
from .connection import MessageConnection, linger_close, set_nodelay
from .core import ServerCore, Session, status_for

MAX_HEAD_BYTES = 16384

_STATUS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def _not_http(data: bytes | bytearray) -> Pi0RemoteError:
    """What a client that sent non-HTTP bytes (a pi0remote TCP frame, TLS) to this port is told."""
    if len(data) >= 5 and data[4] in protocol.KIND_NAMES:
        return TransportMismatch(
            "a pi0remote TCP frame reached the HTTP/WebSocket port: use an http:// or ws:// URL here, "
            "or tcp:// with the server's TCP port"
        )
    return ProtocolError("malformed HTTP request line")


class _Request:
    __slots__ = ("method", "path", "headers", "head")

    def __init__(self, method: str, path: str, headers: dict[str, str], head: bytes) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.head = head


def parse_head(head: bytes) -> _Request:
    """Request line and headers (names lower-cased) of one HTTP/1.1 request head."""
    try:
        text = head.decode("latin-1")
        lines = text.split("\r\n")
        method, target, version = lines[0].split(" ")
    except ValueError as exc:
        raise ProtocolError("malformed HTTP request line") from exc
    if not version.startswith("HTTP/1."):
        raise ProtocolError(f"unsupported HTTP version {version!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ProtocolError("malformed HTTP header line")
        headers[name.lower()] = value.strip()
    path = target.split("?", 1)[0]
    return _Request(method, path, headers, head)


def response_head(status: int, content_type: str, length: int, *, close: bool = False) -> bytes:
    return (
        f"HTTP/1.1 {status} {_STATUS.get(status, 'Error')}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {length}\r\n"
        + ("Connection: close\r\n" if close else "")
        + "\r\n"
    ).encode("latin-1")


class HttpProtocol(asyncio.Protocol):
    def __init__(
        self, core: ServerCore, *, max_message_bytes: int, idle_timeout: float | None, debug: bool = False
    ) -> None:
        self.core = core
        self.max_message_bytes = max_message_bytes
        self.idle_timeout = idle_timeout
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.request: _Request | None = None
        self.body_length = 0
        self.ws: WebSocketSession | None = None
        self.conn: MessageConnection | None = None
        self.busy = False
        self.closing = False

    # -- connection ------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.core.transports.add(transport)
        set_nodelay(transport)
        # HTTP requests are not MessageConnection messages, but the idle timer is the same.
        self.conn = MessageConnection(
            self.core,
            Session(True, "http"),
            send=self._write,
            close=self._close,
            idle_timeout=self.idle_timeout,
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.core.transports.discard(self.transport)
        if self.ws is not None:
            self.ws.connection_lost()
        if self.conn is not None:
            self.conn.connection_lost()
        self.transport = None

    def _close(self) -> None:
        self.closing = True
        if self.transport is not None:
            linger_close(self.transport)

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        if self.ws is not None:
            self.ws.data_received(data)
            return
        if self.closing:
            return  # lingering before close: discard
        self.buf += data
        if not self.busy:
            self._process()

    # -- HTTP request loop ----------------------------------------------------------------------
    def _process(self) -> None:
        while self.transport is not None and not self.busy and self.ws is None:
            if self.request is None:
                if self.buf and not 0x41 <= self.buf[0] <= 0x5A:  # no HTTP method starts so: fail fast
                    self._respond_error(400, _not_http(self.buf), close=True)
                    return
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buf) > MAX_HEAD_BYTES:
                        self._respond_error(431, ProtocolError("request head too large"), close=True)
                    return
                head = bytes(self.buf[: end + 4])
                del self.buf[: end + 4]
                try:
                    self.request = parse_head(head)
                    self.body_length = self._body_length(self.request)
                except Pi0RemoteError as exc:
                    self._respond_error(
                        status_for(exc) if isinstance(exc, MessageTooLarge) else 400, exc, close=True
                    )
                    return
                if self._upgrade_requested(self.request):
                    self._start_websocket(self.request)
                    return
                if self.request.headers.get("expect", "").lower() == "100-continue" and self.body_length:
                    self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
            if len(self.buf) < self.body_length:
                return
            body = bytes(self.buf[: self.body_length])
            del self.buf[: self.body_length]
            request, self.request = self.request, None
            self._dispatch(request, body)

    def _body_length(self, request: _Request) -> int:
        if "transfer-encoding" in request.headers:
            raise ProtocolError("chunked request bodies are not supported: send Content-Length")
        try:
            length = int(request.headers.get("content-length", "0"))
        except ValueError as exc:
            raise ProtocolError("bad Content-Length") from exc
        if length < 0:
            raise ProtocolError("bad Content-Length")
        if length > self.max_message_bytes:
            raise MessageTooLarge(f"body of {length} bytes exceeds the limit of {self.max_message_bytes}")
        return length

    @staticmethod
    def _upgrade_requested(request: _Request) -> bool:
        return request.method == "GET" and "websocket" in request.headers.get("upgrade", "").lower()

    def _keep_alive(self, request: _Request) -> bool:
        return request.headers.get("connection", "").lower() != "close"

    def _respond(self, status: int, content_type: str, body: bytes, *, close: bool = False) -> None:
        self._write(response_head(status, content_type, len(body), close=close) + body)
        if close:
            self._close()
        elif self.conn is not None:
            self.conn.restart_idle_timer()

    def _respond_error(
        self, status: int, exc: BaseException, *, close: bool = False, request: _Request | None = None
    ) -> None:
        body = to_wire(exc)
        if request is not None and "application/json" in request.headers.get("accept", ""):
            self._respond(status, "application/json", json.dumps(body).encode(), close=close)
        else:
            self._respond(status, "application/msgpack", protocol.codec.packb(body), close=close)

    def _dispatch(self, request: _Request, body: bytes) -> None:
        """Every endpoint is the core's (:meth:`ServerCore.handle_http`); this only writes the reply."""
        self.busy = True
        if self.conn is not None:
            self.conn.suspend_idle_timer()
        asyncio.get_running_loop().create_task(self._run(request, body))

    async def _run(self, request: _Request, body: bytes) -> None:
        try:
            reply = await self.core.handle_http(
                request.method, request.path, request.headers, body, client=id(self)
            )
            self._respond(reply.status, reply.content_type, reply.body, close=not self._keep_alive(request))
        finally:
            self.busy = False
        if self.transport is not None and self.buf:
            self._process()

    # -- WebSocket ------------------------------------------------------------------------------
    def _start_websocket(self, request: _Request) -> None:
        if request.path != "/ws":
            self._respond_error(404, ProtocolError(f"no WebSocket endpoint at {request.path}"), close=True)
            return
        assert self.transport is not None
        if self.conn is not None:
            self.conn.connection_lost()  # the WebSocket session keeps its own idle timer
            self.conn = None
        leftover = bytes(self.buf)
        self.buf.clear()
        self.ws = WebSocketSession(
            self.core,
            self.transport,
            request,
            max_message_bytes=self.max_message_bytes,
            idle_timeout=self.idle_timeout,
        )
        if leftover:
            self.ws.data_received(leftover)


class WebSocketSession:
    """One upgraded connection: websockets' sans-I/O ``ServerProtocol`` driven by our transport."""

    def __init__(
        self,
        core: ServerCore,
        transport: asyncio.Transport,
        request: _Request,
        *,
        max_message_bytes: int,
        idle_timeout: float | None,
    ) -> None:
        from websockets.frames import Opcode
        from websockets.server import ServerProtocol

        self._opcode = Opcode
        self.transport = transport
        self.proto = ServerProtocol(max_size=max_message_bytes)
        self.proto.receive_data(request.head)
        ws_request = self.proto.events_received()[0]
        authorised = core.check_bearer(request.headers.get("authorization"))
        if authorised:
            response = self.proto.accept(ws_request)
        else:
            response = self.proto.reject(401, "missing or wrong token\n")
        self.proto.send_response(response)
        self.fragments: list[bytes] = []
        self.conn = MessageConnection(
            core,
            Session(authenticated=authorised, transport="ws"),
            send=self._send,
            close=self._close,
            idle_timeout=idle_timeout,
        )
        self._flush()

    def _flush(self) -> None:
        data = self.proto.data_to_send()
        if data and not self.transport.is_closing():
            self.transport.writelines(data)
        if any(d == b"" for d in data):  # websockets asks for the TCP close
            linger_close(self.transport)

    def _send(self, message: bytes) -> None:
        if not self.transport.is_closing():
            self.proto.send_binary(message)
            self._flush()

    def _close(self) -> None:
        from websockets.frames import CloseCode

        try:
            self.proto.send_close(CloseCode.GOING_AWAY, "idle timeout")
        except Exception:
            pass
        self._flush()
        linger_close(self.transport)

    def data_received(self, data: bytes) -> None:
        self.proto.receive_data(data)
        for event in self.proto.events_received():
            opcode = getattr(event, "opcode", None)
            if opcode in (self._opcode.BINARY, self._opcode.TEXT, self._opcode.CONT):
                self.fragments.append(event.data)
                if event.fin:
                    message: Any = self.fragments[0] if len(self.fragments) == 1 else b"".join(self.fragments)
                    self.fragments = []
                    self.conn.message_received(message)
        self._flush()

    def connection_lost(self) -> None:
        self.conn.connection_lost()


async def start(core: ServerCore, options: Any) -> Any:
    """The ``http://`` and ``ws://`` listener on one port (:mod:`pi0remote.server.listener` protocol)."""
    from .listener import StreamListener

    loop = asyncio.get_running_loop()
    kwargs = options.listener_kwargs()
    srv = await loop.create_server(
        lambda: HttpProtocol(core, debug=options.debug, **kwargs), options.host, options.port
    )
    listener = StreamListener(core, srv, [])
    base = f"{options.url_host}:{listener.port}"
    if "http" in options.transports:
        listener.urls.append(f"http://{base}")
    if "ws" in options.transports:
        listener.urls.append(f"ws://{base}/ws")
    return listener
