"""Blocking-socket plumbing shared by the sync pumps (tcp, ws, http, openpi): connect, read, write, staleness."""

from __future__ import annotations

import select
import socket
import ssl
from typing import Any
from urllib.parse import urlsplit

from ..errors import ConnectionLost, InvalidURL
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
        total = sum(map(len, parts))
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


class IdleCheck:
    """Before a request: is the connection still usable? One cached ``poll`` (a fraction of a microsecond).

    Between exchanges a pi0remote server sends nothing, so anything readable (EOF, a reset, stray bytes)
    means this connection cannot carry the next request: :meth:`check` raises ConnectionLost (the request
    is not delivered) and the session reconnects and sends it there. Over TLS, records that carry no data
    (TLS 1.3 session tickets) are read and ignored.
    """

    def __init__(self, sock: socket.socket, url: str) -> None:
        self.sock = sock
        self.url = url
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)

    def has_input(self) -> bool:
        return bool(self._poll.poll(0))

    def check(self) -> socket.socket:
        sock = self.sock
        if self._poll.poll(0) and not self._only_tls_records(sock):
            raise ConnectionLost(f"{self.url} closed the connection while it was idle")
        return sock

    @staticmethod
    def _only_tls_records(sock: socket.socket) -> bool:
        if not isinstance(sock, ssl.SSLSocket):
            return False
        timeout = sock.gettimeout()
        sock.setblocking(False)
        try:
            sock.recv(1)  # data or EOF: the connection is not usable either way
            return False
        except ssl.SSLWantReadError:
            return True
        except OSError:
            return False
        finally:
            sock.settimeout(timeout)


def check_not_stale(check: IdleCheck | None, url: str) -> socket.socket:
    """The socket of ``check`` once it passed (ConnectionLost, not delivered, when not connected)."""
    if check is None:
        raise ConnectionLost(f"not connected to {url}")
    sock = check.sock
    if check._poll.poll(0) and not check._only_tls_records(sock):
        raise ConnectionLost(f"{url} closed the connection while it was idle")
    return sock


def transport_stale(transport: Any, check: IdleCheck | None) -> bool:
    """The asyncio twin of :meth:`IdleCheck.check`: closing, or input the loop has not read yet."""
    if transport is None or transport.is_closing():
        return True
    return check is not None and check.has_input()


def idle_check_for(transport: Any, url: str) -> IdleCheck | None:
    """An :class:`IdleCheck` on an asyncio transport's socket (None when it has none)."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    return IdleCheck(sock, url) if sock is not None else None


def close_quietly(sock: socket.socket | None) -> None:
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass


__all__ = [
    "IdleCheck",
    "check_not_stale",
    "close_quietly",
    "host_port",
    "open_socket",
    "recv_into",
]
