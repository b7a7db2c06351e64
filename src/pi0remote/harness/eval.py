"""Closed-loop evaluation of a policy on gym-aloha, through any transport.

The pieces, each small enough to read at once:

* :func:`open_policy` turns a mode (``tcp://host:port``, ``local://expert``, or a bare policy name such
  as ``expert``) into a client with ``infer`` / ``metadata`` / ``reset`` / ``close``;
* the executor decides what happens while a request is in flight. :class:`SyncExecutor`: the
  simulated world waits for the reply, and the robot clock (``dt`` per step plus the measured round
  trip per request) records how long a real robot would have stood still. The tick-driven executors of
  :mod:`.clock` (``--clock realtime``, ``--exec async``) keep simulated time running while a request is
  in flight, through :class:`pi0remote.broker.ActionChunkBroker`;
* :func:`run_episode` is the step loop: query, execute ``action_horizon`` steps of the chunk
  (:func:`execute_chunk`), repeat until success or the step limit;
* :class:`EpisodeMetrics` collects what one episode did; :func:`aggregate` summarises a mode;
* :class:`ResultsWriter` writes everything into a timestamped folder (JSON lines, aggregate JSON,
  Markdown summary, success-rate chart) and :func:`format_table` prints the final table.

Heavy imports (gym-aloha, MuJoCo, matplotlib, tqdm) happen inside the functions that need them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .stats import mean, percentile, wilson_interval

DEFAULT_TASK = "AlohaTransferCube-v0"
DEFAULT_OUT = "results/eval"
DT = 0.02  # gym-aloha control period (50 Hz)
ARM_JOINTS = np.array([0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12])
"""Action indices of the twelve arm joints (radians); 6 and 13 are the normalised grippers."""


# --------------------------------------------------------------------------------------------- policy


class DirectPolicy:
    """A policy object called in process without a codec: the fallback when no client is available,
    and the adapter tests use to hand the harness a policy object."""

    def __init__(self, policy: Any, name: str = "policy") -> None:
        from ..policies.base import policy_metadata

        self.policy = policy
        self.metadata = policy_metadata(policy, name).to_dict()

    @classmethod
    def load(cls, name: str) -> DirectPolicy:
        from ..policies import load_policy

        return cls(load_policy(name), name)

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        from ..rtc import check_supported

        check_supported(obs, self.metadata)  # as the server does: 'rtc' only for policies declaring it
        t0 = time.perf_counter()
        reply = dict(self.policy.infer(obs))
        ms = (time.perf_counter() - t0) * 1000
        reply.setdefault("inference_ms", ms)
        reply.setdefault("client_timing", {"round_trip_ms": ms})
        return reply

    def reset(self) -> None:
        if hasattr(self.policy, "reset"):
            self.policy.reset()

    def close(self) -> None:
        pass


def open_policy(mode: str) -> Any:
    """A client for ``mode``: a URL (``tcp://``, ``http://``, ``ws://``, ``local://NAME`` ...) or a bare
    policy name, which runs in process through ``local://NAME`` (the codec included)."""
    try:
        from .. import connect
    except ImportError:  # the client package is not importable: run names in process, no codec
        connect = None
    if connect is not None:
        return connect(mode if "://" in mode else f"local://{mode}")
    if "://" in mode and not mode.startswith("local://"):
        raise RuntimeError(f"cannot open {mode!r}: pi0remote.connect is not importable")
    return DirectPolicy.load(mode.removeprefix("local://"))


def metadata_dict(client: Any) -> dict[str, Any]:
    """The policy's metadata (``needs_env_state``, ``tasks`` ...), from a client's server metadata (the
    ``policy`` entry) or a policy object's own."""
    meta = getattr(client, "metadata", None) or {}
    meta = meta.to_dict() if hasattr(meta, "to_dict") else dict(meta)
    inner = meta.get("policy")
    return dict(inner) if isinstance(inner, dict) else meta


# ------------------------------------------------------------------------------------------- executor


@dataclass
class Reply:
    action: np.ndarray
    """The chunk, float32[H, 14]."""
    round_trip_ms: float
    """Request to reply as the client saw it."""
    inference_ms: float | None
    """The server's policy time, when it reports one."""
    prefix_error: float | None = None
    """Real-time chunking: the reply's ``rtc.prefix_error`` (None for a request without ``rtc``)."""


def reply_timing(raw: dict[str, Any], wall_ms: float) -> tuple[float, float | None]:
    """(round trip ms as the client saw it, else ``wall_ms``; server inference ms or None)."""
    rtt = (raw.get("client_timing") or {}).get("round_trip_ms", wall_ms)
    inference = raw.get("inference_ms", (raw.get("server_timing") or {}).get("inference_ms"))
    return float(rtt), None if inference is None else float(inference)


class SyncExecutor:
    """Blocking execution on simulated time: nothing moves while a request is in flight.

    ``robot_time_s`` advances by ``dt`` per step and by each request's round trip, i.e. the time line
    of a real robot that stands still while it waits for the next chunk (``record`` draws its
    side-by-side videos on it).
    """

    name = "sync"

    def __init__(self, dt: float = DT) -> None:
        self.dt = dt
        self.robot_time_s = 0.0

    def start_episode(self) -> None:
        self.robot_time_s = 0.0

    def query(self, client: Any, request: dict[str, Any]) -> Reply:
        t0 = time.perf_counter()
        raw = client.infer(request)
        rtt, inference = reply_timing(raw, (time.perf_counter() - t0) * 1000)
        self.robot_time_s += rtt / 1000
        action = np.asarray(raw["action"], dtype=np.float32)
        return Reply(action, rtt, inference)

    def step(self, env: Any, action: np.ndarray) -> tuple[float, bool, bool]:
        _, reward, terminated, truncated, _ = env.step(action)
        self.robot_time_s += self.dt
        return reward, terminated, truncated


# -------------------------------------------------------------------------------------------- metrics


@dataclass
class EpisodeResult:
    mode: str
    episode: int
    seed: int
    success: bool
    success_step: int | None
    max_reward: float
    steps: int
    policy_calls: int
    inference_ms_p50: float | None
    inference_ms_p95: float | None
    round_trip_ms_p50: float | None
    round_trip_ms_p95: float | None
    robot_time_s: float
    wall_s: float
    inference_ms: list[float] = field(default_factory=list)
    """Every call's server-side inference time (when the server reports it)."""
    round_trip_ms: list[float] = field(default_factory=list)
    """Every call's round trip as the client saw it."""
    executor: str = "sync/blocking"
    """``clock/strategy`` and, on the realtime clock, the injected latency (or ``measured``)."""
    stall_fraction: float = 0.0
    """Share of the time after the first action with no fresh action: ticks holding the last target
    (realtime clock), or time standing still waiting for replies on the robot clock (sync clock)."""
    stall_fraction_total: float = 0.0
    """The same, counting the wait for the first chunk too."""
    stall_ticks: int = 0
    startup_ticks: int = 0
    """Ticks before the first chunk arrived (realtime clock, cold start: the robot holds its reset pose)."""
    startup_s: float = 0.0
    """Robot-clock seconds waited at rest for the first chunk before the first tick (warm start)."""
    effective_rate_hz: float | None = None
    """Fresh actions per second of robot-clock time (50 Hz when nothing ever waits)."""
    discontinuity_rad: float | None = None
    """Largest arm-joint jump between consecutive executed actions (radians)."""
    boundary_jump_rad: float | None = None
    """Largest arm-joint jump where execution switched from one chunk to the next."""
    success_time_s: float | None = None
    """Robot-clock seconds to success (simulated time, plus waits on the sync clock)."""
    dropped_actions: int = 0
    """Actions discarded because their step had passed when the chunk arrived."""
    delay_ticks: list[int] = field(default_factory=list)
    """Every arrived call's delay in control ticks (realtime clock)."""
    prefix_error_max: float | None = None
    """Real-time chunking: the largest ``rtc.prefix_error`` a reply reported (robot units)."""


@dataclass
class EpisodeMetrics:
    mode: str
    episode: int
    seed: int
    steps: int = 0
    max_reward: float = 0.0
    success_step: int | None = None
    inference_ms: list[float] = field(default_factory=list)
    round_trip_ms: list[float] = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)
    executor: str = "sync/blocking"
    tick_driven: bool = False
    sync_clock: bool = True
    """The world waited for every reply: stalls are waits on the robot clock, not held ticks."""
    fresh_ticks: int = 0
    stall_ticks: int = 0
    startup_ticks: int = 0
    startup_s: float = 0.0
    max_jump: float | None = None
    boundary_jump: float | None = None
    success_time_s: float | None = None
    dropped_actions: int = 0
    delay_ticks: list[int] = field(default_factory=list)
    prefix_error_max: float | None = None
    _prev: np.ndarray | None = None
    _prev_chunk: int | None = None

    def record_call(self, reply: Reply, delay_ticks: int | None = None, dropped: int = 0) -> None:
        self.round_trip_ms.append(reply.round_trip_ms)
        if reply.inference_ms is not None:
            self.inference_ms.append(reply.inference_ms)
        if delay_ticks is not None:
            self.delay_ticks.append(int(delay_ticks))
        self.dropped_actions += dropped
        if reply.prefix_error is not None:
            self.prefix_error_max = max(self.prefix_error_max or 0.0, float(reply.prefix_error))

    def record_step(
        self, reward: float, terminated: bool, action: np.ndarray | None = None, *, fresh: bool = True,
        chunk: int | None = None, startup: bool = False, robot_time_s: float | None = None,
    ) -> None:  # fmt: skip
        """One environment step. ``action``: the target executed (for the jump metrics); ``fresh``:
        False when holding; ``chunk``: which reply it came from; ``startup``: no chunk yet."""
        self.steps += 1
        self.max_reward = max(self.max_reward, float(reward))
        if terminated and self.success_step is None:
            self.success_step = self.steps
            self.success_time_s = robot_time_s if robot_time_s is not None else self.steps * DT
        if startup:
            self.startup_ticks += 1
        elif fresh:
            self.fresh_ticks += 1
        else:
            self.stall_ticks += 1
        if action is not None:
            arm = np.asarray(action, dtype=np.float64).reshape(-1)[ARM_JOINTS]
            if self._prev is not None:
                jump = float(np.abs(arm - self._prev).max())
                self.max_jump = jump if self.max_jump is None else max(self.max_jump, jump)
                if fresh and chunk is not None and self._prev_chunk is not None and chunk != self._prev_chunk:
                    self.boundary_jump = jump if self.boundary_jump is None else max(self.boundary_jump, jump)
            self._prev = arm
            if fresh and not startup:
                self._prev_chunk = chunk

    def _stalls(self, robot_time_s: float) -> tuple[float, float, float | None]:
        """(stall fraction after the first action, including the start, fresh actions per second)."""
        if not self.sync_clock:
            after = self.steps - self.startup_ticks
            part = self.stall_ticks / after if after else 0.0
            waited = (self.stall_ticks + self.startup_ticks) * DT + self.startup_s
            total = waited / robot_time_s if robot_time_s > 0 else 0.0
            rate = self.fresh_ticks / robot_time_s if robot_time_s > 0 else None
            return part, total, rate
        return self._time_stalls(robot_time_s, [x / 1000 for x in self.round_trip_ms])

    def _time_stalls(self, robot_time_s: float, waits: list[float]) -> tuple[float, float, float | None]:
        if robot_time_s <= 0:
            return 0.0, 0.0, None
        first = waits[0] if waits else 0.0
        after = robot_time_s - first
        part = sum(waits[1:]) / after if after > 0 else 0.0
        return part, sum(waits) / robot_time_s, self.steps / robot_time_s

    def result(self, robot_time_s: float) -> EpisodeResult:
        stall, stall_total, rate = self._stalls(robot_time_s)
        return EpisodeResult(
            mode=self.mode, episode=self.episode, seed=self.seed,
            success=self.success_step is not None, success_step=self.success_step,
            max_reward=self.max_reward, steps=self.steps, policy_calls=len(self.round_trip_ms),
            inference_ms_p50=percentile(self.inference_ms, 50), inference_ms_p95=percentile(self.inference_ms, 95),
            round_trip_ms_p50=percentile(self.round_trip_ms, 50), round_trip_ms_p95=percentile(self.round_trip_ms, 95),
            robot_time_s=robot_time_s, wall_s=time.perf_counter() - self.t0,
            inference_ms=[round(x, 3) for x in self.inference_ms],
            round_trip_ms=[round(x, 3) for x in self.round_trip_ms],
            executor=self.executor, stall_fraction=stall, stall_fraction_total=stall_total,
            stall_ticks=self.stall_ticks, startup_ticks=self.startup_ticks, startup_s=self.startup_s,
            effective_rate_hz=rate,
            discontinuity_rad=self.max_jump, boundary_jump_rad=self.boundary_jump,
            success_time_s=self.success_time_s, dropped_actions=self.dropped_actions,
            delay_ticks=list(self.delay_ticks), prefix_error_max=self.prefix_error_max,
        )  # fmt: skip


