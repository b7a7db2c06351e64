"""Transport-independent request handling: auth, hello, decode, validate, run, encode: the one dispatch.

Every message listener (WebSocket, TCP, QUIC, in-process) hands its messages to :meth:`ServerCore.handle`
(or :meth:`~ServerCore.handle_now`) and gets the reply message back; every HTTP front end (the built-in
listener, the ASGI app of a deployment) hands ``(method, path, headers, body)`` to
:meth:`ServerCore.handle_http` and gets an :class:`HttpReply`. Another protocol (openpi's) is a
:class:`Dialect`: its codec layout and its request/reply mapping, on the same decode-validate-run path.
Nothing here touches a socket.

Every decode step raises only pi0remote's typed errors; JPEG camera fields are size-checked from
their header and decoded on a small pool, off the event loop; a policy's reply is checked against its
declared action shape and dtype (and the message size limit) before it is sent, so a policy bug is a
``policy`` error of that call and never a malformed message that breaks the client's connection.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np

from .. import __version__, codec, protocol
from ..errors import (
    AuthenticationError,
    CodecError,
    InvalidInputError,
    Pi0RemoteError,
    ProtocolError,
    RemotePolicyError,
    ServerError,
    to_wire,
)
from ..policies import PolicyMetadata, policy_metadata, validate_request
from .limits import ConnectionGate, Limits
from .runner import DaemonExecutor, PolicyRunner


@dataclass
class Session:
    """Per-connection state a listener keeps for the core."""

    authenticated: bool = False
    """True once the token was checked (HTTP/WebSocket headers, or a stream transport's HELLO)."""
    transport: str = "?"
    """Which listener the connection came through (``tcp``, ``ws``, ``http``, ``quic``, ``local``)."""


class Dialect(Protocol):
    """Another protocol's requests and replies on the core (openpi's: ``server/openpi_ws.py``)."""

    layout: str
    """The codec layout of its payloads (``pi0remote`` or ``openpi``)."""

    def decode(self, body: bytes | bytearray | memoryview, input_spec: dict[str, Any]) -> Any:
        """Its request payload -> the canonical observation (validated by the core afterwards)."""
        ...

    def encode(self, result: dict[str, Any], timing: dict[str, float], started: float) -> bytes:
        """The policy's checked result -> its reply payload."""
        ...


class HttpReply(NamedTuple):
    """What :meth:`ServerCore.handle_http` answers; the front end writes it its own way (immutable)."""

    status: int
    content_type: str
    body: bytes


MSGPACK = "application/msgpack"
JSON = "application/json"
HTTP_METHODS = {"/infer": "POST", "/reset": "POST", "/metadata": "GET", "/ws": "GET"}
"""Endpoints (besides ``/healthz``, any method) and the method each takes."""
_ERROR_STATUS = {"auth": 401, "too_large": 413, "policy": 500, "policy_timeout": 503, "server": 500}


def status_for(exc: BaseException) -> int:
    """The HTTP status of an error reply."""
    code = exc.code if isinstance(exc, Pi0RemoteError) else "policy"
    return _ERROR_STATUS.get(code, 400)


class ServerCore:
    def __init__(
        self,
        policy: Any,
        *,
        name: str = "policy",
        token: str | None = None,
        max_batch: int = 1,
        batch_window_ms: float = 0.0,
        extra_metadata: dict[str, Any] | None = None,
        limits: Limits | None = None,
        max_message_bytes: int = protocol.DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.policy = policy
        self._declares_action = _declares_action(policy)
        self._set_meta(policy_metadata(policy, name))
        if token is not None and not isinstance(token, str):
            raise TypeError("the token must be a string")
        self.token = token
        self.limits = limits or Limits()
        self.gate = ConnectionGate(self.limits)
        self.max_message_bytes = max_message_bytes
        self.runner = PolicyRunner(
            policy, max_batch=max_batch, batch_window_ms=batch_window_ms, timeout=self.limits.policy_timeout
        )
        self._ready = False
        self._decode_pool: DaemonExecutor | None = None
        self.load = self.runner.load
        """Connected robots and recent call counters (server/stats.py), published by a fleet."""
        self.extra_metadata: dict[str, Any] = dict(extra_metadata or {})
        self._metadata_cache: bytes | None = None
        self.transports: set[Any] = set()
        """Open client connections' transports, closed when the server stops."""

    @property
    def outbound_cap(self) -> int:
        """Unsent reply bytes past which a connection is dropped: the limit, but always room for one reply."""
        return max(self.limits.max_outbound_bytes, self.max_message_bytes + 65536)

    @property
    def ready(self) -> bool:
        """True once warm and while no policy call is stuck past ``--policy-timeout`` (``/healthz``)."""
        return self._ready and not self.runner.stuck

    @ready.setter
    def ready(self, value: bool) -> None:
        self._ready = bool(value)

    def health(self) -> tuple[int, str]:
        """HTTP status and word for ``/healthz``: 200 ok, 503 starting or stuck."""
        if not self._ready:
            return 503, "starting"
        if self.runner.stuck:
            return 503, "stuck"
        return 200, "ok"

    # -- metadata and auth ----------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {
            "protocol": protocol.PROTOCOL_VERSION,
            "server": f"pi0remote/{__version__}",
            "policy": self.meta.to_dict(),
            "max_batch": self.runner.max_batch,
            "auth": self.token is not None,
            **self.extra_metadata,
        }

    def metadata_body(self) -> bytes:
        if self._metadata_cache is None:
            self._metadata_cache = codec.packb(self.metadata())
        return self._metadata_cache

    def refresh_metadata(self) -> None:
        self._set_meta(policy_metadata(self.policy, self.meta.name))
        self._metadata_cache = None

    def _set_meta(self, meta: PolicyMetadata) -> None:
        """The policy's metadata, and the reply rule :meth:`check_reply` applies (computed once)."""
        self.meta = meta
        want_dtype = meta.extra.get("action_dtype")
        self._want_dtype = None if want_dtype is None else np.dtype(want_dtype)
        self._want_shape = tuple(meta.action_shape) if self._declares_action else None

    def set_extra_metadata(self, **values: Any) -> None:
        self.extra_metadata.update(values)
        self._metadata_cache = None

    def check_token(self, presented: Any) -> bool:
        """Constant-time comparison; anything but a str or bytes (an int, a map) is a wrong token."""
        if self.token is None:
            return True
        if isinstance(presented, str):
            presented = presented.encode("utf-8", "surrogateescape")
        if not isinstance(presented, (bytes, bytearray)):
            return False
        return hmac.compare_digest(bytes(presented), self.token.encode())

    def check_bearer(self, header: str | None) -> bool:
        """``Authorization: Bearer TOKEN`` as HTTP and WebSocket send it."""
        if self.token is None:
            return True
        if not header or not header.startswith("Bearer "):
            return False
        return self.check_token(header[len("Bearer ") :].strip())

    # -- requests -------------------------------------------------------------------------------
    def unpack_obs(self, body: bytes | bytearray | memoryview, dialect: Dialect | None = None) -> Any:
        return codec.unpackb(body) if dialect is None else dialect.decode(body, self.meta.input_spec)

    def decode_obs(
        self, body: bytes | bytearray | memoryview, dialect: Dialect | None = None
    ) -> dict[str, Any]:
        """Body to a validated observation, on the calling thread (JPEG fields decoded here too)."""
        obs = self.unpack_obs(body, dialect)
        if has_jpeg(obs):
            self._decode_jpeg(obs)
        validate_request(obs, self.meta)  # input spec; 'rtc' only for policies that declare it
        return obs

    async def decode_obs_async(
        self, body: bytes | bytearray | memoryview, dialect: Dialect | None = None
    ) -> dict[str, Any]:
        """Like :meth:`decode_obs`, with JPEG decoding on the decode pool instead of the event loop."""
        return await self._checked_async(self.unpack_obs(body, dialect))

    async def _checked_async(self, obs: Any) -> dict[str, Any]:
        """An unpacked request, its JPEG fields decoded on the decode pool, validated."""
        if has_jpeg(obs):
            if self._decode_pool is None:
                self._decode_pool = DaemonExecutor(2, name="pi0remote-decode")
            await asyncio.get_running_loop().run_in_executor(self._decode_pool, self._decode_jpeg, obs)
        validate_request(obs, self.meta)
        return obs

    def _decode_jpeg(self, obs: dict[str, Any]) -> None:
        from ..jpeg import decode_jpeg_fields

        decode_jpeg_fields(
            obs,
            spec=self.meta.input_spec,
            max_pixels=self.limits.max_jpeg_pixels,
            max_total_bytes=self.max_message_bytes,
        )

    def check_reply(self, result: Any) -> dict[str, Any]:
        """The policy's reply, or :class:`RemotePolicyError` when it breaks the policy's own declaration."""
        if not isinstance(result, dict) or "action" not in result:
            raise RemotePolicyError(f"policy returned {type(result).__name__} without an 'action' entry")
        action = result["action"]
        if not isinstance(action, np.ndarray) or action.dtype.kind not in "fiub":
            kind = f"{action.dtype} array" if isinstance(action, np.ndarray) else type(action).__name__
            raise RemotePolicyError(f"policy returned an action of {kind}, not a numeric array")
        if self._want_dtype is not None and action.dtype != self._want_dtype:
            raise RemotePolicyError(
                f"policy returned a {action.dtype} action; it declares {self._want_dtype}"
            )
        if self._want_shape is not None and action.shape != self._want_shape:
            raise RemotePolicyError(
                f"policy returned an action of shape {list(action.shape)}; it declares {list(self._want_shape)}"
            )
        return result

    def _reply(
        self,
        result: Any,
        timing: dict[str, float],
        started: float,
        with_kind: bool,
        dialect: Dialect | None = None,
    ) -> bytes:
        if isinstance(result, BaseException):
            raise result
        if dialect is not None:
            return dialect.encode(self.check_reply(result), timing, started)
        reply = dict(self.check_reply(result))
        policy_timing = reply.pop("policy_timing", None)
        if isinstance(policy_timing, dict):
            timing.update(policy_timing)
        reply.setdefault("inference_ms", timing["policy_ms"])
        if _reply_bytes(reply) > self.max_message_bytes:  # refuse before spending time encoding it
            raise RemotePolicyError(
                f"policy reply exceeds the message limit of {self.max_message_bytes} bytes"
            )
        try:
            message = protocol.encode_result(reply, timing, started, with_kind=with_kind)
        except CodecError as exc:
            raise RemotePolicyError(f"policy reply cannot be sent: {exc}") from exc
        if len(message) > self.max_message_bytes:
            raise RemotePolicyError(
                f"policy reply of {len(message)} bytes exceeds the message limit of {self.max_message_bytes}"
            )
        return message

    async def infer(
        self,
        body: bytes | bytearray | memoryview,
        *,
        with_kind: bool = True,
        client: Any = None,
        dialect: Dialect | None = None,
    ) -> bytes:
        """INFER body in, RESULT message out (raises a Pi0RemoteError for the caller to encode).

        ``client`` identifies the connection for batching (see :class:`PolicyRunner`); with ``dialect`` the
        body and the reply are in that protocol's shape instead.
        """
        started = time.perf_counter()
        return await self._infer_obs(self.unpack_obs(body, dialect), started, with_kind, client, dialect)

    async def _infer_obs(
        self, obs: Any, started: float, with_kind: bool, client: Any, dialect: Dialect | None = None
    ) -> bytes:
        """:meth:`infer` of an unpacked request (``started``: when its handling began)."""
        obs = await self._checked_async(obs)
        decode_ms = (time.perf_counter() - started) * 1000.0
        result, timing = await self.runner.submit(obs, client)
        timing["decode_ms"] = decode_ms
        return self._reply(result, timing, started, with_kind, dialect)

    def infer_sync(
        self, body: bytes | bytearray | memoryview, *, with_kind: bool = True, dialect: Dialect | None = None
    ) -> bytes:
        started = time.perf_counter()
        obs = self.unpack_obs(body, dialect)
        return self._infer_unpacked(obs, started, with_kind, dialect, has_jpeg(obs))

    def _infer_unpacked(
        self, obs: Any, started: float, with_kind: bool, dialect: Dialect | None, jpeg: bool
    ) -> bytes:
        """Validate and run an unpacked request on this thread (``jpeg``: :func:`has_jpeg` of it, known)."""
        if jpeg:
            self._decode_jpeg(obs)
        validate_request(obs, self.meta)
        decode_ms = (time.perf_counter() - started) * 1000.0
        result, timing = self.runner.run_sync(obs)
        timing["decode_ms"] = decode_ms
        return self._reply(result, timing, started, with_kind, dialect)

    def can_answer_now(self) -> bool:
        """True when an inference would run inline at once (an idle inline policy): no task needed."""
        return self.runner.can_run_now()

    def hello(self, body: Any, session: Session) -> bytes:
        if not isinstance(body, dict):
            raise ProtocolError("hello must be a map")
        protocol.check_version(body.get("protocol"), "client")
        if not session.authenticated:
            if not self.check_token(body.get("token")):
                raise AuthenticationError("missing or wrong token")
            session.authenticated = True
        self.load.session_opened(session)
        return protocol.encode_message(protocol.METADATA, self.metadata())

    def handle_now(
        self, message: bytes | bytearray | memoryview, session: Session, *, blocking: bool = False
    ) -> tuple[bytes, bool] | None:
        """Answer ``message`` on the spot when no waiting is needed; None when it must go to :meth:`handle`.

        Hello, reset, bad input and inferences of an idle inline policy are answered here, without
        creating a task; returns ``(reply message, keep_open)`` and never raises for bad input. With
        ``blocking`` (the in-process transport) every request runs here, on the caller's thread.
        """
        try:
            kind, body = protocol.split_message(message)
            if kind == protocol.HELLO:
                return self.hello(codec.unpackb(body), session), True
            if not session.authenticated:
                raise AuthenticationError("the first message must be a hello carrying the token")
            if kind == protocol.INFER:
                if not (blocking or self.runner.can_run_now()):
                    return None
                started = time.perf_counter()
                obs = codec.unpackb(body)
                jpeg = type(obs) is dict and dict in map(type, obs.values())  # has_jpeg(obs), inline
                if jpeg and not blocking:
                    return None  # decoded off the event loop by handle()
                return self._infer_unpacked(obs, started, True, None, jpeg), True
            if kind == protocol.RESET:
                if not (blocking or self.runner.inline):
                    return None
                self.runner.reset()
                return protocol.encode_message(protocol.RESET_OK, {}), True
            raise ProtocolError(
                f"unexpected message kind {protocol.KIND_NAMES.get(kind, kind)!r} from a client"
            )
        except AuthenticationError as exc:
            return protocol.encode_error(exc), False
        except Exception as exc:
            return self.error_message(exc), True

    async def handle(self, message: bytes | bytearray | memoryview, session: Session) -> tuple[bytes, bool]:
        """One message in, ``(reply message, keep_open)`` out. Never raises for bad input.

        An authenticated INFER goes straight to :meth:`infer` (which runs an idle inline policy at once
        too), so a request that :meth:`handle_now` declined is not unpacked a second time here.
        """
        try:
            kind, body = protocol.split_message(message)
            if kind == protocol.INFER and session.authenticated:
                return await self.infer(body, client=id(session)), True
        except Exception as exc:
            return self.error_message(exc), True
        now = self.handle_now(message, session)
        if now is not None:
            return now
        try:  # only a RESET of a policy that runs on its thread gets here
            await self.runner.areset()
            return protocol.encode_message(protocol.RESET_OK, {}), True
        except Exception as exc:
            return self.error_message(exc), True

    # -- HTTP -----------------------------------------------------------------------------------------
    async def handle_http(
        self, method: str, path: str, headers: dict[str, str], body: bytes, *, client: Any = None
    ) -> HttpReply:
        """One HTTP request (header names lower-case, body already bounded) -> the reply. Never raises.

        ``POST /infer`` and ``POST /reset`` carry msgpack bodies; ``GET /metadata`` (JSON when asked);
        ``/healthz`` (no token; 503 while warming up or stuck); typed errors as msgpack, or JSON when the
        client accepts JSON. ``client`` identifies the connection for batching.
        """
        reply = self.handle_http_now(method, path, headers, body, client=client)
        return reply if isinstance(reply, HttpReply) else await reply

    def handle_http_now(
        self, method: str, path: str, headers: dict[str, str], body: bytes, *, client: Any = None
    ) -> HttpReply | Coroutine[Any, Any, HttpReply]:
        """:meth:`handle_http` without a task where none is needed: the reply, or a coroutine giving it.

        Only an inference that waits (for the policy thread or JPEG decoding) and a reset of a policy
        that runs on its thread are coroutines; everything else, an idle inline policy's inference
        included, is answered on the spot. Never raises.
        """
        wants_json = JSON in headers.get("accept", "")
        if path == "/healthz":
            status, word = self.health()
            return HttpReply(status, JSON, json.dumps({"status": word}).encode())
        expected = HTTP_METHODS.get(path)
        if expected is None:
            return self.http_error(404, ProtocolError(f"no endpoint {path}"), wants_json)
        if not self.check_bearer(headers.get("authorization")):
            return self.http_error(401, AuthenticationError("missing or wrong token"), wants_json)
        if method != expected:
            return self.http_error(405, ProtocolError(f"{path} takes {expected}"), wants_json)
        if path == "/metadata":
            if wants_json:
                return HttpReply(200, JSON, json.dumps(self.metadata()).encode())
            return HttpReply(200, MSGPACK, self.metadata_body())
        if path == "/ws":
            return self.http_error(400, ProtocolError("/ws needs a WebSocket upgrade"), wants_json)
        if path == "/reset":
            return self._http_wait(self._reset_body(), wants_json)
        if not self.runner.can_run_now():
            return self._http_wait(self.infer(body, with_kind=False, client=client), wants_json)
        try:
            started = time.perf_counter()
            obs = codec.unpackb(body)
            if has_jpeg(obs):  # decoded off the event loop
                return self._http_wait(self._infer_obs(obs, started, False, client), wants_json)
            return HttpReply(200, MSGPACK, self._infer_unpacked(obs, started, False, None, False))
        except Exception as exc:
            return self.http_error(status_for(exc), exc, wants_json)

    async def _http_wait(self, call: Coroutine[Any, Any, bytes], wants_json: bool) -> HttpReply:
        try:
            return HttpReply(200, MSGPACK, await call)
        except Exception as exc:
            return self.http_error(status_for(exc), exc, wants_json)

    async def _reset_body(self) -> bytes:
        await self.runner.areset()
        return codec.packb({})

    def http_error(self, status: int, exc: BaseException, wants_json: bool = False) -> HttpReply:
        body = to_wire(exc)
        if wants_json:
            return HttpReply(status, JSON, json.dumps(body).encode())
        return HttpReply(status, MSGPACK, codec.packb(body))

    def error_message(self, exc: BaseException) -> bytes:
        if not isinstance(exc, Exception):
            raise exc
        if not isinstance(exc, Pi0RemoteError):
            exc = RemotePolicyError(f"{type(exc).__name__}: {exc}")
        try:
            return protocol.encode_error(exc)
        except CodecError:
            return protocol.encode_error(ServerError("error message could not be encoded"))


def _declares_action(policy: Any) -> bool:
    """True when the policy states its action shape (its metadata), so replies are checked against it."""
    meta = getattr(policy, "metadata", None)
    return isinstance(meta, PolicyMetadata) or (isinstance(meta, Mapping) and "action_shape" in meta)


def _reply_bytes(reply: dict[str, Any]) -> int:
    """:func:`_payload_bytes` of a reply map, with its usual entries (arrays, numbers) counted inline."""
    total = 0
    for v in reply.values():
        if type(v) is np.ndarray:
            total += v.nbytes
        elif type(v) is not float and type(v) is not int:  # scalars: a few bytes, not worth a call
            total += _payload_bytes(v, 1)
    return total


def _payload_bytes(value: Any, depth: int = 0) -> int:
    """A lower bound of ``value``'s encoded size: its arrays, bytes and strings (nested maps and lists)."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, (bytes, bytearray, memoryview, str)):
        return len(value)
    total = 0
    if depth < 4 and isinstance(value, dict):
        for v in value.values():
            if not isinstance(v, (int, float, bool)):  # scalars: a few bytes, not worth a call
                total += _payload_bytes(v, depth + 1)
    elif depth < 4 and isinstance(value, (list, tuple)) and len(value) < 4096:
        for v in value:
            total += _payload_bytes(v, depth + 1)
    return total


def has_jpeg(obs: Any) -> bool:
    return type(obs) is dict and dict in map(type, obs.values())  # maybe {"cam_high": {"jpeg": bytes}}


__all__ = ["Dialect", "HttpReply", "InvalidInputError", "ServerCore", "Session", "status_for"]
