"""``modal://APP/TRANSPORT``: find a pi0remote deployment on Modal, choose a container, keep the robot served.

==============================  ==========================================================================
``modal://APP/tcp``             a live, ready container's raw TCP portal, ``tcp://host:port``
``modal://APP/quic+tcp``        its QUIC-over-TCP portal, ``quic+tcp://host:port`` plus ``quic_fingerprint``
``modal://APP/ws``              the web endpoint's WebSocket, ``wss://…modal.run/ws``
``modal://APP/http``            the web endpoint, ``https://…modal.run``
==============================  ==========================================================================

Portals come from the ``modal.Dict`` named ``APP-endpoints`` where each container publishes its entry and load
(``pi0remote.deploy``) with a heartbeat. An entry is *live* while its heartbeat is younger than ``max_age``
seconds (default 60; ``?max_age=S`` or ``PI0REMOTE_PORTAL_MAX_AGE_S``). Among live, ready entries the power of
two choices on robots per capacity picks one (:func:`choose_entry`); ``?pin=ID`` takes that container only.
For the portals, ``connect()`` returns a :class:`FailoverClient` (``aconnect()``: :class:`AsyncFailoverClient`):
the ordinary client of the chosen container, re-resolved when that container goes away
(``?failover_s=``, default 10; ``0``: a plain client) and moved to even the fleet out (:func:`rebalance_target`,
``?rebalance=0`` to stay); its watcher reads the Dict every ``?watch_s=`` (default 1). The web URL comes from
the deployed class's ASGI method through the Modal SDK (Modal routes those requests itself).

Other options: ``?environment=NAME`` (Modal environment). The token defaults to ``$PI0REMOTE_TOKEN``. Tests
pass ``modal_store=`` (any mapping) instead of the Modal Dict.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import threading
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..errors import ConnectError, ConnectionLost, ProtocolError, RequestTimeout

PORTAL_TRANSPORTS = ("tcp", "quic+tcp")
WEB_TRANSPORTS = ("http", "https", "ws", "wss")
DEFAULT_MAX_AGE_S = 60.0
DEFAULT_FAILOVER_S = 10.0
"""How long a call may spend finding another container after its own one went away (``?failover_s=``)."""
DEFAULT_WATCH_S = 1.0
"""How often a client reads its container's entry in the store (``?watch_s=``)."""
CLASS_NAME = "Pi0Server"
WEB_METHOD = "web"
TOKEN_ENV = "PI0REMOTE_TOKEN"

_DEPLOY_HINT = "deploy it with `modal deploy -m pi0remote.modal_app` (docs/modal.md)"


def parse_modal_url(url: str) -> tuple[str, str, dict[str, str]]:
    """``modal://APP/TRANSPORT?opts`` -> ``(app, transport, opts)``."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "modal":
        raise ValueError(f"not a modal:// URL: {url!r}")
    app = parts.netloc
    transport = parts.path.strip("/").lower()
    if not app or not transport or "/" in transport:
        raise ValueError(f"a Modal URL is modal://APP/TRANSPORT (tcp, quic+tcp, ws or http), got {url!r}")
    if transport not in PORTAL_TRANSPORTS + WEB_TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r} in {url!r}; choose tcp, quic+tcp, ws or http")
    opts = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    return app, transport, opts


def endpoints_store(app: str, environment: str | None = None) -> Any:
    """The ``modal.Dict`` where the deployment's containers publish their portals."""
    try:
        import modal
    except ImportError as exc:
        raise ConnectError("modal:// URLs need the Modal SDK: pip install 'pi0remote[modal]'") from exc
    return modal.Dict.from_name(f"{app}-endpoints", environment_name=environment)


def live_entries(
    store: Any, transport: str, *, max_age_s: float, now: float | None = None
) -> list[dict[str, Any]]:
    """Entries publishing ``transport`` whose heartbeat is fresh, newest container first."""
    t = time.time() if now is None else now
    found = []
    for _, entry in list(store.items()):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("portals"), Mapping):
            continue  # not an entry (or a malformed one): never chosen
        portal = entry["portals"].get(transport)
        beat = entry.get("heartbeat")
        if not isinstance(portal, str) or not portal or not _number(beat):
            continue
        if not t - beat <= max_age_s:
            continue
        found.append(dict(entry))
    found.sort(key=lambda e: (_number(e.get("started_at")), e["heartbeat"]), reverse=True)
    return found


