"""An action-chunk broker: hides a remote policy's latency from a robot's control loop.

A policy such as π₀ answers one observation with a *chunk* of future actions (50 joint targets, one per
20 ms control tick). A robot that waits for every reply stands still for the whole round trip; a robot
that keeps moving must decide which actions of a late chunk are still meaningful. The broker does that
bookkeeping, driven by the robot's own control tick::

    from pi0remote import connect
    from pi0remote.broker import ActionChunkBroker

    client = connect("tcp://gpu-box:8765")
    broker = ActionChunkBroker(client, prefetch_at="auto", blend="linear")   # a background thread
    for step in itertools.count():                       # the 50 Hz control loop
        target = broker.act(lambda: read_observation(), step, time.monotonic())
        if target is not None:
            robot.command(target)                        # None: no chunk yet, keep the current pose
        sleep_until_next_tick()
    broker.close()

What one :meth:`ActionChunkBroker.act` call does, at control step ``k`` and time ``now``:

1. **Arrival.** If a reply has arrived, its chunk is placed on the time line by the step its request was
   made at: ``chunk[i]`` is the target for step ``t + i`` (``t``: the request's step). Actions for steps
   already past (``< k``) are dropped. At most ``horizon`` actions from step ``k`` on are kept. Where
   the queue still holds actions of the previous chunk for the same steps (the *overlap*), the two are
   blended: ``"latest"`` takes the new chunk; ``"linear"`` ramps from old to new across the overlap
   (weight ``(j + 1) / (m + 1)`` on the new action at the j-th of m overlapping steps).
2. **Prefetch.** If fewer than ``max_in_flight`` requests are in flight (one by default) and at most
   ``prefetch_at`` steps from ``k`` on are covered (queued, or expected from a request in flight), a
   request goes out with the current observation, tagged with step ``k``. ``prefetch_at=0`` is
   *blocking* execution (ask only when the queue is empty); ``"auto"`` keeps the threshold at the
   largest delay seen in the last few replies (in ticks) plus a margin.
3. **Action.** The queued target for step ``k`` is returned (a *fresh* action). With nothing queued for
   ``k`` the broker *holds*: it returns the last target again (``last.fresh`` is False, a *stall*), or
   ``None`` before any chunk has arrived (the robot should keep its current pose).

**Real-time chunking** (``rtc=True``, for servers whose policy declares ``"rtc": true``; see
docs/rtc.md): each request also carries ``"rtc": {"prefix": rest, "delay_steps": d}``, where ``rest``
is what is queued from step ``k`` on (the unexecuted rest of the current chunk, ``prefix[i]`` the
target for step ``k + i``) and ``d`` the largest delay, in ticks, among the last ``auto_window``
replies (rounded up, clipped to ``[1, len(rest)]``). The server guides the new chunk so that its first
``d`` actions continue ``rest``; on arrival it replaces the queue from the step it is aligned to, with
no blending. A request made while nothing is queued (the first one, after a stall) carries no prefix.

How requests travel is pluggable (a :class:`Requester`):

* :class:`ThreadRequester` (the default): ``client.infer`` runs on one background thread; a reply is
  used at the first tick after it arrived. For robot code.
* :class:`SimulatedLatency`: ``client.infer`` runs at once, and its reply is *released* only when the
  ``now`` passed to :meth:`~ActionChunkBroker.act` reaches send time + latency (a fixed or random
  injected delay, or the call's measured round trip). Deterministic: for the evaluation harness and
  for tests, which drive ``now`` themselves and never sleep.

The broker imports only numpy and the standard library. It is not thread-safe: call it from one loop.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import numpy as np

BLENDS = ("latest", "linear")
DEFAULT_DT = 0.02
"""Control period of the ALOHA robots (50 Hz), used to turn delays into ticks for ``prefetch_at="auto"``."""

Observation = dict | Callable[[], dict]
"""An observation dict, or a zero-argument callable returning one (called only when a request goes out,
so a robot need not grab camera frames on ticks that send nothing)."""


@dataclass(eq=False)
class Arrival:
    """One request's story, kept in :attr:`ActionChunkBroker.history`."""

    step: int
    """Control step the request was made at (``chunk[0]`` is the target for this step)."""
    sent_at: float
    """``now`` at the tick the request went out."""
    reply: dict[str, Any] | None = None
    """The policy's reply (``action``, ``inference_ms``, ``client_timing`` ...), once it arrived."""
    arrived_step: int | None = None
    """Step of the tick at which the chunk was merged into the queue."""
    arrived_at: float | None = None
    latency_s: float | None = None
    """Delay the requester applied (injected) or measured (round trip), in seconds."""
    dropped: int = 0
    """Actions of this chunk that were already in the past when it arrived."""
    overlap: int = 0
    """Queued actions of the previous chunk that this one blended with or replaced."""
    kept: int = 0
    """Actions of this chunk placed in the queue."""
    superseded: bool = False
    """Arrived after the chunk of a newer request and was discarded."""
    rtc_delay_steps: int | None = None
    """Real-time chunking: the ``d`` the request carried (None: no ``rtc`` field)."""
    rtc_prefix_len: int = 0
    """Real-time chunking: length ``n`` of the prefix the request carried."""

    @property
    def delay_steps(self) -> int | None:
        return None if self.arrived_step is None else self.arrived_step - self.step


