"""``openpi://host:port``: a stock openpi WebSocket policy server (``serve_policy.py``) behind ``connect()``.

The pump speaks openpi's protocol (docs/openpi.md) as a dialect of pi0remote's messages (``_Dialect``: HELLO
is answered from the server's first message, RESET locally, INFER and RESULT translated), so the same client
session drives it and ``client.infer(obs)`` looks the same as on every other transport:

* connect: WebSocket upgrade to ``ws://host:port/path`` (with ``token``: ``Authorization: Api-Key TOKEN``,
  as openpi's client sends it), then the server's first message is its metadata. ``client.metadata`` is
  synthesized in pi0remote's shape: protocol 1, ``policy`` (name, ``action_shape`` once known), and the
  server's own dict under ``openpi_metadata``.
* request: the canonical observation goes out in openpi's shape and msgpack layout: ``cam_*`` arrays move
  under ``images``, everything else (``state``, ``prompt``, ...) stays at the top level; an observation that
  already has ``images`` is sent as it is.
* reply: ``actions`` comes back as ``action``, ``inference_ms`` is openpi's ``policy_timing.infer_ms`` (else
  ``server_timing.infer_ms``), ``server_timing`` and ``policy_timing`` are kept, other keys pass through.
* errors: openpi servers answer a failed request with a text message and close the connection; that
  becomes a typed error (:class:`~pi0remote.errors.RemotePolicyError` for a stock server, the original
  class for a pi0remote server) whose message is the error line, with the full text in
  ``exc.remote_traceback``; the next call reconnects.
* ``reset()`` is a no-op, as in openpi's client (openpi's protocol has no reset message).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from .. import codec, protocol
from ..errors import (
    ConnectError,
    InvalidInputError,
    InvalidURL,
    Pi0RemoteError,
    ProtocolError,
    RemotePolicyError,
    from_wire,
)
from ..server.openpi_ws import ERROR_PREFIX
from .session import AsyncBytePump, BytePump, Message, TransportOptions
from .ws import (
    BlockingWebSocket,
    async_ws_recv,
    async_ws_send,
    close_async_websocket,
    open_async_websocket,
)

DEFAULT_PORT = 8000
"""openpi's ``serve_policy.py`` default port."""

_PI0REMOTE_ERROR = re.compile(re.escape(ERROR_PREFIX) + r"(\w+) error: (.*)", re.S)
_TRACEBACK = "\n\nTraceback (most recent call last):"


def ws_url(url: str) -> str:
    """``openpi://host:port/path`` -> ``ws://host:port/path`` (port 8000 when none is given)."""
    parts = urlsplit(url)
    if not parts.hostname:
        raise InvalidURL(f"no host in {url!r}")
    netloc = parts.netloc if parts.port else f"{parts.netloc}:{DEFAULT_PORT}"
    return urlunsplit(("ws", netloc, parts.path or "/", parts.query, ""))


def to_openpi_obs(obs: Any) -> dict[str, Any]:
    """The canonical request -> openpi's observation (``cam_*`` arrays under ``images``)."""
    if not isinstance(obs, dict):
        raise InvalidInputError(f"observation must be a map, got {type(obs).__name__}")
    if "images" in obs:
        return obs
    images = {k: v for k, v in obs.items() if k.startswith("cam_") and isinstance(v, np.ndarray)}
    out: dict[str, Any] = {"images": images} if images else {}
    for key, value in obs.items():
        if key not in images:
            out[key] = value
    return out


