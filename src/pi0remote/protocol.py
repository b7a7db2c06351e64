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
import threading
import time
from collections import deque
from typing import Any

import numpy as np

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


ZERO_COPY_MIN_BYTES = 16384
"""Arrays at least this large are sent from their own memory by :func:`encode_message_parts`."""


def encode_message_parts(kind: int, body: dict[str, Any]) -> list[bytes | memoryview]:
    """The same bytes as :func:`encode_message`, as a list of buffers for one scatter-gather write.

    Large C-contiguous arrays at the top level of ``body`` (camera frames) are not copied: their
    memory becomes a part of the list, between the msgpack bytes around it. Joining the parts gives
    exactly ``encode_message(kind, body)``.
    """
    packer = codec.new_packer()
    parts: list[bytes | memoryview] = []
    try:
        packer.pack(kind)
        packer.pack_map_header(len(body))
        for key, value in body.items():
            packer.pack(key)
            if (
                isinstance(value, np.ndarray)
                and value.nbytes >= ZERO_COPY_MIN_BYTES
                and value.dtype.kind in codec.ALLOWED_KINDS
            ):
                view = memoryview(value)  # one buffer export: its contiguity, then its bytes
                if view.c_contiguous:
                    parts.append(packer.bytes() + codec.array_head(value))
                    packer.reset()
                    parts.append(view.cast("B"))
                    continue
            packer.pack(value)
    except CodecError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise CodecError(f"cannot encode payload: {exc}") from exc
    parts.append(packer.bytes())
    return parts


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


_HTTP_STARTS = (b"HTTP", b"GET ", b"POST", b"PUT ", b"HEAD", b"DELE", b"OPTI", b"PATC", b"CONN")


def looks_like_http(header: bytes | bytearray) -> bool:
    """True when the 4 bytes where a frame length was expected start an HTTP request or response."""
    return bytes(header[:4]) in _HTTP_STARTS


def hello_body(token: str | None, *, client: str = "pi0remote") -> dict[str, Any]:
    body: dict[str, Any] = {"protocol": PROTOCOL_VERSION, "client": client}
    if token is not None:
        body["token"] = token
    return body


def check_version(remote: Any, who: str) -> None:
    """Raise :class:`VersionMismatch` unless ``remote`` speaks our protocol version."""
    if type(remote) is not int or remote != PROTOCOL_VERSION:
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


_SCRATCH = threading.local()
_NO_VIEW = memoryview(b"")


def _scratch() -> memoryview:
    """This thread's scratch read buffer (one per thread, shared by every decoder of that thread)."""
    view = getattr(_SCRATCH, "view", None)
    if view is None:
        view = _SCRATCH.view = memoryview(bytearray(FrameDecoder.SCRATCH_BYTES))
    return view