@dataclass
class Tick:
    """What the last :meth:`ActionChunkBroker.act` returned."""

    step: int
    action: np.ndarray | None
    fresh: bool
    """True when ``action`` is the queued target for this step; False when holding (or nothing yet)."""
    requested: bool = False
    """A request went out on this tick."""
    arrived: list[Arrival] = field(default_factory=list)
    """The requests whose chunks arrived on this tick (usually none or one)."""


# ------------------------------------------------------------------------------------------ requesters


class Requester:
    """How a request reaches the policy and when its reply counts as arrived.

    ``submit(obs, arrival)`` starts a request (``arrival`` is the record to fill: ``step`` and
    ``sent_at`` are set); ``poll(now)`` returns the records whose replies have arrived by time ``now``
    (with ``reply`` and ``latency_s`` filled), in order of arrival; ``in_flight`` counts the others.
    """

    in_flight: int = 0

    @property
    def busy(self) -> bool:
        return self.in_flight > 0

    def submit(self, obs: dict[str, Any], arrival: Arrival) -> None:
        raise NotImplementedError

    def poll(self, now: float) -> list[Arrival]:
        raise NotImplementedError

    def wait(self) -> tuple[Arrival, float] | None:
        """Block until the oldest pending reply arrives; return it and its arrival time (None if none)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def round_trip_s(reply: dict[str, Any], wall_s: float) -> float:
    """The client's measured round trip (``client_timing.round_trip_ms``), else the wall time of the call."""
    timing = reply.get("client_timing") if isinstance(reply, dict) else None
    if isinstance(timing, dict) and timing.get("round_trip_ms") is not None:
        return float(timing["round_trip_ms"]) / 1000.0
    return wall_s


class ThreadRequester(Requester):
    """``client.infer`` on background threads (``workers``: at most that many calls at once); a reply
    counts as arrived once its call returned.

    An exception raised by ``infer`` is re-raised by the :meth:`ActionChunkBroker.act` that collects it.
    Several workers share one client: use a client that allows concurrent calls, or one worker.
    """

    def __init__(self, client: Any, workers: int = 1) -> None:
        self.client = client
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="pi0remote-broker")
        self._pending: list[tuple[Arrival, Future]] = []

    @property
    def in_flight(self) -> int:  # type: ignore[override]
        return len(self._pending)

    def _call(self, obs: dict[str, Any]) -> tuple[dict[str, Any], float]:
        t0 = time.perf_counter()
        reply = self.client.infer(obs)
        return reply, time.perf_counter() - t0

    def submit(self, obs: dict[str, Any], arrival: Arrival) -> None:
        self._pending.append((arrival, self._pool.submit(self._call, obs)))

    def poll(self, now: float) -> list[Arrival]:
        out = []
        for arrival, future in [(a, f) for a, f in self._pending if f.done()]:
            self._pending = [(a, f) for a, f in self._pending if f is not future]
            reply, wall = future.result()  # re-raises the call's exception (later replies stay pending)
            arrival.reply = reply
            arrival.latency_s = round_trip_s(reply, wall)
            out.append(arrival)
        return out

    def join(self, timeout: float | None = None) -> bool:
        """Block until every call in flight has returned, without collecting them (True if they have).
        For scripts, tests and shutdown, not for control loops."""
        for _, future in list(self._pending):
            try:
                future.exception(timeout)
            except FutureTimeout:
                return False
        return True

    def wait(self) -> tuple[Arrival, float] | None:
        if not self._pending:
            return None
        arrival, future = self._pending[0]
        future.exception()  # block until done (the exception, if any, surfaces in poll)
        now = time.monotonic()
        for got in self.poll(now):
            if got is arrival:
                return arrival, now
        return None  # pragma: no cover - poll always returns a finished future

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