def _number(value: Any) -> float:
    """``value`` as a finite float, else 0.0 (loads and timestamps come from a store anyone may write)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return 0.0
    return float(value)


def _load(entry: Mapping[str, Any]) -> Mapping[str, Any]:
    load = entry.get("load")
    return load if isinstance(load, Mapping) else {}


def _robots_capacity(entry: Mapping[str, Any]) -> tuple[float, float]:
    """Published robots (at least 0) and batch capacity (at least 1); garbage counts as no load."""
    load = _load(entry)
    return max(0.0, _number(load.get("robots"))), max(1.0, _number(load.get("capacity")))


def is_ready(entry: Mapping[str, Any]) -> bool:
    """False only when the container says so (warming up, or draining before it stops)."""
    return bool(_load(entry).get("ready", True))


def load_ratio(entry: Mapping[str, Any]) -> float:
    """Connected robots per unit of batch capacity (0 for a container that publishes no load)."""
    robots, capacity = _robots_capacity(entry)
    return robots / capacity


def choose_entry(entries: list[dict[str, Any]], rng: random.Random | None = None) -> dict[str, Any]:
    """Power of two choices: two containers at random, the one with fewer robots per capacity wins.

    Ties go to either at random, so clients that start together (and read the same loads) still spread.
    """
    if not entries:
        raise ValueError("no entries to choose from")
    if len(entries) == 1:
        return entries[0]
    a, b = (rng or random).sample(entries, 2)
    return b if load_ratio(b) < load_ratio(a) else a


def _read_store(
    app: str,
    store: Any,
    transport: str,
    max_age_s: float,
    *,
    pin: str | None = None,
    exclude: Collection[str] = (),
) -> list[dict[str, Any]]:
    """The candidates: live, ready entries (only ``pin`` when given), not ``exclude``d unless nothing else."""
    try:
        entries = live_entries(store, transport, max_age_s=max_age_s)
        total = len(entries) or sum(1 for _ in store.items())
    except Exception as exc:  # NotFoundError, AuthError, network: say what to check
        raise ConnectError(
            f"cannot read the endpoints of Modal app {app!r} ({type(exc).__name__}: {exc}); is Modal set up "
            f"(`modal token new`) and is the app deployed? {_DEPLOY_HINT}"
        ) from exc
    if pin is not None:
        entries = [e for e in entries if e.get("container_id") == pin]
        if not entries:
            raise ConnectError(
                f"container {pin!r} of Modal app {app!r} publishes no live {transport} portal (pin=)"
            )
        return entries
    ready = [e for e in entries if is_ready(e)]
    if not ready:
        what = (
            f"none of its {total} published container(s) is ready with a heartbeat younger than "
            f"{max_age_s:g} s"
            if total
            else "no container has published any"
        )
        raise ConnectError(
            f"no live {transport} portal for Modal app {app!r}: {what}. Is the app deployed and a container "
            f"running (min_containers=1 keeps one up)? {_DEPLOY_HINT}"
        )
    return [e for e in ready if e.get("container_id") not in exclude] or ready


def web_url(app: str, environment: str | None = None) -> str:
    """The HTTPS URL of the deployment's ASGI endpoint (``Pi0Server.web``), through the Modal SDK."""
    try:
        import modal
    except ImportError as exc:
        raise ConnectError("modal:// URLs need the Modal SDK: pip install 'pi0remote[modal]'") from exc
    errors = []
    try:
        cls = modal.Cls.from_name(app, CLASS_NAME, environment_name=environment)
        url = getattr(cls(), WEB_METHOD).get_web_url()
        if url:
            return str(url)
        errors.append(f"{CLASS_NAME}.{WEB_METHOD} has no web URL")
    except Exception as exc:  # noqa: BLE001
        errors.append(f"{type(exc).__name__}: {exc}")
    try:
        url = modal.Function.from_name(app, WEB_METHOD, environment_name=environment).get_web_url()
        if url:
            return str(url)
    except Exception as exc:  # noqa: BLE001
        errors.append(f"{type(exc).__name__}: {exc}")
    raise ConnectError(
        f"cannot find the web endpoint of Modal app {app!r} ({'; '.join(errors)}); is Modal set up "
        f"(`modal token new`) and is the app deployed? {_DEPLOY_HINT}"
    )


