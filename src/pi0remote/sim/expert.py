"""A privileged scripted expert for ``AlohaTransferCube-v0``: validates the harness without a GPU or weights.

It is *privileged*: it reads the cube pose from the simulator state (``env_state``), which a learned
policy never sees. It exists so the evaluation harness, every transport and the chunked execution loop
can be checked end to end on a CPU, with a policy whose success rate is known to be near 100 %.

How it moves: a few gripper waypoints per arm (the right arm grasps the cube and lifts it to a meeting
point; the left arm, rolled 90 degrees, comes in from the side and closes on it; the right arm then
lets go), interpolated linearly (orientation by slerp) to one target per 50 Hz step, and converted to
joint targets by damped-least-squares inverse kinematics, warm-started from the previous step, on a
scratch ``MjData`` of the same MuJoCo model. The model is built from gym-aloha's asset files, so the
expert runs in any process (a server, a test) without a rendering context.

Request (see :meth:`ExpertPolicy.infer`)::

    {"step": int,                     # episode step index of the first action wanted
     "env_state": {"cube_pos": [x, y, z], ...}  # the cube pose at reset (dict), or an array whose
                                                # first three values are the cube position
     ...}                             # anything else (cam_high, state) is ignored

Reply: ``{"action": float32[50, 14]}``, the joint targets for steps ``step .. step + 49`` of the plan.
The plan is made once per episode from the cube pose and cached, keyed by that pose (so the request
should carry the pose *at reset*, as the harness does; several clients may share one expert).
"""

from __future__ import annotations

import importlib.util
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..policies.base import CANONICAL_INPUT_SPEC, PolicyMetadata

CHUNK = 50
PLAN_STEPS = 450  # covers the 400-step default episode plus one chunk
START_ARM_POSE = np.array([0.0, -0.96, 1.16, 0.0, -0.3, 0.0])
GRIPPER_START = (0.02239 - 0.01844) / (0.05800 - 0.01844)  # START_ARM_POSE fingers, normalised
TCP_LOCAL = np.array([0.13, 0.0, 0.0])  # grasp point in the gripper_link frame (2.4 cm behind the tips)
CUBE_HALF = 0.02
MEET = np.array([0.0, 0.5, 0.25])
PICK_PITCH = np.deg2rad(60.0)


def _assets_dir() -> Path:
    spec = importlib.util.find_spec("gym_aloha")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the expert needs gym-aloha's model files: pip install 'pi0remote[sim]'")
    return Path(next(iter(spec.submodule_search_locations))) / "assets"