def aggregate(mode: str, episodes: list[EpisodeResult]) -> dict[str, Any]:
    """One mode's summary: success rate with its 95 % Wilson interval, steps and latencies."""
    n, k = len(episodes), sum(e.success for e in episodes)
    low, high = wilson_interval(k, n)
    inference = [x for e in episodes for x in e.inference_ms]
    rtt = [x for e in episodes for x in e.round_trip_ms]
    return {
        "mode": mode,
        "episodes": n,
        "successes": k,
        "success_rate": k / n if n else 0.0,
        "wilson95_low": low,
        "wilson95_high": high,
        "mean_steps_to_success": mean([e.success_step for e in episodes if e.success_step is not None]),
        "inference_ms_p50": percentile(inference, 50),
        "inference_ms_p95": percentile(inference, 95),
        "round_trip_ms_p50": percentile(rtt, 50),
        "round_trip_ms_p95": percentile(rtt, 95),
        "policy_calls_per_episode": mean([e.policy_calls for e in episodes]),
        "wall_s": sum(e.wall_s for e in episodes),
        "executor": episodes[0].executor if episodes else None,
        "mean_success_time_s": mean([e.success_time_s for e in episodes if e.success_time_s is not None]),
        "stall_fraction": mean([e.stall_fraction for e in episodes]),
        "stall_fraction_max": max((e.stall_fraction for e in episodes), default=None),
        "stall_fraction_total": mean([e.stall_fraction_total for e in episodes]),
        "startup_ticks_mean": mean([e.startup_ticks for e in episodes]),
        "effective_rate_hz": mean([e.effective_rate_hz for e in episodes if e.effective_rate_hz is not None]),
        "discontinuity_rad_mean": mean(
            [e.discontinuity_rad for e in episodes if e.discontinuity_rad is not None]
        ),
        "discontinuity_rad_max": max(
            (e.discontinuity_rad for e in episodes if e.discontinuity_rad is not None), default=None
        ),
        "boundary_jump_rad_mean": mean(
            [e.boundary_jump_rad for e in episodes if e.boundary_jump_rad is not None]
        ),
        "boundary_jump_rad_max": max(
            (e.boundary_jump_rad for e in episodes if e.boundary_jump_rad is not None), default=None
        ),
        "delay_ticks_p50": percentile([x for e in episodes for x in e.delay_ticks], 50),
        "prefix_error_max_mean": mean(
            [e.prefix_error_max for e in episodes if e.prefix_error_max is not None]
        ),
    }


