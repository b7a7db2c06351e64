"""QUIC listeners: ``quic://`` (UDP) and ``quic+tcp://`` (QUIC datagrams framed on TCP), same port number.

Each QUIC connection carries one client-opened bidirectional stream of ordinary pi0remote frames,
served by a :class:`~pi0remote.server.connection.MessageConnection` (in-order serving, idle timer),
exactly like a TCP connection. TLS 1.3 with ALPN ``pi0remote/1``; the certificate is ``server.cert`` /
``server.key`` or a self-signed one generated at start, whose SHA-256 fingerprint is printed and put
in the metadata as ``quic_fingerprint``.

Server options (``PolicyServer(quic_options=...)``): ``max_datagram_size`` for UDP (default 1200,
see docs/transports.md), ``tcp_max_datagram_size`` (default 16000), ``udp_buffer_bytes`` (4 MiB).

Bounds (``core.limits``, docs/security.md): at most ``quic_max_half_open`` connections in their
handshake (further Initials are dropped); from ``quic_retry_threshold`` half-open connections on, a new
client must first echo a Retry token (proving its address) before any TLS work is done for it; every
connection must send its HELLO within ``handshake_timeout`` and at most ``preauth_bytes`` before it;
the receive windows start at ``SERVER_FLOW_WINDOW`` and grow as data is consumed; replies a client
leaves unacknowledged past ``max_outbound_bytes`` close the connection.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import socket
import ssl
import struct
from typing import Any

from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicErrorCode, QuicPacketType, encode_quic_retry, pull_quic_header

from .. import protocol
from .. import quic_common as qc
from .. import quic_compat as compat
from ..errors import ProtocolError
from .connection import MessageConnection, set_nodelay
from .core import ServerCore, Session
from .limits import admit_transport

CONNECTION_ID_LENGTH = 8
APP_ERROR_PROTOCOL = 0x1
"""Application error code when a client breaks pi0remote's stream rules."""
REPLY_GRACE_S = 0.25
"""After a final reply (auth error, framing error) the connection closes this much later, so it arrives."""
SERVER_FLOW_WINDOW = 512 * 1024
"""Initial receive windows (aioquic doubles them as they are used): what a peer can make us buffer at once."""
RETRY_TOKEN_LIFETIME_S = 10.0


def _quic_idle(idle_timeout: float | None) -> float:
    # QUIC's own idle timer is a backstop behind MessageConnection's (which closes with a CONNECTION_CLOSE)
    return 86400.0 if not idle_timeout else idle_timeout * 1.5 + 5.0