Delay = float | Callable[[], float] | None


class SimulatedLatency(Requester):
    """Deterministic latency on an injected clock: the reply is computed at once, *released* later.

    ``latency``: seconds (a float), a zero-argument callable drawing seconds per request (for jitter;
    seed it), or None to use each call's measured round trip. A request sent at ``now = s`` arrives at
    the first ``poll(now)`` with ``now >= s + latency`` (1 ns of slack absorbs float rounding, so on a
    20 ms tick clock a 300 ms delay is exactly 15 ticks).
    """

    EPS = 1e-9

    def __init__(self, client: Any, latency: Delay = None) -> None:
        self.client = client
        self.latency = latency
        self._pending: list[tuple[float, int, Arrival]] = []
        self._count = 0

    @property
    def in_flight(self) -> int:  # type: ignore[override]
        return len(self._pending)

    def submit(self, obs: dict[str, Any], arrival: Arrival) -> None:
        t0 = time.perf_counter()
        reply = self.client.infer(obs)
        measured = round_trip_s(reply, time.perf_counter() - t0)
        if self.latency is None:
            delay = measured
        elif callable(self.latency):
            delay = float(self.latency())
        else:
            delay = float(self.latency)
        arrival.reply = reply
        arrival.latency_s = max(0.0, delay)
        self._count += 1
        self._pending.append((arrival.sent_at + arrival.latency_s, self._count, arrival))
        self._pending.sort(key=lambda x: (x[0], x[1]))

    def poll(self, now: float) -> list[Arrival]:
        out = []
        while self._pending and now + self.EPS >= self._pending[0][0]:
            out.append(self._pending.pop(0)[2])
        return out

    def wait(self) -> tuple[Arrival, float] | None:
        if not self._pending:
            return None
        due, _, arrival = self._pending.pop(0)
        return arrival, due


# ---------------------------------------------------------------------------------------------- broker


