"""Stand-in for openpi.models.model: the Observation container."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

IMAGE_KEYS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")


@dataclasses.dataclass
class Observation:
    images: dict[str, Any]
    image_masks: dict[str, Any]
    state: Any
    tokenized_prompt: Any = None
    tokenized_prompt_mask: Any = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Observation:
        images = {}
        for key, img in data["image"].items():
            img = np.asarray(img)
            images[key] = img.astype(np.float32) / 255.0 * 2.0 - 1.0 if img.dtype == np.uint8 else img
        return cls(
            images=images,
            image_masks=data["image_mask"],
            state=data["state"],
            tokenized_prompt=data.get("tokenized_prompt"),
            tokenized_prompt_mask=data.get("tokenized_prompt_mask"),
        )
