"""``quic://host:port`` (QUIC over UDP) and ``quic+tcp://host:port`` (QUIC datagrams framed on one TCP connection).

One QUIC connection per client; the client opens one bidirectional stream and sends ordinary
pi0remote frames on it (HELLO → METADATA, then INFER/RESET exchanges). TLS 1.3, ALPN ``pi0remote/1``.
The two byte pumps (:class:`QuicPump` on a blocking socket, :class:`AsyncQuicPump` on the running loop)
share :class:`_Session`, the sans-I/O QUIC side; the client session above them is the same as on TCP.

Certificate checking, in order of precedence:

* ``quic_fingerprint="<sha256 hex>"`` pins the server certificate (the server prints it at start and
  puts it in its metadata as ``quic_fingerprint``); any other certificate is refused;
* ``quic_insecure_skip_verify=True`` accepts any certificate (visible opt-in, never the default);
* otherwise the certificate must chain to a trusted CA (``quic_cafile=`` or the default CA bundle) and
  match the host name: a self-signed server is refused.

Other options: ``quic_max_datagram`` (UDP datagram size, default 1200; quic+tcp default 16000),
``quic_idle_timeout`` (seconds; the server's idle timeout usually closes first).

The sync pump drives aioquic's sans-I/O connection from the calling thread with a blocking socket (no
background thread); the async pump drives it on the running loop.
"""

from __future__ import annotations

import asyncio
import select
import socket
import ssl
import time
from typing import Any

from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from .. import protocol
from .. import quic_common as qc
from ..errors import (
    ConnectError,
    ConnectionLost,
    MessageTooLarge,
    Pi0RemoteError,
    ProtocolError,
    RequestNotDelivered,
    RequestTimeout,
)
from ._sock import host_port, readable
from .session import AsyncBytePump, BytePump, TransportOptions
from .translate import aioquic_table, quic_termination, translate

DEFAULT_PORT = 8766
CLIENT_IDLE_TIMEOUT = 3600.0
DEAD_AFTER_PROBES = 4
"""Consecutive QUIC probe timeouts without any acknowledgement after which the connection counts as lost."""
_TLS_ALERT_BASE = 0x100  # QUIC CRYPTO_ERROR codes: 0x100 + TLS alert


