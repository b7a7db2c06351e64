"""π₀ with random bfloat16 weights (``--random-weights``): the compute of π₀ where nothing can be downloaded.

The same model (``Pi0Config().create(...)``, floating parameters cast to bfloat16 as served checkpoints are) and
its real ``sample_actions``, with fixed prompt token ids, no checkpoint, no norm stats and no tokenizer: the
actions are meaningless, the latency is π₀'s. The request's ``cam_high`` goes to the device as CHW uint8 and is
converted inside the compiled function; only the real camera is in the prefix (``image_slots=1``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .pi0_common import (
    ALOHA_ACTION_DIM,
    DEFAULT_CONFIG,
    OPENPI_COMMIT,
    RANDOM_PROMPT_TOKENS,
    _bucket,
    _device_name,
    _import_openpi,
    _ms,
    _Pi0Base,
    logger,
)

__all__ = ["RandomWeightsPi0Policy", "cast_floating"]


def cast_floating(jax: Any, jnp: Any, state: Any, dtype: Any) -> Any:
    """Cast every floating parameter to ``dtype`` (openpi restores served checkpoints as bfloat16)."""

    def cast(x: Any) -> Any:
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    try:
        state = jax.tree.map(cast, state)
    except (AttributeError, TypeError):  # a flax whose State leaves are not plain arrays
        pure = jax.tree.map(cast, state.to_pure_dict())
        state.replace_by_pure_dict(pure)
    jax.block_until_ready(jax.tree.leaves(state))
    return state


@contextlib.contextmanager
def _image_keys_while_tracing(model_mod: Any, keys: tuple[str, ...]) -> Iterator[None]:
    """While tracing, let openpi's ``preprocess_observation`` keep only ``keys``.

    π₀'s ``sample_actions`` always embeds the three ALOHA image slots; slots whose mask is False (no such camera)
    are attended by nothing, so dropping them from the prefix gives the same attention result with a third of the
    image tokens. Only the trace sees the patch: the compiled function holds no reference to it.
    """
    original = model_mod.preprocess_observation
    model_mod.preprocess_observation = functools.partial(original, image_keys=keys)
    try:
        yield
    finally:
        model_mod.preprocess_observation = original


class RandomWeightsPi0Policy(_Pi0Base):
    """π₀ with random bfloat16 weights: openpi's model and ``sample_actions``, no checkpoint, fixed prompt ids.

    The request's ``cam_high`` goes to the device as CHW uint8 and is converted inside the compiled function; the
    state is zero-padded to the model's 32 dims; the reply is the first 14 dims of the 50-step chunk. There are no
    normalization statistics and no tokenizer: the actions are meaningless, the compute is π₀'s.

    ``image_slots=1`` (default) embeds only the real camera; ``image_slots=3`` embeds openpi's three ALOHA slots
    (two of them masked), which is what the checkpoint path computes for a one-camera request.
    """

    def __init__(
        self,
        *,
        config: str = DEFAULT_CONFIG,
        num_steps: int = 10,
        prompt: str | None = None,
        seed: int = 0,
        image_slots: int = 1,
        weights: tuple[Any, Any, Any] | None = None,
    ) -> None:
        if image_slots not in (1, 3):
            raise ValueError(f"image_slots must be 1 or 3, got {image_slots}")
        self._jax, nnx, self._model_mod = _import_openpi("jax", "flax.nnx", "openpi.models.model")
        jax = self._jax
        jnp = importlib.import_module("jax.numpy")
        t0 = time.perf_counter()
        if weights is None:
            weights = self._build(nnx, config, seed)
        build_s = time.perf_counter() - t0
        self.weights = weights
        model_config, graphdef, state = weights
        self._state = state
        super().__init__(
            {
                "config": config,
                "checkpoint": None,
                "num_steps": num_steps,
                "random_weights": True,
                "prompt": prompt,
                "prompt_token_ids": list(RANDOM_PROMPT_TOKENS),
                "prefix_image_slots": image_slots,
                "device": _device_name(jax),
                "build_s": round(build_s, 3),
                "openpi_commit": OPENPI_COMMIT,
            },
            int(model_config.action_horizon),
        )
        self.num_steps = num_steps
        self.image_slots = image_slots
        self._keys = ("base_0_rgb",) if image_slots == 1 else tuple(self._model_mod.IMAGE_KEYS)
        max_len = int(model_config.max_token_len)
        tokens = np.zeros((1, max_len), np.int32)
        tokens[0, : len(RANDOM_PROMPT_TOKENS)] = RANDOM_PROMPT_TOKENS
        mask = np.zeros((1, max_len), bool)
        mask[0, : len(RANDOM_PROMPT_TOKENS)] = True
        self._tokens = jnp.asarray(tokens)
        self._token_mask = jnp.asarray(mask)
        self._rng = jax.random.key(seed)
        self._jitted = jax.jit(self._forward(nnx, graphdef, int(model_config.action_dim)))
        self._compiled: dict[int, Any] = {}
        self.compile_s: dict[int, float] = {}

    def _forward(self, nnx: Any, graphdef: Any, action_dim: int) -> Any:
        """The traced function: uint8 CHW camera -> [-1, 1] HWC, state padded, openpi's ``sample_actions``."""
        jax, jnp = self._jax, importlib.import_module("jax.numpy")
        model_mod, keys, num_steps = self._model_mod, self._keys, self.num_steps

        def forward(state, rng, cam, robot_state, tokens, token_mask):  # noqa: ANN001 - traced
            model = nnx.merge(graphdef, state)
            b = cam.shape[0]
            img = jnp.transpose(cam, (0, 2, 3, 1)).astype(jnp.float32) / 255.0 * 2.0 - 1.0
            images = {k: img if k == "base_0_rgb" else jnp.full_like(img, -1.0) for k in keys}
            masks = {k: jnp.full((b,), k == "base_0_rgb") for k in keys}
            obs = model_mod.Observation(
                images=images,
                image_masks=masks,
                state=jnp.pad(robot_state, ((0, 0), (0, action_dim - robot_state.shape[-1]))),
                tokenized_prompt=jnp.broadcast_to(tokens, (b, tokens.shape[-1])),
                tokenized_prompt_mask=jnp.broadcast_to(token_mask, (b, token_mask.shape[-1])),
            )
            rng, sample_rng = jax.random.split(rng)
            actions = model.sample_actions(sample_rng, obs, num_steps=num_steps)
            return actions[:, :, :ALOHA_ACTION_DIM], rng

        return forward

    def _build(self, nnx: Any, config: str, seed: int) -> tuple[Any, Any, Any]:
        """(model config, graphdef, bf16 state) of a randomly initialised π₀."""
        jax, jnp = self._jax, importlib.import_module("jax.numpy")
        model_config = self._model_config(config)
        model = model_config.create(jax.random.key(seed))
        graphdef, state = nnx.split(model)
        del model
        return model_config, graphdef, cast_floating(jax, jnp, state, jnp.bfloat16)

    @staticmethod
    def _model_config(config: str) -> Any:
        if config == DEFAULT_CONFIG:
            (pi0_config,) = _import_openpi("openpi.models.pi0_config")
            return pi0_config.Pi0Config()
        (config_mod,) = _import_openpi("openpi.training.config")
        return config_mod.get_config(config).model

    def compile(self, batch_size: int) -> float:
        """Compile the forward pass for one (padded) batch size; returns seconds spent."""
        if batch_size in self._compiled:
            return 0.0
        jnp = importlib.import_module("jax.numpy")
        t0 = time.perf_counter()
        args = (
            self._state,
            self._rng,
            jnp.zeros((batch_size, 3, 224, 224), jnp.uint8),
            jnp.zeros((batch_size, ALOHA_ACTION_DIM), jnp.float32),
            self._tokens,
            self._token_mask,
        )
        if self.image_slots == 1:
            with _image_keys_while_tracing(self._model_mod, self._keys):
                lowered = self._jitted.lower(*args)
        else:
            lowered = self._jitted.lower(*args)
        self._compiled[batch_size] = lowered.compile()
        secs = time.perf_counter() - t0
        self.compile_s[batch_size] = round(secs, 3)
        self.metadata.extra["compile_s_by_batch"] = {str(k): v for k, v in sorted(self.compile_s.items())}
        logger.info("pi0 random weights: compiled batch %d in %.1f s", batch_size, secs)
        return secs

    def warmup(self, batch_sizes: Sequence[int] | None = None) -> None:
        """Compile the given batch sizes (default: ``warmup_batch_sizes``, batch 1 alone) and run each once."""
        t0 = time.perf_counter()
        for b in batch_sizes or self.warmup_batch_sizes:
            self.compile(_bucket(b))
            self.infer_batch([self._dummy_obs()] * b)
        self.metadata.extra["compile_s"] = self.compile_s.get(1, next(iter(self.compile_s.values()), 0.0))
        self.metadata.extra["warmup_s"] = round(time.perf_counter() - t0, 3)

    def infer_batch(self, batch: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        n = len(batch)
        if n == 0:
            return []
        t0 = time.perf_counter()
        for obs in batch:
            self._validate(obs)
        size = _bucket(n)
        if n == 1:
            cam = batch[0]["cam_high"][np.newaxis]
            state = batch[0]["state"][np.newaxis]
        else:
            rows = list(batch) + [batch[-1]] * (size - n)
            cam = np.stack([o["cam_high"] for o in rows])
            state = np.stack([o["state"] for o in rows])
        with self._lock:
            compiled = self._compiled.get(size)
            if compiled is None:
                self.compile(size)
                compiled = self._compiled[size]
                t0 = time.perf_counter()
            t1 = time.perf_counter()
            out, self._rng = compiled(self._state, self._rng, cam, state, self._tokens, self._token_mask)
            actions = np.asarray(out)  # blocks until the result is on the host
            t2 = time.perf_counter()
        replies = [actions[i] for i in range(n)]
        t3 = time.perf_counter()
        pre, dev, post = _ms(t0, t1), _ms(t1, t2), _ms(t2, t3)
        return [self._reply(a, pre, dev, post) for a in replies]
