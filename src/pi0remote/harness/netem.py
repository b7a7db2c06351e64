"""WAN emulation inside the library: a loopback TCP + UDP proxy that delays, jitters, rate-limits and drops.

Put it between a client and a server to see what a cross-region link does to each transport::

    from pi0remote.harness.netem import NetemProxy

    with NetemProxy.for_url("tcp://127.0.0.1:8765", "delay=150ms,jitter=10ms,loss=0.1%,rate=50mbit") as proxy:
        client = pi0remote.connect(proxy.url_for("tcp://127.0.0.1:8765"))

The proxy listens on one port for both TCP and UDP (QUIC's UDP and QUIC-over-TCP share a port number),
and forwards to the same port number on the target. Its model, applied **independently in each
direction** (so ``delay=150ms`` adds 300 ms to a round trip, like ``tc netem`` on both ends of a link):

``delay``   one-way propagation delay added to every packet / segment.
``jitter``  a uniform random extra in ``[-jitter, +jitter]`` (clamped at zero delay), drawn once per
            burst of bytes read from a TCP socket, once per UDP datagram. TCP bytes are never reordered
            (a stream cannot be): a burst is held until the one before it was delivered. UDP datagrams
            may be reordered by jitter, as ``tc netem`` does.
``rate``    the link's bandwidth: a serializer that is busy ``bytes * 8 / rate`` seconds per segment
            (queueing behind earlier data, like a bottleneck link with a deep buffer). Units as in
            ``tc``: ``bit``, ``kbit``, ``mbit``, ``gbit`` (bits/s) and ``bps``, ``kbps``, ``mbps``
            (bytes/s).
``loss``    a probability per packet (``0.1%`` or ``0.001``). UDP datagrams are dropped. TCP cannot lose
            bytes of a stream, so a "lost" TCP segment (``mss`` bytes, 1448 by default) is delivered late
            by a retransmission timeout, ``rto`` (default ``max(200 ms, 2*delay + 4*jitter)``, Linux's
            minimum RTO and its ``srtt + 4 rttvar`` formula), and everything behind it waits too
            (head-of-line blocking). Real TCP often recovers faster (fast retransmit, ~1 RTT), so this
            is the pessimistic case.
``seed``    seed of the random generator (jitter and loss), for repeatable runs.

Not emulated: connection setup (the proxy accepts at once, so the TCP handshake costs no RTT), MTU,
congestion control, and loss of TCP's own handshake or acknowledgements.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import socket
import threading
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}

_TIME_UNITS = {"us": 1e-3, "µs": 1e-3, "ms": 1.0, "s": 1000.0, "": 1.0}
_RATE_UNITS = {
    "": 1.0,
    "bit": 1.0,
    "kbit": 1e3,
    "mbit": 1e6,
    "gbit": 1e9,
    "bps": 8.0,
    "kbps": 8e3,
    "mbps": 8e6,
    "gbps": 8e9,
}


def _split_unit(text: str, what: str) -> tuple[float, str]:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*([a-zµ%]*)\s*", text.lower())
    if not m:
        raise ValueError(f"netem {what}: cannot parse {text!r}")
    return float(m.group(1)), m.group(2)


def _parse_ms(text: str, what: str) -> float:
    value, unit = _split_unit(text, what)
    if unit not in _TIME_UNITS:
        raise ValueError(f"netem {what}: unknown time unit {unit!r} in {text!r} (use us, ms or s)")
    return value * _TIME_UNITS[unit]


def _parse_rate(text: str) -> float:
    value, unit = _split_unit(text, "rate")
    if unit not in _RATE_UNITS:
        raise ValueError(
            f"netem rate: unknown unit {unit!r} in {text!r} (use kbit, mbit, gbit or kbps, mbps)"
        )
    bps = value * _RATE_UNITS[unit]
    if bps <= 0:
        raise ValueError("netem rate must be positive")
    return bps


def _parse_loss(text: str) -> float:
    value, unit = _split_unit(text, "loss")
    if unit == "%":
        value /= 100.0
    elif unit:
        raise ValueError(f"netem loss: use a percentage (0.1%) or a fraction (0.001), got {text!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"netem loss must be within 0..100%, got {text!r}")
    return value


@dataclass(frozen=True)
class NetemSpec:
    """What the proxy does to each direction of traffic. Parse one with :meth:`parse`."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    rate_bps: float | None = None
    rto_ms: float | None = None
    mss: int = 1448
    seed: int | None = None

    @classmethod
    def parse(cls, text: str | NetemSpec | None) -> NetemSpec:
        """``"delay=150ms,jitter=10ms,loss=0.1%,rate=50mbit"`` (any subset; also ``rto=``, ``mss=``, ``seed=``)."""
        if isinstance(text, NetemSpec):
            return text
        spec = cls()
        if not text:
            return spec
        values: dict[str, Any] = {}
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            key, sep, value = part.partition("=")
            key = key.strip().lower()
            if not sep:
                raise ValueError(f"netem: expected key=value, got {part!r}")
            if key == "delay":
                values["delay_ms"] = _parse_ms(value, key)
            elif key == "jitter":
                values["jitter_ms"] = _parse_ms(value, key)
            elif key == "rto":
                values["rto_ms"] = _parse_ms(value, key)
            elif key == "loss":
                values["loss"] = _parse_loss(value)
            elif key in ("rate", "bandwidth"):
                values["rate_bps"] = _parse_rate(value)
            elif key == "mss":
                values["mss"] = int(value)
            elif key == "seed":
                values["seed"] = int(value)
            else:
                raise ValueError(f"netem: unknown key {key!r} (delay, jitter, loss, rate, rto, mss, seed)")
        spec = replace(spec, **values)
        if spec.delay_ms < 0 or spec.jitter_ms < 0 or spec.mss <= 0:
            raise ValueError(f"netem: negative delay/jitter or bad mss in {text!r}")
        return spec

    @property
    def effective_rto_ms(self) -> float:
        if self.rto_ms is not None:
            return self.rto_ms
        return max(200.0, 2.0 * self.delay_ms + 4.0 * self.jitter_ms)

    def __str__(self) -> str:
        parts = []
        if self.delay_ms:
            parts.append(f"delay={self.delay_ms:g}ms")
        if self.jitter_ms:
            parts.append(f"jitter={self.jitter_ms:g}ms")
        if self.loss:
            parts.append(f"loss={self.loss * 100:g}%")
        if self.rate_bps:
            r = self.rate_bps
            parts.append(
                f"rate={r / 1e9:g}gbit"
                if r >= 1e9
                else f"rate={r / 1e6:g}mbit"
                if r >= 1e6
                else f"rate={r / 1e3:g}kbit"
            )
        if self.rto_ms is not None:
            parts.append(f"rto={self.rto_ms:g}ms")
        return ",".join(parts) or "none"

    def describe(self) -> str:
        """One line for reports."""
        return f"{self} (each direction; round trip adds {2 * self.delay_ms:g} ms of delay)"


