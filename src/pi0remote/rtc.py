"""Real-time chunking (RTC): a flow policy's next chunk continues the one the robot is executing.

This module owns the whole server-side algorithm (Black, Galliker, Levine 2025, "Real-Time Execution
of Action Chunking Flow Policies"), written for openpi's flow convention:

* the request's optional ``"rtc": {"prefix": float32[n, A], "delay_steps": d}`` field, parsed and
  checked on the numpy side (:func:`parse_rtc`, no jax import), and the reply's
  ``"rtc": {"delay_steps", "beta", "prefix_error"}`` entry (:func:`rtc_reply`);
* the soft prefix mask :func:`prefix_weights` and the guided Euler sampler :func:`guided_sample`,
  in JAX (imported inside the functions, so ``import pi0remote.rtc`` stays light), generic over the
  policy's velocity function, jittable, with per-sample (traced) ``d``, ``n`` and prefix.

Horizons, as in the issue: a chunk has ``H`` actions (the policy's horizon); the robot executes
``s = H - n`` of them per chunk, so ``n`` actions of the previous chunk are still ahead of it when a
request goes out; the first ``d`` of those will have executed before the new chunk is in use
(``1 <= d <= n``). The kinetix reference calls ``n`` the ``prefix_attention_horizon``; LeRobot calls
``d`` the ``inference_delay``.

The sampler: openpi integrates ``x <- x + dt * v(x, t)`` from ``t = 1`` (noise) to ``t = 0`` (data)
with ``dt = -1/num_steps``; the denoised estimate is ``Â = x_t - t * v``. At each step the correction
``g = vjp(Â w.r.t. x_t)(W * (Y - Â))`` (``Y``: the prefix in model space, ``W``: the soft mask times
the mask of real action dimensions) enters as ``v - w * g`` with ``w = min(β, (1 - τ) / (τ r²))``,
``τ = 1 - t``, ``r² = (1 - τ)² / (τ² + (1 - τ)²)``. A sample with ``n = 0`` gets ``W = 0`` and is
sampled exactly as without guidance, so one batch may mix guided and unguided requests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InvalidInputError

SCHEDULES = ("exp", "linear")
"""Soft-mask shapes for steps ``d <= i < n``: ``c (e^c - 1) / (e - 1)`` or ``c``."""
DEFAULT_BETA = 5.0
"""The guidance clip β (the paper's default)."""
DEFAULT_SCHEDULE = "exp"
RTC_KEY = "rtc"
"""Request and reply field name."""
REQUEST_KEYS = frozenset({"prefix", "delay_steps"})


# ------------------------------------------------------------------------------------- numpy side


@dataclass(frozen=True)
class RtcRequest:
    """One request's checked ``rtc`` field."""

    prefix: np.ndarray
    """float32 [n, A]: the actions the robot will execute from the observation on, in robot units."""
    delay_steps: int
    """``d``: steps that pass before the new chunk is in use (1 <= d <= n)."""

    @property
    def prefix_len(self) -> int:
        return int(self.prefix.shape[0])


def check_schedule(schedule: str) -> str:
    if schedule not in SCHEDULES:
        raise ValueError(f"rtc schedule must be one of {SCHEDULES}, got {schedule!r}")
    return schedule


def check_beta(beta: float) -> float:
    beta = float(beta)
    if not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"rtc beta must be a positive number, got {beta}")
    return beta


