"""The client session's rules hold on every transport, sync and async (one session, many byte pumps).

Real servers on loopback; a counting policy proves what ran on the server and how often.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest

from conftest import ALL_TRANSPORTS, HAVE_QUIC, NETWORK_TRANSPORTS
from pi0remote import (
    MessageTooLarge,
    Pi0RemoteError,
    ProtocolError,
    ReplyLost,
    TransportMismatch,
    UnknownScheme,
    aconnect,
    connect,
)
from pi0remote.policies import PolicyMetadata
from pi0remote.server import BackgroundServer

pytestmark = pytest.mark.timeout(120)
MODES = ["sync", "async"]


class CountingPolicy:
    """Counts executions; ``{"big": True}`` adds 3 KB to the reply, ``{"hold": True}`` waits for a release."""

    def __init__(self) -> None:
        self.metadata = PolicyMetadata(name="count", input_spec={}, action_shape=(1, 14), action_horizon=1)
        self.calls = 0
        self.lock = threading.Lock()
        self.entered = threading.Event()
        self.release = threading.Event()

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.calls += 1
        if obs.get("hold"):
            self.entered.set()
            self.release.wait(10)
        reply: dict[str, Any] = {"action": np.zeros((1, 14), np.float32), "n": self.calls}
        if obs.get("big"):
            reply["pad"] = np.zeros(3000, np.uint8)
        return reply

    def reset(self) -> None:
        pass


@pytest.fixture(scope="module")
def counting():
    kwargs: dict[str, Any] = {"http_port": 0, "tcp_port": 0, "transports": list(NETWORK_TRANSPORTS)}
    if HAVE_QUIC:
        kwargs["quic_port"] = 0
    with BackgroundServer(CountingPolicy(), name="count", **kwargs) as srv:
        yield srv


def _target(srv, transport: str, options: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    if transport == "local":
        return None, dict(options, policy=srv.server.policy)
    if transport.startswith("quic"):
        options = dict(options, quic_fingerprint=srv.server.core.metadata()["quic_fingerprint"])
    return srv.url(transport), options


class Client:
    """The same calls through ``connect`` or ``aconnect`` (one event loop per client)."""

    def __init__(self, srv, transport: str, mode: str, **options: Any) -> None:
        url, opts = _target(srv, transport, options)
        self.mode = mode
        if mode == "sync":
            self.client = connect(url, **opts)
        else:
            self.loop = asyncio.new_event_loop()
            self.client = self.loop.run_until_complete(aconnect(url, **opts))

    def _run(self, name: str, *args: Any) -> Any:
        result = getattr(self.client, name)(*args)
        return result if self.mode == "sync" else self.loop.run_until_complete(result)

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        return self._run("infer", obs)

    def close(self) -> None:
        self._run("close")
        if self.mode == "async":
            self.loop.close()


def _obs(**extra: Any) -> dict[str, Any]:
    return {"state": np.zeros(14, np.float32), **extra}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("transport", ALL_TRANSPORTS)
def test_oversized_reply_is_typed_runs_once_and_the_next_call_works(
    counting, transport: str, mode: str
) -> None:
    policy = counting.server.policy
    client = Client(counting, transport, mode, max_message_bytes=1000)
    try:
        assert client.infer(_obs())["action"].shape == (1, 14)
        before = policy.calls
        with pytest.raises(MessageTooLarge):
            client.infer(_obs(big=True))
        assert policy.calls == before + 1  # ran once, never sent again
        reply = client.infer(_obs())  # a fresh connection, not a broken stream
        assert reply["n"] == before + 2 and policy.calls == before + 2
    finally:
        client.close()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("transport", ["tcp", "ws", "http"])
def test_a_reply_lost_after_the_request_arrived_is_not_sent_again(transport: str, mode: str) -> None:
    policy = CountingPolicy()
    with BackgroundServer(policy, name="count", http_port=0, tcp_port=0) as srv:
        client = Client(srv, transport, mode, timeout=10)
        try:
            failure: list[BaseException] = []

            def call() -> None:
                try:
                    client.infer(_obs(hold=True))
                except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                    failure.append(exc)

            worker = threading.Thread(target=call)
            worker.start()
            assert policy.entered.wait(10)
            srv.call(lambda: [t.abort() for t in list(srv.server.core.transports)])  # the server drops it
            worker.join(10)
            policy.release.set()
            assert len(failure) == 1 and isinstance(failure[0], ReplyLost), failure
            assert policy.calls == 1
            assert client.infer(_obs())["n"] == 2  # the next call reconnects
        finally:
            policy.release.set()
            client.close()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("transport", ["tcp", "ws", "http"])
def test_an_idle_connection_the_server_closed_is_replaced_before_sending(transport: str, mode: str) -> None:
    policy = CountingPolicy()
    with BackgroundServer(policy, name="count", http_port=0, tcp_port=0) as srv:
        client = Client(srv, transport, mode)
        try:
            assert client.infer(_obs())["n"] == 1
            srv.call(lambda: [t.close() for t in list(srv.server.core.transports)])
            deadline = time.monotonic() + 5
            while srv.call(lambda: len(srv.server.core.transports)) and time.monotonic() < deadline:
                time.sleep(0.01)  # wait for the server-side close to complete (a condition, not a delay)
            assert client.infer(_obs())["n"] == 2 and policy.calls == 2
        finally:
            client.close()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("transport", ALL_TRANSPORTS)
def test_unknown_keyword_is_a_type_error(counting, transport: str, mode: str) -> None:
    with pytest.raises(TypeError, match="retires"):
        Client(counting, transport, mode, retires=0)


@pytest.mark.parametrize("mode", MODES)
def test_unknown_scheme_is_typed_and_lists_the_schemes(mode: str) -> None:
    with pytest.raises(UnknownScheme) as info:
        if mode == "sync":
            connect("ftp://example:1")
        else:
            asyncio.run(aconnect("ftp://example:1"))
    assert isinstance(info.value, Pi0RemoteError)
    for scheme in ("tcp://", "ws://", "http://", "quic://", "local://", "openpi://", "modal://"):
        assert scheme in str(info.value)


def _swap(url: str, scheme: str, path: str = "") -> str:
    return f"{scheme}://{url.split('://', 1)[1].split('/', 1)[0]}{path}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("listener", "scheme", "path", "hint"),
    [
        ("tcp", "http", "", "tcp://"),
        ("tcp", "ws", "/ws", "tcp://"),
        ("http", "tcp", "", "http://"),
        ("http", "ws", "", "ws://"),  # the HTTP port without /ws: a 404, named, not retried
    ],
)
def test_transport_mismatch_fails_fast_naming_the_right_url(
    counting, mode: str, listener: str, scheme: str, path: str, hint: str
) -> None:
    wrong = _swap(counting.url(listener), scheme, path)
    right = _swap(counting.url(listener), hint.rstrip(":/"))
    t0 = time.perf_counter()
    with pytest.raises(TransportMismatch) as info:
        if mode == "sync":
            connect(wrong, timeout=10)
        else:
            asyncio.run(aconnect(wrong, timeout=10))
    assert time.perf_counter() - t0 < 5  # well before the 10 s timeout
    assert right in str(info.value)


class _BadContentLength:
    """A real HTTP server on loopback whose replies carry a malformed Content-Length."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 12x\r\n\r\nabc")
                    conn.recv(65536)
                except OSError:
                    pass


@pytest.mark.parametrize("mode", MODES)
def test_malformed_content_length_is_a_protocol_error(mode: str) -> None:
    server = _BadContentLength()
    try:
        with pytest.raises(ProtocolError, match="Content-Length"):
            if mode == "sync":
                connect(server.url, retries=0)
            else:
                asyncio.run(aconnect(server.url, retries=0))
    finally:
        server.sock.close()


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_connect_leaves_malloc_alone_unless_asked() -> None:
    code = (
        "import pi0remote, pi0remote._malloc as m\n"
        "c = pi0remote.connect('local://zeros'); print(m._done)\n"
        "c = pi0remote.connect('local://zeros', tune_malloc=True); print(m._done)\n"
    )
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]


def test_quic_without_aioquic_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['aioquic'] = None\n"
        "import pi0remote\n"
        "try:\n    pi0remote.connect('quic://127.0.0.1:1')\n"
        "except pi0remote.MissingDependency as exc:\n    print('ok', exc)\n"
    )
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok") and "pi0remote[quic]" in out.stdout
