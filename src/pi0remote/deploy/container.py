"""One container's life: the server on its own event-loop thread, warm-up, one portal per raw transport, the
entry (portals, fingerprint, load) published into the endpoint store and its heartbeat, and the close that
unpublishes first (:func:`start_container`, :func:`start_from_config`, :class:`PolicyContainer`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any
from urllib.parse import urlsplit

from .. import __version__
from .asgi import PolicyAsgiApp
from .checkpoint import load_configured_policy
from .config import (
    DEFAULT_HEARTBEAT_S,
    LOAD_PUBLISH_MIN_S,
    PORTAL_TRANSPORTS,
    PRUNE_AFTER_S,
    TOKEN_ENV,
    DeployConfig,
)

logger = logging.getLogger("pi0remote.deploy")


# --------------------------------------------------------------------------------------------------------------
# the server on its own thread


class ServerThread:
    """A :class:`~pi0remote.server.PolicyServer` on a dedicated event-loop thread, started step by step."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="pi0remote-server", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Any, timeout: float | None = None) -> Any:
        """Run a coroutine on the server's loop from another thread and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> list[str]:
        return self.call(self.server.start(), 120)

    def warmup(self) -> None:
        self.call(self.server.warmup())

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            self.call(self.server.close(), 10)
        except Exception as exc:  # noqa: BLE001
            logger.warning("server close: %s", exc)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


# --------------------------------------------------------------------------------------------------------------
# publishing portals


def new_entry(
    container_id: str,
    portals: Mapping[str, str],
    *,
    quic_fingerprint: str | None,
    policy: str,
    region: Any,
    heartbeat_s: float,
    now: float | None = None,
    load: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    t = time.time() if now is None else now
    return {
        "container_id": container_id,
        "started_at": t,
        "heartbeat": t,
        "heartbeat_s": heartbeat_s,
        "portals": dict(portals),
        "quic_fingerprint": quic_fingerprint,
        "policy": policy,
        "region": region,
        "version": __version__,
        "load": dict(load) if load is not None else None,
    }


def container_load(core: Any) -> dict[str, Any]:
    """What a container publishes about its load: the server's counters, its batch capacity, readiness."""
    return {**core.load.snapshot(), "capacity": int(core.runner.max_batch), "ready": bool(core.ready)}


def prune_stale(
    store: MutableMapping[str, Any], *, older_than_s: float = PRUNE_AFTER_S, now: float | None = None
) -> list[str]:
    """Delete entries whose heartbeat stopped long ago (their containers died without unpublishing)."""
    t = time.time() if now is None else now
    dead = []
    for key, entry in list(store.items()):
        beat = entry.get("heartbeat") if isinstance(entry, Mapping) else None
        if not isinstance(beat, (int, float)) or t - beat > older_than_s:
            dead.append(key)
    for key in dead:
        with contextlib.suppress(KeyError):
            store.pop(key)
    return dead


