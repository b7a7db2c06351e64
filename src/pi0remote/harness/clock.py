"""Clocks, latency injection and tick-driven executors for the evaluation harness.

The reference evaluation (and openpi's example) stops the simulator while the policy thinks, so latency
cannot change success. :class:`TickExecutor` runs the episode the way a real robot lives it, one 20 ms
control tick at a time, through the same :class:`~pi0remote.broker.ActionChunkBroker` that robot code
uses:

* ``clock="realtime"``: simulated time advances while a request is in flight. A request made at tick
  ``t`` whose call takes ``L`` arrives at tick ``t + ceil(L / 20 ms)``; meanwhile the robot executes what
  it already has, or holds its last target. ``L`` is the call's measured round trip, or an injected
  :class:`LatencySpec` (``300ms``, ``300ms±50ms``: uniform, seeded per episode) so runs are
  reproducible without a slow network.
* ``clock="sync"``: the simulator waits for every reply (zero ticks per request); the robot clock still
  adds each round trip. (Blocking execution on the sync clock is :class:`~.eval.SyncExecutor`, the
  reference behaviour.)
* ``strategy="blocking"``: ask when the queue is empty, execute ``action_horizon`` steps of the reply
  (counted from its arrival: actions for ticks that passed while waiting are dropped), ask again.
* ``strategy="async"``: ask when at most ``prefetch_at`` actions remain (``"auto"``: the largest recent
  delay in ticks + 2), keep the whole chunk, blend the overlap (``"latest"`` or ``"linear"``); with
  ``max_in_flight > 1`` requests are pipelined (a request covers its step + 49 while in flight).
  ``async-latest`` and ``async-linear`` name the blend in the strategy (for sweeps that compare both).
* ``strategy="rtc"``: real-time chunking (docs/rtc.md). Asks like ``async`` (``prefetch_at``); the
  request carries the unexecuted rest of the queue and ``d``, the largest recent delay in ticks; the
  policy (one that declares ``"rtc": true``) guides the new chunk to continue that rest, and the chunk
  replaces the queue from the step it is aligned to, with no blending.

Alignment is by step index: the request made at tick ``t`` carries ``step = t`` (the privileged expert
answers with its plan from step ``t`` on), so the action executed at tick ``k`` is ``chunk[k - t]``.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..broker import ActionChunkBroker, SimulatedLatency

DT = 0.02
CLOCKS = ("sync", "realtime")
STRATEGIES = ("blocking", "async", "async-latest", "async-linear", "rtc")
"""``--exec`` names; ``async-latest`` / ``async-linear`` are ``async`` with that blend."""


def split_strategy(strategy: str, blend: str = "latest") -> tuple[str, str]:
    """``(base strategy, blend)``: ``async-linear`` -> ``("async", "linear")``; others keep ``blend``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    base, _, suffix = strategy.partition("-")
    return base, suffix or blend


@dataclass(frozen=True)
class LatencySpec:
    """An injected round-trip latency: ``mean_ms`` plus a uniform ``±jitter_ms`` (clamped at zero)."""

    mean_ms: float
    jitter_ms: float = 0.0

    _NUM = r"([0-9]*\.?[0-9]+)\s*(ms|s)?"

    @classmethod
    def parse(cls, text: str | float | LatencySpec) -> LatencySpec:
        """``300ms``, ``0.3s``, ``300`` (ms), ``300ms±50ms``, ``300ms+-50ms``, ``300+-50``."""
        if isinstance(text, LatencySpec):
            return text
        if isinstance(text, (int, float)):
            return cls(float(text))
        m = re.fullmatch(rf"\s*{cls._NUM}\s*(?:(?:±|\+-|\+/-)\s*{cls._NUM})?\s*", str(text).lower())
        if not m:
            raise ValueError(f"latency: expected e.g. 300ms or 300ms±50ms, got {text!r}")

        def ms(value: str, unit: str | None) -> float:
            return float(value) * (1000.0 if unit == "s" else 1.0)

        mean = ms(m.group(1), m.group(2))
        jitter = ms(m.group(3), m.group(4)) if m.group(3) else 0.0
        return cls(mean, jitter)

    def sampler(self, seed: int) -> Any:
        """Seconds per request: the fixed value, or a uniform draw from a generator seeded with ``seed``."""
        if not self.jitter_ms:
            return self.mean_ms / 1000.0
        rng = random.Random(f"latency-{seed}")
        lo, hi = self.mean_ms - self.jitter_ms, self.mean_ms + self.jitter_ms
        return lambda: max(0.0, rng.uniform(lo, hi)) / 1000.0

    def __str__(self) -> str:
        return f"{self.mean_ms:g}ms" + (f"±{self.jitter_ms:g}ms" if self.jitter_ms else "")


def delay_ticks(latency_ms: float, dt: float = DT) -> int:
    """Control ticks a call of ``latency_ms`` costs on the realtime clock: ``ceil(L / dt)``."""
    return max(0, math.ceil(latency_ms / 1000.0 / dt - 1e-6))


