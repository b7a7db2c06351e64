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
        self.rng = np.random.default_rng(seed)
        self.guidance = rtc.FlowGuidance(
            velocity, num_steps=num_steps, horizon=H, action_dim=A, model_dim=MODEL_DIM, beta=rtc_beta,
            schedule=rtc_schedule,
        )  # fmt: skip
        self.metadata = PolicyMetadata(
            name="toyflow", input_spec={"state": ArraySpec("float32", (A,))}, action_shape=(H, A),
            action_horizon=H, extra=self.guidance.metadata_extra,
        )  # fmt: skip
        self.calls: list[int] = []

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        return self.infer_batch([obs])[0]

    def infer_batch(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for obs in batch:
            validate_obs(obs, self.metadata.input_spec)
        requests = self.guidance.parse(batch)
        size = 1 << max(0, (len(batch) - 1).bit_length())  # padded like a real policy's batch buckets
        cond = np.zeros((size, MODEL_DIM), np.float32)
        cond[: len(batch), :A] = np.stack([obs["state"] for obs in batch]) / SCALE
        noise = self.rng.standard_normal((size, H, MODEL_DIM)).astype(np.float32)
        out = self.guidance.sample(cond, noise, requests, to_model=lambda p: p / SCALE)
        self.calls.append(len(batch))
        actions = np.asarray(out)[: len(batch), :, :A] * SCALE
        return self.guidance.replies(actions, requests)