# -------------------------------------------------------------------------------------------- rollout


@dataclass
class EvalConfig:
    task: str = DEFAULT_TASK
    episodes: int = 10
    seed: int = 0
    action_horizon: int = 10
    max_steps: int = 400
    images: bool = True
    """Render the top camera and send ``cam_high`` with every request (π₀ needs it; the expert does not)."""
    out: str = DEFAULT_OUT
    clock: str = "sync"
    """``sync``: the simulator waits for every reply; ``realtime``: it keeps going (see :mod:`.clock`)."""
    strategy: str = "blocking"
    """``blocking``, ``async`` (``async-latest`` / ``async-linear`` name the blend) or ``rtc`` (``--exec``)."""
    latency: str | None = None
    """Injected latency on the realtime clock (``300ms``, ``300ms±50ms``); None: the measured round trip."""
    prefetch_at: int | str = "auto"
    """Async: request when at most this many actions remain (``auto``: recent delay in ticks + 2)."""
    blend: str = "latest"
    """Async overlap rule: ``latest`` or ``linear``."""
    netem: str | None = None
    """WAN emulation in front of URL modes (:mod:`.netem` spec, e.g. ``delay=150ms,jitter=10ms``)."""
    warm_start: bool = True
    """Tick-driven executors: the robot waits at rest for its first chunk before the first tick."""
    max_in_flight: int = 1
    """Async: requests allowed in flight at once (pipelining)."""

    def executor(self) -> Any:
        """A fresh executor for this clock and strategy."""
        from .clock import make_executor

        return make_executor(
            self.clock, self.strategy, latency=self.latency, action_horizon=self.action_horizon,
            prefetch_at=self.prefetch_at, blend=self.blend, warm_start=self.warm_start,
            max_in_flight=self.max_in_flight,
        )  # fmt: skip


