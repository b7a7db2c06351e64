"""The wire protocol tested with bytes alone: framing, message kinds, result timing."""

from __future__ import annotations

import time

import numpy as np
import pytest

from pi0remote import codec, protocol
from pi0remote.errors import CodecError, MessageTooLarge, ProtocolError, VersionMismatch


def frame(message: bytes) -> bytes:
    return protocol.frame_header(len(message)) + message


def test_frames_reassemble_from_single_bytes() -> None:
    msgs = [protocol.encode_message(protocol.INFER, {"i": i, "pad": b"x" * (i * 37)}) for i in range(5)]
    stream = b"".join(frame(m) for m in msgs)
    dec = protocol.FrameDecoder()
    out = []
    for i in range(len(stream)):
        dec.feed(stream[i : i + 1])
        out.extend(dec.messages())
        if i < len(stream) - 1:
            assert dec.mid_frame or out  # either inside a frame or between completed ones
    assert [bytes(m) for m in out] == msgs
    assert not dec.mid_frame


def test_many_frames_in_one_feed_and_split_across_feeds() -> None:
    msgs = [protocol.encode_message(protocol.RESET, {}) for _ in range(3)]
    stream = b"".join(frame(m) for m in msgs)
    dec = protocol.FrameDecoder()
    dec.feed(stream[:7])
    dec.feed(stream[7:])
    assert [bytes(m) for m in dec.messages()] == msgs


def test_buffered_interface_writes_in_place() -> None:
    msg = protocol.encode_message(protocol.INFER, {"a": np.arange(10)})
    data = frame(msg)
    dec = protocol.FrameDecoder()
    pos = 0
    while pos < len(data):
        buf = dec.get_buffer()
        n = min(len(buf), 3)
        buf[:n] = data[pos : pos + n]
        dec.buffer_updated(n)
        pos += n
    assert bytes(dec.pop()) == msg


def test_oversized_frame_is_rejected_at_its_header() -> None:
    dec = protocol.FrameDecoder(max_message_bytes=1000)
    with pytest.raises(MessageTooLarge):
        dec.feed(protocol.frame_header(1001))
    assert dec.broken
    with pytest.raises(ProtocolError):
        dec.get_buffer()


def test_empty_frame_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        protocol.FrameDecoder().feed(b"\x00\x00\x00\x00")


def test_message_kinds() -> None:
    kind, body = protocol.decode_message(protocol.encode_message(protocol.HELLO, protocol.hello_body("t")))
    assert kind == protocol.HELLO and body == {"protocol": 1, "client": "pi0remote", "token": "t"}
    with pytest.raises(ProtocolError):
        protocol.split_message(b"\x63\x80")  # unknown kind 99
    with pytest.raises(ProtocolError):
        protocol.split_message(b"\x03")  # kind without a body


def test_version_check() -> None:
    protocol.check_version(1, "server")
    with pytest.raises(VersionMismatch):
        protocol.check_version(2, "server")
    with pytest.raises(VersionMismatch):
        protocol.check_version(None, "server")


def test_result_carries_its_own_encode_time() -> None:
    started = time.perf_counter()
    timing = {"decode_ms": 0.1, "queue_ms": 0.0, "policy_ms": 2.0}
    msg = protocol.encode_result(
        {"action": np.ones((50, 14), np.float32), "inference_ms": 2.0}, timing, started
    )
    kind, body = protocol.decode_message(msg)
    assert kind == protocol.RESULT
    st = body["server_timing"]
    assert st["encode_ms"] > 0 and st["total_ms"] >= st["encode_ms"]
    np.testing.assert_array_equal(body["action"], np.ones((50, 14), np.float32))
    # HTTP carries the body without the kind byte
    plain = protocol.encode_result({"action": np.zeros(2)}, {"policy_ms": 0.0}, started, with_kind=False)
    assert "server_timing" in codec.unpackb(plain)


def test_message_parts_join_to_the_message() -> None:
    """Scatter-gather parts (large C-contiguous arrays sent from their memory, heads from a cache)."""
    big = np.arange(3 * 224 * 224, dtype=np.uint8).reshape(3, 224, 224)
    bodies = [
        {"cam_high": big, "state": np.arange(14, dtype=np.float32)},
        {"f": np.asfortranarray(big), "be": big.astype(">u2"), "small": big[0, 0]},
        {"sliced": big[:, ::2], "empty": np.zeros((0, 40000), np.uint8), "x": 1, "s": "text"},
    ]
    for body in bodies * 2:
        parts = protocol.encode_message_parts(protocol.INFER, body)
        assert b"".join(parts) == protocol.encode_message(protocol.INFER, body)
    assert len(protocol.encode_message_parts(protocol.INFER, bodies[0])) == 3  # the camera uncopied
    with pytest.raises(CodecError):
        protocol.encode_message_parts(protocol.INFER, {"t": np.zeros(40000, "M8[s]")})


@pytest.mark.parametrize("size", [0, 5, 125, 126, 1000, 70000])
def test_websocket_client_frames_match_the_websockets_serializer(size: int) -> None:
    """The sync ws client masks scatter-gather parts itself; the bytes must be RFC 6455's frame."""
    from unittest import mock

    from websockets.frames import Frame, Opcode

    from pi0remote.client.ws import masked_binary_frame

    body = {"x": np.arange(size, dtype=np.uint8), "y": np.arange(40000, dtype=np.uint8)}
    parts = protocol.encode_message_parts(protocol.INFER, body)
    with mock.patch("os.urandom", return_value=b"\x01\x02\x03\x04"):
        ours = b"".join(bytes(p) for p in masked_binary_frame(parts))
    with mock.patch("secrets.token_bytes", return_value=b"\x01\x02\x03\x04"):
        reference = Frame(Opcode.BINARY, b"".join(parts)).serialize(mask=True)
    assert ours == reference
