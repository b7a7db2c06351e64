"""WAN emulation proxy: spec parsing, and accuracy of delay and rate on loopback (TCP and UDP)."""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections.abc import Iterator

import pytest

from pi0remote.harness.netem import NetemGroup, NetemProxy, NetemSpec


# -- spec ---------------------------------------------------------------------------------------
def test_parse_full_spec() -> None:
    spec = NetemSpec.parse("delay=150ms,jitter=10ms,loss=0.1%,rate=50mbit")
    assert spec.delay_ms == 150 and spec.jitter_ms == 10
    assert spec.loss == pytest.approx(0.001)
    assert spec.rate_bps == pytest.approx(50e6)
    assert spec.effective_rto_ms == pytest.approx(340.0)  # 2 * 150 + 4 * 10
    assert NetemSpec.parse(str(spec)) == spec


@pytest.mark.parametrize(
    "text,field,value",
    [
        ("delay=0.2s", "delay_ms", 200.0),
        ("delay=500us", "delay_ms", 0.5),
        ("delay=30", "delay_ms", 30.0),
        ("rate=1gbit", "rate_bps", 1e9),
        ("rate=800kbit", "rate_bps", 8e5),
        ("rate=2mbps", "rate_bps", 16e6),
        ("loss=0.05", "loss", 0.05),
        ("rto=50ms", "rto_ms", 50.0),
    ],
)
def test_parse_units(text: str, field: str, value: float) -> None:
    assert getattr(NetemSpec.parse(text), field) == pytest.approx(value)


@pytest.mark.parametrize(
    "bad", ["delay", "delay=fast", "rate=5furlongs", "loss=200%", "colour=red", "loss=3ms"]
)
def test_parse_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        NetemSpec.parse(bad)


def test_url_for_keeps_scheme_and_path() -> None:
    with NetemProxy.for_url("ws://127.0.0.1:9/ws", "delay=1ms") as proxy:
        assert proxy.url_for("ws://127.0.0.1:9/ws") == f"ws://127.0.0.1:{proxy.port}/ws"
    group = NetemGroup(
        ["http://127.0.0.1:9", "ws://127.0.0.1:9/ws", "tcp://127.0.0.1:10", "local://zeros"], ""
    )
    assert len(group.proxies) == 2
    with group:
        assert group.url_for("local://zeros") == "local://zeros"
        assert group.url_for("ws://127.0.0.1:9/ws").endswith("/ws")


# -- loopback servers -----------------------------------------------------------------------------
@pytest.fixture
def tcp_echo() -> Iterator[int]:
    """A TCP server that echoes every byte."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    stop = threading.Event()

    def handle(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while True:
                data = conn.recv(1 << 16)
                if not data:
                    return
                conn.sendall(data)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield srv.getsockname()[1]
    stop.set()
    srv.close()


@pytest.fixture
def tcp_sink() -> Iterator[tuple[int, list[float]]]:
    """A TCP server that reads a 8-byte length, then that many bytes, and answers one byte."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    done_at: list[float] = []

    def run() -> None:
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        with conn:
            head = b""
            while len(head) < 8:
                head += conn.recv(8 - len(head))
            left = int.from_bytes(head, "big")
            while left:
                left -= len(conn.recv(min(left, 1 << 20)))
            done_at.append(time.perf_counter())
            conn.sendall(b"!")

    threading.Thread(target=run, daemon=True).start()
    yield srv.getsockname()[1], done_at
    srv.close()


@pytest.fixture
def udp_echo() -> Iterator[int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                data, addr = sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            sock.sendto(data, addr)

    threading.Thread(target=run, daemon=True).start()
    yield sock.getsockname()[1]
    stop.set()
    sock.close()


def _tcp_round_trips(port: int, n: int, size: int = 200) -> list[float]:
    msg = b"x" * size
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            s.sendall(msg)
            got = 0
            while got < size:
                chunk = s.recv(size - got)
                assert chunk, "connection closed"
                got += len(chunk)
            out.append((time.perf_counter() - t0) * 1000.0)
    return out


def _udp_round_trips(port: int, n: int) -> list[float]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2.0)
        s.connect(("127.0.0.1", port))
        out = []
        for i in range(n):
            t0 = time.perf_counter()
            s.send(i.to_bytes(4, "big") * 50)
            data = s.recv(65536)
            assert int.from_bytes(data[:4], "big") == i
            out.append((time.perf_counter() - t0) * 1000.0)
    return out


def _trimmed_mean(xs: list[float], cut: float = 0.05) -> float:
    xs = sorted(xs)
    k = int(len(xs) * cut)
    return statistics.fmean(xs[k : len(xs) - k])


# -- accuracy -------------------------------------------------------------------------------------
DELAY_MS = 25.0
CALLS = 200