class _Session:
    """Sans-I/O client side of one QUIC connection: TLS checks, the pi0remote stream, reply framing."""

    def __init__(
        self,
        url: str,
        host: str,
        *,
        max_datagram: int,
        fingerprint: str | None,
        insecure: bool,
        cafile: str | None,
        idle_timeout: float,
        max_message_bytes: int,
    ) -> None:
        self.url = url
        config = QuicConfiguration(
            is_client=True,
            alpn_protocols=[qc.ALPN],
            max_datagram_size=max_datagram,
            idle_timeout=idle_timeout,
            max_data=qc.FLOW_WINDOW,
            max_stream_data=qc.FLOW_WINDOW,
            server_name=host,
        )
        self.fingerprint = fingerprint
        if fingerprint is not None or insecure:
            config.verify_mode = ssl.CERT_NONE  # the pin is checked on HandshakeCompleted, before any data
        elif cafile:
            config.load_verify_locations(cafile=cafile)
        self.quic = QuicConnection(configuration=config)
        qc.enable_bursts(self.quic)
        self.decoder = protocol.FrameDecoder(max_message_bytes)
        self.connected = False
        self.failure: Pi0RemoteError | None = None
        self.stream_id: int | None = None

    # -- events ------------------------------------------------------------------------------------
    def handle_events(self) -> None:
        while (event := self.quic.next_event()) is not None:
            self.handle_event(event)

    def handle_event(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.HandshakeCompleted):
            self._handshake_completed(event)
        elif isinstance(event, events.StreamDataReceived):
            if event.stream_id != self.stream_id:
                return
            if event.data and not self.decoder.broken:
                try:
                    self.decoder.feed(event.data)
                except ProtocolError as exc:  # the stream cannot be resynchronised: drop the connection
                    self._fail(
                        exc if isinstance(exc, MessageTooLarge) else ProtocolError(f"{self.url}: {exc}")
                    )
                    self.quic.close(error_code=0, reason_phrase="bad framing")
            if event.end_stream:
                self._fail(ConnectionLost(f"{self.url} closed the stream"))
        elif isinstance(event, events.StreamReset) and event.stream_id == self.stream_id:
            self._fail(ConnectionLost(f"{self.url} reset the stream"))
        elif isinstance(event, events.ConnectionTerminated):
            self._fail(self._termination_error(event))

    def _handshake_completed(self, event: events.HandshakeCompleted) -> None:
        if event.alpn_protocol != qc.ALPN:
            self._fail(ConnectError(f"{self.url} does not speak {qc.ALPN} (ALPN {event.alpn_protocol!r})"))
            self.quic.close(error_code=_TLS_ALERT_BASE + 120, reason_phrase="no application protocol")
            return
        if self.fingerprint is not None:
            cert = getattr(self.quic.tls, "_peer_certificate", None)
            got = qc.fingerprint(cert) if cert is not None else None
            if got != self.fingerprint:
                self._fail(
                    qc.TlsVerificationError(
                        f"certificate of {self.url} has fingerprint sha256:{got}, not the pinned sha256:{self.fingerprint}"
                    )
                )
                self.quic.close(
                    error_code=_TLS_ALERT_BASE + 42, reason_phrase="certificate fingerprint mismatch"
                )
                return
        self.connected = True

    def _termination_error(self, event: events.ConnectionTerminated) -> Pi0RemoteError:
        return quic_termination(event.error_code, event.reason_phrase, connected=self.connected, url=self.url)

    def check_alive(self) -> None:
        """A peer that acknowledged nothing through several probe timeouts is gone (e.g. restarted).

        UDP has no reset: a restarted server silently drops packets of connections it does not know.
        Probe timeouts only run while our packets are unacknowledged (never while the server merely
        computes a slow reply), so this is a liveness signal, not a request timeout.
        """
        if self.connected and self.failure is None and qc.compat.pto_count(self.quic) >= DEAD_AFTER_PROBES:
            self._fail(  # nothing acknowledged: the server never got the whole request
                RequestNotDelivered(
                    f"{self.url} acknowledged nothing after {DEAD_AFTER_PROBES} probe timeouts"
                )
            )

    def closing(self) -> ConnectionLost | None:
        """The reason once a CONNECTION_CLOSE was sent or received, else None.

        aioquic emits ``ConnectionTerminated`` only after draining (three probe timeouts later), so a
        server's close is read from the connection itself (``quic_compat.close_event``).
        """
        event = qc.compat.close_event(self.quic)
        if event is None:
            return None
        return ConnectionLost(f"QUIC connection to {self.url} closed: {event.reason_phrase or 'closed'}")

    def _fail(self, exc: Pi0RemoteError) -> None:
        if self.failure is None:
            self.failure = exc

    # -- requests ----------------------------------------------------------------------------------
    def send(self, message: bytes) -> None:
        if self.stream_id is None:
            self.stream_id = self.quic.get_next_available_stream_id()
        qc.ack_with_next_packet(self.quic)
        self.quic.send_stream_data(self.stream_id, protocol.frame_header(len(message)) + message)

    def close(self) -> None:
        try:
            self.quic.close(error_code=0, reason_phrase="client closed")
        except Exception:
            pass


OPTIONS = frozenset(
    {
        "quic_fingerprint",
        "quic_insecure_skip_verify",
        "quic_cafile",
        "quic_max_datagram",
        "quic_idle_timeout",
        "quic_udp_buffer_bytes",
        "quic_burst_bytes",
    }
)
"""The QUIC pumps' own ``connect()`` keywords."""


