"""Server bounds checked in process (real loopback sockets, a BackgroundServer): HTTP strictness, typed
decode errors, policy isolation, reply checks, connection and QUIC limits, JPEG checks, token sources."""

from __future__ import annotations

import random
import struct
import threading
import time

import pytest

from conftest import HAVE_QUIC
from pi0remote import connect, protocol
from pi0remote.errors import InvalidInputError, PolicyTimeout, ProtocolError, RemotePolicyError
from pi0remote.harness import attacks as A
from pi0remote.harness.obs import canonical_obs
from pi0remote.server import BackgroundServer, Limits, resolve_token
from pi0remote.server.http import _parse_head_carefully, parse_head

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def trap():
    limits = {"policy_timeout": 0.4, "max_connections_per_ip": 20, "max_connections": 40}
    with BackgroundServer(A.TrapPolicy(), token=A.TOKEN, limits=limits, max_message_bytes=2**20) as srv:
        yield srv


def _addr(srv, scheme: str) -> tuple[str, int]:
    host, _, port = srv.url(scheme).split("://", 1)[1].split("/", 1)[0].rpartition(":")
    return host, int(port)


def _raw(srv, data: bytes) -> bytes:
    return A.http_request(_addr(srv, "http"), data, read_timeout=2.0)


# -- HTTP ---------------------------------------------------------------------------------------------
AUTH = f"Authorization: Bearer {A.TOKEN}\r\n".encode()