def make_request(env: Any, step: int, env_state: dict[str, Any] | None, images: bool) -> dict[str, Any]:
    """The request for the current state; ``env_state`` and ``step`` only for policies that ask."""
    from ..sim.env import obs_to_request

    obs = env.observation(pixels=images)
    if env_state is None:
        return obs_to_request(obs)
    return obs_to_request(obs, step=step, env_state=env_state)


StepCallback = Callable[[Any, int, float, "Reply | None"], None]
"""``on_step(env, step, reward, reply)`` after reset (step 0, no reply) and after every environment
step (``reply``: the one whose chunk is being executed)."""


def execute_chunk(
    env: Any, executor: SyncExecutor, actions: np.ndarray, metrics: EpisodeMetrics,
    reply: Reply, max_steps: int, on_step: StepCallback | None = None,
) -> bool:  # fmt: skip
    """Execute the given actions; True once the episode is over (success or step limit)."""
    chunk = len(metrics.round_trip_ms)
    for action in actions:
        reward, terminated, truncated = executor.step(env, action)
        metrics.record_step(reward, terminated, action, chunk=chunk, robot_time_s=executor.robot_time_s)
        if on_step is not None:
            on_step(env, metrics.steps, reward, reply)
        if terminated or truncated or metrics.steps >= max_steps:
            return True
    return False


