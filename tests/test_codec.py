"""Codec round trips across dtypes and shapes, and its rejections."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from pi0remote import codec
from pi0remote.errors import CodecError

DTYPES = [
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
    "complex64",
    ">f4",
    ">i8",
]
SHAPES = [(), (0,), (1,), (14,), (3, 224, 224), (50, 14), (2, 0, 3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_array_round_trip(dtype: str, shape: tuple) -> None:
    rng = np.random.default_rng(0)
    arr = np.asarray(rng.random(shape) * 100).astype(dtype)
    out = codec.unpackb(codec.packb({"x": arr}))["x"]
    assert isinstance(out, np.ndarray)
    assert out.dtype == arr.dtype and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


def test_non_contiguous_and_scalars_and_nesting() -> None:
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    payload = {
        "t": base.T,
        "slice": base[:, ::2],
        "scalar": np.float32(1.5),
        "i": np.int64(-3),
        "nested": {"list": [1, "two", np.arange(3, dtype=np.uint8)], "none": None},
        "prompt": "transfer the cube",
        "raw": b"\x00\x01",
    }
    out = codec.unpackb(codec.packb(payload))
    np.testing.assert_array_equal(out["t"], base.T)
    np.testing.assert_array_equal(out["slice"], base[:, ::2])
    assert out["scalar"] == np.float32(1.5) and out["scalar"].dtype == np.float32
    assert out["i"] == -3 and out["i"].dtype == np.int64
    np.testing.assert_array_equal(out["nested"]["list"][2], np.arange(3, dtype=np.uint8))
    assert out["nested"]["list"][:2] == [1, "two"] and out["nested"]["none"] is None
    assert out["prompt"] == "transfer the cube" and out["raw"] == b"\x00\x01"


@pytest.mark.parametrize("dtype", ["uint8", "float32", ">f4", "complex64", "bool"])
@pytest.mark.parametrize("shape", [(), (0,), (14,), (50, 14), (3, 224, 224)])
@pytest.mark.parametrize("order", ["C", "F", "sliced"])
def test_array_bytes_are_msgpack_numpy_layout(dtype: str, shape: tuple, order: str) -> None:
    """Small arrays are copied and large ones sent from their memory: the bytes are the same either way."""
    arr = np.asarray(np.arange(int(np.prod(shape)) * 2).reshape(shape + (2,))[..., 0]).astype(dtype)
    if order == "F":
        arr = np.asfortranarray(arr)
    elif order == "sliced" and arr.ndim:
        arr = np.repeat(arr, 2, axis=-1)[..., ::2]
    reference = {b"nd": True, b"type": arr.dtype.str, b"kind": b"", b"shape": arr.shape}
    reference[b"data"] = np.ascontiguousarray(arr).tobytes() if arr.ndim else arr.tobytes()
    for _ in range(2):  # the dtype string comes from a cache the second time
        assert codec.packb({"x": arr}) == msgpack.packb({"x": reference}, use_bin_type=True)
    np.testing.assert_array_equal(codec.unpackb(codec.packb(arr)), arr)


def test_decode_does_not_copy_array_data() -> None:
    arr = np.arange(1000, dtype=np.float32)
    out = codec.unpackb(codec.packb({"a": arr}))["a"]
    assert not out.flags.writeable  # a view over the received bytes, not a fresh copy
    assert out.base is not None


def test_decodes_openpi_layout() -> None:
    arr = np.arange(6, dtype=np.int16).reshape(2, 3)
    wire = msgpack.packb(
        {"a": {b"__ndarray__": True, b"data": arr.tobytes(), b"dtype": arr.dtype.str, b"shape": arr.shape}}
    )
    np.testing.assert_array_equal(codec.unpackb(wire)["a"], arr)


@pytest.mark.parametrize(
    "value",
    [
        np.array(["a", "b"]),
        np.array([object()], dtype=object),
        np.zeros(2, dtype=[("x", "f4")]),
        np.array(["2020-01-01"], dtype="datetime64[D]"),
        object(),
        {1, 2j},
    ],
)
def test_encode_rejects(value) -> None:
    if isinstance(value, set):
        value = {"s": value}  # sets become lists; complex python numbers are not msgpack
    with pytest.raises(CodecError):
        codec.packb({"v": value})


def _nd(type_str, shape, data: bytes) -> bytes:
    return msgpack.packb(
        {"a": {b"nd": True, b"type": type_str, b"kind": b"", b"shape": shape, b"data": data}}
    )


@pytest.mark.parametrize(
    "wire",
    [
        _nd("|O", [1], b"\x00" * 8),  # object dtype: would need pickle
        _nd("|V8", [1], b"\x00" * 8),  # void
        _nd("<U1", [1], b"\x00" * 4),  # strings
        _nd("not-a-dtype", [1], b"\x00"),
        _nd("<f4", [3], b"\x00" * 8),  # data length does not match shape
        _nd("<f4", [-1], b""),  # negative dimension
        _nd("<f4", "bad", b""),
        _nd("[('a','<f4')]", [1], b"\x00" * 4),
        b"\xc1",  # reserved msgpack byte
        b"\x92\x01",  # truncated array
        b"",
    ],
)
def test_decode_rejects(wire: bytes) -> None:
    with pytest.raises(CodecError):
        codec.unpackb(wire)


def test_decode_rejects_pickle_payloads() -> None:
    import pickle

    with pytest.raises(CodecError):
        codec.unpackb(pickle.dumps({"a": 1}))
