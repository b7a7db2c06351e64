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
    fn = jax.jit(
        lambda b: rtc.guided_sample(velocity, eps, num_steps=10, prefix=target, prefix_len=jnp.full(3, H),
                                    delay_steps=jnp.full(3, 4), beta=b)
    )  # fmt: skip
    for beta in (1.0, 5.0, 20.0):
        out = fn(beta)  # beta is traced: one compilation
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


# ------------------------------------------------------------------------ server: check, toy policy


def rtc_field(prefix, d):
    return {"prefix": np.asarray(prefix, np.float32), "delay_steps": d}


@pytest.mark.parametrize("transport", ["tcp", "ws", "http", "local"])
def test_policy_without_rtc_refuses_the_field_and_keeps_serving(probe_server, transport):
    from conftest import connect_to, make_obs

    with connect_to(probe_server, transport) as client:
        with pytest.raises(InvalidInputError, match="real-time chunking"):
            client.infer(make_obs(0, rtc=rtc_field(np.zeros((10, 14)), 2)))
        assert client.infer(make_obs(1))["action"].shape == (50, 14)


@pytest.fixture(scope="module")
def toy_server():
    from pi0remote.server import BackgroundServer
    from rtc_toy import ToyFlowPolicy

    policy = ToyFlowPolicy(seed=1)
    with BackgroundServer(policy, name="toyflow", http_port=0, tcp_port=0, transports=["tcp"],
                          max_batch=4) as srv:  # fmt: skip
        yield srv, policy


def state_obs(seed=0, **extra):
    rng = np.random.default_rng(seed)
    return {"state": rng.normal(size=14).astype(np.float32), **extra}


def test_toy_server_guides_the_head_onto_the_prefix(toy_server):
    from pi0remote import connect

    srv, _ = toy_server
    with connect(srv.url("tcp")) as client:
        assert client.metadata["policy"]["rtc"] is True
        old = client.infer(state_obs(3))["action"]
        assert "rtc" not in client.infer(state_obs(3))
        rest, d = old[10:], 5  # 10 steps executed; the robot expects 5 more before the new chunk
        guided = client.infer(state_obs(3, rtc=rtc_field(rest, d)))
        plain = client.infer(state_obs(3))["action"]
        info = guided["rtc"]
        assert info["delay_steps"] == d and info["beta"] == 5.0
        assert info["prefix_error"] == pytest.approx(np.abs(guided["action"][:d] - rest[:d]).max(), rel=1e-5)
        unguided_error = np.abs(plain[:d] - rest[:d]).max()
        motion = np.abs(np.diff(old, axis=0)).max()  # the chunk's own step-to-step motion
        assert unguided_error > 3 * info["prefix_error"]
        assert info["prefix_error"] < motion
        with pytest.raises(InvalidInputError):
            client.infer(state_obs(3, rtc=rtc_field(rest, len(rest) + 1)))
        assert client.infer(state_obs(4))["action"].shape == (50, 14)


def test_toy_batch_mixes_guided_and_unguided_per_sample():
    from rtc_toy import ToyFlowPolicy

    policy = ToyFlowPolicy(seed=2)
    old = policy.infer(state_obs(5))["action"]
    batch = [state_obs(5, rtc=rtc_field(old[4:], 3)), state_obs(5), state_obs(5, rtc=rtc_field(old[20:], 12))]
    replies = policy.infer_batch(batch)
    assert policy.calls[-1] == 3 and "rtc" not in replies[1]
    assert replies[0]["rtc"]["delay_steps"] == 3 and replies[2]["rtc"]["delay_steps"] == 12
    for reply, rest, d in ((replies[0], old[4:], 3), (replies[2], old[20:], 12)):
        assert reply["rtc"]["prefix_error"] < np.abs(replies[1]["action"][:d] - rest[:d]).max() / 3


