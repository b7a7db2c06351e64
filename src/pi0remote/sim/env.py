"""gym-aloha environments for the evaluation harness, and the observation pipeline.

:func:`make_env` wraps ``gym_aloha/AlohaTransferCube-v0`` (or ``AlohaInsertion-v0``) with
``obs_type="pixels_agent_pos"`` and makes three changes that matter for speed and correctness:

* only the ``top`` camera is rendered (gym-aloha's task renders three 480x640 cameras on every step
  and returns one: ~167 ms per step against ~61 ms); with ``render=False`` nothing is rendered at all
  and :meth:`AlohaSim.render` draws the top camera on demand, so a harness that only needs pixels when
  it queries the policy pays for one frame per chunk;
* the step limit is ours (``max_steps``, 400 by default), not the registered ``TimeLimit`` of 300;
* actions are passed through unclipped: the declared ``Box(-1, 1)`` action space is wrong (actions are
  absolute joint targets in radians, grippers normalised 0 closed .. 1 open).

Every reset takes an explicit seed: gym-aloha samples the object pose from ``RandomState(seed)`` and
uses fresh entropy without one. Same seed and same actions give identical states and pixels.

:func:`resize_with_pad` and :func:`obs_to_request` turn an observation into the canonical request
(``cam_high`` uint8 CHW 224x224, ``state`` float32[14]) that π₀ and the built-in policies expect.
"""

from __future__ import annotations

import os
import types
from collections import OrderedDict
from typing import Any

import numpy as np

DEFAULT_TASK = "AlohaTransferCube-v0"
TASKS = {"AlohaTransferCube-v0": "transfer_cube", "AlohaInsertion-v0": "insertion"}
CAMERA = "top"
IMAGE_HW = (480, 640)
SUCCESS_REWARD = 4
DT = 0.02


def task_id(task: str) -> str:
    """Normalise ``gym_aloha/AlohaTransferCube-v0`` or ``AlohaTransferCube-v0`` to the short form."""
    short = task.split("/", 1)[1] if task.startswith("gym_aloha/") else task
    if short not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    return short


def _observation_top_only(render: bool):
    """A replacement for the dm_control task's ``get_observation`` that renders at most one camera."""

    def get_observation(self, physics):
        obs = OrderedDict()
        obs["qpos"] = self.get_qpos(physics)
        obs["qvel"] = self.get_qvel(physics)
        obs["env_state"] = self.get_env_state(physics)
        obs["images"] = {}
        if render:
            obs["images"][CAMERA] = physics.render(height=IMAGE_HW[0], width=IMAGE_HW[1], camera_id=CAMERA)
        return obs

    return get_observation