def run_episode(
    client: Any, env: Any, seed: int, cfg: EvalConfig, *, mode: str = "policy", episode: int = 0,
    executor: SyncExecutor | None = None, on_step: StepCallback | None = None, progress: Any = None,
) -> EpisodeResult:  # fmt: skip
    """One seeded episode: query a chunk, execute ``action_horizon`` steps of it, repeat.

    ``executor`` defaults to ``cfg.executor()`` (:class:`SyncExecutor` for the default sync clock and
    blocking strategy); a tick-driven executor (:class:`~.clock.TickExecutor`) runs its own loop.
    """
    executor = executor or cfg.executor()
    needs_state = bool(metadata_dict(client).get("needs_env_state", False))
    env.reset(seed=seed)
    env_state = env.env_state() if needs_state else None
    if hasattr(client, "reset"):
        client.reset()
    tick_driven = bool(getattr(executor, "tick_driven", False))
    if tick_driven:
        executor.start_episode(seed)
    else:
        executor.start_episode()
    metrics = EpisodeMetrics(
        mode=mode, episode=episode, seed=seed, tick_driven=tick_driven,
        sync_clock=getattr(executor, "clock", "sync") == "sync",
        executor=getattr(executor, "name", "sync/blocking"),
    )  # fmt: skip
    if metrics.executor == "sync":
        metrics.executor = "sync/blocking"
    if on_step is not None:
        on_step(env, 0, 0.0, None)  # the initial state, before the first request
    if tick_driven:
        executor.run(
            client, env, metrics, lambda step: make_request(env, step, env_state, cfg.images),
            cfg.max_steps, on_step, progress,
        )  # fmt: skip
        return metrics.result(executor.robot_time_s)
    done = False
    while not done:
        reply = executor.query(client, make_request(env, metrics.steps, env_state, cfg.images))
        metrics.record_call(reply)
        before = metrics.steps
        done = execute_chunk(
            env, executor, reply.action[: cfg.action_horizon], metrics, reply, cfg.max_steps, on_step
        )
        if progress is not None:
            progress.update(metrics.steps - before)
            progress.set_postfix(reward=f"{metrics.max_reward:.0f}", rtt=f"{reply.round_trip_ms:.1f}ms")
    return metrics.result(executor.robot_time_s)


