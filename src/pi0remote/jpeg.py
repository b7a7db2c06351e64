"""JPEG camera payloads: the client compresses, the server decompresses before the policy.

Wire format: a camera entry of the request becomes a one-key map ``{"jpeg": <bytes>}`` instead of the
``uint8[3, H, W]`` array, e.g. ``{"cam_high": {"jpeg": b"\\xff\\xd8...", "layout": "chw"}, "state": ...}``.
The server's ``decode_obs`` calls :func:`decode_jpeg_fields` only when some value of the request is a
map, so raw requests pay nothing; the decoded array has the layout named by ``"layout"`` (``"chw"``
by default, like the canonical request, or ``"hwc"``), so the policy and its input validation see
exactly the array a raw request would have carried (up to JPEG's loss).

``simplejpeg`` (libjpeg-turbo; in the ``harness`` extra) is used when installed, Pillow otherwise.

Before anything is decoded, :func:`jpeg_size` reads the image size from the JPEG's frame header; the
server refuses an image whose size differs from its input spec, or over ``max_pixels`` where the spec
does not fix it, or a request whose images would decode to more than the message size limit (a
632-byte file can claim 16000 x 16000 pixels: 768 MB and seconds of CPU).
"""

from __future__ import annotations

from typing import Any

import numpy as np

JPEG_KEY = "jpeg"
"""The key of a map that stands for a JPEG-compressed image."""


def _backend() -> str:
    try:
        import simplejpeg  # noqa: F401

        return "simplejpeg"
    except ImportError:
        pass
    try:
        import PIL.Image  # noqa: F401

        return "pillow"
    except ImportError:
        raise ImportError("JPEG payloads need simplejpeg (pip install simplejpeg) or Pillow") from None


def encode_jpeg(image: np.ndarray, quality: int = 90, *, layout: str = "chw") -> bytes:
    """Compress a uint8 ``[3, H, W]`` (``layout="chw"``) or ``[H, W, 3]`` RGB image."""
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"JPEG needs a uint8 image with 3 axes, got {image.dtype} {list(image.shape)}")
    hwc = np.ascontiguousarray(image.transpose(1, 2, 0) if layout == "chw" else image)
    if _backend() == "simplejpeg":
        import simplejpeg

        return simplejpeg.encode_jpeg(hwc, quality=int(quality), colorspace="RGB")
    import io

    import PIL.Image

    buf = io.BytesIO()
    PIL.Image.fromarray(hwc, "RGB").save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def decode_jpeg(data: bytes | bytearray | memoryview, *, layout: str = "chw") -> np.ndarray:
    """Decompress to a contiguous uint8 ``[3, H, W]`` (``"chw"``) or ``[H, W, 3]`` (``"hwc"``) array."""
    if _backend() == "simplejpeg":
        import simplejpeg

        hwc = simplejpeg.decode_jpeg(bytes(data), colorspace="RGB")
    else:
        import io

        import PIL.Image

        hwc = np.asarray(PIL.Image.open(io.BytesIO(bytes(data))).convert("RGB"))
    if layout == "hwc":
        return np.ascontiguousarray(hwc)
    if layout != "chw":
        raise ValueError(f"unknown image layout {layout!r} (chw or hwc)")
    return np.ascontiguousarray(hwc.transpose(2, 0, 1))


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
"""Start-of-frame markers (baseline, progressive, lossless, arithmetic); not DHT, JPG, DAC."""


