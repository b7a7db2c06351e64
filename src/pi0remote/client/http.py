"""``http://host:port`` and ``https://``: ``POST /infer`` with a msgpack body on a keep-alive connection.

The sync client is a small HTTP/1.1 client on a blocking socket (request head and body in one system
call; Content-Length and chunked replies): httpx's per-request Python costs more than the whole
loopback round trip (docs/decisions.md). The async client is httpx.
"""

from __future__ import annotations

import socket
from typing import Any
from urllib.parse import urlsplit

from .. import codec, protocol
from ..errors import ConnectionLost, ProtocolError, RequestTimeout, TransportError, from_wire
from ._sock import async_with_retries, host_port, open_socket, recv_into, send_all, with_retries
from .base import AsyncTransport, Transport

_KIND_PATHS = {
    protocol.INFER: ("POST", "/infer", protocol.RESULT),
    protocol.RESET: ("POST", "/reset", protocol.RESET_OK),
}
MAX_HEAD = 65536


def _error_body(status: int, body: bytes) -> bytes:
    """Make sure an error reply decodes to the typed error, whatever the proxy in between sent."""
    try:
        decoded = codec.unpackb(body)
        if isinstance(decoded, dict) and "type" in decoded:
            return body
    except Exception:
        pass
    code = {401: "auth", 403: "auth", 413: "too_large"}.get(status, "server")
    text = body[:200].decode("utf-8", "replace")
    return codec.packb({"type": code, "message": f"HTTP {status}: {text}"})


class HttpTransport(Transport):
    scheme = "http"
    accepts_parts = True

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url.rstrip("/"), **options)
        self.tls = url.startswith("https://")
        self.host, self.port = host_port(url, 443 if self.tls else 80)
        self.prefix = urlsplit(url).path.rstrip("/")
        self.sock: socket.socket | None = None
        self._buf = bytearray(MAX_HEAD)
        self._pending = bytearray()
        host_header = self.host if self.port in (80, 443) else f"{self.host}:{self.port}"
        auth = f"Authorization: Bearer {self.token}\r\n" if self.token is not None else ""
        self._common = f"Host: {host_header}\r\n{auth}Accept: application/msgpack\r\n".encode("latin-1")

    def _connect(self) -> None:
        self.sock = with_retries(
            lambda: open_socket(self.host, self.port, self.timeout, tls=self.tls), self.url, self.retries
        )
        self._pending.clear()

    def open(self) -> dict[str, Any]:
        self._connect()
        try:
            status, body = self._request("GET", "/metadata", [])
        except BaseException:
            self.close()
            raise
        if status != 200:
            raise from_wire(codec.unpackb(_error_body(status, body)))
        return codec.unpackb(body)

    def roundtrip(self, message: bytes | list) -> tuple[int, bytes]:
        parts = message if isinstance(message, list) else [message]
        kind = parts[0][0]
        if kind not in _KIND_PATHS:
            raise ProtocolError(f"HTTP carries no {protocol.KIND_NAMES.get(kind, kind)} messages")
        method, path, ok_kind = _KIND_PATHS[kind]
        if self.sock is None:
            raise ConnectionLost("not connected")
        status, body = self._request(method, path, [memoryview(parts[0])[1:], *parts[1:]])
        if status != 200:
            return protocol.ERROR, _error_body(status, body)
        return ok_kind, body

    # -- HTTP/1.1 on a blocking socket ------------------------------------------------------------
    def _request(self, method: str, path: str, body: list) -> tuple[int, bytes]:
        """One request whose body is the concatenation of ``body``'s buffers, sent in one call."""
        assert self.sock is not None
        length = sum(len(p) for p in body)
        head = f"{method} {self.prefix}{path} HTTP/1.1\r\n".encode("latin-1") + self._common
        if method == "POST":
            head += f"Content-Type: application/msgpack\r\nContent-Length: {length}\r\n\r\n".encode()
        else:
            head += b"\r\n"
        send_all(self.sock, head, *[p for p in body if len(p)])
        status, headers = self._read_head()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            data = self._read_chunked()
        else:
            data = self._read_exact(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, data

    def _fill(self) -> None:
        assert self.sock is not None
        n = recv_into(self.sock, memoryview(self._buf))
        self._pending += memoryview(self._buf)[:n]

    def _read_head(self) -> tuple[int, dict[str, str]]:
        while True:
            end = self._pending.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(self._pending) > MAX_HEAD:
                raise ProtocolError("HTTP response head too large")
            self._fill()
        head = bytes(self._pending[:end]).decode("latin-1")
        del self._pending[: end + 4]
        lines = head.split("\r\n")
        try:
            status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError) as exc:
            raise ProtocolError(f"malformed HTTP status line {lines[0]!r:.80}") from exc
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if status == 100:  # an interim reply: the real one follows
            return self._read_head()
        return status, headers

    def _read_exact(self, n: int) -> bytes:
        while len(self._pending) < n:
            self._fill()
        data = bytes(self._pending[:n])
        del self._pending[:n]
        return data

    def _read_line(self) -> bytes:
        while (end := self._pending.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self._pending[:end])
        del self._pending[: end + 2]
        return line

    def _read_chunked(self) -> bytes:
        parts = []
        while True:
            try:
                size = int(self._read_line().split(b";")[0], 16)
            except ValueError as exc:
                raise ProtocolError("malformed chunked HTTP reply") from exc
            if size == 0:
                while self._read_line():
                    pass
                return b"".join(parts)
            parts.append(self._read_exact(size))
            self._read_line()

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None


class AsyncHttpTransport(AsyncTransport):
    scheme = "http"

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url.rstrip("/"), **options)
        self.client: Any = None

    async def open(self) -> dict[str, Any]:

        import httpx

        headers = {"Accept": "application/msgpack"}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        self.client = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=self.timeout)
        try:
            resp = await async_with_retries(
                lambda: self.client.get("/metadata"), self.url, self.retries, retry_on=(httpx.TransportError,)
            )
        except BaseException:
            await self.close()
            raise
        if resp.status_code != 200:
            raise from_wire(codec.unpackb(_error_body(resp.status_code, resp.content)))
        return codec.unpackb(resp.content)

    async def roundtrip(self, message: bytes) -> tuple[int, bytes]:
        import httpx

        kind = message[0]
        if kind not in _KIND_PATHS:
            raise ProtocolError(f"HTTP carries no {protocol.KIND_NAMES.get(kind, kind)} messages")
        _, path, ok_kind = _KIND_PATHS[kind]
        if self.client is None:
            raise ConnectionLost("not connected")
        try:
            resp = await self.client.post(
                path, content=bytes(memoryview(message)[1:]), headers={"Content-Type": "application/msgpack"}
            )
        except httpx.TimeoutException as exc:
            raise RequestTimeout("no reply within the timeout") from exc
        except (httpx.RemoteProtocolError, httpx.ConnectError, httpx.ReadError, httpx.WriteError) as exc:
            raise ConnectionLost(f"connection lost: {exc}") from exc
        except httpx.TransportError as exc:
            raise TransportError(str(exc)) from exc
        if resp.status_code != 200:
            return protocol.ERROR, _error_body(resp.status_code, resp.content)
        return ok_kind, resp.content

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None
