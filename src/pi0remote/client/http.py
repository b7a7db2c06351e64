"""``http://host:port`` and ``https://``: each pi0remote message as one HTTP exchange on a keep-alive connection.

The pump maps message kinds to endpoints: HELLO is ``GET /metadata``, INFER ``POST /infer``, RESET
``POST /reset``; a 200 reply becomes METADATA / RESULT / RESET_OK with the body as it came, any other
status an ERROR message (decoding to the typed error the server sent, whatever a proxy in between did).

The sync pump is a small HTTP/1.1 client on a blocking socket (request head and body in one system
call; Content-Length and chunked replies; size limit checked from the head): httpx's per-request Python
costs more than the whole loopback round trip (docs/decisions.md). The async pump is httpx.
"""

from __future__ import annotations

import socket
from typing import Any
from urllib.parse import urlsplit

from .. import codec, protocol
from ..errors import (
    ConnectionLost,
    MessageTooLarge,
    ProtocolError,
    ReplyLost,
    TransportMismatch,
)
from ._sock import IdleCheck, check_not_stale, close_quietly, host_port, open_socket, recv_into, send_all
from .session import AsyncBytePump, BytePump, Message, TransportOptions
from .translate import httpx_table, mismatch_hint, translate

ROUTES = {
    protocol.HELLO: ("GET", "/metadata", protocol.METADATA),
    protocol.INFER: ("POST", "/infer", protocol.RESULT),
    protocol.RESET: ("POST", "/reset", protocol.RESET_OK),
}
MAX_HEAD = 65536


def route(message: Message) -> tuple[str, str, int, list]:
    """(method, path, reply kind, body buffers) for one pi0remote message."""
    parts = message if isinstance(message, list) else [message]
    kind = parts[0][0]
    if kind not in ROUTES:
        raise ProtocolError(f"HTTP carries no {protocol.KIND_NAMES.get(kind, kind)} messages")
    method, path, ok_kind = ROUTES[kind]
    body = [memoryview(parts[0])[1:], *parts[1:]] if method == "POST" else []
    return method, path, ok_kind, [p for p in body if len(p)]


def error_body(status: int, body: bytes | bytearray) -> bytes:
    """An error reply's body as a typed-error map, whatever the proxy in between sent."""
    try:
        decoded = codec.unpackb(body)
        if isinstance(decoded, dict) and "type" in decoded:
            return bytes(body)
    except Exception:
        pass
    code = {401: "auth", 403: "auth", 413: "too_large"}.get(status, "server")
    text = bytes(body[:200]).decode("utf-8", "replace")
    return codec.packb({"type": code, "message": f"HTTP {status}: {text}"})


def as_message(status: int, ok_kind: int, body: bytes | bytearray) -> bytearray:
    if status != 200:
        return bytearray((protocol.ERROR,)) + error_body(status, body)
    out = bytearray(1 + len(body))
    out[0] = ok_kind
    out[1:] = body
    return out


def content_length(headers: dict[str, str], limit: int, url: str) -> int:
    """The reply's Content-Length, checked: malformed is a ProtocolError, over ``limit`` MessageTooLarge."""
    raw = headers.get("content-length", "0")
    if not raw.isdigit() or len(raw) > 19:
        raise ProtocolError(f"malformed Content-Length {raw[:40]!r} from {url}")
    length = int(raw)
    if length > limit:
        raise MessageTooLarge(f"reply of {length} bytes from {url} exceeds the limit of {limit}")
    return length


def _base(url: str) -> str:
    return url.rstrip("/")


