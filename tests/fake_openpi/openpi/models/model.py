"""Stand-in for openpi.models.model: the Observation container and preprocess_observation."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

IMAGE_KEYS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
IMAGE_RESOLUTION = (224, 224)


@dataclasses.dataclass
class Observation:
    images: dict[str, Any]
    image_masks: dict[str, Any]
    state: Any
    tokenized_prompt: Any = None
    tokenized_prompt_mask: Any = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Observation:
        if ("tokenized_prompt" in data) != ("tokenized_prompt_mask" in data):
            raise ValueError("tokenized_prompt and tokenized_prompt_mask must be provided together.")
        for key in data["image"]:
            if data["image"][key].dtype == np.uint8:
                data["image"][key] = data["image"][key].astype(np.float32) / 255.0 * 2.0 - 1.0
        return cls(
            images=data["image"],
            image_masks=data["image_mask"],
            state=data["state"],
            tokenized_prompt=data.get("tokenized_prompt"),
            tokenized_prompt_mask=data.get("tokenized_prompt_mask"),
        )


def preprocess_observation(
    rng: Any,
    observation: Observation,
    *,
    train: bool = False,
    image_keys: Sequence[str] = IMAGE_KEYS,
    image_resolution: tuple[int, int] = IMAGE_RESOLUTION,
) -> Observation:
    """Keeps ``image_keys`` (in that order), checks their size and fills missing masks with True."""
    if not set(image_keys).issubset(observation.images):
        raise ValueError(f"images dict missing keys: expected {image_keys}, got {list(observation.images)}")
    batch_shape = observation.state.shape[:-1]
    images = {}
    for key in image_keys:
        if tuple(observation.images[key].shape[1:3]) != tuple(image_resolution):
            raise ValueError(f"stand-in preprocess: {key} is not {image_resolution}")
        images[key] = observation.images[key]
    masks = {
        k: jnp.asarray(observation.image_masks[k])
        if k in observation.image_masks
        else jnp.ones(batch_shape, bool)
        for k in images
    }
    return Observation(
        images, masks, observation.state, observation.tokenized_prompt, observation.tokenized_prompt_mask
    )
