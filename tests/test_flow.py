"""The ``flow`` policy: training end to end on a tiny budget, the shipped weights (shapes, dtype,
batching, reset, typed errors, the pure velocity function), a closed-loop gym-aloha episode with the
shipped weights through ``local://flow``, and the missing-extra error."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("jax") is None or importlib.util.find_spec("optax") is None,
    reason="needs the flow extra (jax, optax)",
)
HAVE_SIM = importlib.util.find_spec("gym_aloha") is not None
HELDOUT_SEED = 1234  # training uses env seeds >= 100000; held-out evaluation 1000-1049


def request(state=None, cube=(0.0, 0.5, 0.05)):
    state = np.zeros(14, np.float32) if state is None else state
    return {"state": state, "env_state": {"cube_pos": np.array(cube)}, "step": 0}


@pytest.fixture(scope="module")
def policy():
    from pi0remote.policies import load_policy

    return load_policy("flow")


def test_shipped_weights_exist_and_are_small():
    from pi0remote.policies.flow import default_weights_path

    path = default_weights_path()
    assert path.is_file() and path.stat().st_size < 6 * 2**20


def test_shipped_weights_give_float32_chunks(policy):
    from pi0remote.sim.expert import START_ARM_POSE

    state = np.concatenate([START_ARM_POSE, [0.1], START_ARM_POSE, [0.1]]).astype(np.float32)
    out = policy.infer(request(state))["action"]
    assert out.shape == (50, 14) and out.dtype == np.float32 and np.all(np.isfinite(out))
    # the first action of a chunk at the start pose stays near the start pose (robot units, radians)
    assert np.abs(out[0, :6] - START_ARM_POSE).max() < 0.3
    meta = policy.metadata.to_dict()
    assert meta["needs_env_state"] and meta["privileged"] and meta["action_shape"] == [50, 14]
    assert set(meta["input_spec"]) == {"state"}


def test_batch_matches_shapes_and_reset_repeats_noise(policy):
    batch = [request(np.full(14, 0.01 * i, np.float32), (0.01 * i, 0.5, 0.05)) for i in range(3)]
    policy.reset()
    first = policy.infer_batch(batch)
    policy.reset()
    again = policy.infer_batch(batch)
    assert len(first) == 3 and all(r["action"].shape == (50, 14) for r in first)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["action"], b["action"])
    assert not np.array_equal(first[0]["action"], first[2]["action"])  # the condition matters


@pytest.mark.parametrize(
    "bad",
    [
        {"state": np.zeros(14, np.float32)},  # no env_state
        {"env_state": {"cube_pos": [0, 0.5, 0]}},  # no state
        {"state": np.zeros(13, np.float32), "env_state": {"cube_pos": [0, 0.5, 0]}},
        {"state": np.zeros(14, np.float64), "env_state": {"cube_pos": [0, 0.5, 0]}},
        {"state": np.full(14, np.nan, np.float32), "env_state": {"cube_pos": [0, 0.5, 0]}},
        {"state": np.zeros(14, np.float32), "env_state": {"cube_quat": [1, 0, 0, 0]}},
        {"state": np.zeros(14, np.float32), "env_state": {"cube_pos": "x"}},
        {"state": np.zeros(14, np.float32), "env_state": {"cube_pos": [np.inf, 0, 0]}},
    ],
)
def test_bad_requests_raise_typed_errors(policy, bad):
    from pi0remote.errors import InvalidInputError

    with pytest.raises(InvalidInputError):
        policy.infer(bad)


def test_velocity_is_pure_and_sampling_follows_openpi_convention(policy):
    import jax.numpy as jnp

    from pi0remote.policies import flow

    model = policy.model
    cond = jnp.asarray(model.condition(np.zeros((2, 14)), np.zeros((2, 2))))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 50, 14)), jnp.float32)
    t = jnp.array([1.0, 0.5])
    v1 = flow.velocity(model.params, x, t, cond)
    v2 = model.velocity_fn(cond)(x, t)
    assert v1.shape == (2, 50, 14)
    np.testing.assert_allclose(np.asarray(v1), np.asarray(v2), rtol=1e-5, atol=1e-5)
    # sample = 10 Euler steps from t = 1 with dt = -0.1
    manual = x
    for i in range(10):
        manual = manual - 0.1 * flow.velocity(model.params, manual, jnp.full((2,), 1.0 - 0.1 * i), cond)
    np.testing.assert_allclose(np.asarray(flow.sample(model.params, cond, x)), np.asarray(manual), atol=1e-4)
    norm = model.normalizer
    a = np.random.default_rng(1).uniform(norm.action_low, norm.action_high, (50, 14)).astype(np.float32)
    np.testing.assert_allclose(norm.to_robot(norm.to_model(a)), a, atol=1e-5)


def test_missing_extra_names_it(monkeypatch):
    from pi0remote.policies import flow

    monkeypatch.setitem(sys.modules, "jax", None)
    with pytest.raises(flow.FlowNotInstalledError, match=r"pi0remote\[flow\]"):
        flow.FlowPolicy()


@pytest.mark.sim
@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SIM, reason="needs gym-aloha")
def test_training_end_to_end_tiny_budget(tmp_path):
    from pi0remote import train_flow
    from pi0remote.policies import load_policy

    out = tmp_path / "run"
    args = ["--episodes", "2", "--steps", "300", "--width", "64", "--blocks", "1", "--out", str(out)]
    args += ["--eval-episodes", "0"]
    assert train_flow.main(args) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["data"]["episodes"] == 2 and card["data"]["samples"] > 300
    assert card["training"]["steps"] == 300
    assert card["training"]["loss_last"] < 0.8 * card["training"]["loss_first"]
    assert "--episodes 2" in card["command"]
    trained = load_policy(f"flow:{out / 'flow_aloha.npz'}")
    assert trained.infer(request())["action"].shape == (50, 14)


@pytest.mark.sim
@pytest.mark.skipif(not HAVE_SIM, reason="needs gym-aloha")
def test_shipped_weights_succeed_closed_loop():
    from pi0remote.harness.eval import EvalConfig, open_policy, run_episode
    from pi0remote.sim.env import make_env

    cfg = EvalConfig(episodes=1, seed=HELDOUT_SEED, images=False, max_steps=400)
    client = open_policy("flow")  # local://flow: the registry and the codec
    try:
        with make_env(render=False, max_steps=cfg.max_steps) as env:
            result = run_episode(client, env, HELDOUT_SEED, cfg, mode="flow")
    finally:
        client.close()
    assert result.success, f"flow policy failed seed {HELDOUT_SEED} (max reward {result.max_reward})"


def test_missing_weights_file_names_the_trainer(tmp_path):
    from pi0remote.policies import load_policy

    with pytest.raises(FileNotFoundError, match="train_flow"):
        load_policy(f"flow:{tmp_path / 'nope.npz'}")
