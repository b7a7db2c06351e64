"""Stand-in for openpi.policies.policy.Policy and a π₀-shaped model, with asynchronous results."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from openpi import transforms as _transforms
from openpi.models import model as _model

DEVICE_DELAY_S = 0.0
"""How long a result takes to become "ready" after sample_actions returns (set by tests)."""


class PendingArray:
    """A result whose host copy waits until the (simulated) device is done, like a dispatched jax.Array: the
    value is computed on first read, and not before ``DEVICE_DELAY_S`` has passed since dispatch."""

    def __init__(self, compute: Any, shape: tuple[int, ...], ready_at: float, index: Any = ()) -> None:
        self._compute, self._ready_at, self._index = compute, ready_at, index
        self.shape, self.dtype = np.empty(shape, np.float32)[index].shape, np.dtype(np.float32)
        self._shape = shape

    def __getitem__(self, idx: Any) -> PendingArray:
        return PendingArray(
            self._compute, self._shape, self._ready_at, (*self._index, idx) if self._index else idx
        )

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        left = self._ready_at - time.perf_counter()
        if left > 0:
            time.sleep(left)
        value = self._compute()[self._index] if self._index != () else self._compute()
        return value if dtype is None else value.astype(dtype)


def _once(fn: Any) -> Any:
    lock, box = threading.Lock(), []

    def run() -> np.ndarray:
        with lock:
            if not box:
                box.append(fn())
            return box[0]

    return run


def _attn_mask(input_mask: Any, ar_mask: Any) -> Any:
    """openpi's make_attn_mask: token i sees valid token j unless j's block (cumsum of ar_mask) comes later."""
    blocks = jnp.cumsum(jnp.broadcast_to(ar_mask, input_mask.shape), axis=1)
    return (blocks[:, None, :] <= blocks[:, :, None]) & (input_mask[:, None, :] & input_mask[:, :, None])


def _init_params(width: int, action_dim: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)

    def w(*shape: int, scale: float = 0.3) -> np.ndarray:
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    return {
        "img": w(3, width, scale=1.0),
        "patch": w(4, width),
        "embed": w(260, width),
        "wq": w(width, width),
        "wk": w(width, width),
        "wv": w(width, width),
        "state": w(action_dim, width),
        "action_in": w(action_dim, width, scale=0.1),
        "freq": np.linspace(0.5, 4.0, width).astype(np.float32),
        "out": w(width, action_dim, scale=0.1),
    }


class _PaliGemma:
    """One attention layer standing in for PaliGemma + the action expert (``llm``) and the image encoder."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.p = params

    def img(self, image: Any, train: bool = False) -> tuple[Any, None]:
        b = image.shape[0]
        pooled = jnp.reshape(image, (b, 2, 112, 2, 112, 3)).mean(axis=(2, 4)).reshape(b, 4, 3)
        return pooled @ self.p["img"] + self.p["patch"][None], None

    def llm(
        self, embedded: list, *, mask: Any, positions: Any, kv_cache: Any = None, adarms_cond: Any = None
    ):
        prefix, suffix = embedded
        x = prefix if prefix is not None else suffix
        x = x + 0.1 * jnp.sin(positions[..., None] * self.p["freq"][None, None])
        q, k, v = x @ self.p["wq"], x @ self.p["wk"], x @ self.p["wv"]
        cache = (k, v)
        if kv_cache is not None:
            k, v = jnp.concatenate([kv_cache[0], k], axis=1), jnp.concatenate([kv_cache[1], v], axis=1)
        logits = jnp.einsum("bse,bte->bst", q, k) / np.sqrt(q.shape[-1])
        logits = jnp.where(mask, logits, -1e30)
        weights = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
        out = x + jnp.einsum("bst,bte->bse", weights / weights.sum(axis=-1, keepdims=True), v)
        return ([out, None], cache) if prefix is not None else ([None, out], None)


