"""Blocking-socket plumbing shared by the sync pumps (tcp, ws, http, openpi): connect, read, write, staleness."""

from __future__ import annotations

import select
import socket
import ssl
from typing import Any
from urllib.parse import urlsplit

from ..errors import ConnectError, ConnectionLost, InvalidURL
from .translate import SOCKET, translate


def host_port(url: str, default_port: int) -> tuple[str, int]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidURL(f"bad URL {url!r}: {exc}") from exc
    if not parts.hostname:
        raise InvalidURL(f"no host in {url!r}")
    return parts.hostname, port or default_port


def open_socket(
    url: str, host: str, port: int, timeout: float, *, tls: bool = False, server_hostname: str | None = None
) -> socket.socket:
    """A connected blocking socket (TCP_NODELAY, per-operation timeout); failures are ConnectError."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls:
            ctx = ssl.create_default_context()
            sock = ctx.wrap_socket(sock, server_hostname=server_hostname or host)
        sock.settimeout(timeout)
    except Exception as exc:
        raise translate(SOCKET, exc, url, connecting=True) from exc
    return sock


def recv_into(sock: socket.socket, view: memoryview, url: str = "server") -> int:
    try:
        n = sock.recv_into(view)
    except Exception as exc:
        raise translate(SOCKET, exc, url) from exc
    if n == 0:
        raise ConnectionLost(f"{url} closed the connection")
    return n


def send_all(sock: socket.socket, *parts: bytes | bytearray | memoryview, url: str = "server") -> None:
    """Write ``parts`` in one system call where possible (never header and body as two packets)."""
    try:
        if isinstance(sock, ssl.SSLSocket) or len(parts) == 1:
            sock.sendall(parts[0] if len(parts) == 1 else b"".join(parts))
            return
        total = sum(len(p) for p in parts)
        sent = sock.sendmsg(parts)
        if sent < total:
            sock.sendall(b"".join(parts)[sent:])
    except Exception as exc:
        raise translate(SOCKET, exc, url) from exc


def readable(sock: socket.socket, timeout: float = 0.0) -> bool:
    """True when ``sock`` has input (or EOF, or an error) within ``timeout`` seconds."""
    fd = sock.fileno()
    if fd < 0:
        return True
    if fd < 1024:
        return bool(select.select([fd], [], [], max(timeout, 0.0))[0])
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(int(timeout * 1000) + 1, 0)))


def check_not_stale(sock: socket.socket | None, url: str) -> socket.socket:
    """Before a request: raise ConnectionLost (request not delivered) if the server closed or spoke first.

    Between exchanges a pi0remote server sends nothing, so anything readable (EOF, a reset, stray bytes)
    means this connection cannot carry the next request; the session reconnects and sends it there.
    """
    if sock is None:
        raise ConnectionLost(f"not connected to {url}")
    if readable(sock):
        raise ConnectionLost(f"{url} closed the connection while it was idle")
    return sock


def transport_stale(transport: Any) -> bool:
    """The asyncio twin of :func:`check_not_stale`: closing, or input the loop has not read yet."""
    if transport is None or transport.is_closing():
        return True
    sock = transport.get_extra_info("socket")
    return sock is not None and readable(sock)


def close_quietly(sock: socket.socket | None) -> None:
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass


__all__ = ["ConnectError", "check_not_stale", "close_quietly", "host_port", "open_socket", "recv_into"]