class TickExecutor:
    """Runs an episode tick by tick through an :class:`ActionChunkBroker`; see the module docstring.

    ``latency``: None measures every call's round trip (what the network really did); a
    :class:`LatencySpec` (or its text) injects a delay instead. Ignored on the sync clock.
    """

    tick_driven = True

    def __init__(
        self,
        strategy: str = "blocking",
        *,
        clock: str = "realtime",
        latency: LatencySpec | str | None = None,
        action_horizon: int = 10,
        prefetch_at: int | str = "auto",
        blend: str = "latest",
        warm_start: bool = True,
        max_in_flight: int = 1,
        dt: float = DT,
    ) -> None:
        strategy, blend = split_strategy(strategy, blend)
        if clock not in CLOCKS:
            raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
        self.strategy, self.clock, self.dt = strategy, clock, dt
        self.latency = None if latency is None else LatencySpec.parse(latency)
        self.action_horizon, self.prefetch_at, self.blend = action_horizon, prefetch_at, blend
        self.warm_start, self.max_in_flight = warm_start, max_in_flight
        self.robot_time_s = 0.0
        self.seed = 0
        self.broker: ActionChunkBroker | None = None

    @property
    def name(self) -> str:
        lat = "" if self.clock == "sync" else f" {self.latency if self.latency else 'measured'}"
        return f"{self.clock}/{self.strategy}{lat}"

    def start_episode(self, seed: int = 0) -> None:
        self.robot_time_s = 0.0
        self.seed = seed

    def make_broker(self, client: Any) -> ActionChunkBroker:
        if self.clock == "sync":
            delay: Any = 0.0
        else:
            delay = None if self.latency is None else self.latency.sampler(self.seed)
        if self.strategy == "blocking":
            prefetch: int | str = 0
            horizon: int | None = self.action_horizon
        else:
            prefetch, horizon = self.prefetch_at, None
        rtc = self.strategy == "rtc"
        return ActionChunkBroker(
            prefetch_at=prefetch, horizon=horizon, blend="latest" if rtc else self.blend, dt=self.dt,
            max_in_flight=self.max_in_flight if self.strategy == "async" else 1,
            requester=SimulatedLatency(client, delay), rtc=rtc,
        )  # fmt: skip

    def run(
        self, client: Any, env: Any, metrics: Any, request_for: Any, max_steps: int,
        on_step: Any = None, progress: Any = None,
    ) -> None:  # fmt: skip
        """Tick until success or the step limit. ``request_for(step)`` builds the request (called only
        when one goes out); ``metrics`` is an :class:`~.eval.EpisodeMetrics`."""
        from .eval import Reply, reply_timing

        broker = self.broker = self.make_broker(client)
        start_pose = np.asarray(env.observation(pixels=False)["agent_pos"], dtype=np.float32)
        reply: Reply | None = None
        calls = 0

        def record(arrival: Any) -> Reply:
            rtt, inference = reply_timing(arrival.reply or {}, (arrival.latency_s or 0.0) * 1000)
            info = (arrival.reply or {}).get("rtc")
            error = info.get("prefix_error") if isinstance(info, dict) else None
            got = Reply(np.asarray(arrival.reply["action"]), rtt, inference, error)
            metrics.record_call(got, delay_ticks=arrival.delay_steps, dropped=arrival.dropped)
            return got

        t0 = 0.0
        if self.warm_start:  # the robot waits at rest for its first chunk; the simulator does not step
            t0 = broker.prime(lambda: request_for(0), 0, 0.0)
            first = broker.history[-1]
            if self.clock == "sync":
                t0 = reply_timing(first.reply or {}, 0.0)[0] / 1000
            self.robot_time_s = metrics.startup_s = t0
            reply, calls = record(first), 1
        while True:
            step = metrics.steps
            action = broker.act(lambda s=step: request_for(s), step, t0 + step * self.dt)
            tick = broker.last
            assert tick is not None
            if tick.requested and self.clock == "sync":
                sent = broker.history[-1]  # answered at once on this clock: the world waited for it
                self.robot_time_s += reply_timing(sent.reply or {}, 0.0)[0] / 1000
            for arrival in tick.arrived:
                calls += 1
                reply = record(arrival)
            startup = action is None
            if startup:
                action = start_pose
            _, reward, terminated, truncated, _ = env.step(action)
            self.robot_time_s += self.dt
            metrics.record_step(
                reward, terminated, action, fresh=tick.fresh, chunk=calls, startup=startup,
                robot_time_s=self.robot_time_s,
            )  # fmt: skip
            if on_step is not None:
                on_step(env, metrics.steps, reward, reply)
            if progress is not None:
                progress.update(1)
            if terminated or truncated or metrics.steps >= max_steps:
                return


def make_executor(
    clock: str = "sync", strategy: str = "blocking", *, latency: LatencySpec | str | None = None,
    action_horizon: int = 10, prefetch_at: int | str = "auto", blend: str = "latest",
    warm_start: bool = True, max_in_flight: int = 1, dt: float = DT,
) -> Any:  # fmt: skip
    """The executor for a clock and strategy: :class:`~.eval.SyncExecutor` for sync/blocking (the
    reference behaviour), a :class:`TickExecutor` otherwise."""
    if clock == "sync" and split_strategy(strategy)[0] == "blocking":
        if latency is not None:
            raise ValueError("--latency needs --clock realtime (the sync clock waits for every reply)")
        from .eval import SyncExecutor

        return SyncExecutor(dt)
    if clock == "sync" and latency is not None:
        raise ValueError("--latency needs --clock realtime (the sync clock waits for every reply)")
    return TickExecutor(
        strategy, clock=clock, latency=latency, action_horizon=action_horizon,
        prefetch_at=prefetch_at, blend=blend, warm_start=warm_start, max_in_flight=max_in_flight, dt=dt,
    )  # fmt: skip


__all__ = [
    "CLOCKS", "STRATEGIES", "LatencySpec", "TickExecutor", "delay_ticks", "make_executor", "split_strategy",
]  # fmt: skip