def _web_target(base: str, transport: str) -> str:
    base = base.rstrip("/")
    if transport in ("ws", "wss"):
        if base.startswith("https://"):
            return "wss://" + base[len("https://") :] + "/ws"
        if base.startswith("http://"):
            return "ws://" + base[len("http://") :] + "/ws"
        raise ConnectError(f"unexpected web URL {base!r}")
    return base


def _max_age(opts: Mapping[str, str]) -> float:
    return float(opts.get("max_age") or os.environ.get("PI0REMOTE_PORTAL_MAX_AGE_S") or DEFAULT_MAX_AGE_S)


def resolve_modal_entry(
    url: str,
    modal_store: Any = None,
    *,
    exclude: Collection[str] = (),
    rng: random.Random | None = None,
    pin: str | None = None,
) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
    """``modal://APP/TRANSPORT`` -> ``(url, extra connect() options, the chosen entry or None for web)``."""
    app, transport, opts = parse_modal_url(url)
    environment = opts.get("environment") or opts.get("env") or None
    extra: dict[str, Any] = {}
    token = os.environ.get(TOKEN_ENV)
    if token:
        extra["token"] = token
    if transport in WEB_TRANSPORTS:
        return _web_target(web_url(app, environment), transport), extra, None
    store = modal_store if modal_store is not None else endpoints_store(app, environment)
    candidates = _read_store(
        app, store, transport, _max_age(opts), pin=pin or opts.get("pin"), exclude=exclude
    )
    entry = choose_entry(candidates, rng)
    target = f"{transport}://{entry['portals'][transport]}"
    if transport == "quic+tcp":
        fingerprint = entry.get("quic_fingerprint")
        if not fingerprint:
            raise ConnectError(
                f"container {entry.get('container_id')} publishes no QUIC certificate fingerprint"
            )
        extra["quic_fingerprint"] = fingerprint
    return target, extra, entry


def resolve_modal_url(url: str, modal_store: Any = None) -> tuple[str, dict[str, Any]]:
    """``modal://APP/TRANSPORT`` -> ``(url, extra connect() options)``.

    ``modal_store``: a mapping standing in for the ``APP-endpoints`` Dict (tests, or a Dict handle the caller
    already holds). Raises :class:`~pi0remote.errors.ConnectError` when nothing live is published.
    """
    target, extra, _ = resolve_modal_entry(url, modal_store)
    return target, extra


# -- rebalancing and failover -----------------------------------------------------------------------


def rebalance_target(
    entries: list[dict[str, Any]], own_id: str, rng: random.Random | None = None
) -> str | None:
    """Where a robot on ``own_id`` should move to even the fleet out, or None to stay.

    Its container holds more than its fair share (robots per capacity across all ready containers) by at
    least one robot: each of its robots moves with probability excess / robots, so that in expectation just
    the excess leaves (robots deciding at once do not all stampede), to the least loaded container that has
    room below its fair share. A container added by the autoscaler fills up this way.
    """
    ready = [e for e in entries if is_ready(e)]
    own = next((e for e in ready if e.get("container_id") == own_id), None)
    if own is None or len(ready) < 2:
        return None
    total_robots = sum(_robots_capacity(e)[0] for e in ready)
    share = total_robots / sum(_robots_capacity(e)[1] for e in ready)
    robots, capacity = _robots_capacity(own)
    excess = robots - capacity * share
    if excess < 1.0 - 1e-9:
        return None
    room = [
        e
        for e in ready
        if e is not own and _robots_capacity(e)[0] + 1 <= _robots_capacity(e)[1] * share + 1e-9
    ]
    if not room or (rng or random).random() >= excess / robots:
        return None
    best = min(load_ratio(e) for e in room)
    return str((rng or random).choice([e for e in room if load_ratio(e) == best]).get("container_id"))


def _fresh(entry: Mapping[str, Any] | None, max_age_s: float, now: float) -> bool:
    """Whether a container's entry still says it serves: published, ready, heartbeat within its bound.

    The bound is three of the container's own heartbeat periods (at least 1 s, at most ``max_age_s``).
    """
    if not isinstance(entry, Mapping) or not is_ready(entry):
        return False
    beat = entry.get("heartbeat")
    if not isinstance(beat, (int, float)):
        return False
    period = entry.get("heartbeat_s")
    bound = max_age_s
    if isinstance(period, (int, float)) and period > 0:
        bound = min(max_age_s, max(1.0, 3.0 * float(period)))
    return now - beat <= bound