class QuicPeer(qc.LoopDriver):
    """One server-side QUIC connection: its pi0remote stream, served in order by a MessageConnection."""

    defer_idle_sends = True

    def __init__(
        self,
        quic: QuicConnection,
        core: ServerCore,
        *,
        transport_name: str,
        send_datagrams: Any,
        on_terminated: Any,
        max_message_bytes: int,
        idle_timeout: float | None,
        on_cid: Any = None,
        on_settled: Any = None,
    ) -> None:
        super().__init__(quic, send_datagrams)
        self.core = core
        self._on_cid = on_cid
        self._on_terminated = on_terminated
        self._on_settled = on_settled
        self.stream_id: int | None = None
        self.decoder = protocol.FrameDecoder(max_message_bytes, start_bytes=4096)
        self._last_reply_at = -1e9
        self.handshake_done = False
        self.gate_addr: Any = None
        """The address counted by the connection gate (released when the connection ends)."""
        self._preauth = 0
        self.conn = MessageConnection(
            core,
            Session(authenticated=False, transport=transport_name),
            send=self._send_reply,
            close=self._close,
            idle_timeout=idle_timeout,
            handshake_timeout=core.limits.handshake_timeout,
        )

    def _settled(self) -> None:
        """The connection left the half-open state (handshake done, or closing)."""
        if self._on_settled is not None:
            settled, self._on_settled = self._on_settled, None
            settled(self)

    def count_input(self, nbytes: int) -> bool:
        """Count bytes received before the HELLO; False (and the connection closes) past the budget."""
        if self.conn.session.authenticated:
            return True
        self._preauth += nbytes
        if self._preauth <= self.core.limits.preauth_bytes:
            return True
        self.conn.closed = True
        self._close_now("too many bytes before authenticating")
        return False

    # -- MessageConnection callbacks ---------------------------------------------------------------
    def _send_reply(self, message: bytes) -> None:
        if self.stream_id is None or self.terminated:
            return
        qc.ack_with_next_packet(self.quic)
        self.quic.send_stream_data(self.stream_id, protocol.frame_header(len(message)) + message)
        self._last_reply_at = self.loop.time()
        self.transmit()
        if compat.send_buffered(self.quic, self.stream_id) > self.core.outbound_cap:
            self.conn.closed = True
            self._close_now("replies not read")

    def _close(self) -> None:
        if self.terminated:
            return
        if self.loop.time() - self._last_reply_at < 0.05:  # closing right after a final reply
            self.transmit()
            self.loop.call_later(REPLY_GRACE_S, self._close_now, "closed by server")
        else:
            self._close_now("idle timeout")

    def _close_now(self, reason: str) -> None:
        if self.terminated:
            return
        self._settled()
        self.quic.close(error_code=QuicErrorCode.NO_ERROR, reason_phrase=reason)
        self.transmit()

    # -- QUIC events -----------------------------------------------------------------------------
    def handle_event(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            self._stream_data(event)
        elif isinstance(event, events.HandshakeCompleted):
            self.handshake_done = True
            self._settled()
        elif isinstance(event, events.ConnectionTerminated):
            self._terminated()
        elif isinstance(event, events.StreamReset) and event.stream_id == self.stream_id:
            self.conn.shutdown()
        elif isinstance(event, (events.ConnectionIdIssued, events.ConnectionIdRetired)) and self._on_cid:
            self._on_cid(self, event)

    def _stream_data(self, event: events.StreamDataReceived) -> None:
        if self.stream_id is None and event.stream_id % 4 == 0:  # client-initiated bidirectional
            self.stream_id = event.stream_id
        if event.stream_id != self.stream_id:
            # pi0remote uses one stream per connection: refuse the others
            try:
                self.quic.reset_stream(event.stream_id, APP_ERROR_PROTOCOL)
            except Exception:
                pass
            self.transmit()  # (inside event handling: marks output as queued)
            return
        if self.conn.closed:
            return
        if event.data and not self.decoder.broken:
            try:
                self.decoder.feed(event.data)
            except ProtocolError as exc:  # oversized or empty frame: the stream cannot be resynchronised
                while self.decoder.pop() is not None:
                    pass
                self._send_reply(self.core.error_message(exc))
                self.conn.shutdown()
                return
            while (message := self.decoder.pop()) is not None:
                self.conn.message_received(message)
        if event.end_stream and not self.conn.closed:
            self.conn.shutdown()

    def _terminated(self) -> None:
        if self.terminated:
            return
        self.stop_timer()
        self._settled()
        self.conn.connection_lost()
        self._on_terminated(self)

    def close(self) -> None:
        """Server shutdown."""
        if not self.terminated:
            self.conn.closed = True
            self._close_now("server shutting down")


class UdpQuicListener:
    """Routes UDP datagrams to QUIC connections by destination connection ID; drops anything else."""

    READ_BATCH = 256

    def __init__(
        self, core: ServerCore, sock: socket.socket, configuration: QuicConfiguration, opts: dict[str, Any]
    ) -> None:
        self.core = core
        self.sock = sock
        self.configuration = configuration
        self.opts = opts
        self.loop = asyncio.get_running_loop()
        self.peers: dict[bytes, QuicPeer] = {}
        self.half_open: set[QuicPeer] = set()
        self.dropped = 0
        self.refused_initials = 0
        self.retries_sent = 0
        self._retry_key = os.urandom(32)
        self.loop.add_reader(sock.fileno(), self._read_ready)

    @property
    def connections(self) -> set[QuicPeer]:
        return set(self.peers.values())

    def _sendto(self, datagrams: list[tuple[bytes, Any]]) -> None:
        for data, addr in datagrams:
            try:
                self.sock.sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                self.dropped += 1  # buffer full: QUIC's loss recovery resends
            except OSError:
                pass

    def _read_ready(self) -> None:
        touched: dict[QuicPeer, None] = {}
        now = self.loop.time()
        for _ in range(self.READ_BATCH):
            try:
                data, addr = self.sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue  # e.g. an ICMP error reported on the socket
            peer = self._route(data, addr, now)
            if peer is not None:
                touched[peer] = None
        for peer in touched:
            if not peer.terminated:
                peer.after_input()

    def _route(self, data: bytes, addr: Any, now: float) -> QuicPeer | None:
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CONNECTION_ID_LENGTH)
        except Exception:
            return None  # not QUIC
        peer = self.peers.get(header.destination_cid)
        if peer is None:
            if (
                header.packet_type == QuicPacketType.INITIAL
                and len(data) >= qc.MIN_DATAGRAM
                and header.version in self.configuration.supported_versions
            ):
                self._new_connection(data, addr, header, now)
            return None
        if not peer.count_input(len(data)):
            return None
        try:
            peer.quic.receive_datagram(data, addr, now=now)
        except Exception:
            return None
        return peer

    def _admit_initial(self, header: Any, addr: Any) -> tuple[bytes, bytes | None] | None:
        """``(original DCID, retry source CID)`` for a new connection, or None (dropped or sent a Retry)."""
        limits = self.core.limits
        if len(self.half_open) >= limits.quic_max_half_open:
            self.refused_initials += 1
            return None
        if len(self.half_open) < limits.quic_retry_threshold:
            return header.destination_cid, None
        if not header.token:
            self._send_retry(header, addr)
            return None
        original = self._check_retry_token(header.token, addr, header.destination_cid)
        if original is None:
            self.refused_initials += 1
            return None
        return original, header.destination_cid

    def _new_connection(self, data: bytes, addr: Any, header: Any, now: float) -> None:
        admitted = self._admit_initial(header, addr)
        if admitted is None or self.core.gate.admit(addr) is not None:
            return
        original, retry_cid = admitted
        quic = QuicConnection(
            configuration=self.configuration,
            original_destination_connection_id=original,
            retry_source_connection_id=retry_cid,
        )
        peer = QuicPeer(
            quic,
            self.core,
            transport_name="quic",
            send_datagrams=self._sendto,
            on_terminated=self._forget,
            on_cid=self._cid_event,
            on_settled=self.half_open.discard,
            **self.opts,
        )
        peer.gate_addr = addr
        self.half_open.add(peer)
        try:
            quic.receive_datagram(data, addr, now=now)
            peer.process_events()
            out = quic.datagrams_to_send(now=self.loop.time())
        except Exception:
            out = []
        if not out:  # the Initial did not decrypt: not a real client, keep no state
            peer.stop_timer()
            peer.conn.connection_lost()
            self._forget(peer)
            return
        self.peers[header.destination_cid] = peer
        self.peers[quic.host_cid] = peer
        self._sendto(out)
        peer.transmit()

    # -- address validation (RFC 9000 section 8.1.2) ------------------------------------------------
    def _token_mac(self, addr: Any, body: bytes) -> bytes:
        key = f"{addr[0]}|{addr[1]}".encode() + body
        return hmac.new(self._retry_key, key, hashlib.sha256).digest()[:16]

    def _send_retry(self, header: Any, addr: Any) -> None:
        retry_cid = os.urandom(CONNECTION_ID_LENGTH)
        odcid = header.destination_cid
        body = struct.pack("!dB", self.loop.time(), len(odcid)) + odcid + retry_cid
        token = body + self._token_mac(addr, body)
        packet = encode_quic_retry(
            version=header.version,
            source_cid=retry_cid,
            destination_cid=header.source_cid,
            original_destination_cid=odcid,
            retry_token=token,
        )
        self.retries_sent += 1
        self._sendto([(packet, addr)])

    def _check_retry_token(self, token: bytes, addr: Any, dcid: bytes) -> bytes | None:
        """The original DCID a valid, fresh token of this address carries; None for any other token."""
        if len(token) < 9 + 16:
            return None
        when, n = struct.unpack_from("!dB", token)
        body = token[: 9 + n + CONNECTION_ID_LENGTH]
        if len(token) != len(body) + 16 or not hmac.compare_digest(
            token[len(body) :], self._token_mac(addr, body)
        ):
            return None
        if not 0 <= self.loop.time() - when <= RETRY_TOKEN_LIFETIME_S or body[9 + n :] != dcid:
            return None
        return body[9 : 9 + n]

    def _cid_event(self, peer: QuicPeer, event: Any) -> None:
        if isinstance(event, events.ConnectionIdIssued):
            self.peers[event.connection_id] = peer
        elif self.peers.get(event.connection_id) is peer:
            del self.peers[event.connection_id]

    def _forget(self, peer: QuicPeer) -> None:
        self.half_open.discard(peer)
        if peer.gate_addr is not None:
            self.core.gate.release(peer.gate_addr)
            peer.gate_addr = None
        for cid in [cid for cid, p in self.peers.items() if p is peer]:
            del self.peers[cid]

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        for peer in list(self.connections):
            peer.close()
        self.sock.close()


