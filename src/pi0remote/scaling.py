"""The fleet's control loop: from the load containers publish to the autoscaler settings of their class.

Robots reach a container through raw TCP portals, which Modal's autoscaler cannot see (it counts function
inputs), so capacity is set from the robots the containers report instead:

* :func:`decide` is the decision, a pure function: the published loads (and the previous decision) in,
  ``min_containers`` / ``buffer_containers`` out. Unit-tested without Modal.
* :func:`autoscale_once` reads a store, decides, and calls ``set_autoscaler(**settings)`` when the decision
  changed (on Modal: ``modal.Cls.from_name(app, "Pi0Server")().update_autoscaler``, from a scheduled
  function in ``pi0remote.modal_app``).

Rule: ``ceil(robots / robots_per_container)`` containers for the connected robots plus ``spare`` warm ones
(a robot that connects, or fails over, lands on a warm container instead of waiting for a cold start),
never below the configured floor nor above the maximum. Scaling up is immediate; scaling down waits until
the robots would fill at most ``scale_down_fill`` of the smaller fleet, so the count does not flap.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import asdict, dataclass
from typing import Any

DEFAULT_ROBOTS_PER_CONTAINER = 8
STATE_KEY = "decision"


@dataclass(frozen=True)
class ScalingPolicy:
    """The knobs (``PI0REMOTE_*`` names in :class:`pi0remote.deploy.DeployConfig`)."""

    robots_per_container: int = DEFAULT_ROBOTS_PER_CONTAINER  # PI0REMOTE_ROBOTS_PER_CONTAINER
    floor: int = 1  # PI0REMOTE_MIN_CONTAINERS: never fewer, even with no robot
    max_containers: int | None = None  # PI0REMOTE_MAX_CONTAINERS
    spare: int = 1  # PI0REMOTE_SPARE_CONTAINERS: warm containers beyond the need, while robots are connected
    buffer_containers: int = 0  # PI0REMOTE_BUFFER_CONTAINERS: Modal's buffer (web-endpoint inputs only)
    scale_down_fill: float = 0.75

    def __post_init__(self) -> None:
        if self.robots_per_container < 1:
            raise ValueError("robots_per_container must be at least 1")
        if not 0 < self.scale_down_fill <= 1:
            raise ValueError("scale_down_fill must be in (0, 1]")


@dataclass(frozen=True)
class ScalingDecision:
    min_containers: int
    buffer_containers: int
    robots: int
    containers: int
    """Live containers the decision saw."""
    capped: bool
    """The robots need more containers than ``max_containers`` allows."""

    def settings(self) -> dict[str, int]:
        """What to hand to ``update_autoscaler``."""
        return {"min_containers": self.min_containers, "buffer_containers": self.buffer_containers}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _robots(load: Mapping[str, Any]) -> int:
    try:
        return max(0, int(load.get("robots") or 0))
    except (TypeError, ValueError, OverflowError):
        return 0


def decide(
    loads: Iterable[Mapping[str, Any]], policy: ScalingPolicy, previous_min: int | None = None
) -> ScalingDecision:
    """The autoscaler settings for the containers' published ``loads`` (one mapping per live container)."""
    loads = list(loads)
    robots = sum(_robots(load) for load in loads)
    per = policy.robots_per_container
    spare = policy.spare if robots > 0 else 0
    target = math.ceil(robots / per) + spare
    if previous_min is not None and target < previous_min:
        # come down only as far as keeps every remaining container at most scale_down_fill full
        target = min(previous_min, math.ceil(robots / (per * policy.scale_down_fill)) + spare)
    wanted = max(policy.floor, target)
    cap = policy.max_containers
    capped = cap is not None and wanted > cap
    minimum = min(wanted, cap) if cap is not None else wanted
    buffer = policy.buffer_containers if robots > 0 else 0
    if cap is not None:
        buffer = max(0, min(buffer, cap - minimum))
    return ScalingDecision(minimum, buffer, robots, len(loads), capped)


def live_loads(store: Any, *, max_age_s: float, now: float | None = None) -> list[dict[str, Any]]:
    """The ``load`` of every container whose heartbeat is younger than ``max_age_s``."""
    t = time.time() if now is None else now
    out = []
    for _, entry in list(store.items()):
        if not isinstance(entry, Mapping):
            continue
        beat = entry.get("heartbeat")
        if not isinstance(beat, (int, float)) or t - beat > max_age_s:
            continue
        load = entry.get("load")
        out.append(dict(load) if isinstance(load, Mapping) else {})
    return out


def autoscale_once(
    store: Any,
    set_autoscaler: Callable[..., Any],
    policy: ScalingPolicy,
    state: MutableMapping[str, Any] | None = None,
    *,
    max_age_s: float = 60.0,
) -> ScalingDecision:
    """One round of the control loop; ``state`` (a dict or ``modal.Dict``) keeps the last decision."""
    previous = state.get(STATE_KEY) if state is not None else None
    previous_min = previous.get("min_containers") if isinstance(previous, Mapping) else None
    decision = decide(live_loads(store, max_age_s=max_age_s), policy, previous_min)
    if not isinstance(previous, Mapping) or {k: previous.get(k) for k in decision.settings()} != (
        decision.settings()
    ):
        set_autoscaler(**decision.settings())
    if state is not None:
        state[STATE_KEY] = decision.to_dict()
    return decision


__all__ = [
    "DEFAULT_ROBOTS_PER_CONTAINER",
    "ScalingDecision",
    "ScalingPolicy",
    "autoscale_once",
    "decide",
    "live_loads",
]
