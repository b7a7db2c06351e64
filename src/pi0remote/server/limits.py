"""Server-side resource limits: what any client, authenticated or not, may cost the server.

:class:`Limits` holds every bound (docs/security.md lists them with their defaults and flags);
:class:`ConnectionGate` admits or refuses each new connection (total and per source address, kept below
the process's file-descriptor limit); :func:`resolve_token` reads the token from the command line, a
file or the ``PI0REMOTE_TOKEN`` environment variable; :func:`quiet_accept_errors` turns asyncio's
``accept()`` resource errors into one log line per interval instead of a traceback per attempt.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ..options import TOKEN_ENV  # re-exported: the one definition is in pi0remote.options

log = logging.getLogger("pi0remote.server")
FD_RESERVE = 128
"""File descriptors kept free for the listeners, logs, the policy and the process itself."""


@dataclass
class Limits:
    """Every per-client bound of the server (``0`` or ``None`` switches a bound off where noted)."""

    max_connections: int = 1024
    """Open client connections, all transports together (also capped below ``RLIMIT_NOFILE``)."""
    max_connections_per_ip: int = 256
    """Open client connections from one source address."""
    preauth_bytes: int = 65536
    """Bytes a connection may send before it has authenticated (a HELLO, an HTTP head)."""
    handshake_timeout: float = 10.0
    """Seconds a connection has to authenticate (stream transports) or to finish a request head (HTTP)."""
    max_outbound_bytes: int = 16 * 1024 * 1024
    """Replies buffered for one client that does not read; beyond this the connection is dropped."""
    write_stall_timeout: float = 30.0
    """Seconds a client may leave its replies unread (reading paused) before it is dropped."""
    policy_timeout: float | None = 20.0
    """Server-side deadline per policy call (None or 0: none). A stuck call marks the server unhealthy."""
    max_jpeg_pixels: int = 4096 * 4096
    """Largest JPEG (width x height, read from its header) decoded when the input spec does not say."""
    quic_max_half_open: int = 256
    """QUIC connections whose handshake has not completed, at most."""
    quic_retry_threshold: int = 32
    """With this many half-open QUIC connections, new ones must first prove their address (Retry)."""

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> Limits:
        """Limits from a mapping of field names (unknown names are an error)."""
        known = {f.name for f in fields(cls)}
        options = dict(options or {})
        unknown = set(options) - known
        if unknown:
            raise ValueError(f"unknown limits {sorted(unknown)}; known: {sorted(known)}")
        return cls(**options)


_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--max-connections", "max_connections", int, "open connections, all transports (0: no bound)"),
    ("--max-connections-per-ip", "max_connections_per_ip", int, "open connections per source address"),
    ("--preauth-bytes", "preauth_bytes", int, "bytes a connection may send before authenticating"),
    ("--handshake-timeout", "handshake_timeout", float, "seconds to authenticate / finish an HTTP head"),
    ("--max-outbound-mb", "max_outbound_bytes", float, "unread reply MiB per client before it is dropped"),
    ("--write-stall-timeout", "write_stall_timeout", float, "seconds a client may leave replies unread"),
    ("--policy-timeout", "policy_timeout", float, "deadline per policy call in seconds (0: none)"),
    ("--max-jpeg-pixels", "max_jpeg_pixels", int, "largest JPEG (width x height) the spec leaves open"),
    ("--quic-max-half-open", "quic_max_half_open", int, "QUIC connections still in their handshake"),
    ("--quic-retry-threshold", "quic_retry_threshold", int, "half-open QUIC connections before Retry"),
]


def add_limit_arguments(group: Any) -> None:
    """The ``--max-connections`` ... ``--quic-retry-threshold`` flags, on an argparse group."""
    defaults = Limits()
    for flag, name, kind, text in _FLAGS:
        default = getattr(defaults, name)
        if name == "max_outbound_bytes":
            default = default / 2**20
        shown = (
            "" if default is None else f" (default {default:g})" if kind is float else f" (default {default})"
        )
        metavar = "S" if "timeout" in name else "MB" if kind is float and "bytes" in name else "N"
        group.add_argument(
            flag, dest=f"limit_{name}", type=kind, default=default, metavar=metavar, help=text + shown
        )


def limits_from_args(args: Any) -> Limits:
    """The :class:`Limits` of parsed :func:`add_limit_arguments` flags."""
    values = {name: getattr(args, f"limit_{name}") for _, name, _, _ in _FLAGS}
    values["max_outbound_bytes"] = int(values["max_outbound_bytes"] * 2**20)
    if not values["policy_timeout"]:
        values["policy_timeout"] = None
    return Limits(**values)


def fd_soft_limit() -> int | None:
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY else int(soft)


class ConnectionGate:
    """Counts open connections; refuses those over the total, per-address or file-descriptor bound."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        total = limits.max_connections or 1 << 30
        soft = fd_soft_limit()
        if soft is not None:
            total = min(total, max(16, soft - FD_RESERVE))
        self.max_total = total
        self.open = 0
        self.by_ip: dict[str, int] = {}
        self.refused = 0
        self._logged_at = -1e9

    def admit(self, addr: Any) -> str | None:
        """Count a new connection from ``addr``; returns None when admitted, else why it is refused."""
        ip = _ip_of(addr)
        per_ip = self.limits.max_connections_per_ip
        if self.open >= self.max_total:
            reason = f"server at its connection limit ({self.max_total})"
        elif per_ip and self.by_ip.get(ip, 0) >= per_ip:
            reason = f"too many connections from {ip} (limit {per_ip})"
        else:
            self.open += 1
            self.by_ip[ip] = self.by_ip.get(ip, 0) + 1
            return None
        self.refused += 1
        self._log_refusal(reason)
        return reason

    def release(self, addr: Any) -> None:
        ip = _ip_of(addr)
        self.open = max(0, self.open - 1)
        left = self.by_ip.get(ip, 0) - 1
        if left > 0:
            self.by_ip[ip] = left
        else:
            self.by_ip.pop(ip, None)

    def _log_refusal(self, reason: str) -> None:
        now = time.monotonic()
        if now - self._logged_at >= 10.0:
            self._logged_at = now
            log.warning("refusing connections: %s (%d refused so far)", reason, self.refused)


