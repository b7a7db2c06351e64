"""Stand-in for openpi.policies.policy.Policy and a π₀-shaped model, with asynchronous results."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from openpi.models import model as _model

DEVICE_DELAY_S = 0.0
"""How long a result takes to become "ready" after sample_actions returns (set by tests)."""


class PendingArray:
    """A result whose host copy waits until the (simulated) device is done, like a dispatched jax.Array."""

    def __init__(self, value: np.ndarray, ready_at: list[float], lock: threading.Lock) -> None:
        self._value, self._ready_at, self._lock = value, ready_at, lock
        self.shape, self.dtype = value.shape, value.dtype

    def _wait(self) -> None:
        with self._lock:
            left = self._ready_at[0] - time.perf_counter()
            if left > 0:
                time.sleep(left)

    def __getitem__(self, idx: Any) -> PendingArray:
        return PendingArray(self._value[idx], self._ready_at, self._lock)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        self._wait()
        return self._value if dtype is None else self._value.astype(dtype)


class FakePi0:
    """Actions depend on every input the real model reads, so a wrong mapping shows in the result."""

    def __init__(self, action_horizon: int = 50, action_dim: int = 32) -> None:
        self.action_horizon, self.action_dim = action_horizon, action_dim
        self.calls: list[dict[str, Any]] = []

    def sample_actions(
        self, rng: Any, observation: Any, *, num_steps: int = 10, noise: Any = None
    ) -> PendingArray:
        state = np.asarray(observation.state, dtype=np.float32)
        b = state.shape[0]
        if noise is None:
            noise = jax.random.normal(rng, (b, self.action_horizon, self.action_dim))
        noise = np.asarray(noise, dtype=np.float32)
        image = sum(
            np.asarray(img, np.float32).mean(axis=(1, 2, 3))
            * np.asarray(observation.image_masks[k], np.float32)
            for k, img in observation.images.items()
        )
        tokens = np.asarray(observation.tokenized_prompt, np.float32).sum(axis=1)
        actions = (
            0.1 * noise
            + state[:, None, :]
            + image[:, None, None]
            + 1e-4 * tokens[:, None, None]
            + 1e-3 * num_steps
        ).astype(np.float32)
        self.calls.append({"batch": b, "num_steps": num_steps, "noise_given": noise is not None})
        return PendingArray(actions, [time.perf_counter() + DEVICE_DELAY_S], threading.Lock())


class Policy:
    """Same steps as openpi's JAX Policy.infer; ``infer_ms`` is measured before the result is ready."""

    def __init__(
        self,
        model: FakePi0,
        *,
        rng: Any = None,
        transforms: Sequence[Callable[[dict], dict]] = (),
        output_transforms: Sequence[Callable[[dict], dict]] = (),
        sample_kwargs: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        is_pytorch: bool = False,
    ) -> None:
        self._model = model
        self._input_transform = _compose(transforms)
        self._output_transform = _compose(output_transforms)
        self._sample_kwargs = sample_kwargs or {}
        self._metadata = metadata or {}
        self._is_pytorch_model = is_pytorch
        self._sample_actions = model.sample_actions
        self._rng = jax.random.key(0) if rng is None else rng

    def infer(self, obs: dict, *, noise: np.ndarray | None = None) -> dict:
        inputs = jax.tree.map(lambda x: x, obs)
        inputs = self._input_transform(inputs)
        inputs = jax.tree.map(lambda x: jnp.asarray(x)[np.newaxis, ...], inputs)
        self._rng, sample_rng = jax.random.split(self._rng)
        kwargs = dict(self._sample_kwargs)
        if noise is not None:
            kwargs["noise"] = jnp.asarray(noise)[np.newaxis, ...] if noise.ndim == 2 else jnp.asarray(noise)
        observation = _model.Observation.from_dict(inputs)
        start = time.monotonic()
        outputs = {
            "state": inputs["state"],
            "actions": self._sample_actions(sample_rng, observation, **kwargs),
        }
        model_time = time.monotonic() - start
        outputs = jax.tree.map(lambda x: np.asarray(x[0, ...]), outputs)
        outputs = self._output_transform(outputs)
        outputs["policy_timing"] = {"infer_ms": model_time * 1000}
        return outputs

    @property
    def metadata(self) -> dict[str, Any]:
        return self._metadata


def _compose(transforms: Sequence[Callable[[dict], dict]]) -> Callable[[dict], dict]:
    def run(data: dict) -> dict:
        for t in transforms:
            data = t(data)
        return data

    return run
