"""openpi compatibility, both directions (docs/openpi.md).

* The pi0remote server's openpi listener (``openpi_port``) against raw WebSocket clients that follow openpi's
  protocol, and against openpi's own ``WebsocketClientPolicy`` when ``openpi_client`` is installed (it pins
  numpy < 2: ``scripts/openpi_compat_tests.sh`` runs this file in a virtualenv where it installs).
* The ``openpi://`` client against a minimal server written here to openpi's protocol: metadata message
  on connect, arrays as ``{"__ndarray__", "data", "dtype", "shape"}`` maps, ``{"actions", "policy_timing",
  "server_timing"}`` replies, a traceback text message and close code 1011 on error, ``GET /healthz``.

Everything listens on loopback, on ports the OS picks.
"""

from __future__ import annotations

import asyncio
import http
import os
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from typing import Any

import msgpack
import numpy as np
import pytest

import pi0remote
from pi0remote.errors import AuthenticationError, InvalidInputError, RemotePolicyError
from pi0remote.policies import CANONICAL_INPUT_SPEC, PolicyMetadata
from pi0remote.server import BackgroundServer
from pi0remote.server.openpi_ws import openpi_packb, openpi_unpackb

websockets_sync = pytest.importorskip("websockets.sync.client")
from websockets.exceptions import ConnectionClosed, InvalidStatus  # noqa: E402

pytestmark = pytest.mark.timeout(60)

TOKEN = "s3cret-token"


# -- openpi's msgpack layout, written independently of pi0remote's encoder ----------------------------------
def ref_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    return obj