def _options(url: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    scheme = url.split("://", 1)[0].lower()
    over_tcp = scheme == "quic+tcp"
    fp = kwargs.get("quic_fingerprint")
    return {
        "over_tcp": over_tcp,
        "max_datagram": qc.check_datagram_size(
            kwargs.get("quic_max_datagram"), qc.DEFAULT_TCP_DATAGRAM if over_tcp else qc.DEFAULT_UDP_DATAGRAM
        ),
        "fingerprint": qc.normalize_fingerprint(fp) if fp else None,
        "insecure": bool(kwargs.get("quic_insecure_skip_verify", False)),
        "cafile": kwargs.get("quic_cafile"),
        "idle_timeout": float(kwargs.get("quic_idle_timeout") or CLIENT_IDLE_TIMEOUT),
        "udp_buffer_bytes": int(kwargs.get("quic_udp_buffer_bytes") or qc.UDP_BUFFER_BYTES),
    }


def _resolve(host: str, port: int) -> tuple[int, Any]:
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    except OSError as exc:
        raise ConnectError(f"cannot resolve {host}: {exc}") from exc
    return family, addr


# -- blocking links ----------------------------------------------------------------------------------
class _UdpLink:
    def __init__(self, host: str, port: int, timeout: float, buffer_bytes: int) -> None:
        family, self.addr = _resolve(host, port)
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.rcvbuf = qc.set_udp_buffers(self.sock, buffer_bytes)
        self.sock.connect(self.addr)  # ICMP "port unreachable" then surfaces as ConnectionRefusedError
        self.sock.setblocking(False)

    def send(self, datagrams: list[tuple[bytes, Any]]) -> None:
        for data, _ in datagrams:
            try:
                self.sock.send(data, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                pass  # a full buffer is a lost datagram: QUIC resends
            except ConnectionRefusedError as exc:
                raise ConnectionLost(f"nothing listening at {self.addr}") from exc
            except OSError as exc:
                raise ConnectionLost(f"UDP send failed: {exc}") from exc

    def recv(self, timeout: float) -> list[bytes]:
        if timeout > 0 and not readable(self.sock, timeout):
            return []
        out: list[bytes] = []
        while True:
            try:
                out.append(self.sock.recv(65536, socket.MSG_DONTWAIT))
            except (BlockingIOError, InterruptedError):
                return out
            except ConnectionRefusedError as exc:
                raise ConnectionLost(f"nothing listening at {self.addr}") from exc
            except OSError as exc:
                raise ConnectionLost(f"UDP receive failed: {exc}") from exc

    def close(self) -> None:
        self.sock.close()


class _TcpLink:
    def __init__(self, host: str, port: int, timeout: float) -> None:
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise ConnectError(f"could not connect to {host}:{port}: {exc}") from exc
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.timeout = timeout
        self.addr = self.sock.getpeername()
        self.splitter = qc.DatagramSplitter()

    def send(self, datagrams: list[tuple[bytes, Any]]) -> None:
        view = memoryview(qc.frame_datagrams(d for d, _ in datagrams))
        deadline = None
        while view:
            try:
                view = view[self.sock.send(view) :]
                continue
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                raise ConnectionLost(f"relay connection lost: {exc}") from exc
            now = time.monotonic()
            deadline = deadline or now + self.timeout
            if now >= deadline or not select.select([], [self.sock], [], deadline - now)[1]:
                raise ConnectionLost("relay stopped accepting data")

    def recv(self, timeout: float) -> list[bytes]:
        if timeout > 0 and not readable(self.sock, timeout):
            return []
        out: list[bytes] = []
        while True:
            try:
                data = self.sock.recv(262144, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                raise ConnectionLost(f"relay connection lost: {exc}") from exc
            if not data:
                raise ConnectionLost("relay connection closed")
            try:
                out += self.splitter.feed(data)
            except ProtocolError as exc:
                raise ConnectionLost(f"bad datagram framing from the relay: {exc}") from exc
            if len(data) < 262144:
                break
        return out

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _configure(pump: Any, options: TransportOptions) -> None:
    """Address, QUIC options and scheme (``quic`` or ``quic+tcp``), the same for both twins."""
    pump.host, pump.port = host_port(options.url, DEFAULT_PORT)
    pump.quic_options = _options(options.url, options.extra)
    pump.scheme = "quic+tcp" if pump.quic_options["over_tcp"] else "quic"


def _new_session(pump: Any) -> _Session:
    opts = pump.quic_options
    return _Session(
        pump.url,
        pump.host,
        max_datagram=opts["max_datagram"],
        fingerprint=opts["fingerprint"],
        insecure=opts["insecure"],
        cafile=opts["cafile"],
        idle_timeout=opts["idle_timeout"],
        max_message_bytes=pump.options.max_message_bytes,
    )


def _stale(session: _Session | None, url: str) -> _Session:
    """Before a request: the connection must be up and not failed (else the request is not delivered)."""
    if session is None:
        raise ConnectionLost(f"not connected to {url}")
    if session.failure is not None:
        failure = session.failure
        raise failure if isinstance(failure, ConnectionLost) else ConnectionLost(str(failure))
    closing = session.closing()
    if closing is not None:
        raise closing
    return session


class QuicPump(BytePump):
    """Sync QUIC pump (``quic://`` and ``quic+tcp://``)."""

    scheme = "quic"
    OPTIONS = OPTIONS
    final_connect_errors = (qc.TlsVerificationError,)

    def __init__(self, options: TransportOptions) -> None:
        super().__init__(options)
        _configure(self, options)
        burst = options.extra.get("quic_burst_bytes")
        self.burst = qc.BURST_BYTES if burst is None else int(burst)
        self.session: _Session | None = None
        self.link: _UdpLink | _TcpLink | None = None

    # -- connection ---------------------------------------------------------------------------------
    def open(self) -> None:
        opts, timeout = self.quic_options, self.options.timeout
        try:
            if opts["over_tcp"]:
                self.link = _TcpLink(self.host, self.port, timeout)
            else:
                self.link = _UdpLink(self.host, self.port, timeout, opts["udp_buffer_bytes"])
            self.session = session = _new_session(self)
            session.quic.connect(self.link.addr, now=time.monotonic())
            if not self._pump(lambda: session.connected, time.monotonic() + timeout):
                raise ConnectError(f"QUIC handshake with {self.url} timed out after {timeout:g}s")
        except Exception as exc:
            raise translate(aioquic_table(), exc, self.url, connecting=True) from exc

    def _pump(self, done: Any, deadline: float) -> bool:
        """Move datagrams and timers until ``done()``; False at ``deadline``; raises the session's failure."""
        session, link = self.session, self.link
        assert session is not None and link is not None
        quic = session.quic
        while True:
            qc.send_in_bursts(quic, time.monotonic(), link.send, self.burst)
            if done():
                return True
            if session.failure is not None:
                raise session.failure
            now = time.monotonic()
            timer = quic.get_timer()
            if timer is not None and timer <= now:
                quic.handle_timer(now=now)
                session.handle_events()
                session.check_alive()
                continue
            wait = deadline - now
            if wait <= 0:
                return False
            if timer is not None:
                wait = min(wait, timer - now)
            received = link.recv(wait)
            if received:
                now = time.monotonic()
                for data in received:
                    quic.receive_datagram(data, link.addr, now=now)
                session.handle_events()

    # -- messages -----------------------------------------------------------------------------------
    def send(self, message: Any) -> None:
        link = self.link
        if link is None:
            raise ConnectionLost(f"not connected to {self.url}")
        # take in what arrived since the last call (ACKs, a close from the server) before sending
        received = link.recv(0)
        session = _stale(self.session, self.url)
        if received:
            now = time.monotonic()
            for data in received:
                session.quic.receive_datagram(data, link.addr, now=now)
            session.handle_events()
        session = _stale(session, self.url)
        session.send(message if isinstance(message, bytes) else b"".join(message))
        qc.send_in_bursts(session.quic, time.monotonic(), link.send, self.burst)

    def receive(self) -> bytearray:
        session = self.session
        if session is None:
            raise ConnectionLost(f"not connected to {self.url}")
        decoder = session.decoder
        if not self._pump(lambda: decoder.has_message, time.monotonic() + self.options.timeout):
            raise RequestTimeout(f"no reply from {self.url} within {self.options.timeout:g}s")
        reply = decoder.pop()
        assert reply is not None
        return reply

    def close(self) -> None:
        session, link = self.session, self.link
        self.session = self.link = None
        if session is not None and link is not None:
            if session.failure is None:
                session.close()
            try:  # the CONNECTION_CLOSE (ours, or the one a refused certificate queued)
                datagrams = session.quic.datagrams_to_send(now=time.monotonic())
                if datagrams:
                    link.send(datagrams)
            except Exception:
                pass
        if link is not None:
            link.close()


# -- asyncio ---------------------------------------------------------------------------------------
class _AsyncDriver(qc.LoopDriver):
    def __init__(self, session: _Session, send: Any) -> None:
        super().__init__(session.quic, send)
        self.session = session
        self.waiter: asyncio.Future | None = None

    def handle_event(self, event: events.QuicEvent) -> None:
        self.session.handle_event(event)

    def _on_timer(self) -> None:
        super()._on_timer()
        self.session.check_alive()
        self.wake()

    def after_input(self) -> None:
        super().after_input()
        self.wake()

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def link_lost(self, exc: Pi0RemoteError) -> None:
        self.session._fail(exc)
        self.stop_timer()
        self.wake()


class _AsyncUdp(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.driver: _AsyncDriver | None = None
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, datagrams: list[tuple[bytes, Any]]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            for data, _ in datagrams:
                self.transport.sendto(data)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.driver is not None and not self.driver.terminated:
            self.driver.datagram_received(data, addr)

    def error_received(self, exc: Exception) -> None:
        if self.driver is not None:
            self.driver.link_lost(ConnectionLost(f"UDP error: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.driver is not None:
            self.driver.link_lost(ConnectionLost("UDP socket closed"))


class _AsyncTcp(asyncio.Protocol):
    def __init__(self) -> None:
        self.driver: _AsyncDriver | None = None
        self.transport: asyncio.Transport | None = None
        self.splitter = qc.DatagramSplitter()
        self.addr: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.addr = transport.get_extra_info("peername")

    def send(self, datagrams: list[tuple[bytes, Any]]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(qc.frame_datagrams(d for d, _ in datagrams))

    def data_received(self, data: bytes) -> None:
        driver = self.driver
        if driver is None or driver.terminated:
            return
        try:
            datagrams = self.splitter.feed(data)
        except ProtocolError as exc:
            driver.link_lost(ConnectionLost(f"bad datagram framing from the relay: {exc}"))
            if self.transport is not None:
                self.transport.close()
            return
        now = driver.loop.time()
        for datagram in datagrams:
            driver.quic.receive_datagram(datagram, self.addr, now=now)
        driver.after_input()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.driver is not None:
            self.driver.link_lost(ConnectionLost(f"relay connection lost: {exc or 'closed'}"))


class AsyncQuicPump(AsyncBytePump):
    """Async twin of :class:`QuicPump`, on the running event loop."""

    scheme = "quic"
    OPTIONS = OPTIONS
    final_connect_errors = (qc.TlsVerificationError,)

    def __init__(self, options: TransportOptions) -> None:
        super().__init__(options)
        _configure(self, options)
        self.driver: _AsyncDriver | None = None
        self.link: Any = None

    async def open(self) -> None:
        try:
            await self._handshake()
        except Exception as exc:
            raise translate(aioquic_table(), exc, self.url, connecting=True) from exc

    async def _link(self) -> tuple[Any, Any]:
        loop = asyncio.get_running_loop()
        if self.quic_options["over_tcp"]:
            _, link = await asyncio.wait_for(
                loop.create_connection(_AsyncTcp, self.host, self.port), self.options.timeout
            )
            return link, link.addr
        family, addr = _resolve(self.host, self.port)
        sock = socket.socket(family, socket.SOCK_DGRAM)
        qc.set_udp_buffers(sock, self.quic_options["udp_buffer_bytes"])
        sock.connect(addr)
        sock.setblocking(False)
        _, link = await loop.create_datagram_endpoint(_AsyncUdp, sock=sock)
        return link, addr

    async def _handshake(self) -> None:
        self.link, addr = link, _ = await self._link()
        session = _new_session(self)
        self.driver = driver = _AsyncDriver(session, link.send)
        link.driver = driver
        session.quic.connect(addr, now=driver.loop.time())
        driver.transmit()
        timeout = self.options.timeout
        if not await self._wait(lambda: session.connected, driver.loop.time() + timeout):
            raise ConnectError(f"QUIC handshake with {self.url} timed out after {timeout:g}s")

    async def _wait(self, done: Any, deadline: float) -> bool:
        driver = self.driver
        assert driver is not None
        loop = driver.loop
        while True:
            if done():
                return True
            if driver.session.failure is not None:
                raise driver.session.failure
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            driver.waiter = loop.create_future()
            try:
                await asyncio.wait_for(driver.waiter, remaining)
            except asyncio.TimeoutError:
                pass
            finally:
                driver.waiter = None

    async def send(self, message: Any) -> None:
        driver = self.driver
        session = _stale(driver.session if driver is not None else None, self.url)
        assert driver is not None
        session.send(message if isinstance(message, bytes) else b"".join(message))
        driver.transmit()

    async def receive(self) -> bytearray:
        driver = self.driver
        if driver is None:
            raise ConnectionLost(f"not connected to {self.url}")
        decoder = driver.session.decoder
        timeout = self.options.timeout
        if not await self._wait(lambda: decoder.has_message, driver.loop.time() + timeout):
            raise RequestTimeout(f"no reply from {self.url} within {timeout:g}s")
        reply = decoder.pop()
        assert reply is not None
        return reply

    async def close(self) -> None:
        driver, link = self.driver, self.link
        self.driver = self.link = None
        if driver is not None:
            if not driver.terminated:
                if driver.session.failure is None:
                    driver.session.close()
                driver.transmit()
            driver.stop_timer()
            driver.session._fail(ConnectionLost("closed"))
        if link is not None and link.transport is not None:
            link.driver = None
            link.transport.close()


QuicTransport = QuicPump
AsyncQuicTransport = AsyncQuicPump

__all__ = ["AsyncQuicPump", "QuicPump"]