def test_serve_flags_reach_the_flow_policy():
    import os
    from pathlib import Path

    from pi0remote import connect
    from pi0remote.harness.procs import ServerProcess

    tests = str(Path(__file__).parent)
    env = {"PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    args = ["--policy", "rtc_toy:ToyFlowPolicy", "--rtc-beta", "2.5", "--rtc-schedule", "linear",
            "--http-port", "0", "--tcp-port", "0", "--transports", "tcp"]  # fmt: skip
    with ServerProcess(args, env=env) as srv, connect(srv.url("tcp")) as client:
        meta = client.metadata["policy"]
        assert (meta["rtc_beta"], meta["rtc_schedule"]) == (2.5, "linear")
        old = client.infer(state_obs(0))["action"]
        assert client.infer(state_obs(0, rtc=rtc_field(old[8:], 4)))["rtc"]["beta"] == 2.5


# ------------------------------------------------------------------------------- broker, rtc=True


class RecordingStepPolicy:
    """``chunk[i] = step + i + 1000 * call`` (each call's chunk disagrees with the last one by 1000);
    with a prefix, its first d actions copy it (a perfectly guided flow policy)."""

    metadata = {"rtc": True}

    def __init__(self):
        self.requests = []

    def infer(self, obs):
        self.requests.append(obs)
        values = obs["step"] + np.arange(50, dtype=np.float64) + 1000.0 * (len(self.requests) - 1)
        chunk = np.repeat(values[:, None], 14, axis=1).astype(np.float32)
        if "rtc" in obs:
            d = obs["rtc"]["delay_steps"]
            chunk[:d] = obs["rtc"]["prefix"][:d]
        return {"action": chunk}


def run_broker(broker, ticks, t0=0.0):
    values = []
    for k in range(ticks):
        action = broker.act(lambda k=k: {"step": k}, k, t0 + k * 0.02)
        values.append(None if action is None else float(action[0]))
    return values


def test_broker_rtc_request_carries_the_rest_and_the_measured_delay():
    from pi0remote.broker import ActionChunkBroker, SimulatedLatency

    policy = RecordingStepPolicy()
    broker = ActionChunkBroker(requester=SimulatedLatency(policy, 0.1), prefetch_at=7, rtc=True)  # 5 ticks
    broker.prime({"step": 0}, 0, 0.0)
    values = run_broker(broker, 120)
    first, second, third = policy.requests[:3]
    assert "rtc" not in first  # nothing queued yet: the warm-start request has no prefix
    k = second["step"]
    assert broker.history[1].step == k == 50 - 7  # asked with 7 actions left
    np.testing.assert_array_equal(second["rtc"]["prefix"][:, 0], np.arange(k, 50))  # chunk 0's rest
    assert second["rtc"]["delay_steps"] == 5 and second["rtc"]["prefix"].dtype == np.float32
    assert broker.history[1].rtc_delay_steps == 5 and broker.history[1].rtc_prefix_len == 50 - k
    assert third["rtc"]["delay_steps"] == 5
    # the new chunk takes over at the step it was aligned to: k + 5 is chunk 1's first own action
    assert values[: k + 5] == list(range(k + 5))
    assert values[k + 5] == 1000.0 + k + 5


def test_broker_rtc_delay_is_the_largest_recent_and_clipped():
    from pi0remote.broker import ActionChunkBroker, SimulatedLatency

    delays = iter([0.1, 0.3, 0.06, 0.06, 0.06, 0.06, 0.06, 0.06, 0.06, 0.06, 0.06, 0.06])
    policy = RecordingStepPolicy()
    broker = ActionChunkBroker(
        requester=SimulatedLatency(policy, lambda: next(delays)), prefetch_at=20, rtc=True, auto_window=3
    )
    broker.prime({"step": 0}, 0, 0.0)
    run_broker(broker, 200)
    sent = [r["rtc"]["delay_steps"] for r in policy.requests[1:6]]
    assert sent == [5, 15, 15, 15, 3]  # max over the last 3 delays: 5; 5,15; 5,15,3; 15,3,3; 3,3,3
    assert all(0 < r["rtc"]["delay_steps"] <= len(r["rtc"]["prefix"]) for r in policy.requests[1:])


def test_broker_rtc_refuses_blending_and_pipelining():
    from pi0remote.broker import ActionChunkBroker

    with pytest.raises(ValueError):
        ActionChunkBroker(RecordingStepPolicy(), rtc=True, blend="linear")
    with pytest.raises(ValueError):
        ActionChunkBroker(RecordingStepPolicy(), rtc=True, max_in_flight=2)


