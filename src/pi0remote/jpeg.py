"""JPEG camera payloads: the client compresses, the server decompresses before the policy.

Wire format: a camera entry of the request becomes a one-key map ``{"jpeg": <bytes>}`` instead of the
``uint8[3, H, W]`` array, e.g. ``{"cam_high": {"jpeg": b"\\xff\\xd8...", "layout": "chw"}, "state": ...}``.
The server's ``decode_obs`` calls :func:`decode_jpeg_fields` only when some value of the request is a
map, so raw requests pay nothing; the decoded array has the layout named by ``"layout"`` (``"chw"``
by default, like the canonical request, or ``"hwc"``), so the policy and its input validation see
exactly the array a raw request would have carried (up to JPEG's loss).

``simplejpeg`` (libjpeg-turbo; in the ``harness`` extra) is used when installed, Pillow otherwise.
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


def is_jpeg_field(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and JPEG_KEY in value
        and isinstance(value[JPEG_KEY], (bytes, bytearray, memoryview))
    )


def decode_jpeg_fields(obs: dict[str, Any]) -> dict[str, Any]:
    """Replace every ``{"jpeg": bytes}`` value of ``obs`` by its decoded image (in place; returns ``obs``).

    Other map values (e.g. a simulator's ``env_state``) are left alone. A corrupt JPEG raises
    :class:`~pi0remote.errors.InvalidInputError`, which the client gets as a typed error.
    """
    from .errors import InvalidInputError

    for key, value in list(obs.items()):
        if is_jpeg_field(value):
            try:
                obs[key] = decode_jpeg(value[JPEG_KEY], layout=str(value.get("layout", "chw")))
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


__all__ = ["JPEG_KEY", "decode_jpeg", "decode_jpeg_fields", "encode_jpeg", "is_jpeg_field", "jpeg_obs"]