class AlohaSim:
    """One gym-aloha episode at a time; see the module docstring.

    ``reset(seed) -> obs`` and ``step(action) -> (obs, reward, terminated, truncated, info)`` where
    ``obs = {"agent_pos": float64[14], "pixels": {"top": uint8[480, 640, 3]}}`` (``pixels`` only when
    built with ``render=True``). ``terminated`` means success (reward 4); ``truncated`` means the step
    limit was reached.
    """

    def __init__(self, task: str = DEFAULT_TASK, *, render: bool = True, max_steps: int = 400) -> None:
        os.environ.setdefault("MUJOCO_GL", "egl")
        import gym_aloha  # noqa: F401  (registers the environments)
        import gymnasium as gym

        self.task = task_id(task)
        self.render_frames = render
        self.max_steps = int(max_steps)
        self._gym = gym.make(f"gym_aloha/{self.task}", obs_type="pixels_agent_pos")
        self._aloha = self._gym.unwrapped  # gym_aloha.env.AlohaEnv: no TimeLimit, no action clipping
        self._dm_env = self._aloha._env  # dm_control control.Environment
        dm_task = self._dm_env.task
        dm_task.get_observation = types.MethodType(_observation_top_only(render), dm_task)
        self.steps = 0
        self.seed: int | None = None

    @property
    def physics(self):
        """The dm_control ``Physics`` (``.model.ptr`` / ``.data.ptr`` are the raw MuJoCo structs)."""
        return self._dm_env.physics

    @property
    def model(self):
        """The raw ``mujoco.MjModel`` (for inverse kinematics on a scratch ``MjData``)."""
        return self.physics.model.ptr

    def _format(self, raw: dict[str, Any]) -> dict[str, Any]:
        obs: dict[str, Any] = {"agent_pos": np.asarray(raw["qpos"], dtype=np.float64)}
        if CAMERA in raw["images"]:
            obs["pixels"] = {CAMERA: raw["images"][CAMERA]}
        return obs

    def reset(self, seed: int) -> dict[str, Any]:
        if seed is None:
            raise ValueError("reset needs an explicit seed (gym-aloha otherwise uses fresh entropy)")
        self.seed = int(seed)
        self.steps = 0
        self._place_objects(self.seed)
        return self._format(self._dm_env.reset().observation)

    def _place_objects(self, seed: int) -> None:
        """What ``AlohaEnv.reset`` does before resetting: seed the task, sample the object pose."""
        from gym_aloha.tasks import sim as aloha_sim
        from gym_aloha.utils import sample_box_pose, sample_insertion_pose

        self._dm_env.task.random.seed(seed)
        if self.task == "AlohaTransferCube-v0":
            aloha_sim.BOX_POSE[0] = sample_box_pose(seed)
        else:
            aloha_sim.BOX_POSE[0] = np.concatenate(sample_insertion_pose(seed))

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (14,):
            raise ValueError(f"action must have 14 values, got shape {action.shape}")
        ts = self._dm_env.step(action)
        self.steps += 1
        reward = float(ts.reward or 0.0)
        terminated = reward >= SUCCESS_REWARD
        truncated = not terminated and self.steps >= self.max_steps
        info = {"is_success": terminated, "step": self.steps}
        return self._format(ts.observation), reward, terminated, truncated, info

    def render(self, camera: str = CAMERA) -> np.ndarray:
        """Draw one camera of the current state: uint8[480, 640, 3]."""
        return self.physics.render(height=IMAGE_HW[0], width=IMAGE_HW[1], camera_id=camera)

    def observation(self, *, pixels: bool = True) -> dict[str, Any]:
        """The current observation, rendering the top camera now if ``pixels`` (whatever ``render`` was)."""
        obs: dict[str, Any] = {"agent_pos": self._dm_env.task.get_qpos(self.physics)}
        if pixels:
            obs["pixels"] = {CAMERA: self.render()}
        return obs

    def env_state(self) -> dict[str, Any]:
        """Privileged object poses from the physics state (not part of the observation).

        Transfer cube: ``{"task": "transfer_cube", "cube_pos": float64[3], "cube_quat": float64[4]}``
        (the ``red_box_joint`` qpos). Insertion: ``{"task": "insertion", "objects_qpos": float64[14]}``
        (peg then socket, position + quaternion each).
        """
        qpos = self.physics.named.data.qpos
        if self.task == "AlohaTransferCube-v0":
            box = np.array(qpos["red_box_joint"], dtype=np.float64)
            return {"task": "transfer_cube", "cube_pos": box[:3].copy(), "cube_quat": box[3:7].copy()}
        return {"task": "insertion", "objects_qpos": np.array(self.physics.data.qpos[16:], dtype=np.float64)}

    def close(self) -> None:
        try:
            self._dm_env.close()
        except Exception:  # pragma: no cover - best effort; dm_control may already have freed it
            pass

    def __enter__(self) -> AlohaSim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_env(task: str = DEFAULT_TASK, *, render: bool = True, max_steps: int = 400) -> AlohaSim:
    """Build an :class:`AlohaSim` (imports gym-aloha and MuJoCo on first use)."""
    return AlohaSim(task, render=render, max_steps=max_steps)


def resize_with_pad(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an HWC uint8 image to fit ``height x width`` keeping its aspect ratio, pad with zeros.

    Same geometry as openpi's ``image_tools.resize_with_pad``: scale by the larger of the two ratios
    (sizes truncated to int), bilinear resampling, and the image centred (offsets truncated) on a black
    canvas. An image already of the target size is returned unchanged.
    """
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"expected an HWC uint8 image, got {image.dtype} {image.shape}")
    cur_h, cur_w = image.shape[:2]
    if (cur_h, cur_w) == (height, width):
        return image
    ratio = max(cur_w / width, cur_h / height)
    new_h, new_w = int(cur_h / ratio), int(cur_w / ratio)
    if (new_h, new_w) == (cur_h, cur_w):
        resized = image
    else:
        resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=Image.BILINEAR))
    out = np.zeros((height, width, image.shape[2]), dtype=np.uint8)
    top = max(0, int((height - new_h) / 2))
    left = max(0, int((width - new_w) / 2))
    out[top : top + new_h, left : left + new_w] = resized
    return out


def obs_to_request(
    obs: dict[str, Any],
    *,
    step: int | None = None,
    env_state: dict[str, Any] | None = None,
    size: int = 224,
) -> dict[str, Any]:
    """The canonical request for one observation.

    ``{"cam_high": uint8[3, 224, 224] (CHW, contiguous), "state": float32[14]}``, plus ``"step"`` and
    ``"env_state"`` only when given (the privileged expert asks for them). An observation without
    pixels gets no ``cam_high``.
    """
    request: dict[str, Any] = {"state": np.asarray(obs["agent_pos"], dtype=np.float32).reshape(14)}
    pixels = obs.get("pixels")
    if pixels is not None:
        img = resize_with_pad(pixels[CAMERA], size, size)
        request["cam_high"] = np.ascontiguousarray(img.transpose(2, 0, 1))
    if step is not None:
        request["step"] = int(step)
    if env_state is not None:
        request["env_state"] = env_state
    return request