def boundary_jumps(broker, ticks):
    jumps, prev, chunk = [], None, None
    for k in range(ticks):
        action = broker.act(lambda k=k: state_obs(0), k, k * 0.02)
        current = len([a for a in broker.history if a.arrived_step is not None and not a.superseded])
        if prev is not None and chunk is not None and current != chunk:
            jumps.append(float(np.abs(action - prev).max()))
        prev, chunk = action, current
    return jumps


def test_toy_flow_closed_loop_rtc_switches_without_jumps(toy_server):
    """A real loopback server, the toy flow policy, 200 ms delays: with rtc the switch to each new chunk
    is as smooth as the chunk's own motion; keeping the latest chunk jumps by the sampling noise."""
    from pi0remote import connect
    from pi0remote.broker import ActionChunkBroker, SimulatedLatency

    srv, _ = toy_server
    out = {}
    with connect(srv.url("tcp")) as client:
        for rtc_on in (False, True):
            broker = ActionChunkBroker(requester=SimulatedLatency(client, 0.2), prefetch_at=15, rtc=rtc_on)
            broker.prime(state_obs(0), 0, 0.0)
            out[rtc_on] = boundary_jumps(broker, 200)
            replies = [a.reply for a in broker.history[1:]]
            assert all(("rtc" in r) == rtc_on for r in replies)
    assert len(out[True]) >= 4 and len(out[False]) >= 4
    assert max(out[True]) < 0.5 * float(np.median(out[False]))


# --------------------------------------------------------------------------- harness: --exec rtc


def test_cli_accepts_the_rtc_strategies():
    from pi0remote.eval import build_parser, latency_options
    from pi0remote.harness.clock import split_strategy

    parser = build_parser()
    args = [
        "--policy",
        "expert",
        "--sweep-latency",
        "0,300",
        "--exec",
        "blocking,async-latest,async-linear,rtc",
    ]
    assert latency_options(parser, parser.parse_args(args))["strategies"][-1] == "rtc"
    single = latency_options(
        parser, parser.parse_args(["--policy", "expert", "--latency", "300ms", "--exec", "rtc"])
    )
    assert (single["strategy"], single["clock"]) == ("rtc", "realtime")
    assert split_strategy("async-linear") == ("async", "linear")
    assert split_strategy("rtc") == ("rtc", "latest")
    with pytest.raises(SystemExit):
        latency_options(parser, parser.parse_args(["--policy", "expert", "--exec", "rtc-linear"]))


def test_sweep_rtc_against_async_on_the_toy_flow_policy(tmp_path):
    """The harness sweep with the toy flow policy on a fake environment: rtc switches chunks with a
    smaller jump than async-latest and reports its prefix error; a policy without rtc is refused."""
    pytest.importorskip("matplotlib")
    from pi0remote.harness.eval import DirectPolicy, EvalConfig
    from pi0remote.harness.sweep import run_sweep
    from rtc_toy import ToyFlowPolicy
    from test_realtime_eval import FakeEnv, StepPolicy

    cfg = EvalConfig(images=False, max_steps=150, episodes=2, out=str(tmp_path))
    client = DirectPolicy(ToyFlowPolicy(seed=3), "toyflow")
    _, doc = run_sweep("toyflow", cfg, [200.0], ["async-latest", "async-linear", "rtc"], client=client,
                       env=FakeEnv())  # fmt: skip
    points = {p["strategy"]: p for p in doc["points"]}
    assert points["rtc"]["boundary_jump_rad_mean"] < 0.3 * points["async-latest"]["boundary_jump_rad_mean"]
    assert points["rtc"]["prefix_error_max_mean"] is not None
    assert points["async-latest"]["prefix_error_max_mean"] is None
    assert points["rtc"]["stall_fraction"] == 0.0
    with pytest.raises(SystemExit, match="rtc"):
        run_sweep("steps", cfg, [200.0], ["rtc"], client=StepPolicy(), env=FakeEnv())


