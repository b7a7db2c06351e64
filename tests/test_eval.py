"""Evaluation harness on real gym-aloha (CPU): short expert episodes in process and over TCP, seeding,
the observation pipeline, Wilson intervals, results folder and a short video."""

from __future__ import annotations

import json
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np
import pytest

from pi0remote.harness.stats import percentile, wilson_interval
from pi0remote.sim.env import resize_with_pad

SHORT = 40  # steps per test episode: four chunks at action horizon 10


# Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I (Wilson score
# method, 4 decimals), plus the textbook 5/10 and the empty and all-success edges.
@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
        (5, 10, 0.2366, 0.7634),
        (10, 10, 0.7225, 1.0),
        (0, 0, 0.0, 1.0),
    ],
)
def test_wilson_interval_known_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=6e-5) and hi == pytest.approx(high, abs=6e-5)
    assert 0.0 <= lo <= k / max(n, 1) <= hi <= 1.0


def test_wilson_interval_rejects_nonsense():
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_percentile():
    assert percentile([], 50) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5


def test_resize_with_pad_hand_computed():
    img = np.full((6, 2, 3), 50, dtype=np.uint8)  # ratio max(2/4, 6/4) = 1.5 -> 4x1, int(3 / 2) = 1 left
    expected = np.zeros((4, 4, 3), dtype=np.uint8)
    expected[:, 1] = 50
    np.testing.assert_array_equal(resize_with_pad(img, 4, 4), expected)


class FakeEnv:
    """Counts steps; reward 4 (success) from step ``succeed_at`` on."""

    def __init__(self, succeed_at: int | None = None, max_steps: int = 400) -> None:
        self.succeed_at, self.max_steps, self.steps, self.seeds = succeed_at, max_steps, 0, []

    def reset(self, seed):
        self.seeds.append(seed)
        self.steps = 0

    def env_state(self):
        return {"cube_pos": np.zeros(3)}

    def observation(self, *, pixels=True):
        obs = {"agent_pos": np.full(14, self.steps, dtype=np.float64)}
        if pixels:
            obs["pixels"] = {"top": np.zeros((480, 640, 3), np.uint8)}
        return obs

    def step(self, action):
        self.steps += 1
        done = self.succeed_at is not None and self.steps >= self.succeed_at
        return {}, 4.0 if done else 0.0, done, self.steps >= self.max_steps, {}


class RecordingPolicy:
    """Remembers its requests; metadata optionally asks for env_state."""

    def __init__(self, needs_env_state: bool) -> None:
        self.metadata = {"name": "rec", "needs_env_state": needs_env_state}
        self.requests, self.resets = [], 0

    def infer(self, obs):
        self.requests.append(obs)
        return {
            "action": np.zeros((50, 14), np.float32),
            "inference_ms": 1.5,
            "client_timing": {"round_trip_ms": 4.0},
        }

    def reset(self):
        self.resets += 1


def test_chunks_and_step_limit_without_simulator():
    from pi0remote.harness.eval import EvalConfig, run_episode

    policy, env = RecordingPolicy(needs_env_state=False), FakeEnv()
    result = run_episode(policy, env, 9, EvalConfig(max_steps=25, action_horizon=10, images=False))
    assert (result.steps, result.policy_calls, result.success) == (25, 3, False)
    assert [r["state"][0] for r in policy.requests] == [0, 10, 20]
    assert all(set(r) == {"state"} for r in policy.requests) and env.seeds == [9] and policy.resets == 1
    assert result.round_trip_ms_p50 == 4.0 and result.inference_ms_p95 == 1.5
    assert result.robot_time_s == pytest.approx(25 * 0.02 + 3 * 0.004)


def test_success_stops_and_env_state_is_sent_when_asked():
    from pi0remote.harness.eval import EvalConfig, aggregate, run_episode

    policy, env = RecordingPolicy(needs_env_state=True), FakeEnv(succeed_at=13)
    result = run_episode(policy, env, 0, EvalConfig(max_steps=400, action_horizon=5, images=True))
    assert (result.steps, result.success, result.success_step, result.policy_calls) == (13, True, 13, 3)
    assert [r["step"] for r in policy.requests] == [0, 5, 10]
    assert all("env_state" in r and r["cam_high"].shape == (3, 224, 224) for r in policy.requests)
    agg = aggregate("rec", [result])
    assert agg["success_rate"] == 1.0 and agg["mean_steps_to_success"] == 13.0


