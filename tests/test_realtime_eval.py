"""The realtime clock in the evaluation harness: latency parsing, tick-driven episodes on a fake
environment (alignment, stalls, metrics), the CLI flags, a sweep, a short gym-aloha episode with the
expert and injected latency, and measured latency through the WAN emulator. Nothing sleeps."""

from __future__ import annotations

import json
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np
import pytest

from pi0remote.harness.clock import LatencySpec, TickExecutor, delay_ticks, make_executor
from pi0remote.harness.eval import EvalConfig, SyncExecutor, run_episode


def test_latency_spec_parsing():
    assert LatencySpec.parse("300ms") == LatencySpec(300.0)
    assert LatencySpec.parse("0.3s") == LatencySpec(300.0)
    assert LatencySpec.parse("300") == LatencySpec(300.0)
    assert LatencySpec.parse("300ms±50ms") == LatencySpec(300.0, 50.0)
    assert LatencySpec.parse("300ms+-50ms") == LatencySpec(300.0, 50.0)
    assert LatencySpec.parse("300 +- 50") == LatencySpec(300.0, 50.0)
    assert str(LatencySpec(300.0, 50.0)) == "300ms±50ms"
    with pytest.raises(ValueError):
        LatencySpec.parse("fast")


def test_jitter_is_seeded_per_episode_and_bounded():
    spec = LatencySpec(300.0, 50.0)
    a, b, c = spec.sampler(3), spec.sampler(3), spec.sampler(4)
    draws = [a() for _ in range(50)]
    assert draws == [b() for _ in range(50)] and draws != [c() for _ in range(50)]
    assert all(0.25 <= x <= 0.35 for x in draws)
    assert LatencySpec(300.0).sampler(0) == 0.3


def test_delay_ticks():
    assert [delay_ticks(x) for x in (0, 1, 20, 21, 300, 301, 800)] == [0, 1, 1, 2, 15, 16, 40]


def test_make_executor():
    assert isinstance(make_executor("sync", "blocking"), SyncExecutor)
    ex = make_executor("realtime", "async", latency="300ms", prefetch_at=20, blend="linear")
    assert isinstance(ex, TickExecutor) and ex.name == "realtime/async 300ms"
    with pytest.raises(ValueError):
        make_executor("sync", "blocking", latency="300ms")


class FakeEnv:
    """Records the executed targets; reward 4 (success) from step ``succeed_at`` on."""

    def __init__(self, succeed_at=None, max_steps=400):
        self.succeed_at, self.max_steps, self.steps, self.actions = succeed_at, max_steps, 0, []

    def reset(self, seed):
        self.steps, self.actions = 0, []

    def env_state(self):
        return {"cube_pos": np.zeros(3)}

    def observation(self, *, pixels=True):
        obs = {"agent_pos": np.full(14, -1.0)}
        if pixels:
            obs["pixels"] = {"top": np.zeros((480, 640, 3), np.uint8)}
        return obs

    def step(self, action):
        self.actions.append(np.array(action, dtype=np.float64))
        self.steps += 1
        done = self.succeed_at is not None and self.steps >= self.succeed_at
        return {}, 4.0 if done else 0.0, done, self.steps >= self.max_steps, {}


class StepPolicy:
    """``chunk[i] = step + i`` on every joint; asks for ``step`` like the expert."""

    metadata = {"name": "steps", "needs_env_state": True}

    def __init__(self):
        self.steps = []

    def infer(self, obs):
        self.steps.append(obs["step"])
        values = obs["step"] + np.arange(50, dtype=np.float32)
        return {"action": np.repeat(values[:, None], 14, axis=1), "client_timing": {"round_trip_ms": 0.5}}


def _run(env, **kw):
    policy = StepPolicy()
    cfg = EvalConfig(images=False, max_steps=kw.pop("max_steps", 60), **kw)
    return run_episode(policy, env, 0, cfg, mode="steps"), policy


