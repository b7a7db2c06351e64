"""One exception-translation table per library the pumps use (socket/ssl, websockets, httpx, aioquic).

Each table is a tuple of ``(exception types, target)`` rows, most specific first, in the spirit of httpx's
``map_httpcore_exceptions``: :func:`translate` returns the first matching row's pi0remote error (``target``
is an error class, or a function of the exception returning one). While connecting
(``connecting=True``) every transport-level failure becomes :class:`ConnectError`, the one failure the
session retries. Pumps call it in their ``except Exception`` branch only, so the happy path costs nothing.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import ssl
from collections.abc import Callable
from typing import Any

from ..errors import (
    AuthenticationError,
    ConnectError,
    ConnectionLost,
    InvalidURL,
    MessageTooLarge,
    Pi0RemoteError,
    ProtocolError,
    RequestTimeout,
    TransportError,
    TransportMismatch,
)

Target = type[Pi0RemoteError] | Callable[[BaseException, str], Pi0RemoteError]
Table = tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], Target], ...]

_LABELS: dict[type[Pi0RemoteError], str] = {
    RequestTimeout: "no reply within the timeout",
    ConnectionLost: "connection lost",
    ConnectError: "could not connect",
    TransportError: "transport error",
}
_CONNECT_TARGETS = (TransportError, ConnectionLost, RequestTimeout)


def translate(table: Table, exc: BaseException, url: str, *, connecting: bool = False) -> Pi0RemoteError:
    """The pi0remote error for a library exception ``exc`` raised while talking to ``url``."""
    error = exc if isinstance(exc, Pi0RemoteError) else _lookup(table, exc, url)
    if connecting and type(error) in _CONNECT_TARGETS:
        wrapped = ConnectError(f"could not connect ({url}): {error}")
        wrapped.__cause__ = exc
        return wrapped
    return error


def _lookup(table: Table, exc: BaseException, url: str) -> Pi0RemoteError:
    text = str(exc) or type(exc).__name__
    for types, target in table:
        if isinstance(exc, types):
            if isinstance(target, type):
                label = _LABELS.get(target)
                error = target(f"{label} ({url}): {text}" if label else f"{url}: {text}")
            else:
                error = target(exc, url)
            error.__cause__ = exc
            return error
    error = TransportError(f"{type(exc).__name__} ({url}): {text}")
    error.__cause__ = exc
    return error


SOCKET: Table = (
    (ssl.SSLCertVerificationError, ConnectError),
    ((TimeoutError, socket.timeout, asyncio.TimeoutError), RequestTimeout),
    ((ConnectionRefusedError, socket.gaierror), ConnectError),
    ((ConnectionResetError, BrokenPipeError, ConnectionAbortedError, EOFError), ConnectionLost),
    (asyncio.IncompleteReadError, ConnectionLost),
    ((ssl.SSLError, OSError), TransportError),
)
"""Blocking sockets and asyncio streams."""


def _ws_closed(exc: Any, url: str) -> Pi0RemoteError:
    for frame in (exc.rcvd, exc.sent):
        if frame is not None and frame.code == 1009:
            return MessageTooLarge(f"WebSocket message over the size limit ({url}): {frame.reason}")
    rcvd = exc.rcvd
    if rcvd is not None:
        return ConnectionLost(f"server closed the WebSocket ({url}, code {rcvd.code}: {rcvd.reason})")
    return ConnectionLost(f"WebSocket closed ({url}): {exc}")


def ws_status_error(status: int, url: str) -> Pi0RemoteError:
    """A refused WebSocket upgrade: 401/403 wrong token, 404 wrong path (final), 5xx worth another attempt."""
    if status in (401, 403):
        return AuthenticationError(f"server refused the WebSocket upgrade ({url}): missing or wrong token")
    if status == 404:
        return TransportMismatch(
            f"no WebSocket endpoint at {url} (HTTP 404); a pi0remote server's is {swap_scheme(url, 'ws')}"
        )
    if 400 <= status < 500:
        return ProtocolError(f"WebSocket upgrade refused ({url}): HTTP {status}")
    return ConnectError(f"WebSocket upgrade refused ({url}): HTTP {status}")


def _ws_not_http(exc: BaseException, url: str) -> Pi0RemoteError:
    return TransportMismatch(
        f"{url}: the server did not answer the WebSocket upgrade in HTTP ({exc}); "
        f"if this is a pi0remote TCP port, connect to {swap_scheme(url, 'tcp')}"
    )


@functools.cache
def websockets_table() -> Table:
    from websockets import exceptions as wse

    return (
        (wse.PayloadTooBig, MessageTooLarge),
        (wse.ConnectionClosed, _ws_closed),
        (wse.InvalidStatus, lambda exc, url: ws_status_error(exc.response.status_code, url)),
        (wse.InvalidMessage, _ws_not_http),
        (wse.InvalidHandshake, ConnectError),
        (wse.ProtocolError, ProtocolError),
        (wse.InvalidURI, InvalidURL),
        *SOCKET,
    )


def _httpx_protocol(exc: BaseException, url: str) -> Pi0RemoteError:
    text = str(exc)
    if "content-length" in text.lower():
        return ProtocolError(f"malformed Content-Length from {url}: {text}")
    if "status line" in text.lower() or "illegal" in text.lower():
        return TransportMismatch(f"{url}: the reply is not HTTP ({text}); {mismatch_hint(url)}")
    return ConnectionLost(f"connection lost ({url}): {text}")


@functools.cache
def httpx_table() -> Table:
    import httpx

    return (
        (httpx.ConnectTimeout, ConnectError),
        (httpx.ConnectError, ConnectError),
        (httpx.TimeoutException, RequestTimeout),
        ((httpx.WriteError, httpx.ReadError), ConnectionLost),
        (httpx.RemoteProtocolError, _httpx_protocol),
        (httpx.LocalProtocolError, ProtocolError),
        (httpx.UnsupportedProtocol, InvalidURL),
        (httpx.TransportError, TransportError),
        (httpx.InvalidURL, InvalidURL),
        *SOCKET,
    )


@functools.cache
def aioquic_table() -> Table:
    from aioquic.buffer import BufferReadError
    from aioquic.quic.connection import QuicConnectionError

    from ..quic_common import TlsVerificationError

    return (
        (TlsVerificationError, TlsVerificationError),
        (QuicConnectionError, ConnectionLost),
        (BufferReadError, ProtocolError),
        *SOCKET,
    )


def quic_termination(error_code: int, reason: str, *, connected: bool, url: str) -> Pi0RemoteError:
    """The error for aioquic's ``ConnectionTerminated`` event (a QUIC CONNECTION_CLOSE)."""
    from ..quic_common import TlsVerificationError

    reason = reason or f"error code 0x{error_code:x}"
    if connected:
        return ConnectionLost(f"QUIC connection to {url} closed: {reason}")
    if 0x100 <= error_code < 0x200:  # CRYPTO_ERROR: 0x100 + TLS alert
        return TlsVerificationError(
            f"TLS handshake with {url} failed: {reason}. For a self-signed server pass "
            "quic_fingerprint=<sha256 it prints / puts in its metadata>, quic_cafile=, or "
            "quic_insecure_skip_verify=True"
        )
    return ConnectError(f"QUIC handshake with {url} failed: {reason}")


# -- transport mismatches --------------------------------------------------------------------------
def swap_scheme(url: str, scheme: str) -> str:
    """``url`` with another scheme (and no path for tcp://): the URL the user likely meant."""
    rest = url.split("://", 1)[1] if "://" in url else url
    netloc, _, path = rest.partition("/")
    if scheme == "tcp":
        return f"tcp://{netloc}"
    if scheme == "ws":
        return f"ws://{netloc}/ws"
    return f"{scheme}://{netloc}"


def mismatch_hint(url: str) -> str:
    """For an HTTP-side pump that got a pi0remote frame: the server is a TCP listener."""
    return f"this looks like a pi0remote TCP port; connect to {swap_scheme(url, 'tcp')}"


__all__ = [
    "SOCKET",
    "aioquic_table",
    "httpx_table",
    "mismatch_hint",
    "quic_termination",
    "swap_scheme",
    "translate",
    "websockets_table",
    "ws_status_error",
]
