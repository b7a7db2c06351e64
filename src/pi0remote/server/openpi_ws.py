"""openpi's WebSocket policy protocol, served by a :class:`~pi0remote.server.PolicyServer`.

``python -m pi0remote.serve ... --openpi-port 8000`` opens this listener next to the pi0remote ones, so a
robot that runs an unmodified ``openpi_client.WebsocketClientPolicy`` can use a pi0remote server
(docs/openpi.md). What it speaks, as openpi's clients expect it:

* any path is a WebSocket endpoint; the server sends one binary metadata message first (here the same
  metadata the other transports give, in openpi's msgpack layout);
* each binary message from the client is one observation in openpi's layout (arrays as
  ``{"__ndarray__": True, "data", "dtype", "shape"}``), in openpi's ALOHA shape:
  ``{"images": {"cam_high": CHW uint8, ...}, "state": [14], "prompt": str}``; each reply is one binary
  message ``{"actions": [50, 14], "policy_timing": {...}, "server_timing": {...}, ...}``;
* a request that fails is answered with one *text* message (what openpi clients raise) and the connection
  is closed with code 1011; the text names the error's code and message, and carries a Python traceback
  only when the server runs with ``--debug``;
* ``GET /healthz`` answers ``200 OK`` (``503`` while the policy warms up);
* no idle timeout once the WebSocket is open (openpi clients never reconnect): the server pings every
  20 s and closes a peer that does not answer within 20 s, as openpi's own server does.

Auth: when the server has a token, the upgrade request must carry it as ``Authorization: Api-Key TOKEN``
(what ``WebsocketClientPolicy(api_key=...)`` sends) or ``Authorization: Bearer TOKEN``; otherwise it is
refused with HTTP 401.

The WebSocket side is the ``websockets`` package's sans-I/O ``ServerProtocol`` driven by a plain asyncio
protocol, like the ``/ws`` endpoint of :mod:`pi0remote.server.http`. Requests run through the core's own
decode-validate-run path with :class:`OpenpiDialect` (codec layout ``openpi`` + openpi's observation and
reply mapping); this module never drives the policy runner itself.
"""

from __future__ import annotations

import asyncio
import os
import time
import traceback
from collections import deque
from typing import Any

import numpy as np

from .. import codec
from ..errors import CodecError, InvalidInputError, ProtocolError, RemotePolicyError, to_wire
from .connection import set_nodelay
from .core import ServerCore
from .limits import admit_transport

PING_INTERVAL = 20.0
"""Seconds between keepalive pings on an open connection (openpi's server uses the same)."""
PING_TIMEOUT = 20.0
"""Seconds a peer has to answer a ping before the connection is closed."""
HANDSHAKE_TIMEOUT = 10.0
MAX_QUEUED = 8
"""Requests waiting on one connection before it stops reading (the rest wait in the socket)."""
"""Seconds a new TCP connection has to complete its upgrade request (the idle timeout when shorter)."""
ERROR_CLOSE_REASON = "Internal server error. Error message in previous frame."
ERROR_PREFIX = "pi0remote "
"""Error text frames read ``pi0remote CODE error: MESSAGE`` (then a traceback with ``--debug``)."""


# -- openpi's msgpack layout: the codec's ``layout="openpi"`` -------------------------------------------------
def openpi_packb(obj: Any) -> bytes:
    """msgpack in openpi's layout: arrays as ``__ndarray__`` maps, numpy scalars as ``__npgeneric__``."""
    return codec.packb(obj, layout="openpi")


def openpi_unpackb(data: bytes | bytearray | memoryview) -> Any:
    """Decode openpi's layout (and pi0remote's own): arrays come back as read-only views, never pickles."""
    return codec.unpackb(data)


