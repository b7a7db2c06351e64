"""Stand-in for openpi.policies.policy_config.create_trained_policy, with ALOHA-like transforms."""

from __future__ import annotations

from typing import Any

import numpy as np

from openpi.policies import policy as _policy

CREATED: list[dict[str, Any]] = []
"""Every call, for tests to inspect."""
SEEN_INPUTS: list[dict[str, Any]] = []
"""Every raw input a created policy received, before its transforms."""


def _record(data: dict) -> dict:
    SEEN_INPUTS.append(data)
    return data


def _inject_prompt(prompt: str | None):
    def run(data: dict) -> dict:
        if prompt is not None and "prompt" not in data:
            data["prompt"] = np.asarray(prompt)
        return data

    return run


def _aloha_inputs(data: dict) -> dict:
    images = {k: np.transpose(np.asarray(v), (1, 2, 0)) for k, v in data["images"].items()}
    base = images["cam_high"]
    out_images = {"base_0_rgb": base}
    masks = {"base_0_rgb": np.True_}
    for dest, src in (("left_wrist_0_rgb", "cam_left_wrist"), ("right_wrist_0_rgb", "cam_right_wrist")):
        out_images[dest] = images.get(src, np.zeros_like(base))
        masks[dest] = np.True_ if src in images else np.False_
    out = {"image": out_images, "image_mask": masks, "state": np.asarray(data["state"]) * 2.0}
    if "prompt" in data:
        out["prompt"] = data["prompt"]
    return out


def _tokenize(data: dict) -> dict:
    prompt = data.pop("prompt", None)
    if prompt is None:
        raise ValueError("Prompt is required")
    prompt = prompt if isinstance(prompt, str) else prompt.item()
    ids = [ord(c) % 251 for c in prompt][:48]
    tokens = np.zeros(48, np.int32)
    tokens[: len(ids)] = ids
    return {**data, "tokenized_prompt": tokens, "tokenized_prompt_mask": tokens != 0}


def _pad_state(data: dict) -> dict:
    state = data["state"]
    data["state"] = np.pad(state, (0, 32 - state.shape[-1]))
    return data


def _aloha_outputs(data: dict) -> dict:
    # float64 out, as openpi's AlohaOutputs gives after its joint flips
    return {"actions": np.asarray(data["actions"][:, :14], np.float64) / 2.0}


def create_trained_policy(
    train_config: Any,
    checkpoint_dir: Any,
    *,
    repack_transforms: Any = None,
    sample_kwargs: dict[str, Any] | None = None,
    default_prompt: str | None = None,
    norm_stats: Any = None,
    pytorch_device: str | None = None,
) -> _policy.Policy:
    CREATED.append(
        {
            "train_config": train_config,
            "checkpoint_dir": checkpoint_dir,
            "sample_kwargs": sample_kwargs,
            "default_prompt": default_prompt,
        }
    )
    model = _policy.FakePi0(train_config.model.action_horizon, train_config.model.action_dim)
    return _policy.Policy(
        model,
        transforms=[
            _record,
            _inject_prompt(default_prompt),
            _aloha_inputs,
            _inject_prompt(train_config.default_prompt),
            _tokenize,
            _pad_state,
        ],
        output_transforms=[_aloha_outputs],
        sample_kwargs=sample_kwargs,
        metadata={"config": train_config.name},
    )
