"""``openpi://host:port``: a stock openpi WebSocket policy server (``serve_policy.py``) behind ``connect()``.

The transport speaks openpi's protocol (docs/openpi.md) and translates at the edge, so ``client.infer(obs)``
looks the same as on every other transport:

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
import select
import socket
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from .. import codec, protocol
from ..errors import (
    ConnectError,
    ConnectionLost,
    InvalidInputError,
    Pi0RemoteError,
    ProtocolError,
    RemotePolicyError,
    from_wire,
)
from ..server.openpi_ws import ERROR_PREFIX, openpi_packb, openpi_unpackb
from ._sock import host_port, open_socket, recv_into, send_all, with_retries
from .base import AsyncTransport, Transport
from .ws import (
    _close_error,
    async_websocket_exchange,
    close_blocking_websocket,
    open_async_websocket,
    upgrade_refused,
)

DEFAULT_PORT = 8000
"""openpi's ``serve_policy.py`` default port."""

_PI0REMOTE_ERROR = re.compile(re.escape(ERROR_PREFIX) + r"(\w+) error: (.*)", re.S)
_TRACEBACK = "\n\nTraceback (most recent call last):"


def ws_url(url: str) -> str:
    """``openpi://host:port/path`` -> ``ws://host:port/path`` (port 8000 when none is given)."""
    parts = urlsplit(url)
    if not parts.hostname:
        raise ConnectError(f"no host in {url!r}")
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


class _Translator:
    """What both transports share: request in pi0remote's protocol -> openpi payload, reply back."""

    token: str | None
    metadata: dict[str, Any] | None = None

    def _headers(self) -> dict[str, str] | None:
        return {"Authorization": f"Api-Key {self.token}"} if self.token is not None else None

    def _open_metadata(self, first: bytes | str) -> dict[str, Any]:
        if isinstance(first, str):
            raise error_from_text(first)
        self.metadata = synthesize_metadata(openpi_unpackb(first), self.token)
        return self.metadata

    @staticmethod
    def _request(message: bytes) -> tuple[int, bytes | None]:
        """(kind, openpi payload); the payload is None for requests answered without the server."""
        kind, body = protocol.split_message(message)
        if kind == protocol.RESET:
            return kind, None
        if kind != protocol.INFER:
            raise ProtocolError(
                f"openpi servers take only observations, not {protocol.KIND_NAMES.get(kind, kind)}"
            )
        return kind, openpi_packb(to_openpi_obs(codec.unpackb(body)))

    def _result(self, data: bytes) -> tuple[int, bytes]:
        reply = from_openpi_reply(openpi_unpackb(data))
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
        return protocol.RESULT, codec.packb(reply)


_RESET_OK = (protocol.RESET_OK, codec.packb({}))