# -- observation and reply mapping -------------------------------------------------------------------------
def from_openpi_obs(obs: Any, input_spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """openpi's observation -> the canonical request.

    ``images`` entries become top-level keys (``images.cam_high`` -> ``cam_high``); ``state``, ``prompt`` and
    any other key pass through. For arrays the policy's input spec names, openpi's lenient dtypes are
    converted as openpi's ALOHA input transform does: float images in [0, 1] become ``uint8`` (x 255), and a
    float64 or integer ``state`` becomes the spec's float dtype.
    """
    if not isinstance(obs, dict):
        raise InvalidInputError(f"observation must be a map, got {type(obs).__name__}")
    out = {k: v for k, v in obs.items() if k != "images"}
    images = obs.get("images")
    if images is not None:
        if not isinstance(images, dict):
            raise InvalidInputError(
                f"'images' must be a map of camera name to image, got {type(images).__name__}"
            )
        for name, image in images.items():
            if name in out:
                raise InvalidInputError(f"camera {name!r} is given both in 'images' and at the top level")
            out[name] = image
    for key, spec in (input_spec or {}).items():
        value = out.get(key)
        if isinstance(value, list):
            try:
                value = out[key] = np.asarray(value, dtype=spec.dtype)
            except (TypeError, ValueError, OverflowError) as exc:  # e.g. an image value above 255
                raise InvalidInputError(
                    f"{key!r}: cannot be read as {spec.dtype} {list(spec.shape)}: {exc}"
                ) from None
        if not isinstance(value, np.ndarray) or value.dtype == np.dtype(spec.dtype):
            continue
        want = np.dtype(spec.dtype)
        if want == np.uint8 and value.dtype.kind == "f":
            out[key] = (255 * value).astype(np.uint8)
        elif want.kind == "f" and value.dtype.kind in "iuf":
            out[key] = value.astype(want)
    return out


def openpi_reply(
    result: dict[str, Any], timing: dict[str, float], started: float, prev_total_ms: float | None
) -> bytes:
    """The policy's canonical reply -> openpi's reply message (``actions``, ``policy_timing``, ``server_timing``)."""
    if not isinstance(result, dict) or "action" not in result:
        raise RemotePolicyError(f"policy returned {type(result).__name__} without an 'action' entry")
    reply = dict(result)
    actions = reply.pop("action")
    policy_timing = reply.pop("policy_timing", None)
    inference_ms = reply.pop("inference_ms", None)
    reply.pop("server_timing", None)
    p_timing: dict[str, Any] = dict(policy_timing) if isinstance(policy_timing, dict) else {}
    if inference_ms is not None:
        p_timing["infer_ms"] = float(inference_ms)
    p_timing.setdefault("infer_ms", timing.get("policy_ms", 0.0))
    s_timing: dict[str, Any] = {"infer_ms": timing.get("policy_ms", 0.0)}
    if prev_total_ms is not None:
        s_timing["prev_total_ms"] = prev_total_ms
    s_timing.update(timing)
    s_timing["total_ms"] = (time.perf_counter() - started) * 1000.0
    out = {"actions": actions, **reply, "policy_timing": p_timing, "server_timing": s_timing}
    return codec.packb(out, layout="openpi")


class OpenpiDialect:
    """openpi's protocol on the core (:class:`~pi0remote.server.core.Dialect`): its codec layout and
    its observation / reply mapping. One per connection: a reply reports the previous one's total time."""

    layout = "openpi"

    def __init__(self) -> None:
        self.prev_total_ms: float | None = None
        self._started: float | None = None

    def decode(self, body: bytes | bytearray | memoryview, input_spec: dict[str, Any]) -> dict[str, Any]:
        return from_openpi_obs(codec.unpackb(body), input_spec)

    def encode(self, result: dict[str, Any], timing: dict[str, float], started: float) -> bytes:
        self._started = started
        return openpi_reply(result, timing, started, self.prev_total_ms)

    def sent(self) -> None:
        """The reply went out: its total time is reported with the next one (as openpi's server does)."""
        if self._started is not None:
            self.prev_total_ms = (time.perf_counter() - self._started) * 1000.0


def error_text(exc: BaseException, debug: bool) -> str:
    """The text frame an openpi client raises: code and message; the traceback only with ``debug``.

    A policy's own exception reads ``pi0remote policy error: ValueError: ...`` (as on every transport).
    """
    wire = to_wire(exc)
    text = f"{ERROR_PREFIX}{wire['type']} error: {wire['message']}"
    if debug:
        text += "\n\n" + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return text


def authorized(core: ServerCore, header: str | None) -> bool:
    """``Authorization: Api-Key TOKEN`` (openpi's client) or ``Authorization: Bearer TOKEN``."""
    if core.token is None:
        return True
    if not header:
        return False
    scheme, _, credential = header.strip().partition(" ")
    if scheme.lower() not in ("api-key", "bearer"):
        return False
    return core.check_token(credential.strip())


# -- the listener ------------------------------------------------------------------------------------------
class OpenpiConnection(asyncio.Protocol):
    """One TCP connection: upgrade (or ``/healthz``), metadata, then observation -> actions until it closes."""

    def __init__(self, listener: OpenpiListener) -> None:
        from websockets.frames import Opcode
        from websockets.server import ServerProtocol

        self._opcode = Opcode
        self.listener = listener
        self.core = listener.core
        self.proto = ServerProtocol(max_size=listener.max_message_bytes)
        self.transport: asyncio.Transport | None = None
        self.open = False
        self.closed = False
        self._fragments: list[bytes] = []
        self._first_opcode: Any = None
        self._inbox: deque[tuple[Any, bytes]] = deque()
        self._task: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._ping: bytes | None = None
        self.dialect = OpenpiDialect()
        self._addr: Any = None
        self._fragment_bytes = 0
        self._reading_paused = False

    # -- transport callbacks --------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._addr = admit_transport(self.core.gate, transport)  # connection limits (docs/security.md)
        if self._addr is None:
            self.closed = True
            return
        self.transport = transport
        set_nodelay(transport)
        self.listener.connections.add(self)
        limit = self.core.limits.handshake_timeout or HANDSHAKE_TIMEOUT
        if self.listener.idle_timeout:
            limit = min(limit, self.listener.idle_timeout)
        self._set_timer(limit, self._abort)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._addr is not None:
            self.core.gate.release(self._addr)
            self._addr = None
        self.closed = True
        self.listener.connections.discard(self)
        self._set_timer(None, None)
        self._inbox.clear()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        from websockets.frames import Frame
        from websockets.http11 import Request

        self.proto.receive_data(data)
        for event in self.proto.events_received():
            if isinstance(event, Request):
                self._handshake(event)
            elif isinstance(event, Frame):
                self._frame(event)
        self._flush()

    def eof_received(self) -> bool | None:
        self.proto.receive_eof()
        self._flush()
        return None

    # -- plumbing -------------------------------------------------------------------------------------
    def _set_timer(self, delay: float | None, callback: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if delay is not None and not self.closed:
            self._timer = asyncio.get_running_loop().call_later(delay, callback)

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _flush(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        data = self.proto.data_to_send()
        if data:
            eof = any(d == b"" for d in data)
            self.transport.writelines([d for d in data if d])
            if eof:
                self.transport.close()
                return
        if self.proto.close_expected():
            # websockets lets the client close TCP after the closing handshake; never wait forever.
            asyncio.get_running_loop().call_later(1.0, self._abort)

    # -- handshake ------------------------------------------------------------------------------------
    def _handshake(self, request: Any) -> None:
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            ready = self.core.ready
            self.proto.send_response(
                self.proto.reject(200 if ready else 503, "OK\n" if ready else "starting\n")
            )
            return
        if not authorized(self.core, request.headers.get("Authorization")):
            self.proto.send_response(self.proto.reject(401, "missing or wrong token\n"))
            return
        response = self.proto.accept(request)
        self.proto.send_response(response)
        if response.status_code != 101:
            return
        self.open = True
        try:
            metadata = codec.packb(self.core.metadata(), layout="openpi")
        except CodecError:
            metadata = codec.packb(
                {k: v for k, v in self.core.metadata().items() if k in ("protocol", "server")},
                layout="openpi",
            )
        self.proto.send_binary(metadata)
        self._set_timer(PING_INTERVAL, self._keepalive)

    def _keepalive(self) -> None:
        self._timer = None
        if self.closed or self.transport is None:
            return
        if self._ping is not None:  # the last ping went unanswered
            self._fail(1011, "keepalive ping timeout")
            return
        self._ping = os.urandom(4)
        try:
            self.proto.send_ping(self._ping)
        except Exception:
            return
        self._flush()
        self._set_timer(PING_TIMEOUT, self._keepalive)

    # -- messages -------------------------------------------------------------------------------------
    def _frame(self, frame: Any) -> None:
        Opcode = self._opcode
        if frame.opcode == Opcode.PONG:
            if self._ping is not None and frame.data == self._ping:
                self._ping = None
                self._set_timer(PING_INTERVAL, self._keepalive)
            return
        if frame.opcode not in (Opcode.BINARY, Opcode.TEXT, Opcode.CONT):
            return
        if frame.opcode != Opcode.CONT:
            self._first_opcode = frame.opcode
        self._fragments.append(frame.data)
        self._fragment_bytes += len(frame.data)
        if self._fragment_bytes > self.listener.max_message_bytes:  # fragments add up to one message
            self._fragments, self._fragment_bytes = [], 0
            self._fail(1009, "message over the size limit")
            return
        if not frame.fin:
            return
        message = self._fragments[0] if len(self._fragments) == 1 else b"".join(self._fragments)
        self._fragments, self._fragment_bytes = [], 0
        self._message(self._first_opcode == Opcode.BINARY, message)

    def _message(self, binary: bool, data: bytes) -> None:
        if self.closed or not self.open:
            return
        if self._task is None and not self._inbox and self.core.can_answer_now():
            # An idle inline policy: answer on the spot, no task.
            try:
                self._send_reply(self.core.infer_sync(self._payload(binary, data), dialect=self.dialect))
            except Exception as exc:
                self._error(exc)
            return
        self._inbox.append((binary, data))
        self._set_reading(len(self._inbox) < MAX_QUEUED)  # pipelined requests wait in the socket
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._serve())

    def _set_reading(self, reading: bool) -> None:
        transport = self.transport
        if transport is not None and reading == self._reading_paused and not transport.is_closing():
            self._reading_paused = not reading
            (transport.resume_reading if reading else transport.pause_reading)()

    async def _serve(self) -> None:
        try:
            while self._inbox and not self.closed:
                binary, data = self._inbox.popleft()
                if len(self._inbox) < MAX_QUEUED // 2:
                    self._set_reading(True)
                try:
                    payload = self._payload(binary, data)
                    self._send_reply(await self.core.infer(payload, client=id(self), dialect=self.dialect))
                except Exception as exc:
                    self._error(exc)
        finally:
            self._task = None

    @staticmethod
    def _payload(binary: bool, data: bytes) -> bytes:
        if not binary:
            raise ProtocolError(
                "expected a binary message (an observation in openpi's msgpack layout), got text"
            )
        return data

    def _send_reply(self, message: bytes) -> None:
        if self.closed:
            return
        self.proto.send_binary(message)
        self._flush()
        self.dialect.sent()
        transport = self.transport
        if transport is not None and transport.get_write_buffer_size() > self.core.outbound_cap:
            transport.abort()  # a client that does not read its replies

    def _error(self, exc: Exception) -> None:
        if self.closed:
            return
        self._inbox.clear()
        try:
            self.proto.send_text(error_text(exc, self.listener.debug).encode("utf-8", "replace"))
        except Exception:
            pass
        self._fail(1011, ERROR_CLOSE_REASON)

    def _fail(self, code: int, reason: str) -> None:
        self.open = False
        try:
            self.proto.send_close(code, reason)
        except Exception:
            pass
        self._flush()
        self._set_timer(None, None)

    def shutdown(self) -> None:
        """Close with 1001 (going away) when the server stops."""
        if self.open:
            self._fail(1001, "server shutting down")
        elif self.transport is not None:
            self.transport.close()


class OpenpiListener:
    """Shared state of the openpi listener: the core, limits and the open connections."""

    def __init__(
        self, core: ServerCore, *, max_message_bytes: int, idle_timeout: float | None, debug: bool = False
    ) -> None:
        self.core = core
        self.max_message_bytes = max_message_bytes
        self.idle_timeout = idle_timeout
        self.debug = debug
        self.connections: set[OpenpiConnection] = set()
        self.server: asyncio.AbstractServer | None = None
        self.urls: list[str] = []

    def protocol(self) -> OpenpiConnection:
        return OpenpiConnection(self)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.shutdown()
        await asyncio.sleep(0)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        if self.server is not None:
            try:
                await asyncio.wait_for(self.server.wait_closed(), 2.0)
            except (asyncio.TimeoutError, TimeoutError):
                pass


async def start(core: ServerCore, options: Any) -> OpenpiListener:
    """The ``openpi://`` listener (:mod:`pi0remote.server.listener` protocol)."""
    listener = OpenpiListener(core, debug=options.debug, **options.listener_kwargs())
    loop = asyncio.get_running_loop()
    listener.server = await loop.create_server(listener.protocol, options.host, options.port)
    port = listener.server.sockets[0].getsockname()[1]
    listener.urls.append(f"openpi://{options.url_host}:{port}")
    return listener


__all__ = [
    "OpenpiDialect",
    "OpenpiListener",
    "error_text",
    "from_openpi_obs",
    "openpi_packb",
    "openpi_reply",
    "openpi_unpackb",
    "start",
]
