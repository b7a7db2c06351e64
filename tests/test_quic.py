"""QUIC specifics: certificates and pinning, lossy UDP, a breaking TCP relay, garbage datagrams, idle close.

The shared behaviour (errors, auth, timeouts, bad input, async twin) is in test_transports.py, which
runs over ``quic`` and ``quic+tcp`` too. Everything here is loopback with port 0.
"""

from __future__ import annotations

import datetime
import os
import random
import select
import socket
import threading
import time

import numpy as np
import pytest

pytest.importorskip("aioquic")

from conftest import ProbePolicy, expected_action, make_obs  # noqa: E402
from pi0remote import AuthenticationError, ConnectError, connect  # noqa: E402
from pi0remote.quic_common import TlsVerificationError, fingerprint  # noqa: E402
from pi0remote.server import BackgroundServer  # noqa: E402

pytestmark = pytest.mark.timeout(60)

QUIC = ["quic", "quic+tcp"]


def quic_server(**kwargs) -> BackgroundServer:
    kwargs.setdefault("http_port", None)
    kwargs.setdefault("tcp_port", None)
    kwargs.setdefault("quic_port", 0)
    kwargs.setdefault("transports", ["quic", "quic+tcp"])
    kwargs.setdefault("quic_options", {"max_datagram_size": 16000})
    return BackgroundServer(ProbePolicy(), name="probe", **kwargs)


@pytest.fixture(scope="module")
def srv():
    with quic_server(idle_timeout=30) as server:
        yield server


def pin(server: BackgroundServer) -> str:
    return server.server.core.metadata()["quic_fingerprint"]


def n_connections(server: BackgroundServer) -> tuple[int, int]:
    """Live (UDP, TCP) QUIC connections on the server, counted on its loop."""

    def count() -> tuple[int, int]:
        s = server.server
        udp = len(s.quic_listener.connections) if getattr(s, "quic_listener", None) else 0
        tcp = len(getattr(s, "quic_tcp_connections", ()))
        return udp, tcp

    return server.call(count)


def check(client, seed: int) -> None:
    obs = make_obs(seed)
    reply = client.infer(obs)
    np.testing.assert_array_equal(reply["action"], expected_action(obs["state"]))
    assert reply["cam_sum"] == int(obs["cam_high"].sum(dtype=np.int64))


# -- round trips and settings ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "transport,size",
    [("quic", None), ("quic", 9000), ("quic", 16000), ("quic+tcp", None), ("quic+tcp", 1200)],
)
def test_round_trips_are_exact(srv, transport: str, size: int | None) -> None:
    opts = {"quic_max_datagram": size} if size else {}
    with connect(srv.url(transport), quic_fingerprint=pin(srv), **opts) as client:
        assert client.metadata["quic_fingerprint"] == pin(srv)
        for seed in range(4):
            check(client, seed)
        client.reset()


def test_datagram_size_is_validated(srv) -> None:
    for bad in (1000, 40000):
        with pytest.raises(ValueError, match="datagram size"):
            connect(srv.url("quic"), quic_fingerprint=pin(srv), quic_max_datagram=bad)


def test_urls_share_one_port_number(srv) -> None:
    assert srv.url("quic").rsplit(":", 1)[1] == srv.url("quic+tcp").rsplit(":", 1)[1]


def test_datagram_framing_over_tcp_survives_any_chunking() -> None:
    from pi0remote.errors import ProtocolError
    from pi0remote.quic_common import DatagramSplitter, frame_datagrams

    rng = random.Random(5)
    datagrams = [os.urandom(rng.randint(1, 16000)) for _ in range(60)]
    stream = frame_datagrams(datagrams)
    for trial in range(20):
        splitter, out, pos = DatagramSplitter(), [], 0
        while pos < len(stream):
            n = rng.choice([1, 3, 4, 5, 700, 16004, 40000])
            chunk = stream[pos : pos + n]
            out += splitter.feed(chunk if trial % 2 else bytearray(chunk))
            pos += n
        assert out == datagrams and all(type(d) is bytes for d in out) and not splitter.mid_frame
    for bad in (b"\0\0\0\0", b"\x00\x01\x00\x01"):  # empty, and over 64 KiB
        with pytest.raises(ProtocolError):
            DatagramSplitter().feed(bad + b"x")


