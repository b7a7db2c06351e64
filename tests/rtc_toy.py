"""A small flow policy for the real-time-chunking tests: the exact velocity field of Gaussian chunks.

Each action dimension of a model-space chunk is a smooth Gaussian process over the H steps:
``a ~ N(mu, SIGMA^2 K)`` with ``K_ij = exp(-(i - j)^2 / (2 LENGTH^2))`` and ``mu[i] = state / SCALE +
SLOPE * i`` (a ramp from the robot's state). Robot units are ``model * SCALE``, so a prefix must go
through the policy's normalization (``/ SCALE``) before it guides. Every call draws fresh noise, so two
chunks for the same state disagree smoothly (what makes an unguided switch jump), while each chunk moves
little from step to step. The flow-matching velocity of Gaussian data is linear in ``x_t`` and known in
closed form: ``E[a | x_t] = mu + (1 - t) S (t^2 I + (1 - t)^2 S)^-1 (x_t - (1 - t) mu)`` (``S`` the
covariance) and ``v = (x_t - E[a | x_t]) / t``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pi0remote import rtc
from pi0remote.policies import PolicyMetadata
from pi0remote.policies.base import ArraySpec, validate_obs

H, A, MODEL_DIM = 50, 14, 16
SIGMA, SCALE, SLOPE, LENGTH = 0.5, 2.0, 0.02, 8.0
_I = np.arange(H, dtype=np.float64)
COV = (SIGMA**2 * np.exp(-((_I[:, None] - _I[None, :]) ** 2) / (2 * LENGTH**2)) + 1e-4 * np.eye(H)).astype(
    np.float32
)


def velocity(cond: Any, x: Any, t: Any) -> Any:
    """openpi convention: x_t = t * noise + (1 - t) * a, v = E[noise - a | x_t] = (x_t - E[a | x_t]) / t."""
    import jax.numpy as jnp

    mu = cond[:, None, :] + SLOPE * jnp.arange(H, dtype=jnp.float32)[None, :, None]
    tt = t[:, None, None]
    m = tt**2 * jnp.eye(H) + (1 - tt) ** 2 * COV  # [B, H, H]
    a_hat = mu + (1 - tt) * (COV @ jnp.linalg.solve(m, x - (1 - tt) * mu))
    return (x - a_hat) / tt


class ToyFlowPolicy:
    def __init__(self, rtc_beta: float = rtc.DEFAULT_BETA, rtc_schedule: str = "exp", num_steps: int = 10,
                 seed: int = 0) -> None:  # fmt: skip
        self.beta = rtc.check_beta(rtc_beta)
        self.schedule = rtc.check_schedule(rtc_schedule)
        self.rng = np.random.default_rng(seed)
        self.plain, self.guided = rtc.jit_samplers(velocity, num_steps=num_steps, schedule=self.schedule)
        self.mask = rtc.dim_mask(A, MODEL_DIM)
        self.metadata = PolicyMetadata(
            name="toyflow", input_spec={"state": ArraySpec("float32", (A,))}, action_shape=(H, A),
            action_horizon=H, extra={"rtc": True, "rtc_beta": self.beta, "rtc_schedule": self.schedule},
        )  # fmt: skip
        self.calls: list[int] = []

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        return self.infer_batch([obs])[0]

    def infer_batch(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for obs in batch:
            validate_obs(obs, self.metadata.input_spec)
        requests = [rtc.parse_rtc(obs, H, A) for obs in batch]
        cond = np.zeros((len(batch), MODEL_DIM), np.float32)
        cond[:, :A] = np.stack([obs["state"] for obs in batch]) / SCALE
        noise = self.rng.standard_normal((len(batch), H, MODEL_DIM)).astype(np.float32)
        stacked = rtc.stack_requests(requests, H, MODEL_DIM, to_model=lambda p: p / SCALE)
        if stacked.any:
            out = self.guided(cond, noise, stacked.prefix, stacked.prefix_len, stacked.delay_steps,
                              self.beta, self.mask)  # fmt: skip
        else:
            out = self.plain(cond, noise)
        self.calls.append(len(batch))
        actions = np.asarray(out)[:, :, :A] * SCALE
        replies = []
        for chunk, req in zip(actions, requests, strict=True):
            reply: dict[str, Any] = {"action": chunk.astype(np.float32)}
            if req is not None:
                reply["rtc"] = rtc.rtc_reply(req, self.beta, chunk)
            replies.append(reply)
        return replies
