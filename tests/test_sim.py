"""gym-aloha wrapper, observation pipeline and scripted expert (real MuJoCo on the CPU)."""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np
import pytest

from pi0remote.sim.env import obs_to_request, resize_with_pad

pytestmark = pytest.mark.sim


@pytest.fixture(scope="module")
def env():
    pytest.importorskip("gym_aloha")
    from pi0remote.sim.env import make_env

    sim = make_env(render=False, max_steps=400)
    yield sim
    sim.close()


@pytest.fixture(scope="module")
def expert():
    pytest.importorskip("gym_aloha")
    from pi0remote.sim.expert import ExpertPolicy

    return ExpertPolicy()


def test_resize_with_pad_pads_without_resizing():
    img = np.arange(1, 25, dtype=np.uint8).reshape(2, 4, 3)
    out = resize_with_pad(img, 4, 4)
    expected = np.zeros((4, 4, 3), dtype=np.uint8)
    expected[1:3] = img  # ratio max(4/4, 2/4) = 1: no resampling, int((4 - 2) / 2) = 1 row above
    np.testing.assert_array_equal(out, expected)


def test_resize_with_pad_scales_and_centres():
    img = np.full((4, 8, 3), 100, dtype=np.uint8)
    out = resize_with_pad(img, 4, 4)  # ratio 2 -> 2x4 of 100s, one zero row above and below
    expected = np.zeros((4, 4, 3), dtype=np.uint8)
    expected[1:3] = 100
    np.testing.assert_array_equal(out, expected)
    tall = resize_with_pad(np.full((8, 2, 3), 7, dtype=np.uint8), 4, 4)  # 4x1 column, int(3 / 2) = 1 left
    assert tall[:, 1].tolist() == [[7, 7, 7]] * 4
    assert tall[:, [0, 2, 3]].sum() == 0


def test_resize_with_pad_camera_geometry():
    img = np.full((480, 640, 3), 255, dtype=np.uint8)
    out = resize_with_pad(img, 224, 224)  # 640x480 -> 224x168, 28 zero rows above and below
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert out[:28].max() == 0 and out[196:].max() == 0 and out[28:196].min() == 255
    same = np.zeros((224, 224, 3), dtype=np.uint8)
    assert resize_with_pad(same, 224, 224) is same


def test_obs_to_request_shapes_and_optional_keys():
    obs = {"agent_pos": np.arange(14, dtype=np.float64), "pixels": {"top": np.zeros((480, 640, 3), np.uint8)}}
    req = obs_to_request(obs)
    assert set(req) == {"cam_high", "state"}
    assert req["cam_high"].shape == (3, 224, 224) and req["cam_high"].dtype == np.uint8
    assert req["cam_high"].flags.c_contiguous
    assert req["state"].shape == (14,) and req["state"].dtype == np.float32
    req = obs_to_request(obs, step=7, env_state={"cube_pos": np.zeros(3)})
    assert req["step"] == 7 and "env_state" in req
    assert set(obs_to_request({"agent_pos": np.zeros(14)})) == {"state"}


def _rollout(env, seed: int, steps: int) -> tuple[np.ndarray, dict]:
    obs = env.reset(seed=seed)
    rng = np.random.default_rng(0)
    base = obs["agent_pos"].copy()
    states = [base]
    for _ in range(steps):
        obs, *_ = env.step(base + rng.normal(0, 0.05, 14))
        states.append(obs["agent_pos"])
    return np.array(states), env.env_state()


def test_same_seed_same_actions_identical(env):
    states_a, cube_a = _rollout(env, seed=3, steps=15)
    pixels_a = env.render()
    states_b, cube_b = _rollout(env, seed=3, steps=15)
    pixels_b = env.render()
    np.testing.assert_array_equal(states_a, states_b)
    np.testing.assert_array_equal(cube_a["cube_pos"], cube_b["cube_pos"])
    np.testing.assert_array_equal(pixels_a, pixels_b)
    assert pixels_a.shape == (480, 640, 3) and pixels_a.dtype == np.uint8
    env.reset(seed=4)
    assert not np.array_equal(env.env_state()["cube_pos"], cube_a["cube_pos"])


def test_rendered_observation_to_request(env):
    env.reset(seed=0)
    req = obs_to_request(env.observation(pixels=True), step=0, env_state=env.env_state())
    assert req["cam_high"].shape == (3, 224, 224) and req["cam_high"].max() > 0
    assert req["state"].dtype == np.float32 and req["step"] == 0


def test_reset_needs_a_seed(env):
    with pytest.raises(ValueError):
        env.reset(seed=None)


def test_expert_metadata_and_chunks(expert):
    meta = expert.metadata
    assert meta.name == "expert" and meta.action_shape == (50, 14) and meta.extra["needs_env_state"]
    state = {"cube_pos": np.array([0.1, 0.5, 0.05])}
    first = expert.infer({"env_state": state, "step": 0})["action"]
    later = expert.infer({"env_state": state, "step": 10})["action"]
    assert first.shape == (50, 14) and first.dtype == np.float32
    np.testing.assert_array_equal(first[10:], later[:40])
    assert expert.infer({"env_state": [0.1, 0.5, 0.05], "step": 440})["action"].shape == (50, 14)
    with pytest.raises(ValueError):
        expert.infer({"step": 0})


def test_expert_solves_a_seed_without_rendering(env, expert):
    env.reset(seed=11)
    env_state = env.env_state()
    expert.reset()
    horizon, success_step = 10, None
    for step in range(env.max_steps):
        if step % horizon == 0:
            chunk = expert.infer({"env_state": env_state, "step": step})["action"]
        _, reward, terminated, truncated, _ = env.step(chunk[step % horizon])
        if terminated:
            success_step = step + 1
            break
        assert not truncated
    assert success_step is not None and reward == 4