class _FailoverState:
    """What the sync and async failover clients share: the store, the exclusions, the watcher's check.

    A ``modal://`` client that moves to another container when its own one goes away.

    It holds one ordinary client (``tcp://…`` or ``quic+tcp://…``) to the container the resolver chose. A
    watcher thread reads that container's entry every ``watch_s``; once the entry is gone, not ready or its
    heartbeat stale, the next call first re-resolves (excluding that container) and reconnects. A call that
    fails because the connection dropped or the container vanished is retried on another container until
    ``failover_s`` after the failure; then it raises the typed error (``ConnectError``/``ConnectionLost``).
    Every call therefore returns a result or raises a typed error. Errors the server answered (bad input,
    the policy's own failure, authentication) are raised at once, never retried.
    """

    def __init__(
        self,
        url: str,
        *,
        modal_store: Any = None,
        failover_s: float = DEFAULT_FAILOVER_S,
        watch_s: float = DEFAULT_WATCH_S,
        rebalance: bool = True,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        app, transport, opts = parse_modal_url(url)
        self.url = url
        self.app = app
        self.transport_name = transport
        self.failover_s = failover_s
        self.watch_s = watch_s
        self.max_age_s = _max_age(opts)
        self._store = modal_store
        self._options = dict(options or {})
        self._options.setdefault("retries", 0)  # a dead container is replaced, not retried
        self.client: Any = None
        self.entry: dict[str, Any] | None = None
        self.failovers = 0
        self._excluded: dict[str, float] = {}
        self._moved: str | None = None
        self.rebalance = rebalance and opts.get("pin") is None
        self._move_to: str | None = None
        self._settle_until = 0.0
        self.moves = 0
        self.calls = 0

    # -- the store -------------------------------------------------------------------------------
    @property
    def store(self) -> Any:
        if self._store is None:
            opts = parse_modal_url(self.url)[2]
            self._store = endpoints_store(self.app, opts.get("environment") or opts.get("env") or None)
        return self._store

    @property
    def container_id(self) -> str | None:
        return None if self.entry is None else self.entry.get("container_id")

    def _exclusions(self) -> list[str]:
        now = time.monotonic()
        self._excluded = {k: t for k, t in self._excluded.items() if t > now}
        return list(self._excluded)

    def _exclude(self, container_id: str | None) -> None:
        if container_id:
            self._excluded[container_id] = time.monotonic() + self.max_age_s

    def _resolve(self, pin: str | None = None) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
        return resolve_modal_entry(self.url, self.store, exclude=self._exclusions(), pin=pin)

    def _options_for(self, extra: Mapping[str, Any]) -> dict[str, Any]:
        options = dict(self._options)
        for key, value in extra.items():
            if options.get(key) is None:
                options[key] = value
        return options

    def _adopt(self, client: Any, entry: dict[str, Any] | None) -> None:
        self.client, self.entry = client, entry
        self._moved = None
        self._settle_until = time.monotonic() + 3 * self.watch_s  # let the loads catch up before moving

    def _gave_up(self, cause: BaseException | None) -> ConnectError:
        return ConnectError(
            f"{self.url}: no container took over within failover_s={self.failover_s:g} s "
            f"({type(cause).__name__}: {cause})"
        )

    def _check(self) -> None:
        """One look at the store: is our container still there, and should we move to even the load?"""
        cid = self.container_id
        if cid is None or self._moved:
            return
        if not self.rebalance:
            if not _fresh(self.store.get(cid), self.max_age_s, time.time()):
                self._moved = f"container {cid} stopped publishing"
            return
        entries = live_entries(self.store, self.transport_name, max_age_s=self.max_age_s)
        own = next((e for e in entries if e.get("container_id") == cid), None)
        if not _fresh(own, self.max_age_s, time.time()):
            self._moved = f"container {cid} stopped publishing"
        elif self._move_to is None and time.monotonic() >= self._settle_until:
            self._move_to = rebalance_target(entries, cid)

    def _still_serving(self) -> bool:
        """Whether our container's entry is fresh (a timeout is then the container's answer)."""
        try:
            return _fresh(self.store.get(self.container_id), self.max_age_s, time.time())
        except Exception:  # noqa: BLE001
            return False

    @property
    def metadata(self) -> dict[str, Any]:
        if self.client is None:
            raise ProtocolError("not connected")
        return self.client.metadata

    @property
    def policy_metadata(self) -> Any:
        return self.client.policy_metadata

    @property
    def last_reply_bytes(self) -> int:
        return int(getattr(self.client, "last_reply_bytes", 0) or 0)

    @property
    def target(self) -> str | None:
        """The URL of the container this client currently talks to."""
        return None if self.client is None else self.client.url

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url} -> {self.target}>"