@dataclass
class LinkStats:
    """Counters of one direction of a proxy."""

    bytes: int = 0
    packets: int = 0
    lost: int = 0
    """UDP datagrams dropped, or TCP segments delivered late by an RTO."""


class _Link:
    """One direction of the emulated link: serializer (rate), propagation (delay, jitter), loss."""

    def __init__(self, spec: NetemSpec, rng: random.Random) -> None:
        self.spec = spec
        self.rng = rng
        self.free_at = 0.0  # when the serializer finishes the data already sent
        self.last_delivery = 0.0
        self.stats = LinkStats()

    def _propagation_s(self) -> float:
        d = self.spec.delay_ms
        if self.spec.jitter_ms:
            d = max(0.0, d + self.rng.uniform(-self.spec.jitter_ms, self.spec.jitter_ms))
        return d / 1000.0

    def _serialize(self, nbytes: int, now: float) -> float:
        start = max(now, self.free_at)
        if self.spec.rate_bps:
            start += nbytes * 8.0 / self.spec.rate_bps
        self.free_at = start
        return start

    def stream(self, data: bytes, now: float) -> list[tuple[float, bytes]]:
        """Delivery schedule of a burst of stream bytes: ``[(when, chunk)]``, non-decreasing in time."""
        spec = self.spec
        prop = self._propagation_s()
        rto = spec.effective_rto_ms / 1000.0
        out: list[tuple[float, bytes]] = []
        mss = spec.mss
        n = len(data)
        self.stats.bytes += n
        if not spec.rate_bps and not spec.loss:  # the whole burst moves as one
            self.stats.packets += max(1, math.ceil(n / mss))
            when = max(self._serialize(n, now) + prop, self.last_delivery)
            self.last_delivery = when
            return [(when, data)]
        view = memoryview(data)
        for off in range(0, n, mss):
            seg = view[off : off + mss]
            self.stats.packets += 1
            when = self._serialize(len(seg), now) + prop
            if spec.loss and self.rng.random() < spec.loss:
                self.stats.lost += 1
                when += rto
            when = max(when, self.last_delivery)
            self.last_delivery = when
            if out and out[-1][0] == when:
                out[-1] = (when, out[-1][1] + bytes(seg))
            else:
                out.append((when, bytes(seg)))
        return out

    def datagram(self, nbytes: int, now: float) -> float | None:
        """Delivery time of one datagram, or None when it is lost."""
        self.stats.bytes += nbytes
        self.stats.packets += 1
        if self.spec.loss and self.rng.random() < self.spec.loss:
            self.stats.lost += 1
            return None
        return self._serialize(nbytes, now) + self._propagation_s()


