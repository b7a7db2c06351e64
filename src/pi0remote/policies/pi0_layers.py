"""π₀'s Gemma layers written for serving: weights split per layer once, fewer kernels per layer and step.

openpi runs the 18 Gemma layers as a ``flax.linen.scan`` over weights stacked on a leading axis. Compiled by
XLA, every layer of every flow step then copies its weight slices out of the stacks, and the grouped-query
einsums transpose the queries and the cached keys each time: on an H200, 5,963 kernels and ~6 of the ~25 ms
of a batch-1 call go to copies, slices and transposes (``benchmarks/pi0_profile.py``). Here the same
arithmetic runs over weights laid out once at load:

* per layer, not stacked (no slice copies); the query and key/value projections merged into one matrix, the
  gate and up projections of the feed-forward into another;
* π₀ has one key/value head, so the 8 query heads fold into the rows of one matmul against the cached keys
  (``btnh,bsh->btns``): no transposes, and the prefix cache stays [B, S, head_dim] per layer;
* the same dtypes and order as openpi (float32 RMSNorm statistics, RoPE in float32 cast back, float32 logits
  and softmax, the tanh GELU), so the results differ from openpi's only by bf16 rounding order.

Only π₀'s shapes are covered (no LoRA weights, no adaRMS, one key/value head); :func:`unsupported` names what
is not, and then the caller keeps openpi's own modules. Nothing here imports jax at module import.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from .pi0_engine import attn_mask, suffix_attention

__all__ = ["prefill", "prepare", "unsupported", "velocity_fn"]

BIG_NEG = -2.3819763e38  # openpi's mask value (gemma/modules.py)
_PROJ = ("attn_norm", "qkv", "out", "ffw_norm", "gating", "linear")


def _jax() -> tuple[Any, Any]:
    return importlib.import_module("jax"), importlib.import_module("jax.numpy")


def _llm_params(params: Any) -> Mapping[str, Any]:
    pure = params.to_pure_dict() if hasattr(params, "to_pure_dict") else params
    return pure["PaliGemma"]["llm"]


def _keys(tree: Mapping[str, Any]) -> Iterator[Any]:
    for key, value in tree.items():
        yield key
        if isinstance(value, Mapping):
            yield from _keys(value)


def unsupported(model: Any, params: Any) -> str | None:
    """Why the split layers cannot serve this model (None: they can)."""
    if getattr(model, "pi05", False):
        return "pi05 (adaRMS) is not covered"
    try:
        llm = _llm_params(params)
        layers = llm["layers"]
        attn = layers["attn"]
    except (KeyError, TypeError, AttributeError):
        return "no PaliGemma.llm.layers in the parameters"
    if any("lora" in str(k) for k in _keys(layers)):
        return "LoRA weights are not covered"
    for suffix in ("", "_1"):
        if f"q_einsum{suffix}" not in attn or f"kv_einsum{suffix}" not in attn:
            return "a fused qkv projection (num_kv_heads == num_heads) is not covered"
        if attn[f"kv_einsum{suffix}"]["w"].shape[2] != 1:
            return "more than one key/value head is not covered"
    return None


def prepare(params: Any, dtype: Any = None) -> dict[str, Any]:
    """The two experts' weights per layer (``"prefix"``: PaliGemma, ``"suffix"``: the action expert), merged
    and cast to the compute dtype (bf16, as openpi casts them at each use); call once, outside the hot path.
    Arrays only (a pytree to pass into a jitted function); head counts follow from the shapes."""
    jax, jnp = _jax()
    dtype = dtype or jnp.bfloat16

    def split(llm: Mapping[str, Any]) -> dict[str, Any]:
        return {"prefix": _expert(jnp, llm, "", dtype), "suffix": _expert(jnp, llm, "_1", dtype)}

    # the weights go in as arguments (closed over, they would be compiled in as constants)
    return jax.block_until_ready(jax.jit(split)(dict(_llm_params(params))))


def _expert(jnp: Any, llm: Mapping[str, Any], suffix: str, dtype: Any) -> dict[str, Any]:
    """One expert's (``""``: PaliGemma, ``"_1"``: the action expert) weights, per layer and merged."""
    layers, attn = llm["layers"], llm["layers"]["attn"]
    q = attn[f"q_einsum{suffix}"]["w"]  # [L, N, D, H]
    kv = attn[f"kv_einsum{suffix}"]["w"]  # [L, 2, 1, D, H]
    depth, heads, width, head_dim = q.shape
    qkv = jnp.concatenate(
        [
            jnp.transpose(q, (0, 2, 1, 3)).reshape(depth, width, heads * head_dim),
            jnp.transpose(kv[:, :, 0], (0, 2, 1, 3)).reshape(depth, width, 2 * head_dim),
        ],
        axis=-1,
    )
    gating = layers[f"mlp{suffix}"]["gating_einsum"]  # [L, 2, D, F]
    stacked = {
        "attn_norm": layers[f"pre_attention_norm{suffix}"]["scale"],
        "qkv": qkv.astype(dtype),
        "out": attn[f"attn_vec_einsum{suffix}"]["w"].reshape(depth, heads * head_dim, width).astype(dtype),
        "ffw_norm": layers[f"pre_ffw_norm{suffix}"]["scale"],
        "gating": jnp.transpose(gating, (0, 2, 1, 3)).reshape(depth, width, -1).astype(dtype),
        "linear": layers[f"mlp{suffix}"]["linear"].astype(dtype),
    }
    return {
        "layers": [{k: v[i] for k, v in stacked.items()} for i in range(depth)],
        "final_norm": llm[f"final_norm{suffix}"]["scale"],
    }