def test_cli_needs_a_mode():
    from pi0remote.eval import build_parser, modes_from_args

    parser = build_parser()
    args = parser.parse_args(["--policy", "expert", "--compare", "tcp://h:1", "ws://h:2/ws"])
    assert modes_from_args(parser, args) == ["expert", "tcp://h:1", "ws://h:2/ws"]
    with pytest.raises(SystemExit):
        modes_from_args(parser, parser.parse_args([]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--policy", "expert", "--policy-url", "tcp://h:1"])


# ---------------------------------------------------------------------------------------- with MuJoCo

sim = pytest.mark.sim


@pytest.fixture(scope="module")
def env():
    pytest.importorskip("gym_aloha")
    from pi0remote.sim.env import make_env

    sim_env = make_env(render=False, max_steps=SHORT)
    yield sim_env
    sim_env.close()


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    from pi0remote.harness.eval import EvalConfig

    return EvalConfig(
        episodes=2, max_steps=SHORT, action_horizon=10, out=str(tmp_path_factory.mktemp("eval"))
    )


def _trajectory(client, env, seed, cfg):
    """Run one short episode; return the result and the joint positions after every step."""
    from pi0remote.harness.eval import run_episode

    states = []
    result = run_episode(
        client,
        env,
        seed,
        cfg,
        mode="test",
        on_step=lambda e, *_: states.append(e.observation(pixels=False)["agent_pos"]),
    )
    return result, np.array(states)


def _local_client():
    from pi0remote.harness.eval import open_policy

    return open_policy("expert")


@sim
def test_short_episode_in_process(env, cfg):
    client = _local_client()
    try:
        result, states = _trajectory(client, env, 5, cfg)
    finally:
        client.close()
    assert result.steps == SHORT and result.policy_calls == SHORT // cfg.action_horizon
    assert len(states) == SHORT + 1  # the reset state, then one per step
    assert not result.success and result.success_step is None  # 40 steps is too short to hand over
    assert result.round_trip_ms_p50 is not None and result.round_trip_ms_p50 > 0
    assert result.robot_time_s > SHORT * 0.02
    assert np.abs(states[-1] - states[0]).max() > 0.05  # the expert moved the arms


@sim
def test_seeding_makes_episodes_identical(env, cfg):
    client = _local_client()
    try:
        _, first = _trajectory(client, env, 7, cfg)
        _, again = _trajectory(client, env, 7, cfg)
        _, other = _trajectory(client, env, 8, cfg)
    finally:
        client.close()
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


@sim
def test_short_episode_over_tcp_matches_in_process(env, cfg):
    pytest.importorskip("pi0remote.server")
    from pi0remote import connect
    from pi0remote.harness.procs import ServerProcess

    local = _local_client()
    try:
        _, expected = _trajectory(local, env, 3, cfg)
    finally:
        local.close()
    with ServerProcess(
        ["--policy", "expert", "--host", "127.0.0.1", "--tcp-port", "0", "--http-port", "0"]
    ) as server:
        url = server.url("tcp")
        assert url.startswith("tcp://127.0.0.1:")
        with connect(url) as client:
            result, states = _trajectory(client, env, 3, cfg)
    assert result.policy_calls == SHORT // cfg.action_horizon
    np.testing.assert_array_equal(states, expected)  # same seed, same actions: same physics


@sim
def test_evaluate_writes_results(env, cfg):
    pytest.importorskip("matplotlib")
    from pi0remote.harness.eval import DirectPolicy, evaluate
    from pi0remote.sim.expert import ExpertPolicy

    clients = {"expert": DirectPolicy(ExpertPolicy(), "expert"), "zeros": _zeros()}
    folder, aggregates = evaluate(["expert", "zeros"], cfg, clients=clients)
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "episodes.jsonl", "aggregate.json", "summary.md", "success_rate.png"} <= names
    lines = [json.loads(x) for x in (folder / "episodes.jsonl").read_text().splitlines()]
    assert [(x["mode"], x["seed"]) for x in lines] == [
        ("expert", 0),
        ("expert", 1),
        ("zeros", 0),
        ("zeros", 1),
    ]
    assert {"success", "success_step", "max_reward", "policy_calls", "inference_ms_p50", "wall_s"} <= set(
        lines[0]
    )
    assert [a["episodes"] for a in aggregates] == [2, 2]
    assert aggregates[0]["successes"] == 0 and aggregates[0]["wilson95_high"] == pytest.approx(
        0.6576, abs=1e-4
    )
    assert "| expert | 0/2 |" in (folder / "summary.md").read_text()


def _zeros():
    from pi0remote.harness.eval import DirectPolicy
    from pi0remote.policies.builtin import ZerosPolicy

    return DirectPolicy(ZerosPolicy(), "zeros")


@sim
def test_recorded_video_has_one_frame_per_step(env, cfg, tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    import imageio.v2 as imageio

    from pi0remote.harness.eval import EvalConfig
    from pi0remote.harness.record import compose_side_by_side, record_episode

    short = EvalConfig(max_steps=12, action_horizon=10, out=str(tmp_path))
    rec = record_episode(_zeros(), env, 0, short, tmp_path / "zeros.mp4", mode="zeros")
    with imageio.get_reader(tmp_path / "zeros.mp4") as reader:
        frames = [f for f in reader]
    assert len(frames) == 13  # the reset frame and one per step
    assert frames[0].shape == (480, 640, 3)
    n = compose_side_by_side([rec, rec], tmp_path / "pair.mp4", fps=25)
    with imageio.get_reader(tmp_path / "pair.mp4") as reader:
        pair = [f for f in reader]
    assert len(pair) == n and pair[0].shape == (240, 640, 3)
