"""Bad input at the byte level never takes the server down nor disturbs other clients."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest

from conftest import ProbePolicy, connect_to, expected_action, make_obs
from pi0remote import codec, protocol
from pi0remote.server import BackgroundServer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture()
def server():
    with BackgroundServer(ProbePolicy(), name="probe", http_port=0, tcp_port=0, idle_timeout=1.0) as srv:
        yield srv


def addr(srv, scheme: str) -> tuple[str, int]:
    host, port = srv.url(scheme).split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)
    return host, int(port)


def raw(srv, scheme: str = "tcp") -> socket.socket:
    sock = socket.create_connection(addr(srv, scheme), timeout=5)
    return sock


def read_frame(sock: socket.socket) -> tuple[int, object]:
    dec = protocol.FrameDecoder()
    while (msg := dec.pop()) is None:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        dec.feed(data)
    return protocol.decode_message(msg)


def send_frame(sock: socket.socket, message: bytes) -> None:
    sock.sendall(protocol.frame_header(len(message)) + message)


def hello(sock: socket.socket, **body) -> tuple[int, object]:
    send_frame(sock, protocol.encode_message(protocol.HELLO, {**protocol.hello_body(None), **body}))
    return read_frame(sock)


def assert_closed(sock: socket.socket, within: float = 5.0) -> None:
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass


def assert_healthy(srv) -> None:
    obs = make_obs(9)
    for transport in ("tcp", "ws", "http"):
        with connect_to(srv, transport) as client:
            np.testing.assert_array_equal(client.infer(obs)["action"], expected_action(obs["state"]))


def test_garbage_bytes_on_tcp(server) -> None:
    sock = raw(server)
    sock.sendall(b"\x00\x00\x00\x10" + b"\xc1" * 16)  # a well-framed message of garbage
    kind, body = read_frame(sock)
    assert kind == protocol.ERROR and body["type"] == "protocol"
    sock.sendall(b"GET / HTTP/1.1\r\n\r\n")  # an HTTP request on the TCP port: a 1.2 GB "frame"
    kind, body = read_frame(sock)
    assert kind == protocol.ERROR and body["type"] == "too_large"
    assert_closed(sock)
    assert_healthy(server)


def test_infer_before_hello_and_version_mismatch(server) -> None:
    sock = raw(server)
    send_frame(sock, protocol.encode_message(protocol.INFER, make_obs(0)))
    kind, body = read_frame(sock)
    assert kind == protocol.ERROR and body["type"] == "auth"
    assert_closed(sock)
    sock = raw(server)
    kind, body = hello(sock, protocol=99)
    assert kind == protocol.ERROR and body["type"] == "version" and "99" in body["message"]
    assert_healthy(server)


def test_unknown_and_unexpected_kinds_keep_the_connection(server) -> None:
    sock = raw(server)
    assert hello(sock)[0] == protocol.METADATA
    send_frame(sock, bytes([77]) + codec.packb({}))
    assert read_frame(sock)[1]["type"] == "protocol"
    send_frame(sock, protocol.encode_message(protocol.RESULT, {}))  # servers do not take results
    assert read_frame(sock)[1]["type"] == "protocol"
    send_frame(sock, protocol.encode_message(protocol.INFER, [1, 2, 3]))  # not a map
    assert read_frame(sock)[1]["type"] == "invalid_input"
    send_frame(sock, protocol.encode_message(protocol.INFER, make_obs(1)))
    kind, body = read_frame(sock)
    assert kind == protocol.RESULT
    np.testing.assert_array_equal(body["action"], expected_action(make_obs(1)["state"]))


def test_truncated_frame_then_disconnect(server) -> None:
    sock = raw(server)
    assert hello(sock)[0] == protocol.METADATA
    message = protocol.encode_message(protocol.INFER, make_obs(0))
    sock.sendall(protocol.frame_header(len(message)) + message[: len(message) // 2])
    sock.close()
    assert_healthy(server)


def test_idle_and_stalled_clients_are_closed(server) -> None:
    idle = raw(server)  # connects and sends nothing
    stalled = raw(server)
    assert hello(stalled)[0] == protocol.METADATA
    stalled.sendall(b"\x00\x01\x00\x00" + b"\x03" * 100)  # half a frame, then silence
    http_idle = raw(server, "http")
    t0 = time.monotonic()
    for sock in (idle, stalled, http_idle):
        assert_closed(sock, within=5.0)
    assert time.monotonic() - t0 < 4.0
    assert_healthy(server)


def test_http_garbage_and_bad_requests(server) -> None:
    def exchange(data: bytes) -> bytes:
        sock = raw(server, "http")
        sock.sendall(data)
        sock.settimeout(5)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and b"Content-Length: " in chunks[0]:
                    head, _, rest = b"".join(chunks).partition(b"\r\n\r\n")
                    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                    if len(rest) >= length:
                        break
        except (ConnectionResetError, TimeoutError):
            pass
        sock.close()
        return b"".join(chunks)

    assert exchange(b"\x16\x03\x01garbage\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert exchange(b"POST /infer HTTP/1.1\r\nContent-Length: 5\r\n\r\n\xc1\xc1\xc1\xc1\xc1").startswith(
        b"HTTP/1.1 400"
    )
    assert exchange(b"POST /infer HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n").startswith(
        b"HTTP/1.1 413"
    )
    assert exchange(b"POST /infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert exchange(b"GET /nope HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404")
    assert exchange(b"GET /infer HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405")
    body = codec.packb({"state": np.zeros(14, np.float32)})
    reply = exchange(b"POST /infer HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert reply.startswith(b"HTTP/1.1 400")
    assert codec.unpackb(reply.split(b"\r\n\r\n", 1)[1])["type"] == "invalid_input"
    assert exchange(b"GET /healthz HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200")
    assert_healthy(server)


def test_http_expect_continue_and_pipelining(server) -> None:
    obs = make_obs(2)
    body = codec.packb(obs)
    sock = raw(server, "http")
    sock.sendall(b"POST /infer HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
    assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue")
    # the body, then a second request pipelined behind it
    sock.sendall(body + b"GET /healthz HTTP/1.1\r\n\r\n")
    data = b""
    sock.settimeout(5)
    while data.count(b"HTTP/1.1 200") < 2 or not data.endswith(b"}"):
        data += sock.recv(65536)
    first = data.split(b"\r\n\r\n", 1)[1]
    length = int(data.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    reply = codec.unpackb(first[:length])
    np.testing.assert_array_equal(reply["action"], expected_action(obs["state"]))


def test_websocket_text_and_garbage_messages(server) -> None:
    from websockets.sync.client import connect as ws_connect

    with ws_connect(server.url("ws"), max_size=None, compression=None) as ws:
        ws.send("hello as text")  # no hello message first, and not a valid message
        reply = protocol.decode_message(ws.recv())
        assert reply[0] == protocol.ERROR
        ws.send(protocol.encode_message(protocol.HELLO, protocol.hello_body(None)))
        assert protocol.decode_message(ws.recv())[0] == protocol.METADATA
        ws.send(b"\x03\xc1\xc1")
        kind, body = protocol.decode_message(ws.recv())
        assert kind == protocol.ERROR and body["type"] == "codec"
        ws.send(protocol.encode_message(protocol.INFER, make_obs(3)))
        assert protocol.decode_message(ws.recv())[0] == protocol.RESULT
    assert_healthy(server)


def test_policy_that_raises_does_not_affect_others(server) -> None:
    with connect_to(server, "tcp") as bad, connect_to(server, "ws") as good:
        for _ in range(3):
            with pytest.raises(Exception, match="boom requested"):
                bad.infer(make_obs(0, **{"raise": True}))
            obs = make_obs(4)
            np.testing.assert_array_equal(good.infer(obs)["action"], expected_action(obs["state"]))


def test_http_pipelined_inline_inferences_answer_in_order_and_stop_at_connection_close() -> None:
    """An inline policy's inferences are answered on the spot, one per pipelined request, in order; a
    request asking for ``Connection: close`` is the last one served on its connection."""
    from pi0remote.harness import attacks as A
    from pi0remote.policies import load_policy

    def post(n: int, extra: bytes = b"") -> bytes:
        body = codec.packb({"x": np.zeros(n, np.float32)})
        return b"POST /infer HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n" % (extra, len(body)) + body

    with BackgroundServer(load_policy("echo"), name="echo", http_port=0) as srv:
        data = A.http_request(
            addr(srv, "http"), post(1) + post(2) + post(3, b"Connection: close\r\n") + post(4)
        )
    shapes = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        shapes.append(codec.unpackb(rest[:length])["received"]["x"]["shape"])
        data = rest[length:]
    assert shapes == [[1], [2], [3]]  # the fourth came after the close: never served