# -- openpi's arithmetic, per layer -----------------------------------------------------------------------------


def rms_norm(x: Any, scale: Any) -> Any:
    """openpi's RMSNorm (no adaRMS): statistics and normalisation in float32, back to ``x``'s dtype."""
    _, jnp = _jax()
    var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    normed = x * jnp.reciprocal(jnp.sqrt(var + 1e-06))
    return (normed * (1 + scale)).astype(x.dtype)


def rope_tables(positions: Any, head_dim: int, max_wavelength: float = 10_000) -> tuple[Any, Any]:
    """(sin, cos) [B, T, 1, head_dim / 2] for openpi's RoPE at ``positions`` [B, T]."""
    _, jnp = _jax()
    freq_exponents = (2.0 / head_dim) * jnp.arange(head_dim // 2, dtype=jnp.float32)
    timescale = max_wavelength**freq_exponents
    radians = (positions[..., None] / timescale[None, None, :])[..., None, :]
    return jnp.sin(radians), jnp.cos(radians)


def _rope(x: Any, sin: Any, cos: Any) -> Any:
    _, jnp = _jax()
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def head_dim(w: Mapping[str, Any]) -> int:
    return (w["qkv"].shape[-1] - w["out"].shape[0]) // 2


def layer(
    x: Any, w: Mapping[str, Any], rope: tuple[Any, Any], mask: Any, cache: tuple[Any, Any] | None = None
) -> tuple[Any, tuple[Any, Any]]:
    """One Gemma block over tokens ``x`` [B, T, D] that attend to ``cache`` (keys, values [B, S, H]) and to
    themselves, under ``mask`` [B, T, S + T]. Returns (x, (keys, values) of these tokens)."""
    jax, jnp = _jax()
    b, t, _ = x.shape
    nq, hd = w["out"].shape[0], head_dim(w)  # heads * head_dim, head_dim
    qkv = rms_norm(x, w["attn_norm"]) @ w["qkv"]
    q = _rope(qkv[..., :nq].reshape(b, t, nq // hd, hd), *rope)
    q = q * hd**-0.5
    k = _rope(qkv[..., nq : nq + hd][:, :, None, :], *rope)[:, :, 0]
    v = qkv[..., nq + hd :]
    keys, values = (
        (k, v) if cache is None else (jnp.concatenate([cache[0], k], 1), jnp.concatenate([cache[1], v], 1))
    )
    logits = jnp.einsum("btnh,bsh->btns", q, keys, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(jnp.where(mask[:, :, None, :], logits, BIG_NEG), axis=-1).astype(x.dtype)
    encoded = jnp.einsum("btns,bsh->btnh", probs, values).reshape(b, t, nq)
    x = x + encoded @ w["out"]
    gate_up = rms_norm(x, w["ffw_norm"]) @ w["gating"]
    f = gate_up.shape[-1] // 2
    x = x + (jax.nn.gelu(gate_up[..., :f], approximate=True) * gate_up[..., f:]) @ w["linear"]
    return x, (k, v)


# -- the two passes of π₀'s sampler -----------------------------------------------------------------------------


def prefill(model: Any, weights: Mapping[str, Any], obs: Any) -> tuple[Any, Any]:
    """The prefix (image slots, then prompt) through PaliGemma's layers: (per-layer (keys, values), mask [B, P])."""
    _, jnp = _jax()
    tokens, mask, ar = model.embed_prefix(obs)
    pre = weights["prefix"]
    x = tokens.astype(pre["layers"][0]["qkv"].dtype)
    rope = rope_tables(jnp.cumsum(mask, axis=1) - 1, head_dim(pre["layers"][0]))
    full = attn_mask(mask, ar)
    cache = []
    for w in pre["layers"]:
        x, kv = layer(x, w, rope, full)
        cache.append(kv)
    return cache, mask


def velocity_fn(
    model: Any, weights: Mapping[str, Any], obs: Any, cache: list[Any], prefix_mask: Any
) -> Callable[[Any, Any], Any]:
    """``v(x_t [B, H, D], t)``: the action expert over the cached prefix, as openpi's flow step computes it."""
    _, jnp = _jax()
    b, horizon, suf = obs.state.shape[0], model.action_horizon, weights["suffix"]
    # openpi's own suffix masks (constants; the tokens of this probe call are unused and compiled away)
    _, s_mask, s_ar, _ = model.embed_suffix(obs, jnp.zeros((b, horizon, model.action_dim)), jnp.ones((b,)))
    full, positions = suffix_attention(prefix_mask, s_mask, s_ar)
    rope = rope_tables(positions, head_dim(suf["layers"][0]))
    dtype = suf["layers"][0]["qkv"].dtype

    def v(x_t: Any, t: Any) -> Any:
        tokens, _, _, _ = model.embed_suffix(obs, x_t, jnp.broadcast_to(t, (b,)))
        x = tokens.astype(dtype)
        for w, kv in zip(suf["layers"], cache, strict=True):
            x, _ = layer(x, w, rope, full, kv)
        return model.action_out_proj(rms_norm(x, suf["final_norm"])[:, -horizon:])

    return v
