"""The fast π₀ path's host step: openpi's own input transforms, run for everything except the pixels.

A request's cameras never go through openpi's host transforms. Instead, once per set of cameras, a tiny probe
image per camera (distinct values at every position) runs through the policy's input transforms; reading the
result tells which model slot each camera lands in, in which layout, which slots are black fill and what their
masks are (:class:`SlotLayout`). Per request, the same transforms then run with those probes in place of the
frames, which yields exactly openpi's state, image masks and (through a per-prompt cache) prompt tokens in a
few tens of microseconds, while the real frames go to the device untouched (uint8 CHW). ``ResizeImages`` is
taken out of the chain and done on the device; ``TokenizePrompt`` is replaced by the same tokenizer behind a
cache (prompts that depend on the state, π₀.5's, are tokenized every time). A transform that changes pixels
in any other way makes the probe fail: :class:`FastPathUnsupported`, and the policy serves ``--exact``.

An RTC prefix (robot units) rides along as openpi's training ``actions`` and leaves in model space
(normalized, ALOHA's joint conversion, padded), through the very transforms training used.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["CAMERAS", "FastPathUnsupported", "HostInputs", "HostPlan", "SlotLayout"]

CAMERAS = ("cam_high", "cam_low", "cam_left_wrist", "cam_right_wrist")
"""Request keys that carry camera frames (CHW uint8); openpi's ALOHA input decides which of them it uses."""

_PROBE_SHAPE = (3, 2, 4)


class FastPathUnsupported(RuntimeError):
    """The policy's transforms do something to the pixels the fast path does not reproduce."""


@dataclasses.dataclass(frozen=True)
class SlotLayout:
    """Where each model image slot comes from, for one set of request cameras."""

    slots: tuple[str, ...]
    """openpi's image slots, in the order its transforms produce them (the prefix order)."""
    sources: tuple[str | None, ...]
    """The request camera feeding each slot (CHW, transposed on the device), or None for black fill."""


@dataclasses.dataclass
class HostInputs:
    """One request after the host step: what the jitted function needs, besides the frames themselves."""

    layout: SlotLayout
    masks: np.ndarray  # bool [n_slots]
    state: np.ndarray  # float32 [action_dim], model space
    tokens: np.ndarray  # int32 [max_token_len]
    token_mask: np.ndarray  # bool [max_token_len]
    frames: dict[str, np.ndarray]  # request camera -> uint8 CHW
    prefix: np.ndarray | None = None  # float32 [n, action_dim], model space (RTC)
    rtc: Any = None  # the request's parsed pi0remote.rtc.RtcRequest


def _probe(index: int) -> np.ndarray:
    size = int(np.prod(_PROBE_SHAPE))
    return (np.arange(size, dtype=np.uint8) + 1 + size * index).reshape(_PROBE_SHAPE)


class _CachedTokenize:
    """openpi's ``TokenizePrompt`` with its tokenizer's output cached per prompt (when it ignores the state)."""

    def __init__(self, original: Any, size: int = 256) -> None:
        self.tokenizer = original.tokenizer
        self.discrete_state_input = bool(getattr(original, "discrete_state_input", False))
        self._cache: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._size = size

    def __call__(self, data: dict) -> dict:
        prompt = data.pop("prompt", None)
        if prompt is None:
            raise ValueError("Prompt is required")
        if not isinstance(prompt, str):
            prompt = prompt.item()
        if self.discrete_state_input:
            if (state := data.get("state", None)) is None:
                raise ValueError("State is required.")
            tokens, mask = self.tokenizer.tokenize(prompt, state)
        else:
            hit = self._cache.get(prompt)
            if hit is None:
                hit = self.tokenizer.tokenize(prompt, None)
                self._cache[prompt] = hit
                if len(self._cache) > self._size:
                    self._cache.popitem(last=False)
            tokens, mask = hit
        return {**data, "tokenized_prompt": tokens, "tokenized_prompt_mask": mask}


