"""Real-time chunking: the soft mask, the guided sampler on a field whose answer is known, the request
parsing, and the server check for policies without RTC."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pi0remote import rtc
from pi0remote.errors import InvalidInputError

jax = pytest.importorskip("jax")
jnp = jax.numpy

H, D, SIGMA = 10, 3, 0.5


# ------------------------------------------------------------------------------------------ weights


def test_exp_weights_at_known_steps():
    w = np.asarray(rtc.prefix_weights(10, 6, 2, "exp"))
    assert w.shape == (10,)
    c = np.array([4, 3, 2, 1]) / 5.0  # c_i = (n - i) / (n - d + 1), i = 2..5
    expected = np.r_[1.0, 1.0, c * np.expm1(c) / (math.e - 1.0), 0.0, 0.0, 0.0, 0.0]
    np.testing.assert_allclose(w, expected, rtol=1e-6)
    assert w[2] == pytest.approx(0.8 * (math.exp(0.8) - 1) / (math.e - 1), rel=1e-6)


def test_linear_weights_at_known_steps():
    w = np.asarray(rtc.prefix_weights(10, 6, 2, "linear"))
    np.testing.assert_allclose(w, [1, 1, 0.8, 0.6, 0.4, 0.2, 0, 0, 0, 0], rtol=1e-6)


def test_weights_batched_per_sample_and_edges():
    n = jnp.array([6, 4, 0, 10], jnp.int32)
    d = jnp.array([2, 4, 0, 1], jnp.int32)
    w = np.asarray(rtc.prefix_weights(10, n, d, "linear"))
    assert w.shape == (4, 10)
    np.testing.assert_allclose(w[0], rtc.prefix_weights(10, 6, 2, "linear"), rtol=1e-6)
    np.testing.assert_allclose(w[1], [1, 1, 1, 1, 0, 0, 0, 0, 0, 0])  # d = n: hard prefix only
    np.testing.assert_allclose(w[2], np.zeros(10))  # no prefix: unguided
    np.testing.assert_allclose(w[3], np.r_[1.0, np.arange(9, 0, -1) / 10.0], rtol=1e-6)
    with pytest.raises(ValueError):
        rtc.prefix_weights(10, 6, 2, "cosine")


def test_guidance_weight_clip_and_middle():
    assert float(rtc.guidance_weight(1.0, 5.0)) == 5.0  # tau = 0: clipped to beta
    assert float(rtc.guidance_weight(0.0, 5.0)) == 5.0
    assert float(rtc.guidance_weight(0.5, 5.0)) == pytest.approx(2.0)  # (1/4 + 1/4) / (1/4)
    tau = 0.3
    r2 = (1 - tau) ** 2 / (tau**2 + (1 - tau) ** 2)
    assert float(rtc.guidance_weight(1 - tau, 5.0)) == pytest.approx((1 - tau) / (tau * r2), rel=1e-5)


# ------------------------------------------------------------------- guidance on a known linear field


def gaussian_field(mu):
    """The exact flow-matching velocity for data a ~ N(mu, SIGMA^2) per entry (openpi's convention:
    x_t = t * noise + (1 - t) * a, v = noise - a). Linear in x_t; its flow maps noise eps to
    mu + SIGMA * eps, and its denoised estimate x_t - t v is E[a | x_t]."""

    def velocity(x, t):
        t = t[:, None, None]
        s = t**2 + (1 - t) ** 2 * SIGMA**2
        return (t - (1 - t) * SIGMA**2) / s * (x - (1 - t) * mu) - mu

    return velocity


@pytest.fixture(scope="module")
def toy():
    rng = np.random.default_rng(0)
    mu = jnp.asarray(rng.normal(size=(H, D)), jnp.float32)
    eps = jnp.asarray(rng.normal(size=(3, H, D)), jnp.float32)
    target = mu + SIGMA * jnp.asarray(rng.normal(size=(3, H, D)), jnp.float32)  # another plausible chunk
    return gaussian_field(mu), mu, eps, target


def test_unguided_flow_reaches_the_known_sample(toy):
    velocity, mu, eps, _ = toy
    out = rtc.sample(velocity, eps, num_steps=200)
    np.testing.assert_allclose(out, mu + SIGMA * eps, atol=2e-2)


def test_guided_prefix_approaches_target_tail_untouched(toy):
    velocity, _, eps, target = toy
    n, d = 6, 3
    fn = jax.jit(
        lambda e, y, nn, dd: rtc.guided_sample(
            velocity, e, num_steps=10, prefix=y, prefix_len=nn, delay_steps=dd, beta=5.0
        )
    )
    prefix = jnp.where(jnp.arange(H)[None, :, None] < n, target, 0.0)
    guided = np.asarray(fn(eps, prefix, jnp.full(3, n, jnp.int32), jnp.full(3, d, jnp.int32)))
    plain = np.asarray(rtc.sample(velocity, eps, num_steps=10))
    err_guided = np.abs(guided[:, :d] - np.asarray(target)[:, :d]).max()
    err_plain = np.abs(plain[:, :d] - np.asarray(target)[:, :d]).max()
    assert err_plain > 0.5
    assert err_guided < err_plain / 4  # the sign is right: the head moves towards the prefix
    np.testing.assert_allclose(guided[:, n:], plain[:, n:], atol=1e-5)  # W = 0: exactly unguided
    soft = np.abs(guided[:, d:n] - np.asarray(target)[:, d:n]).mean()
    assert soft < np.abs(plain[:, d:n] - np.asarray(target)[:, d:n]).mean()


def test_larger_beta_matches_tighter(toy):
    velocity, _, eps, target = toy
    errs = []
    for beta in (1.0, 5.0, 20.0):
        out = rtc.guided_sample(
            velocity,
            eps,
            num_steps=10,
            prefix=target,
            prefix_len=jnp.full(3, H),
            delay_steps=jnp.full(3, 4),
            beta=beta,
        )
        errs.append(float(jnp.abs(out[:, :4] - target[:, :4]).max()))
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 0.05


def test_per_sample_delays_one_trace_and_mixed_batch(toy):
    velocity, _, eps, target = toy
    traces = []

    def run(e, y, nn, dd):
        traces.append(1)
        return rtc.guided_sample(velocity, e, num_steps=8, prefix=y, prefix_len=nn, delay_steps=dd)

    fn = jax.jit(run)
    plain = np.asarray(rtc.sample(velocity, eps, num_steps=8))
    out1 = np.asarray(fn(eps, target, jnp.array([H, 5, 0]), jnp.array([2, 5, 0])))
    out2 = np.asarray(fn(eps, target, jnp.array([4, H, 0]), jnp.array([4, 7, 0])))
    assert len(traces) == 1  # d and n are traced, not baked in
    np.testing.assert_allclose(out1[2], plain[2], atol=1e-5)  # n = 0: unguided in a guided batch
    np.testing.assert_allclose(out1[1, 5:], plain[1, 5:], atol=1e-5)
    assert np.abs(out2[1, :7] - target[1, :7]).max() < np.abs(plain[1, :7] - target[1, :7]).max() / 4
    # each sample is guided by its own d: sample 0 with d = 2 matches only its first 2 steps tightly
    assert np.abs(out1[0, :2] - target[0, :2]).max() < np.abs(plain[0, :2] - target[0, :2]).max() / 4


def test_padded_dims_get_no_guidance(toy):
    velocity, _, eps, target = toy
    mask = rtc.dim_mask(2, D)
    out = np.asarray(
        rtc.guided_sample(
            velocity,
            eps,
            num_steps=10,
            prefix=target,
            prefix_len=jnp.full(3, H),
            delay_steps=jnp.full(3, 5),
            dim_mask=mask,
        )
    )
    plain = np.asarray(rtc.sample(velocity, eps, num_steps=10))
    np.testing.assert_allclose(out[..., 2], plain[..., 2], atol=1e-5)
    assert np.abs(out[:, :5, :2] - target[:, :5, :2]).max() < 0.3


# --------------------------------------------------------------------------------------- numpy side


def request(n=6, d=2, a=14, **over):
    field = {"prefix": np.ones((n, a), np.float32), "delay_steps": d}
    field.update(over)
    return {"state": np.zeros(14, np.float32), "rtc": field}


def test_parse_rtc_accepts_and_reports():
    assert rtc.parse_rtc({"state": np.zeros(14)}, 50, 14) is None
    req = rtc.parse_rtc(request(n=6, d=np.int64(2)), 50, 14)
    assert req.prefix_len == 6 and req.delay_steps == 2 and req.prefix.dtype == np.float32
    chunk = np.ones((50, 14), np.float32)
    chunk[1, 3] = 1.25
    chunk[4, 0] = 9.0  # past d: not counted
    assert rtc.rtc_reply(req, 5.0, chunk) == {"delay_steps": 2, "beta": 5.0, "prefix_error": 0.25}


@pytest.mark.parametrize(
    "field",
    [
        [1, 2],
        {"prefix": np.ones((6, 14), np.float32)},
        {"prefix": np.ones((6, 14), np.float32), "delay_steps": 2, "extra": 1},
        {"prefix": [[1.0] * 14], "delay_steps": 1},
        {"prefix": np.ones((6, 14), np.int32), "delay_steps": 2},
        {"prefix": np.ones((6, 13), np.float32), "delay_steps": 2},
        {"prefix": np.ones((51, 14), np.float32), "delay_steps": 2},
        {"prefix": np.ones((0, 14), np.float32), "delay_steps": 0},
        {"prefix": np.ones(14, np.float32), "delay_steps": 1},
        {"prefix": np.ones((6, 14), np.float32), "delay_steps": 0},
        {"prefix": np.ones((6, 14), np.float32), "delay_steps": 7},
        {"prefix": np.ones((6, 14), np.float32), "delay_steps": 2.0},
        {"prefix": np.ones((6, 14), np.float32), "delay_steps": True},
        {"prefix": np.full((6, 14), np.nan, np.float32), "delay_steps": 2},
    ],
)
def test_parse_rtc_rejects(field):
    with pytest.raises(InvalidInputError):
        rtc.parse_rtc({"rtc": field}, 50, 14)


def test_stack_requests_pads_into_model_space():
    reqs = [rtc.parse_rtc(request(n=3, d=1, a=2), 5, 2), None]
    batch = rtc.stack_requests(reqs, 5, 4, to_model=lambda p: p * 2.0)
    assert batch.prefix.shape == (2, 5, 4) and batch.any
    np.testing.assert_array_equal(batch.prefix[0, :3, :2], 2.0)
    assert not batch.prefix[0, 3:].any() and not batch.prefix[0, :, 2:].any() and not batch.prefix[1].any()
    np.testing.assert_array_equal(batch.prefix_len, [3, 0])
    np.testing.assert_array_equal(batch.delay_steps, [1, 0])
