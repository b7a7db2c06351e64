"""Blocking-socket helpers shared by the sync stream clients (tcp, ws, http, quic+tcp)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import urlsplit

from ..errors import ConnectError, ConnectionLost, RequestTimeout, TransportError

T = TypeVar("T")

DEFAULT_RETRIES = 3
"""Connect attempts after the first one; the waits between them double from 0.1 s."""


def host_port(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    if not parts.hostname:
        raise ConnectError(f"no host in {url!r}")
    return parts.hostname, parts.port or default_port


def with_retries(
    connect: Callable[[], T],
    what: str,
    retries: int = DEFAULT_RETRIES,
    retry_on: tuple[type[BaseException], ...] = (OSError,),
    give_up_on: tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``connect`` until it succeeds, at most ``retries + 1`` times with doubling waits.

    Failures of a ``retry_on`` type are retried, except those of a ``give_up_on`` type (a refused
    certificate will not be accepted on the next try); the last one becomes :class:`ConnectError`.
    """
    delay = 0.1
    for attempt in range(retries + 1):
        try:
            return connect()
        except give_up_on:
            raise
        except retry_on as exc:
            if attempt == retries:
                raise ConnectError(
                    f"could not connect to {what} after {retries + 1} attempts: {exc}"
                ) from exc
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


async def async_with_retries(
    connect: Callable[[], Awaitable[T]],
    what: str,
    retries: int = DEFAULT_RETRIES,
    retry_on: tuple[type[BaseException], ...] = (OSError, asyncio.TimeoutError),
    give_up_on: tuple[type[BaseException], ...] = (),
) -> T:
    """Async twin of :func:`with_retries`."""
    delay = 0.1
    for attempt in range(retries + 1):
        try:
            return await connect()
        except give_up_on:
            raise
        except retry_on as exc:
            if attempt == retries:
                raise ConnectError(
                    f"could not connect to {what} after {retries + 1} attempts: {exc}"
                ) from exc
            await asyncio.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def open_socket(
    host: str, port: int, timeout: float, *, tls: bool = False, server_hostname: str | None = None
) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls:
        ctx = ssl.create_default_context()
        sock = ctx.wrap_socket(sock, server_hostname=server_hostname or host)
    sock.settimeout(timeout)
    return sock


def recv_into(sock: socket.socket, view: memoryview) -> int:
    try:
        n = sock.recv_into(view)
    except TimeoutError as exc:
        raise RequestTimeout("no reply within the timeout") from exc
    except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError) as exc:
        raise ConnectionLost(f"connection lost: {exc}") from exc
    except (OSError, ssl.SSLError) as exc:
        raise TransportError(f"socket error: {exc}") from exc
    if n == 0:
        raise ConnectionLost("server closed the connection")
    return n


def send_all(sock: socket.socket, *parts: bytes | bytearray | memoryview) -> None:
    """Write ``parts`` in one system call where possible (never header and body as two packets)."""
    try:
        if isinstance(sock, ssl.SSLSocket) or len(parts) == 1:
            sock.sendall(parts[0] if len(parts) == 1 else b"".join(parts))
            return
        total = sum(len(p) for p in parts)
        sent = sock.sendmsg(parts)
        if sent < total:
            rest = b"".join(parts)[sent:]
            sock.sendall(rest)
    except TimeoutError as exc:
        raise RequestTimeout("send timed out") from exc
    except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError) as exc:
        raise ConnectionLost(f"connection lost: {exc}") from exc
    except OSError as exc:
        raise TransportError(f"socket error: {exc}") from exc