class _Pipe:
    """Writes scheduled stream chunks to a transport in order, at their delivery times."""

    def __init__(self, loop: asyncio.AbstractEventLoop, link: _Link) -> None:
        self.loop = loop
        self.link = link
        self.queue: deque[tuple[float, bytes]] = deque()
        self.out: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.eof = False
        self.closed = False

    def attach(self, transport: asyncio.Transport) -> None:
        self.out = transport
        self._arm()

    def push(self, data: bytes) -> None:
        self.queue.extend(self.link.stream(bytes(data), self.loop.time()))
        self._arm()

    def finish(self) -> None:
        """The source sent EOF (or went away): close the other side once everything queued is out."""
        self.eof = True
        self._arm()

    def _arm(self) -> None:
        if self.timer is not None or self.out is None or self.closed:
            return
        if self.queue:
            self.timer = self.loop.call_at(self.queue[0][0], self._fire)
        elif self.eof:
            self.closed = True
            try:
                if self.out.can_write_eof():
                    self.out.write_eof()
                else:
                    self.out.close()
            except (OSError, RuntimeError):
                self.out.close()

    def _fire(self) -> None:
        self.timer = None
        if self.out is None or self.out.is_closing():
            self.queue.clear()
            return
        now = self.loop.time()
        chunks = []
        while self.queue and self.queue[0][0] <= now:
            chunks.append(self.queue.popleft()[1])
        if chunks:
            self.out.write(b"".join(chunks) if len(chunks) > 1 else chunks[0])
        self._arm()

    def abort(self) -> None:
        self.closed = True
        self.queue.clear()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


class _Upstream(asyncio.Protocol):
    def __init__(self, conn: _Downstream) -> None:
        self.conn = conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _nodelay(transport)

    def data_received(self, data: bytes) -> None:
        self.conn.down.push(data)

    def eof_received(self) -> bool:
        self.conn.down.finish()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.down.finish()