# -- certificates ----------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", QUIC)
def test_pinned_fingerprint_accepted_in_any_spelling(srv, transport: str) -> None:
    fp = pin(srv)
    colons = "sha256:" + ":".join(fp[i : i + 2] for i in range(0, 64, 2)).upper()
    for spelling in (fp, colons):
        with connect(srv.url(transport), quic_fingerprint=spelling) as client:
            check(client, 1)


@pytest.mark.parametrize("transport", QUIC)
def test_wrong_pin_and_unverified_self_signed_are_refused(srv, transport: str) -> None:
    t0 = time.perf_counter()
    with pytest.raises(TlsVerificationError, match="not the pinned"):
        connect(srv.url(transport), quic_fingerprint="ab" * 32)
    with pytest.raises(TlsVerificationError, match="quic_fingerprint") as info:
        connect(srv.url(transport))  # default: CA chain, and this server is self-signed
    assert isinstance(info.value, ConnectError)
    assert time.perf_counter() - t0 < 5  # no retries on a certificate failure
    with connect(srv.url(transport), quic_insecure_skip_verify=True) as client:  # the named opt-in
        check(client, 2)


def _ca_and_server_cert(tmp_path) -> tuple[str, str, str]:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pi0remote test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return tuple(str(p) for p in paths)  # type: ignore[return-value]


def test_ca_chain_verification_with_given_cert(tmp_path) -> None:
    ca, cert, key = _ca_and_server_cert(tmp_path)
    with quic_server(cert=cert, key=key) as server:
        from cryptography import x509

        with open(cert, "rb") as f:
            assert pin(server) == fingerprint(x509.load_pem_x509_certificate(f.read()))
        for transport in QUIC:
            with connect(server.url(transport), quic_cafile=ca) as client:
                check(client, 3)
            with pytest.raises(TlsVerificationError):
                connect(server.url(transport))  # not in the default CA bundle


# -- auth ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", QUIC)
def test_token_on_and_off(srv, transport: str) -> None:
    with connect(srv.url(transport), quic_fingerprint=pin(srv), token="ignored-when-off") as client:
        check(client, 0)
    with quic_server(token="s3cret") as server:
        with connect(server.url(transport), quic_fingerprint=pin(server), token="s3cret") as client:
            check(client, 0)
        for token in (None, "wrong"):
            with pytest.raises(AuthenticationError):
                connect(server.url(transport), quic_fingerprint=pin(server), token=token, retries=0)


# -- a lossy UDP path ------------------------------------------------------------------------------
class LossyUdpRelay:
    """Forwards UDP between one client and ``target``, dropping, duplicating and reordering (seeded)."""

    def __init__(
        self, target: tuple[str, int], *, drop: float, dup: float, reorder: float, seed: int
    ) -> None:
        self.target = target
        self.rates = (drop, dup, reorder)
        self.rng = random.Random(seed)
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind(("127.0.0.1", 0))
        self.back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.back.bind(("127.0.0.1", 0))
        for s in (self.front, self.back):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.port = self.front.getsockname()[1]
        self.client: tuple[str, int] | None = None
        self.held: list[tuple[float, socket.socket, bytes, tuple[str, int]]] = []
        self.stats = {"forwarded": 0, "dropped": 0, "duplicated": 0, "reordered": 0}
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            ready, _, _ = select.select([self.front, self.back], [], [], 0.002)
            for s in ready:
                data, addr = s.recvfrom(65536)
                if s is self.front:
                    self.client = addr
                    self._forward(self.back, data, self.target)
                elif self.client is not None:
                    self._forward(self.front, data, self.client)
            now = time.monotonic()
            while self.held and (now - self.held[0][0] > 0.003 or not ready):
                _, out, data, dest = self.held.pop(0)
                out.sendto(data, dest)

    def _forward(self, out: socket.socket, data: bytes, dest: tuple[str, int]) -> None:
        drop, dup, reorder = self.rates
        r = self.rng.random()
        if r < drop:
            self.stats["dropped"] += 1
            return
        if r < drop + reorder:  # sent later, after the datagrams that follow it
            self.stats["reordered"] += 1
            self.held.append((time.monotonic(), out, data, dest))
            return
        out.sendto(data, dest)
        self.stats["forwarded"] += 1
        if r < drop + reorder + dup:
            self.stats["duplicated"] += 1
            out.sendto(data, dest)
        if self.held:  # release one held datagram behind this one
            _, hout, hdata, hdest = self.held.pop(0)
            hout.sendto(hdata, hdest)

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.front.close()
        self.back.close()


