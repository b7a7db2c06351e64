"""What the QUIC server and client share: settings, certificates, datagram-over-TCP framing, a loop driver.

pi0remote over QUIC (``quic://`` and ``quic+tcp://``):

* one QUIC connection per client, TLS 1.3, ALPN ``pi0remote/1``;
* the client opens one bidirectional stream and carries ordinary pi0remote frames on it
  (``u32 length || message``, :mod:`pi0remote.protocol`): HELLO → METADATA, then INFER/RESET exchanges;
* ``quic://`` sends the QUIC datagrams over UDP; ``quic+tcp://`` carries each QUIC datagram as
  ``u32 length || datagram`` on one TCP connection (for TCP-only relays such as ``modal.forward``).
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import socket
import struct
from collections.abc import Callable, Iterable
from typing import Any

from . import quic_compat as compat
from .errors import ConnectError

ALPN = "pi0remote/1"

MIN_DATAGRAM = 1200
"""QUIC's smallest allowed datagram size, and aioquic's default."""
MAX_DATAGRAM = 16000
"""aioquic writes a packet's length in a 2-byte varint: datagrams must stay under 16 KiB."""
DEFAULT_UDP_DATAGRAM = 1200
"""Safe on any network path (QUIC guarantees 1200-byte datagrams get through)."""
DEFAULT_TCP_DATAGRAM = 16000
"""quic+tcp: a TCP stream has no MTU, so the largest datagram aioquic supports is safe."""
UDP_BUFFER_BYTES = 4 * 1024 * 1024
"""Socket receive/send buffer asked for on UDP sockets (a 150 KB request is a burst of datagrams)."""
MAX_FRAMED_DATAGRAM = 65535
"""Largest datagram accepted in a quic+tcp frame (anything bigger is a framing error)."""
BURST_BYTES = 48000
"""The sync client sends a request in bursts of about this many bytes (three 16000-byte datagrams)."""
FLOW_WINDOW = 8 * 1024 * 1024
"""Initial QUIC flow-control windows (aioquic doubles them as they are used)."""

DATAGRAM_HEADER = struct.Struct("!I")


class TlsVerificationError(ConnectError):
    """The server's certificate did not verify (CA chain, host name, or pinned fingerprint)."""


# -- settings ----------------------------------------------------------------------------------------
def check_datagram_size(size: int | None, default: int) -> int:
    if size is None:
        return default
    size = int(size)
    if not MIN_DATAGRAM <= size <= MAX_DATAGRAM:
        raise ValueError(
            f"QUIC max datagram size must be within {MIN_DATAGRAM}..{MAX_DATAGRAM} bytes, got {size}"
        )
    return size


def set_udp_buffers(sock: socket.socket, size: int = UDP_BUFFER_BYTES) -> int:
    """Ask for ``size``-byte receive and send buffers; returns the receive buffer the kernel granted.

    Linux caps the request at ``net.core.rmem_max`` unless the process may use SO_RCVBUFFORCE, and
    reports twice the usable size; the returned figure is what ``getsockopt`` says.
    """
    for opt, force in (
        (socket.SO_RCVBUF, getattr(socket, "SO_RCVBUFFORCE", None)),
        (socket.SO_SNDBUF, getattr(socket, "SO_SNDBUFFORCE", None)),
    ):
        try:
            if force is not None:
                sock.setsockopt(socket.SOL_SOCKET, force, size)
            else:
                raise OSError
        except OSError:
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, size)
            except OSError:
                pass
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


# -- certificates ------------------------------------------------------------------------------------
def normalize_fingerprint(value: str) -> str:
    """``sha256:AB:CD...`` / ``abcd...`` → lowercase hex without separators."""
    text = value.strip().lower()
    if text.startswith("sha256:"):
        text = text[len("sha256:") :]
    text = text.replace(":", "").replace(" ", "")
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise ValueError(f"quic_fingerprint must be a SHA-256 hex digest (64 hex digits), got {value!r}")
    return text


def fingerprint(certificate: Any) -> str:
    """SHA-256 hex digest of a certificate's DER encoding (a ``cryptography`` x509 certificate)."""
    from cryptography.hazmat.primitives.serialization import Encoding

    return hashlib.sha256(certificate.public_bytes(Encoding.DER)).hexdigest()


