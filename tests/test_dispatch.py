"""One server dispatch: every HTTP front end, the openpi dialect and every listener go through the core."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import numpy as np
import pytest

from conftest import ProbePolicy, expected_action, make_obs
from pi0remote import codec, deploy
from pi0remote.errors import InvalidInputError
from pi0remote.server import BackgroundServer
from pi0remote.server.core import ServerCore
from pi0remote.server.openpi_ws import OpenpiDialect

TOKEN = "s3cret"
AUTH = {"authorization": f"Bearer {TOKEN}"}
REQUESTS: list[tuple[str, str, dict[str, str], bytes]] = [
    ("GET", "/healthz", {}, b""),
    ("GET", "/metadata", AUTH, b""),
    ("GET", "/metadata", {**AUTH, "accept": "application/json"}, b""),
    ("GET", "/metadata", {}, b""),
    ("POST", "/infer", AUTH, codec.packb(make_obs(3))),
    ("POST", "/infer", AUTH, codec.packb({"state": np.zeros(14, np.float32)})),
    ("POST", "/infer", {**AUTH, "accept": "application/json"}, b"\xc1"),
    ("POST", "/infer", {"authorization": "Bearer wrong"}, codec.packb(make_obs(3))),
    ("POST", "/reset", AUTH, b""),
    ("GET", "/infer", AUTH, b""),
    ("POST", "/metadata", AUTH, b""),
    ("GET", "/ws", AUTH, b""),
    ("GET", "/nope", AUTH, b""),
]


def _over_http(
    url: str, method: str, path: str, headers: dict[str, str], body: bytes
) -> tuple[int, str, bytes]:
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode() + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head_bytes, _, payload = data.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    fields = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), fields["content-type"], payload


def _over_asgi(
    app: deploy.PolicyAsgiApp, method: str, path: str, headers: dict[str, str], body: bytes
) -> tuple[int, str, bytes]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
    }
    asyncio.run(app(scope, receive, send))
    fields = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    return sent[0]["status"], fields["content-type"], sent[1]["body"]


def _meaning(content_type: str, body: bytes) -> Any:
    """What a reply says, without the fields that differ per call (timings, server version)."""
    value = json.loads(body) if "json" in content_type else codec.unpackb(body)
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if k not in ("server_timing", "inference_ms")}
        if isinstance(value.get("action"), np.ndarray):
            value["action"] = value["action"].tolist()
    return value


def test_http_listener_and_asgi_app_are_one_dispatch() -> None:
    core = ServerCore(ProbePolicy(), name="probe", token=TOKEN)
    core.ready = True
    app = deploy.PolicyAsgiApp(core)
    with BackgroundServer(ProbePolicy(), name="probe", token=TOKEN, tcp_port=None) as srv:
        url = srv.url("http")
        for method, path, headers, body in REQUESTS:
            status, ctype, payload = _over_http(url, method, path, headers, body)
            a_status, a_ctype, a_payload = _over_asgi(app, method, path, headers, body)
            assert (status, ctype) == (a_status, a_ctype), (method, path)
            assert _meaning(ctype, payload) == _meaning(a_ctype, a_payload), (method, path)
            if path == "/infer" and status == 200:
                reply = codec.unpackb(payload)
                np.testing.assert_array_equal(reply["action"], expected_action(make_obs(3)["state"]))
    statuses = [_over_asgi(app, *request)[0] for request in REQUESTS]
    assert statuses == [200, 200, 200, 401, 200, 400, 400, 401, 200, 405, 405, 400, 404]


def test_handle_http_never_raises_for_a_failing_policy() -> None:
    core = ServerCore(ProbePolicy(), name="probe")
    body = codec.packb(make_obs(0, **{"raise": True}))
    reply = asyncio.run(core.handle_http("POST", "/infer", {}, body))
    assert reply.status == 500 and codec.unpackb(reply.body)["type"] == "policy"


def test_openpi_is_a_dialect_on_the_core() -> None:
    core = ServerCore(ProbePolicy(), name="probe")
    obs = make_obs(4)
    openpi_obs = {"images": {"cam_high": obs["cam_high"]}, "state": obs["state"].astype(np.float64)}
    payload = codec.packb(openpi_obs, layout="openpi")
    assert b"__ndarray__" in payload
    dialect = OpenpiDialect()
    for reply_bytes in (
        core.infer_sync(payload, dialect=dialect),
        asyncio.run(core.infer(payload, dialect=dialect)),
    ):
        assert b"__ndarray__" in reply_bytes  # the reply is in openpi's layout too
        reply = codec.unpackb(reply_bytes)
        np.testing.assert_array_equal(reply["actions"], expected_action(obs["state"]))
        assert "infer_ms" in reply["policy_timing"] and "total_ms" in reply["server_timing"]
    with pytest.raises(InvalidInputError):  # the core's validation, not the dialect's
        core.infer_sync(codec.packb({"images": {}}, layout="openpi"), dialect=dialect)


def test_codec_layout_parameter() -> None:
    value = {"a": np.arange(6, dtype=np.int16).reshape(2, 3), "s": np.float32(1.5)}
    for layout in ("pi0remote", "openpi"):
        back = codec.unpackb(codec.packb(value, layout=layout))
        np.testing.assert_array_equal(back["a"], value["a"])
        assert back["s"] == np.float32(1.5) and back["s"].dtype == np.float32
    assert codec.packb(value) == codec.packb(value, layout="pi0remote")
    array = value["a"]
    for layout in ("pi0remote", "openpi"):  # the scatter-gather encoder's head: the codec's layout too
        for _ in range(2):  # built, then from the cache
            message = codec.array_head(array, layout) + array.tobytes()
            np.testing.assert_array_equal(codec.unpackb(message), array)
    assert codec.array_head(array) + array.tobytes() == codec.packb(array)
    with pytest.raises(ValueError, match="layout"):
        codec.array_head(array, "pickle")
    with pytest.raises(ValueError, match="layout"):
        codec.new_packer("pickle")


def test_listeners_register_through_one_protocol() -> None:
    with BackgroundServer(ProbePolicy(), name="probe", openpi_port=0) as srv:
        listeners = srv.server.listeners
        assert list(listeners) == ["http", "tcp", "openpi"]
        urls = [url for listener in listeners.values() for url in listener.urls]
        assert urls == srv.urls and all(callable(listener.close) for listener in listeners.values())
        ports = {int(url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1]) for url in urls}
    for port in ports:  # closed with the server
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
