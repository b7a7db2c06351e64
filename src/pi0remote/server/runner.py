"""One policy runner shared by every transport.

Requests are served first come, first served. Inference runs on one dedicated policy thread, never on
the event loop (health checks, metadata and other connections' I/O go on during a slow inference),
except for policies that declare ``inline = True`` (microsecond, non-blocking: ``zeros``, ``echo``).

Dynamic batching: with ``max_batch > 1`` every request that is waiting when the policy becomes free is
run in one ``infer_batch`` call (up to ``max_batch``). Robots in closed loops send their next request a
moment after their last reply, so when fewer requests are waiting than clients were recently active,
the runner waits up to ``batch_window_ms`` for the rest of the wave (and not a moment longer once they
are all in). A lone client is never delayed: with one active client there is nobody to wait for.
When a batch call raises, its requests are retried one by one so that only the bad one fails.

Isolation: the policy thread is a daemon (a stuck policy never holds the process at exit); anything a
policy raises, ``SystemExit`` and ``KeyboardInterrupt`` included, is an error of that call; with a
``timeout`` a call that runs longer answers its clients with :class:`~pi0remote.errors.PolicyTimeout`
and the runner reports :attr:`PolicyRunner.stuck` (``/healthz`` says 503) until the call returns;
requests that arrive meanwhile fail at once with the same error.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any

from ..errors import PolicyTimeout, RemotePolicyError
from .stats import LoadStats

ACTIVE_CLIENT_S = 1.0
"""A client that sent a request within this many seconds counts as active (it will likely send again)."""


class DaemonExecutor(Executor):
    """A fixed pool of daemon threads: unlike ``ThreadPoolExecutor`` it never delays interpreter exit."""

    def __init__(self, workers: int = 1, name: str = "pi0remote-policy") -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        for i in range(workers):
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True).start()

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future:
        if self._closed:
            raise RuntimeError("executor is shut down")
        future: Future = Future()
        self._queue.put((future, fn, args, kwargs))
        return future

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # noqa: B036 - reported to the caller, never raised here
                future.set_exception(_as_call_error(exc))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)


def _as_call_error(exc: BaseException) -> Exception:
    """``SystemExit`` / ``KeyboardInterrupt`` from a policy become an error of that call."""
    if isinstance(exc, Exception):
        return exc
    return RemotePolicyError(f"policy raised {type(exc).__name__}: {exc}")


@dataclass
class _Job:
    obs: dict[str, Any]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class PolicyRunner:
    def __init__(
        self, policy: Any, *, max_batch: int = 1, batch_window_ms: float = 0.0, timeout: float | None = None
    ) -> None:
        self.policy = policy
        self.timeout = timeout if timeout and timeout > 0 else None
        self.stuck_since: float | None = None
        """``perf_counter()`` when the running call passed its deadline; None while healthy."""
        self.max_batch = max(1, int(max_batch)) if hasattr(policy, "infer_batch") else 1
        self.batch_window_s = max(0.0, batch_window_ms) / 1000.0
        self.inline = bool(getattr(policy, "inline", False))
        self._pending: deque[_Job] = deque()
        self._executor = DaemonExecutor(1)
        self._busy = False
        self._lock = threading.Lock()  # reset() from another thread must not interleave with infer
        self.calls = 0
        self.batches = 0
        self._last_seen: dict[Any, float] = {}
        self._arrival: asyncio.Event | None = None
        self.load = LoadStats()
        """Recent calls/s, batch size and queue wait (a fleet publishes them; see server/stats.py)."""
        self._watched: list[_Job] | None = None
        """The jobs of the call on the policy thread while it has a deadline (``_deadline``)."""
        self._deadline = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self._watch_loop: asyncio.AbstractEventLoop | None = None

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- single-request path -------------------------------------------------------------------
    def _call_one(self, obs: dict[str, Any]) -> tuple[dict[str, Any] | BaseException, float]:
        lock = self._lock
        t0 = time.perf_counter()
        lock.acquire()  # not ``with``: on every call, and measurably cheaper
        try:
            result: dict[str, Any] | BaseException = self.policy.infer(obs)
        except BaseException as exc:  # noqa: B036 - the policy's failure is this call's error, not the server's
            result = _as_call_error(exc)
        finally:
            lock.release()
        return result, (time.perf_counter() - t0) * 1000.0

    def _call_batch(self, batch: list[dict[str, Any]]) -> tuple[list[Any], float]:
        t0 = time.perf_counter()
        try:
            with self._lock:
                results: list[Any] = list(self.policy.infer_batch(batch))
            if len(results) != len(batch):
                raise RuntimeError(f"infer_batch returned {len(results)} results for {len(batch)} requests")
        except BaseException:  # noqa: B036 - retried one by one: only the bad request fails
            results = [self._call_one(obs)[0] for obs in batch]
        return results, (time.perf_counter() - t0) * 1000.0

    def run_sync(self, obs: dict[str, Any]) -> tuple[dict[str, Any] | BaseException, dict[str, float]]:
        """In-process path (the ``local://`` transport): call the policy on this thread."""
        result, policy_ms = self._call_one(obs)
        self.load.record_idle()
        return result, {"queue_ms": 0.0, "policy_ms": policy_ms, "batch_size": 1}

    def reset(self) -> None:
        reset = getattr(self.policy, "reset", None)
        if reset is not None:
            try:
                with self._lock:
                    reset()
            except BaseException as exc:  # noqa: B036 - SystemExit from a policy is that call's error
                raise _as_call_error(exc) from exc

    async def areset(self) -> None:
        """Reset on the policy thread, so a long inference never blocks the event loop."""
        self._raise_if_stuck()
        future = asyncio.get_running_loop().run_in_executor(self._executor, self.reset)
        if self.timeout is None:
            await future
            return
        done, _ = await asyncio.wait({future}, timeout=self.timeout)
        if not done:
            raise PolicyTimeout(f"policy reset did not return within {self.timeout:g} s")
        future.result()

    @property
    def stuck(self) -> bool:
        """True while a policy call runs past its deadline (the server reports itself unhealthy)."""
        return self.stuck_since is not None

    def _raise_if_stuck(self) -> None:
        if self.stuck_since is not None:
            waited = time.perf_counter() - self.stuck_since + (self.timeout or 0.0)
            raise PolicyTimeout(f"the policy is stuck in a call that started {waited:.1f} s ago")

    def can_run_now(self) -> bool:
        """True when an inline policy is idle, so a request may run on the caller's thread at once."""
        return self.inline and not self._busy and not self._pending

    # -- asyncio path ---------------------------------------------------------------------------
    async def submit(
        self, obs: dict[str, Any], client: Any = None
    ) -> tuple[dict[str, Any] | BaseException, dict[str, float]]:
        """Run ``obs`` through the policy; returns the result (or the policy's exception) and timing.

        ``client`` identifies the connection (any hashable); it lets batching know how many robots are active.
        """
        if self.can_run_now():
            return self.run_sync(obs)
        self._raise_if_stuck()
        loop = asyncio.get_running_loop()
        job = _Job(obs, loop.create_future())
        self._pending.append(job)
        if self.max_batch > 1:
            if client is not None:  # an unnamed caller cannot be counted as an active robot
                self._last_seen[client] = job.enqueued
            if self._arrival is not None:
                self._arrival.set()
        if not self._busy:
            self._busy = True
            loop.create_task(self._drain())
        return await job.future

    def active_clients(self, now: float) -> int:
        """Clients seen within ``ACTIVE_CLIENT_S`` of ``now`` (forgets the others)."""
        stale = [k for k, t in self._last_seen.items() if now - t > ACTIVE_CLIENT_S]
        for key in stale:
            del self._last_seen[key]
        return len(self._last_seen)

    async def _gather_wave(self) -> None:
        """Wait up to the batch window while fewer requests wait than robots are active."""
        now = time.perf_counter()
        expected = min(self.max_batch, self.active_clients(now))
        deadline = now + self.batch_window_s
        self._arrival = self._arrival or asyncio.Event()
        while len(self._pending) < expected:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._arrival.clear()
            try:
                await asyncio.wait_for(self._arrival.wait(), remaining)
            except asyncio.TimeoutError:
                return

    async def _drain(self) -> None:
        try:
            while self._pending:
                if self.max_batch > 1 and self.batch_window_s:
                    await self._gather_wave()
                jobs = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
                started = time.perf_counter()
                results, policy_ms = await self._run_jobs(jobs)
                self.batches += 1
                self.calls += len(jobs)
                self.load.record([(started - j.enqueued) * 1000.0 for j in jobs])
                for job, res in zip(jobs, results, strict=True):
                    if not job.future.done():  # a client that went away does not affect the others
                        timing = {
                            "queue_ms": (started - job.enqueued) * 1000.0,
                            "policy_ms": policy_ms,
                            "batch_size": len(jobs),
                        }
                        job.future.set_result((res, timing))
        finally:
            self._busy = False

    async def _run_jobs(self, jobs: list[_Job]) -> tuple[list[Any], float]:
        """Run one call on the policy thread; past the deadline, answer its clients and wait it out."""
        loop = asyncio.get_running_loop()
        if len(jobs) == 1:
            call: Any = loop.run_in_executor(self._executor, self._call_one, jobs[0].obs)
        else:
            call = loop.run_in_executor(self._executor, self._call_batch, [j.obs for j in jobs])
        if self.timeout is not None:
            self._watch(loop, jobs)
        try:
            result, policy_ms = await call
        finally:
            self._watched = None
        if self.stuck_since is not None:  # its clients got PolicyTimeout when the deadline passed
            self.stuck_since = None
            return [None] * len(jobs), (self.timeout or 0.0) * 1000.0
        return ([result] if len(jobs) == 1 else result), policy_ms

    def _watch(self, loop: asyncio.AbstractEventLoop, jobs: list[_Job]) -> None:
        """Give this call its deadline. One timer serves back-to-back calls: when it fires it re-arms itself
        for the running call's deadline, instead of one asyncio timer per call (~20 µs each here)."""
        timeout = self.timeout or 0.0
        self._watched = jobs
        self._deadline = time.perf_counter() + timeout
        if self._watchdog is None or self._watch_loop is not loop:
            self._watch_loop = loop
            self._watchdog = loop.call_later(timeout, self._check_deadline, loop)

    def _check_deadline(self, loop: asyncio.AbstractEventLoop) -> None:
        if loop is not self._watch_loop:
            return  # armed on a loop the runner has since left: that loop's timer is not ours any more
        self._watchdog = None
        jobs = self._watched
        if jobs is None:
            return  # idle: the next call arms it again
        left = self._deadline - time.perf_counter()
        if left > 0:
            self._watchdog = loop.call_later(left, self._check_deadline, loop)
        else:
            self._stuck(jobs)

    def _stuck(self, jobs: list[_Job]) -> None:
        self.stuck_since = time.perf_counter()
        error = PolicyTimeout(f"the policy did not answer within {self.timeout:g} s")
        waiting = list(jobs) + list(self._pending)
        self._pending.clear()
        for job in waiting:
            if not job.future.done():
                job.future.set_result((error, {"queue_ms": 0.0, "policy_ms": 0.0, "batch_size": len(jobs)}))