class Heartbeat:
    """Rewrites the container's entry with a fresh ``heartbeat`` (and ``load``) every ``interval`` seconds.

    :meth:`poke` publishes sooner (a robot connected or left), at most every ``LOAD_PUBLISH_MIN_S``.
    """

    def __init__(
        self,
        store: MutableMapping[str, Any],
        key: str,
        entry: dict[str, Any],
        interval: float,
        load: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        self.store = store
        self.key = key
        self.entry = entry
        self.interval = interval
        self.load = load
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pi0remote-heartbeat", daemon=True)
        self.beats = 0

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def poke(self) -> None:
        self._wake.set()

    def beat(self) -> None:
        if self.load is not None:
            self.entry["load"] = dict(self.load())
        self.entry["heartbeat"] = time.time()
        self.store[self.key] = dict(self.entry)
        self.beats += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            if self._stop.is_set():
                return
            self._wake.clear()
            try:
                self.beat()
            except Exception as exc:  # noqa: BLE001 - a store hiccup must not take the server down
                logger.warning("heartbeat for %s failed: %s", self.key, exc)
            self._stop.wait(LOAD_PUBLISH_MIN_S)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(self.interval + 5)


def container_region(configured: Any, environ: Mapping[str, str] | None = None) -> Any:
    """Where this container runs: Modal's ``MODAL_REGION`` when set, else the configured region."""
    env = os.environ if environ is None else environ
    return env.get("MODAL_REGION") or configured


def container_id_from_env(environ: Mapping[str, str] | None = None) -> str:
    """Modal sets ``MODAL_TASK_ID`` in each container; elsewhere a random id."""
    env = os.environ if environ is None else environ
    return env.get("MODAL_TASK_ID") or f"local-{uuid.uuid4().hex[:12]}"


def _port_of(url: str) -> int:
    port = urlsplit(url).port
    if port is None:
        raise ValueError(f"no port in {url}")
    return port


def _tunnel_address(tunnel: Any) -> str:
    """``host:port`` of a forwarded port (``modal.forward(..., unencrypted=True)``'s ``tcp_socket``)."""
    sock = getattr(tunnel, "tcp_socket", tunnel)
    host, port = sock
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


class PolicyContainer:
    """What :func:`start_container` returns: the running server, its portals, its published entry."""

    def __init__(
        self,
        server_thread: ServerThread,
        *,
        store: MutableMapping[str, Any],
        container_id: str,
        urls: list[str],
        tunnels: contextlib.ExitStack,
    ) -> None:
        self.server_thread = server_thread
        self.server = server_thread.server
        self.core = self.server.core
        self.store = store
        self.container_id = container_id
        self.urls = urls
        self._tunnels = tunnels
        self.portals: dict[str, str] = {}
        self.entry: dict[str, Any] | None = None
        self.heartbeat: Heartbeat | None = None
        self.asgi_app = PolicyAsgiApp(
            self.core, loop=server_thread.loop, max_message_bytes=self.server.max_message_bytes
        )
        self._closed = False

    def load(self) -> dict[str, Any]:
        """This container's published load (see :func:`container_load`)."""
        return container_load(self.core)

    def publish(self, entry: dict[str, Any], heartbeat_s: float) -> None:
        self.entry = entry
        entry["load"] = self.load()
        self.store[self.container_id] = dict(entry)
        if heartbeat_s > 0:
            self.heartbeat = Heartbeat(self.store, self.container_id, entry, heartbeat_s, self.load).start()
            self.core.load.on_change.append(self.heartbeat.poke)

    def unpublish(self) -> None:
        if self.heartbeat is not None:
            with contextlib.suppress(ValueError):
                self.core.load.on_change.remove(self.heartbeat.poke)
            self.heartbeat.stop()
            self.heartbeat = None
        if self.entry is not None:
            try:
                self.store.pop(self.container_id, None)
            except Exception as exc:  # noqa: BLE001
                logger.warning("could not remove %s from the endpoint store: %s", self.container_id, exc)
            self.entry = None

    def close(self, drain_s: float = 0.0) -> None:
        """Unpublish first (clients stop picking this container), then close the portals and the server.

        ``drain_s``: wait up to that long, after unpublishing, for the connected robots to move to other
        containers (their clients watch the store) before the connections are closed.
        """
        if self._closed:
            return
        self._closed = True
        self.unpublish()
        deadline = time.monotonic() + drain_s
        while self.core.load.robots and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            self._tunnels.close()
        except Exception as exc:  # noqa: BLE001
            logger.warning("closing portals: %s", exc)
        self.server_thread.stop()

    def __enter__(self) -> PolicyContainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_container(
    policy: Any,
    *,
    store: MutableMapping[str, Any],
    forward: Callable[[int], Any],
    token: str | None,
    container_id: str | None = None,
    name: str = "pi0",
    host: str = "0.0.0.0",
    tcp_port: int = 8765,
    quic_port: int = 8766,
    portals: Iterable[str] = PORTAL_TRANSPORTS,
    heartbeat_s: float = DEFAULT_HEARTBEAT_S,
    region: Any = None,
    require_token: bool = True,
    server_options: Mapping[str, Any] | None = None,
) -> PolicyContainer:
    """Start the server, warm the policy up, forward each portal, publish the portals into ``store``.

    ``forward(port)`` returns a context manager whose value has ``tcp_socket == (public_host, public_port)``
    (``lambda port: modal.forward(port, unencrypted=True)`` on Modal). It stays open until
    :meth:`PolicyContainer.close`. ``store`` is any mutable mapping (a ``modal.Dict`` on Modal).
    Portals are public TCP ports: without a token this refuses to start unless ``require_token=False``.
    """
    from ..server import PolicyServer

    if require_token and not token:
        raise RuntimeError(
            f"refusing to serve public portals without a token: set {TOKEN_ENV} (on Modal, in the Secret "
            "the app attaches; see docs/modal.md)"
        )
    portals = _checked_portals(portals)
    container_id = container_id or container_id_from_env()
    server = PolicyServer(
        policy,
        name=name,
        host=host,
        http_port=None,
        tcp_port=tcp_port if "tcp" in portals else None,
        quic_port=quic_port if "quic+tcp" in portals else None,
        transports=list(portals),
        token=token,
        **dict(server_options or {}),
    )
    thread = ServerThread(server)
    tunnels = contextlib.ExitStack()
    try:
        urls = thread.start()
        logger.info("listening %s", " ".join(urls))
        thread.warmup()
        container = PolicyContainer(
            thread, store=store, container_id=container_id, urls=urls, tunnels=tunnels
        )
        for transport in portals:
            tunnel = tunnels.enter_context(forward(_port_of(server.url(transport))))
            container.portals[transport] = _tunnel_address(tunnel)
        _publish(container, name=name, region=region, heartbeat_s=heartbeat_s)
        return container
    except BaseException:
        tunnels.close()
        thread.stop()
        raise


def _checked_portals(portals: Iterable[str]) -> tuple[str, ...]:
    """The requested portals, known ones only; ``quic+tcp`` dropped (with a warning) where QUIC is missing."""
    portals = tuple(dict.fromkeys(portals))
    unknown = set(portals) - set(PORTAL_TRANSPORTS)
    if unknown:
        raise ValueError(f"unknown portal transports {sorted(unknown)}; choose from {PORTAL_TRANSPORTS}")
    if "quic+tcp" in portals and not _quic_available():
        logger.warning(
            "QUIC is not available in this image (aioquic / pi0remote.server.quic); no quic+tcp portal"
        )
        portals = tuple(p for p in portals if p != "quic+tcp")
    return portals


def _publish(container: PolicyContainer, *, name: str, region: Any, heartbeat_s: float) -> None:
    """Tell the server its deployment facts, prune long-dead entries, publish this one with a heartbeat."""
    core, cid = container.core, container.container_id
    fingerprint = core.metadata().get("quic_fingerprint") if "quic+tcp" in container.portals else None
    core.set_extra_metadata(
        deployment={"container_id": cid, "portals": dict(container.portals), "region": region}
    )
    with contextlib.suppress(Exception):
        prune_stale(container.store)
    entry = new_entry(
        cid,
        container.portals,
        quic_fingerprint=fingerprint,
        policy=name,
        region=region,
        heartbeat_s=heartbeat_s,
    )
    container.publish(entry, heartbeat_s)
    logger.info("published %s: %s", cid, container.portals)


def start_from_config(
    config: DeployConfig,
    *,
    store: MutableMapping[str, Any],
    forward: Callable[[int], Any],
    token: str | None,
    host: str = "0.0.0.0",
    container_id: str | None = None,
    fetch: Callable[[], Any] | None = None,
) -> PolicyContainer:
    """What a container runs at start: build the configured policy, then :func:`start_container`."""
    policy = load_configured_policy(config, fetch)
    return start_container(
        policy,
        store=store,
        forward=forward,
        token=token,
        container_id=container_id,
        name=config.policy,
        host=host,
        tcp_port=config.tcp_port,
        quic_port=config.quic_port,
        portals=config.portals,
        heartbeat_s=config.heartbeat_s,
        region=container_region(config.region),
        server_options={"max_batch": config.max_batch},
    )


def _quic_available() -> bool:
    import importlib.util

    try:
        return (
            importlib.util.find_spec("aioquic") is not None
            and importlib.util.find_spec("pi0remote.server.quic") is not None
        )
    except (ImportError, ValueError):
        return False
