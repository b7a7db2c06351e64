"""HTTP/1.1 and WebSocket on one port.

``POST /infer`` (msgpack body in, msgpack reply out), ``POST /reset``, ``GET /metadata``,
``GET /healthz`` (all answered by :meth:`ServerCore.handle_http`, the dispatch the ASGI app of a
deployment shares) and ``GET /ws`` (WebSocket upgrade; the WebSocket side is the ``websockets``
package's sans-I/O protocol, its messages go to :meth:`ServerCore.handle` like TCP's). Persistent connections, ``Expect: 100-continue``, bodies bounded by the
server's message size limit. A small hand-written HTTP/1.1 parser instead of an ASGI stack: it serves
only these endpoints and costs a fraction of a framework's per-request Python (docs/decisions.md).

The parser is strict (docs/security.md): the whole head is bounded (``MAX_HEAD_BYTES``) and must
arrive within ``handshake_timeout``; header names are RFC 9110 tokens, lines end in CRLF, no
folding; one ``Content-Length`` of digits only; the token is checked before ``100 Continue`` and
before a body is buffered; HEAD carries no body either way; HTTP/1.0 closes unless it asks for
keep-alive; input is not read while a request is in flight and a pipelined backlog is waiting.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Coroutine
from typing import Any

from .. import protocol
from ..errors import (
    AuthenticationError,
    MessageTooLarge,
    Pi0RemoteError,
    ProtocolError,
    TransportMismatch,
    to_wire,
)
from .connection import MessageConnection, linger_close, set_nodelay
from .core import HttpReply, ServerCore, Session, status_for
from .limits import admit_transport

MAX_HEAD_BYTES = 16384
PIPELINE_BYTES = 65536
"""Input buffered while a request is in flight; beyond it the connection stops reading until it is served."""
WRITE_HIGH_WATER = 1024 * 1024
_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
"""RFC 9110 token characters: the only bytes allowed in a method or a header name."""
_TEXT = bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100)) + b"\t"
"""Bytes allowed inside a head line (no control characters, no bare CR or LF)."""
_SINGLE = frozenset({"content-length", "transfer-encoding", "authorization", "host", "expect", "upgrade"})
"""Headers that may appear once: a second copy is a request smuggling attempt or a broken client."""

_STATUS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
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
    __slots__ = ("method", "path", "headers", "head", "version")

    def __init__(self, method: str, path: str, headers: dict[str, str], head: bytes, version: str) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.head = head
        self.version = version


_TOKEN_RE = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_WELL_FORMED = re.compile(
    rf"({_TOKEN_RE}) ([\x21-\x7e\x80-\xff]+) (HTTP/1\.[01])\r\n"
    rf"((?:{_TOKEN_RE}:[\t\x20-\x7e\x80-\xff]*\r\n)*)"
)
"""The well-formed start of a head: the request line (token method, a target without spaces, tabs or
control bytes, HTTP/1.0 or 1.1) and as many header lines (token name, a colon, a value of text bytes and
tabs, CRLF) as follow. When only the final CRLF is left after it, :func:`_parse_head_carefully` would
accept the head too (duplicate single-use headers aside). No trailing part in the pattern, so a head
that is not well formed ends the match where it goes wrong instead of making the engine backtrack."""


def parse_head(head: bytes) -> _Request:
    """Request line and headers (names lower-cased) of one HTTP/1.x request head; strict.

    Raises :class:`ProtocolError` for anything but ``METHOD SP TARGET SP HTTP/1.x`` and ``name: value``
    lines (token names, CRLF line ends, no folding, no control characters, single-use headers once).
    One regular expression checks a whole well-formed head at once; any other head goes to
    :func:`_parse_head_carefully`, which finds what is wrong with it.
    """
    text = head.decode("latin-1")
    match = _WELL_FORMED.match(text)
    if match is None or match.end() != len(text) - 2 or not text.endswith("\r\n"):
        return _parse_head_carefully(head)
    method, target, version, block = match.groups()
    headers: dict[str, str] = {}
    for line in block.split("\r\n")[:-1]:  # the lines the pattern checked: each has its colon
        name, _, value = line.partition(":")
        key = name.lower()
        value = value.strip(" \t")
        if key in headers:
            if key in _SINGLE:
                raise ProtocolError(f"duplicate {key} header")
            value = f"{headers[key]}, {value}"
        headers[key] = value
    return _Request(method, target.split("?", 1)[0], headers, head, version)


def _parse_head_carefully(head: bytes) -> _Request:
    """:func:`parse_head` line by line: the same result for a well-formed head, the precise error otherwise."""
    if head.replace(b"\r\n", b"").translate(None, _TEXT):
        raise ProtocolError("control character or bare line feed in the HTTP request head")
    lines = head.split(b"\r\n")
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise ProtocolError("empty HTTP request head")
    parts = lines[0].split(b" ")
    if (
        len(parts) != 3
        or not parts[0]
        or parts[0].translate(None, _TCHAR)
        or not parts[1]
        or b"\t" in parts[1]
    ):
        raise ProtocolError("malformed HTTP request line")
    method, target, version = (p.decode("latin-1") for p in parts)
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise ProtocolError(f"unsupported HTTP version {version[:20]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name.translate(None, _TCHAR):
            raise ProtocolError("malformed HTTP header line")
        value = value.strip(b" \t")
        key = name.decode("latin-1").lower()
        if key in headers and key in _SINGLE:
            raise ProtocolError(f"duplicate {key} header")
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    path = target.split("?", 1)[0]
    return _Request(method, path, headers, head, version)


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
        self.head_only = False
        self._reading_paused = False
        self._addr: Any = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._served = False
        self._outbound_cap = core.outbound_cap

    # -- connection ------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._addr = admit_transport(self.core.gate, transport)
        if self._addr is None:
            return
        self.transport = transport
        self.core.transports.add(transport)
        set_nodelay(transport)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        # HTTP requests are not MessageConnection messages, but the idle timer is the same.
        self.conn = MessageConnection(
            self.core,
            Session(True, "http"),
            send=self._write,
            close=self._close,
            abort=transport.abort,
            idle_timeout=self.idle_timeout,
            write_stall_timeout=self.core.limits.write_stall_timeout,
            write_buffered=transport.get_write_buffer_size,
        )
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        """The next request head must be complete within ``handshake_timeout`` of its first byte."""
        timeout = self.core.limits.handshake_timeout
        if timeout and self._head_timer is None and self.transport is not None:
            self._head_timer = asyncio.get_running_loop().call_later(timeout, self._head_timeout)

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.request is None and self.ws is None and not self.busy and (self.buf or not self._served):
            self._respond_error(408, ProtocolError("request head not complete in time"), close=True)

    def pause_writing(self) -> None:
        if self.ws is not None:
            self.ws.conn.writing_paused(True)
            return
        if self.conn is not None:
            self.conn.writing_paused(True)
        self._set_reading(True)

    def resume_writing(self) -> None:
        if self.ws is not None:
            self.ws.conn.writing_paused(False)
            return
        if self.conn is not None:
            self.conn.writing_paused(False)
        if not self.busy:
            self._set_reading(False)

    def _set_reading(self, paused: bool) -> None:
        if self.transport is not None and paused != self._reading_paused and not self.transport.is_closing():
            self._reading_paused = paused
            (self.transport.pause_reading if paused else self.transport.resume_reading)()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._addr is not None:
            self.core.gate.release(self._addr)
            self._addr = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
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
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)
            if transport.get_write_buffer_size() > self._outbound_cap:
                transport.abort()  # a client that does not read its replies

    def data_received(self, data: bytes) -> None:
        if self.ws is not None:
            self.ws.data_received(data)
            return
        if self.closing:
            return  # lingering before close: discard
        self.buf += data
        if not self.busy:
            self._process()
        elif len(self.buf) > PIPELINE_BYTES:
            self._set_reading(True)  # resumed when the request in flight is answered

    # -- HTTP request loop ----------------------------------------------------------------------
    def _process(self) -> None:
        while self.transport is not None and not self.busy and self.ws is None and not self.closing:
            if self.request is None:
                if not self._start_request():
                    return
            if len(self.buf) < self.body_length:
                return
            body = bytes(self.buf[: self.body_length])
            del self.buf[: self.body_length]
            request, self.request = self.request, None
            self._dispatch(request, body)

    def _start_request(self) -> bool:
        """Parse the next head out of the buffer; False when there is none yet (or it was refused)."""
        if not self.buf:
            return False
        if not 0x41 <= self.buf[0] <= 0x5A:  # no HTTP method starts so (a TCP frame, TLS): fail fast
            self._respond_error(400, _not_http(self.buf), close=True)
            return False
        end = self.buf.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4)
        if end < 0:  # a head still coming: it must be complete within the deadline of its first bytes
            self._arm_head_timer()
            if len(self.buf) > MAX_HEAD_BYTES:
                self._respond_error(431, ProtocolError("request head too large"), close=True)
            return False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        head = bytes(self.buf[: end + 4])
        del self.buf[: end + 4]
        self._served = True
        try:
            request = parse_head(head)
            self.body_length = self._body_length(request)
        except Pi0RemoteError as exc:
            self._respond_error(status_for(exc) if isinstance(exc, MessageTooLarge) else 400, exc, close=True)
            return False
        self.request = request
        self.head_only = request.method == "HEAD"
        if self._upgrade_requested(request):
            self._start_websocket(request)
            return False
        if self.body_length and not self.core.check_bearer(request.headers.get("authorization")):
            # before any 100 Continue and before the body is buffered
            self._respond_error(
                401, AuthenticationError("missing or wrong token"), close=True, request=request
            )
            return False
        if request.headers.get("expect", "").lower() == "100-continue" and self.body_length:
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return True

    def _body_length(self, request: _Request) -> int:
        if "transfer-encoding" in request.headers:
            raise ProtocolError("chunked request bodies are not supported: send Content-Length")
        text = request.headers.get("content-length", "0")
        if not (text.isascii() and text.isdigit() and len(text) <= 12):
            raise ProtocolError(f"bad Content-Length {text[:20]!r}")
        length = int(text)
        if length and request.method in ("HEAD", "GET"):
            raise ProtocolError(f"a {request.method} request carries no body")
        if length > self.max_message_bytes:
            raise MessageTooLarge(f"body of {length} bytes exceeds the limit of {self.max_message_bytes}")
        return length

    @staticmethod
    def _upgrade_requested(request: _Request) -> bool:
        return request.method == "GET" and "websocket" in request.headers.get("upgrade", "").lower()

    def _keep_alive(self, request: _Request) -> bool:
        options = request.headers.get("connection", "").lower()
        if request.version == "HTTP/1.0":
            return "keep-alive" in options
        return "close" not in options

    def _respond(self, status: int, content_type: str, body: bytes, *, close: bool = False) -> None:
        head = response_head(status, content_type, len(body), close=close)
        self._write(head if self.head_only else head + body)  # HEAD: the same head, never a body
        self.head_only = False
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
        """Every endpoint is the core's (:meth:`ServerCore.handle_http_now`); this only writes the reply.

        A reply the core has at once is written at once; one it must wait for is awaited in a task,
        during which nothing more is read or served on this connection.
        """
        reply = self.core.handle_http_now(
            request.method, request.path, request.headers, body, client=id(self)
        )
        if isinstance(reply, HttpReply):
            self._respond(reply.status, reply.content_type, reply.body, close=not self._keep_alive(request))
            return
        self.busy = True
        if self.conn is not None:
            self.conn.suspend_idle_timer()
        asyncio.get_running_loop().create_task(self._run(request, reply))

    async def _run(self, request: _Request, pending: Coroutine[Any, Any, HttpReply]) -> None:
        try:
            reply = await pending
            self._respond(reply.status, reply.content_type, reply.body, close=not self._keep_alive(request))
        finally:
            self.busy = False
            if self.conn is not None and not self.conn._write_blocked:
                self._set_reading(False)
        if self.transport is not None and self.buf:
            self._process()

    # -- WebSocket ------------------------------------------------------------------------------
    def _start_websocket(self, request: _Request) -> None:
        if request.path != "/ws":
            self._respond_error(404, ProtocolError(f"no WebSocket endpoint at {request.path}"), close=True)
            return
        assert self.transport is not None
        try:
            ws = WebSocketSession(
                self.core,
                self.transport,
                request,
                max_message_bytes=self.max_message_bytes,
                idle_timeout=self.idle_timeout,
            )
        except ProtocolError as exc:
            self._respond_error(400, exc, close=True)
            return
        if self.conn is not None:
            self.conn.connection_lost()  # the WebSocket session keeps its own idle timer
            self.conn = None
        self.ws = ws
        leftover = bytes(self.buf)
        self.buf.clear()
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
        from websockets.http11 import Request

        self.proto = ServerProtocol(max_size=max_message_bytes)
        self.max_message_bytes = max_message_bytes
        self.max_outbound = core.outbound_cap
        self.proto.receive_data(request.head)
        events = self.proto.events_received()
        if not events or not isinstance(events[0], Request):
            raise ProtocolError(f"malformed WebSocket upgrade request: {self.proto.handshake_exc}")
        ws_request = events[0]
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
            abort=transport.abort,
            idle_timeout=idle_timeout,
            pause=self._pause,
            write_stall_timeout=core.limits.write_stall_timeout,
            write_buffered=transport.get_write_buffer_size,
        )
        self._fragment_bytes = 0
        self._flush()

    def _pause(self, paused: bool) -> None:
        if not self.transport.is_closing():
            (self.transport.pause_reading if paused else self.transport.resume_reading)()

    def _flush(self) -> None:
        data = self.proto.data_to_send()
        if data and not self.transport.is_closing():
            self.transport.writelines(data)
        if b"" in data:  # websockets asks for the TCP close
            linger_close(self.transport)

    def _send(self, message: bytes) -> None:
        if not self.transport.is_closing():
            self.proto.send_binary(message)
            self._flush()
            if self.transport.get_write_buffer_size() > self.max_outbound:
                self.transport.abort()  # a client that does not read its replies

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
                self._fragment_bytes += len(event.data)
                if self._fragment_bytes > self.max_message_bytes:
                    self._too_large()
                    break
                if event.fin:
                    message: Any = self.fragments[0] if len(self.fragments) == 1 else b"".join(self.fragments)
                    self.fragments = []
                    self._fragment_bytes = 0
                    self.conn.message_received(message)
        self._flush()

    def _too_large(self) -> None:
        from websockets.frames import CloseCode

        self.fragments = []
        self.conn.closed = True
        try:
            self.proto.send_close(CloseCode.MESSAGE_TOO_BIG, "message over the size limit")
        except Exception:
            pass

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