class HostPlan:
    """The policy's input transforms minus the pixel work, plus the probe that maps cameras to slots."""

    def __init__(self, openpi_policy: Any, transforms_mod: Any) -> None:
        chain = getattr(openpi_policy._input_transform, "transforms", None)
        if chain is None:
            raise FastPathUnsupported("the policy's input transform is not a sequence of transforms")
        self.image_size: tuple[int, int] | None = None
        self.steps: list[Any] = []
        for t in chain:
            if isinstance(t, transforms_mod.ResizeImages):
                self.image_size = (int(t.height), int(t.width))
            elif isinstance(t, transforms_mod.TokenizePrompt):
                self.steps.append(_CachedTokenize(t))
            else:
                self.steps.append(t)
        self.output_transform = openpi_policy._output_transform
        self._probes = {cam: _probe(i) for i, cam in enumerate(CAMERAS)}
        self._layouts: dict[tuple[str, ...], SlotLayout] = {}

    def _run(self, data: dict) -> dict:
        for t in self.steps:
            data = t(data)
        return data

    def _layout(self, present: tuple[str, ...], images: dict[str, Any]) -> SlotLayout:
        layout = self._layouts.get(present)
        if layout is not None:
            return layout
        sources: list[str | None] = []
        for slot, img in images.items():
            img = np.asarray(img)
            src = [c for c in present if np.array_equal(img, self._probes[c].transpose(1, 2, 0))]
            if src:
                sources.append(src[0])
            elif img.shape == _PROBE_SHAPE[1:] + _PROBE_SHAPE[:1] and not img.any():
                sources.append(None)
            else:
                raise FastPathUnsupported(f"the input transforms change the pixels of image slot {slot!r}")
        layout = SlotLayout(tuple(images), tuple(sources))
        self._layouts[present] = layout
        return layout

    def inputs(self, obs: dict[str, Any], prompt: str | None, rtc: Any = None) -> HostInputs:
        """Run openpi's transforms on one (validated) request, with probes in place of its frames; an RTC
        request's prefix goes through them as training ``actions`` (into model space)."""
        prefix = None if rtc is None else rtc.prefix
        present = tuple(c for c in CAMERAS if isinstance(obs.get(c), np.ndarray))
        data: dict[str, Any] = {"images": {c: self._probes[c] for c in present}, "state": obs["state"]}
        if prompt is not None:
            data["prompt"] = prompt
        if prefix is not None:
            data["actions"] = prefix
        out = self._run(data)
        layout = self._layout(present, out["image"])
        return HostInputs(
            layout=layout,
            masks=np.array([bool(out["image_mask"][s]) for s in layout.slots]),
            state=np.asarray(out["state"], np.float32),
            tokens=np.asarray(out["tokenized_prompt"], np.int32),
            token_mask=np.asarray(out["tokenized_prompt_mask"], bool),
            frames={c: obs[c] for c in present},
            prefix=None if prefix is None else np.asarray(out["actions"], np.float32),
            rtc=rtc,
        )

    def affine_outputs(
        self, state: np.ndarray, horizon: int, model_dim: int
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """(scale, offset) float32 [H, A] when openpi's output transforms map a model chunk x to
        ``x[:, :A] * scale + offset`` whatever the state (as Unnormalize + ALOHA's outputs do), checked on
        random chunks and two states; None otherwise (then :meth:`outputs` runs on the host per chunk)."""
        rng = np.random.default_rng(0)
        states = (np.asarray(state, np.float32), rng.uniform(-1, 1, np.shape(state)).astype(np.float32))

        def f(s: np.ndarray, x: np.ndarray) -> np.ndarray:
            out = self.output_transform({"state": s.copy(), "actions": x.copy()})
            return np.asarray(out["actions"], np.float64)

        try:
            offset = f(states[0], np.zeros((horizon, model_dim), np.float32))
            scale = f(states[0], np.ones((horizon, model_dim), np.float32)) - offset
            if offset.ndim != 2 or offset.shape[0] != horizon or offset.shape[1] > model_dim:
                return None
            a = offset.shape[1]
            for s in states:
                x = rng.standard_normal((horizon, model_dim)).astype(np.float32)
                want = x[:, :a].astype(np.float64) * scale + offset
                if not np.allclose(f(s, x), want, rtol=1e-9, atol=1e-9):
                    return None
        except Exception:  # noqa: BLE001 - any transform that cannot take the probe keeps the host step
            return None
        return scale.astype(np.float32), offset.astype(np.float32)

    def outputs(self, state: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """openpi's output transforms on one chunk (model space -> robot units), as float32."""
        out = self.output_transform({"state": state, "actions": actions})
        return np.ascontiguousarray(out["actions"], dtype=np.float32)


def group_key(item: HostInputs) -> tuple[Any, ...]:
    """Requests with the same key run in one call: same slot sources and the same frame shapes."""
    shapes = tuple(None if s is None else item.frames[s].shape for s in item.layout.sources)
    return (item.layout, shapes)


def kept_slots(items: Sequence[HostInputs]) -> tuple[int, ...]:
    """Slot indices any item's mask says present: only those enter the prefix (the rest attend to nothing)."""
    any_mask = np.logical_or.reduce([it.masks for it in items])
    return tuple(int(i) for i in np.flatnonzero(any_mask))