class FakePi0:
    """A π₀-shaped model with openpi's method seams (embed_prefix / embed_suffix / PaliGemma.llm /
    action_out_proj) and openpi's sample_actions algorithm over them. Actions depend on every input the real
    model reads (each unmasked image slot, prompt tokens, positions, state, noise, time), and masked slots are
    attended by nothing, as in π₀."""

    def __init__(self, config: dict[str, int] | None = None, params: dict[str, Any] | None = None) -> None:
        self.config = dict(config or {"action_horizon": 50, "action_dim": 32, "width": 16})
        self.action_horizon, self.action_dim = self.config["action_horizon"], self.config["action_dim"]
        self.params = params if params is not None else _init_params(self.config["width"], self.action_dim)
        self.PaliGemma = _PaliGemma(self.params)
        self.calls: list[dict[str, Any]] = []

    def action_out_proj(self, x: Any) -> Any:
        return x @ self.params["out"]

    def embed_prefix(self, obs: Any) -> tuple[Any, Any, Any]:
        tokens, masks, ar = [], [], []
        for name in obs.images:
            t, _ = self.PaliGemma.img(obs.images[name])
            tokens.append(t)
            masks.append(jnp.broadcast_to(jnp.asarray(obs.image_masks[name])[:, None], t.shape[:2]))
            ar += [False] * t.shape[1]
        if obs.tokenized_prompt is not None:
            t = jnp.take(self.params["embed"], jnp.asarray(obs.tokenized_prompt), axis=0)
            tokens.append(t)
            masks.append(jnp.asarray(obs.tokenized_prompt_mask))
            ar += [False] * t.shape[1]
        return jnp.concatenate(tokens, axis=1), jnp.concatenate(masks, axis=1), jnp.asarray(ar)

    def embed_suffix(self, obs: Any, x_t: Any, timestep: Any) -> tuple[Any, Any, Any, None]:
        b, h = x_t.shape[0], self.action_horizon
        state_token = (jnp.asarray(obs.state) @ self.params["state"])[:, None]
        time = jnp.sin(jnp.asarray(timestep)[:, None] * self.params["freq"][None])[:, None, :]
        tokens = jnp.concatenate([state_token, x_t @ self.params["action_in"] + time], axis=1)
        return tokens, jnp.ones((b, 1 + h), bool), jnp.asarray([True, True] + [False] * (h - 1)), None

    def sample_actions(
        self, rng: Any, observation: Any, *, num_steps: int = 10, noise: Any = None
    ) -> PendingArray:
        obs = _model.preprocess_observation(None, observation, train=False)
        b, h = obs.state.shape[0], self.action_horizon
        self.calls.append({"batch": b, "num_steps": num_steps, "noise_given": noise is not None})
        if noise is None:
            noise = jax.random.normal(rng, (b, h, self.action_dim))
        args = (
            self.params,
            obs.images,
            obs.image_masks,
            obs.state,
            obs.tokenized_prompt,
            obs.tokenized_prompt_mask,
        )
        key = (tuple(sorted(self.config.items())), num_steps)
        compute = _once(lambda: np.asarray(_sample_jit(key, *args, noise), np.float32))
        return PendingArray(compute, (b, h, self.action_dim), time.perf_counter() + DEVICE_DELAY_S)


def _sample(key: tuple, params, images, masks, state, tokens, token_mask, noise):  # noqa: ANN001
    """openpi's sample_actions algorithm: prefix KV fill, then Euler steps from t = 1 to 0."""
    config, num_steps = dict(key[0]), key[1]
    model = FakePi0(config, params=params)
    obs = _model.Observation(images, masks, state, tokens, token_mask)
    b, h = state.shape[0], model.action_horizon
    p_tokens, p_mask, p_ar = model.embed_prefix(obs)
    positions = jnp.cumsum(p_mask, axis=1) - 1
    _, kv = model.PaliGemma.llm([p_tokens, None], mask=_attn_mask(p_mask, p_ar), positions=positions)
    dt = np.float32(-1.0 / num_steps)

    def step(_: int, carry: tuple) -> tuple:
        x, t = carry
        s_tokens, s_mask, s_ar, _ = model.embed_suffix(obs, x, jnp.broadcast_to(t, (b,)))
        p_attn = jnp.broadcast_to(p_mask[:, None, :], (b, s_tokens.shape[1], p_mask.shape[1]))
        full = jnp.concatenate([p_attn, _attn_mask(s_mask, s_ar)], axis=-1)
        pos = jnp.sum(p_mask, axis=-1)[:, None] + jnp.cumsum(s_mask, axis=-1) - 1
        (_, out), _ = model.PaliGemma.llm([None, s_tokens], mask=full, positions=pos, kv_cache=kv)
        return x + dt * model.action_out_proj(out[:, -h:]), t + dt

    # openpi's loop runs while t >= -dt/2, i.e. num_steps times from t = 1
    carry = (jnp.asarray(noise, np.float32), jnp.float32(1.0))
    if hasattr(jax, "lax"):
        x, _ = jax.lax.fori_loop(0, num_steps, step, carry)
    else:  # the numpy stand-in
        for i in range(num_steps):
            carry = step(i, carry)
        x = carry[0]
    return x


_sample_jit = jax.jit(_sample, static_argnums=0)


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
        self._input_transform = _transforms.compose(transforms)
        self._output_transform = _transforms.compose(output_transforms)
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
