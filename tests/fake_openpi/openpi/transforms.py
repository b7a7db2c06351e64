"""Stand-in for openpi.transforms: the transforms openpi's pi0 configs compose, with openpi's semantics.

Each class keeps openpi's name, fields and arithmetic (float64 where openpi's numpy code promotes, the same
epsilons, the same key handling), so that a test comparing pi0remote's fast path with this ``Policy.infer``
checks the mapping against openpi's behaviour.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from openpi.shared.normalize import NormStats


@dataclasses.dataclass(frozen=True)
class CompositeTransform:
    transforms: Sequence[Any]

    def __call__(self, data: dict) -> dict:
        for t in self.transforms:
            data = t(data)
        return data


def compose(transforms: Sequence[Any]) -> CompositeTransform:
    return CompositeTransform(list(transforms))


@dataclasses.dataclass(frozen=True)
class InjectDefaultPrompt:
    prompt: str | None

    def __call__(self, data: dict) -> dict:
        if self.prompt is not None and "prompt" not in data:
            data["prompt"] = np.asarray(self.prompt)
        return data


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _unflat(flat: dict) -> dict:
    out: dict = {}
    for k, v in flat.items():
        node = out
        *parents, leaf = k.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def _apply(tree: dict, stats: dict, fn: Any, strict: bool) -> dict:
    flat = _flat(tree)
    if strict:
        for k in stats:
            if k not in flat:
                raise ValueError(f"Selector key {k} not found in tree")
    return _unflat({k: fn(v, stats[k]) if k in stats else v for k, v in flat.items()})


def pad_to_dim(x: np.ndarray, target_dim: int, axis: int = -1, value: float = 0.0) -> np.ndarray:
    current = x.shape[axis]
    if current < target_dim:
        width = [(0, 0)] * x.ndim
        width[axis] = (0, target_dim - current)
        return np.pad(x, width, constant_values=value)
    return x


@dataclasses.dataclass(frozen=True)
class Normalize:
    norm_stats: dict[str, NormStats] | None
    use_quantiles: bool = False
    strict: bool = False

    def __call__(self, data: dict) -> dict:
        if self.norm_stats is None:
            return data
        return _apply(data, self.norm_stats, self._q if self.use_quantiles else self._z, self.strict)

    @staticmethod
    def _z(x: np.ndarray, s: NormStats) -> np.ndarray:
        n = x.shape[-1]
        return (x - s.mean[..., :n]) / (s.std[..., :n] + 1e-6)

    @staticmethod
    def _q(x: np.ndarray, s: NormStats) -> np.ndarray:
        n = x.shape[-1]
        return (x - s.q01[..., :n]) / (s.q99[..., :n] - s.q01[..., :n] + 1e-6) * 2.0 - 1.0


@dataclasses.dataclass(frozen=True)
class Unnormalize:
    norm_stats: dict[str, NormStats] | None
    use_quantiles: bool = False

    def __call__(self, data: dict) -> dict:
        if self.norm_stats is None:
            return data
        return _apply(data, self.norm_stats, self._q if self.use_quantiles else self._z, True)

    @staticmethod
    def _z(x: np.ndarray, s: NormStats) -> np.ndarray:
        mean = pad_to_dim(s.mean, x.shape[-1], value=0.0)
        std = pad_to_dim(s.std, x.shape[-1], value=1.0)
        return x * (std + 1e-6) + mean

    @staticmethod
    def _q(x: np.ndarray, s: NormStats) -> np.ndarray:
        dim = s.q01.shape[-1]
        if dim < x.shape[-1]:
            head = (x[..., :dim] + 1.0) / 2.0 * (s.q99 - s.q01 + 1e-6) + s.q01
            return np.concatenate([head, x[..., dim:]], axis=-1)
        return (x + 1.0) / 2.0 * (s.q99 - s.q01 + 1e-6) + s.q01


def resize_with_pad(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """openpi_client.image_tools.resize_with_pad: PIL bilinear to fit, black padding, centred."""
    if images.shape[-3:-1] == (height, width):
        return images
    shape = images.shape
    flat = images.reshape(-1, *shape[-3:])
    out = []
    for im in flat:
        pil = Image.fromarray(im)
        cur_w, cur_h = pil.size
        ratio = max(cur_w / width, cur_h / height)
        rh, rw = int(cur_h / ratio), int(cur_w / ratio)
        resized = pil.resize((rw, rh), resample=Image.BILINEAR)
        canvas = Image.new(resized.mode, (width, height), 0)
        canvas.paste(resized, (max(0, int((width - rw) / 2)), max(0, int((height - rh) / 2))))
        out.append(np.asarray(canvas))
    return np.stack(out).reshape(*shape[:-3], height, width, shape[-1])


@dataclasses.dataclass(frozen=True)
class ResizeImages:
    height: int
    width: int

    def __call__(self, data: dict) -> dict:
        data["image"] = {k: resize_with_pad(v, self.height, self.width) for k, v in data["image"].items()}
        return data


@dataclasses.dataclass(frozen=True)
class TokenizePrompt:
    tokenizer: Any
    discrete_state_input: bool = False

    def __call__(self, data: dict) -> dict:
        if (prompt := data.pop("prompt", None)) is None:
            raise ValueError("Prompt is required")
        state = data.get("state") if self.discrete_state_input else None
        if not isinstance(prompt, str):
            prompt = prompt.item()
        tokens, mask = self.tokenizer.tokenize(prompt, state)
        return {**data, "tokenized_prompt": tokens, "tokenized_prompt_mask": mask}


@dataclasses.dataclass(frozen=True)
class PadStatesAndActions:
    model_action_dim: int

    def __call__(self, data: dict) -> dict:
        data["state"] = pad_to_dim(data["state"], self.model_action_dim)
        if "actions" in data:
            data["actions"] = pad_to_dim(data["actions"], self.model_action_dim)
        return data