def generate_self_signed(hostnames: Iterable[str] = ()) -> tuple[Any, Any]:
    """A fresh ECDSA P-256 key and a self-signed certificate for ``localhost`` and ``hostnames``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for name in ["localhost", "127.0.0.1", "::1", *hostnames]:
        if not name or name in seen or name in ("0.0.0.0", "::"):
            continue
        seen.add(name)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pi0remote self-signed")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def load_cert_and_key(certfile: str, keyfile: str | None) -> tuple[Any, list[Any], Any]:
    """PEM certificate (chain) and key files → (certificate, chain, private key)."""
    from aioquic.quic.configuration import QuicConfiguration

    tmp = QuicConfiguration(is_client=False)
    tmp.load_cert_chain(certfile, keyfile)
    if tmp.private_key is None:
        raise ValueError(f"no private key in {keyfile or certfile}; pass --key")
    return tmp.certificate, list(tmp.certificate_chain), tmp.private_key


# -- datagram-over-TCP framing -------------------------------------------------------------------
def frame_datagrams(datagrams: Iterable[bytes]) -> bytes:
    """``u32 length || datagram`` for each datagram, joined for one write."""
    parts: list[bytes] = []
    for data in datagrams:
        parts.append(DATAGRAM_HEADER.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


class DatagramSplitter:
    """Splits a TCP byte stream into framed datagrams: the project's one length framer
    (:class:`pi0remote.protocol.FrameDecoder`) with the datagram size limit.

    ``feed(chunk)`` returns the complete datagrams (``bytes``, as aioquic wants them); a partial frame is
    kept for the next chunk. A frame of 0 bytes or over 64 KiB raises :class:`ProtocolError`: the stream
    cannot be resynchronised and must be closed.
    """

    def __init__(self, max_size: int = MAX_FRAMED_DATAGRAM) -> None:
        from .protocol import FrameDecoder

        self.max_size = max_size
        self._decoder = FrameDecoder(max_size)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        decoder = self._decoder
        decoder.feed(data)
        return [bytes(d) for d in decoder.messages()] if decoder.has_message else []

    @property
    def mid_frame(self) -> bool:
        return self._decoder.mid_frame


def ack_with_next_packet(quic: Any) -> None:
    """Put the pending ACK into the next packet instead of its own packet up to 1 ms later.

    Called when a request or reply is about to be sent: the ACK rides along for free, and the peer
    neither has to take in a separate ACK-only datagram nor keep our data in flight meanwhile.
    """
    compat.ack_now(quic)


# -- sending in bursts ------------------------------------------------------------------------------
def enable_bursts(quic: Any) -> bool:
    return compat.enable_bursts(quic)


def send_in_bursts(
    quic: Any, now: float, send: Callable[[list[tuple[bytes, Any]]], None], burst: int
) -> None:
    """Send what aioquic has ready, each burst of about ``burst`` bytes as soon as it is built (0: all at once).

    A 150 KB request takes the sender ~300 µs of Python to build and the receiver as long to take apart;
    sending it in bursts lets the receiver start on the first datagrams while the rest are being built.
    """
    if not burst or not compat.set_burst(quic, burst):
        datagrams = quic.datagrams_to_send(now=now)
        if datagrams:
            send(datagrams)
        return
    try:
        while datagrams := quic.datagrams_to_send(now=now):
            send(datagrams)
    finally:
        compat.set_burst(quic, None)


# -- asyncio driver ----------------------------------------------------------------------------------
class LoopDriver:
    """Drives one aioquic ``QuicConnection`` on an asyncio loop: events in, datagrams out, one timer.

    The owner feeds datagrams with :meth:`datagram_received` (or calls ``quic.receive_datagram`` for a
    batch and then :meth:`after_input`), and subclasses handle events in :meth:`handle_event`.
    ``send_datagrams`` gets every list of datagrams to put on the wire.
    """

    def __init__(self, quic: Any, send_datagrams: Callable[[list[tuple[bytes, Any]]], None]) -> None:
        self.quic = quic
        self.loop = asyncio.get_running_loop()
        self._send_datagrams = send_datagrams
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._in_events = False
        self._queued = False
        self.terminated = False

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.quic.receive_datagram(data, addr, now=self.loop.time())
        self.after_input()

    defer_idle_sends = False
    """Subclasses may set this: after input that needs no prompt answer, only re-arm the timer.

    aioquic delays ACKs by 1 ms anyway, so when the application queued nothing, none of our packets are
    in flight, and no handshake, close, probe or path response is pending, building packets now would
    produce nothing; the timer (ACK delay) sends what is due. Saves one empty packet-building pass per
    burst of received datagrams on a server taking in a large request.
    """

    def after_input(self) -> None:
        self.process_events()
        if self.defer_idle_sends and not self._queued and self._nothing_due():
            self._arm_timer()
        else:
            self.transmit()

    def _nothing_due(self) -> bool:
        return compat.nothing_due(self.quic, self.loop.time())

    def process_events(self) -> None:
        self._in_events = True
        try:
            while (event := self.quic.next_event()) is not None:
                self.handle_event(event)
        finally:
            self._in_events = False

    def handle_event(self, event: Any) -> None:  # pragma: no cover - overridden
        pass

    def transmit(self) -> None:
        """Send what aioquic has ready and re-arm the timer (a no-op while events are being handled)."""
        if self._in_events:
            self._queued = True
            return
        self._queued = False
        datagrams = self.quic.datagrams_to_send(now=self.loop.time())
        if datagrams:
            self._send_datagrams(datagrams)
        self._arm_timer()

    def _arm_timer(self) -> None:
        when = self.quic.get_timer()
        if when != self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._timer_at = when
            if when is not None and not self.terminated:
                self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.quic.handle_timer(now=self.loop.time())
        self.process_events()
        self.transmit()

    def stop_timer(self) -> None:
        self.terminated = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = None