@pytest.mark.parametrize(
    "head, status",
    [
        (b"POST /infer HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 5\r\n" + AUTH + b"\r\nabc", b"400"),
        (b"POST /infer HTTP/1.1\r\nContent-Length: +150690\r\n" + AUTH + b"\r\n", b"400"),
        (b"POST /infer HTTP/1.1\r\nContent-Length: 0x10\r\n" + AUTH + b"\r\n", b"400"),
        (b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n", b"431"),
        (b"HEAD /healthz HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody", b"400"),
        (b"GET /healthz HTTP/1.1\r\nBad Name: x\r\n\r\n", b"400"),
        (b"GET /healthz HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", b"400"),
        (b"GET /healthz HTTP/1.1\r\nX: a\nY: b\r\n\r\n", b"400"),
        (b"GET /healthz HTTP/2.0\r\n\r\n", b"400"),
        (b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nno colon here\r\n\r\n", b"400"),
        (b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" + AUTH + b"\r\n", b"400"),
    ],
)
def test_malformed_http_is_refused(trap, head: bytes, status: bytes) -> None:
    reply = _raw(trap, head)
    assert reply.startswith(b"HTTP/1.1 " + status), reply[:120]


def test_http10_closes_unless_keep_alive_and_head_has_no_body(trap) -> None:
    with A.attacker_socket(_addr(trap, "http")) as sock:
        sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):  # returns b"" when the server closes: it must
            data += chunk
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b'{"status": "ok"}')
    with A.attacker_socket(_addr(trap, "http")) as sock:
        sock.sendall(b"HEAD /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        head = sock.recv(4096)
        sock.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")  # still open: keep-alive was asked for
        again = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n"), head  # no body after HEAD
    assert b"Content-Length: 16" in head
    assert again.startswith(b"HTTP/1.1 200")


def test_token_is_checked_before_100_continue(trap) -> None:
    head = b"POST /infer HTTP/1.1\r\nContent-Length: 1000000\r\nExpect: 100-continue\r\n\r\n"
    reply = _raw(trap, head)
    assert reply.startswith(b"HTTP/1.1 401") and b"100 Continue" not in reply
    good = _raw(trap, head.replace(b"\r\n\r\n", b"\r\n" + AUTH + b"\r\n"))
    assert good.startswith(b"HTTP/1.1 100 Continue")


def test_parse_head_keeps_well_formed_requests() -> None:
    req = parse_head(b"POST /infer?x=1 HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nx-a: 2\r\nContent-Length: 7\r\n\r\n")
    assert (req.method, req.path, req.version) == ("POST", "/infer", "HTTP/1.1")
    assert req.headers["x-a"] == "1, 2" and req.headers["content-length"] == "7"


_GOOD_LINES = [
    b"Host: a",
    b"Accept: application/msgpack",
    b"Content-Length: 7",
    b"X-A: 1",
    b"x-a:  2 \t",
    b"E:",
]
_MUTATIONS = [b" ", b"\t", b"\r", b"\n", b"\x00", b"\x7f", b"\xff", b":", b"", b"(", b"\r\n", b"HTTP/2.0"]


def _parsed(parse, head: bytes) -> tuple:
    try:
        r = parse(head)
    except ProtocolError as exc:
        return ("refused", str(exc))
    return (r.method, r.path, r.headers, r.version, r.head)


_REQUEST_LINES = [b"POST /infer?x=1 HTTP/1.1", b"GET /healthz HTTP/1.0", b"HEAD / HTTP/1.1"]


def test_parse_head_fast_path_agrees_with_the_careful_parser() -> None:
    """The one-pattern fast path accepts exactly what the line-by-line parser accepts, with the same result:
    well-formed heads with up to two bytes patched (seeded, so a failure reproduces)."""
    rng = random.Random(17)
    accepted = 0
    for _ in range(4000):
        lines = [rng.choice(_REQUEST_LINES), *rng.sample(_GOOD_LINES, rng.randint(0, len(_GOOD_LINES)))]
        head = bytearray(b"\r\n".join(lines) + b"\r\n\r\n")
        for _ in range(rng.choice([0, 0, 1, 2])):
            pos = rng.randrange(len(head))
            head[pos : pos + rng.randint(0, 2)] = rng.choice(_MUTATIONS)
        fast, careful = _parsed(parse_head, bytes(head)), _parsed(_parse_head_carefully, bytes(head))
        assert fast == careful, bytes(head)
        accepted += fast[0] != "refused"
    assert 1000 < accepted < 3900  # both kinds were tried


def test_parse_head_fast_path_refuses_what_the_careful_parser_refuses() -> None:
    for head in (
        b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n",  # a single-use header twice
        b"GET / HTTP/1.1\r\nX: a\nY: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
        b"GET /a\tb HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: \x01\r\n\r\n",
        b"GET  / HTTP/1.1\r\n\r\n",
    ):
        with pytest.raises(ProtocolError):
            parse_head(head)
    slow = b"GET / HTTP/1.1\r\n" + b"X: a\r\n" * 2000 + b"\x00\r\n\r\n"  # fails at its end
    with pytest.raises(ProtocolError, match="control character"):
        parse_head(slow)


# -- typed decode errors ------------------------------------------------------------------------------
def _tcp_exchange(srv, *messages: bytes) -> list[tuple[int, object]]:
    with A.attacker_socket(_addr(srv, "tcp")) as sock:
        out = []
        for m in messages:
            sock.sendall(protocol.frame_header(len(m)) + m)
            out.append(A.recv_frame(sock))
        return out


def test_hello_token_that_is_not_a_string_is_an_auth_error(trap) -> None:
    for token in (12345, [1, 2], {"a": 1}, None, b"\xff\xfe"):
        body = {"protocol": 1, "token": token}
        ((kind, reply),) = _tcp_exchange(trap, protocol.encode_message(protocol.HELLO, body))
        assert kind == protocol.ERROR and reply["type"] == "auth", reply


def test_bad_dtype_strings_are_codec_errors(trap) -> None:
    hello = protocol.encode_message(protocol.HELLO, protocol.hello_body(A.TOKEN))
    for dtype in (",", "(", "[", "i4,i4", "O", "U4", "M8", 7, ["f4"]):
        array = {b"nd": True, b"type": dtype, b"kind": b"", b"shape": [1], b"data": b"\0" * 4}
        body = protocol.encode_message(protocol.INFER, {"state": array})
        (_, _), (kind, reply) = _tcp_exchange(trap, hello, body)
        assert kind == protocol.ERROR and reply["type"] == "codec", (dtype, reply)


def test_openpi_image_values_above_255_are_invalid_input() -> None:
    from pi0remote.policies import CANONICAL_INPUT_SPEC
    from pi0remote.server.openpi_ws import from_openpi_obs

    with pytest.raises(InvalidInputError):
        from_openpi_obs({"images": {"cam_high": [[[300]]]}, "state": [0.0] * 14}, CANONICAL_INPUT_SPEC)


# -- policy isolation and reply checks ----------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["tcp", "http", "ws"])
@pytest.mark.parametrize("what", ["exit", "interrupt", "string", "shape", "huge"])
def test_policy_bugs_are_errors_of_that_call(trap, scheme: str, what: str) -> None:
    obs = canonical_obs()
    with connect(trap.url(scheme), token=A.TOKEN) as client:
        with pytest.raises(RemotePolicyError) as info:
            client.infer({**obs, "trap": what, "huge_bytes": 2 * 2**20})
        assert info.value.code == "policy"
        assert client.infer(obs)["action"].shape == (50, 14)  # same connection, still served


def test_policy_timeout_in_process(trap) -> None:
    obs = canonical_obs()
    with connect(trap.url("tcp"), token=A.TOKEN, timeout=10) as client:
        with pytest.raises(PolicyTimeout):
            client.infer({**obs, "trap": "hang", "hang_s": 1.0})
        assert trap.server.core.health() == (503, "stuck")
        deadline = time.monotonic() + 5
        while trap.server.core.runner.stuck and time.monotonic() < deadline:
            time.sleep(0.05)
        assert trap.server.core.health() == (200, "ok")
        assert client.infer(obs)["action"].shape == (50, 14)


def test_policy_deadline_is_each_calls_own() -> None:
    """One timer serves back-to-back calls: a call that outlives the previous call's deadline but not its own
    is served; a call that outlives its own is answered with PolicyTimeout at its deadline."""
    import asyncio

    import numpy as np

    from pi0remote.server.runner import PolicyRunner

    class Working:
        def infer(self, obs):
            time.sleep(obs["work_s"])  # the policy's own work
            return {"action": np.zeros((50, 14), np.float32)}

    runner = PolicyRunner(Working(), timeout=0.6)

    async def calls() -> list:
        out = []
        for work_s in (0.3, 0.45, 1.2):  # the 0.45 s call runs past the first call's deadline (0.6 s)
            t0 = time.perf_counter()
            result, _ = await runner.submit({"work_s": work_s})
            out.append((result, time.perf_counter() - t0))
        return out

    (first, _), (second, _), (third, waited) = asyncio.run(calls())
    assert first["action"].shape == (50, 14) and second["action"].shape == (50, 14)
    assert isinstance(third, PolicyTimeout)
    assert 0.55 < waited < 1.1  # at its own deadline, not when it returned (1.2 s)
    runner.close()


# -- connections ---------------------------------------------------------------------------------------
def test_per_address_and_total_connection_limits(trap) -> None:
    socks, _ = A.open_many(_addr(trap, "tcp"), 25)  # limit 20 from one address
    assert A.count_closed(socks, wait=1.0) == 5
    with connect(trap.url("tcp"), token=A.TOKEN) as client:  # 127.0.0.1: another address
        assert client.infer(canonical_obs())["action"].shape == (50, 14)
    A.close_all(socks)


def test_a_client_that_never_reads_its_replies_is_dropped() -> None:
    limits = {"write_stall_timeout": 0.5}
    with BackgroundServer(A.TrapPolicy(), token=A.TOKEN, limits=limits) as srv:
        message = protocol.encode_message(
            protocol.INFER, {**canonical_obs(), "trap": "huge", "huge_bytes": 2**18}
        )
        sock = A.attacker_socket(_addr(srv, "tcp"), timeout=0.5)
        sock.sendall(A.hello_frame())
        A.recv_frame(sock)
        try:
            for _ in range(200):  # 50 MB of replies that are never read
                sock.sendall(protocol.frame_header(len(message)) + message)
        except OSError:
            pass  # the server stopped reading, or dropped us
        deadline = time.monotonic() + 10
        while srv.call(lambda: len(srv.server.core.transports)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.call(lambda: len(srv.server.core.transports)) == 0
        sock.close()


def test_a_slow_reader_that_drains_is_kept() -> None:
    import socket

    limits = {"write_stall_timeout": 0.3}
    with BackgroundServer(A.TrapPolicy(), token=A.TOKEN, limits=limits) as srv:
        message = protocol.encode_message(
            protocol.INFER, {**canonical_obs(), "trap": "huge", "huge_bytes": 3 * 2**20}
        )
        sock = socket.socket()
        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVBUF, 32768
        )  # a small window: the server must wait for us
        sock.settimeout(5)
        sock.connect(_addr(srv, "tcp"))
        sock.sendall(A.hello_frame())
        A.recv_frame(sock)

        def small_send_buffer() -> None:  # so that the reply waits in the server's own buffer
            for transport in srv.server.core.transports:
                transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)

        srv.call(small_send_buffer)
        sock.sendall(protocol.frame_header(len(message)) + message)
        got = 0
        while got < 3 * 2**20:  # one 3 MiB reply read at ~1.3 MB/s: paused for seconds, but always draining
            chunk = sock.recv(65536)
            assert chunk, "the server dropped a client that was reading"
            got += len(chunk)
            time.sleep(0.05)  # pacing: this is the slow reader
        sock.close()


def test_openpi_listener_is_bounded_too() -> None:
    from websockets.sync.client import connect as ws_connect

    from pi0remote.server.openpi_ws import openpi_packb

    limits = {"max_connections_per_ip": 4}
    with BackgroundServer(A.TrapPolicy(), openpi_port=0, limits=limits) as srv:
        addr = _addr(srv, "openpi")
        socks, _ = A.open_many(addr, 6)
        assert A.count_closed(socks, wait=1.0) == 2
        A.close_all(socks)
        with ws_connect(f"ws://{addr[0]}:{addr[1]}") as ws:
            ws.recv(timeout=5)  # metadata
            ws.send(openpi_packb({"images": {"cam_high": [[[300]]]}, "state": [0.0] * 14}))
            assert "invalid_input" in ws.recv(timeout=5)


def test_preauth_byte_budget(trap) -> None:
    with A.attacker_socket(_addr(trap, "tcp")) as sock:
        sock.sendall(struct.pack("!I", 200_000) + bytes(100_000))  # 100 KB before any HELLO
        kind, body = A.recv_frame(sock)
    assert kind == protocol.ERROR and body["type"] == "auth"


def test_frame_decoder_commits_memory_as_data_arrives() -> None:
    dec = protocol.FrameDecoder(start_bytes=4096)
    dec.feed(struct.pack("!I", 32 * 2**20) + b"\x03")
    assert dec.buffered_bytes <= 4096
    dec.feed(bytes(100_000))
    assert 100_000 < dec.buffered_bytes <= 2 * 131072
    payload = bytes(range(256)) * 1000
    whole = protocol.frame_header(len(payload)) + payload
    dec2 = protocol.FrameDecoder(start_bytes=1000)
    for i in range(0, len(whole), 777):
        dec2.feed(whole[i : i + 777])
    assert bytes(dec2.pop()) == payload


# -- JPEG ----------------------------------------------------------------------------------------------
def test_jpeg_size_is_checked_before_decoding(monkeypatch) -> None:
    from pi0remote import jpeg
    from pi0remote.policies import ArraySpec

    calls: list[str] = []
    real = jpeg.decode_jpeg
    monkeypatch.setattr(jpeg, "decode_jpeg", lambda *a, **k: calls.append("x") or real(*a, **k))
    bomb = {"jpeg": A.bomb_jpeg()}
    assert jpeg.jpeg_size(bomb["jpeg"]) == (16000, 16000)
    spec = {"cam_high": ArraySpec("uint8", (3, 224, 224))}
    with pytest.raises(InvalidInputError, match="height is 16000"):
        jpeg.decode_jpeg_fields({"cam_high": dict(bomb)}, spec=spec)
    free = {"cam_high": ArraySpec("uint8", (3, -1, -1))}
    with pytest.raises(InvalidInputError, match="exceeds the limit"):
        jpeg.decode_jpeg_fields({"cam_high": dict(bomb)}, spec=free, max_pixels=10_000)
    with pytest.raises(InvalidInputError, match="decode to"):
        jpeg.decode_jpeg_fields({"a": dict(bomb), "b": dict(bomb)}, max_pixels=10**9, max_total_bytes=2**20)
    with pytest.raises(InvalidInputError):
        jpeg.decode_jpeg_fields({"cam_high": {"jpeg": b"\xff\xd8garbage"}})
    assert calls == []


def test_jpeg_is_decoded_off_the_event_loop(trap, monkeypatch) -> None:
    from pi0remote import jpeg

    threads: list[str] = []
    real = jpeg.decode_jpeg
    monkeypatch.setattr(
        jpeg, "decode_jpeg", lambda *a, **k: threads.append(threading.current_thread().name) or real(*a, **k)
    )
    obs = canonical_obs()
    with connect(trap.url("tcp"), token=A.TOKEN) as client:
        client.infer({**obs, "cam_high": {"jpeg": jpeg.encode_jpeg(obs["cam_high"])}})
    assert threads and all(name.startswith("pi0remote-decode") for name in threads), threads


# -- token sources ---------------------------------------------------------------------------------------
def test_resolve_token(tmp_path) -> None:
    path = tmp_path / "token"
    path.write_text("from-file\nignored\n")
    assert resolve_token("cli", None, {}) == "cli"
    assert resolve_token(None, str(path), {"PI0REMOTE_TOKEN": "env"}) == "from-file"
    assert resolve_token(None, None, {"PI0REMOTE_TOKEN": " env \n"}) == "env"
    assert resolve_token(None, None, {}) is None
    path.write_text("\n")
    for args in (("a", str(path), {}), (None, str(path), {}), (None, None, {"PI0REMOTE_TOKEN": ""})):
        with pytest.raises(ValueError):
            resolve_token(*args)


def test_limits_reject_unknown_names() -> None:
    assert Limits.from_options({"max_connections": 3}).max_connections == 3
    with pytest.raises(ValueError):
        Limits.from_options({"max_conections": 3})


# -- QUIC ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAVE_QUIC, reason="needs aioquic")
def test_quic_half_open_cap_retry_and_deadline() -> None:
    limits = {"quic_max_half_open": 24, "quic_retry_threshold": 8, "handshake_timeout": 1.0}
    with BackgroundServer(A.TrapPolicy(), quic_port=0, transports=["quic"], limits=limits) as srv:
        listener = srv.server.quic_listener
        A.quic_initials(_addr(srv, "quic"), 60)
        deadline = time.monotonic() + 5
        while listener.retries_sent == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(listener.half_open) <= 24
        assert listener.retries_sent > 0  # past the threshold new clients must prove their address
        fp = srv.server.core.metadata()["quic_fingerprint"]
        before = listener.retries_sent
        with connect(srv.url("quic"), quic_fingerprint=fp) as client:  # goes through a Retry
            assert client.infer(canonical_obs())["action"].shape == (50, 14)
        assert listener.retries_sent > before
        deadline = time.monotonic() + 8
        while srv.call(lambda: len(listener.half_open)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.call(lambda: len(listener.half_open)) == 0  # the handshake deadline cleared them


@pytest.mark.skipif(not HAVE_QUIC, reason="needs aioquic")
def test_quic_works_without_private_aioquic_access(monkeypatch) -> None:
    from pi0remote import quic_compat

    monkeypatch.setattr(quic_compat, "PRIVATE_OK", False)
    with BackgroundServer(A.TrapPolicy(), quic_port=0, transports=["quic", "quic+tcp"]) as srv:
        fp = srv.server.core.metadata()["quic_fingerprint"]
        for scheme in ("quic", "quic+tcp"):
            with connect(srv.url(scheme), quic_fingerprint=fp) as client:
                obs = canonical_obs()
                assert client.infer(obs)["action"].shape == (50, 14)
