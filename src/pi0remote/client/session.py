"""The client's protocol rules, once, without any I/O: what to send, what a reply means, when to try again.

A :class:`ClientSession` knows the HELLO / METADATA handshake, request encoding, the reply size limit,
reply decoding into typed errors, and the retry rule. It never touches a socket: the sync
:class:`~pi0remote.client.base.PolicyClient` and the async :class:`~pi0remote.client.base.AsyncPolicyClient`
drive the same session over a *byte pump* (:class:`BytePump` / :class:`AsyncBytePump`), one per transport,
which only moves whole messages.

The retry rule (the only place it lives):

* connecting: a :class:`~pi0remote.errors.ConnectError` is retried ``retries`` times with waits doubling from
  0.1 s; any other failure (refused certificate, wrong token, missing extra, another transport's bytes) is final;
* a call whose request could not be delivered (the pump's ``send`` raised :class:`ConnectionLost`, e.g. the
  server closed the idle connection, or ``receive`` raised :class:`RequestNotDelivered`, e.g. a QUIC peer
  that acknowledged none of it) reconnects and sends it once more;
* a call that fails after the request was delivered is never sent again: the server may have run it.
  A dropped connection then raises :class:`~pi0remote.errors.ReplyLost`; a timeout, an oversized reply or
  bytes that do not frame raise their own typed error. In every such case the connection is dropped and
  the next call opens a fresh one.
"""

from __future__ import annotations

from typing import Any

from .. import codec, protocol
from ..errors import (
    ConnectError,
    ConnectionLost,
    MessageTooLarge,
    MissingDependency,
    Pi0RemoteError,
    ProtocolError,
    ReplyLost,
    RequestNotDelivered,
    from_wire,
)

Message = bytes | bytearray | memoryview | list
"""A request message: one buffer, or (for pumps with ``accepts_parts``) a list of buffers to join."""

DEFAULT_RETRIES = 3
"""Connect attempts after the first one; the waits between them double from 0.1 s."""

COMMON_OPTIONS = frozenset({"timeout", "token", "retries", "max_message_bytes", "tune_malloc"})
"""Keywords every transport takes; a pump adds its own in ``BytePump.OPTIONS``."""


class TransportOptions:
    """What every transport is configured with (``connect()``'s keywords, checked by :func:`check_options`)."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 10.0,
        token: str | None = None,
        retries: int = DEFAULT_RETRIES,
        max_message_bytes: int = protocol.DEFAULT_MAX_MESSAGE_BYTES,
        tune_malloc: bool | None = None,
        **extra: Any,
    ) -> None:
        self.url = url
        self.timeout = float(timeout)
        """Seconds for each call and each connect attempt."""
        self.token = token
        """Sent on every transport when the server requires one."""
        self.retries = int(retries)
        """Connect attempts after the first one."""
        self.max_message_bytes = int(max_message_bytes)
        """Largest reply accepted (the METADATA reply included)."""
        self.tune_malloc = tune_malloc
        self.extra = extra
        """The transport's own keywords (``quic_fingerprint``, ``policy``, ...), already checked."""


def check_options(scheme: str, known: frozenset[str], options: dict[str, Any]) -> None:
    """Raise :class:`TypeError` for a keyword neither every transport nor ``scheme``'s pump takes."""
    unknown = sorted(set(options) - COMMON_OPTIONS - known)
    if unknown:
        raise TypeError(
            f"connect() got an unexpected keyword argument {unknown[0]!r} for {scheme}:// "
            f"(it takes {', '.join(sorted(COMMON_OPTIONS | known))})"
        )


class BytePump:
    """The sync transport contract: move whole pi0remote messages (kind byte + msgpack body), nothing else.

    * ``open()`` makes one connection (and its transport-level handshake). A failure worth another attempt
      is a :class:`ConnectError`; anything else is final.
    * ``send(message)`` writes one whole message (a list of buffers when ``accepts_parts``). It raises
      :class:`ConnectionLost` **only** when the message was certainly not delivered (a connection the peer
      had already closed counts: pumps check for that before writing).
    * ``receive()`` returns the next whole message. It raises :class:`MessageTooLarge` as soon as the size is
      known to exceed ``options.max_message_bytes``, :class:`RequestTimeout` after ``options.timeout``,
      :class:`ConnectionLost` when the connection drops, :class:`TransportMismatch` / :class:`ProtocolError`
      for bytes that do not frame. Library exceptions are translated by one table per library
      (:mod:`pi0remote.client.translate`).
    * ``close()`` never raises. After any exception from ``send``/``receive`` the session closes the pump.
    """

    scheme = "?"
    OPTIONS: frozenset[str] = frozenset()
    """This transport's own ``connect()`` keywords."""
    accepts_parts = False
    """True when :meth:`send` also takes a list of buffers (a scatter-gather message)."""
    token_in_headers = False
    """True when the token travels in the connection's own headers (HTTP, WebSocket), not in HELLO."""
    final_connect_errors: tuple[type[BaseException], ...] = ()
    """ConnectError subclasses that another attempt would not fix (a refused certificate)."""

    def __init__(self, options: TransportOptions) -> None:
        self.options = options
        self.url = options.url

    def open(self) -> None:
        raise NotImplementedError

    def send(self, message: Message) -> None:
        raise NotImplementedError

    def receive(self) -> bytes | bytearray | memoryview:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def on_metadata(self, metadata: dict[str, Any]) -> None:
        """The session accepted ``metadata`` (the openpi dialect keeps it to record the action shape)."""


