"""Built-in policies for benchmarks and tests: ``zeros``, ``sleep:MS`` / ``sleep:BASE+PER_ITEM``, ``echo``."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .base import CANONICAL_INPUT_SPEC, PolicyMetadata


class ZerosPolicy:
    """Returns a zero action chunk shaped by its metadata; costs nothing (the transport benchmark's policy)."""

    inline = True

    def __init__(self, action_shape: tuple[int, int] = (50, 14), name: str = "zeros") -> None:
        self.metadata = PolicyMetadata(
            name=name,
            input_spec=dict(CANONICAL_INPUT_SPEC),
            action_shape=action_shape,
            action_horizon=action_shape[0],
        )
        self._action = np.zeros(action_shape, dtype=np.float32)
        self.resets = 0

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        return {"action": self._action}

    def infer_batch(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"action": self._action} for _ in batch]

    def reset(self) -> None:
        self.resets += 1


class SleepPolicy(ZerosPolicy):
    """Zeros after simulated compute: ``base_ms + per_item_ms * batch_size`` of sleeping.

    ``sleep:26`` waits 26 ms per call; ``sleep:24+8.9`` models a GPU whose batch of n costs
    24 + 8.9 n ms, so dynamic batching can be measured on the CPU.
    """

    inline = False

    def __init__(self, base_ms: float, per_item_ms: float = 0.0) -> None:
        super().__init__(name=f"sleep:{base_ms:g}" + (f"+{per_item_ms:g}" if per_item_ms else ""))
        self.base_ms = base_ms
        self.per_item_ms = per_item_ms

    @classmethod
    def parse(cls, arg: str) -> SleepPolicy:
        base, _, per = arg.partition("+")
        try:
            return cls(float(base), float(per) if per else 0.0)
        except ValueError:
            raise ValueError(f"sleep policy takes MS or BASE_MS+PER_ITEM_MS, got {arg!r}") from None

    def _cost_s(self, n: int) -> float:
        return (self.base_ms + self.per_item_ms * n) / 1000.0

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        time.sleep(self._cost_s(1))
        return {"action": self._action}

    def infer_batch(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        time.sleep(self._cost_s(len(batch)))
        return [{"action": self._action} for _ in batch]


class EchoPolicy:
    """Reports the dtype and shape of every array it received (and the type of everything else)."""

    inline = True

    def __init__(self) -> None:
        self.metadata = PolicyMetadata(name="echo", input_spec={})
        self._action = np.zeros((50, 14), dtype=np.float32)

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        received: dict[str, Any] = {}
        for key, value in obs.items():
            if isinstance(value, np.ndarray):
                received[key] = {"dtype": str(value.dtype), "shape": list(value.shape)}
            else:
                received[key] = {"type": type(value).__name__}
        return {"action": self._action, "received": received}