def test_realtime_blocking_holds_and_drops_the_past():
    env = FakeEnv()
    res, policy = _run(env, clock="realtime", latency="100ms", action_horizon=10)  # 5 ticks per call
    executed = [a[0] for a in env.actions]
    # warm start: chunk 0 queued before tick 0; then every 15 ticks: 10 fresh, 5 holding the last one
    assert executed[:10] == list(range(10))
    assert executed[10:15] == [9.0] * 5
    assert executed[15:25] == list(range(15, 25))  # asked at 10, arrived at 15: chunk[k - 10]
    assert policy.steps == [0, 10, 25, 40, 55]
    assert (res.stall_ticks, res.startup_ticks, res.policy_calls) == (20, 0, 4)  # the 5th is in flight
    assert res.stall_fraction == pytest.approx(20 / 60)
    assert res.delay_ticks == [0, 5, 5, 5] and res.dropped_actions == 15
    assert res.discontinuity_rad == pytest.approx(6.0)  # 9 held, then 15
    assert res.executor == "realtime/blocking 100ms"
    assert res.robot_time_s == pytest.approx(0.1 + 60 * 0.02)
    assert res.effective_rate_hz == pytest.approx(40 / res.robot_time_s)


def test_realtime_async_runs_every_step_of_the_plan():
    env = FakeEnv(succeed_at=120)
    res, policy = _run(env, clock="realtime", latency="300ms", strategy="async", max_steps=400)
    assert [a[0] for a in env.actions] == list(range(120))  # executed at tick k: chunk[k - t] = k
    assert res.success and res.success_step == 120 and res.stall_ticks == 0
    assert res.discontinuity_rad == pytest.approx(1.0) and res.boundary_jump_rad == pytest.approx(1.0)
    assert policy.steps[1] == 50 - 17  # auto threshold: 15 ticks of delay + 2
    assert res.success_time_s == pytest.approx(0.3 + 120 * 0.02)


def test_cold_start_holds_the_reset_pose():
    env = FakeEnv()
    res, _ = _run(env, clock="realtime", latency="100ms", strategy="async", warm_start=False, max_steps=20)
    assert [a[0] for a in env.actions[:5]] == [-1.0] * 5  # the reset pose until tick 5
    assert [a[0] for a in env.actions[5:]] == list(range(5, 20))
    assert res.startup_ticks == 5 and res.stall_ticks == 0 and res.stall_fraction == 0.0
    assert res.stall_fraction_total == pytest.approx(5 / 20)


def test_jittered_latency_is_reproducible():
    env = FakeEnv()
    first, _ = _run(env, clock="realtime", latency="300ms±100ms", action_horizon=10, max_steps=120)
    again, _ = _run(env, clock="realtime", latency="300ms±100ms", action_horizon=10, max_steps=120)
    assert first.delay_ticks == again.delay_ticks and len(set(first.delay_ticks[1:])) > 1
    assert all(10 <= d <= 20 for d in first.delay_ticks[1:])


def test_sync_clock_async_strategy_waits_on_the_robot_clock():
    env = FakeEnv()
    res, policy = _run(env, clock="sync", strategy="async", prefetch_at=10, max_steps=100)
    assert [a[0] for a in env.actions] == list(range(100)) and res.stall_ticks == 0
    assert policy.steps == [0, 40, 80]
    assert res.robot_time_s == pytest.approx(100 * 0.02 + 3 * 0.0005)


def test_cli_latency_flags():
    from pi0remote.eval import build_parser, latency_options

    parser = build_parser()

    def opts(*argv):
        return latency_options(parser, parser.parse_args(["--policy", "expert", *argv]))

    assert opts()["clock"] == "sync" and opts()["strategy"] == "blocking"
    o = opts("--latency", "300ms±50ms", "--exec", "async", "--prefetch-at", "20", "--blend", "linear")
    assert (o["clock"], o["strategy"], o["prefetch_at"], o["blend"]) == ("realtime", "async", 20, "linear")
    o = opts("--sweep-latency", "0,100,300", "--exec", "blocking,async")
    assert o["sweep"] == [0.0, 100.0, 300.0] and o["strategies"] == ["blocking", "async"]
    assert opts("--cold-start", "--clock", "realtime")["warm_start"] is False
    for bad in (
        ["--exec", "blocking,async"],
        ["--exec", "eager"],
        ["--clock", "sync", "--latency", "300ms"],
        ["--latency", "300ms", "--netem", "delay=150ms"],
        ["--sweep-latency", "0,300", "--latency", "300ms"],
        ["--prefetch-at", "soon"],
        ["--latency", "slow"],
    ):
        with pytest.raises(SystemExit):
            opts(*bad)