class AsyncBytePump(BytePump):
    """The async twin of :class:`BytePump`: the same contract, with coroutines."""

    async def open(self) -> None:  # type: ignore[override]
        raise NotImplementedError

    async def send(self, message: Message) -> None:  # type: ignore[override]
        raise NotImplementedError

    async def receive(self) -> bytes | bytearray | memoryview:  # type: ignore[override]
        raise NotImplementedError

    async def close(self) -> None:  # type: ignore[override]
        raise NotImplementedError


class ClientSession:
    """Sans-I/O client protocol state for one :class:`PolicyClient` (see the module docstring)."""

    def __init__(self, options: TransportOptions, pump: BytePump) -> None:
        self.options = options
        self.accepts_parts = pump.accepts_parts
        self.token_in_headers = pump.token_in_headers
        self.final_connect_errors = pump.final_connect_errors + (MissingDependency,)
        self.metadata: dict[str, Any] | None = None

    # -- connecting ------------------------------------------------------------------------------
    def connect_delay(self, exc: BaseException, attempt: int) -> float:
        """Seconds to wait before connect attempt ``attempt + 1``; raises when there is none."""
        if not isinstance(exc, ConnectError) or isinstance(exc, self.final_connect_errors):
            raise exc
        if attempt >= self.options.retries:
            raise ConnectError(
                f"could not connect to {self.options.url} after {attempt + 1} attempts: {exc}"
            ) from exc
        return 0.1 * 2**attempt

    def hello(self) -> bytes:
        token = None if self.token_in_headers else self.options.token
        return protocol.encode_message(protocol.HELLO, protocol.hello_body(token))

    def accept_metadata(self, message: bytes | bytearray | memoryview) -> dict[str, Any]:
        meta = self.reply(message, protocol.METADATA)
        protocol.check_version(meta.get("protocol"), "server")
        self.metadata = meta
        return meta

    # -- calls -----------------------------------------------------------------------------------
    def request(self, kind: int, body: Any) -> Message:
        if self.accepts_parts and isinstance(body, dict):
            return protocol.encode_message_parts(kind, body)
        return protocol.encode_message(kind, body)

    def resend_after(self, exc: BaseException, attempt: int, *, sent: bool) -> bool:
        """True when the failed request was not delivered and may go once more (``sent``: ``send`` returned)."""
        if attempt > 0:
            return False
        if sent:
            return isinstance(exc, RequestNotDelivered)
        return isinstance(exc, ConnectionLost) and not isinstance(exc, ReplyLost)

    @staticmethod
    def receive_failure(exc: Pi0RemoteError) -> Pi0RemoteError:
        """What a failure after the request was delivered becomes (never a silent resend)."""
        if isinstance(exc, ConnectionLost) and not isinstance(exc, (ReplyLost, RequestNotDelivered)):
            lost = ReplyLost(f"{exc}; the request was sent and may have run, so it is not sent again")
            lost.__cause__ = exc
            return lost
        return exc

    def reply(self, message: bytes | bytearray | memoryview, expected: int) -> dict[str, Any]:
        """A received message -> the reply map, or the typed error the server sent."""
        if len(message) > self.options.max_message_bytes:
            raise MessageTooLarge(
                f"reply of {len(message)} bytes exceeds the limit of {self.options.max_message_bytes}"
            )
        kind, body = protocol.split_message(message)
        reply = codec.unpackb(body)
        if kind == protocol.ERROR:
            raise from_wire(reply)
        if kind != expected:
            raise ProtocolError(
                f"expected a {protocol.KIND_NAMES[expected]} reply, got {protocol.KIND_NAMES.get(kind, kind)}"
            )
        if not isinstance(reply, dict):
            raise ProtocolError(f"a {protocol.KIND_NAMES[kind]} reply must be a map")
        return reply

    @staticmethod
    def keeps_connection(exc: BaseException) -> bool:
        """Whether the connection survives a typed error *reply* (a stream cannot resync after a size error)."""
        return not isinstance(exc, MessageTooLarge)


def add_client_timing(reply: dict[str, Any], t0: float, t1: float, t2: float, t3: float) -> dict[str, Any]:
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


__all__ = [
    "AsyncBytePump",
    "BytePump",
    "TransportOptions",
    "ClientSession",
    "DEFAULT_RETRIES",
    "check_options",
]