class TcpQuicProtocol(asyncio.Protocol):
    """quic+tcp: one TCP connection carries one QUIC connection's datagrams as ``u32 length || datagram``."""

    def __init__(
        self, core: ServerCore, configuration: QuicConfiguration, opts: dict[str, Any], registry: set
    ) -> None:
        self.core = core
        self.configuration = configuration
        self.opts = opts
        self.registry = registry
        self.splitter = qc.DatagramSplitter()
        self.transport: asyncio.Transport | None = None
        self.peer: QuicPeer | None = None
        self.addr: Any = ("0.0.0.0", 0)
        self._gate_addr: Any = None
        self._handshake_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._gate_addr = admit_transport(self.core.gate, transport)
        if self._gate_addr is None:
            return
        self.transport = transport
        set_nodelay(transport)
        self.addr = transport.get_extra_info("peername") or self.addr
        self.registry.add(self)
        # Until a valid Initial arrives, only the handshake deadline guards this connection.
        deadline = self.core.limits.handshake_timeout
        if deadline:
            self._handshake_timer = asyncio.get_running_loop().call_later(deadline, self._abort)

    def _abort(self) -> None:
        if self.peer is None and self.transport is not None:
            self.transport.close()

    def _write(self, datagrams: list[tuple[bytes, Any]]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(qc.frame_datagrams(d for d, _ in datagrams))

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return
        if self.peer is not None and not self.peer.count_input(len(data)):
            return
        try:
            datagrams = self.splitter.feed(data)
        except ProtocolError:
            self.transport.close()  # not framed QUIC: drop just this connection
            return
        loop_now = asyncio.get_running_loop().time()
        got = False
        for datagram in datagrams:
            if self.peer is None:
                if not self._first_datagram(datagram, loop_now):
                    self.transport.close()
                    return
                continue
            try:
                self.peer.quic.receive_datagram(datagram, self.addr, now=loop_now)
            except Exception:
                continue
            got = True
        if got and self.peer is not None and not self.peer.terminated:
            self.peer.after_input()

    def _first_datagram(self, data: bytes, now: float) -> bool:
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CONNECTION_ID_LENGTH)
        except Exception:
            return False
        if (
            header.packet_type != QuicPacketType.INITIAL
            or header.version not in self.configuration.supported_versions
        ):
            return False
        quic = QuicConnection(
            configuration=self.configuration, original_destination_connection_id=header.destination_cid
        )
        peer = QuicPeer(
            quic,
            self.core,
            transport_name="quic+tcp",
            send_datagrams=self._write,
            on_terminated=self._peer_gone,
            **self.opts,
        )
        try:
            quic.receive_datagram(data, self.addr, now=now)
        except Exception:
            peer.stop_timer()
            peer.conn.connection_lost()
            return False
        self.peer = peer
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        peer.after_input()
        return True

    def _peer_gone(self, peer: QuicPeer) -> None:
        if self.transport is not None:
            # let the CONNECTION_CLOSE frame leave before the TCP connection goes
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._gate_addr is not None:
            self.core.gate.release(self._gate_addr)
            self._gate_addr = None
        self.registry.discard(self)
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        if self.peer is not None and not self.peer.terminated:
            self.peer._terminated()
        self.transport = None

    def close(self) -> None:
        if self.peer is not None:
            self.peer.close()
        if self.transport is not None:
            self.transport.close()


