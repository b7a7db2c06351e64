"""The server-side policy contract.

A policy is any object with ``infer(obs: dict) -> dict``; it may also have

* ``metadata`` (a dict, see :class:`PolicyMetadata`): input spec, action shape, horizon, anything else;
* ``reset()``: called when a client asks for a new episode;
* ``infer_batch(list[dict]) -> list[dict]``: several observations at once (the server batches
  concurrent requests into one call when ``--max-batch`` > 1);
* ``metadata.extra["rtc"] = True``: it honours a request's ``rtc`` field (real-time chunking, see
  :mod:`pi0remote.rtc`); the server refuses that field for every other policy (:func:`validate_request`);
* ``inline = True``: ``infer`` is non-blocking and takes microseconds, so the server may call it on
  its event loop instead of handing it to the policy thread (the built-in ``zeros`` and ``echo``).

``infer`` returns a dict holding at least ``"action"`` (a numpy array, ``action_shape``). It may add
``"policy_timing"``: a dict of millisecond figures that the server forwards inside ``server_timing``
(for π₀: host preprocessing, device compute, postprocessing), and ``"inference_ms"`` when the policy
knows its true compute time better than the server's wall clock around the call.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import InvalidInputError


@runtime_checkable
class Policy(Protocol):
    def infer(self, obs: dict[str, Any]) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ArraySpec:
    """One expected array in a request."""

    dtype: str
    """numpy dtype name, e.g. ``"uint8"``."""
    shape: tuple[int, ...]
    """Expected shape; ``-1`` matches any length on that axis."""

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ArraySpec:
        return cls(dtype=str(d["dtype"]), shape=tuple(int(x) for x in d["shape"]))

    def __post_init__(self) -> None:
        object.__setattr__(self, "_np_dtype", np.dtype(self.dtype))

    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, np.ndarray):
            raise InvalidInputError(f"{name!r}: expected a {self.dtype} array, got {type(value).__name__}")
        if value.dtype != self._np_dtype:  # type: ignore[attr-defined]
            raise InvalidInputError(f"{name!r}: expected dtype {self.dtype}, got {value.dtype}")
        shape = value.shape
        if shape != self.shape and (
            len(shape) != len(self.shape)
            or any(e != -1 and e != s for e, s in zip(self.shape, shape, strict=True))
        ):
            raise InvalidInputError(f"{name!r}: expected shape {list(self.shape)}, got {list(shape)}")


CANONICAL_INPUT_SPEC: dict[str, ArraySpec] = {
    "cam_high": ArraySpec("uint8", (3, 224, 224)),
    "state": ArraySpec("float32", (14,)),
}
"""The canonical ALOHA request: one top camera as CHW uint8 and 14 joint positions."""


@dataclass
class PolicyMetadata:
    """What a server tells a client about its policy (sent in the hello reply and ``GET /metadata``)."""

    name: str
    """Policy name as the server was started with it."""
    input_spec: dict[str, ArraySpec] = field(default_factory=dict)
    """Arrays every request must carry; other keys (more cameras, ``prompt``) pass through."""
    action_shape: tuple[int, int] = (50, 14)
    """Shape of the ``action`` chunk in each reply."""
    action_horizon: int = 50
    """Number of steps in a chunk (the first axis of ``action_shape``)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything else the policy wants clients to know (e.g. ``needs_env_state`` for the sim expert)."""

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.extra)
        d.update(
            name=self.name,
            input_spec={k: v.to_dict() for k, v in self.input_spec.items()},
            action_shape=list(self.action_shape),
            action_horizon=self.action_horizon,
        )
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PolicyMetadata:
        known = {"name", "input_spec", "action_shape", "action_horizon"}
        shape = tuple(int(x) for x in d.get("action_shape", (50, 14)))
        return cls(
            name=str(d.get("name", "policy")),
            input_spec={k: ArraySpec.from_dict(v) for k, v in dict(d.get("input_spec", {})).items()},
            action_shape=(shape[0], shape[1]) if len(shape) == 2 else (50, 14),
            action_horizon=int(d.get("action_horizon", shape[0] if shape else 50)),
            extra={k: v for k, v in d.items() if k not in known},
        )


def policy_metadata(policy: Any, name: str) -> PolicyMetadata:
    """Read a policy's ``metadata`` attribute (dict or :class:`PolicyMetadata`), with defaults."""
    meta = getattr(policy, "metadata", None)
    if isinstance(meta, PolicyMetadata):
        return meta
    if isinstance(meta, Mapping):
        d = dict(meta)
        d.setdefault("name", name)
        return PolicyMetadata.from_dict(d)
    return PolicyMetadata(name=name)


def validate_obs(obs: Any, spec: Mapping[str, ArraySpec]) -> None:
    """Raise :class:`InvalidInputError` unless ``obs`` is a dict carrying every array in ``spec``."""
    if not isinstance(obs, dict):
        raise InvalidInputError(f"observation must be a map, got {type(obs).__name__}")
    for key, s in spec.items():
        if key not in obs:
            raise InvalidInputError(f"missing key {key!r} (expected keys: {sorted(spec)})")
        s.check(key, obs[key])


def validate_request(obs: Any, meta: PolicyMetadata) -> None:
    """:func:`validate_obs` against ``meta.input_spec``, and refuse an ``rtc`` field unless the policy
    declares ``"rtc": true`` (never run a real-time-chunking request unguided)."""
    validate_obs(obs, meta.input_spec)
    if "rtc" in obs:  # the rest of the check only when the field is there (hot path)
        from ..rtc import check_supported

        check_supported(obs, meta.extra)