class HttpPump(BytePump):
    scheme = "http"
    accepts_parts = True
    token_in_headers = True

    def __init__(self, options: TransportOptions) -> None:
        super().__init__(options)
        url = options.url
        self.tls = url.lower().startswith("https://")
        self.host, self.port = host_port(url, 443 if self.tls else 80)
        self.prefix = urlsplit(url).path.rstrip("/")
        self.sock: socket.socket | None = None
        self.idle: IdleCheck | None = None
        self._buf = bytearray(MAX_HEAD)
        self._pending = bytearray()
        self._ok_kind = protocol.RESULT
        host_header = self.host if self.port in (80, 443) else f"{self.host}:{self.port}"
        token = options.token
        auth = f"Authorization: Bearer {token}\r\n" if token is not None else ""
        self._common = f"Host: {host_header}\r\n{auth}Accept: application/msgpack\r\n".encode("latin-1")

    def open(self) -> None:
        self.sock = open_socket(self.url, self.host, self.port, self.options.timeout, tls=self.tls)
        self.idle = IdleCheck(self.sock, self.url)
        self._pending.clear()

    def send(self, message: Message) -> None:
        method, path, self._ok_kind, body = route(message)
        head = f"{method} {self.prefix}{path} HTTP/1.1\r\n".encode("latin-1") + self._common
        if method == "POST":
            length = sum(map(len, body))
            head += f"Content-Type: application/msgpack\r\nContent-Length: {length}\r\n\r\n".encode()
        else:
            head += b"\r\n"
        send_all(check_not_stale(self.idle, self.url), head, *body, url=self.url)

    def receive(self) -> bytearray:
        status, headers = self._read_head()
        limit = self.options.max_message_bytes
        if headers.get("transfer-encoding", "").lower() == "chunked":
            data = self._read_chunked(limit)
        else:
            data = self._read_exact(content_length(headers, limit, self.url))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return as_message(status, self._ok_kind, data)

    # -- HTTP/1.1 reply parsing --------------------------------------------------------------------
    def _fill(self) -> None:
        if self.sock is None:
            raise ConnectionLost(f"not connected to {self.url}")
        n = recv_into(self.sock, memoryview(self._buf), self.url)
        self._pending += memoryview(self._buf)[:n]

    def _read_head(self) -> tuple[int, dict[str, str]]:
        while (end := self._pending.find(b"\r\n\r\n")) < 0:
            if self._pending:
                self._check_is_http()
            if len(self._pending) > MAX_HEAD:
                raise ProtocolError(f"HTTP response head from {self.url} too large")
            self._fill()
        if not self._pending.startswith(b"HTTP/"):
            self._check_is_http()
        lines = bytes(self._pending[:end]).decode("latin-1").split("\r\n")
        del self._pending[: end + 4]
        try:
            status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError) as exc:
            raise ProtocolError(f"malformed HTTP status line {lines[0]!r:.80} from {self.url}") from exc
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if status == 100:  # an interim reply: the real one follows
            return self._read_head()
        return status, headers

    def _check_is_http(self) -> None:
        start = bytes(self._pending[:5])
        if start and not b"HTTP/".startswith(start[:5]):
            if len(start) == 5 and start[4] in protocol.KIND_NAMES:
                raise TransportMismatch(
                    f"{self.url} answered with a pi0remote frame, not HTTP: {mismatch_hint(self.url)}"
                )
            raise ProtocolError(f"{self.url} did not answer in HTTP ({start!r})")

    def _read_exact(self, n: int) -> bytes:
        while len(self._pending) < n:
            self._fill()
        data = bytes(self._pending[:n])
        del self._pending[:n]
        return data

    def _read_line(self) -> bytes:
        while (end := self._pending.find(b"\r\n")) < 0:
            if len(self._pending) > MAX_HEAD:
                raise ProtocolError(f"malformed chunked HTTP reply from {self.url}")
            self._fill()
        line = bytes(self._pending[:end])
        del self._pending[: end + 2]
        return line

    def _read_chunked(self, limit: int) -> bytes:
        parts, total = [], 0
        while True:
            try:
                size = int(self._read_line().split(b";")[0], 16)
            except ValueError as exc:
                raise ProtocolError(f"malformed chunked HTTP reply from {self.url}") from exc
            if size < 0 or total + size > limit:
                raise MessageTooLarge(f"chunked reply from {self.url} exceeds the limit of {limit}")
            if size == 0:
                while self._read_line():
                    pass
                return b"".join(parts)
            parts.append(self._read_exact(size))
            total += size
            self._read_line()

    def close(self) -> None:
        close_quietly(self.sock)
        self.sock = self.idle = None


class AsyncHttpPump(AsyncBytePump):
    """httpx. Its pool checks an idle connection before reusing it, so ``send`` does the whole exchange and
    tells apart a request that never left (ConnectionLost) from one whose reply was lost (ReplyLost)."""

    scheme = "http"
    token_in_headers = True

    def __init__(self, options: TransportOptions) -> None:
        super().__init__(options)
        self.client: Any = None
        self._reply: bytearray | None = None

    async def open(self) -> None:
        import httpx

        headers = {"Accept": "application/msgpack"}
        if self.options.token is not None:
            headers["Authorization"] = f"Bearer {self.options.token}"
        self.client = httpx.AsyncClient(
            base_url=_base(self.url), headers=headers, timeout=self.options.timeout
        )

    async def send(self, message: Message) -> None:
        import httpx

        method, path, ok_kind, body = route(message)
        if self.client is None:
            raise ConnectionLost(f"not connected to {self.url}")
        content = b"".join(body) if method == "POST" else None
        headers = {"Content-Type": "application/msgpack"} if method == "POST" else None
        try:
            request = self.client.build_request(method, path, content=content, headers=headers)
            response = await self.client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # never left: the session may resend
            raise ConnectionLost(f"could not reach {self.url}: {exc}") from exc
        except Exception as exc:
            error = translate(httpx_table(), exc, self.url)
            if type(error) is ConnectionLost:
                error = ReplyLost(f"{error}; the request may have run, so it is not sent again")
            raise error from exc
        try:
            self._reply = as_message(response.status_code, ok_kind, await self._read(response))
        finally:
            await response.aclose()

    async def _read(self, response: Any) -> bytes:
        limit = self.options.max_message_bytes
        content_length(dict(response.headers), limit, self.url)
        data = bytearray()
        try:
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > limit:
                    raise MessageTooLarge(f"reply from {self.url} exceeds the limit of {limit}")
        except MessageTooLarge:
            raise
        except Exception as exc:
            raise translate(httpx_table(), exc, self.url) from exc
        return bytes(data)

    async def receive(self) -> bytearray:
        reply, self._reply = self._reply, None
        if reply is None:
            raise ConnectionLost(f"no reply from {self.url}")
        return reply

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            await client.aclose()


HttpTransport = HttpPump
AsyncHttpTransport = AsyncHttpPump

__all__ = ["AsyncHttpPump", "HttpPump", "error_body"]