class _Downstream(asyncio.Protocol):
    """One client connection to the proxy and its connection to the target."""

    def __init__(self, proxy: NetemProxy) -> None:
        self.proxy = proxy
        loop = proxy._loop
        assert loop is not None
        self.up = _Pipe(loop, _Link(proxy.spec, proxy._rng))  # client -> server
        self.down = _Pipe(loop, _Link(proxy.spec, proxy._rng))  # server -> client
        proxy._links.append((self.up.link, self.down.link))
        self.transport: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        _nodelay(transport)
        self.down.attach(transport)
        self.proxy._track(asyncio.ensure_future(self._connect()))

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            upstream, _ = await loop.create_connection(
                lambda: _Upstream(self), self.proxy.target_host, self.proxy.target_port
            )
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        self.upstream = upstream
        self.up.attach(upstream)

    def data_received(self, data: bytes) -> None:
        self.up.push(data)

    def eof_received(self) -> bool:
        self.up.finish()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.up.finish()


class _UdpFront(asyncio.DatagramProtocol):
    """The proxy's UDP port: one upstream socket per client address."""

    def __init__(self, proxy: NetemProxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.DatagramTransport | None = None
        self.peers: dict[Any, _UdpPeer] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        peer = self.peers.get(addr)
        if peer is None:
            peer = self.peers[addr] = _UdpPeer(self, addr)
        peer.send_up(data)


class _UdpPeer(asyncio.DatagramProtocol):
    def __init__(self, front: _UdpFront, addr: Any) -> None:
        self.front = front
        self.addr = addr
        proxy = front.proxy
        assert proxy._loop is not None
        self.loop = proxy._loop
        self.uplink = _Link(proxy.spec, proxy._rng)
        self.downlink = _Link(proxy.spec, proxy._rng)
        proxy._links.append((self.uplink, self.downlink))
        self.transport: asyncio.DatagramTransport | None = None
        self.backlog: list[bytes] = []
        proxy._peers.append(self)
        proxy._track(
            asyncio.ensure_future(
                self.loop.create_datagram_endpoint(
                    lambda: self, remote_addr=(proxy.target_host, proxy.target_port)
                )
            )
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        for data in self.backlog:
            transport.sendto(data)
        self.backlog.clear()

    def _up(self, data: bytes) -> None:
        if self.transport is None:
            self.backlog.append(data)
        elif not self.transport.is_closing():
            self.transport.sendto(data)

    def send_up(self, data: bytes) -> None:
        when = self.uplink.datagram(len(data), self.loop.time())
        if when is not None:
            self.loop.call_at(when, self._up, data)

    def _down(self, data: bytes) -> None:
        t = self.front.transport
        if t is not None and not t.is_closing():
            t.sendto(data, self.addr)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        when = self.downlink.datagram(len(data), self.loop.time())
        if when is not None:
            self.loop.call_at(when, self._down, data)

    def error_received(self, exc: Exception) -> None:  # ICMP port unreachable and friends
        pass


@dataclass
class NetemProxy:
    """A TCP + UDP proxy on ``listen_host`` (a free port by default) in front of ``target_host:target_port``.

    Runs its own event loop on a daemon thread; use it as a context manager (or :meth:`start` /
    :meth:`close`). ``url_for(url)`` rewrites a server URL to go through the proxy.
    """

    target_host: str
    target_port: int
    spec: NetemSpec | str | None = None
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    tcp: bool = True
    udp: bool = True
    port: int = field(default=0, init=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)
    _servers: list[Any] = field(default_factory=list, init=False, repr=False)
    _tasks: set[Any] = field(default_factory=set, init=False, repr=False)
    _links: list[tuple[_Link, _Link]] = field(default_factory=list, init=False, repr=False)
    _peers: list[Any] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self.spec = NetemSpec.parse(self.spec)
        self._rng = random.Random(self.spec.seed)

    def _track(self, task: asyncio.Future) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @classmethod
    def for_url(cls, url: str, spec: NetemSpec | str | None, **kwargs: Any) -> NetemProxy:
        """A proxy in front of the host and port of ``url`` (not started)."""
        parts = urlsplit(url)
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
        if parts.hostname is None or port is None:
            raise ValueError(f"netem: URL needs a host and a port: {url!r}")
        return cls(parts.hostname, port, spec, **kwargs)

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> NetemProxy:
        if self._thread is not None:
            return self
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="pi0remote-netem", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._open(), loop).result(10)
        except BaseException:
            self.close()
            raise
        return self

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        for attempt in range(20):
            servers: list[Any] = []
            try:
                port = self.listen_port
                if self.tcp:
                    srv = await loop.create_server(lambda: _Downstream(self), self.listen_host, port)
                    servers.append(srv)
                    port = srv.sockets[0].getsockname()[1]
                if self.udp:
                    transport, _ = await loop.create_datagram_endpoint(
                        lambda: _UdpFront(self), local_addr=(self.listen_host, port)
                    )
                    servers.append(transport)
                    port = transport.get_extra_info("sockname")[1]
            except OSError:
                for s in servers:
                    s.close()
                if self.listen_port or attempt == 19:
                    raise
                continue  # the UDP port of a fresh TCP port was taken: try another
            self._servers = servers
            self.port = port
            return

    def close(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            for s in self._servers:
                s.close()
            for t in list(self._tasks):
                t.cancel()
            for peer in self._peers:
                if peer.transport is not None:
                    peer.transport.close()
            await asyncio.sleep(0)

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(5)
        except Exception:
            pass
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        if not thread.is_alive():
            loop.close()
        self._thread = None
        self._loop = None

    def __enter__(self) -> NetemProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- use --------------------------------------------------------------------------------------
    @property
    def host(self) -> str:
        return self.listen_host

    def url_for(self, url: str) -> str:
        """``url`` with its host and port replaced by the proxy's (path and query kept)."""
        if not self.port:
            raise RuntimeError("start the proxy first")
        parts = urlsplit(url)
        netloc = f"{self.listen_host}:{self.port}"
        if parts.username:
            netloc = f"{parts.username}{':' + parts.password if parts.password else ''}@{netloc}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    def stats(self) -> dict[str, dict[str, int]]:
        """Bytes, packets and losses so far, summed over connections: ``{"up": {...}, "down": {...}}``."""
        out = {"up": LinkStats(), "down": LinkStats()}
        for up, down in list(self._links):
            for name, link in (("up", up), ("down", down)):
                s = out[name]
                s.bytes += link.stats.bytes
                s.packets += link.stats.packets
                s.lost += link.stats.lost
        return {k: {"bytes": v.bytes, "packets": v.packets, "lost": v.lost} for k, v in out.items()}


class NetemGroup:
    """One :class:`NetemProxy` per distinct ``host:port`` among several URLs; ``url_for`` maps each."""

    def __init__(self, urls: list[str], spec: NetemSpec | str | None) -> None:
        self.spec = NetemSpec.parse(spec)
        self.proxies: dict[tuple[str, int], NetemProxy] = {}
        for url in urls:
            if "://" not in url or url.split("://", 1)[0] in ("local", "modal"):
                continue
            p = NetemProxy.for_url(url, self.spec)
            self.proxies.setdefault((p.target_host, p.target_port), p)

    def start(self) -> NetemGroup:
        for p in self.proxies.values():
            p.start()
        return self

    def close(self) -> None:
        for p in self.proxies.values():
            p.close()

    def __enter__(self) -> NetemGroup:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def url_for(self, url: str) -> str:
        """The proxied URL, or ``url`` unchanged for in-process schemes (``local://``)."""
        if "://" not in url or url.split("://", 1)[0] in ("local", "modal"):
            return url
        parts = urlsplit(url)
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
        return self.proxies[(parts.hostname or "", port or 0)].url_for(url)


__all__ = ["LinkStats", "NetemGroup", "NetemProxy", "NetemSpec"]
