"""Transport-independent request handling: auth, hello, decode, validate, run, encode.

Every listener (HTTP, WebSocket, TCP, QUIC, in-process) turns its bytes into ``(kind, body)`` and calls
:meth:`ServerCore.handle`; what comes back is the reply message. Nothing here touches a socket.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass
from typing import Any

from .. import __version__, codec, protocol
from ..errors import (
    AuthenticationError,
    CodecError,
    InvalidInputError,
    Pi0RemoteError,
    ProtocolError,
    RemotePolicyError,
    ServerError,
)
from ..policies import PolicyMetadata, policy_metadata, validate_obs
from .runner import PolicyRunner


@dataclass
class Session:
    """Per-connection state a listener keeps for the core."""

    authenticated: bool = False
    """True once the token was checked (HTTP/WebSocket headers, or a stream transport's HELLO)."""
    transport: str = "?"
    """Which listener the connection came through (``tcp``, ``ws``, ``http``, ``quic``, ``local``)."""


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
    ) -> None:
        self.policy = policy
        self.meta: PolicyMetadata = policy_metadata(policy, name)
        self.token = token
        self.runner = PolicyRunner(policy, max_batch=max_batch, batch_window_ms=batch_window_ms)
        self.ready = False
        self.load = self.runner.load
        """Connected robots and recent call counters (server/stats.py), published by a fleet."""
        self.extra_metadata: dict[str, Any] = dict(extra_metadata or {})
        self._metadata_cache: bytes | None = None
        self.transports: set[Any] = set()
        """Open client connections' transports, closed when the server stops."""

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
        self.meta = policy_metadata(self.policy, self.meta.name)
        self._metadata_cache = None

    def set_extra_metadata(self, **values: Any) -> None:
        self.extra_metadata.update(values)
        self._metadata_cache = None

    def check_token(self, presented: str | bytes | None) -> bool:
        if self.token is None:
            return True
        if presented is None:
            return False
        if isinstance(presented, str):
            presented = presented.encode()
        return hmac.compare_digest(presented, self.token.encode())

    def check_bearer(self, header: str | None) -> bool:
        """``Authorization: Bearer TOKEN`` as HTTP and WebSocket send it."""
        if self.token is None:
            return True
        if not header or not header.startswith("Bearer "):
            return False
        return self.check_token(header[len("Bearer ") :].strip())

    # -- requests -------------------------------------------------------------------------------
    def decode_obs(self, body: bytes | bytearray | memoryview) -> dict[str, Any]:
        obs = codec.unpackb(body)
        if type(obs) is dict and dict in map(type, obs.values()):  # maybe {"cam_high": {"jpeg": bytes}}
            from ..jpeg import decode_jpeg_fields

            decode_jpeg_fields(obs)
        validate_obs(obs, self.meta.input_spec)
        return obs

    def _reply(self, result: Any, timing: dict[str, float], started: float, with_kind: bool) -> bytes:
        if isinstance(result, BaseException):
            raise result
        if not isinstance(result, dict) or "action" not in result:
            raise RemotePolicyError(f"policy returned {type(result).__name__} without an 'action' entry")
        reply = dict(result)
        policy_timing = reply.pop("policy_timing", None)
        if isinstance(policy_timing, dict):
            timing.update(policy_timing)
        reply.setdefault("inference_ms", timing["policy_ms"])
        return protocol.encode_result(reply, timing, started, with_kind=with_kind)

    async def infer(
        self, body: bytes | bytearray | memoryview, *, with_kind: bool = True, client: Any = None
    ) -> bytes:
        """INFER body in, RESULT message out (raises a Pi0RemoteError for the caller to encode).

        ``client`` identifies the connection for batching (see :class:`PolicyRunner`).
        """
        started = time.perf_counter()
        obs = self.decode_obs(body)
        decode_ms = (time.perf_counter() - started) * 1000.0
        result, timing = await self.runner.submit(obs, client)
        timing["decode_ms"] = decode_ms
        return self._reply(result, timing, started, with_kind)

    def infer_sync(self, body: bytes | bytearray | memoryview, *, with_kind: bool = True) -> bytes:
        started = time.perf_counter()
        obs = self.decode_obs(body)
        decode_ms = (time.perf_counter() - started) * 1000.0
        result, timing = self.runner.run_sync(obs)
        timing["decode_ms"] = decode_ms
        return self._reply(result, timing, started, with_kind)

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
                return self.infer_sync(body), True
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
        """One message in, ``(reply message, keep_open)`` out. Never raises for bad input."""
        now = self.handle_now(message, session)
        if now is not None:
            return now
        try:
            kind, body = protocol.split_message(message)
            if kind == protocol.RESET:
                await self.runner.areset()
                return protocol.encode_message(protocol.RESET_OK, {}), True
            return await self.infer(body, client=id(session)), True
        except Exception as exc:
            return self.error_message(exc), True

    def error_message(self, exc: BaseException) -> bytes:
        if not isinstance(exc, Exception):
            raise exc
        if not isinstance(exc, Pi0RemoteError):
            exc = RemotePolicyError(f"{type(exc).__name__}: {exc}")
        try:
            return protocol.encode_error(exc)
        except CodecError:
            return protocol.encode_error(ServerError("error message could not be encoded"))


__all__ = ["InvalidInputError", "ServerCore", "Session"]