def from_openpi_reply(reply: Any) -> dict[str, Any]:
    """openpi's reply -> the canonical one (``action``, ``inference_ms``, ``server_timing``, ...)."""
    if not isinstance(reply, dict):
        raise ProtocolError(f"openpi reply must be a map, got {type(reply).__name__}")
    if "actions" not in reply:
        raise ProtocolError(f"openpi reply has no 'actions' (keys: {sorted(map(str, reply))})")
    out = {k: v for k, v in reply.items() if k not in ("actions", "server_timing", "policy_timing")}
    out["action"] = reply["actions"]
    server_timing = reply.get("server_timing")
    server_timing = dict(server_timing) if isinstance(server_timing, dict) else {}
    policy_timing = reply.get("policy_timing")
    policy_timing = dict(policy_timing) if isinstance(policy_timing, dict) else None
    inference_ms = None
    for source in (policy_timing or {}, server_timing):
        if isinstance(source.get("infer_ms"), (int, float)):
            inference_ms = float(source["infer_ms"])
            break
    if "policy_ms" not in server_timing and isinstance(server_timing.get("infer_ms"), (int, float)):
        server_timing["policy_ms"] = float(server_timing["infer_ms"])
    if inference_ms is not None:
        out["inference_ms"] = inference_ms
    out["server_timing"] = server_timing
    if policy_timing is not None:
        out["policy_timing"] = policy_timing
    return out


def error_from_text(text: str) -> Pi0RemoteError:
    """The text message an openpi server sends for a failed request -> a typed error."""
    match = _PI0REMOTE_ERROR.match(text)
    if match:  # a pi0remote server: ``pi0remote CODE error: MESSAGE`` (+ traceback with --debug)
        message, sep, rest = match.group(2).partition(_TRACEBACK)
        exc = from_wire({"type": match.group(1), "message": message.strip()})
        exc.remote_traceback = (_TRACEBACK.strip() + rest) if sep else None  # type: ignore[attr-defined]
        return exc
    lines = [line for line in text.strip().splitlines() if line.strip()]
    exc = RemotePolicyError(f"openpi server: {lines[-1].strip() if lines else 'error without a message'}")
    exc.remote_traceback = text  # type: ignore[attr-defined]
    return exc


def synthesize_metadata(raw: Any, token: str | None) -> dict[str, Any]:
    """pi0remote-shaped metadata from an openpi server's metadata message."""
    if not isinstance(raw, dict):
        raise ProtocolError(f"openpi server metadata must be a map, got {type(raw).__name__}")
    if raw.get("protocol") == protocol.PROTOCOL_VERSION and isinstance(raw.get("policy"), dict):
        policy = dict(raw["policy"])  # a pi0remote server's openpi listener
        server = str(raw.get("server", "openpi"))
    else:
        policy = {"name": str(raw.get("name", "openpi")), "input_spec": {}}
        shape = raw.get("action_shape")
        if isinstance(shape, (list, tuple)) and len(shape) == 2 and all(isinstance(s, int) for s in shape):
            policy["action_shape"] = list(shape)
            policy["action_horizon"] = shape[0]
        server = "openpi"
    return {
        "protocol": protocol.PROTOCOL_VERSION,
        "server": server,
        "policy": policy,
        "max_batch": 1,
        "auth": token is not None,
        "transport": "openpi",
        "openpi_metadata": raw,
    }


