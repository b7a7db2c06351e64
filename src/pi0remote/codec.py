"""msgpack + numpy: the only place that turns payloads into bytes and back.

Rules (docs/protocol.md has the byte-level description):

* Arrays travel as maps in one of two *layouts*, chosen by ``layout=`` when encoding:
  ``"pi0remote"`` (msgpack-numpy's: ``{b"nd": True, b"type": dtype.str, b"kind": b"", b"shape": [...],
  b"data": <bin>}``; numpy scalars ``{b"nd": False, b"type": ..., b"data": <bin>}``) or ``"openpi"``
  (``{b"__ndarray__": True, b"data", b"dtype", b"shape"}``; numpy scalars ``{b"__npgeneric__": True,
  b"data": <number>, b"dtype"}``). Decoding accepts both, always.
* Never pickle. Only bool, signed/unsigned integer, float and complex dtypes are accepted; object, void,
  string and datetime dtypes are rejected with :class:`~pi0remote.errors.CodecError`.
* Arrays over :data:`SMALL_ARRAY_BYTES` are encoded from the array's own memory (no ``tobytes`` copy when
  C-contiguous; smaller ones are cheaper to copy) and decoded as read-only views over the received ``bin``
  object (no copy). Copy an array before writing into it.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

from .errors import CodecError

ALLOWED_KINDS = frozenset("biufc")
"""numpy dtype kinds that may cross the wire: bool, int, uint, float, complex."""


LAYOUTS = ("pi0remote", "openpi")


SMALL_ARRAY_BYTES = 4096
"""Arrays up to this size are copied (``tobytes``, any layout): cheaper than exporting their buffer."""


def _array_bytes(obj: np.ndarray) -> tuple[np.ndarray, Any]:
    if obj.dtype.kind not in ALLOWED_KINDS:
        raise CodecError(
            f"cannot send arrays of dtype {obj.dtype} (allowed kinds: bool, int, uint, float, complex)"
        )
    if obj.nbytes <= SMALL_ARRAY_BYTES:
        return obj, obj.tobytes()  # C order, whatever the layout (0-d and empty arrays too)
    view = memoryview(obj)
    if view.c_contiguous:
        return obj, view.cast("B")
    obj = np.ascontiguousarray(obj)
    return obj, memoryview(obj).cast("B")


def _other(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        raise CodecError(f"cannot send numpy scalars of dtype {obj.dtype}")
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    raise CodecError(f"cannot encode objects of type {type(obj).__name__}")


_TYPE_STR: dict[np.dtype, str] = {}
"""``dtype.str`` of the allowed dtypes sent before (numpy builds that string on every access)."""


def _type_str(dtype: np.dtype) -> str:
    """``dtype.str``, from :data:`_TYPE_STR` after the first time (a handful of dtypes in practice)."""
    text = _TYPE_STR.get(dtype)
    if text is None:
        text = dtype.str
        if len(_TYPE_STR) < 64:
            _TYPE_STR[dtype] = text
    return text


def _encode_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        dtype = obj.dtype
        if dtype.kind in ALLOWED_KINDS and obj.nbytes <= SMALL_ARRAY_BYTES:  # the hot path, inline
            data: Any = obj.tobytes()
        else:
            obj, data = _array_bytes(obj)
            dtype = obj.dtype
        return {
            b"nd": True,
            b"type": _TYPE_STR.get(dtype) or _type_str(dtype),
            b"kind": b"",
            b"shape": obj.shape,
            b"data": data,
        }
    if isinstance(obj, np.generic) and obj.dtype.kind in ALLOWED_KINDS:
        return {b"nd": False, b"type": obj.dtype.str, b"data": obj.tobytes()}
    return _other(obj)


def _encode_openpi(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        obj, data = _array_bytes(obj)
        return {b"__ndarray__": True, b"data": data, b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic) and obj.dtype.kind in ALLOWED_KINDS:
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    return _other(obj)


_DEFAULTS = {"pi0remote": _encode_default, "openpi": _encode_openpi}


def _default_for(layout: str) -> Any:
    try:
        return _DEFAULTS[layout]
    except KeyError:
        raise ValueError(f"unknown codec layout {layout!r}; choose from {LAYOUTS}") from None


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
    try:
        dtype = _DTYPE_CACHE.get(type_str)  # the hot path: a dtype field seen before
    except TypeError:  # an unhashable field (a list, a map): _checked_dtype says what is wrong
        dtype = None
    if dtype is None:
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
    return np.ndarray(shape, dtype, data)  # a view of ``data`` (read-only for bytes), its size checked above


def _decode_hook(obj: dict) -> Any:
    nd = obj.get(b"nd")
    if nd is True:
        return _array_from(obj.get(b"data"), obj.get(b"type"), obj.get(b"shape"))
    if nd is False and b"type" in obj and b"data" in obj:
        return _array_from(obj[b"data"], obj[b"type"], [])[()]
    if obj.get(b"__ndarray__") is True:
        return _array_from(obj.get(b"data"), obj.get(b"dtype"), obj.get(b"shape"))
    if obj.get(b"__npgeneric__") is True:
        data = obj.get(b"data")
        if isinstance(data, (bytes, bytearray, memoryview)):
            return _array_from(data, obj.get(b"dtype"), [])[()]
        return _scalar_from(data, obj.get(b"dtype"))
    return obj


def _scalar_from(value: Any, type_str: Any) -> Any:
    """openpi writes a numpy scalar's value as a plain msgpack number (``item()``), not as bytes."""
    dtype = _checked_dtype(type_str)
    if not isinstance(value, (bool, int, float)):
        raise CodecError(f"bad numpy scalar value {value!r:.40}")
    try:
        return dtype.type(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise CodecError(f"bad numpy scalar value {value!r:.40} for {dtype}") from exc


def _bin_header(n: int) -> bytes:
    if n < 1 << 8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 1 << 16:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


_HEADS: dict[tuple[str, np.dtype, tuple[int, ...]], bytes] = {}
""":func:`array_head` by (layout, dtype, shape): a robot sends the same few arrays on every call."""


def array_head(obj: np.ndarray, layout: str = "pi0remote") -> bytes:
    """An array's map up to its data: the map header, the fields, the ``data`` key and its bin header.

    Followed by the array's bytes, this is exactly what :func:`packb` writes for a C-contiguous array of
    an allowed dtype (``protocol.encode_message_parts`` sends the memory uncopied). Built once per layout,
    dtype and shape.
    """
    key = (layout, obj.dtype, obj.shape)
    head = _HEADS.get(key)
    if head is None:
        head = _pack_head(obj, layout)
        if len(_HEADS) < 64:
            _HEADS[key] = head
    return head


def _pack_head(obj: np.ndarray, layout: str) -> bytes:
    if obj.dtype.kind not in ALLOWED_KINDS:
        raise CodecError(f"cannot send arrays of dtype {obj.dtype}")
    if layout == "pi0remote":
        fields: tuple[tuple[bytes, Any], ...] = (
            (b"nd", True),
            (b"type", obj.dtype.str),
            (b"kind", b""),
            (b"shape", obj.shape),
        )
    else:
        _default_for(layout)  # an unknown layout is a ValueError
        fields = ((b"__ndarray__", True), (b"dtype", obj.dtype.str), (b"shape", obj.shape))
    packer = new_packer(layout)
    packer.pack_map_header(len(fields) + 1)
    for key, value in fields:
        packer.pack(key)
        packer.pack(value)
    packer.pack(b"data")
    return packer.bytes() + _bin_header(obj.nbytes)


def packb(obj: Any, *, layout: str = "pi0remote") -> bytes:
    """Encode ``obj`` (dicts, lists, str, numbers, bytes, numpy arrays and scalars) to msgpack bytes."""
    default = _encode_default if layout == "pi0remote" else _default_for(layout)
    try:
        return msgpack.packb(obj, default=default, use_bin_type=True)
    except CodecError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise CodecError(f"cannot encode payload: {exc}") from exc


def new_packer(layout: str = "pi0remote") -> msgpack.Packer:
    """A packer with the same rules as :func:`packb`, for building a message piece by piece."""
    default = _encode_default if layout == "pi0remote" else _default_for(layout)
    return msgpack.Packer(default=default, use_bin_type=True, autoreset=False)


def unpackb(data: bytes | bytearray | memoryview) -> Any:
    """Decode msgpack in either layout (:func:`packb`'s, msgpack-numpy's, openpi's); never a pickle."""
    try:
        return msgpack.unpackb(data, object_hook=_decode_hook, raw=False)
    except CodecError:
        raise
    except (msgpack.UnpackException, ValueError, TypeError, IndexError, KeyError, RecursionError) as exc:
        raise CodecError(f"malformed msgpack payload: {exc}") from exc
