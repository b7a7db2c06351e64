"""``PolicyClient`` and its async twin, over a tiny transport seam.

A transport knows how to open a connection (and learn the server's metadata), carry one request
message and return the reply, and close. Everything else (encoding, timing, typed errors, one
reconnect after a dropped connection) lives here once, for every transport.
"""

from __future__ import annotations

import time
from typing import Any

from .. import codec, protocol
from ..errors import ConnectionLost, Pi0RemoteError, ProtocolError, RequestTimeout, from_wire
from ..policies.base import PolicyMetadata
from ._sock import DEFAULT_RETRIES

Message = bytes | list
"""A request message: bytes, or (for transports with ``accepts_parts``) a list of buffers to join."""


def encode_request(transport: Transport | AsyncTransport, kind: int, body: Any) -> Message:
    if getattr(transport, "accepts_parts", False) and isinstance(body, dict):
        return protocol.encode_message_parts(kind, body)
    return protocol.encode_message(kind, body)


class TransportOptions:
    """What every network transport is configured with (``connect()`` passes these through)."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 10.0,
        token: str | None = None,
        retries: int = DEFAULT_RETRIES,
        max_message_bytes: int = protocol.DEFAULT_MAX_MESSAGE_BYTES,
        **_: Any,
    ) -> None:
        self.url = url
        self.timeout = timeout
        """Seconds for each call and each connect attempt."""
        self.token = token
        """Sent on every transport when the server requires one."""
        self.retries = retries
        """Connect attempts after the first one (waits double from 0.1 s)."""
        self.max_message_bytes = max_message_bytes
        """Largest reply accepted."""


class Transport(TransportOptions):
    """Sync transport seam. Subclasses implement the three methods."""

    scheme = "?"
    accepts_parts = False
    """True when :meth:`roundtrip` also takes a list of buffers (a scatter-gather message)."""

    def open(self) -> dict[str, Any]:
        """Connect (with bounded retries) and return the server's metadata."""
        raise NotImplementedError

    def roundtrip(self, message: Message) -> tuple[int, bytes | bytearray | memoryview]:
        """Send one request message (kind byte + body); return the reply's kind and body."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class AsyncTransport(TransportOptions):
    """Async twin of :class:`Transport`."""

    scheme = "?"

    async def open(self) -> dict[str, Any]:
        raise NotImplementedError

    async def roundtrip(self, message: bytes) -> tuple[int, bytes | bytearray | memoryview]:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


def _check_metadata(meta: Any) -> dict[str, Any]:
    if not isinstance(meta, dict):
        raise ProtocolError(f"server metadata must be a map, got {type(meta).__name__}")
    protocol.check_version(meta.get("protocol"), "server")
    return meta


def _decode_reply(kind: int, body: Any, expected: int) -> dict[str, Any]:
    reply = codec.unpackb(body)
    if kind == protocol.ERROR:
        raise from_wire(reply)
    if kind != expected:
        raise ProtocolError(
            f"expected a {protocol.KIND_NAMES[expected]} reply, got {protocol.KIND_NAMES.get(kind, kind)}"
        )
    if not isinstance(reply, dict):
        raise ProtocolError("reply must be a map")
    return reply


def _add_client_timing(reply: dict[str, Any], t0: float, t1: float, t2: float, t3: float) -> dict[str, Any]:
    round_trip = (t3 - t0) * 1000.0
    server = reply.get("server_timing") or {}
    server_total = float(server.get("total_ms", 0.0)) if isinstance(server, dict) else 0.0
    reply["client_timing"] = {
        "encode_ms": (t1 - t0) * 1000.0,
        "transport_ms": (t2 - t1) * 1000.0,
        "decode_ms": (t3 - t2) * 1000.0,
        "round_trip_ms": round_trip,
        "overhead_ms": round_trip - server_total,
    }
    return reply


class _ClientBase:
    def __init__(self, url: str) -> None:
        self.url = url
        self._metadata: dict[str, Any] | None = None
        self.calls = 0

    @property
    def metadata(self) -> dict[str, Any]:
        """What the server said about itself and its policy (protocol, policy name, input spec, ...)."""
        if self._metadata is None:
            raise ProtocolError("not connected")
        return self._metadata

    @property
    def policy_metadata(self) -> PolicyMetadata:
        return PolicyMetadata.from_dict(self.metadata.get("policy", {}))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"


class PolicyClient(_ClientBase):
    """``infer(obs) -> dict`` against a policy wherever it runs. Use :func:`pi0remote.connect`."""

    def __init__(self, transport: Transport, url: str) -> None:
        super().__init__(url)
        self.transport = transport
        self._open = False

    def connect(self) -> PolicyClient:
        if not self._open:
            self._metadata = _check_metadata(self.transport.open())
            self._open = True
        return self

    def _call(self, message: Message) -> tuple[int, Any]:
        if not self._open:
            self.connect()
        try:
            return self.transport.roundtrip(message)
        except ConnectionLost:
            # The server went away (restart, idle close): reconnect once, then give up.
            self._drop()
            self.connect()
            try:
                return self.transport.roundtrip(message)
            except (ConnectionLost, RequestTimeout):
                self._drop()
                raise
        except RequestTimeout:
            self._drop()  # the stream may still carry the late reply: never reuse it
            raise

    def _drop(self) -> None:
        self._open = False
        try:
            self.transport.close()
        except Exception:
            pass

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        """Send one observation; return the policy's reply with ``client_timing`` added."""
        t0 = time.perf_counter()
        message = encode_request(self.transport, protocol.INFER, obs)
        t1 = time.perf_counter()
        kind, body = self._call(message)
        t2 = time.perf_counter()
        reply = _decode_reply(kind, body, protocol.RESULT)
        self.calls += 1
        return _add_client_timing(reply, t0, t1, t2, time.perf_counter())

    def reset(self) -> None:
        """Tell the policy a new episode starts."""
        kind, body = self._call(protocol.encode_message(protocol.RESET, {}))
        _decode_reply(kind, body, protocol.RESET_OK)

    def close(self) -> None:
        if self._open:
            self._drop()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncPolicyClient(_ClientBase):
    """Async twin of :class:`PolicyClient`. Use ``await pi0remote.aconnect(url)``."""

    def __init__(self, transport: AsyncTransport, url: str) -> None:
        super().__init__(url)
        self.transport = transport
        self._open = False

    async def connect(self) -> AsyncPolicyClient:
        if not self._open:
            self._metadata = _check_metadata(await self.transport.open())
            self._open = True
        return self

    async def _drop(self) -> None:
        self._open = False
        try:
            await self.transport.close()
        except Exception:
            pass

    async def _call(self, message: bytes) -> tuple[int, Any]:
        if not self._open:
            await self.connect()
        try:
            return await self.transport.roundtrip(message)
        except ConnectionLost:
            await self._drop()
            await self.connect()
            try:
                return await self.transport.roundtrip(message)
            except (ConnectionLost, RequestTimeout):
                await self._drop()
                raise
        except RequestTimeout:
            await self._drop()
            raise

    async def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        message = protocol.encode_message(protocol.INFER, obs)
        t1 = time.perf_counter()
        kind, body = await self._call(message)
        t2 = time.perf_counter()
        reply = _decode_reply(kind, body, protocol.RESULT)
        self.calls += 1
        return _add_client_timing(reply, t0, t1, t2, time.perf_counter())

    async def reset(self) -> None:
        kind, body = await self._call(protocol.encode_message(protocol.RESET, {}))
        _decode_reply(kind, body, protocol.RESET_OK)

    async def close(self) -> None:
        if self._open:
            await self._drop()

    async def __aenter__(self) -> AsyncPolicyClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = ["AsyncPolicyClient", "AsyncTransport", "Pi0RemoteError", "PolicyClient", "Transport"]