class OpenpiTransport(_Translator, Transport):
    scheme = "openpi"

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        self.ws_url = ws_url(url)
        self.host, self.port = host_port(self.ws_url, DEFAULT_PORT)
        self.sock: socket.socket | None = None
        self.proto: Any = None
        self._buf = bytearray(1 << 18)
        self._fragments: list[bytes] = []
        self._text = False

    # -- plumbing ---------------------------------------------------------------------------------
    def _flush(self) -> None:
        assert self.sock is not None
        data = [d for d in self.proto.data_to_send() if d]
        if data:
            send_all(self.sock, *data)

    def _feed(self, n: int) -> list[Any]:
        self.proto.receive_data(bytes(self._buf[:n]))
        events = self.proto.events_received()
        self._flush()  # pongs, close replies
        return events

    def _pump(self) -> list[Any]:
        assert self.sock is not None
        return self._feed(recv_into(self.sock, memoryview(self._buf)))

    def _message(self, events: list[Any]) -> bytes | str | None:
        """The first complete data message in ``events`` (raises on a close frame)."""
        from websockets.frames import Frame, Opcode

        for event in events:
            if not isinstance(event, Frame):
                continue
            if event.opcode == Opcode.CLOSE:
                close = self.proto.close_rcvd
                raise _close_error(close.code if close else None, close.reason if close else "")
            if event.opcode in (Opcode.BINARY, Opcode.TEXT, Opcode.CONT):
                if event.opcode != Opcode.CONT:
                    self._text = event.opcode == Opcode.TEXT
                self._fragments.append(event.data)
                if event.fin:
                    data = self._fragments[0] if len(self._fragments) == 1 else b"".join(self._fragments)
                    self._fragments = []
                    return data.decode("utf-8", "replace") if self._text else data
        return None

    def _recv(self) -> bytes | str:
        while True:
            message = self._message(self._pump())
            if message is not None:
                return message

    def _drain(self) -> None:
        """Before sending: answer the server's keepalive pings, notice a server that closed meanwhile."""
        assert self.sock is not None
        if isinstance(self.sock, socket.socket) and select.select([self.sock], [], [], 0)[0]:
            if self._message(self._pump()) is not None:
                raise ProtocolError("openpi server sent a message nobody asked for")

    # -- the seam ---------------------------------------------------------------------------------
    def open(self) -> dict[str, Any]:
        from websockets.client import ClientProtocol
        from websockets.http11 import Response
        from websockets.uri import parse_uri

        self.sock = with_retries(
            lambda: open_socket(self.host, self.port, self.timeout), self.url, self.retries
        )
        try:
            self.proto = ClientProtocol(parse_uri(self.ws_url), max_size=self.max_message_bytes)
            request = self.proto.connect()
            for name, value in (self._headers() or {}).items():
                request.headers[name] = value
            self.proto.send_request(request)
            self._flush()
            response = None
            pending: list[Any] = []
            while response is None:
                for event in self._pump():
                    if isinstance(event, Response):
                        response = event
                    elif response is not None:
                        pending.append(event)
            if response.status_code != 101:
                raise upgrade_refused(response.status_code)
            if self.proto.handshake_exc is not None:
                raise ConnectError(f"WebSocket handshake failed: {self.proto.handshake_exc}")
            first = self._message(pending)
            return self._open_metadata(first if first is not None else self._recv())
        except BaseException:
            self.close()
            raise

    def roundtrip(self, message: bytes) -> tuple[int, bytes]:
        kind, payload = self._request(message)
        if payload is None:
            return _RESET_OK
        if self.sock is None or self.proto is None:
            raise ConnectionLost("not connected")
        self._drain()
        try:
            self.proto.send_binary(payload)
        except Exception as exc:  # websockets refuses to send on a closing connection
            raise ConnectionLost(f"WebSocket is closed: {exc}") from exc
        self._flush()
        data = self._recv()
        if isinstance(data, str):
            self.close()  # openpi servers close after an error; the next call reconnects
            raise error_from_text(data)
        return self._result(data)

    def close(self) -> None:
        close_blocking_websocket(self.sock, self.proto)
        self.sock = None
        self.proto = None
        self._fragments = []


class AsyncOpenpiTransport(_Translator, AsyncTransport):
    scheme = "openpi"

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        self.ws_url = ws_url(url)
        self.ws: Any = None

    async def open(self) -> dict[str, Any]:
        import asyncio

        from websockets.exceptions import ConnectionClosed

        self.ws = await open_async_websocket(self, self.ws_url, self._headers())
        try:
            first = await asyncio.wait_for(self.ws.recv(), self.timeout)
            return self._open_metadata(first)
        except asyncio.TimeoutError as exc:
            await self.close()
            raise ConnectError("openpi server sent no metadata") from exc
        except ConnectionClosed as exc:
            await self.close()
            rcvd = exc.rcvd
            raise _close_error(rcvd.code if rcvd else None, rcvd.reason if rcvd else "") from exc
        except BaseException:
            await self.close()
            raise

    async def roundtrip(self, message: bytes) -> tuple[int, bytes]:

        kind, payload = self._request(message)
        if payload is None:
            return _RESET_OK
        data = await async_websocket_exchange(self.ws, payload, self.timeout)
        if isinstance(data, str):
            await self.close()
            raise error_from_text(data)
        return self._result(data)

    async def close(self) -> None:
        if self.ws is not None:
            ws, self.ws = self.ws, None
            try:
                await ws.close()
            except Exception:
                pass


__all__ = [
    "AsyncOpenpiTransport",
    "OpenpiTransport",
    "error_from_text",
    "from_openpi_reply",
    "synthesize_metadata",
    "to_openpi_obs",
    "ws_url",
]
