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

from .. import rtc
from . import pi0_engine as engine
from . import pi0_layers
from .pi0_common import (
    ALOHA_ACTION_DIM,
    _bucket,
    _device_name,
    _import_openpi,
    _ms,
    _Pi0Base,
    _prompt_of,
    logger,
)
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
        rtc_beta: float = rtc.DEFAULT_BETA,
        rtc_schedule: str = rtc.DEFAULT_SCHEDULE,
        split_layers: bool = True,
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
        self._layers, layers_note = self._split_layers(model, split_layers)
        self.action_dim = int(model.action_dim)
        self._rng = openpi_policy._rng
        self._compiled: dict[tuple[Any, ...], Any] = {}
        self.compile_s: dict[str, float] = {}
        self._compile_lock = threading.Lock()
        self.rtc_beta, self.rtc_schedule = rtc.check_beta(rtc_beta), rtc.check_schedule(rtc_schedule)
        self.last_call: dict[str, Any] = {}
        """The last compiled call's shape: batch, prefix slots (tests and docs read it)."""
        probe = self._probe_layouts()
        self.affine = self.plan.affine_outputs(probe.state, self.action_horizon, self.action_dim)
        """(scale, offset) [H, A] when openpi's output transforms are an affine map (then they run on the
        device, inside the compiled call); None: they run on the host after it."""
        self.robot_dim = ALOHA_ACTION_DIM if self.affine is None else int(self.affine[0].shape[1])
        self.metadata.extra.update(
            device=_device_name(jax),
            num_steps=self.num_steps,
            output_transform="device" if self.affine is not None else "host",
            layers=layers_note,
            rtc=True,
            rtc_beta=self.rtc_beta,
            rtc_schedule=self.rtc_schedule,
        )

    def _split_layers(self, model: Any, wanted: bool) -> tuple[Any, str]:
        """Gemma's weights laid out per layer for :mod:`.pi0_layers` (None, and why, where openpi's scanned
        modules run instead). The split copy takes as much device memory again as the two Gemma experts."""
        reason = pi0_layers.unsupported(model, self._params) if wanted else "turned off"
        if reason is not None:
            logger.info("pi0 fast path: openpi's scanned layers (%s)", reason)
            return None, f"openpi ({reason})"
        dtype = getattr(getattr(model.PaliGemma.llm, "module", None), "embed_dtype", None)
        return pi0_layers.prepare(self._params, dtype), "split"

    def _probe_layouts(self) -> HostInputs:
        """Map cameras to slots now (one camera, and every camera), so that a config whose transforms touch
        the pixels is refused at build time (:class:`~.pi0_host.FastPathUnsupported`), not at a request."""
        obs = self._dummy_obs()
        self.plan.inputs({**obs, **{c: obs["cam_high"] for c in CAMERAS if c != "cam_high"}}, "probe")
        return self.plan.inputs(obs, "probe")

    # -- the compiled function --------------------------------------------------------------------------------

    def _forward(self, slots: tuple[str, ...], noise_given: bool, guided: bool) -> Any:
        jax, jnp = self._jax, importlib.import_module("jax.numpy")
        nnx, model_mod, graphdef = self._nnx, self._model_mod, self._graphdef
        size, num_steps, horizon, dim = (
            self.plan.image_size,
            self.num_steps,
            self.action_horizon,
            self.action_dim,
        )
        affine, beta, schedule = self.affine, self.rtc_beta, self.rtc_schedule
        dim_mask = rtc.dim_mask(self.robot_dim, dim)

        def forward(params, layers, rng, cams, masks, state, tokens, token_mask, noise, guide):  # noqa: ANN001
            model = nnx.merge(graphdef, params)
            images = {s: engine.device_image(c, size=size) for s, c in zip(slots, cams, strict=True)}
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
            if layers is None:  # openpi's scanned Gemma modules
                kv_cache, prefix_mask = engine.prefill(model, obs)
                velocity = engine.velocity_fn(model, obs, kv_cache, prefix_mask)
            else:
                kv_cache, prefix_mask = pi0_layers.prefill(model, layers, obs)
                velocity = pi0_layers.velocity_fn(model, layers, obs, kv_cache, prefix_mask)
            if guided:
                prefix, prefix_len, delay = guide
                x_0 = rtc.guided_sample(
                    velocity, noise, num_steps=num_steps, prefix=prefix, prefix_len=prefix_len,
                    delay_steps=delay, beta=beta, schedule=schedule, dim_mask=dim_mask,
                )  # fmt: skip
            else:
                x_0 = engine.flow_sample(velocity, noise, num_steps)
            x_0 = x_0.astype(jnp.float32)
            if affine is not None:  # openpi's output transforms, as the affine map they are
                x_0 = x_0[:, :, : affine[0].shape[1]] * jnp.asarray(affine[0]) + jnp.asarray(affine[1])
            return x_0, rng

        return jax.jit(forward)

    def _compiled_for(self, key: tuple[Any, ...], args: tuple[Any, ...]) -> Any:
        with self._compile_lock:
            fn = self._compiled.get(key)
            if fn is None:
                size, slots, _, noise_given, guided = key
                t0 = time.perf_counter()
                fn = self._forward(slots, noise_given, guided).lower(*args).compile()
                secs = round(time.perf_counter() - t0, 3)
                tag = f"{size}x{'+'.join(slots)}{'+noise' if noise_given else ''}{'+rtc' if guided else ''}"
                self.compile_s[tag] = secs
                self.metadata.extra["compile_s_by_batch"] = dict(self.compile_s)
                logger.info("pi0 fast path: compiled %s in %.1f s", tag, secs)
                self._compiled[key] = fn
            return fn

    # -- one call for a group of requests with the same cameras -------------------------------------------------

    def _stack(self, items: list[HostInputs], size: int) -> tuple[tuple[str, ...], tuple[Any, ...]]:
        rows = items + [items[-1]] * (size - len(items))
        keep = kept_slots(items)
        layout = items[0].layout
        cams = []
        for i in keep:
            src = layout.sources[i]
            if src is None:  # black fill that a mask still calls present: what openpi feeds (zeros)
                cams.append(np.zeros((size, *rows[0].frames["cam_high"].shape), np.uint8))
            elif size == 1:
                cams.append(rows[0].frames[src][np.newaxis])
            else:
                cams.append(np.stack([r.frames[src] for r in rows]))
        arrays = (
            tuple(cams),
            np.stack([r.masks[list(keep)] for r in rows]),
            np.stack([r.state for r in rows]),
            np.stack([r.tokens for r in rows]),
            np.stack([r.token_mask for r in rows]),
        )
        return tuple(layout.slots[i] for i in keep), arrays

    def _guide(self, items: list[HostInputs], size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """RTC inputs for the group (model space, zero past each n; n = d = 0 for requests without rtc)."""
        if all(it.rtc is None for it in items):
            return None
        prefix = np.zeros((size, self.action_horizon, self.action_dim), np.float32)
        n, d = np.zeros(size, np.int32), np.zeros(size, np.int32)
        for k, it in enumerate(items):
            if it.rtc is not None:
                y = it.prefix
                prefix[k, : y.shape[0], : y.shape[1]] = y
                n[k], d[k] = it.rtc.prefix_len, it.rtc.delay_steps
        return prefix, n, d

    def _run_group(
        self, items: list[HostInputs], noise: np.ndarray | None
    ) -> tuple[np.ndarray, float, float]:
        """One compiled call; returns (chunks [n, H, A] in robot units, or model space without ``affine``,
        t_call, t_done)."""
        n = len(items)
        size = _bucket(n)
        slots, arrays = self._stack(items, size)
        if noise is not None:
            noise = np.asarray(noise, np.float32).reshape(-1, self.action_horizon, self.action_dim)
            noise = np.concatenate([noise, np.zeros((size - n, *noise.shape[1:]), np.float32)])
        guide = self._guide(items, size)
        shapes = (tuple(a.shape for a in arrays[0]), arrays[3].shape)
        key = (size, slots, shapes, noise is not None, guide is not None)
        with self._lock:
            fn = self._compiled.get(key)
            if fn is None:
                fn = self._compiled_for(key, (self._params, self._layers, self._rng, *arrays, noise, guide))
            t1 = time.perf_counter()
            inputs = self._jax.device_put((arrays, noise, guide))  # one transfer for every input
            out, rng = fn(self._params, self._layers, self._rng, *inputs[0], inputs[1], inputs[2])
            chunks = np.asarray(out)  # blocks until the chunk is on the host
            t2 = time.perf_counter()
            if noise is None:
                self._rng = rng
        self.last_call = {"batch": size, "slots": slots, "guided": guide is not None}
        return chunks[:n], t1, t2

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
        requests = [rtc.parse_rtc(obs, self.action_horizon, self.robot_dim) for obs in batch]
        items = [self.plan.inputs(o, _prompt_of(o), r) for o, r in zip(batch, requests, strict=True)]
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(group_key(item), []).append(i)
        done: dict[int, tuple[np.ndarray, float, float]] = {}
        for idx in groups.values():
            group_noise = None if noise is None else np.asarray(noise)[idx]
            chunks, t1, t2 = self._run_group([items[i] for i in idx], group_noise)
            done.update({i: (chunks[j], t1, t2) for j, i in enumerate(idx)})
        replies = []
        for i, item in enumerate(items):
            chunk, t1, t2 = done[i]
            if self.affine is None:
                chunk = self.plan.outputs(item.state, chunk)
            reply = self._reply(np.ascontiguousarray(chunk, np.float32), _ms(t0, t1), _ms(t1, t2), 0.0)
            if item.rtc is not None:
                reply[rtc.RTC_KEY] = rtc.rtc_reply(item.rtc, self.rtc_beta, reply["action"])
            reply["policy_timing"]["postprocess_ms"] = _ms(t2, time.perf_counter())
            replies.append(reply)
        return replies

    def warmup(self) -> None:
        """Compile every padded batch size of ``warmup_batch_sizes`` for the canonical one-camera request, with
        and without ``rtc``, and run each once; the rng is put back, so warm-up draws no noise."""
        rng = self._rng
        obs = self._dummy_obs()
        if self._default_prompt is None:
            obs["prompt"] = "warm up"
        guided = {**obs, rtc.RTC_KEY: {"prefix": np.zeros((1, self.robot_dim), np.float32), "delay_steps": 1}}
        t0 = time.perf_counter()
        for b in self.warmup_batch_sizes:
            self.infer_batch([obs] * b)
            self.infer_batch([guided] * b)
        self._rng = rng
        first = next(iter(self.compile_s.values()), 0.0)
        self.metadata.extra["compile_s"] = first
        self.metadata.extra["warmup_s"] = round(time.perf_counter() - t0, 3)
