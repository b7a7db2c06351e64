"""Issue 16's attack table, row by row, against a real server subprocess on loopback.

Memory is read from the server's /proc/PID/status (VmRSS); a well-behaved client in another process
(:class:`~pi0remote.harness.attacks.Prober`, on 127.0.0.1 while attackers use 127.0.0.2) must see no
failures and no stall while each attack runs. Counts are modest here; ``benchmarks/attacks.py`` runs
the full table. In-process checks of the same bounds are in ``test_security_limits.py``.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from pi0remote import protocol
from pi0remote.harness import attacks as A

pytestmark = pytest.mark.timeout(120)

STALL_MS = 250.0
"""Loose bound on the prober's p99 in CI (2 shared cores); the 50 ms target is measured by benchmarks/attacks.py."""


@pytest.fixture(scope="module")
def srv():
    args = ["--policy", "pi0remote.harness.attacks:TrapPolicy", "--http-port", "0", "--tcp-port", "0"]
    args += ["--handshake-timeout", "2", "--write-stall-timeout", "1", "--policy-timeout", "0.5"]
    args += ["--max-connections-per-ip", "400"]
    with A.AttackServer(args, env={"PI0REMOTE_TOKEN": A.TOKEN}) as server:  # the token from the environment
        yield server


@pytest.fixture
def prober(srv):
    probe = A.Prober(srv.url("tcp"))
    yield probe
    if probe.proc.poll() is None:
        probe.proc.kill()


def _check_prober(result: dict) -> None:
    assert result["failures"] == 0, result["errors"]
    assert result["n"] > 0
    assert result["p99_ms"] < STALL_MS, result


def test_token_from_the_environment_is_required(srv) -> None:
    sock = A.attacker_socket(srv.addr("tcp"))
    sock.sendall(A.hello_frame(token="wrong"))
    kind, body = A.recv_frame(sock)
    assert kind == protocol.ERROR and body["type"] == "auth"
    sock.close()


def test_declared_frame_length_is_a_limit_not_an_allocation(srv, prober) -> None:
    base = srv.rss_mb()
    header = struct.pack("!I", 32 * 2**20)
    pre, _ = A.open_many(srv.addr("tcp"), 40, header)  # before authenticating
    post = []
    for _ in range(40):  # after authenticating
        sock = A.attacker_socket(srv.addr("tcp"))
        sock.sendall(A.hello_frame())
        A.recv_frame(sock)
        sock.sendall(header + b"\x03" + bytes(1000))
        post.append(sock)
    during = srv.rss_mb()
    A.close_all(pre + post)
    _check_prober(prober.stop())
    assert during - base < 40, f"RSS {base:.0f} -> {during:.0f} MB for 80 frames declaring 32 MiB each"


def test_idle_connections_cost_a_few_kb_and_meet_the_handshake_deadline(srv, prober) -> None:
    base = srv.rss_mb()
    socks, refused = A.open_many(srv.addr("tcp"), 300)
    during = srv.rss_mb()
    closed = A.count_closed(socks, wait=6.0)  # --handshake-timeout 2: none may stay without a HELLO
    A.close_all(socks)
    _check_prober(prober.stop())
    assert refused == 0
    assert (during - base) * 1024 / 300 < 40, f"{(during - base) * 1024 / 300:.1f} KB per idle connection"
    assert closed == 300


def test_jpeg_bomb_is_refused_from_its_header(srv, prober) -> None:
    from pi0remote import connect
    from pi0remote.errors import InvalidInputError
    from pi0remote.harness.obs import canonical_obs

    peak = A.PeakRss(srv.proc.pid)
    base = srv.rss_mb()
    with connect(srv.url("tcp"), token=A.TOKEN) as client:
        obs = canonical_obs()
        obs["cam_high"] = {"jpeg": A.bomb_jpeg()}
        for _ in range(20):
            with pytest.raises(InvalidInputError, match="JPEG"):
                client.infer(obs)
    grown = peak.stop() - base
    _check_prober(prober.stop())
    assert grown < 30, f"peak RSS grew {grown:.0f} MB"


def test_unauthenticated_uploads_are_refused_before_the_body(srv) -> None:
    addr = srv.addr("http")
    head = b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Length: 8388608\r\nExpect: 100-continue\r\n\r\n"
    reply = A.http_request(addr, head)
    assert reply.startswith(b"HTTP/1.1 401"), reply[:80]
    assert b"100 Continue" not in reply
    base = srv.rss_mb()
    socks = []
    for _ in range(12):  # 8 MiB each, no token: the server must not buffer them
        sock = A.attacker_socket(addr, timeout=0.5)
        sock.sendall(head.replace(b"Expect: 100-continue\r\n", b""))
        try:
            sock.sendall(bytes(8 * 2**20))
        except OSError:
            pass  # the server stopped reading and closed: what we want
        socks.append(sock)
    grown = srv.rss_mb() - base
    A.close_all(socks)
    assert grown < 30, f"RSS grew {grown:.0f} MB for 12 unauthenticated 8 MiB uploads"


