"""Load counters of one server, for a fleet: connected robots, recent calls/s, batch size, queue wait.

:class:`LoadStats` is updated by the core (a session opens after its HELLO, closes with its connection) and by
the runner (one record per policy call or batch); anything may read :meth:`LoadStats.snapshot` from another
thread (the deployment's heartbeat publishes it). Nothing here touches a socket or the policy.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

DEFAULT_WINDOW_S = 5.0
"""Calls/s, mean batch and queue wait are computed over the calls of the last this many seconds."""
SLOTS = 50
"""The window is kept as this many time slots: a slot leaves it whole, once its first call is older."""

_monotonic = time.monotonic


class _Slot:
    """The calls of one slot: batches, calls that did not wait, and the waits of those that did."""

    __slots__ = ("start", "batches", "idle", "waits")

    def __init__(self, start: float) -> None:
        self.start = start
        self.batches = 0
        self.idle = 0
        self.waits: list[float] = []


class LoadStats:
    """Thread-safe counters; ``on_change`` callbacks run when the number of connected robots changes.

    Recording a call is a few increments in the current slot (the hot path: one per request);
    :meth:`snapshot` does the sorting and summing.
    """

    def __init__(self, window_s: float = DEFAULT_WINDOW_S) -> None:
        self.window_s = float(window_s)
        self._slot_s = self.window_s / SLOTS
        self._lock = threading.Lock()
        self._sessions: set[int] = set()
        self._slots: deque[_Slot] = deque()  # closed slots, oldest first
        self._cur = _Slot(-1e300)
        self._cur_end = -1e300  # the current slot takes calls until then
        self._started = _monotonic()
        self.total_calls = 0
        self.on_change: list[Callable[[], None]] = []

    # -- connections ----------------------------------------------------------------------------
    def session_opened(self, session: Any) -> None:
        """A client finished its HELLO (it is a connected robot until its connection closes)."""
        with self._lock:
            before = len(self._sessions)
            self._sessions.add(id(session))
            changed = len(self._sessions) != before
        if changed:
            self._changed()

    def session_closed(self, session: Any) -> None:
        with self._lock:
            if id(session) not in self._sessions:
                return
            self._sessions.discard(id(session))
        self._changed()

    def _changed(self) -> None:
        for callback in list(self.on_change):
            try:
                callback()
            except Exception:  # noqa: BLE001 - a listener must never break the server
                pass

    @property
    def robots(self) -> int:
        return len(self._sessions)

    # -- calls ----------------------------------------------------------------------------------
    def record(self, waits_ms: Iterable[float], now: float | None = None) -> None:
        """One policy call of ``len(waits_ms)`` requests, each having waited that long in the queue."""
        t = _monotonic() if now is None else now
        with self._lock:
            slot = self._cur if t < self._cur_end else self._open_slot(t)
            slot.batches += 1
            n = 0
            for w in waits_ms:
                n += 1
                if w:
                    slot.waits.append(w)
                else:
                    slot.idle += 1
            self.total_calls += n

    def record_idle(self) -> None:
        """One call of one request that did not wait (``record((0.0,))``, the inline path's, cheaper)."""
        t = _monotonic()
        lock = self._lock
        lock.acquire()  # not ``with``: once per request, and measurably cheaper
        try:
            slot = self._cur if t < self._cur_end else self._open_slot(t)
            slot.batches += 1
            slot.idle += 1
            self.total_calls += 1
        finally:
            lock.release()

    def _open_slot(self, t: float) -> _Slot:
        """Close the current slot (keeping it if it holds calls) and start one at ``t``."""
        if self._cur.batches:
            self._slots.append(self._cur)
        self._cur = _Slot(t)
        self._cur_end = t + self._slot_s
        self._trim(t)
        return self._cur

    def _trim(self, now: float) -> None:
        horizon = now - self.window_s
        while self._slots and self._slots[0].start < horizon:
            self._slots.popleft()
        if self._cur.start < horizon:
            self._cur = _Slot(-1e300)
            self._cur_end = -1e300

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """``robots``, ``calls_per_s``, ``mean_batch`` and ``queue_wait_p50_ms`` over the recent window."""
        t = _monotonic() if now is None else now
        with self._lock:
            self._trim(t)
            slots = [*self._slots, self._cur]
            batches = sum(s.batches for s in slots)
            idle = sum(s.idle for s in slots)
            waits = sorted([w for s in slots for w in s.waits])
            robots = len(self._sessions)
        calls = idle + len(waits)
        span = max(1e-3, min(self.window_s, t - self._started))
        return {
            "robots": robots,
            "calls_per_s": calls / span,
            "mean_batch": calls / batches if batches else 0.0,
            "queue_wait_p50_ms": _median_with_zeros(waits, idle),
        }


def _median_with_zeros(waits: list[float], zeros: int) -> float:
    """The upper median of sorted ``waits`` together with ``zeros`` more waits of 0.0 (0.0 when empty)."""
    k = (len(waits) + zeros) // 2
    negative = bisect.bisect_left(waits, 0.0)
    if k < negative:
        return waits[k]
    if k < negative + zeros:
        return 0.0
    return waits[k - zeros] if waits else 0.0


__all__ = ["DEFAULT_WINDOW_S", "LoadStats"]
