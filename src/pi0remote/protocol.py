"""The wire protocol, without any I/O (docs/protocol.md is the prose version).

A *message* is one kind byte followed by one msgpack body::

    message = kind:u8 || msgpack(body)

Stream transports (TCP, QUIC streams) put a 4-byte big-endian length before each message::

    frame = length:u32be || message          (length counts the message, kind byte included)

WebSocket carries one message per binary WebSocket message. HTTP carries the body alone: the endpoint
says the kind (``POST /infer`` is INFER, the reply's status says RESULT or ERROR).

Sequence on a stream or WebSocket connection: the client sends HELLO ``{"protocol": 1, "token": ...}``;
the server answers METADATA (or ERROR and closes). Then any number of INFER → RESULT | ERROR and
RESET → RESET_OK | ERROR exchanges, strictly one reply per request, in order.
"""

from __future__ import annotations

import struct
import time
from collections import deque
from typing import Any

from . import codec
from .errors import CodecError, MessageTooLarge, ProtocolError, VersionMismatch, to_wire

PROTOCOL_VERSION = 1

HELLO = 1
METADATA = 2
INFER = 3
RESULT = 4
ERROR = 5
RESET = 6
RESET_OK = 7

KIND_NAMES = {
    HELLO: "hello",
    METADATA: "metadata",
    INFER: "infer",
    RESULT: "result",
    ERROR: "error",
    RESET: "reset",
    RESET_OK: "reset_ok",
}

DEFAULT_MAX_MESSAGE_BYTES = 32 * 1024 * 1024
HEADER = struct.Struct("!I")


def encode_message(kind: int, body: Any) -> bytes:
    """One message: the kind byte then the msgpack body, built in one buffer."""
    packer = codec.new_packer()
    try:
        packer.pack(kind)  # kinds are < 128: msgpack writes them as the single byte itself
        packer.pack(body)
    except CodecError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise CodecError(f"cannot encode payload: {exc}") from exc
    return packer.bytes()


def split_message(message: bytes | bytearray | memoryview) -> tuple[int, memoryview]:
    """Kind and body view of a message, without copying."""
    view = memoryview(message)
    if len(view) < 2:
        raise ProtocolError(f"message of {len(view)} bytes is too short")
    kind = view[0]
    if kind not in KIND_NAMES:
        raise ProtocolError(f"unknown message kind {kind}")
    return kind, view[1:]


def decode_message(message: bytes | bytearray | memoryview) -> tuple[int, Any]:
    kind, body = split_message(message)
    return kind, codec.unpackb(body)


def frame_header(message_length: int) -> bytes:
    return HEADER.pack(message_length)


def hello_body(token: str | None, *, client: str = "pi0remote") -> dict[str, Any]:
    body: dict[str, Any] = {"protocol": PROTOCOL_VERSION, "client": client}
    if token is not None:
        body["token"] = token
    return body


def check_version(remote: Any, who: str) -> None:
    """Raise :class:`VersionMismatch` unless ``remote`` speaks our protocol version."""
    if remote != PROTOCOL_VERSION:
        raise VersionMismatch(
            f"{who} speaks protocol version {remote!r}; this side speaks {PROTOCOL_VERSION}"
        )


def encode_error(exc: BaseException) -> bytes:
    return encode_message(ERROR, to_wire(exc))


def encode_result(
    reply: dict[str, Any], timing: dict[str, float], started: float, *, with_kind: bool = True
) -> bytes:
    """A RESULT message whose ``server_timing`` includes the time spent encoding it.

    ``started`` is the ``perf_counter()`` at which the server began handling the request; the timing map
    is packed last, so ``encode_ms`` covers everything but that small map itself.
    """
    t0 = time.perf_counter()
    packer = codec.new_packer()
    try:
        if with_kind:
            packer.pack(RESULT)
        has_timing = "server_timing" in reply
        packer.pack_map_header(len(reply) + (0 if has_timing else 1))
        for key, value in reply.items():
            if key != "server_timing":
                packer.pack(key)
                packer.pack(value)
        now = time.perf_counter()
        timing["encode_ms"] = (now - t0) * 1000.0
        timing["total_ms"] = (now - started) * 1000.0
        packer.pack("server_timing")
        packer.pack(timing)
    except CodecError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise CodecError(f"policy reply cannot be encoded: {exc}") from exc
    return packer.bytes()


class FrameDecoder:
    """Sans-I/O reassembly of length-prefixed frames.

    Feed it bytes with :meth:`feed`, or let an ``asyncio.BufferedProtocol`` / ``socket.recv_into`` write
    straight into :meth:`get_buffer` and report with :meth:`buffer_updated` (no intermediate copies:
    each message lands in its own exactly-sized ``bytearray``). Complete messages are drained with
    :meth:`pop` / :meth:`messages`. A frame over ``max_message_bytes`` raises :class:`MessageTooLarge`
    as soon as its header arrives; after that the stream cannot be resynchronised and must be closed.
    """

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.max_message_bytes = max_message_bytes
        self._header = bytearray(HEADER.size)
        self._target: bytearray = self._header
        self._filled = 0
        self._in_body = False
        self._ready: deque[bytearray] = deque()
        self.broken = False

    @property
    def mid_frame(self) -> bool:
        """True when part of a frame has arrived and the rest has not (a truncated or slow frame)."""
        return self._in_body or self._filled > 0

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        if self.broken:
            raise ProtocolError("stream is broken after a framing error")
        return memoryview(self._target)[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self._filled += nbytes
        if self._filled < len(self._target):
            return
        if not self._in_body:
            (length,) = HEADER.unpack(self._header)
            if length > self.max_message_bytes:
                self.broken = True
                raise MessageTooLarge(
                    f"frame of {length} bytes exceeds the limit of {self.max_message_bytes}"
                )
            if length == 0:
                self.broken = True
                raise ProtocolError("empty frame")
            self._target = bytearray(length)
            self._in_body = True
        else:
            self._ready.append(self._target)
            self._target = self._header
            self._in_body = False
        self._filled = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            buf = self.get_buffer()
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            view = view[n:]
            self.buffer_updated(n)

    def pop(self) -> bytearray | None:
        return self._ready.popleft() if self._ready else None

    def messages(self) -> list[bytearray]:
        out = list(self._ready)
        self._ready.clear()
        return out