def test_rtc_module_imports_without_jax():
    import subprocess
    import sys

    code = "import sys, pi0remote.rtc, pi0remote.serve, pi0remote.broker; assert 'jax' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


# ------------------------------------------------------------------ the learned flow policy (issue 15)


@pytest.fixture(scope="module")
def flow_states():
    """Requests along one blocking flow-policy episode on gym-aloha: (request, chunk it got)."""
    pytest.importorskip("gym_aloha")
    flow = pytest.importorskip("pi0remote.policies.flow")
    from pi0remote.harness.eval import make_request
    from pi0remote.sim.env import make_env

    policy = flow.FlowPolicy(seed=0)
    out = []
    with make_env(render=False, max_steps=200) as env:
        env.reset(seed=7)
        env_state = env.env_state()
        for step in range(0, 150, 25):
            obs = make_request(env, step, env_state, False)
            chunk = policy.infer(obs)["action"]
            out.append((obs, chunk))
            for action in chunk[:25]:
                env.step(action)
    return policy, out


@pytest.mark.sim
def test_flow_policy_guided_head_follows_the_prefix(flow_states):
    policy, states = flow_states
    assert policy.metadata.extra["rtc"] is True and policy.metadata.extra["rtc_beta"] == 5.0
    guided, plain = [], []
    for (_, previous), (obs, _) in zip(states, states[1:], strict=False):
        prefix, d = previous[25:], 10  # 25 steps executed, 10 more expected before the new chunk
        policy.reset()  # guided and plain start from the same noise: a paired comparison
        reply = policy.infer({**obs, "rtc": rtc_field(prefix, d)})
        assert reply["rtc"]["delay_steps"] == d and reply["action"].shape == (50, 14)
        guided.append(reply["rtc"]["prefix_error"])
        policy.reset()
        plain.append(float(np.abs(policy.infer(obs)["action"][:d] - prefix[:d]).max()))
    assert np.median(guided) < np.median(plain)


@pytest.mark.sim
def test_flow_policy_batch_per_sample_rtc_and_options(flow_states):
    from pi0remote.policies import load_policy

    policy, states = flow_states
    (_, previous), (obs, _) = states[0], states[1]
    batch = [{**obs, "rtc": rtc_field(previous[25:], 5)}, obs, {**obs, "rtc": rtc_field(previous[40:], 8)}]
    replies = policy.infer_batch(batch)
    assert [("rtc" in r) for r in replies] == [True, False, True]
    assert [r["rtc"]["delay_steps"] for r in (replies[0], replies[2])] == [5, 8]
    with pytest.raises(InvalidInputError):
        policy.infer({**obs, "rtc": rtc_field(previous[25:], 26)})
    other = load_policy("flow", rtc_beta=2.0, rtc_schedule="linear")
    assert (other.metadata.extra["rtc_beta"], other.metadata.extra["rtc_schedule"]) == (2.0, "linear")
    assert other.infer({**obs, "rtc": rtc_field(previous[25:], 5)})["rtc"]["beta"] == 2.0


def test_broker_rtc_on_the_robot_thread_requester(toy_server):
    """Robot code's path: ActionChunkBroker(client, rtc=True) with its background thread and a real
    server; the reply that arrives answers the request that carried the prefix."""
    from pi0remote import connect
    from pi0remote.broker import ActionChunkBroker, delay_steps

    srv, _ = toy_server
    with connect(srv.url("tcp")) as client, ActionChunkBroker(client, prefetch_at=40, rtc=True) as broker:
        broker.prime(state_obs(0), 0, 0.0)
        step = 0
        while not broker.last or not broker.last.requested:
            broker.act(lambda: state_obs(0), step, step * 0.02)
            step += 1
        sent = broker.history[-1]
        expected = min(max(delay_steps(broker.history[0].latency_s), 1), 40)  # the prime's measured delay
        assert (sent.rtc_prefix_len, sent.rtc_delay_steps) == (40, expected)
        assert broker.requester.join(30)
        broker.act(lambda: state_obs(0), step, step * 0.02)
        assert sent.reply is not None and sent.reply["rtc"]["delay_steps"] == expected
