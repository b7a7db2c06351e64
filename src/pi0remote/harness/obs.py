"""Canonical observations for benchmarks and tests: the ALOHA request a robot would send."""

from __future__ import annotations

from typing import Any

import numpy as np

# Both arms at the gym-aloha start pose: 6 joints and a gripper each, left arm first.
ALOHA_START_STATE = np.array(
    [0.0, -0.96, 1.16, 0.0, -0.3, 0.0, 0.0, 0.0, -0.96, 1.16, 0.0, -0.3, 0.0, 0.0], dtype=np.float32
)


def canonical_obs(seed: int = 0, *, prompt: str | None = None) -> dict[str, Any]:
    """``{"cam_high": uint8[3,224,224], "state": float32[14]}`` with a random image and a plausible state."""
    rng = np.random.default_rng(seed)
    obs: dict[str, Any] = {
        "cam_high": rng.integers(0, 256, size=(3, 224, 224), dtype=np.uint8),
        "state": (ALOHA_START_STATE + rng.normal(0, 0.02, 14)).astype(np.float32),
    }
    if prompt is not None:
        obs["prompt"] = prompt
    return obs