class ActionChunkBroker:
    """Turns a chunking policy client into one target per control tick; see the module docstring.

    ``client``: anything with ``infer(obs) -> {"action": array[H, D], ...}`` (a
    :class:`pi0remote.PolicyClient`, a policy object). Ignored when ``requester`` is given.

    ``prefetch_at``: request the next chunk when at most this many actions are *covered* from the current
    step on: queued, or expected from requests in flight (a request sent at step ``t`` covers up to
    ``t + H - 1``, ``H`` the last chunk's length). 0 is blocking execution; ``"auto"`` is the largest
    delay, in ticks of ``dt``, among the last ``auto_window`` replies, plus ``auto_margin`` (0 before any
    reply).

    ``max_in_flight``: requests allowed in flight at once (1: one at a time). With one request at a
    time, a delay of ``d`` ticks can be hidden only while a chunk outlasts it twice (``d <= H / 2``);
    pipelining requests hides longer delays when the delay is in the network, not in the server.

    ``horizon``: at most this many actions of a chunk, from the arrival step on, are queued (None: all
    that are not in the past). Blocking execution of ``action_horizon`` steps per chunk is
    ``prefetch_at=0, horizon=action_horizon``.

    ``blend``: ``"latest"`` or ``"linear"`` (see the module docstring). A chunk from an *older* request
    than one already merged (replies overtaking each other) is discarded (``Arrival.superseded``).

    ``rtc``: real-time chunking (see the module docstring): requests carry the rest of the queue as
    the prefix the new chunk must continue; needs ``blend="latest"`` and one request in flight.
    """

    def __init__(
        self,
        client: Any = None,
        *,
        prefetch_at: int | str = "auto",
        horizon: int | None = None,
        blend: str = "latest",
        max_in_flight: int = 1,
        requester: Requester | None = None,
        dt: float = DEFAULT_DT,
        auto_margin: int = 2,
        auto_window: int = 5,
        rtc: bool = False,
    ) -> None:
        if blend not in BLENDS:
            raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
        if prefetch_at != "auto" and (not isinstance(prefetch_at, int) or prefetch_at < 0):
            raise ValueError(f"prefetch_at must be a non-negative int or 'auto', got {prefetch_at!r}")
        if horizon is not None and horizon < 1:
            raise ValueError(f"horizon must be positive, got {horizon}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be positive, got {max_in_flight}")
        if rtc and (blend != "latest" or max_in_flight != 1):
            raise ValueError("rtc replaces the queue with the new chunk: use blend='latest', max_in_flight=1")
        if requester is None:
            if client is None:
                raise ValueError("give a client or a requester")
            requester = ThreadRequester(client, workers=max_in_flight)
        self.requester = requester
        self.prefetch_at = prefetch_at
        self.horizon = horizon
        self.blend = blend
        self.max_in_flight = max_in_flight
        self.dt = dt
        self.auto_margin = auto_margin
        self.auto_window = auto_window
        self.rtc = bool(rtc)
        self.history: list[Arrival] = []
        """Every request of this episode, in order (the last ones may still be in flight)."""
        self.last: Tick | None = None
        self.stalls = 0
        """Ticks since the first action that had no fresh action (the robot held its last target)."""
        self.startup_ticks = 0
        """Ticks before the first chunk arrived (nothing to execute yet)."""
        self.fresh_ticks = 0
        self._queue: deque[tuple[int, np.ndarray]] = deque()
        self._hold: np.ndarray | None = None
        self._auto_delays: deque[int] = deque(maxlen=auto_window)
        self._next_step = 0
        self._flying: list[Arrival] = []
        self._stale: set[int] = set()
        self._merged_step = -1
        self._chunk_len = 1

    # -- state ----------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the queue, the held target and the counters (a new episode). Requests still in
        flight are discarded when they arrive."""
        self._stale |= {id(a) for a in self._flying}
        self._flying = []
        self._queue.clear()
        self._hold = None
        self.history = []
        self.last = None
        self.stalls = self.startup_ticks = self.fresh_ticks = 0
        self._next_step = 0
        self._merged_step = -1

    @property
    def queued(self) -> list[int]:
        """Steps that have a queued target, in order."""
        return [s for s, _ in self._queue]

    def remaining(self, step: int) -> int:
        """Queued actions for steps ``>= step``."""
        return sum(1 for s, _ in self._queue if s >= step)

    def covered(self, step: int) -> int:
        """Steps from ``step`` on that are queued or expected from the requests in flight."""
        end = max((s for s, _ in self._queue), default=step - 1)
        span = self._chunk_len if self.horizon is None else min(self._chunk_len, self.horizon)
        for a in self._flying:
            end = max(end, a.step + span - 1)
        return max(0, end - step + 1)

    @property
    def in_flight(self) -> int:
        """Requests of this episode in flight."""
        return len(self._flying)

    def threshold(self) -> int:
        """The current prefetch threshold, in actions."""
        if self.prefetch_at != "auto":
            return int(self.prefetch_at)
        if not self._auto_delays:
            return 0
        return max(self._auto_delays) + self.auto_margin

    # -- the tick -------------------------------------------------------------------------------------
    def prime(self, obs: Observation, step: int = 0, now: float | None = None) -> float:
        """Warm start: request the first chunk and block until it is queued, before the control loop
        starts (the robot waits at rest, so nothing of this chunk is in the past). Returns the time of
        arrival (``now`` of the simulated requester, ``time.monotonic()`` of the thread one); continue
        the loop from there with the same ``step``."""
        now = time.monotonic() if now is None else float(now)
        if self.requester.busy:
            raise RuntimeError("prime() needs an idle broker (a request is in flight)")
        record = Arrival(step=int(step), sent_at=now)
        self.history.append(record)
        self.requester.submit(obs() if callable(obs) else obs, record)
        got = self.requester.wait()
        assert got is not None
        arrival, at = got
        arrival.arrived_step, arrival.arrived_at = int(step), at
        self._auto_delays.append(delay_steps(arrival.latency_s or 0.0, self.dt))
        self._merge(arrival, int(step))
        self._next_step = int(step)
        return at

    def act(self, obs: Observation, step: int | None = None, now: float | None = None) -> np.ndarray | None:
        """The target for control step ``step`` at time ``now`` (see the module docstring).

        ``step`` defaults to one more than the previous call's (0 first); ``now`` to
        ``time.monotonic()``. Returns None only before the first chunk has arrived.
        """
        step = self._next_step if step is None else int(step)
        now = time.monotonic() if now is None else float(now)
        self._next_step = step + 1
        arrived = self._collect(step, now)
        requested = False
        if self.requester.in_flight < self.max_in_flight and self.covered(step) <= self.threshold():
            record = Arrival(step=step, sent_at=now)
            self.history.append(record)
            self._flying.append(record)
            request = obs() if callable(obs) else obs
            self.requester.submit(self.with_prefix(request, step, record) if self.rtc else request, record)
            requested = True
            arrived += self._collect(step, now)  # a zero-delay reply counts on this tick
        while self._queue and self._queue[0][0] < step:
            self._queue.popleft()
        if self._queue and self._queue[0][0] == step:
            _, action = self._queue.popleft()
            self._hold = action
            self.fresh_ticks += 1
            fresh = True
        else:
            action, fresh = self._hold, False
            if action is None:
                self.startup_ticks += 1
            else:
                self.stalls += 1
        self.last = Tick(step, action, fresh, requested, arrived)
        return action

    def rtc_delay(self, prefix_len: int) -> int:
        """``d`` for a request now: the largest recent delay in ticks, clipped to ``[1, prefix_len]``."""
        return min(max(max(self._auto_delays, default=1), 1), prefix_len)

    def with_prefix(self, obs: dict[str, Any], step: int, record: Arrival | None = None) -> dict[str, Any]:
        """``obs`` plus the ``rtc`` field for a request made at ``step`` (unchanged when nothing is
        queued for ``step``). The caller's dict is not modified."""
        rest = []
        for s, action in self._queue:
            if s < step:  # executed already (act drops these after the request goes out)
                continue
            if s != step + len(rest):
                break
            rest.append(action)
        if not rest:
            return obs
        d = self.rtc_delay(len(rest))
        if record is not None:
            record.rtc_delay_steps, record.rtc_prefix_len = d, len(rest)
        prefix = np.asarray(np.stack(rest), dtype=np.float32)
        return {**obs, "rtc": {"prefix": prefix, "delay_steps": d}}

    def _collect(self, step: int, now: float) -> list[Arrival]:
        merged = []
        for arrival in self.requester.poll(now):
            if id(arrival) in self._stale:  # sent before reset(): not for this episode
                self._stale.discard(id(arrival))
                continue
            if arrival in self._flying:
                self._flying.remove(arrival)
            arrival.arrived_step, arrival.arrived_at = step, now
            self._auto_delays.append(max(0, step - arrival.step))
            if arrival.step < self._merged_step:  # overtaken by a newer request's chunk
                arrival.superseded = True
            else:
                self._merge(arrival, step)
            merged.append(arrival)
        return merged

    def _merge(self, arrival: Arrival, step: int) -> None:
        assert arrival.reply is not None
        chunk = np.asarray(arrival.reply["action"])
        if chunk.ndim != 2:
            raise ValueError(f"reply 'action' must be a 2-D chunk, got shape {chunk.shape}")
        self._chunk_len = len(chunk)
        self._merged_step = max(self._merged_step, arrival.step)
        first = max(step - arrival.step, 0)  # chunk[i] is for step arrival.step + i
        arrival.dropped = min(first, len(chunk))
        new = chunk[first:]
        if self.horizon is not None:
            new = new[: self.horizon]
        arrival.kept = len(new)
        if len(new) == 0:  # entirely in the past: keep what is queued
            return
        start = arrival.step + first
        old = {s: a for s, a in self._queue if s >= step}
        overlap = [start + i for i in range(len(new)) if start + i in old]
        arrival.overlap = len(overlap)
        weight = {s: (j + 1) / (len(overlap) + 1) for j, s in enumerate(overlap)}
        merged = []
        for i, action in enumerate(new):
            s = start + i
            if self.blend == "linear" and s in weight:
                w = weight[s]
                action = ((1.0 - w) * old[s] + w * action).astype(chunk.dtype, copy=False)
            merged.append((s, np.array(action, copy=True)))
        self._queue = deque(merged)

    # -- lifetime -------------------------------------------------------------------------------------
    def close(self) -> None:
        self.requester.close()

    def __enter__(self) -> ActionChunkBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def delay_steps(latency_s: float, dt: float = DEFAULT_DT) -> int:
    """Control steps a delay costs: ``ceil(latency / dt)`` (with the same float slack as the requester)."""
    return max(0, math.ceil(latency_s / dt - 1e-6))


__all__ = [
    "ActionChunkBroker",
    "Arrival",
    "BLENDS",
    "Requester",
    "SimulatedLatency",
    "ThreadRequester",
    "Tick",
    "delay_steps",
]