class _Dialect:
    """What both pumps share: pi0remote messages in, openpi's payloads out, and back (no I/O).

    HELLO is answered from the metadata the server sent first, RESET locally (openpi has no reset);
    INFER becomes openpi's observation and its reply a RESULT message.
    """

    options: TransportOptions
    metadata: dict[str, Any] | None = None

    def _headers(self) -> dict[str, str] | None:
        token = self.options.token
        return {"Authorization": f"Api-Key {token}"} if token is not None else None

    def _first(self, first: bytes | str) -> None:
        if isinstance(first, str):
            raise error_from_text(first)
        self.metadata = synthesize_metadata(codec.unpackb(first), self.options.token)

    def on_metadata(self, metadata: dict[str, Any]) -> None:
        self.metadata = metadata  # the client's own copy: the action shape learned later lands there

    def _local_reply(self, message: Message) -> bytes | None:
        """The reply to a message openpi's server never sees, or None when ``message`` is an INFER."""
        kind = (message[0] if isinstance(message, list) else message)[0]
        if kind == protocol.HELLO:
            return protocol.encode_message(protocol.METADATA, self.metadata)
        if kind == protocol.RESET:
            return protocol.encode_message(protocol.RESET_OK, {})
        if kind != protocol.INFER:
            raise ProtocolError(
                f"openpi servers take only observations, not {protocol.KIND_NAMES.get(kind, kind)}"
            )
        return None

    @staticmethod
    def _payload(message: Message) -> bytes:
        data = b"".join(message) if isinstance(message, list) else message
        _, body = protocol.split_message(data)
        return codec.packb(to_openpi_obs(codec.unpackb(body)), layout="openpi")

    def _result(self, data: bytes) -> bytes:
        reply = from_openpi_reply(codec.unpackb(data))
        action = reply.get("action")
        policy = self.metadata.get("policy") if self.metadata else None
        if (
            isinstance(action, np.ndarray)
            and action.ndim == 2
            and isinstance(policy, dict)
            and "action_shape" not in policy
        ):
            policy["action_shape"] = list(action.shape)  # learned from the first reply
            policy["action_horizon"] = action.shape[0]
        return protocol.encode_message(protocol.RESULT, reply)


class OpenpiPump(_Dialect, BytePump):
    scheme = "openpi"

    def __init__(self, options: TransportOptions) -> None:
        super().__init__(options)
        self.ws = BlockingWebSocket(
            options.url, ws_url(options.url), options.timeout, options.max_message_bytes, False
        )
        self._queued: bytes | None = None

    def open(self) -> None:
        pending = self.ws.handshake(self._headers())
        first = self.ws.message(pending)
        self._first(first if first is not None else self._recv())

    def _recv(self) -> bytes | str:
        data = self.ws.recv_message()
        return data.decode("utf-8", "replace") if self.ws.text else data

    def send(self, message: Message) -> None:
        self._queued = self._local_reply(message)
        if self._queued is None:
            payload = self._payload(message)
            self.ws.drain()  # answer the server's keepalive pings, notice a close
            self.ws.send_message(payload, idle_input_ok=True)

    def receive(self) -> bytes:
        queued, self._queued = self._queued, None
        if queued is not None:
            return queued
        data = self._recv()
        if isinstance(data, str):
            self.close()  # openpi servers close after an error; the next call reconnects
            raise error_from_text(data)
        return self._result(data)

    def close(self) -> None:
        self.ws.close()


class AsyncOpenpiPump(_Dialect, AsyncBytePump):
    scheme = "openpi"

    def __init__(self, options: TransportOptions) -> None:
        super().__init__(options)
        self.ws_url = ws_url(options.url)
        self.ws: Any = None
        self._queued: bytes | None = None

    async def open(self) -> None:
        self.ws = await open_async_websocket(self.ws_url, self.options, self._headers())
        try:
            first = await async_ws_recv(self.ws, self.options.timeout, self.url)
        except Pi0RemoteError as exc:
            raise ConnectError(f"openpi server {self.url} sent no metadata: {exc}") from exc
        self._first(first)

    async def send(self, message: Message) -> None:
        self._queued = self._local_reply(message)
        if self._queued is None:
            await async_ws_send(self.ws, self._payload(message), self.url)

    async def receive(self) -> bytes:
        queued, self._queued = self._queued, None
        if queued is not None:
            return queued
        data = await async_ws_recv(self.ws, self.options.timeout, self.url)
        if isinstance(data, str):
            await self.close()
            raise error_from_text(data)
        return self._result(data)

    async def close(self) -> None:
        ws, self.ws = self.ws, None
        await close_async_websocket(ws)


OpenpiTransport = OpenpiPump
AsyncOpenpiTransport = AsyncOpenpiPump

__all__ = [
    "AsyncOpenpiPump",
    "OpenpiPump",
    "error_from_text",
    "from_openpi_reply",
    "synthesize_metadata",
    "to_openpi_obs",
    "ws_url",
]
