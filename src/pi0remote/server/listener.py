"""How a listener plugs into a :class:`~pi0remote.server.PolicyServer`: one protocol for every transport.

Each listener module has ``async def start(core, options) -> Listener``: it opens its sockets on
``options.host`` / ``options.port``, hands what arrives to the shared :class:`~pi0remote.server.core.ServerCore`,
and returns an object with ``urls`` (what clients connect to) and ``close()`` (stop serving; may be a
coroutine). ``PolicyServer`` only calls the ``start`` functions named in :data:`LISTENERS`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Protocol

from .. import protocol

LISTENERS: dict[str, str] = {
    "http": "pi0remote.server.http:start",  # http:// and ws:// on one port
    "tcp": "pi0remote.server.tcp:start",
    "quic": "pi0remote.server.quic:start",  # quic:// and quic+tcp:// on one port number (extra ``quic``)
    "openpi": "pi0remote.server.openpi_ws:start",
}
"""Listener name -> ``module:function`` of its ``start(core, options)``, imported on first use."""


class Listener(Protocol):
    urls: list[str]

    def close(self) -> Any:
        """Stop accepting, close open connections; may return an awaitable."""
        ...


@dataclass
class ListenerOptions:
    """What every listener is started with (``PolicyServer``'s settings, with this listener's port)."""

    host: str = "127.0.0.1"
    port: int = 0
    transports: tuple[str, ...] = ("http", "ws", "tcp")
    max_message_bytes: int = protocol.DEFAULT_MAX_MESSAGE_BYTES
    idle_timeout: float | None = 300.0
    debug: bool = False
    cert: str | None = None
    key: str | None = None
    quic_options: dict[str, Any] = field(default_factory=dict)

    def listener_kwargs(self) -> dict[str, Any]:
        return {"max_message_bytes": self.max_message_bytes, "idle_timeout": self.idle_timeout}

    @property
    def url_host(self) -> str:
        """The host to put in URLs (a wildcard bind address becomes loopback)."""
        if self.host in ("0.0.0.0", ""):
            return "127.0.0.1"
        return f"[{self.host}]" if ":" in self.host else self.host


class StreamListener:
    """An ``asyncio`` server whose connections the core tracks (HTTP/WebSocket, TCP)."""

    def __init__(self, core: Any, server: asyncio.AbstractServer, urls: list[str]) -> None:
        self.core = core
        self.server = server
        self.urls = urls

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self.server.close()
        for transport in list(self.core.transports):
            transport.abort()
        self.core.transports.clear()
        try:
            await asyncio.wait_for(self.server.wait_closed(), 2.0)
        except (asyncio.TimeoutError, TimeoutError):
            pass


__all__ = ["LISTENERS", "Listener", "ListenerOptions", "StreamListener"]