def jpeg_size(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """``(height, width)`` from a JPEG's frame header, without decoding; ValueError when there is none."""
    view = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else data
    n = len(view)
    if n < 4 or view[0] != 0xFF or view[1] != 0xD8:
        raise ValueError("not a JPEG (no SOI marker)")
    i = 2
    while i + 4 <= n:
        if view[i] != 0xFF:
            raise ValueError(f"corrupt JPEG: no marker at byte {i}")
        marker = view[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # TEM, RSTn: no length
            i += 2
            continue
        length = (view[i + 2] << 8) | view[i + 3]
        if length < 2:
            raise ValueError("corrupt JPEG: bad segment length")
        if marker in _SOF_MARKERS:
            if i + 9 > n:
                break
            height = (view[i + 5] << 8) | view[i + 6]
            width = (view[i + 7] << 8) | view[i + 8]
            return height, width
        if marker in (0xDA, 0xD9):  # start of scan / end of image before any frame header
            break
        i += 2 + length
    raise ValueError("JPEG has no frame header")


def _expected_hw(spec: Any, layout: str) -> tuple[int, int] | None:
    """(height, width) an input spec fixes for an image (``-1`` for a free axis), or None."""
    shape = tuple(getattr(spec, "shape", ()) or ())
    if len(shape) != 3:
        return None
    return (shape[1], shape[2]) if layout == "chw" else (shape[0], shape[1])


def check_jpeg_size(
    key: str, data: bytes | bytearray | memoryview, layout: str, spec: Any, max_pixels: int
) -> int:
    """Refuse an image whose header size breaks the spec or ``max_pixels``; returns its decoded bytes."""
    from .errors import InvalidInputError

    try:
        height, width = jpeg_size(data)
    except ValueError as exc:
        raise InvalidInputError(f"{key!r}: cannot decode JPEG: {exc}") from None
    if height == 0 or width == 0:
        raise InvalidInputError(f"{key!r}: JPEG of {height}x{width} pixels")
    expected = _expected_hw(spec, layout) if spec is not None else None
    if expected is not None:
        for axis, want, got in (("height", expected[0], height), ("width", expected[1], width)):
            if want != -1 and want != got:
                raise InvalidInputError(f"{key!r}: JPEG {axis} is {got}, the input spec expects {want}")
    if (expected is None or -1 in expected) and height * width > max_pixels:
        raise InvalidInputError(
            f"{key!r}: JPEG of {width}x{height} pixels exceeds the limit of {max_pixels} pixels"
        )
    return height * width * 3


def is_jpeg_field(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and JPEG_KEY in value
        and isinstance(value[JPEG_KEY], (bytes, bytearray, memoryview))
    )


def decode_jpeg_fields(
    obs: dict[str, Any],
    *,
    spec: dict[str, Any] | None = None,
    max_pixels: int = 4096 * 4096,
    max_total_bytes: int | None = None,
) -> dict[str, Any]:
    """Replace every ``{"jpeg": bytes}`` value of ``obs`` by its decoded image (in place; returns ``obs``).

    Other map values (e.g. a simulator's ``env_state``) are left alone. Sizes are checked from the
    headers first (:func:`check_jpeg_size`; all of the request's images together may not decode to
    more than ``max_total_bytes``). A corrupt or oversized JPEG raises
    :class:`~pi0remote.errors.InvalidInputError`, which the client gets as a typed error.
    """
    from .errors import InvalidInputError

    fields = [(k, v) for k, v in obs.items() if is_jpeg_field(v)]
    total = 0
    layouts = {}
    for key, value in fields:
        layout = value.get("layout", "chw")
        if layout not in ("chw", "hwc"):
            raise InvalidInputError(f"{key!r}: unknown image layout {layout!r:.40} (chw or hwc)")
        layouts[key] = layout
        total += check_jpeg_size(key, value[JPEG_KEY], layout, (spec or {}).get(key), max_pixels)
    if max_total_bytes is not None and total > max_total_bytes:
        raise InvalidInputError(
            f"the request's JPEG images decode to {total} bytes, over the limit of {max_total_bytes}"
        )
    for key, value in fields:
        try:
            obs[key] = decode_jpeg(value[JPEG_KEY], layout=layouts[key])
        except ImportError:
            raise
        except Exception as exc:
            raise InvalidInputError(f"{key!r}: cannot decode JPEG: {exc}") from exc
    return obs


def jpeg_obs(obs: dict[str, Any], quality: int = 90, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    """A copy of ``obs`` whose camera arrays (uint8, 3 axes; or just ``keys``) are sent as JPEG."""
    out = dict(obs)
    for key, value in obs.items():
        if keys is not None and key not in keys:
            continue
        if (
            isinstance(value, np.ndarray)
            and value.dtype == np.uint8
            and value.ndim == 3
            and value.shape[0] == 3
        ):
            out[key] = {JPEG_KEY: encode_jpeg(value, quality)}
    return out


__all__ = [
    "JPEG_KEY",
    "check_jpeg_size",
    "decode_jpeg",
    "decode_jpeg_fields",
    "jpeg_size",
    "encode_jpeg",
    "is_jpeg_field",
    "jpeg_obs",
]