@pytest.mark.parametrize("size", [1200, 16000])
def test_lossy_udp_relay_still_gives_exact_results(srv, size: int) -> None:
    port = int(srv.url("quic").rsplit(":", 1)[1])
    relay = LossyUdpRelay(("127.0.0.1", port), drop=0.07, dup=0.05, reorder=0.07, seed=size)
    try:
        with connect(
            f"quic://127.0.0.1:{relay.port}", quic_fingerprint=pin(srv), quic_max_datagram=size, timeout=20
        ) as client:
            for seed in range(8):
                check(client, seed)
    finally:
        relay.close()
    assert relay.stats["dropped"] > 0 and relay.stats["duplicated"] > 0 and relay.stats["reordered"] > 0, (
        relay.stats
    )


# -- a TCP relay that breaks -----------------------------------------------------------------------
class TcpRelay:
    """Forwards TCP connections to ``target``; :meth:`break_all` cuts every live one."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.accepted = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self.listener.accept()
            except OSError:
                return
            b = socket.create_connection(self.target)
            for s in (a, b):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.pairs.append((a, b))
                self.accepted += 1
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()
            threading.Thread(target=self._pump, args=(b, a), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(262144):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def break_all(self) -> None:
        with self._lock:
            pairs, self.pairs = self.pairs, []
        for a, b in pairs:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self.break_all()
        self.listener.close()


def test_broken_tcp_relay_reconnects_on_next_call(srv) -> None:
    port = int(srv.url("quic+tcp").rsplit(":", 1)[1])
    relay = TcpRelay(("127.0.0.1", port))
    try:
        with connect(f"quic+tcp://127.0.0.1:{relay.port}", quic_fingerprint=pin(srv)) as client:
            check(client, 0)
            relay.break_all()
            time.sleep(0.05)
            check(client, 1)  # ConnectionLost inside; the client reconnects once and retries
            assert relay.accepted == 2
            check(client, 2)
        deadline = time.monotonic() + 5
        while n_connections(srv)[1] and time.monotonic() < deadline:
            time.sleep(0.05)  # the server forgets the QUIC connections of the cut relay links
        assert n_connections(srv)[1] == 0
    finally:
        relay.close()


def test_server_that_forgot_the_connection_is_detected_and_the_client_reconnects() -> None:
    """A crashed and restarted server drops the old connection's packets without a word (UDP has no RST)."""
    with quic_server() as server:
        with connect(server.url("quic"), quic_fingerprint=pin(server), timeout=10) as client:
            check(client, 0)

            def forget() -> None:
                listener = server.server.quic_listener
                for peer in list(listener.connections):
                    peer.stop_timer()
                listener.peers.clear()

            server.call(forget)
            t0 = time.perf_counter()
            check(client, 1)  # probe timeouts go unanswered → ConnectionLost inside → one reconnect
            assert time.perf_counter() - t0 < 3  # well before the 10 s request timeout