class FrameDecoder:
    """Sans-I/O reassembly of length-prefixed frames.

    Feed it bytes with :meth:`feed`, or let an ``asyncio.BufferedProtocol`` / ``socket.recv_into`` write
    into :meth:`get_buffer` and report with :meth:`buffer_updated` (the two calls must follow each other
    on one thread: between frames the buffer is a 256 KiB scratch area shared by the decoders of that
    thread, so one read takes a header and the start of its body together and an idle decoder holds no
    buffer). A body is received into its own ``bytearray``, which grows with the bytes that arrive
    (``start_bytes`` first, then doubling up to the declared length): a declared length is a limit, not
    an allocation, so a header claiming 32 MiB costs nothing until 32 MiB arrive. Inside a large body
    reads go straight into that buffer, without intermediate copies. Complete messages are drained
    with :meth:`pop` / :meth:`messages`. A frame over ``max_message_bytes`` raises
    :class:`MessageTooLarge` as soon as its header arrives; after that the stream cannot be
    resynchronised and must be closed.
    """

    SCRATCH_BYTES = 262144
    IN_PLACE_MIN = 65536
    """A body with at least this much left to come is read in place rather than through the scratch."""

    def __init__(
        self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, *, start_bytes: int = 262144
    ) -> None:
        self.max_message_bytes = max_message_bytes
        self.start_bytes = start_bytes
        """First allocation for a body (the server lowers it until a connection authenticates)."""
        self._header = bytearray(HEADER.size)
        self._header_filled = 0
        self._body: bytearray | None = None
        self._body_len = 0
        self._body_filled = 0
        self._ready: deque[bytearray] = deque()
        self.broken = False
        self._lent = _NO_VIEW
        self.rejected_header = b""
        """The 4 header bytes of a refused frame (see :func:`looks_like_http`)."""

    @property
    def mid_frame(self) -> bool:
        """True when part of a frame has arrived and the rest has not (a truncated or slow frame)."""
        return self._body is not None or self._header_filled > 0

    @property
    def buffered_bytes(self) -> int:
        """Bytes of memory this decoder holds for messages (received or allocated, popped excluded)."""
        return (len(self._body) if self._body is not None else 0) + sum(map(len, self._ready))

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        if self.broken:
            raise ProtocolError("stream is broken after a framing error")
        body = self._body
        if body is not None and self._body_len - self._body_filled >= self.IN_PLACE_MIN:
            if len(body) == self._body_filled:
                body = self._grow()
            return memoryview(body)[self._body_filled :]
        self._lent = _scratch()
        return self._lent

    def buffer_updated(self, nbytes: int) -> None:
        body = self._body
        if body is not None and self._body_len - self._body_filled >= self.IN_PLACE_MIN:
            self._body_filled += nbytes  # written in place
            if self._body_filled == self._body_len:
                self._finish_body()
            return
        self.feed(self._lent[:nbytes])  # the scratch get_buffer() just lent (this thread's)

    def _grow(self) -> bytearray:
        """A larger body buffer (a new one: the old may still be exported to a reader)."""
        assert self._body is not None
        size = min(self._body_len, max(2 * len(self._body), self.start_bytes, 4096))
        grown = bytearray(size)
        grown[: self._body_filled] = memoryview(self._body)[: self._body_filled]
        self._body = grown
        return grown

    def _finish_body(self) -> None:
        assert self._body is not None
        self._ready.append(self._body)
        self._body = None
        self._body_filled = 0

    def _start_body(self) -> None:
        (length,) = HEADER.unpack(self._header)
        self._header_filled = 0
        if length > self.max_message_bytes or length == 0:
            self.broken = True
            self.rejected_header = bytes(self._header)
            if length == 0:
                raise ProtocolError("empty frame")
            hint = (
                f" (the bytes {self.rejected_header!r} start HTTP, not a pi0remote frame: wrong port or scheme?)"
                if looks_like_http(self.rejected_header)
                else ""
            )
            raise MessageTooLarge(
                f"frame of {length} bytes exceeds the limit of {self.max_message_bytes}{hint}"
            )
        self._body = bytearray(min(length, max(self.start_bytes, 1)))
        self._body_len = length
        self._body_filled = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self.broken:
            raise ProtocolError("stream is broken after a framing error")
        view = memoryview(data)
        while view:
            body = self._body
            if body is None:
                n = min(HEADER.size - self._header_filled, len(view))
                self._header[self._header_filled : self._header_filled + n] = view[:n]
                self._header_filled += n
                view = view[n:]
                if self._header_filled == HEADER.size:
                    self._start_body()
            else:
                n = min(self._body_len - self._body_filled, len(view))
                if self._body_filled + n > len(body):
                    body = self._grow()
                    if self._body_filled + n > len(body):
                        body = self._grow_to(self._body_filled + n)
                body[self._body_filled : self._body_filled + n] = view[:n]
                self._body_filled += n
                view = view[n:]
                if self._body_filled == self._body_len:
                    self._finish_body()

    def _grow_to(self, size: int) -> bytearray:
        assert self._body is not None
        grown = bytearray(min(self._body_len, size))
        grown[: self._body_filled] = memoryview(self._body)[: self._body_filled]
        self._body = grown
        return grown

    @property
    def has_message(self) -> bool:
        """True when a complete message waits to be popped."""
        return bool(self._ready)

    def pop(self) -> bytearray | None:
        return self._ready.popleft() if self._ready else None

    def messages(self) -> list[bytearray]:
        out = list(self._ready)
        self._ready.clear()
        return out
