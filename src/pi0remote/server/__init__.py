"""``PolicyServer``: one policy core fanned into by one listener per transport.

Listeners register through one protocol (:mod:`pi0remote.server.listener`): ``start(core, options)``
returns an object with ``urls`` and ``close()``; the server keeps them in :attr:`PolicyServer.listeners`.

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
from .listener import LISTENERS, Listener, ListenerOptions

ALL_TRANSPORTS = ("http", "ws", "tcp", "quic", "quic+tcp")


def _host_for_url(host: str) -> str:
    return ListenerOptions(host=host).url_host


def _start_function(name: str) -> Callable[..., Any]:
    module_name, _, attr = LISTENERS[name].partition(":")
    return getattr(importlib.import_module(module_name), attr)


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
        self.listeners: dict[str, Listener] = {}
        """Open listeners by name (``http``, ``tcp``, ``quic``, ``openpi``), in start order."""
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
        """Something else to shut down with the server."""
        self._closers.append(closer)

    def listener_kwargs(self) -> dict[str, Any]:
        return {"max_message_bytes": self.max_message_bytes, "idle_timeout": self.idle_timeout}

    def _wanted(self) -> list[tuple[str, int]]:
        """(listener name, port) for each listener the settings ask for."""
        want = set(self.transports)
        wanted = [
            ("http", self.http_port if want & {"http", "ws"} else None),
            ("tcp", self.tcp_port if "tcp" in want else None),
            ("quic", self.quic_port if want & {"quic", "quic+tcp"} else None),
            ("openpi", self.openpi_port),
        ]
        return [(name, port) for name, port in wanted if port is not None]

    def listener_options(self, port: int) -> ListenerOptions:
        return ListenerOptions(
            host=self.host,
            port=port,
            transports=self.transports,
            max_message_bytes=self.max_message_bytes,
            idle_timeout=self.idle_timeout,
            debug=self.debug,
            cert=self.cert,
            key=self.key,
            quic_options=self.quic_options,
        )

    async def start(self) -> list[str]:
        """Open every listener; returns their URLs (health reports not-ready until :meth:`warmup`)."""
        tune_malloc()
        quiet_accept_errors(asyncio.get_running_loop())
        for name, port in self._wanted():
            listener = await _start_function(name)(self.core, self.listener_options(port))
            self.listeners[name] = listener
            self.urls.extend(listener.urls)
        return list(self.urls)

    # what the QUIC listener opened (tests and the bench harness read these)
    @property
    def quic_listener(self) -> Any:
        return getattr(self.listeners.get("quic"), "quic_listener", None)

    @property
    def quic_tcp_connections(self) -> Any:
        return getattr(self.listeners.get("quic"), "quic_tcp_connections", set())

    @property
    def quic_udp_buffer(self) -> Any:
        return getattr(self.listeners.get("quic"), "quic_udp_buffer", None)

    async def warmup(self) -> None:
        """Run the policy's ``warmup()`` (JIT compile) off the loop, then report ready."""
        warm = getattr(self.core.policy, "warmup", None)
        if warm is not None:
            await asyncio.get_running_loop().run_in_executor(self.core.runner._executor, warm)
            self.core.refresh_metadata()  # warm-up may add figures (compile time) to metadata
        self.core.ready = True

    async def close(self) -> None:
        for closer in [*(listener.close for listener in self.listeners.values()), *self._closers]:
            result = closer()
            if asyncio.iscoroutine(result):
                await result
        self.listeners.clear()
        for transport in list(self.core.transports):
            transport.abort()
        self.core.transports.clear()
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
    "Listener",
    "ListenerOptions",
    "PolicyServer",
    "ServerCore",
    "Session",
    "resolve_token",
]