_SELF_SIGNED: dict[str, tuple[Any, Any]] = {}


def _self_signed(host: str) -> tuple[Any, Any]:
    """One generated identity per process and host: a server restarted in-process keeps its fingerprint."""
    if host not in _SELF_SIGNED:
        _SELF_SIGNED[host] = qc.generate_self_signed([host, socket.gethostname()])
    return _SELF_SIGNED[host]


def _server_configuration(
    server: Any, certificate: Any, chain: list[Any], key: Any, max_datagram: int
) -> QuicConfiguration:
    config = QuicConfiguration(
        is_client=False,
        alpn_protocols=[qc.ALPN],
        max_datagram_size=max_datagram,
        idle_timeout=_quic_idle(server.idle_timeout),
        max_data=SERVER_FLOW_WINDOW,
        max_stream_data=SERVER_FLOW_WINDOW,
        connection_id_length=CONNECTION_ID_LENGTH,
    )
    config.certificate = certificate
    config.certificate_chain = chain
    config.private_key = key
    config.verify_mode = ssl.CERT_NONE
    return config


def _bind_udp(host: str, port: int, buffer_bytes: int) -> tuple[socket.socket, int]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        granted = qc.set_udp_buffers(sock, buffer_bytes)
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    return sock, granted


def _identity(server: Any) -> tuple[Any, list[Any], Any]:
    """The certificate, chain and key (``server.cert`` or a self-signed one); prints the fingerprint."""
    if server.cert:
        certificate, chain, key = qc.load_cert_and_key(server.cert, server.key)
    else:
        certificate, key = _self_signed(server.host)
        chain = []
    fp = qc.fingerprint(certificate)
    server.core.set_extra_metadata(quic_fingerprint=fp)
    print(f"quic fingerprint sha256:{fp}", flush=True)
    return certificate, chain, key