def _frame(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Unit quaternion (w, x, y, z) of the frame whose x and y axes are given (z = x cross y)."""
    import mujoco

    x = x / np.linalg.norm(x)
    y = y - x * (x @ y)
    y = y / np.linalg.norm(y)
    mat = np.column_stack([x, y, np.cross(x, y)])
    quat = np.empty(4)
    mujoco.mju_mat2Quat(quat, mat.reshape(-1))
    return quat


def _slerp(q0: np.ndarray, q1: np.ndarray, s: float) -> np.ndarray:
    dot = float(q0 @ q1)
    if dot < 0.0:
        q1, dot = -q1, -dot
    if dot > 0.9995:
        q = q0 + s * (q1 - q0)
        return q / np.linalg.norm(q)
    theta = np.arccos(dot)
    return (np.sin((1 - s) * theta) * q0 + np.sin(s * theta) * q1) / np.sin(theta)


@dataclass(frozen=True)
class Waypoint:
    t: int
    """Step index at which the gripper reaches this pose."""
    pos: np.ndarray
    """Grasp point (``TCP_LOCAL`` on gripper_link), world frame."""
    quat: np.ndarray
    """gripper_link orientation (w, x, y, z)."""
    grip: float
    """Normalised gripper opening, 0 closed .. 1 open."""


def interpolate(waypoints: list[Waypoint], steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-step positions [steps, 3], quaternions [steps, 4] and grip [steps] (held after the last)."""
    pos, quat, grip = np.empty((steps, 3)), np.empty((steps, 4)), np.empty(steps)
    for t in range(steps):
        nxt = next((i for i, w in enumerate(waypoints) if w.t >= t), len(waypoints) - 1)
        a, b = waypoints[max(nxt - 1, 0)], waypoints[nxt]
        s = 1.0 if b.t <= a.t else min(max((t - a.t) / (b.t - a.t), 0.0), 1.0)
        pos[t] = (1 - s) * a.pos + s * b.pos
        quat[t] = _slerp(a.quat, b.quat, s)
        grip[t] = (1 - s) * a.grip + s * b.grip
    return pos, quat, grip


class ArmIK:
    """Damped-least-squares IK for one 6-joint arm on a scratch ``MjData``."""

    def __init__(self, model: Any, data: Any, side: str, damping: float = 1e-2) -> None:
        import mujoco

        self._mj = mujoco
        self.model, self.data = model, data
        joints = [
            model.joint(f"vx300s_{side}/{n}")
            for n in ("waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate")
        ]
        self.qadr = np.array([int(model.jnt_qposadr[j.id]) for j in joints])
        self.dadr = np.array([int(model.jnt_dofadr[j.id]) for j in joints])
        self.lo = np.array([model.jnt_range[j.id][0] for j in joints])
        self.hi = np.array([model.jnt_range[j.id][1] for j in joints])
        self.body = model.body(f"vx300s_{side}/gripper_link").id
        self.damping = damping
        self._jacp = np.zeros((3, model.nv))
        self._jacr = np.zeros((3, model.nv))

    def tcp(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Grasp-point position and gripper_link quaternion at arm joints ``q``."""
        self.data.qpos[self.qadr] = q
        self._mj.mj_kinematics(self.model, self.data)
        rot = self.data.xmat[self.body].reshape(3, 3)
        return self.data.xpos[self.body] + rot @ TCP_LOCAL, self.data.xquat[self.body].copy()

    def solve(self, q: np.ndarray, pos: np.ndarray, quat: np.ndarray, iters: int = 8) -> np.ndarray:
        """Joints near ``q`` that put the grasp point at ``pos`` with orientation ``quat``."""
        mj, q = self._mj, q.copy()
        for _ in range(iters):
            cur_pos, cur_quat = self.tcp(q)
            err_rot_local = np.empty(3)
            mj.mju_subQuat(err_rot_local, quat, cur_quat)
            err = np.concatenate([pos - cur_pos, self.data.xmat[self.body].reshape(3, 3) @ err_rot_local])
            if np.abs(err).max() < 1e-5:
                break
            mj.mj_comPos(self.model, self.data)
            mj.mj_jac(self.model, self.data, self._jacp, self._jacr, cur_pos, self.body)
            jac = np.vstack([self._jacp[:, self.dadr], self._jacr[:, self.dadr]])
            dq = jac.T @ np.linalg.solve(jac @ jac.T + self.damping**2 * np.eye(6), err)
            q = np.clip(q + dq, self.lo, self.hi)
        return q


class TransferCubePlanner:
    """Waypoints and joint-space plans for the transfer-cube task."""

    def __init__(self, xml_name: str = "bimanual_viperx_transfer_cube.xml") -> None:
        import mujoco

        self.model = mujoco.MjModel.from_xml_path(str(_assets_dir() / xml_name))
        self.data = mujoco.MjData(self.model)
        self.arms = {side: ArmIK(self.model, self.data, side) for side in ("left", "right")}

    def waypoints(self, cube: np.ndarray) -> dict[str, list[Waypoint]]:
        cube = np.array([cube[0], cube[1], CUBE_HALF])  # resting on the table whatever z was sampled
        start = {side: arm.tcp(START_ARM_POSE) for side, arm in self.arms.items()}
        c, s = np.cos(PICK_PITCH), np.sin(PICK_PITCH)
        # right: pitched down, fingers on the cube's ±y faces; left: rolled 90°, fingers on ±z
        pick = _frame(np.array([-c, 0.0, -s]), np.array([0.0, -1.0, 0.0]))
        take = _frame(np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0]))
        grasp = cube + np.array([0.0, 0.0, 0.012])
        held = MEET - np.array([0.0, 0.0, 0.012])  # where the cube centre should be at the meeting point
        right = [
            Waypoint(0, start["right"][0], start["right"][1], GRIPPER_START),
            Waypoint(55, grasp + np.array([0.0, 0.0, 0.08]), pick, 1.0),
            Waypoint(85, grasp, pick, 1.0),
            Waypoint(100, grasp, pick, 0.0),
            Waypoint(115, grasp + np.array([0.0, 0.0, 0.06]), pick, 0.0),
            Waypoint(150, MEET, pick, 0.0),
            Waypoint(195, MEET, pick, 0.0),
            Waypoint(210, MEET, pick, 1.0),
            Waypoint(250, MEET + np.array([0.12, 0.0, 0.0]), pick, 1.0),
        ]
        left = [
            Waypoint(0, start["left"][0], start["left"][1], GRIPPER_START),
            Waypoint(110, held + np.array([-0.12, 0.0, 0.0]), take, 1.0),
            Waypoint(150, held + np.array([-0.12, 0.0, 0.0]), take, 1.0),
            Waypoint(175, held + np.array([-0.01, 0.0, 0.0]), take, 1.0),
            Waypoint(190, held + np.array([-0.01, 0.0, 0.0]), take, 0.0),
            Waypoint(250, held + np.array([-0.1, 0.0, 0.02]), take, 0.0),
        ]
        return {"left": left, "right": right}

    def plan(self, cube: np.ndarray, steps: int = PLAN_STEPS) -> np.ndarray:
        """Joint targets float32[steps, 14]: left arm 6 + gripper, right arm 6 + gripper."""
        out = np.empty((steps, 14), dtype=np.float32)
        for k, (side, wps) in enumerate(self.waypoints(cube).items()):
            arm, q = self.arms[side], START_ARM_POSE.copy()
            pos, quat, grip = interpolate(wps, steps)
            for t in range(steps):
                q = arm.solve(q, pos[t], quat[t])
                out[t, 7 * k : 7 * k + 6] = q
            out[:, 7 * k + 6] = grip
        return out


def cube_position(env_state: Any) -> np.ndarray:
    """The cube position from an ``env_state`` dict (``cube_pos``) or array (first three values)."""
    if isinstance(env_state, dict):
        if "cube_pos" not in env_state:
            raise ValueError("the expert only knows AlohaTransferCube-v0: env_state needs 'cube_pos'")
        value = env_state["cube_pos"]
    else:
        value = env_state
    pos = np.asarray(value, dtype=np.float64).reshape(-1)[:3]
    if pos.shape != (3,):
        raise ValueError(f"env_state must carry a 3D cube position, got {value!r}")
    return pos


class ExpertPolicy:
    """The privileged scripted expert for ``AlohaTransferCube-v0`` (see the module docstring).

    It reads the cube pose from ``obs["env_state"]`` (privileged information) and returns the 50 joint
    targets of its plan from ``obs["step"]`` on. Its metadata sets ``needs_env_state`` so clients add
    both keys. It needs no GPU, no weights and no rendering.
    """

    def __init__(self, cache_size: int = 16) -> None:
        self.metadata = PolicyMetadata(
            name="expert",
            input_spec={"state": CANONICAL_INPUT_SPEC["state"]},
            action_shape=(CHUNK, 14),
            action_horizon=CHUNK,
            extra={"needs_env_state": True, "tasks": ["AlohaTransferCube-v0"], "privileged": True},
        )
        self._planner: TransferCubePlanner | None = None
        self._plans: OrderedDict[tuple[float, ...], np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def _plan_for(self, cube: np.ndarray) -> np.ndarray:
        key = tuple(np.round(cube[:2], 6).tolist())
        with self._lock:
            if key in self._plans:
                self._plans.move_to_end(key)
                return self._plans[key]
            if self._planner is None:
                self._planner = TransferCubePlanner()
            plan = self._planner.plan(cube)
            self._plans[key] = plan
            while len(self._plans) > self._cache_size:
                self._plans.popitem(last=False)
            return plan

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        if "env_state" not in obs:
            raise ValueError(
                "the expert is privileged: the request needs 'env_state' (the cube pose at reset)"
            )
        step = int(obs.get("step", 0))
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        plan = self._plan_for(cube_position(obs["env_state"]))
        idx = np.minimum(np.arange(step, step + CHUNK), len(plan) - 1)
        return {"action": plan[idx]}

    def reset(self) -> None:
        with self._lock:
            self._plans.clear()
