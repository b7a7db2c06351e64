"""The same client behaviour on every transport, against real servers on loopback (port 0)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.request

import numpy as np
import pytest

import pi0remote
from conftest import (
    ALL_TRANSPORTS,
    HAVE_QUIC,
    NETWORK_TRANSPORTS,
    ProbePolicy,
    connect_to,
    expected_action,
    make_obs,
)
from pi0remote import (
    AuthenticationError,
    InvalidInputError,
    MessageTooLarge,
    RemotePolicyError,
    RequestTimeout,
    aconnect,
    connect,
)
from pi0remote.policies.builtin import EchoPolicy, ZerosPolicy
from pi0remote.server import BackgroundServer

pytestmark = pytest.mark.timeout(120)


def _server_kwargs(**extra):
    kwargs = {"http_port": 0, "tcp_port": 0, "transports": list(NETWORK_TRANSPORTS)}
    if HAVE_QUIC:
        kwargs["quic_port"] = 0
    kwargs.update(extra)
    return kwargs


@pytest.mark.parametrize("transport", ALL_TRANSPORTS)
def test_round_trip_is_exact(probe_server, transport: str) -> None:
    obs = make_obs(1)
    with connect_to(probe_server, transport) as client:
        reply = client.infer(obs)
    assert reply["action"].dtype == np.float32 and reply["action"].shape == (50, 14)
    np.testing.assert_array_equal(reply["action"], expected_action(obs["state"]))
    assert reply["cam_sum"] == int(obs["cam_high"].sum(dtype=np.int64))
    assert reply["inference_ms"] >= 0
    assert {"decode_ms", "queue_ms", "policy_ms", "encode_ms", "total_ms"} <= set(reply["server_timing"])
    ct = reply["client_timing"]
    assert ct["round_trip_ms"] >= reply["server_timing"]["total_ms"] - 1e-6
    assert ct["overhead_ms"] == pytest.approx(ct["round_trip_ms"] - reply["server_timing"]["total_ms"])


@pytest.mark.parametrize("transport", ALL_TRANSPORTS)
def test_metadata(probe_server, transport: str) -> None:
    with connect_to(probe_server, transport) as client:
        meta = client.metadata
        assert meta["protocol"] == 1
        assert meta["policy"]["input_spec"]["cam_high"] == {"dtype": "uint8", "shape": [3, 224, 224]}
        assert meta["policy"]["action_shape"] == [50, 14] and meta["policy"]["probe"] is True
        assert client.policy_metadata.action_horizon == 50


@pytest.mark.parametrize("transport", ALL_TRANSPORTS)
def test_reset_reaches_the_policy(probe_server, transport: str) -> None:
    with connect_to(probe_server, transport) as client:
        policy = probe_server.server.policy
        before = policy.resets
        client.reset()
        client.reset()
        assert policy.resets == before + 2


@pytest.mark.parametrize("transport", ALL_TRANSPORTS)
def test_many_sequential_calls(probe_server, transport: str) -> None:
    with connect_to(probe_server, transport) as client:
        for i in range(150):
            obs = make_obs(i % 7)
            obs["state"] = np.full(14, i, np.float32)
            reply = client.infer(obs)
            assert reply["action"][0, 0] == i and reply["action"][49, 13] == i + 49


@pytest.mark.parametrize("transport", NETWORK_TRANSPORTS)
def test_concurrent_clients_get_their_own_results(probe_server, transport: str) -> None:
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            with connect_to(probe_server, transport) as client:
                for i in range(15):
                    obs = make_obs(k)
                    obs["state"] = np.full(14, 1000 * k + i, np.float32)
                    assert client.infer(obs)["action"][0, 0] == 1000 * k + i
        except BaseException as exc:  # collected for the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


@pytest.mark.parametrize("transport", ALL_TRANSPORTS)
def test_bad_input_gets_typed_errors_and_the_connection_stays_usable(probe_server, transport: str) -> None:
    good = make_obs(3)
    with connect_to(probe_server, transport) as client:
        bad_cases = [
            ({"state": good["state"]}, "missing key 'cam_high'"),
            (dict(good, cam_high=good["cam_high"].astype(np.float32)), "expected dtype uint8"),
            (dict(good, cam_high=good["cam_high"][:, :100]), "expected shape"),
            (dict(good, state=np.zeros(7, np.float32)), "expected shape"),
            (dict(good, state=[0.0] * 14), "expected a float32 array"),
        ]
        for obs, message in bad_cases:
            with pytest.raises(InvalidInputError, match=message):
                client.infer(obs)
        with pytest.raises(RemotePolicyError, match="ValueError: boom requested") as info:
            client.infer(dict(good, **{"raise": True}))
        assert "Traceback" not in str(info.value)
        np.testing.assert_array_equal(client.infer(good)["action"], expected_action(good["state"]))


@pytest.mark.parametrize("transport", NETWORK_TRANSPORTS)
def test_multi_camera_requests(transport: str) -> None:
    with BackgroundServer(EchoPolicy(), **_server_kwargs()) as srv:
        with connect_to(srv, transport) as client:
            obs = make_obs(0)
            obs["cam_left_wrist"] = np.zeros((3, 224, 224), np.uint8)
            obs["cam_right_wrist"] = np.ones((3, 128, 128), np.uint8)
            obs["prompt"] = "transfer the cube"
            obs["extra"] = {"nested": [1, 2]}
            received = client.infer(obs)["received"]
    assert received["cam_high"] == {"dtype": "uint8", "shape": [3, 224, 224]}
    assert received["cam_left_wrist"] == {"dtype": "uint8", "shape": [3, 224, 224]}
    assert received["cam_right_wrist"] == {"dtype": "uint8", "shape": [3, 128, 128]}
    assert received["prompt"] == {"type": "str"} and received["extra"] == {"type": "dict"}


@pytest.mark.parametrize("transport", NETWORK_TRANSPORTS)
def test_auth(transport: str) -> None:
    with BackgroundServer(ZerosPolicy(), token="s3cret", **_server_kwargs()) as srv:
        with connect_to(srv, transport, token="s3cret") as client:
            assert client.infer(make_obs(0))["action"].shape == (50, 14)
        for token in (None, "wrong", "s3cret-but-longer"):
            with pytest.raises(AuthenticationError):
                connect_to(srv, transport, token=token, retries=0).infer(make_obs(0))


@pytest.mark.parametrize("transport", NETWORK_TRANSPORTS)
def test_oversized_message_is_refused_and_the_client_recovers(transport: str) -> None:
    with BackgroundServer(ZerosPolicy(), max_message_bytes=200_000, **_server_kwargs()) as srv:
        with connect_to(srv, transport) as client:
            big = dict(make_obs(0), extra=np.zeros(300_000, np.uint8))
            with pytest.raises(MessageTooLarge):
                client.infer(big)
            assert client.infer(make_obs(0))["action"].shape == (50, 14)


@pytest.mark.parametrize("transport", NETWORK_TRANSPORTS)
def test_reconnects_after_server_restart(transport: str) -> None:
    first = BackgroundServer(ProbePolicy(), **_server_kwargs()).start()
    url = first.url(transport)
    ports = {
        "http_port": int(first.url("http").rsplit(":", 1)[1]),
        "tcp_port": int(first.url("tcp").rsplit(":", 1)[1]),
    }
    if HAVE_QUIC:
        ports["quic_port"] = int(first.url("quic").rsplit(":", 1)[1])
    client = connect_to(first, transport)
    obs = make_obs(2)
    client.infer(obs)
    first.stop()
    second = BackgroundServer(ProbePolicy(), **_server_kwargs(**ports)).start()
    try:
        assert second.url(transport) == url
        np.testing.assert_array_equal(client.infer(obs)["action"], expected_action(obs["state"]))
    finally:
        client.close()
        second.stop()


@pytest.mark.parametrize("transport", NETWORK_TRANSPORTS)
def test_per_call_timeout_then_recovery(probe_server, transport: str) -> None:
    with connect_to(probe_server, transport, timeout=0.3) as client:
        with pytest.raises(RequestTimeout):
            client.infer(make_obs(0, sleep_ms=1200))
        assert probe_server.server.policy.wait_idle(10)  # the slow inference finished on the policy thread
        obs = make_obs(5)
        np.testing.assert_array_equal(client.infer(obs)["action"], expected_action(obs["state"]))


def test_slow_inference_does_not_block_health_metadata_or_other_io(probe_server) -> None:
    base = probe_server.url("http")
    done = threading.Event()

    def slow() -> None:
        with connect_to(probe_server, "tcp") as client:
            client.infer(make_obs(0, sleep_ms=1500))
        done.set()

    threading.Thread(target=slow).start()
    time.sleep(0.2)
    t0 = time.perf_counter()
    with urllib.request.urlopen(base + "/healthz", timeout=5) as resp:
        assert json.loads(resp.read()) == {"status": "ok"}
    req = urllib.request.Request(base + "/metadata", headers={"Accept": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert json.loads(resp.read())["policy"]["name"] == "probe"
    with connect_to(probe_server, "ws") as other:  # a new connection's handshake is served meanwhile
        assert other.metadata["protocol"] == 1
    assert time.perf_counter() - t0 < 1.0
    assert not done.is_set()
    assert done.wait(10)


@pytest.mark.parametrize("transport", ALL_TRANSPORTS)
def test_async_twin(probe_server, transport: str) -> None:
    async def main() -> None:
        obs = make_obs(4)
        if transport == "local":
            client = await aconnect(policy=ProbePolicy())
        else:
            opts = {}
            if transport.startswith("quic"):
                opts["quic_fingerprint"] = probe_server.server.core.metadata().get("quic_fingerprint")
            client = await aconnect(probe_server.url(transport), **opts)
        async with client:
            assert client.metadata["protocol"] == 1
            results = [await client.infer(obs) for _ in range(5)]
            for reply in results:
                np.testing.assert_array_equal(reply["action"], expected_action(obs["state"]))
            await client.reset()
            with pytest.raises(InvalidInputError):
                await client.infer({"state": obs["state"]})
            assert (await client.infer(obs))["client_timing"]["round_trip_ms"] > 0

    asyncio.run(main())


def test_connect_refuses_dead_ports_after_bounded_retries() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    t0 = time.perf_counter()
    with pytest.raises(pi0remote.ConnectError):
        connect(f"tcp://127.0.0.1:{port}", retries=2)
    assert time.perf_counter() - t0 < 5


def test_unknown_scheme_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown URL scheme"):
        connect("ftp://example")