def _ip_of(addr: Any) -> str:
    if isinstance(addr, (tuple, list)) and addr:
        return str(addr[0])
    return str(addr)


def admit_transport(gate: ConnectionGate, transport: asyncio.BaseTransport) -> Any:
    """Admit a stream transport's peer; aborts the transport and returns None when refused."""
    addr = transport.get_extra_info("peername") or ("?", 0)
    if gate.admit(addr) is not None:
        transport.abort()
        return None
    return addr


class _AcceptErrorFilter:
    """A loop exception handler that reports ``accept()`` resource errors once per interval."""

    def __init__(self, previous: Any, interval: float) -> None:
        self.previous = previous
        self.interval = interval
        self.count = 0
        self.logged_at = -1e9

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if "out of system resource" in str(context.get("message", "")):
            self.count += 1
            now = time.monotonic()
            if now - self.logged_at >= self.interval:
                self.logged_at = now
                log.warning("accept() failed: %s (%d times so far)", context.get("exception"), self.count)
            return
        if self.previous is not None:
            self.previous(loop, context)
        else:
            loop.default_exception_handler(context)


def quiet_accept_errors(loop: asyncio.AbstractEventLoop, interval: float = 10.0) -> None:
    """Install the accept-error filter on ``loop`` (once)."""
    current = loop.get_exception_handler()
    if not isinstance(current, _AcceptErrorFilter):
        loop.set_exception_handler(_AcceptErrorFilter(current, interval))


def resolve_token(
    token: str | None = None, token_file: str | None = None, env: Mapping[str, str] | None = None
) -> str | None:
    """The server's token: ``token`` if given, else the first line of ``token_file``, else ``$PI0REMOTE_TOKEN``
    (:func:`pi0remote.options.read_token`, the one token reader clients and servers share)."""
    from ..options import read_token

    return read_token(token, token_file, env)


__all__ = [
    "ConnectionGate",
    "Limits",
    "TOKEN_ENV",
    "add_limit_arguments",
    "limits_from_args",
    "quiet_accept_errors",
    "resolve_token",
]