def test_input_is_not_buffered_while_a_request_is_in_flight(srv) -> None:
    # (no prober: the request in flight holds the one policy thread, so others wait for it by design)
    from pi0remote import codec
    from pi0remote.harness.obs import canonical_obs

    obs = canonical_obs()
    obs["trap"], obs["hang_s"] = "hang", 0.45  # in flight for 0.45 s (under the 0.5 s policy deadline)
    body = codec.packb(obs)
    head = f"POST /infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {A.TOKEN}\r\n"
    head += f"Content-Length: {len(body)}\r\n\r\n"
    base = srv.rss_mb()
    sock = A.attacker_socket(srv.addr("http"), timeout=0.5)
    sock.sendall(head.encode() + body)
    sent = 0
    chunk = bytes(1 << 20)
    deadline = time.monotonic() + 0.3  # unbounded, loopback takes hundreds of MB in this time
    while sent < 256 * 2**20 and time.monotonic() < deadline:
        try:
            sent += sock.send(chunk)
        except OSError:
            break  # blocked (the server stopped reading) or closed
    grown = srv.rss_mb() - base
    sock.close()
    assert sent < 64 * 2**20, f"the server took {sent >> 20} MiB while its request was in flight"
    assert grown < 30, f"RSS grew {grown:.0f} MB"


def test_pipelined_websocket_requests_are_paused_not_buffered(srv, prober) -> None:
    from websockets.sync.client import connect as ws_connect

    from pi0remote.harness.obs import canonical_obs

    message = protocol.encode_message(protocol.INFER, canonical_obs())
    base = srv.rss_mb()
    peak = A.PeakRss(srv.proc.pid)
    headers = {"Authorization": f"Bearer {A.TOKEN}"}
    with ws_connect(srv.url("ws"), additional_headers=headers, max_size=None) as ws:
        ws.send(protocol.encode_message(protocol.HELLO, protocol.hello_body(A.TOKEN)))

        def flood() -> None:
            try:
                for _ in range(1000):
                    ws.send(message)
            except Exception:
                pass  # the server dropped us: what we want

        sender = threading.Thread(target=flood, daemon=True)
        sender.start()
        sender.join(20.0)  # served at the policy's pace, 8 at a time, or dropped: either way bounded
        finished = not sender.is_alive()
        ws.socket.close()
    grown = peak.stop() - base
    _check_prober(prober.stop())
    assert finished
    assert grown < 60, f"peak RSS grew {grown:.0f} MB"


def test_policy_timeout_marks_the_server_unhealthy_and_answers_clients(srv) -> None:
    from pi0remote import connect
    from pi0remote.errors import PolicyTimeout
    from pi0remote.harness.obs import canonical_obs

    obs = canonical_obs()
    hang = {**obs, "trap": "hang", "hang_s": 2.0}
    with connect(srv.url("tcp"), token=A.TOKEN, timeout=10) as client:
        t0 = time.monotonic()
        with pytest.raises(PolicyTimeout):
            client.infer(hang)
        assert time.monotonic() - t0 < 1.8  # answered at the 0.5 s deadline, not when the call returned
        health = A.http_request(
            srv.addr("http"), b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert health.startswith(b"HTTP/1.1 503") and b"stuck" in health
        with pytest.raises(PolicyTimeout):  # others fail fast while it is stuck
            client.infer(obs)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the stuck call returns after 2 s; then all is well again
            health = A.http_request(srv.addr("http"), b"GET /healthz HTTP/1.0\r\n\r\n")
            if health.startswith(b"HTTP/1.1 200"):
                break
            time.sleep(0.1)
        assert health.startswith(b"HTTP/1.1 200")
        assert client.infer(obs)["action"].shape == (50, 14)


def test_fd_limit_refuses_cleanly_and_logs_once() -> None:
    args = ["--policy", "zeros", "--http-port", "0", "--tcp-port", "0", "--max-connections-per-ip", "1000"]
    with A.AttackServer(args, nofile=160) as server:
        probe = A.Prober(server.url("tcp"), token=None)
        socks, refused = A.open_many(server.addr("tcp"), 300)
        closed = A.count_closed(socks, wait=2.0)  # over the bound: closed at once, not left hanging
        A.close_all(socks)
        result = probe.stop()
        with socket.create_connection(server.addr("tcp"), timeout=5):
            pass
        logs = list(server.lines)
    _check_prober(result)
    assert closed + refused >= 300 - (160 - 128) - 1  # the prober holds one
    assert not any("Traceback" in line for line in logs)
    assert sum("refusing connections" in line for line in logs) <= 2


def test_sigterm_exits_promptly_while_the_policy_hangs() -> None:
    from pi0remote import connect
    from pi0remote.harness.obs import canonical_obs

    args = ["--policy", "pi0remote.harness.attacks:TrapPolicy", "--http-port", "0", "--tcp-port", "0"]
    with A.AttackServer(args + ["--policy-timeout", "0"]) as server:
        client = connect(server.url("tcp"), timeout=60)
        threading.Thread(
            target=lambda: _swallow(client.infer, {**canonical_obs(), "trap": "hang", "hang_s": 30.0}),
            daemon=True,
        ).start()
        assert server.wait_for_line("trap hang")
        took = server.stop(timeout=15)
        assert server.proc.returncode is not None
    assert took < 5.0, f"SIGTERM took {took:.1f} s"


def _swallow(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:
        pass