def test_tcp_delay_within_10_percent(tcp_echo: int) -> None:
    with NetemProxy("127.0.0.1", tcp_echo, "") as plain:
        base = _tcp_round_trips(plain.port, 50)
    with NetemProxy("127.0.0.1", tcp_echo, f"delay={DELAY_MS:g}ms") as proxy:
        delayed = _tcp_round_trips(proxy.port, CALLS)
        assert proxy.stats()["up"]["bytes"] == CALLS * 200
    asked = 2 * DELAY_MS  # one-way delay in each direction
    added_median = statistics.median(delayed) - statistics.median(base)
    added_mean = _trimmed_mean(delayed) - _trimmed_mean(base)
    assert abs(added_median - asked) <= 0.1 * asked, (added_median, asked)
    assert abs(added_mean - asked) <= 0.1 * asked, (added_mean, asked)
    assert min(delayed) >= asked  # never early


def test_udp_delay_within_10_percent(udp_echo: int) -> None:
    with NetemProxy("127.0.0.1", udp_echo, f"delay={DELAY_MS:g}ms") as proxy:
        delayed = _udp_round_trips(proxy.port, CALLS)
    asked = 2 * DELAY_MS
    assert abs(statistics.median(delayed) - asked) <= 0.1 * asked
    assert abs(_trimmed_mean(delayed) - asked) <= 0.1 * asked
    assert min(delayed) >= asked


def test_jitter_spreads_but_keeps_mean(tcp_echo: int) -> None:
    with NetemProxy("127.0.0.1", tcp_echo, "delay=20ms,jitter=8ms,seed=1") as proxy:
        rtts = _tcp_round_trips(proxy.port, 100)
    assert abs(statistics.fmean(rtts) - 40.0) <= 4.0
    assert max(rtts) - min(rtts) > 10.0  # two uniform ±8 ms draws per call


@pytest.mark.parametrize("rate_mbit", [20.0, 80.0])
def test_tcp_rate_within_10_percent(tcp_sink: tuple[int, list[float]], rate_mbit: float) -> None:
    port, done_at = tcp_sink
    size = int(rate_mbit * 1e6 / 8 * 0.6)  # 0.6 s worth of bytes
    with NetemProxy("127.0.0.1", port, f"rate={rate_mbit:g}mbit") as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as s:
            t0 = time.perf_counter()
            s.sendall(size.to_bytes(8, "big") + bytes(size))
            assert s.recv(1) == b"!"
    measured_mbit = (size + 8) * 8 / (done_at[0] - t0) / 1e6
    assert abs(measured_mbit - rate_mbit) <= 0.1 * rate_mbit, measured_mbit


def test_udp_rate_within_10_percent(udp_echo: int) -> None:
    rate_mbit, count, size = 8.0, 400, 1000  # 0.4 s of serialization each way, pipelined
    with NetemProxy("127.0.0.1", udp_echo, f"rate={rate_mbit:g}mbit") as proxy:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
            s.settimeout(3.0)
            s.connect(("127.0.0.1", proxy.port))
            t0 = time.perf_counter()
            for i in range(count):
                s.send(bytes(size))
                if i % 10 == 9:
                    time.sleep(0.001)  # don't overflow the proxy's socket buffer (that would be real loss)
            for _ in range(count):
                s.recv(65536)
            last = time.perf_counter()
    # The uplink is busy count * size * 8 / rate; the last reply needs one more datagram's time down.
    measured_mbit = count * size * 8 / (last - t0) / 1e6
    assert abs(measured_mbit - rate_mbit) <= 0.1 * rate_mbit, measured_mbit


def test_udp_loss_drops_datagrams(udp_echo: int) -> None:
    with NetemProxy("127.0.0.1", udp_echo, "loss=30%,seed=7") as proxy:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.5)
            s.connect(("127.0.0.1", proxy.port))
            for i in range(400):
                s.send(i.to_bytes(4, "big"))
                if i % 10 == 9:
                    time.sleep(0.001)
            got = set()
            try:
                while True:
                    got.add(int.from_bytes(s.recv(64), "big"))
            except TimeoutError:
                pass
        stats = proxy.stats()
    # Each round trip survives with probability 0.7 * 0.7 = 0.49.
    assert 0.39 <= len(got) / 400 <= 0.59, len(got)
    assert stats["up"]["lost"] > 0 and stats["down"]["lost"] > 0


def test_tcp_loss_delays_but_never_corrupts(tcp_echo: int) -> None:
    with NetemProxy("127.0.0.1", tcp_echo, "loss=50%,rto=30ms,seed=3") as proxy:
        size = 20_000  # 14 segments each way
        payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
        with socket.create_connection(("127.0.0.1", proxy.port)) as s:
            t0 = time.perf_counter()
            s.sendall(payload)
            buf = bytearray()
            while len(buf) < size:
                buf += s.recv(1 << 16)
            elapsed = (time.perf_counter() - t0) * 1000.0
        assert bytes(buf) == payload
        assert proxy.stats()["up"]["lost"] > 0
    assert elapsed >= 30.0  # at least one retransmission timeout on the way
