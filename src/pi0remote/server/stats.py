"""Load counters of one server, for a fleet: connected robots, recent calls/s, batch size, queue wait.

:class:`LoadStats` is updated by the core (a session opens after its HELLO, closes with its connection) and by
the runner (one record per policy call or batch); anything may read :meth:`LoadStats.snapshot` from another
thread (the deployment's heartbeat publishes it). Nothing here touches a socket or the policy.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

DEFAULT_WINDOW_S = 5.0
"""Calls/s, mean batch and queue wait are computed over the calls of the last this many seconds."""


class LoadStats:
    """Thread-safe counters; ``on_change`` callbacks run when the number of connected robots changes."""

    def __init__(self, window_s: float = DEFAULT_WINDOW_S) -> None:
        self.window_s = float(window_s)
        self._lock = threading.Lock()
        self._sessions: set[int] = set()
        self._batches: deque[tuple[float, int]] = deque()  # (time, size)
        self._waits: deque[tuple[float, float]] = deque()  # (time, queue wait ms) per call
        self._started = time.monotonic()
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
        t = time.monotonic() if now is None else now
        waits = waits_ms if isinstance(waits_ms, (list, tuple)) else list(waits_ms)
        with self._lock:
            self._batches.append((t, len(waits)))
            for w in waits:
                self._waits.append((t, w))
            self.total_calls += len(waits)
            if t - self._batches[0][0] > self.window_s:
                self._trim(t)

    def _trim(self, now: float) -> None:
        horizon = now - self.window_s
        while self._batches and self._batches[0][0] < horizon:
            self._batches.popleft()
        while self._waits and self._waits[0][0] < horizon:
            self._waits.popleft()

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """``robots``, ``calls_per_s``, ``mean_batch`` and ``queue_wait_p50_ms`` over the recent window."""
        t = time.monotonic() if now is None else now
        with self._lock:
            self._trim(t)
            calls = len(self._waits)
            batches = len(self._batches)
            waits = sorted(w for _, w in self._waits)
            robots = len(self._sessions)
        span = max(1e-3, min(self.window_s, t - self._started))
        return {
            "robots": robots,
            "calls_per_s": calls / span,
            "mean_batch": calls / batches if batches else 0.0,
            "queue_wait_p50_ms": waits[len(waits) // 2] if waits else 0.0,
        }


__all__ = ["DEFAULT_WINDOW_S", "LoadStats"]