def check_task(meta: dict[str, Any], task: str, mode: str) -> None:
    tasks = meta.get("tasks")
    if tasks and task not in tasks:
        raise SystemExit(f"{mode}: policy {meta.get('name')!r} supports {tasks}, not {task}")


def evaluate_mode(
    mode: str, cfg: EvalConfig, env: Any, writer: ResultsWriter | None = None, client: Any = None,
) -> list[EpisodeResult]:  # fmt: skip
    """All episodes of one mode (same seeds as every other mode), one progress bar per episode."""
    from tqdm import tqdm

    own = client is None
    client = open_policy(mode) if own else client
    try:
        check_task(metadata_dict(client), cfg.task, mode)
        if cfg.strategy == "rtc" and not metadata_dict(client).get("rtc"):
            raise SystemExit(f"{mode}: --exec rtc needs a policy that declares 'rtc' (a flow policy)")
        results = []
        executor = cfg.executor()
        for i in range(cfg.episodes):
            seed = cfg.seed + i
            with tqdm(total=cfg.max_steps, desc=f"{mode} ep{i} seed {seed}", unit="step", leave=False) as bar:
                res = run_episode(
                    client, env, seed, cfg, mode=mode, episode=i, executor=executor, progress=bar
                )
            tqdm.write(episode_line(res))
            results.append(res)
            if writer is not None:
                writer.episode(res)
        return results
    finally:
        if own and hasattr(client, "close"):
            client.close()


def episode_line(r: EpisodeResult) -> str:
    outcome = f"success at step {r.success_step}" if r.success else f"fail (max reward {r.max_reward:.0f})"
    rtt = f"{r.round_trip_ms_p50:.1f}" if r.round_trip_ms_p50 is not None else "-"
    extra = ""
    if r.executor != "sync/blocking":
        jump = "-" if r.discontinuity_rad is None else f"{r.discontinuity_rad:.3f}"
        extra = f", {r.executor}: stall {r.stall_fraction:.1%}, max jump {jump} rad"
    return f"{r.mode}  seed {r.seed}: {outcome}, {r.policy_calls} calls, rtt p50 {rtt} ms{extra}, {r.wall_s:.1f} s"


# -------------------------------------------------------------------------------------------- results


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def format_table(aggregates: Iterable[dict[str, Any]]) -> str:
    """A Markdown table, readable as plain text."""
    head = (
        "| mode | success | rate [95% CI] | mean steps | infer p50 ms | rtt p50 ms | rtt p95 ms | calls/ep "
        "| executor | stall | max jump rad | t success s |"
    )
    lines = [head, "|" + "---|" * 12]
    for a in aggregates:
        rate = f"{a['success_rate']:.0%} [{a['wilson95_low']:.0%}, {a['wilson95_high']:.0%}]"
        lines.append(
            f"| {a['mode']} | {a['successes']}/{a['episodes']} | {rate} | {_fmt(a['mean_steps_to_success'])} "
            f"| {_fmt(a['inference_ms_p50'], '.2f')} | {_fmt(a['round_trip_ms_p50'], '.2f')} "
            f"| {_fmt(a['round_trip_ms_p95'], '.2f')} | {_fmt(a['policy_calls_per_episode'])} "
            f"| {a.get('executor') or '-'} | {_fmt(a.get('stall_fraction'), '.1%')} "
            f"| {_fmt(a.get('discontinuity_rad_max'), '.3f')} | {_fmt(a.get('mean_success_time_s'), '.2f')} |"
        )
    return "\n".join(lines)