def _udp_socket(server: Any, port: int, buffer_bytes: int) -> socket.socket:
    sock, granted = _bind_udp(server.host, port, buffer_bytes)
    server.quic_udp_buffer = granted
    if granted < buffer_bytes:  # Linux reports twice the usable size, so this is under half
        print(
            f"quic warning: UDP receive buffer is {granted} bytes, asked for {buffer_bytes}; "
            "raise net.core.rmem_max or expect drops on large requests",
            flush=True,
        )
    return sock


async def _bind(
    server: Any, want_udp: bool, make_tcp: Any, buffer_bytes: int
) -> tuple[socket.socket | None, asyncio.AbstractServer | None, int]:
    """The UDP socket and/or TCP server on one port number (port 0: one free for both)."""
    loop = asyncio.get_running_loop()
    port = server.quic_port
    for attempt in range(20):
        udp_sock = _udp_socket(server, port, buffer_bytes) if want_udp else None
        if udp_sock is not None:
            port = udp_sock.getsockname()[1]
        if make_tcp is None:
            return udp_sock, None, port
        try:
            tcp_server = await loop.create_server(make_tcp, server.host, port)
        except OSError:
            if udp_sock is not None:
                udp_sock.close()
                if server.quic_port == 0 and attempt < 19:
                    port = 0
                    continue
            raise
        return udp_sock, tcp_server, tcp_server.sockets[0].getsockname()[1]
    raise OSError("no port number free for both UDP and TCP")


