"""π₀'s sampler as jittable functions over openpi's model, for the fast checkpoint path and random weights.

The computation is openpi's ``Pi0.sample_actions`` taken apart at its seams, so that each part can be
swapped without touching the model:

* :func:`device_image`: the request's uint8 camera (CHW) to the model's [-1, 1] float32 HWC image, with
  openpi's resize-with-pad when the camera is not the model's size, on the device;
* :func:`prefill`: the prefix (only the image slots given, then the prompt tokens) fills the KV cache once;
* :func:`velocity_fn`: ``v(x_t, t)``, one action-expert pass over the cached prefix (``t`` a scalar or per
  sample, openpi's convention: 1 = noise, 0 = data);
* :func:`flow_sample`: openpi's Euler loop (``dt = -1/num_steps``, ``while t >= -dt/2``) over any velocity
  function, so that guided sampling (real-time chunking, ``pi0remote.rtc``) replaces the loop, not the model.

Nothing here imports jax at module import; the functions run under ``jax.jit``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = [
    "attn_mask",
    "device_image",
    "flow_sample",
    "prefill",
    "resize_with_pad",
    "suffix_attention",
    "velocity_fn",
]


def _jax() -> tuple[Any, Any]:
    return importlib.import_module("jax"), importlib.import_module("jax.numpy")


def resize_with_pad(img: Any, height: int, width: int) -> Any:
    """uint8 [B, h, w, C] -> uint8 [B, height, width, C]: scale to fit keeping the aspect ratio (bilinear,
    antialiased when shrinking), then pad with black, centred; the same geometry as openpi_client's
    ``resize_with_pad`` (PIL), whose pixels it matches up to interpolation rounding."""
    jax, jnp = _jax()
    cur_h, cur_w = int(img.shape[1]), int(img.shape[2])
    ratio = max(cur_w / width, cur_h / height)
    rh, rw = int(cur_h / ratio), int(cur_w / ratio)
    out = jax.image.resize(
        img.astype(jnp.float32), (img.shape[0], rh, rw, img.shape[3]), "linear", antialias=True
    )
    out = jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8)
    ph, pw = max(0, int((height - rh) / 2)), max(0, int((width - rw) / 2))
    return jnp.pad(out, ((0, 0), (ph, height - rh - ph), (pw, width - rw - pw), (0, 0)))


def device_image(cam: Any, *, chw: bool = True, size: tuple[int, int] | None = (224, 224)) -> Any:
    """A batch of uint8 camera frames (CHW when ``chw``) -> float32 HWC in [-1, 1], as openpi's transforms and
    ``Observation.from_dict`` make it (resize first, on uint8, then ``x / 255 * 2 - 1``)."""
    _, jnp = _jax()
    img = jnp.transpose(cam, (0, 2, 3, 1)) if chw else cam
    if size is not None and tuple(img.shape[1:3]) != tuple(size):
        img = resize_with_pad(img, *size)
    return img.astype(jnp.float32) / 255.0 * 2.0 - 1.0


def attn_mask(input_mask: Any, ar_mask: Any) -> Any:
    """Prefix-LM attention from big_vision's convention: token i sees token j when j is valid and j's block
    (cumulative ``ar_mask``) is not after i's."""
    _, jnp = _jax()
    ar_mask = jnp.broadcast_to(ar_mask, input_mask.shape)
    blocks = jnp.cumsum(ar_mask, axis=1)
    causal = blocks[:, None, :] <= blocks[:, :, None]
    valid = input_mask[:, None, :] * input_mask[:, :, None]
    return jnp.logical_and(causal, valid)


def prefill(model: Any, obs: Any) -> tuple[Any, Any]:
    """Embed the prefix (image slots in ``obs.images`` order, then the prompt) and fill the KV cache.
    Returns (kv_cache, prefix_mask [B, P])."""
    _, jnp = _jax()
    tokens, mask, ar = model.embed_prefix(obs)
    positions = jnp.cumsum(mask, axis=1) - 1
    _, kv_cache = model.PaliGemma.llm([tokens, None], mask=attn_mask(mask, ar), positions=positions)
    return kv_cache, mask


def suffix_attention(prefix_mask: Any, s_mask: Any, s_ar: Any) -> tuple[Any, Any]:
    """openpi's flow-step attention: (mask [B, T, P + T]: the suffix sees the valid prefix and, by block, itself;
    positions [B, T]: counted on from the prefix's valid tokens)."""
    _, jnp = _jax()
    b, t, p = s_mask.shape[0], s_mask.shape[1], prefix_mask.shape[1]
    p_attn = jnp.broadcast_to(prefix_mask[:, None, :], (b, t, p))
    full = jnp.concatenate([p_attn, attn_mask(s_mask, s_ar)], axis=-1)
    return full, jnp.sum(prefix_mask, axis=-1)[:, None] + jnp.cumsum(s_mask, axis=-1) - 1


def velocity_fn(model: Any, obs: Any, kv_cache: Any, prefix_mask: Any) -> Callable[[Any, Any], Any]:
    """``v(x_t [B, H, D], t) -> [B, H, D]``: the action expert over the cached prefix, as in openpi's step."""
    _, jnp = _jax()
    b = obs.state.shape[0]
    horizon = model.action_horizon

    def v(x_t: Any, t: Any) -> Any:
        s_tokens, s_mask, s_ar, adarms = model.embed_suffix(obs, x_t, jnp.broadcast_to(t, (b,)))
        full, positions = suffix_attention(prefix_mask, s_mask, s_ar)
        (_, out), _ = model.PaliGemma.llm(
            [None, s_tokens], mask=full, positions=positions, kv_cache=kv_cache, adarms_cond=[None, adarms]
        )
        return model.action_out_proj(out[:, -horizon:])

    return v


def flow_sample(velocity: Callable[[Any, Any], Any], noise: Any, num_steps: int) -> Any:
    """openpi's Euler integration from noise (t = 1) to actions (t = 0): ``x <- x + dt * v(x, t)``."""
    jax, _ = _jax()
    dt = -1.0 / num_steps

    def step(carry: tuple[Any, Any]) -> tuple[Any, Any]:
        x_t, t = carry
        return x_t + dt * velocity(x_t, t), t + dt

    x_0, _ = jax.lax.while_loop(lambda carry: carry[1] >= -dt / 2, step, (noise, 1.0))
    return x_0
