"""pi0remote.policies.pi0_layers against openpi's Gemma arithmetic, written here the way openpi writes it.

The reference below keeps openpi's form: weights stacked on a layer axis, grouped-query einsums
(``BTKGH,BSKH->BKGTS``), separate query and key/value projections, the gating pair indexed ``w[0]`` / ``w[1]``.
The split layers merge projections, fold the heads into one matmul and keep the prefix cache per layer; in float32
both must agree to rounding, for the prefix fill, one velocity call and a whole flow sample, with a padded prompt.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from pi0remote.policies import pi0_engine as engine  # noqa: E402
from pi0remote.policies import pi0_layers  # noqa: E402

WIDTH, DEPTH, MLP, HEADS, HEAD_DIM = 32, 3, 64, 4, 8
HORIZON, ACTION_DIM, IMG_TOKENS, PROMPT = 6, 5, 7, 5


def _params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def r(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    layers: dict = {"attn": {}}
    for sfx in ("", "_1"):
        layers["attn"][f"q_einsum{sfx}"] = {"w": r(DEPTH, HEADS, WIDTH, HEAD_DIM)}
        layers["attn"][f"kv_einsum{sfx}"] = {"w": r(DEPTH, 2, 1, WIDTH, HEAD_DIM)}
        layers["attn"][f"attn_vec_einsum{sfx}"] = {"w": r(DEPTH, HEADS, HEAD_DIM, WIDTH)}
        layers[f"mlp{sfx}"] = {"gating_einsum": r(DEPTH, 2, WIDTH, MLP), "linear": r(DEPTH, MLP, WIDTH)}
        layers[f"pre_attention_norm{sfx}"] = {"scale": r(DEPTH, WIDTH)}
        layers[f"pre_ffw_norm{sfx}"] = {"scale": r(DEPTH, WIDTH)}
    llm = {"layers": layers, "final_norm": {"scale": r(WIDTH)}, "final_norm_1": {"scale": r(WIDTH)}}
    return {"PaliGemma": {"llm": llm}, "out_proj": r(WIDTH, ACTION_DIM), "in_proj": r(ACTION_DIM + 1, WIDTH)}


class _Model:
    """The parts of openpi's Pi0 the passes call: prefix tokens, suffix tokens (a state token, then the actions
    mixed with the time), the output projection."""

    def __init__(self, params: dict, batch: int, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        self.p, self.action_horizon, self.action_dim, self.pi05 = params, HORIZON, ACTION_DIM, False
        self.prefix = jnp.asarray(rng.standard_normal((batch, IMG_TOKENS + PROMPT, WIDTH)), jnp.float32)
        mask = np.ones((batch, IMG_TOKENS + PROMPT), bool)
        mask[0, -2:] = False  # a padded prompt
        self.prefix_mask = jnp.asarray(mask)

    def embed_prefix(self, obs):  # noqa: ANN001, ANN201
        return self.prefix, self.prefix_mask, jnp.zeros(IMG_TOKENS + PROMPT, bool)

    def embed_suffix(self, obs, x_t, t):  # noqa: ANN001, ANN201
        b = x_t.shape[0]
        feats = jnp.concatenate([x_t, jnp.broadcast_to(t[:, None, None], (b, HORIZON, 1))], -1)
        state = jnp.broadcast_to(obs.state[:, None, : ACTION_DIM + 1], (b, 1, ACTION_DIM + 1))
        tokens = jnp.concatenate([state, feats], 1) @ self.p["in_proj"]
        ar = jnp.asarray([True, True] + [False] * (HORIZON - 1))
        return tokens, jnp.ones((b, HORIZON + 1), bool), ar, None

    def action_out_proj(self, x):  # noqa: ANN001, ANN201
        return x @ self.p["out_proj"]


# -- openpi's form -----------------------------------------------------------------------------------------------


def _rms(x, scale):  # noqa: ANN001, ANN202
    var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    return (x * jnp.reciprocal(jnp.sqrt(var + 1e-06)) * (1 + scale)).astype(x.dtype)


def _rope(x, positions):  # noqa: ANN001, ANN202
    freq = (2.0 / x.shape[-1]) * jnp.arange(x.shape[-1] // 2, dtype=jnp.float32)
    radians = (positions[..., None] / (10_000**freq)[None, None, :])[..., None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate(
        [x1 * jnp.cos(radians) - x2 * jnp.sin(radians), x2 * jnp.cos(radians) + x1 * jnp.sin(radians)], -1
    )


def _block(llm, sfx, i, x, positions, mask, cache=None):  # noqa: ANN001, ANN202
    lay, attn = llm["layers"], llm["layers"]["attn"]
    h = _rms(x, lay[f"pre_attention_norm{sfx}"]["scale"][i])
    q = jnp.einsum("BTD,NDH->BTNH", h, attn[f"q_einsum{sfx}"]["w"][i])
    k, v = jnp.einsum("BSD,2KDH->2BSKH", h, attn[f"kv_einsum{sfx}"]["w"][i])
    q, k = _rope(q, positions) * HEAD_DIM**-0.5, _rope(k, positions)
    if cache is not None:
        k, v = jnp.concatenate([cache[0], k], 1), jnp.concatenate([cache[1], v], 1)
    q = q.reshape(*q.shape[:2], 1, HEADS, HEAD_DIM)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k)
    probs = jax.nn.softmax(jnp.where(mask[:, None, None], logits, -2.3819763e38), axis=-1)
    enc = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(*x.shape[:2], HEADS, HEAD_DIM)
    x = x + jnp.einsum("BTNH,NHD->BTD", enc, attn[f"attn_vec_einsum{sfx}"]["w"][i])
    h = _rms(x, lay[f"pre_ffw_norm{sfx}"]["scale"][i])
    w = lay[f"mlp{sfx}"]["gating_einsum"][i]
    ff = jax.nn.gelu(jnp.dot(h, w[0]), approximate=True) * jnp.dot(h, w[1])
    return x + jnp.dot(ff, lay[f"mlp{sfx}"]["linear"][i]), (k, v)


def _reference(model, noise, state, steps=4):  # noqa: ANN001, ANN202
    llm, b = model.p["PaliGemma"]["llm"], noise.shape[0]
    tokens, pmask, ar = model.embed_prefix(None)
    positions, caches, x = jnp.cumsum(pmask, 1) - 1, [], tokens
    for i in range(DEPTH):
        x, kv = _block(llm, "", i, x, positions, engine.attn_mask(pmask, ar))
        caches.append(kv)
    obs = SimpleNamespace(state=state)

    def velocity(x_t, t):  # noqa: ANN001, ANN202
        s_tok, s_mask, s_ar, _ = model.embed_suffix(obs, x_t, jnp.broadcast_to(t, (b,)))
        full = jnp.concatenate(
            [
                jnp.broadcast_to(pmask[:, None], (b, HORIZON + 1, pmask.shape[1])),
                engine.attn_mask(s_mask, s_ar),
            ],
            -1,
        )
        pos = jnp.sum(pmask, -1)[:, None] + jnp.cumsum(s_mask, -1) - 1
        y = s_tok
        for i in range(DEPTH):
            y, _ = _block(llm, "_1", i, y, pos, full, caches[i])
        return model.action_out_proj(_rms(y, llm["final_norm_1"]["scale"])[:, -HORIZON:])

    keys = [c[0][:, :, 0] for c in caches]
    return keys, velocity(noise, 0.6), engine.flow_sample(velocity, noise, steps)


def _split(model, noise, state, steps=4):  # noqa: ANN001, ANN202
    weights = pi0_layers.prepare(model.p, jnp.float32)
    obs = SimpleNamespace(state=state)
    cache, pmask = pi0_layers.prefill(model, weights, obs)
    v = pi0_layers.velocity_fn(model, weights, obs, cache, pmask)
    return [k for k, _ in cache], v(noise, 0.6), engine.flow_sample(v, noise, steps)


@pytest.mark.parametrize("batch", [1, 3])
def test_split_layers_compute_openpis_layers(batch: int) -> None:
    params = jax.tree.map(jnp.asarray, _params())
    model = _Model(params, batch)
    rng = np.random.default_rng(2)
    noise = jnp.asarray(rng.standard_normal((batch, HORIZON, ACTION_DIM)), jnp.float32)
    state = jnp.asarray(rng.uniform(-1, 1, (batch, ACTION_DIM + 1)), jnp.float32)
    ref_keys, ref_v, ref_x = jax.jit(lambda n, s: _reference(model, n, s))(noise, state)
    keys, v, x = jax.jit(lambda n, s: _split(model, n, s))(noise, state)
    for a, b in zip(ref_keys, keys, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(v), np.asarray(ref_v), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(x), np.asarray(ref_x), atol=2e-5, rtol=1e-5)
    assert float(jnp.abs(ref_x).mean()) > 0.05  # a result with some size, not zeros compared to zeros


def test_a_changed_weight_changes_the_split_result() -> None:
    """The comparison above can fail: one wrong weight in the action expert moves the velocity."""
    params = jax.tree.map(jnp.asarray, _params())
    model = _Model(params, 1)
    noise = jnp.ones((1, HORIZON, ACTION_DIM), jnp.float32)
    state = jnp.zeros((1, ACTION_DIM + 1), jnp.float32)
    _, v, _ = _split(model, noise, state)
    w = params["PaliGemma"]["llm"]["layers"]["mlp_1"]["linear"]
    params["PaliGemma"]["llm"]["layers"]["mlp_1"]["linear"] = w.at[1, 0, 0].add(1.0)
    _, v2, _ = _split(_Model(params, 1), noise, state)
    assert float(jnp.abs(v2 - v).max()) > 1e-3


def test_prepare_keeps_the_compute_dtype_and_splits_every_layer() -> None:
    weights = pi0_layers.prepare(jax.tree.map(jnp.asarray, _params()))
    for name in ("prefix", "suffix"):
        assert len(weights[name]["layers"]) == DEPTH
        w = weights[name]["layers"][0]
        assert w["qkv"].shape == (WIDTH, (HEADS + 2) * HEAD_DIM) and w["qkv"].dtype == jnp.bfloat16
        assert w["gating"].shape == (WIDTH, 2 * MLP) and w["out"].shape == (HEADS * HEAD_DIM, WIDTH)
        assert pi0_layers.head_dim(w) == HEAD_DIM


def test_unsupported_names_what_the_split_layers_do_not_cover() -> None:
    params = _params()
    assert pi0_layers.unsupported(SimpleNamespace(pi05=False), params) is None
    assert "pi05" in pi0_layers.unsupported(SimpleNamespace(pi05=True), params)
    assert "PaliGemma" in pi0_layers.unsupported(SimpleNamespace(pi05=False), {"other": {}})
    lora = _params()
    lora["PaliGemma"]["llm"]["layers"]["mlp_1"]["gating_einsum_lora_a"] = np.zeros(1)
    assert "LoRA" in pi0_layers.unsupported(SimpleNamespace(pi05=False), lora)
    attn_lora = _params()  # openpi's LoRA einsums keep their factors beside "w"
    attn_lora["PaliGemma"]["llm"]["layers"]["attn"]["q_einsum_1"]["lora_a"] = np.zeros(1)
    assert "LoRA" in pi0_layers.unsupported(SimpleNamespace(pi05=False), attn_lora)
    multi = _params()
    multi["PaliGemma"]["llm"]["layers"]["attn"]["kv_einsum_1"]["w"] = np.zeros((DEPTH, 2, 2, WIDTH, HEAD_DIM))
    assert "key/value head" in pi0_layers.unsupported(SimpleNamespace(pi05=False), multi)
