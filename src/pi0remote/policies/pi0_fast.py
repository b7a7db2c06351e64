"""The fast π₀ checkpoint path (the default of ``--policy pi0``): one jitted function per padded batch size.

It wraps the ``Policy`` openpi builds from the checkpoint (same parameters, norm stats, tokenizer and
transforms as ``--exact``) and changes only where the work runs:

* host (``pi0_host.HostPlan``): openpi's input transforms on the state and prompt, with probes in place of
  the frames (tens of microseconds), tokens cached per prompt; after the call, openpi's output transforms
  (unnormalize, ALOHA's joint and gripper conversion) on the (50, 32) chunk;
* device, one compiled call (``pi0_engine``): uint8 CHW frames to [-1, 1] HWC (and resize) for only the slots
  openpi's masks say are present (a masked slot is attended by nothing, so leaving it out of the prefix gives the
  same attention result with fewer image tokens), the noise draw from the policy's rng (the same stream as
  openpi's at batch 1), the prefix KV fill and the flow loop.

The flow loop takes a velocity function, so a request carrying ``rtc`` runs the guided sampler of
``pi0remote.rtc`` in the same call (per-sample prefix and delay, so mixed batches stay one call).
"""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import pi0_engine as engine
from .pi0_common import _bucket, _device_name, _import_openpi, _ms, _Pi0Base, _prompt_of, logger
from .pi0_host import CAMERAS, HostInputs, HostPlan, group_key, kept_slots

__all__ = ["FastPi0Policy"]


