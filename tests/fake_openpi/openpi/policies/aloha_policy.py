"""Stand-in for openpi.policies.aloha_policy: ALOHA's inputs and outputs with openpi's conversions.

Cameras: ``cam_high`` -> ``base_0_rgb``, ``cam_left_wrist`` / ``cam_right_wrist`` -> the wrist slots (black and
masked when absent); ``cam_low`` is accepted and not used, as in openpi. With ``adapt_to_pi`` the joints are
sign-flipped and the grippers converted between ALOHA's linear and π's angular space (openpi's constants).
"""

from __future__ import annotations

import dataclasses

import numpy as np

EXPECTED_CAMERAS = ("cam_high", "cam_low", "cam_left_wrist", "cam_right_wrist")
_FLIP = np.array([1, -1, -1, 1, 1, 1, 1, 1, -1, -1, 1, 1, 1, 1])


def _norm(x, lo, hi):
    return (x - lo) / (hi - lo)


def _unnorm(x, lo, hi):
    return x * (hi - lo) + lo


def gripper_to_angular(v):
    v = _unnorm(v, 0.01844, 0.05800)
    arm, horn = 0.036, 0.022
    v = np.arcsin(np.clip((horn**2 + v**2 - arm**2) / (2 * horn * v), -1.0, 1.0))
    return _norm(v, 0.5476, 1.6296)


def gripper_from_angular(v):
    return _norm(v + 0.5476, -0.6213, 1.4910)


def gripper_from_angular_inv(v):
    return _unnorm(v, -0.6213, 1.4910) - 0.5476


@dataclasses.dataclass(frozen=True)
class AlohaInputs:
    adapt_to_pi: bool = True

    def __call__(self, data: dict) -> dict:
        state = np.asarray(data["state"])
        if self.adapt_to_pi:
            state = _FLIP * state
            state[[6, 13]] = gripper_to_angular(state[[6, 13]])
        images = {}
        for name, img in data["images"].items():
            img = np.asarray(img)
            if np.issubdtype(img.dtype, np.floating):
                img = (255 * img).astype(np.uint8)
            images[name] = np.transpose(img, (1, 2, 0))
        if set(images) - set(EXPECTED_CAMERAS):
            raise ValueError(f"Expected images to contain {EXPECTED_CAMERAS}, got {tuple(images)}")
        base = images["cam_high"]
        out_images, masks = {"base_0_rgb": base}, {"base_0_rgb": np.True_}
        for dest, src in (("left_wrist_0_rgb", "cam_left_wrist"), ("right_wrist_0_rgb", "cam_right_wrist")):
            out_images[dest] = images[src] if src in images else np.zeros_like(base)
            masks[dest] = np.True_ if src in images else np.False_
        out = {"image": out_images, "image_mask": masks, "state": state}
        if "actions" in data:
            actions = np.asarray(data["actions"])
            if self.adapt_to_pi:
                actions = _FLIP * actions
                actions[:, [6, 13]] = gripper_from_angular_inv(actions[:, [6, 13]])
            out["actions"] = actions
        if "prompt" in data:
            out["prompt"] = data["prompt"]
        return out


@dataclasses.dataclass(frozen=True)
class AlohaOutputs:
    adapt_to_pi: bool = True

    def __call__(self, data: dict) -> dict:
        actions = np.asarray(data["actions"][:, :14])
        if self.adapt_to_pi:
            actions = _FLIP * actions
            actions[:, [6, 13]] = gripper_from_angular(actions[:, [6, 13]])
        return {"actions": actions}