def test_sweep_writes_json_and_chart(tmp_path):
    pytest.importorskip("matplotlib")
    from pi0remote.harness.sweep import parse_latencies, run_sweep

    assert parse_latencies("0, 100ms,0.3s") == [0.0, 100.0, 300.0]
    cfg = EvalConfig(images=False, max_steps=80, episodes=2, out=str(tmp_path))
    folder, doc = run_sweep(
        "steps", cfg, [0.0, 300.0], ["blocking", "async"], client=StepPolicy(), env=FakeEnv(succeed_at=70)
    )
    assert {"sweep.json", "sweep.png", "episodes.jsonl", "aggregate.json", "summary.md"} <= {
        p.name for p in folder.iterdir()
    }
    saved = json.loads((folder / "sweep.json").read_text())
    assert saved == json.loads(json.dumps(doc))
    points = {(p["strategy"], p["latency_ms"]): p for p in saved["points"]}
    assert len(points) == 4 and points[("async", 300.0)]["delay_ticks"] == 15
    assert points[("async", 300.0)]["stall_fraction"] == 0.0
    assert points[("blocking", 300.0)]["stall_fraction"] > 0.5
    assert points[("blocking", 0.0)]["success_rate"] == 1.0


# ---------------------------------------------------------------------------------------- with MuJoCo


class RecordingSim:
    """A real gym-aloha environment that remembers the targets it executed."""

    def __init__(self, env):
        self.env, self.actions = env, []

    def __getattr__(self, name):
        return getattr(self.env, name)

    def reset(self, seed):
        self.actions = []
        return self.env.reset(seed=seed)

    def step(self, action):
        self.actions.append(np.array(action, dtype=np.float32))
        return self.env.step(action)


@pytest.mark.sim
def test_short_realtime_expert_episode_with_injected_latency():
    pytest.importorskip("gym_aloha")
    from pi0remote.harness.eval import DirectPolicy
    from pi0remote.sim.env import make_env
    from pi0remote.sim.expert import ExpertPolicy

    expert = ExpertPolicy()
    client = DirectPolicy(expert, "expert")
    with make_env(render=False, max_steps=60) as raw:
        env = RecordingSim(raw)
        env.reset(2)
        state = raw.env_state()
        plan = np.concatenate([expert.infer({"step": s, "env_state": state})["action"] for s in (0, 50)])
        cfg = EvalConfig(images=False, max_steps=60, clock="realtime", latency="300ms", strategy="async")
        res = run_episode(client, env, 2, cfg, mode="expert")
        np.testing.assert_array_equal(np.array(env.actions), plan[:60])  # tick k executes plan[k]
        assert res.stall_ticks == 0 and res.policy_calls == 2 and res.delay_ticks == [0, 15]

        cfg = EvalConfig(images=False, max_steps=60, clock="realtime", latency="300ms", action_horizon=10)
        res = run_episode(client, env, 2, cfg, mode="expert")
        fresh = [k for k in range(60) if k < 10 or 25 <= k < 35 or 50 <= k < 60]
        np.testing.assert_array_equal(np.array(env.actions)[fresh], plan[fresh])
        np.testing.assert_array_equal(env.actions[10], plan[9])  # holding while the reply is late
        assert res.stall_ticks == 30 and res.stall_fraction == pytest.approx(0.5)


def test_measured_latency_through_the_wan_emulator():
    pytest.importorskip("pi0remote.server")
    from pi0remote.eval import netem_clients

    env = FakeEnv()
    cfg = EvalConfig(images=True, max_steps=30, clock="realtime", action_horizon=10)
    with netem_clients(["zeros"], "delay=25ms") as clients:
        res = run_episode(clients["zeros"], env, 0, cfg, mode="zeros")
    assert res.executor == "realtime/blocking measured"
    assert all(rtt >= 50.0 for rtt in res.round_trip_ms)  # 25 ms each way
    assert all(d >= 3 for d in res.delay_ticks[1:]) and res.stall_ticks >= 6
