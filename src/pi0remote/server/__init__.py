"""``PolicyServer``: one policy runner fanned into by one listener per transport.

>>> server = PolicyServer(ZerosPolicy(), host="127.0.0.1", http_port=0, tcp_port=0)   # doctest: +SKIP
>>> urls = await server.start()          # ['http://127.0.0.1:41234', 'ws://127.0.0.1:41234/ws', 'tcp://…']

:class:`BackgroundServer` runs one on its own event-loop thread (tests, benchmarks, the eval harness).
"""

from __future__ import annotations

import asyncio
import importlib
import threading
from collections.abc import Callable, Iterable
from typing import Any

from .. import protocol
from .._malloc import tune_malloc
from .core import ServerCore, Session
from .limits import Limits, quiet_accept_errors, resolve_token

ALL_TRANSPORTS = ("http", "ws", "tcp", "quic", "quic+tcp")

# Optional listeners live in their own modules: start(server) -> list of URLs.
_EXTRA_LISTENERS: dict[str, str] = {
    "quic": "pi0remote.server.quic:start_quic_listeners",
    "openpi": "pi0remote.server.openpi_ws:start_openpi_listener",
}


def _host_for_url(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


class PolicyServer:
    """Serves one policy over HTTP, WebSocket and TCP (and QUIC / openpi's protocol when asked)."""

    def __init__(
        self,
        policy: Any,
        *,
        name: str = "policy",
        # where to listen
        host: str = "127.0.0.1",
        http_port: int | None = 8000,
        tcp_port: int | None = 8765,
        quic_port: int | None = None,
        openpi_port: int | None = None,
        transports: Iterable[str] = ("http", "ws", "tcp"),
        # safety
        token: str | None = None,
        max_message_bytes: int = protocol.DEFAULT_MAX_MESSAGE_BYTES,
        idle_timeout: float | None = 300.0,
        limits: Limits | dict[str, Any] | None = None,
        # batching
        max_batch: int = 1,
        batch_window_ms: float = 2.0,
        # QUIC / TLS and debugging
        cert: str | None = None,
        key: str | None = None,
        quic_options: dict[str, Any] | None = None,
        debug: bool = False,
    ) -> None:
        self.limits = limits if isinstance(limits, Limits) else Limits.from_options(limits)
        self.core = ServerCore(
            policy,
            name=name,
            token=token,
            max_batch=max_batch,
            batch_window_ms=batch_window_ms,
            limits=self.limits,
            max_message_bytes=max_message_bytes,
        )
        self.host = host
        self.http_port = http_port
        self.tcp_port = tcp_port
        self.quic_port = quic_port
        self.openpi_port = openpi_port
        self.transports = tuple(t.strip() for t in transports if t.strip())
        unknown = set(self.transports) - set(ALL_TRANSPORTS)
        if unknown:
            raise ValueError(f"unknown transports {sorted(unknown)}; choose from {ALL_TRANSPORTS}")
        self.max_message_bytes = max_message_bytes
        self.idle_timeout = idle_timeout
        self.cert = cert
        self.key = key
        self.quic_options = dict(quic_options or {})
        self.debug = debug
        self.urls: list[str] = []
        self._servers: list[asyncio.AbstractServer] = []
        self._closers: list[Callable[[], Any]] = []

    @property
    def policy(self) -> Any:
        return self.core.policy

    def url(self, scheme: str) -> str:
        """The first listening URL of ``scheme`` (``tcp``, ``ws``, ``http``, ``quic``, ...)."""
        for url in self.urls:
            if url.split("://", 1)[0] == scheme:
                return url
        raise KeyError(f"not listening on {scheme}: {self.urls}")

    def add_closer(self, closer: Callable[[], Any]) -> None:
        """Called by optional listeners to be shut down with the server."""
        self._closers.append(closer)

    def listener_kwargs(self) -> dict[str, Any]:
        return {"max_message_bytes": self.max_message_bytes, "idle_timeout": self.idle_timeout}

    async def start(self) -> list[str]:
        """Open every listener; returns their URLs (health reports not-ready until :meth:`warmup`)."""
        tune_malloc()
        loop = asyncio.get_running_loop()
        quiet_accept_errors(loop)
        opts = self.listener_kwargs()
        host = _host_for_url(self.host)
        if ("http" in self.transports or "ws" in self.transports) and self.http_port is not None:
            from .http import HttpProtocol

            srv = await loop.create_server(
                lambda: HttpProtocol(self.core, debug=self.debug, **opts), self.host, self.http_port
            )
            self._servers.append(srv)
            port = srv.sockets[0].getsockname()[1]
            if "http" in self.transports:
                self.urls.append(f"http://{host}:{port}")
            if "ws" in self.transports:
                self.urls.append(f"ws://{host}:{port}/ws")
        if "tcp" in self.transports and self.tcp_port is not None:
            from .tcp import FramedStreamProtocol

            srv = await loop.create_server(
                lambda: FramedStreamProtocol(self.core, **opts), self.host, self.tcp_port
            )
            self._servers.append(srv)
            self.urls.append(f"tcp://{host}:{srv.sockets[0].getsockname()[1]}")
        if self.quic_port is not None and ({"quic", "quic+tcp"} & set(self.transports)):
            self.urls.extend(await self._start_extra("quic"))
        if self.openpi_port is not None:
            self.urls.extend(await self._start_extra("openpi"))
        return list(self.urls)

    async def _start_extra(self, which: str) -> list[str]:
        module_name, _, attr = _EXTRA_LISTENERS[which].partition(":")
        start = getattr(importlib.import_module(module_name), attr)
        return list(await start(self))

    async def warmup(self) -> None:
        """Run the policy's ``warmup()`` (JIT compile) off the loop, then report ready."""
        warm = getattr(self.core.policy, "warmup", None)
        if warm is not None:
            await asyncio.get_running_loop().run_in_executor(self.core.runner._executor, warm)
            self.core.refresh_metadata()  # warm-up may add figures (compile time) to metadata
        self.core.ready = True

    async def close(self) -> None:
        for srv in self._servers:
            srv.close()
        for transport in list(self.core.transports):
            transport.abort()
        self.core.transports.clear()
        for closer in self._closers:
            result = closer()
            if asyncio.iscoroutine(result):
                await result
        for srv in self._servers:
            try:
                await asyncio.wait_for(srv.wait_closed(), 2.0)
            except (asyncio.TimeoutError, TimeoutError):
                pass
        self._servers.clear()
        self.core.runner.close()


class BackgroundServer:
    """A :class:`PolicyServer` on its own event-loop thread; a context manager.

    >>> with BackgroundServer(ZerosPolicy(), http_port=0, tcp_port=0) as srv:   # doctest: +SKIP
    ...     client = connect(srv.url("tcp"))
    """

    def __init__(self, policy: Any, **server_kwargs: Any) -> None:
        server_kwargs.setdefault("http_port", 0)
        server_kwargs.setdefault("tcp_port", 0)
        self._policy = policy
        self._kwargs = server_kwargs
        self.server: PolicyServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def urls(self) -> list[str]:
        assert self.server is not None
        return self.server.urls

    def url(self, scheme: str) -> str:
        assert self.server is not None
        return self.server.url(scheme)

    def start(self) -> BackgroundServer:
        self._thread = threading.Thread(target=self._run, name="pi0remote-server", daemon=True)
        self._thread.start()
        self._started.wait(120)
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self.server = PolicyServer(self._policy, **self._kwargs)
            loop.run_until_complete(self.server.start())
            loop.run_until_complete(self.server.warmup())
        except BaseException as exc:
            self._error = exc
            self._started.set()
            loop.close()
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self.server.close())
            loop.close()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server's loop thread and return its result (coroutines are awaited)."""
        assert self._loop is not None

        async def run() -> Any:
            result = fn()
            return await result if asyncio.iscoroutine(result) else result

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(30)

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = [
    "ALL_TRANSPORTS",
    "BackgroundServer",
    "Limits",
    "PolicyServer",
    "ServerCore",
    "Session",
    "resolve_token",
]