def ref_hook(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        return np.ndarray(buffer=obj[b"data"], dtype=np.dtype(obj[b"dtype"]), shape=obj[b"shape"])
    if b"__npgeneric__" in obj:
        return np.dtype(obj[b"dtype"]).type(obj[b"data"])
    return obj


def ref_packb(obj: Any) -> bytes:
    return msgpack.packb(obj, default=ref_default)


def ref_unpackb(data: bytes) -> Any:
    return msgpack.unpackb(data, object_hook=ref_hook)


# -- requests and policies ------------------------------------------------------------------------------------
def expected_action(state: np.ndarray) -> np.ndarray:
    return (
        np.tile(np.asarray(state, np.float32), (50, 1)) + np.arange(50, dtype=np.float32)[:, None]
    ).astype(np.float32)


def canonical_obs(seed: int = 0, **extra: Any) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    obs: dict[str, Any] = {
        "cam_high": rng.integers(0, 256, (3, 224, 224), dtype=np.uint8),
        "state": rng.normal(size=14).astype(np.float32),
    }
    obs.update(extra)
    return obs


def aloha_obs(seed: int = 0, **extra: Any) -> dict[str, Any]:
    """What openpi's ALOHA examples send: CHW uint8 cameras under ``images``, a float64 state, a prompt."""
    rng = np.random.default_rng(seed)
    obs: dict[str, Any] = {
        "images": {
            cam: rng.integers(0, 256, (3, 224, 224), dtype=np.uint8)
            for cam in ("cam_high", "cam_low", "cam_left_wrist", "cam_right_wrist")
        },
        "state": rng.normal(size=14),
        "prompt": "transfer the cube",
    }
    obs.update(extra)
    return obs


class ProbePolicy:
    """Canonical policy whose reply is a known function of the request; ``raise`` makes it raise."""

    def __init__(self) -> None:
        self.metadata = PolicyMetadata(
            name="probe", input_spec=dict(CANONICAL_INPUT_SPEC), extra={"probe": True}
        )

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        if obs.get("raise"):
            raise ValueError("boom requested")
        received = {k: [str(v.dtype), list(v.shape)] for k, v in obs.items() if isinstance(v, np.ndarray)}
        return {
            "action": expected_action(obs["state"]),
            "cam_sum": int(obs["cam_high"].sum(dtype=np.int64)),
            "received": received,
            "prompt_seen": obs.get("prompt"),
            "policy_timing": {"device_ms": 1.5},
        }


@pytest.fixture(scope="module")
def server():
    with BackgroundServer(
        ProbePolicy(), name="probe", transports=("tcp",), openpi_port=0, idle_timeout=30
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def debug_server():
    with BackgroundServer(ProbePolicy(), name="probe", transports=(), openpi_port=0, debug=True) as srv:
        yield srv


@pytest.fixture(scope="module")
def token_server():
    with BackgroundServer(ProbePolicy(), name="probe", transports=(), openpi_port=0, token=TOKEN) as srv:
        yield srv


def port_of(srv: BackgroundServer) -> int:
    return int(srv.url("openpi").rsplit(":", 1)[1])


def ws_connect(port: int, headers: dict[str, str] | None = None):
    return websockets_sync.connect(
        f"ws://127.0.0.1:{port}", compression=None, max_size=None, additional_headers=headers, open_timeout=5
    )


def healthz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


# -- a minimal server written to openpi's protocol -------------------------------------------------------------
class OpenpiPeer:
    """openpi's WebSocket policy server protocol, on ``websockets.asyncio.server``, on its own thread."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        metadata: dict[str, Any] | None = None,
        ping_interval: float = 20.0,
    ) -> None:
        self.api_key = api_key
        self.ping_interval = ping_interval
        self.metadata = (
            metadata if metadata is not None else {"reset_pose": [0.0] * 14, "note": "stock openpi"}
        )
        self.received: list[dict[str, Any]] = []
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def policy(self, obs: dict[str, Any]) -> dict[str, Any]:
        if obs.get("raise"):
            raise ValueError("boom in the openpi policy")
        return {"actions": expected_action(obs["state"]).astype(np.float64), "state": obs["state"]}

    def _process_request(self, connection: Any, request: Any) -> Any:
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if self.api_key is not None and request.headers.get("Authorization") != f"Api-Key {self.api_key}":
            return connection.respond(http.HTTPStatus.UNAUTHORIZED, "bad key\n")
        return None

    async def _handler(self, ws: Any) -> None:
        from websockets.frames import CloseCode

        await ws.send(ref_packb(self.metadata))
        prev_total = None
        while True:
            try:
                t0 = time.monotonic()
                obs = ref_unpackb(await ws.recv())
                self.received.append(obs)
                t1 = time.monotonic()
                reply = self.policy(obs)
                infer_s = time.monotonic() - t1
                reply["policy_timing"] = {"infer_ms": 7.25}
                reply["server_timing"] = {"infer_ms": infer_s * 1000}
                if prev_total is not None:
                    reply["server_timing"]["prev_total_ms"] = prev_total * 1000
                await ws.send(ref_packb(reply))
                prev_total = time.monotonic() - t0
            except ConnectionClosed:
                break
            except Exception:
                await ws.send(traceback.format_exc())
                await ws.close(
                    code=CloseCode.INTERNAL_ERROR,
                    reason="Internal server error. Traceback included in previous frame.",
                )
                break

    async def _main(self) -> None:
        from websockets.asyncio.server import serve

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with serve(
            self._handler,
            "127.0.0.1",
            0,
            compression=None,
            max_size=None,
            process_request=self._process_request,
            ping_interval=self.ping_interval,
            ping_timeout=self.ping_interval,
        ) as srv:
            self.port = list(srv.sockets)[0].getsockname()[1]
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> OpenpiPeer:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"openpi://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def peer():
    with OpenpiPeer() as p:
        yield p


# == the msgpack layout ========================================================================================
def test_layout_matches_openpi():
    payload = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "img": np.zeros((3, 2, 2), np.uint8),
        "t": np.arange(6, dtype=np.int64).reshape(2, 3).T,  # not C-contiguous
        "s": np.float32(1.5),
        "i": np.int64(-3),
        "b": np.bool_(True),
        "prompt": "hello",
        "nested": {"x": [1, 2.5, "z"]},
    }
    ours = ref_unpackb(openpi_packb(payload))
    theirs = openpi_unpackb(ref_packb(payload))
    for decoded in (ours, theirs):
        for key in ("a", "img", "t"):
            np.testing.assert_array_equal(decoded[key], payload[key])
            assert decoded[key].dtype == payload[key].dtype
        for key in ("s", "i", "b"):
            assert decoded[key] == payload[key] and decoded[key].dtype == payload[key].dtype
        assert decoded["prompt"] == "hello" and decoded["nested"] == {"x": [1, 2.5, "z"]}


def test_layout_refuses_object_arrays():
    from pi0remote.errors import CodecError

    with pytest.raises(CodecError):
        openpi_packb({"x": np.array(["a", None], dtype=object)})
    evil = msgpack.packb({b"__ndarray__": True, b"data": b"\x00" * 8, b"dtype": "|O", b"shape": [1]})
    with pytest.raises(CodecError):
        openpi_unpackb(evil)


# == the pi0remote server's openpi listener ====================================================================
def test_serve_prints_openpi_url(server):
    assert server.url("openpi").startswith("openpi://127.0.0.1:")


def test_metadata_message_comes_first(server):
    with ws_connect(port_of(server)) as ws:
        first = ws.recv(timeout=5)
        assert isinstance(first, bytes)
        meta = ref_unpackb(first)
        assert meta["protocol"] == 1
        assert meta["policy"]["name"] == "probe"
        assert meta["policy"]["action_shape"] == [50, 14]


def test_openpi_observation_in_actions_out(server):
    obs = aloha_obs(1)
    with ws_connect(port_of(server)) as ws:
        ws.recv(timeout=5)
        for i in range(3):
            ws.send(ref_packb(obs))
            reply = ref_unpackb(ws.recv(timeout=5))
            assert reply["actions"].dtype == np.float32 and reply["actions"].shape == (50, 14)
            np.testing.assert_allclose(reply["actions"], expected_action(obs["state"]), rtol=1e-6)
            assert reply["cam_sum"] == int(obs["images"]["cam_high"].sum(dtype=np.int64))
            # images.* became top-level cameras, the float64 state became float32, the prompt passed through
            assert reply["received"]["cam_high"] == ["uint8", [3, 224, 224]]
            assert reply["received"]["cam_left_wrist"] == ["uint8", [3, 224, 224]]
            assert reply["received"]["state"] == ["float32", [14]]
            assert reply["prompt_seen"] == "transfer the cube"
            assert reply["policy_timing"]["infer_ms"] >= 0 and reply["policy_timing"]["device_ms"] == 1.5
            assert reply["server_timing"]["infer_ms"] >= 0
            assert ("prev_total_ms" in reply["server_timing"]) == (i > 0)
            assert "action" not in reply


def test_healthz(server):
    assert healthz(port_of(server)) == (200, "OK\n")


def test_bad_request_gets_error_frame_without_traceback(server):
    port = port_of(server)
    with ws_connect(port) as ws:
        ws.recv(timeout=5)
        ws.send(
            ref_packb(
                {"images": {"cam_high": np.zeros((3, 224, 224), np.uint8)}, "state": np.zeros(7, np.float32)}
            )
        )
        text = ws.recv(timeout=5)
        assert isinstance(text, str)
        assert text.startswith("pi0remote invalid_input error:") and "expected shape [14]" in text
        assert "Traceback" not in text
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=5)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1011
    # Garbage and text messages are refused the same way.
    for junk in (b"\xc1\xc1\xc1", "not msgpack"):
        with ws_connect(port) as ws:
            ws.recv(timeout=5)
            ws.send(junk)
            text = ws.recv(timeout=5)
            assert isinstance(text, str) and text.startswith("pi0remote ") and "Traceback" not in text
    # A policy exception: its class and message, still no traceback.
    with ws_connect(port) as ws:
        ws.recv(timeout=5)
        ws.send(ref_packb(aloha_obs(0) | {"raise": True}))
        text = ws.recv(timeout=5)
        assert text == "pi0remote policy error: ValueError: boom requested"


def test_server_keeps_serving_after_a_bad_client(server):
    port = port_of(server)
    with ws_connect(port) as good:
        good.recv(timeout=5)
        with ws_connect(port) as bad:
            bad.recv(timeout=5)
            bad.send(b"\x00\x01garbage")
            assert isinstance(bad.recv(timeout=5), str)
        obs = aloha_obs(2)
        good.send(ref_packb(obs))
        reply = ref_unpackb(good.recv(timeout=5))
        np.testing.assert_allclose(reply["actions"], expected_action(obs["state"]), rtol=1e-6)
    with ws_connect(port) as fresh:
        fresh.recv(timeout=5)
        fresh.send(ref_packb(aloha_obs(3)))
        assert isinstance(fresh.recv(timeout=5), bytes)


def test_debug_server_sends_traceback(debug_server):
    with ws_connect(port_of(debug_server)) as ws:
        ws.recv(timeout=5)
        ws.send(ref_packb(aloha_obs(4) | {"raise": True}))
        text = ws.recv(timeout=5)
        assert text.startswith("pi0remote policy error: ValueError: boom requested")
        assert "Traceback (most recent call last):" in text and "raise ValueError" in text


def test_listener_requires_the_token(token_server):
    port = port_of(token_server)
    with pytest.raises(InvalidStatus) as info:
        with ws_connect(port):
            pass
    assert info.value.response.status_code == 401
    with pytest.raises(InvalidStatus):
        with ws_connect(port, {"Authorization": "Api-Key wrong"}):
            pass
    for header in (f"Api-Key {TOKEN}", f"Bearer {TOKEN}"):
        with ws_connect(port, {"Authorization": header}) as ws:
            assert ref_unpackb(ws.recv(timeout=5))["auth"] is True
            ws.send(ref_packb(aloha_obs(5)))
            assert ref_unpackb(ws.recv(timeout=5))["actions"].shape == (50, 14)
    assert healthz(port) == (200, "OK\n")  # health needs no token, as on the HTTP listener
    with pi0remote.connect(token_server.url("openpi"), token=TOKEN) as client:
        assert client.infer(canonical_obs(5))["action"].shape == (50, 14)
    with pytest.raises(AuthenticationError):
        pi0remote.connect(token_server.url("openpi"), token="wrong", retries=0)


def test_openpi_scheme_against_pi0remote_listener(server):
    with pi0remote.connect(server.url("openpi")) as client:
        assert client.metadata["protocol"] == 1
        assert client.policy_metadata.name == "probe" and client.policy_metadata.action_shape == (50, 14)
        obs = canonical_obs(6, prompt="pick", cam_left_wrist=np.ones((3, 224, 224), np.uint8))
        reply = client.infer(obs)
        np.testing.assert_allclose(reply["action"], expected_action(obs["state"]), rtol=1e-6)
        assert reply["received"]["cam_left_wrist"] == ["uint8", [3, 224, 224]]
        assert reply["prompt_seen"] == "pick"
        assert (
            reply["inference_ms"] >= 0
            and reply["server_timing"]["total_ms"] >= reply["server_timing"]["policy_ms"]
        )
        with pytest.raises(InvalidInputError, match="expected shape"):
            client.infer(canonical_obs(7, state=np.zeros(3, np.float32)))
        with pytest.raises(RemotePolicyError, match="ValueError: boom requested"):
            client.infer(canonical_obs(7, **{"raise": True}))
        reply = client.infer(obs)  # reconnected after the server closed on the error
        np.testing.assert_allclose(reply["action"], expected_action(obs["state"]), rtol=1e-6)
        client.reset()  # openpi has no reset: a no-op, as in openpi's client


def test_listener_keepalive(monkeypatch):
    import socket

    from pi0remote.server import openpi_ws

    monkeypatch.setattr(openpi_ws, "PING_INTERVAL", 0.2)
    monkeypatch.setattr(openpi_ws, "PING_TIMEOUT", 0.2)
    with BackgroundServer(ProbePolicy(), transports=(), openpi_port=0, idle_timeout=0.5) as srv:
        port = port_of(srv)
        # A client that answers pings stays connected past the idle timeout and the ping timeout.
        with ws_connect(port) as ws:
            ws.recv(timeout=5)
            time.sleep(1.2)
            ws.send(ref_packb(aloha_obs(20)))
            assert ref_unpackb(ws.recv(timeout=5))["actions"].shape == (50, 14)
        # A peer that upgrades and then never reads is closed after a ping goes unanswered.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(
                b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            t0 = time.monotonic()
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
            assert received.startswith(b"HTTP/1.1 101")
            assert 0.3 < time.monotonic() - t0 < 4
        # A connection that never sends its upgrade request is closed after the idle timeout.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            t0 = time.monotonic()
            assert sock.recv(1024) == b""
            assert time.monotonic() - t0 < 3


def test_serve_cli_openpi_port():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable,
        "-m",
        "pi0remote.serve",
        "--policy",
        "zeros",
        "--http-port",
        "0",
        "--tcp-port",
        "0",
        "--openpi-port",
        "0",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = None
        deadline = time.monotonic() + 30
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith("listening openpi://"):
                url = line.split()[1]
            if line.strip() == "ready" or time.monotonic() > deadline:
                break
        assert url is not None
        port = int(url.rsplit(":", 1)[1])
        assert healthz(port) == (200, "OK\n")
        with ws_connect(port) as ws:
            assert ref_unpackb(ws.recv(timeout=5))["policy"]["name"] == "zeros"
            ws.send(ref_packb(aloha_obs(8)))
            assert ref_unpackb(ws.recv(timeout=5))["actions"].shape == (50, 14)
    finally:
        proc.terminate()
        proc.wait(10)


# == the openpi:// client against a server written to openpi's protocol =========================================
def test_openpi_client_against_openpi_peer(peer):
    with pi0remote.connect(peer.url) as client:
        meta = client.metadata
        assert meta["protocol"] == 1 and meta["server"] == "openpi"
        assert meta["openpi_metadata"] == peer.metadata
        assert "action_shape" not in meta["policy"]  # unknown until the first reply
        obs = canonical_obs(9, prompt="fold", cam_left_wrist=np.ones((3, 224, 224), np.uint8))
        reply = client.infer(obs)
        np.testing.assert_allclose(reply["action"], expected_action(obs["state"]), rtol=1e-6)
        assert reply["inference_ms"] == 7.25  # policy_timing.infer_ms
        assert reply["server_timing"]["infer_ms"] >= 0 and "policy_ms" in reply["server_timing"]
        assert reply["policy_timing"] == {"infer_ms": 7.25}
        assert "client_timing" in reply
        assert client.policy_metadata.action_shape == (50, 14)
        sent = peer.received[-1]
        assert set(sent) == {"images", "state", "prompt"}
        assert set(sent["images"]) == {"cam_high", "cam_left_wrist"}
        assert sent["images"]["cam_high"].dtype == np.uint8 and sent["images"]["cam_high"].shape == (
            3,
            224,
            224,
        )
        np.testing.assert_array_equal(sent["images"]["cam_high"], obs["cam_high"])
        assert sent["state"].dtype == np.float32 and sent["prompt"] == "fold"
        reply = client.infer(obs)
        assert "prev_total_ms" in reply["server_timing"]
        # an observation already in openpi's shape goes as it is
        client.infer(aloha_obs(10))
        assert set(peer.received[-1]["images"]) == {
            "cam_high",
            "cam_low",
            "cam_left_wrist",
            "cam_right_wrist",
        }


def test_openpi_client_reports_openpi_errors(peer):
    with pi0remote.connect(peer.url) as client:
        with pytest.raises(RemotePolicyError) as info:
            client.infer(canonical_obs(11, **{"raise": True}))
        assert "ValueError: boom in the openpi policy" in str(info.value)
        assert "Traceback" not in str(info.value)
        assert "Traceback (most recent call last)" in info.value.remote_traceback
        obs = canonical_obs(12)
        np.testing.assert_allclose(client.infer(obs)["action"], expected_action(obs["state"]), rtol=1e-6)


def test_async_openpi_client_against_openpi_peer(peer):
    async def main() -> None:
        client = await pi0remote.aconnect(peer.url)
        try:
            assert client.metadata["openpi_metadata"] == peer.metadata
            obs = canonical_obs(13)
            reply = await client.infer(obs)
            np.testing.assert_allclose(reply["action"], expected_action(obs["state"]), rtol=1e-6)
            assert reply["inference_ms"] == 7.25
            with pytest.raises(RemotePolicyError, match="boom in the openpi policy"):
                await client.infer(canonical_obs(14, **{"raise": True}))
            assert (await client.infer(obs))["action"].shape == (50, 14)
            await client.reset()
        finally:
            await client.close()

    asyncio.run(main())


def test_openpi_client_survives_server_keepalive_close():
    # openpi's server closes a connection whose pings go unanswered; the sync client answers them only when
    # it next sends, so after a long pause it reconnects on its own.
    with OpenpiPeer(ping_interval=0.2) as p:
        with pi0remote.connect(p.url) as client:
            obs = canonical_obs(21)
            assert client.infer(obs)["action"].shape == (50, 14)
            time.sleep(1.0)
            np.testing.assert_allclose(client.infer(obs)["action"], expected_action(obs["state"]), rtol=1e-6)


def test_openpi_client_sends_api_key():
    with OpenpiPeer(api_key=TOKEN) as p:
        with pi0remote.connect(p.url, token=TOKEN) as client:
            assert client.infer(canonical_obs(15))["action"].shape == (50, 14)
        with pytest.raises(AuthenticationError):
            pi0remote.connect(p.url, retries=0)
        assert healthz(p.port) == (200, "OK\n")


# == openpi's own client (needs openpi-client, which needs numpy < 2) ===========================================
# openpi's client calls websockets.sync.client.connect() outside a ``with``, which newer websockets flag.
_openpi_connect_warning = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager")


def test_openpi_msgpack_numpy_interop():
    msgpack_numpy = pytest.importorskip("openpi_client.msgpack_numpy")
    # (np.float64 is a Python float: msgpack writes it as a plain float on both sides)
    payload = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "s": np.float32(2.5),
        "d": np.float64(0.5),
        "p": "x",
    }
    theirs = msgpack_numpy.unpackb(openpi_packb(payload))
    ours = openpi_unpackb(msgpack_numpy.packb(payload))
    for decoded in (theirs, ours):
        np.testing.assert_array_equal(decoded["a"], payload["a"])
        assert decoded["s"] == 2.5 and decoded["s"].dtype == np.float32 and decoded["p"] == "x"
        assert decoded["d"] == 0.5


@_openpi_connect_warning
def test_websocket_client_policy_against_pi0remote(server):
    wcp = pytest.importorskip("openpi_client.websocket_client_policy")
    policy = wcp.WebsocketClientPolicy(host="127.0.0.1", port=port_of(server))
    assert policy.get_server_metadata()["policy"]["name"] == "probe"
    obs = aloha_obs(16)
    for _ in range(3):
        reply = policy.infer(obs)
        assert reply["actions"].shape == (50, 14)
        np.testing.assert_allclose(reply["actions"], expected_action(obs["state"]), rtol=1e-6)
        assert reply["server_timing"]["infer_ms"] >= 0 and reply["policy_timing"]["infer_ms"] >= 0
    policy.reset()
    with pytest.raises(RuntimeError) as info:
        policy.infer(aloha_obs(17, state=np.zeros(5)))
    assert "pi0remote invalid_input error" in str(info.value) and "Traceback" not in str(info.value)
    # openpi's client does not reconnect; a new one works
    again = wcp.WebsocketClientPolicy(host=f"ws://127.0.0.1:{port_of(server)}")
    assert again.infer(obs)["actions"].shape == (50, 14)


@_openpi_connect_warning
def test_websocket_client_policy_debug_traceback(debug_server):
    wcp = pytest.importorskip("openpi_client.websocket_client_policy")
    policy = wcp.WebsocketClientPolicy(host="127.0.0.1", port=port_of(debug_server))
    with pytest.raises(RuntimeError) as info:
        policy.infer(aloha_obs(18) | {"raise": True})
    assert "ValueError: boom requested" in str(info.value) and "Traceback (most recent call last)" in str(
        info.value
    )


@_openpi_connect_warning
def test_websocket_client_policy_api_key(token_server):
    wcp = pytest.importorskip("openpi_client.websocket_client_policy")
    import inspect

    if "api_key" not in inspect.signature(wcp.WebsocketClientPolicy.__init__).parameters:
        pytest.skip("this openpi-client has no api_key")
    policy = wcp.WebsocketClientPolicy(host="127.0.0.1", port=port_of(token_server), api_key=TOKEN)
    assert policy.infer(aloha_obs(19))["actions"].shape == (50, 14)
    with pytest.raises(InvalidStatus):
        wcp.WebsocketClientPolicy(host="127.0.0.1", port=port_of(token_server), api_key="wrong")