def _delay(value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InvalidInputError(f"'rtc.delay_steps' must be an integer, got {type(value).__name__}")
    return int(value)


def _prefix(value: Any, horizon: int, action_dim: int) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise InvalidInputError(f"'rtc.prefix' must be a float32 array, got {type(value).__name__}")
    if value.dtype.kind != "f":
        raise InvalidInputError(f"'rtc.prefix' must be a float array, got dtype {value.dtype}")
    if value.ndim != 2 or value.shape[1] != action_dim or not 1 <= value.shape[0] <= horizon:
        raise InvalidInputError(
            f"'rtc.prefix' must have shape [n, {action_dim}] with 1 <= n <= {horizon}, got {list(value.shape)}"
        )
    prefix = value.astype(np.float32, copy=False)
    if not np.isfinite(prefix).all():
        raise InvalidInputError("'rtc.prefix' holds NaN or infinite values")
    return prefix


def parse_rtc(obs: Mapping[str, Any], horizon: int, action_dim: int) -> RtcRequest | None:
    """The checked ``rtc`` field of a request, or None when it has none.

    ``horizon``: the policy's chunk length H; ``action_dim``: the robot's action size A. Raises
    :class:`InvalidInputError` for anything but ``{"prefix": float[n, A], "delay_steps": d}`` with
    ``1 <= n <= H``, ``1 <= d <= n`` and finite values.
    """
    if RTC_KEY not in obs:
        return None
    field = obs[RTC_KEY]
    if not isinstance(field, Mapping):
        raise InvalidInputError(f"'rtc' must be a map, got {type(field).__name__}")
    missing, unknown = REQUEST_KEYS - set(field), set(field) - REQUEST_KEYS
    if missing or unknown:
        raise InvalidInputError(
            f"'rtc' must hold exactly 'prefix' and 'delay_steps' (missing {sorted(missing)}, "
            f"unknown {sorted(map(str, unknown))})"
        )
    prefix = _prefix(field["prefix"], horizon, action_dim)
    d = _delay(field["delay_steps"])
    if not 1 <= d <= len(prefix):
        raise InvalidInputError(f"'rtc.delay_steps' must be in [1, n={len(prefix)}], got {d}")
    return RtcRequest(prefix=prefix, delay_steps=d)


def prefix_error(chunk: np.ndarray, request: RtcRequest) -> float:
    """``max |chunk[:d] - prefix[:d]|`` in robot units (the reply's ``prefix_error``)."""
    d = request.delay_steps
    head = np.asarray(chunk, dtype=np.float32)[:d, : request.prefix.shape[1]]
    return float(np.max(np.abs(head - request.prefix[:d])))


def rtc_reply(request: RtcRequest, beta: float, chunk: np.ndarray) -> dict[str, Any]:
    """The reply's ``rtc`` entry for a guided ``chunk`` (robot units)."""
    return {
        "delay_steps": int(request.delay_steps),
        "beta": float(beta),
        "prefix_error": prefix_error(chunk, request),
    }


def check_supported(obs: Any, policy_meta_extra: Mapping[str, Any]) -> None:
    """The server's check for every policy: a request carrying ``rtc`` needs a policy that declares
    ``"rtc": true`` in its metadata; otherwise :class:`InvalidInputError` (never silently unguided)."""
    if isinstance(obs, dict) and RTC_KEY in obs and not policy_meta_extra.get(RTC_KEY):
        raise InvalidInputError(
            "this policy does not support real-time chunking; send the request without 'rtc'"
        )


@dataclass
class RtcBatch:
    """Numpy inputs for :func:`guided_sample` built from a batch's requests (see :func:`stack_requests`)."""

    prefix: np.ndarray
    """float32 [B, H, D] in model space, zero past each sample's n."""
    prefix_len: np.ndarray
    """int32 [B]; 0 for a sample without rtc (it is sampled unguided)."""
    delay_steps: np.ndarray
    """int32 [B]; 0 for a sample without rtc."""

    @property
    def any(self) -> bool:
        return bool(self.prefix_len.any())


def stack_requests(
    requests: Sequence[RtcRequest | None],
    horizon: int,
    model_dim: int,
    to_model: Callable[[np.ndarray], np.ndarray] | None = None,
) -> RtcBatch:
    """Pad and stack per-sample prefixes into model space.

    ``to_model(prefix [n, A]) -> [n, A']`` applies the policy's training-action transforms
    (normalization ...); its output is zero padded to ``model_dim`` (π₀ pads 14 joints to 32).
    """
    b = len(requests)
    prefix = np.zeros((b, horizon, model_dim), np.float32)
    n = np.zeros(b, np.int32)
    d = np.zeros(b, np.int32)
    for k, req in enumerate(requests):
        if req is None:
            continue
        y = req.prefix if to_model is None else np.asarray(to_model(req.prefix), np.float32)
        prefix[k, : y.shape[0], : y.shape[1]] = y
        n[k], d[k] = req.prefix_len, req.delay_steps
    return RtcBatch(prefix=prefix, prefix_len=n, delay_steps=d)


def dim_mask(action_dim: int, model_dim: int) -> np.ndarray:
    """float32 [model_dim]: 1 for the robot's action dimensions, 0 for padding."""
    mask = np.zeros(model_dim, np.float32)
    mask[:action_dim] = 1.0
    return mask


# --------------------------------------------------------------------------------------- jax side


def prefix_weights(horizon: int, prefix_len: Any, delay_steps: Any, schedule: str = "exp") -> Any:
    """Soft mask W: [H] for scalar ``prefix_len``/``delay_steps``, [B, H] for [B] arrays.

    ``W_i = 1`` for ``i < d``; ``c_i (e^{c_i} - 1) / (e - 1)`` ("exp") or ``c_i`` ("linear") with
    ``c_i = (n - i) / (n - d + 1)`` for ``d <= i < n``; 0 for ``i >= n``. ``d`` is clipped to
    ``[0, n]``; traced values are fine.
    """
    import jax.numpy as jnp

    check_schedule(schedule)
    n = jnp.asarray(prefix_len, jnp.int32)[..., None]
    d = jnp.clip(jnp.asarray(delay_steps, jnp.int32)[..., None], 0, n)
    i = jnp.arange(horizon, dtype=jnp.int32)
    c = (n - i).astype(jnp.float32) / jnp.maximum(n - d + 1, 1).astype(jnp.float32)
    soft = c * jnp.expm1(c) / (math.e - 1.0) if schedule == "exp" else c
    return jnp.where(i < d, 1.0, jnp.where(i < n, soft, 0.0)).astype(jnp.float32)


def guidance_weight(t: Any, beta: Any) -> Any:
    """``min(β, (1 - τ) / (τ r²))`` with ``τ = 1 - t``, ``r² = (1 - τ)² / (τ² + (1 - τ)²)`` (β at the ends)."""
    import jax.numpy as jnp

    tau = 1.0 - jnp.asarray(t, jnp.float32)
    den = tau * (1.0 - tau)
    w = (tau**2 + (1.0 - tau) ** 2) / jnp.where(den > 0, den, 1.0)
    return jnp.where(den > 0, jnp.minimum(beta, w), beta)


def guided_sample(
    velocity_fn: Callable[[Any, Any], Any],
    noise: Any,
    *,
    num_steps: int,
    prefix: Any,
    prefix_len: Any,
    delay_steps: Any,
    beta: Any = DEFAULT_BETA,
    schedule: str = DEFAULT_SCHEDULE,
    dim_mask: Any = None,
) -> Any:
    """Guided Euler sampling: noise [B, H, D] at ``t = 1`` to actions [B, H, D] at ``t = 0``.

    ``velocity_fn(x_t [B, H, D], t float32 [B]) -> v [B, H, D]`` (openpi's convention, see the module
    docstring). ``prefix`` [B, H, D] model space, zero padded past ``prefix_len``; ``prefix_len``,
    ``delay_steps`` int [B] (traced); ``dim_mask`` [D]: 1 for real action dims, 0 for padding.
    ``num_steps`` and ``schedule`` are static under ``jax.jit``; ``beta`` may be traced.
    """
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(noise)
    weights = prefix_weights(x.shape[1], prefix_len, delay_steps, schedule)[..., None]  # [B, H, 1]
    if dim_mask is not None:
        weights = weights * jnp.asarray(dim_mask, x.dtype)
    weights = weights.astype(x.dtype)
    target = jnp.asarray(prefix, x.dtype)
    dt = -1.0 / num_steps

    def step(k: Any, x_t: Any) -> Any:
        t = jnp.full((x_t.shape[0],), 1.0 + k * dt, jnp.float32)

        def denoise(x_in: Any) -> tuple[Any, Any]:
            v = velocity_fn(x_in, t)
            return x_in - t[:, None, None].astype(x_in.dtype) * v, v

        a_hat, pullback, v = jax.vjp(denoise, x_t, has_aux=True)
        (g,) = pullback(weights * (target - a_hat))
        w = guidance_weight(t[0], beta).astype(x_t.dtype)
        return x_t + dt * (v - w * g)

    return jax.lax.fori_loop(0, num_steps, step, x)


def sample(velocity_fn: Callable[[Any, Any], Any], noise: Any, *, num_steps: int) -> Any:
    """Plain (unguided) Euler sampling in the same convention, for comparison and for policies'
    requests without ``rtc``."""
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(noise)
    dt = -1.0 / num_steps

    def step(k: Any, x_t: Any) -> Any:
        t = jnp.full((x_t.shape[0],), 1.0 + k * dt, jnp.float32)
        return x_t + dt * velocity_fn(x_t, t)

    return jax.lax.fori_loop(0, num_steps, step, x)


def jit_samplers(
    velocity: Callable[[Any, Any, Any], Any], *, num_steps: int, schedule: str = DEFAULT_SCHEDULE
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Jitted ``plain(cond, noise)`` and ``guided(cond, noise, prefix, prefix_len, delay_steps, beta,
    dim_mask)`` for a conditioned velocity ``velocity(cond, x_t, t)`` (``cond``: any pytree, e.g. a
    policy's parameters and observation features). One compilation per batch shape, whatever the
    per-sample ``d``, ``n`` and prefix."""
    import jax

    check_schedule(schedule)

    def plain(cond: Any, noise: Any) -> Any:
        return sample(lambda x, t: velocity(cond, x, t), noise, num_steps=num_steps)

    def guided(
        cond: Any, noise: Any, prefix: Any, prefix_len: Any, delay_steps: Any, beta: Any, mask: Any
    ) -> Any:
        return guided_sample(
            lambda x, t: velocity(cond, x, t), noise, num_steps=num_steps, prefix=prefix,
            prefix_len=prefix_len, delay_steps=delay_steps, beta=beta, schedule=schedule, dim_mask=mask,
        )  # fmt: skip

    return jax.jit(plain), jax.jit(guided)


class FlowGuidance:
    """What a flow policy needs to honour ``rtc`` in ``infer_batch`` (π₀'s helper, the ``flow`` policy).

    ``velocity(cond, x_t, t)``: the policy's pure velocity in model space (``cond``: any pytree, e.g.
    ``(params, features)``); ``horizon`` H, ``action_dim`` the robot's A, ``model_dim`` the model's
    (padded) action size. ``metadata_extra`` goes into the policy's metadata; per batch, :meth:`parse`
    checks the requests, :meth:`sample` runs one jitted call (guided when any sample carries ``rtc``,
    otherwise the plain sampler) and :meth:`replies` adds each reply's ``rtc`` entry.
    """

    def __init__(
        self, velocity: Callable[[Any, Any, Any], Any], *, num_steps: int, horizon: int, action_dim: int,
        model_dim: int | None = None, beta: float = DEFAULT_BETA, schedule: str = DEFAULT_SCHEDULE,
    ) -> None:  # fmt: skip
        self.beta, self.schedule = check_beta(beta), check_schedule(schedule)
        self.horizon, self.action_dim = int(horizon), int(action_dim)
        self.model_dim = int(model_dim or action_dim)
        self.mask = dim_mask(self.action_dim, self.model_dim)
        self.plain, self.guided = jit_samplers(velocity, num_steps=num_steps, schedule=self.schedule)

    @property
    def metadata_extra(self) -> dict[str, Any]:
        return {RTC_KEY: True, "rtc_beta": self.beta, "rtc_schedule": self.schedule}

    def parse(self, batch: Sequence[Mapping[str, Any]]) -> list[RtcRequest | None]:
        return [parse_rtc(obs, self.horizon, self.action_dim) for obs in batch]

    def sample(
        self, cond: Any, noise: Any, requests: Sequence[RtcRequest | None],
        to_model: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> Any:  # fmt: skip
        """Model-space chunks [B, H, model_dim]; ``requests`` may be shorter than B (padding rows are
        unguided). ``to_model`` maps a robot-unit prefix into model space (the policy's normalization)."""
        b = int(np.shape(noise)[0])
        if not any(r is not None for r in requests):
            return self.plain(cond, noise)
        padded = list(requests) + [None] * (b - len(requests))
        stacked = stack_requests(padded, self.horizon, self.model_dim, to_model)
        return self.guided(
            cond, noise, stacked.prefix, stacked.prefix_len, stacked.delay_steps, self.beta, self.mask
        )

    def replies(
        self, chunks: Sequence[np.ndarray], requests: Sequence[RtcRequest | None]
    ) -> list[dict[str, Any]]:
        """``{"action": chunk}`` per sample (robot units), plus ``rtc`` where the request carried it."""
        out = []
        for chunk, req in zip(chunks, requests, strict=False):
            reply: dict[str, Any] = {"action": np.ascontiguousarray(chunk, dtype=np.float32)}
            if req is not None:
                reply[RTC_KEY] = rtc_reply(req, self.beta, chunk)
            out.append(reply)
        return out


__all__ = [
    "DEFAULT_BETA",
    "DEFAULT_SCHEDULE",
    "FlowGuidance",
    "RTC_KEY",
    "SCHEDULES",
    "RtcBatch",
    "RtcRequest",
    "check_beta",
    "check_schedule",
    "check_supported",
    "dim_mask",
    "guidance_weight",
    "guided_sample",
    "jit_samplers",
    "parse_rtc",
    "prefix_error",
    "prefix_weights",
    "rtc_reply",
    "sample",
    "stack_requests",
]