def success_figure(aggregates: list[dict[str, Any]], title: str) -> Any:
    """The success-rate bar chart (matplotlib figure): a bar per mode with its 95 % Wilson interval and
    its ``k/n`` label above the bar in dark text, readable whatever the rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = np.array([a["success_rate"] for a in aggregates])
    low = np.array([a["wilson95_low"] for a in aggregates])
    high = np.array([a["wilson95_high"] for a in aggregates])
    fig, ax = plt.subplots(figsize=(1.6 * len(aggregates) + 2.5, 3.6))
    ax.bar(range(len(aggregates)), rates, yerr=[rates - low, high - rates], capsize=6, color="#4c72b0")
    for i, a in enumerate(aggregates):
        label = f"{a['successes']}/{a['episodes']}"
        ax.text(i, high[i] + 0.03, label, ha="center", va="bottom", color="#222222", fontsize=10)
    ax.set_xticks(range(len(aggregates)), [a["mode"] for a in aggregates], rotation=15, ha="right")
    ax.set_ylim(0, 1.15)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_ylabel("success rate (95% Wilson)")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_success(aggregates: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Write :func:`success_figure` to ``path`` (PNG)."""
    import matplotlib.pyplot as plt

    fig = success_figure(aggregates, title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


class ResultsWriter:
    """A timestamped folder under ``out``: config.json, episodes.jsonl, aggregate.json, summary.md,
    success_rate.png."""

    def __init__(self, out: str | Path, config: dict[str, Any], prefix: str = "") -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        self.dir = Path(out) / f"{prefix}{stamp}"
        n = 1
        while self.dir.exists():
            n += 1
            self.dir = Path(out) / f"{prefix}{stamp}-{n}"
        self.dir.mkdir(parents=True)
        self.config = config
        (self.dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        self._episodes = (self.dir / "episodes.jsonl").open("a")

    def episode(self, result: EpisodeResult) -> None:
        self._episodes.write(json.dumps(asdict(result)) + "\n")
        self._episodes.flush()

    def finish(self, aggregates: list[dict[str, Any]]) -> str:
        self._episodes.close()
        (self.dir / "aggregate.json").write_text(json.dumps(aggregates, indent=2) + "\n")
        table = format_table(aggregates)
        cfg = ", ".join(f"{k}={v}" for k, v in self.config.items() if k != "modes")
        (self.dir / "summary.md").write_text(f"# Evaluation {self.dir.name}\n\n{cfg}\n\n{table}\n")
        plot_success(aggregates, self.dir / "success_rate.png", f"{self.config.get('task', '')}")
        return table


def evaluate(
    modes: list[str], cfg: EvalConfig, clients: dict[str, Any] | None = None
) -> tuple[Path, list[dict]]:
    """Evaluate every mode on the same seeds; returns the results folder and the aggregates."""
    from ..sim.env import make_env

    writer = ResultsWriter(cfg.out, {**asdict(cfg), "modes": modes})
    aggregates = []
    with make_env(cfg.task, render=False, max_steps=cfg.max_steps) as env:
        for mode in modes:
            results = evaluate_mode(mode, cfg, env, writer, (clients or {}).get(mode))
            aggregates.append(aggregate(mode, results))
    table = writer.finish(aggregates)
    print(f"\n{table}\n\nresults: {writer.dir}")
    return writer.dir, aggregates