async def start_quic_listeners(server: Any) -> list[str]:
    """Open the ``quic`` (UDP) and/or ``quic+tcp`` listeners of ``server`` (a :class:`QuicListeners`)."""
    from . import _host_for_url

    options = dict(server.quic_options)
    udp_datagram = qc.check_datagram_size(options.get("max_datagram_size"), qc.DEFAULT_UDP_DATAGRAM)
    tcp_datagram = qc.check_datagram_size(options.get("tcp_max_datagram_size"), qc.DEFAULT_TCP_DATAGRAM)
    buffer_bytes = int(options.get("udp_buffer_bytes", qc.UDP_BUFFER_BYTES))
    certificate, chain, key = _identity(server)
    opts = server.listener_kwargs()
    host = _host_for_url(server.host)
    registry: set[TcpQuicProtocol] = set()
    tcp_config = _server_configuration(server, certificate, chain, key, tcp_datagram)
    make_tcp = (
        (lambda: TcpQuicProtocol(server.core, tcp_config, opts, registry))
        if "quic+tcp" in server.transports
        else None
    )
    udp_sock, tcp_server, port = await _bind(server, "quic" in server.transports, make_tcp, buffer_bytes)
    urls: list[str] = []
    if udp_sock is not None:
        udp_config = _server_configuration(server, certificate, chain, key, udp_datagram)
        listener = UdpQuicListener(server.core, udp_sock, udp_config, opts)
        server.quic_listener = listener
        server.add_closer(listener.close)
        urls.append(f"quic://{host}:{port}")
    if tcp_server is not None:
        server.quic_tcp_connections = registry

        def close_tcp() -> None:
            tcp_server.close()
            for proto in list(registry):
                proto.close()

        server.add_closer(close_tcp)
        urls.append(f"quic+tcp://{host}:{port}")
    return urls


class QuicListeners:
    """The ``quic`` / ``quic+tcp`` listeners of one server (:mod:`pi0remote.server.listener` protocol).

    It carries the settings :func:`start_quic_listeners` reads and records what that function opens
    (``quic_listener``, ``quic_tcp_connections``, ``quic_udp_buffer``).
    """

    def __init__(self, core: Any, options: Any) -> None:
        self.core = core
        self.options = options
        self.host, self.quic_port = options.host, options.port
        self.transports, self.quic_options = options.transports, options.quic_options
        self.cert, self.key, self.idle_timeout = options.cert, options.key, options.idle_timeout
        self.urls: list[str] = []
        self.quic_listener: UdpQuicListener | None = None
        self.quic_tcp_connections: set[Any] = set()
        self.quic_udp_buffer: int | None = None
        self._closers: list[Any] = []

    def listener_kwargs(self) -> dict[str, Any]:
        return self.options.listener_kwargs()

    def add_closer(self, closer: Any) -> None:
        self._closers.append(closer)

    async def close(self) -> None:
        for closer in self._closers:
            result = closer()
            if asyncio.iscoroutine(result):
                await result


async def start(core: Any, options: Any) -> QuicListeners:
    listeners = QuicListeners(core, options)
    listeners.urls = await start_quic_listeners(listeners)
    return listeners


__all__ = ["QuicListeners", "QuicPeer", "TcpQuicProtocol", "UdpQuicListener", "start", "start_quic_listeners"]