def test_async_client_over_a_breaking_relay_and_lossy_udp(srv) -> None:
    import asyncio

    from pi0remote import aconnect

    tcp_port = int(srv.url("quic+tcp").rsplit(":", 1)[1])
    relay = TcpRelay(("127.0.0.1", tcp_port))
    lossy = LossyUdpRelay(("127.0.0.1", tcp_port), drop=0.07, dup=0.05, reorder=0.07, seed=3)

    async def main() -> None:
        async with await aconnect(f"quic+tcp://127.0.0.1:{relay.port}", quic_fingerprint=pin(srv)) as client:
            for seed in range(2):
                obs = make_obs(seed)
                np.testing.assert_array_equal(
                    (await client.infer(obs))["action"], expected_action(obs["state"])
                )
                relay.break_all()
                await asyncio.sleep(0.05)
        assert relay.accepted == 2
        url = f"quic://127.0.0.1:{lossy.port}"
        async with await aconnect(
            url, quic_fingerprint=pin(srv), quic_max_datagram=16000, timeout=20
        ) as client:
            for seed in range(5):
                obs = make_obs(seed)
                np.testing.assert_array_equal(
                    (await client.infer(obs))["action"], expected_action(obs["state"])
                )

    try:
        asyncio.run(main())
    finally:
        relay.close()
        lossy.close()


# -- garbage -----------------------------------------------------------------------------------------
def test_garbage_does_not_disturb_a_live_client() -> None:
    with quic_server() as srv:
        _garbage_while_a_client_works(srv)


def _garbage_while_a_client_works(srv) -> None:
    port = int(srv.url("quic").rsplit(":", 1)[1])
    with connect(srv.url("quic"), quic_fingerprint=pin(srv)) as client:
        check(client, 0)
        before = n_connections(srv)
        rng = random.Random(7)
        junk = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for i in range(300):
                size = rng.choice([0, 1, 5, 40, 1200, 1500, 9000])
                data = bytes(rng.getrandbits(8) for _ in range(size))
                # every third: a well-formed QUIC v1 Initial header (new connection ID), random contents
                if i % 3 == 0:
                    body = os.urandom(1200)
                    data = bytes([0xC3, 0, 0, 0, 1, 8]) + os.urandom(8) + bytes([8]) + os.urandom(8)
                    data += bytes([0, 0x40 | (len(body) >> 8), len(body) & 0xFF]) + body
                junk.sendto(data, ("127.0.0.1", port))
                if i % 50 == 0:
                    check(client, i)
        finally:
            junk.close()
        with socket.create_connection(("127.0.0.1", port)) as tcp_junk:  # garbage on the quic+tcp side too
            tcp_junk.sendall(b"\xff\xff\xff\xff" + os.urandom(100))
            tcp_junk.settimeout(5)
            assert tcp_junk.recv(100) == b""  # that connection alone is dropped
        check(client, 1)
        assert n_connections(srv) == before == (1, 0)  # no state kept for garbage
        check(client, 2)


# -- idle ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", QUIC)
def test_idle_connections_close_and_the_client_reconnects(transport: str) -> None:
    with quic_server(idle_timeout=0.4) as server:
        with connect(server.url(transport), quic_fingerprint=pin(server)) as client:
            check(client, 0)
            assert sum(n_connections(server)) == 1
            deadline = time.monotonic() + 5
            while sum(n_connections(server)) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert sum(n_connections(server)) == 0
            check(client, 1)  # reconnects
            assert sum(n_connections(server)) == 1


# -- the CLI -----------------------------------------------------------------------------------------
def test_serve_prints_both_urls_and_the_fingerprint() -> None:
    from pi0remote.harness.procs import ServerProcess

    args = [
        "--policy",
        "zeros",
        "--http-port",
        "0",
        "--tcp-port",
        "0",
        "--quic-port",
        "0",
        "--transports",
        "tcp,quic,quic+tcp",  # --quic-port alone does not open QUIC when --transports leaves it out
    ]
    with ServerProcess(args, ready_timeout=60) as proc:
        printed = [line for line in proc.lines if line.startswith("quic fingerprint sha256:")]
        assert len(printed) == 1
        fp = printed[0].rsplit(":", 1)[1]
        assert proc.url("quic").rsplit(":", 1)[1] == proc.url("quic+tcp").rsplit(":", 1)[1]
        for transport in QUIC:
            with connect(proc.url(transport), quic_fingerprint=fp) as client:
                assert client.metadata["quic_fingerprint"] == fp
                assert client.infer(make_obs(0))["action"].shape == (50, 14)