RETRYABLE = (ConnectError, ConnectionLost, RequestTimeout)


class FailoverClient(_FailoverState):
    """The sync ``modal://`` client (what ``connect()`` returns for the portals); see :class:`_FailoverState`."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def _connect_to(self, found: tuple[str, dict[str, Any], dict[str, Any] | None]) -> None:
        from . import connect

        target, extra, entry = found
        try:
            client = connect(target, **self._options_for(extra))
        except RETRYABLE:
            self._exclude(None if entry is None else entry.get("container_id"))
            raise
        self._drop()
        self._adopt(client, entry)

    def _move(self) -> None:
        """Rebalance: connect to the chosen container first, then let go of the current one."""
        target, self._move_to = self._move_to, None
        try:
            self._connect_to(self._resolve(pin=target))
            self.moves += 1
        except RETRYABLE:
            pass  # stay where we are

    def _reconnect(self, deadline: float, cause: BaseException | None, *, first: bool = False) -> None:
        """Resolve and connect until it works or ``deadline`` (monotonic) passes.

        ``first`` (the initial connect): an empty or unreadable store is an error at once; only a chosen
        container that refuses is retried (with another one).
        """
        self._drop()
        delay = 0.02
        while True:
            try:
                self._connect_to(self._resolve())
                return
            except RETRYABLE as exc:
                if first and not self._excluded:
                    raise
                cause = exc
            if time.monotonic() + delay > deadline:
                raise self._gave_up(cause) from cause
            self._stop.wait(delay)  # back off between store reads
            delay = min(0.5, delay * 2)

    def connect(self) -> FailoverClient:
        if self.client is None:
            self._reconnect(time.monotonic() + self.failover_s, None, first=True)
        if self._watcher is None and self.watch_s > 0:
            self._watcher = threading.Thread(target=self._watch, name="pi0remote-failover", daemon=True)
            self._watcher.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(self.watch_s):
            try:
                self._check()
            except Exception:  # noqa: BLE001 - the store is unreachable: keep the connection we have
                continue

    def _call(self, fn: Callable[[Any], Any]) -> Any:
        if self._moved or self.client is None:
            self._exclude(self.container_id if self._moved else None)
            self._reconnect(time.monotonic() + self.failover_s, None)
        elif self._move_to is not None:
            self._move()
        deadline = None
        while True:
            try:
                return fn(self.client)
            except (ConnectionLost, ConnectError) as exc:
                cause: BaseException = exc
            except RequestTimeout as exc:
                if self._still_serving():
                    raise  # the container is alive, just slow: its answer is a timeout
                cause = exc
            if deadline is not None and time.monotonic() > deadline:
                raise cause
            deadline = deadline or time.monotonic() + self.failover_s
            self._exclude(self.container_id)
            self.failovers += 1
            self._reconnect(deadline, cause)

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        reply = self._call(lambda c: c.infer(obs))
        self.calls += 1
        return reply

    def reset(self) -> None:
        self._call(lambda c: c.reset())

    def _drop(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001
                pass

    def close(self) -> None:
        self._stop.set()
        self._drop()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(self.watch_s + 1)

    def __enter__(self) -> FailoverClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncFailoverClient(_FailoverState):
    """The async twin (what ``aconnect()`` returns for the portals): the same rules; store reads run in a
    worker thread, the watcher is a task on the caller's loop."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._watcher: asyncio.Task | None = None

    async def _connect_to(self, found: tuple[str, dict[str, Any], dict[str, Any] | None]) -> None:
        from . import aconnect

        target, extra, entry = found
        try:
            client = await aconnect(target, **self._options_for(extra))
        except RETRYABLE:
            self._exclude(None if entry is None else entry.get("container_id"))
            raise
        await self._drop()
        self._adopt(client, entry)

    async def _reconnect(self, deadline: float, cause: BaseException | None, *, first: bool = False) -> None:
        await self._drop()
        delay = 0.02
        while True:
            try:
                await self._connect_to(await asyncio.to_thread(self._resolve))
                return
            except RETRYABLE as exc:
                if first and not self._excluded:
                    raise
                cause = exc
            if time.monotonic() + delay > deadline:
                raise self._gave_up(cause) from cause
            await asyncio.sleep(delay)  # back off between store reads
            delay = min(0.5, delay * 2)

    async def connect(self) -> AsyncFailoverClient:
        if self.client is None:
            await self._reconnect(time.monotonic() + self.failover_s, None, first=True)
        if self._watcher is None and self.watch_s > 0:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())
        return self

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.watch_s)
            try:
                await asyncio.to_thread(self._check)
            except Exception:  # noqa: BLE001 - the store is unreachable: keep the connection we have
                continue

    async def _call(self, fn: Callable[[Any], Any]) -> Any:
        if self._moved or self.client is None:
            self._exclude(self.container_id if self._moved else None)
            await self._reconnect(time.monotonic() + self.failover_s, None)
        elif self._move_to is not None:
            target, self._move_to = self._move_to, None
            with contextlib.suppress(*RETRYABLE):
                await self._connect_to(await asyncio.to_thread(self._resolve, target))
                self.moves += 1
        deadline = None
        while True:
            try:
                return await fn(self.client)
            except (ConnectionLost, ConnectError) as exc:
                cause: BaseException = exc
            except RequestTimeout as exc:
                if await asyncio.to_thread(self._still_serving):
                    raise
                cause = exc
            if deadline is not None and time.monotonic() > deadline:
                raise cause
            deadline = deadline or time.monotonic() + self.failover_s
            self._exclude(self.container_id)
            self.failovers += 1
            await self._reconnect(deadline, cause)

    async def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        reply = await self._call(lambda c: c.infer(obs))
        self.calls += 1
        return reply

    async def reset(self) -> None:
        await self._call(lambda c: c.reset())

    async def _drop(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watcher
            self._watcher = None
        await self._drop()

    async def __aenter__(self) -> AsyncFailoverClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _failover_options(url: str, modal_store: Any, options: dict[str, Any]) -> dict[str, Any] | None:
    """The failover client's settings for ``url``, or None where a plain client is returned."""
    _, transport, opts = parse_modal_url(url)
    failover_s = float(opts.get("failover_s", DEFAULT_FAILOVER_S))
    if transport not in PORTAL_TRANSPORTS or failover_s <= 0:
        return None
    return {
        "modal_store": modal_store,
        "failover_s": failover_s,
        "watch_s": float(opts.get("watch_s", DEFAULT_WATCH_S)),
        "rebalance": opts.get("rebalance", "1").lower() not in ("0", "false", "no", "off"),
        "options": options,
    }


def _plain(url: str, modal_store: Any, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    target, extra = resolve_modal_url(url, modal_store)
    for key, value in extra.items():
        if options.get(key) is None:
            options[key] = value
    return target, options


def connect_modal(url: str, *, modal_store: Any = None, **options: Any) -> Any:
    """What ``connect("modal://…")`` returns: a :class:`FailoverClient` for the portals, unless
    ``?failover_s=0``; an ordinary client for the web transports (Modal routes those itself)."""
    from . import connect

    settings = _failover_options(url, modal_store, options)
    if settings is not None:
        return FailoverClient(url, **settings).connect()
    target, options = _plain(url, modal_store, options)
    return connect(target, **options)


async def aconnect_modal(url: str, *, modal_store: Any = None, **options: Any) -> Any:
    """Async twin of :func:`connect_modal` (an :class:`AsyncFailoverClient` for the portals)."""
    from . import aconnect

    settings = _failover_options(url, modal_store, options)
    if settings is not None:
        return await AsyncFailoverClient(url, **settings).connect()
    target, options = _plain(url, modal_store, options)
    return await aconnect(target, **options)


__all__ = [
    "AsyncFailoverClient",
    "FailoverClient",
    "aconnect_modal",
    "choose_entry",
    "rebalance_target",
    "connect_modal",
    "endpoints_store",
    "is_ready",
    "live_entries",
    "load_ratio",
    "parse_modal_url",
    "resolve_modal_entry",
    "resolve_modal_url",
    "web_url",
]
