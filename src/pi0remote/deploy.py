"""Container start-up for a hosted deployment, runnable anywhere (no Modal needed).

``pi0remote.modal_app`` wires these pieces to Modal; everything here is plain Python, so tests run it on
loopback with a dict standing in for the endpoint store:

* :class:`DeployConfig`: every knob of a deployment, read from ``PI0REMOTE_*`` environment variables.
* :func:`start_container`: start one :class:`~pi0remote.server.PolicyServer` on its own event-loop thread,
  warm the policy up, open a public portal per raw transport through a ``forward(port)`` callable
  (``modal.forward(port, unencrypted=True)`` on Modal), publish the portals' ``host:port`` (and the QUIC
  certificate fingerprint) into a dict-like store under the container's id, and keep a heartbeat in that
  entry until :meth:`PolicyContainer.close` removes it.
* :class:`PolicyAsgiApp`: a plain ASGI callable serving ``POST /infer``, ``POST /reset``, ``GET /metadata``,
  ``GET /healthz`` and WebSocket ``/ws`` straight from that server's core (same auth, same bodies and
  errors as the built-in HTTP/WebSocket listener), for platforms that put their own HTTPS front door
  before an ASGI app.
* :func:`fetch_checkpoint` / :func:`cached_checkpoint`: the one-off checkpoint download into a cache
  directory (a Modal Volume), and its lookup at start-up, which never downloads.

Entry published per container (``store[container_id]``)::

    {"container_id": "ta-…", "started_at": 1.7e9, "heartbeat": 1.7e9, "heartbeat_s": 15.0,
     "portals": {"tcp": "r7.modal.host:41234", "quic+tcp": "r7.modal.host:40001"},
     "quic_fingerprint": "ab12…" | None, "policy": "pi0", "region": "us-east" | None, "version": "0.1.0",
     "load": {"robots": 3, "calls_per_s": 31.5, "mean_batch": 2.9, "queue_wait_p50_ms": 4.1,
              "capacity": 8, "ready": True}}

``load`` is rewritten with every heartbeat, and at once (at most every ``LOAD_PUBLISH_MIN_S``) when a robot
connects or leaves. Clients (``pi0remote.client.modal``) choose among live, ready entries by load.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from . import __version__, codec, protocol
from .errors import MessageTooLarge, to_wire

logger = logging.getLogger("pi0remote.deploy")

PORTAL_TRANSPORTS = ("tcp", "quic+tcp")
"""Raw transports a deployment can expose through TCP port forwarding (QUIC over UDP cannot be forwarded)."""

DEFAULT_HEARTBEAT_S = 5.0
DEFAULT_STALE_AFTER_S = 60.0
"""Clients ignore entries whose heartbeat is older than this (four missed heartbeats)."""
PRUNE_AFTER_S = 600.0
LOAD_PUBLISH_MIN_S = 0.02
"""A change of connected robots is published at once, but not more often than this."""
"""A starting container deletes entries this old: containers that died without unpublishing."""

OPENPI_DATA_HOME = "OPENPI_DATA_HOME"
TOKEN_ENV = "PI0REMOTE_TOKEN"


def _env_bool(value: str | None, default: bool) -> bool:
    if value is None or value.strip() == "":
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def _env_int(value: str | None, default: int | None) -> int | None:
    if value is None or value.strip() == "":
        return default
    if value.strip().lower() in ("none", "unset"):
        return None
    return int(value)


def _env_float(value: str | None, default: float) -> float:
    if value is None or value.strip() == "":
        return default
    return float(value)


def _env_list(value: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    if value is None:
        return default
    return tuple(v.strip() for v in value.split(",") if v.strip())


@dataclass
class DeployConfig:
    """One deployment's settings. :meth:`from_env` reads them from ``PI0REMOTE_*`` variables (names below)."""

    app_name: str = "pi0remote"  # PI0REMOTE_APP
    gpu: str | None = "H100"  # PI0REMOTE_GPU ("none" for a CPU-only deployment, e.g. the zeros policy)
    region: str | list[str] | None = None  # PI0REMOTE_REGION (comma list; unset: anywhere)
    routing_region: str | None = None  # PI0REMOTE_ROUTING_REGION: where Modal routes web-endpoint inputs
    secret_name: str = "pi0remote-token"  # PI0REMOTE_SECRET (a Modal Secret holding PI0REMOTE_TOKEN)
    volume_name: str = "pi0remote-cache"  # PI0REMOTE_VOLUME
    min_containers: int = 1  # PI0REMOTE_MIN_CONTAINERS
    max_containers: int | None = None  # PI0REMOTE_MAX_CONTAINERS
    robots_per_container: int = 8  # PI0REMOTE_ROBOTS_PER_CONTAINER: what the control loop plans for
    spare_containers: int = 1  # PI0REMOTE_SPARE_CONTAINERS: warm containers beyond the robots' need
    buffer_containers: int = 0  # PI0REMOTE_BUFFER_CONTAINERS: Modal's buffer (web-endpoint inputs)
    autoscale_s: int = 60  # PI0REMOTE_AUTOSCALE_S: period of the control loop (0: no control loop)
    scaledown_window: int = 300  # PI0REMOTE_SCALEDOWN_S
    max_inputs: int = 64  # PI0REMOTE_MAX_INPUTS: concurrent web requests / WebSockets per container
    memory_snapshot: bool = True  # PI0REMOTE_MEMORY_SNAPSHOT
    proxy_auth: bool = False  # PI0REMOTE_PROXY_AUTH: also require Modal-Key / Modal-Secret on web endpoints
    policy: str = "pi0"  # PI0REMOTE_POLICY
    config: str = "pi0_aloha_sim"  # PI0REMOTE_CONFIG
    checkpoint: str | None = None  # PI0REMOTE_CHECKPOINT (default gs://openpi-assets/checkpoints/<config>)
    random_weights: bool = False  # PI0REMOTE_RANDOM_WEIGHTS
    auto_fetch: bool = True  # PI0REMOTE_AUTO_FETCH: first start runs the setup function if the cache is empty
    num_steps: int | None = None  # PI0REMOTE_NUM_STEPS
    prompt: str | None = None  # PI0REMOTE_PROMPT
    max_batch: int = 1  # PI0REMOTE_MAX_BATCH
    portals: tuple[str, ...] = PORTAL_TRANSPORTS  # PI0REMOTE_PORTALS
    tcp_port: int = 8765  # PI0REMOTE_TCP_PORT (inside the container)
    quic_port: int = 8766  # PI0REMOTE_QUIC_PORT (inside the container)
    heartbeat_s: float = DEFAULT_HEARTBEAT_S  # PI0REMOTE_HEARTBEAT_S
    cache_dir: str = "/cache"  # where the Volume is mounted
    env_names: tuple[str, ...] = field(default=(), repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DeployConfig:
        env = os.environ if environ is None else environ
        d = cls()
        gpu = env.get("PI0REMOTE_GPU")
        if gpu is not None:
            gpu = gpu.strip() or None
            if gpu is not None and gpu.lower() in ("none", "cpu"):
                gpu = None
        else:
            gpu = d.gpu
        regions = _env_list(env.get("PI0REMOTE_REGION"), ())
        region: str | list[str] | None = None
        if len(regions) == 1:
            region = regions[0]
        elif regions:
            region = list(regions)
        portals = _env_list(env.get("PI0REMOTE_PORTALS"), d.portals)
        unknown = set(portals) - set(PORTAL_TRANSPORTS)
        if unknown:
            raise ValueError(f"PI0REMOTE_PORTALS: unknown {sorted(unknown)}; choose from {PORTAL_TRANSPORTS}")
        return cls(
            app_name=env.get("PI0REMOTE_APP") or d.app_name,
            gpu=gpu,
            region=region,
            routing_region=env.get("PI0REMOTE_ROUTING_REGION") or None,
            secret_name=env.get("PI0REMOTE_SECRET") or d.secret_name,
            volume_name=env.get("PI0REMOTE_VOLUME") or d.volume_name,
            min_containers=_env_int(env.get("PI0REMOTE_MIN_CONTAINERS"), d.min_containers) or 0,
            max_containers=_env_int(env.get("PI0REMOTE_MAX_CONTAINERS"), d.max_containers),
            robots_per_container=_env_int(env.get("PI0REMOTE_ROBOTS_PER_CONTAINER"), None)
            or d.robots_per_container,
            spare_containers=_env_int(env.get("PI0REMOTE_SPARE_CONTAINERS"), d.spare_containers) or 0,
            buffer_containers=_env_int(env.get("PI0REMOTE_BUFFER_CONTAINERS"), d.buffer_containers) or 0,
            autoscale_s=_env_int(env.get("PI0REMOTE_AUTOSCALE_S"), d.autoscale_s) or 0,
            scaledown_window=_env_int(env.get("PI0REMOTE_SCALEDOWN_S"), d.scaledown_window)
            or d.scaledown_window,
            max_inputs=_env_int(env.get("PI0REMOTE_MAX_INPUTS"), d.max_inputs) or d.max_inputs,
            memory_snapshot=_env_bool(env.get("PI0REMOTE_MEMORY_SNAPSHOT"), d.memory_snapshot),
            proxy_auth=_env_bool(env.get("PI0REMOTE_PROXY_AUTH"), d.proxy_auth),
            policy=env.get("PI0REMOTE_POLICY") or d.policy,
            config=env.get("PI0REMOTE_CONFIG") or d.config,
            checkpoint=env.get("PI0REMOTE_CHECKPOINT") or None,
            random_weights=_env_bool(env.get("PI0REMOTE_RANDOM_WEIGHTS"), d.random_weights),
            auto_fetch=_env_bool(env.get("PI0REMOTE_AUTO_FETCH"), d.auto_fetch),
            num_steps=_env_int(env.get("PI0REMOTE_NUM_STEPS"), None),
            prompt=env.get("PI0REMOTE_PROMPT") or None,
            max_batch=_env_int(env.get("PI0REMOTE_MAX_BATCH"), d.max_batch) or 1,
            portals=portals,
            tcp_port=_env_int(env.get("PI0REMOTE_TCP_PORT"), d.tcp_port) or 0,
            quic_port=_env_int(env.get("PI0REMOTE_QUIC_PORT"), d.quic_port) or 0,
            heartbeat_s=_env_float(env.get("PI0REMOTE_HEARTBEAT_S"), d.heartbeat_s),
            cache_dir=env.get("PI0REMOTE_CACHE_DIR") or d.cache_dir,
            env_names=tuple(sorted(k for k in env if k.startswith("PI0REMOTE_") and k != TOKEN_ENV)),
        )

    def container_env(self, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """The ``PI0REMOTE_*`` settings the deployer set (never the token), to hand to the containers.

        The app module is imported again inside each container, where the deployer's environment is absent;
        forwarding these makes the container see the same app name, store name and policy options.
        """
        env = os.environ if environ is None else environ
        out = {k: env[k] for k in self.env_names if k in env}
        out[OPENPI_DATA_HOME] = self.openpi_data_home
        return out

    def scaling_policy(self) -> Any:
        """The control loop's rule for this deployment (:class:`pi0remote.scaling.ScalingPolicy`)."""
        from .scaling import ScalingPolicy

        return ScalingPolicy(
            robots_per_container=self.robots_per_container,
            floor=self.min_containers,
            max_containers=self.max_containers,
            spare=self.spare_containers,
            buffer_containers=self.buffer_containers,
        )

    @property
    def scaling_state_name(self) -> str:
        """Name of the ``modal.Dict`` where the control loop keeps its last decision."""
        return f"{self.app_name}-scaling"

    @property
    def endpoints_name(self) -> str:
        """Name of the store (a ``modal.Dict``) where containers publish their portals."""
        return endpoints_store_name(self.app_name)

    @property
    def openpi_data_home(self) -> str:
        return f"{self.cache_dir.rstrip('/')}/openpi"

    @property
    def checkpoint_url(self) -> str:
        if self.checkpoint:
            return self.checkpoint
        from .policies.pi0 import DEFAULT_CHECKPOINT_BASE

        return DEFAULT_CHECKPOINT_BASE + self.config

    def policy_options(self) -> dict[str, Any]:
        """Options for :func:`pi0remote.policies.load_policy` (the pi0 ones only for the pi0 policy)."""
        if self.policy != "pi0":
            return {}
        opts: dict[str, Any] = {"config": self.config}
        if self.random_weights:
            opts["random_weights"] = True
        if self.num_steps is not None:
            opts["num_steps"] = self.num_steps
        if self.prompt is not None:
            opts["prompt"] = self.prompt
        return opts


def endpoints_store_name(app_name: str) -> str:
    return f"{app_name}-endpoints"


# --------------------------------------------------------------------------------------------------------------
# checkpoint cache


def cached_checkpoint(url: str, data_home: str) -> str:
    """Where openpi's downloader keeps ``url`` under ``data_home`` (``$OPENPI_DATA_HOME/<bucket>/<path>``)."""
    parts = urlsplit(url)
    if parts.scheme in ("", "file"):
        return parts.path if parts.scheme else url
    return os.path.join(data_home, parts.netloc, parts.path.strip("/"))


def fetch_checkpoint(url: str, data_home: str, *, tokenizer: bool = True) -> list[str]:
    """Download ``url`` (and PaliGemma's tokenizer) into ``data_home`` once, with openpi's own downloader.

    Runs in the deployment's setup function; the serving containers only read the cache.
    """
    os.environ[OPENPI_DATA_HOME] = data_home
    from openpi.shared import download  # type: ignore[import-not-found]

    paths = [str(download.maybe_download(url))]
    if tokenizer:
        paths.append(str(download.maybe_download(PALIGEMMA_TOKENIZER, gs={"token": "anon"})))
    return paths


PALIGEMMA_TOKENIZER = "gs://big_vision/paligemma_tokenizer.model"


def ensure_checkpoint(config: DeployConfig, fetch: Callable[[], Any] | None = None) -> str:
    """The local path of the configured checkpoint in the cache; never downloads it itself.

    When it is missing and ``fetch`` is given (on Modal: run the setup function, which downloads into the
    Volume and commits, then reload the Volume), ``fetch`` is called once and the cache checked again.
    """
    local = cached_checkpoint(config.checkpoint_url, config.openpi_data_home)
    if not os.path.isdir(local) and fetch is not None:
        logger.info(
            "checkpoint %s not cached at %s: running the setup function", config.checkpoint_url, local
        )
        fetch()
    if not os.path.isdir(local):
        raise FileNotFoundError(
            f"checkpoint {config.checkpoint_url} is not cached at {local}. Fetch it once into the "
            f"'{config.volume_name}' volume: modal run -m pi0remote.modal_app::fetch_checkpoint"
        )
    return local


def load_configured_policy(config: DeployConfig, fetch: Callable[[], Any] | None = None) -> Any:
    """Build the configured policy; a pi0 checkpoint is read from the cache (see :func:`ensure_checkpoint`)."""
    from .policies import load_policy

    options = config.policy_options()
    if config.policy == "pi0" and not config.random_weights:
        os.environ.setdefault(OPENPI_DATA_HOME, config.openpi_data_home)
        options["checkpoint"] = ensure_checkpoint(config, fetch)
    return load_policy(config.policy, **options)


def preload_modules(names: Iterable[str]) -> list[str]:
    """Import heavy modules ahead of time (before a memory snapshot); returns those that imported."""
    import importlib

    done = []
    for name in names:
        try:
            importlib.import_module(name)
            done.append(name)
        except Exception as exc:  # noqa: BLE001 - a missing optional module only costs start-up time later
            logger.info("preload: %s not imported (%s)", name, exc)
    return done


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
    from .server import PolicyServer

    if require_token and not token:
        raise RuntimeError(
            f"refusing to serve public portals without a token: set {TOKEN_ENV} (on Modal, in the Secret "
            "the app attaches; see docs/modal.md)"
        )
    portals = tuple(dict.fromkeys(portals))
    unknown = set(portals) - set(PORTAL_TRANSPORTS)
    if unknown:
        raise ValueError(f"unknown portal transports {sorted(unknown)}; choose from {PORTAL_TRANSPORTS}")
    if "quic+tcp" in portals and not _quic_available():
        logger.warning(
            "QUIC is not available in this image (aioquic / pi0remote.server.quic); no quic+tcp portal"
        )
        portals = tuple(p for p in portals if p != "quic+tcp")
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
            url = server.url(transport)
            tunnel = tunnels.enter_context(forward(_port_of(url)))
            container.portals[transport] = _tunnel_address(tunnel)
        fingerprint = (
            server.core.metadata().get("quic_fingerprint") if "quic+tcp" in container.portals else None
        )
        server.core.set_extra_metadata(
            deployment={"container_id": container_id, "portals": dict(container.portals), "region": region}
        )
        with contextlib.suppress(Exception):
            prune_stale(store)
        entry = new_entry(
            container_id,
            container.portals,
            quic_fingerprint=fingerprint,
            policy=name,
            region=region,
            heartbeat_s=heartbeat_s,
        )
        container.publish(entry, heartbeat_s)
        logger.info("published %s: %s", container_id, container.portals)
        return container
    except BaseException:
        tunnels.close()
        thread.stop()
        raise


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


# --------------------------------------------------------------------------------------------------------------
# the ASGI adapter


class PolicyAsgiApp:
    """A plain ASGI 3 app serving the HTTP and WebSocket endpoints from a server core running on ``loop``.

    Same contract as the built-in listener (``server/http.py``): msgpack bodies, ``Authorization: Bearer``
    on everything but ``/healthz``, typed errors (msgpack, or JSON when the client accepts only JSON).
    Requests are handed to the core's own event loop (one thread hop, no network hop); the ASGI server
    may run on any loop or thread.
    """

    def __init__(
        self,
        core: Any,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        max_message_bytes: int = protocol.DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.core = core
        self.loop = loop
        self.max_message_bytes = max_message_bytes

    async def _on_core_loop(self, make: Callable[[], Any]) -> Any:
        here = asyncio.get_running_loop()
        if self.loop is None or self.loop is here:
            return await make()
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(make(), self.loop))

    async def __call__(
        self, scope: dict[str, Any], receive: Callable[[], Any], send: Callable[[dict[str, Any]], Any]
    ) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    @staticmethod
    def _header(scope: dict[str, Any], name: bytes) -> str | None:
        for key, value in scope.get("headers") or ():
            if key.lower() == name:
                return value.decode("latin-1")
        return None

    # -- HTTP -------------------------------------------------------------------------------------------
    @staticmethod
    async def _respond(send: Callable[..., Any], status: int, content_type: str, body: bytes) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", content_type.encode()),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _error(
        self, send: Callable[..., Any], scope: dict[str, Any], status: int, exc: BaseException
    ) -> None:
        body = to_wire(exc)
        if "application/json" in (self._header(scope, b"accept") or ""):
            await self._respond(send, status, "application/json", json.dumps(body).encode())
        else:
            await self._respond(send, status, "application/msgpack", codec.packb(body))

    async def _read_body(self, receive: Callable[[], Any]) -> bytes | None:
        """The request body, or None when it exceeds the message size limit."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ConnectionError("client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_message_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _http(
        self, scope: dict[str, Any], receive: Callable[[], Any], send: Callable[..., Any]
    ) -> None:
        """Read the bounded body, then the core's own dispatch (:meth:`ServerCore.handle_http`) answers."""
        try:
            body = await self._read_body(receive)
        except ConnectionError:
            return
        if body is None:
            exc = MessageTooLarge(f"body exceeds the limit of {self.max_message_bytes} bytes")
            await self._error(send, scope, 413, exc)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or ()}
        method, path, core = scope.get("method", "GET"), scope.get("path", "/"), self.core
        reply = await self._on_core_loop(lambda: core.handle_http(method, path, headers, body))
        await self._respond(send, reply.status, reply.content_type, reply.body)

    # -- WebSocket --------------------------------------------------------------------------------------
    async def _websocket(
        self, scope: dict[str, Any], receive: Callable[[], Any], send: Callable[..., Any]
    ) -> None:
        from .server.core import Session

        first = await receive()
        if first["type"] != "websocket.connect":
            return
        if scope.get("path") != "/ws":
            await send({"type": "websocket.close", "code": 1008, "reason": "no WebSocket endpoint here"})
            return
        authorised = self.core.check_bearer(self._header(scope, b"authorization"))
        if not authorised and "websocket.http.response" in (scope.get("extensions") or {}):
            # Same answer as the built-in listener: refuse the upgrade with 401.
            body = b"missing or wrong token\n"
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": 401,
                    "headers": [
                        (b"content-type", b"text/plain"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "websocket.http.response.body", "body": body})
            return
        # Without that extension the upgrade is accepted and the HELLO must carry the token instead
        # (the core answers a typed authentication error and closes, as on the raw TCP transport).
        await send({"type": "websocket.accept"})
        session = Session(authenticated=authorised, transport="ws")
        try:
            await self._ws_loop(session, receive, send)
        finally:
            self.core.load.session_closed(session)

    async def _ws_loop(self, session: Any, receive: Callable[[], Any], send: Callable[..., Any]) -> None:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is None:
                text = message.get("text")
                data = text.encode() if text is not None else b""
            if len(data) > self.max_message_bytes:
                err = MessageTooLarge(
                    f"message of {len(data)} bytes exceeds the limit of {self.max_message_bytes}"
                )
                await send({"type": "websocket.send", "bytes": protocol.encode_error(err)})
                await send({"type": "websocket.close", "code": 1009, "reason": "message too big"})
                return
            reply, keep_open = await self._on_core_loop(lambda data=data: self.core.handle(data, session))
            await send({"type": "websocket.send", "bytes": bytes(reply)})
            if not keep_open:
                await send({"type": "websocket.close", "code": 1008, "reason": "authentication failed"})
                return


__all__ = [
    "DEFAULT_HEARTBEAT_S",
    "DEFAULT_STALE_AFTER_S",
    "PORTAL_TRANSPORTS",
    "DeployConfig",
    "Heartbeat",
    "PolicyAsgiApp",
    "PolicyContainer",
    "ServerThread",
    "cached_checkpoint",
    "container_id_from_env",
    "container_region",
    "endpoints_store_name",
    "ensure_checkpoint",
    "fetch_checkpoint",
    "load_configured_policy",
    "new_entry",
    "preload_modules",
    "prune_stale",
    "start_container",
    "start_from_config",
]