class FastPi0Policy(_Pi0Base):
    """π₀ served from an openpi ``Policy`` through one compiled function (see the module docstring)."""

    def __init__(
        self,
        openpi_policy: Any,
        *,
        extra: dict[str, Any],
        num_steps: int = 10,
        default_prompt: str | None = None,
    ) -> None:
        model = openpi_policy._model
        super().__init__({**extra, "path": "fast"}, int(model.action_horizon))
        jax, nnx, self._model_mod, transforms_mod = _import_openpi(
            "jax", "flax.nnx", "openpi.models.model", "openpi.transforms"
        )
        self._jax, self._nnx = jax, nnx
        self.openpi_policy = openpi_policy
        self.plan = HostPlan(openpi_policy, transforms_mod)
        self.num_steps = int(openpi_policy._sample_kwargs.get("num_steps", num_steps))
        self._default_prompt = default_prompt
        self._graphdef, self._params = nnx.split(model)
        self.action_dim = int(model.action_dim)
        self._rng = openpi_policy._rng
        self._compiled: dict[tuple[Any, ...], Any] = {}
        self.compile_s: dict[str, float] = {}
        self._compile_lock = threading.Lock()
        self.metadata.extra.update(device=_device_name(jax), num_steps=self.num_steps)
        self.last_call: dict[str, Any] = {}
        """The last compiled call's shape: batch, prefix slots (tests and docs read it)."""
        self._probe_layouts()

    def _probe_layouts(self) -> None:
        """Map cameras to slots now (one camera, and every camera), so that a config whose transforms touch
        the pixels is refused at build time (:class:`~.pi0_host.FastPathUnsupported`), not at a request."""
        obs = self._dummy_obs()
        self.plan.inputs(obs, "probe")
        self.plan.inputs({**obs, **{c: obs["cam_high"] for c in CAMERAS if c != "cam_high"}}, "probe")

    # -- the compiled function --------------------------------------------------------------------------------

    def _forward(self, slots: tuple[str, ...], chw: tuple[bool, ...], noise_given: bool) -> Any:
        jax, jnp = self._jax, importlib.import_module("jax.numpy")
        nnx, model_mod, graphdef = self._nnx, self._model_mod, self._graphdef
        size, num_steps, horizon, dim = (
            self.plan.image_size,
            self.num_steps,
            self.action_horizon,
            self.action_dim,
        )

        def forward(params, rng, cams, masks, state, tokens, token_mask, noise):  # noqa: ANN001 - traced
            model = nnx.merge(graphdef, params)
            images = {
                s: engine.device_image(c, chw=t, size=size) for s, c, t in zip(slots, cams, chw, strict=True)
            }
            obs = model_mod.Observation(
                images=images,
                image_masks={s: masks[:, i] for i, s in enumerate(slots)},
                state=state,
                tokenized_prompt=tokens,
                tokenized_prompt_mask=token_mask,
            )
            obs = model_mod.preprocess_observation(None, obs, train=False, image_keys=slots)
            if not noise_given:
                rng, sample_rng = jax.random.split(rng)
                noise = jax.random.normal(sample_rng, (state.shape[0], horizon, dim))
            kv_cache, prefix_mask = engine.prefill(model, obs)
            actions = engine.flow_sample(
                engine.velocity_fn(model, obs, kv_cache, prefix_mask), noise, num_steps
            )
            return actions.astype(jnp.float32), rng

        return jax.jit(forward)

    def _compiled_for(self, key: tuple[Any, ...], args: tuple[Any, ...]) -> Any:
        with self._compile_lock:
            fn = self._compiled.get(key)
            if fn is None:
                size, slots, chw, _, noise_given = key
                t0 = time.perf_counter()
                fn = self._forward(slots, chw, noise_given).lower(*args).compile()
                secs = round(time.perf_counter() - t0, 3)
                self.compile_s[f"{size}x{'+'.join(slots)}{'+noise' if noise_given else ''}"] = secs
                self.metadata.extra["compile_s_by_batch"] = dict(self.compile_s)
                logger.info("pi0 fast path: compiled batch %d, slots %s in %.1f s", size, slots, secs)
                self._compiled[key] = fn
            return fn

    # -- one call for a group of requests with the same cameras -------------------------------------------------

    def _stack(self, items: list[HostInputs], size: int) -> tuple[tuple[str, ...], tuple[bool, ...], tuple]:
        rows = items + [items[-1]] * (size - len(items))
        keep = kept_slots(items)
        layout = items[0].layout
        slots = tuple(layout.slots[i] for i in keep)
        cams = []
        for i in keep:
            src = layout.sources[i]
            if src is None:  # black fill that a mask still calls present: what openpi feeds (zeros)
                cams.append(np.zeros((size, *rows[0].frames["cam_high"].shape), np.uint8))
            elif size == 1:
                cams.append(rows[0].frames[src][np.newaxis])
            else:
                cams.append(np.stack([r.frames[src] for r in rows]))
        masks = np.stack([r.masks[list(keep)] for r in rows])
        state = np.stack([r.state for r in rows])
        tokens = np.stack([r.tokens for r in rows])
        token_mask = np.stack([r.token_mask for r in rows])
        return slots, (True,) * len(slots), (tuple(cams), masks, state, tokens, token_mask)

    def _run_group(
        self, items: list[HostInputs], noise: np.ndarray | None
    ) -> tuple[np.ndarray, float, float]:
        """One compiled call; returns (model-space actions [n, H, D], t_call, t_done)."""
        n = len(items)
        size = _bucket(n)
        slots, chw, arrays = self._stack(items, size)
        if noise is not None:
            noise = np.asarray(noise, np.float32).reshape(-1, self.action_horizon, self.action_dim)
            noise = np.concatenate([noise, np.zeros((size - n, *noise.shape[1:]), np.float32)])
        shapes = tuple(a.shape for a in arrays[0])
        key = (size, slots, chw, shapes, noise is not None)
        with self._lock:
            args = (self._params, self._rng, *arrays, noise)
            fn = self._compiled.get(key) or self._compiled_for(key, args)
            t1 = time.perf_counter()
            out, rng = fn(*args)
            actions = np.asarray(out)  # blocks until the chunk is on the host
            t2 = time.perf_counter()
            if noise is None:
                self._rng = rng
        self.last_call = {"batch": size, "slots": slots}
        return actions[:n], t1, t2

    # -- the policy interface ---------------------------------------------------------------------------------

    def infer(self, obs: dict[str, Any], *, noise: np.ndarray | None = None) -> dict[str, Any]:
        """One request; ``noise`` [H, D] replaces the rng's draw (to compare with ``Policy.infer(noise=...)``)."""
        return self.infer_batch([obs], noise=None if noise is None else np.asarray(noise)[np.newaxis])[0]

    def infer_batch(
        self, batch: Sequence[dict[str, Any]], *, noise: np.ndarray | None = None
    ) -> list[dict[str, Any]]:
        if not batch:
            return []
        t0 = time.perf_counter()
        for obs in batch:
            self._validate(obs)
        items = [self.plan.inputs(obs, _prompt_of(obs)) for obs in batch]
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(group_key(item), []).append(i)
        replies: list[dict[str, Any] | None] = [None] * len(batch)
        for idx in groups.values():
            group_noise = None if noise is None else np.asarray(noise)[idx]
            actions, t1, t2 = self._run_group([items[i] for i in idx], group_noise)
            for j, i in enumerate(idx):
                replies[i] = {"_model": actions[j], "_t": (t1, t2)}
        out = []
        for i, r in enumerate(replies):
            assert r is not None
            t1, t2 = r["_t"]
            action = self.plan.outputs(items[i].state, r["_model"])
            t3 = time.perf_counter()
            out.append(self._reply(action, _ms(t0, t1), _ms(t1, t2), _ms(t2, t3)))
        return out

    def warmup(self) -> None:
        """Compile every padded batch size of ``warmup_batch_sizes`` for the canonical one-camera request and run
        each once; the rng is put back, so warm-up draws no noise."""
        rng = self._rng
        obs = self._dummy_obs()
        if self._default_prompt is None:
            obs["prompt"] = "warm up"
        t0 = time.perf_counter()
        for b in self.warmup_batch_sizes:
            self.infer_batch([obs] * b)
        self._rng = rng
        first = next(iter(self.compile_s.values()), 0.0)
        self.metadata.extra["compile_s"] = first
        self.metadata.extra["warmup_s"] = round(time.perf_counter() - t0, 3)
