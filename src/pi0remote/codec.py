"""msgpack + numpy: the only place that turns payloads into bytes and back.

Rules (docs/protocol.md has the byte-level description):

* Arrays travel as maps in the msgpack-numpy layout ``{b"nd": True, b"type": dtype.str, b"kind": b"",
  b"shape": [...], b"data": <bin>}``; numpy scalars as ``{b"nd": False, b"type": ..., b"data": <bin>}``.
  openpi's layout (``{b"__ndarray__": True, b"data", b"dtype", b"shape"}``) is decoded too.
* Never pickle. Only bool, signed/unsigned integer, float and complex dtypes are accepted; object, void,
  string and datetime dtypes are rejected with :class:`~pi0remote.errors.CodecError`.
* Arrays are encoded from the array's own memory (no ``tobytes`` copy when C-contiguous) and decoded as
  read-only views over the received ``bin`` object (no copy). Copy an array before writing into it.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

from .errors import CodecError

ALLOWED_KINDS = frozenset("biufc")
"""numpy dtype kinds that may cross the wire: bool, int, uint, float, complex."""


def _encode_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in ALLOWED_KINDS:
            raise CodecError(
                f"cannot send arrays of dtype {obj.dtype} (allowed kinds: bool, int, uint, float, complex)"
            )
        if not obj.flags.c_contiguous:
            obj = np.ascontiguousarray(obj)
        data = memoryview(obj).cast("B") if obj.ndim and obj.size else obj.tobytes()
        return {b"nd": True, b"type": obj.dtype.str, b"kind": b"", b"shape": obj.shape, b"data": data}
    if isinstance(obj, np.generic):
        if obj.dtype.kind not in ALLOWED_KINDS:
            raise CodecError(f"cannot send numpy scalars of dtype {obj.dtype}")
        return {b"nd": False, b"type": obj.dtype.str, b"data": obj.tobytes()}
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    raise CodecError(f"cannot encode objects of type {type(obj).__name__}")


_DTYPE_CACHE: dict[Any, np.dtype] = {}
"""Accepted dtype fields seen before (a handful in practice), so the hot path skips parsing them."""


def _checked_dtype(type_str: Any) -> np.dtype:
    if not isinstance(type_str, (str, bytes)):
        raise CodecError(f"bad array dtype field: {type_str!r:.40}")
    cached = _DTYPE_CACHE.get(type_str)
    if cached is not None:
        return cached
    text = type_str.decode("ascii", "replace") if isinstance(type_str, bytes) else type_str
    if not isinstance(text, str) or len(text) > 16:
        raise CodecError(f"bad array dtype field: {type_str!r:.40}")
    try:
        dtype = np.dtype(text)
    except Exception as exc:  # numpy parses dtype strings itself: "," raises SyntaxError
        raise CodecError(f"unknown array dtype {text!r}") from exc
    if dtype.kind not in ALLOWED_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise CodecError(
            f"array dtype {dtype} is not allowed (allowed kinds: bool, int, uint, float, complex)"
        )
    if len(_DTYPE_CACHE) < 64:
        _DTYPE_CACHE[type_str] = dtype
    return dtype


def _array_from(data: Any, type_str: Any, shape: Any) -> np.ndarray:
    dtype = _checked_dtype(type_str)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError("array data must be a msgpack bin")
    if not isinstance(shape, (list, tuple)):
        raise CodecError(f"bad array shape {shape!r:.60}")
    count = 1
    for dim in shape:
        if type(dim) is not int or dim < 0:
            raise CodecError(f"bad array shape {shape!r:.60}")
        count *= dim
    if count * dtype.itemsize != len(data):
        raise CodecError(
            f"array data has {len(data)} bytes, shape {list(shape)} of {dtype} needs {count * dtype.itemsize}"
        )
    return np.frombuffer(data, dtype=dtype, count=count).reshape(shape)


def _decode_hook(obj: dict) -> Any:
    nd = obj.get(b"nd")
    if nd is True:
        return _array_from(obj.get(b"data"), obj.get(b"type"), obj.get(b"shape"))
    if nd is False and b"type" in obj and b"data" in obj:
        return _array_from(obj[b"data"], obj[b"type"], [])[()]
    if obj.get(b"__ndarray__") is True:
        return _array_from(obj.get(b"data"), obj.get(b"dtype"), obj.get(b"shape"))
    if obj.get(b"__npgeneric__") is True:
        return _array_from(obj.get(b"data"), obj.get(b"dtype"), [])[()]
    return obj


def packb(obj: Any) -> bytes:
    """Encode ``obj`` (dicts, lists, str, numbers, bytes, numpy arrays and scalars) to msgpack bytes."""
    try:
        return msgpack.packb(obj, default=_encode_default, use_bin_type=True)
    except CodecError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise CodecError(f"cannot encode payload: {exc}") from exc


def new_packer() -> msgpack.Packer:
    """A packer with the same rules as :func:`packb`, for building a message piece by piece."""
    return msgpack.Packer(default=_encode_default, use_bin_type=True, autoreset=False)


def unpackb(data: bytes | bytearray | memoryview) -> Any:
    """Decode msgpack produced by :func:`packb` (or by msgpack-numpy / openpi's client)."""
    try:
        return msgpack.unpackb(data, object_hook=_decode_hook, raw=False)
    except CodecError:
        raise
    except (msgpack.UnpackException, ValueError, TypeError, IndexError, KeyError, RecursionError) as exc:
        raise CodecError(f"malformed msgpack payload: {exc}") from exc
