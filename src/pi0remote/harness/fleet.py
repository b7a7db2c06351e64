"""``python -m pi0remote.bench --fleet K --clients N``: a Modal-style fleet on this machine, measured.

K container processes run the deployment's own start-up code (``pi0remote.deploy.start_from_config``) with a
``multiprocessing`` manager dict as the endpoint store (what a ``modal.Dict`` is to Modal containers) and
their loopback listeners as the portals. N robots (threads of this process) connect through
``modal://fleet/tcp`` with that store: the real resolver (load-based choice), the real failover client.
``--kill-one-at S`` SIGKILLs the busiest container S seconds in (no exit handler, its entry stays in the store
until it goes stale, as when a Modal container dies), and the report gives each robot's outage.

Reported under ``fleet`` (JSON): ``containers[]`` (``robots`` each published, the robots the clients saw,
calls served), ``calls_per_s`` (all robots), ``baseline`` (one container, ``max_batch=1``, saturated, measured
in the same run) and ``speedup_vs_one_unbatched``, ``outage_s`` (p50/p99/max over the killed container's
robots), ``lost_calls`` (calls that got neither a result nor a typed error) and ``typed_errors``.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from .percentiles import percentile

SCHEMA = "pi0remote.bench.fleet/1"
TOKEN = "fleet-local-token"
APP = "fleet"
DEFAULT_POLICY = "sleep:24+8.9"


@dataclass
class FleetConfig:
    containers: int
    clients: int
    duration_s: float = 10.0
    kill_one_at: float | None = None
    policy: str = DEFAULT_POLICY
    max_batch: int = 8
    transport: str = "tcp"
    failover_s: float = 10.0
    watch_s: float = 0.5
    heartbeat_s: float = 1.0
    baseline_s: float = 3.0
    timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.containers < 1 or self.clients < 1:
            raise ValueError("--fleet and --clients must be at least 1")
        if self.kill_one_at is not None and not 0 < self.kill_one_at < self.duration_s:
            raise ValueError("--kill-one-at must fall inside --fleet-duration")
        if self.transport not in ("tcp", "quic+tcp"):
            raise ValueError("a fleet serves the portals: --transport tcp or quic+tcp")
        if self.kill_one_at is not None and self.containers < 2:
            raise ValueError("--kill-one-at needs at least two containers (--fleet 2)")

    @classmethod
    def from_args(cls, args: argparse.Namespace, policy_default: str | None = None) -> FleetConfig:
        policy = args.policy if args.policy and args.policy != policy_default else DEFAULT_POLICY
        asked = getattr(args, "transport", None)
        asked = asked if isinstance(asked, list) else [asked]
        portal = asked[0] if len(asked) == 1 and asked[0] in ("tcp", "quic+tcp") else "tcp"
        return cls(
            transport=portal,
            containers=args.fleet,
            clients=max(1, args.clients),
            duration_s=args.fleet_duration,
            kill_one_at=args.kill_one_at,
            policy=policy,
            max_batch=args.fleet_max_batch,
            failover_s=args.failover_s,
            baseline_s=args.baseline_s,
            timeout=getattr(args, "timeout", 10.0),
        )


def add_fleet_args(parser: argparse.ArgumentParser) -> None:
    """``bench``'s fleet flags (``--clients N`` is the number of robots)."""
    g = parser.add_argument_group("fleet (--fleet K: K local containers, a dict store, loopback portals)")
    g.add_argument(
        "--fleet", type=int, default=0, metavar="K", help="start K local containers; robots: --clients"
    )
    g.add_argument(
        "--kill-one-at", type=float, default=None, metavar="S", help="SIGKILL the busiest container S s in"
    )
    g.add_argument("--fleet-duration", type=float, default=10.0, metavar="S", help="seconds the robots run")
    g.add_argument("--fleet-max-batch", type=int, default=8, metavar="N", help="each container's --max-batch")
    g.add_argument("--failover-s", type=float, default=10.0, metavar="S", help="the robots' ?failover_s=")
    g.add_argument(
        "--baseline-s", type=float, default=3.0, metavar="S",
        help="seconds measuring one unbatched container first (0: skip)",
    )  # fmt: skip


# -- containers ------------------------------------------------------------------------------------
class _LoopbackTunnel:
    def __init__(self, port: int) -> None:
        self.tcp_socket = ("127.0.0.1", port)


def _loopback_forward(port: int) -> Any:
    """``modal.forward`` here: the portal is the listener's own loopback address."""
    return contextlib.nullcontext(_LoopbackTunnel(port))


def _container_main(
    container_id: str, store: Any, env: dict[str, str], ready: Any, stop: Any
) -> None:  # pragma: no cover - runs in a child process
    from ..deploy import DeployConfig, start_from_config

    try:
        config = DeployConfig.from_env(env)
        container = start_from_config(
            config,
            store=store,
            forward=_loopback_forward,
            token=TOKEN,
            host="127.0.0.1",
            container_id=container_id,
        )
    except BaseException as exc:
        ready.put((container_id, f"{type(exc).__name__}: {exc}"))
        raise
    ready.put((container_id, None))
    with contextlib.suppress(EOFError, OSError):
        stop.recv()  # the parent says stop, or goes away
    container.close()


class LocalFleet:
    """K container processes publishing into one manager dict; :meth:`kill` is a SIGKILL.

    Each child waits on its own pipe for the word to stop (a process-shared Event would deadlock the
    parent once a waiter was killed).
    """

    def __init__(self, ids: Sequence[str], env: dict[str, str], manager: Any) -> None:
        ctx = mp.get_context("spawn")
        self.store = manager.dict()
        self._ready = ctx.Queue()
        self.procs: dict[str, Any] = {}
        self._pipes: dict[str, Any] = {}
        for cid in ids:
            mine, theirs = ctx.Pipe()
            self._pipes[cid] = mine
            self.procs[cid] = ctx.Process(
                target=_container_main, args=(cid, self.store, env, self._ready, theirs), daemon=True
            )
        self.killed: list[str] = []

    def __enter__(self) -> LocalFleet:
        for proc in self.procs.values():
            proc.start()
        for _ in self.procs:
            cid, error = self._ready.get(timeout=180)
            if error:
                self.__exit__()
                raise RuntimeError(f"container {cid} failed to start: {error}")
        return self

    def kill(self, container_id: str) -> None:
        proc = self.procs[container_id]
        if proc.pid is not None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        self.killed.append(container_id)

    def __exit__(self, *exc: object) -> None:
        for pipe in self._pipes.values():
            with contextlib.suppress(OSError):
                pipe.send("stop")
        for proc in self.procs.values():
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def container_env(config: FleetConfig, max_batch: int) -> dict[str, str]:
    return {
        "PI0REMOTE_APP": APP,
        "PI0REMOTE_POLICY": config.policy,
        "PI0REMOTE_MAX_BATCH": str(max_batch),
        "PI0REMOTE_PORTALS": config.transport,
        "PI0REMOTE_TCP_PORT": "0",
        "PI0REMOTE_QUIC_PORT": "0",
        "PI0REMOTE_HEARTBEAT_S": str(config.heartbeat_s),
    }


# -- robots ----------------------------------------------------------------------------------------
class Robot(threading.Thread):
    """One closed-loop robot: connect through ``modal://``, call until told to stop, record every call."""

    def __init__(
        self, index: int, url: str, store: Any, timeout: float, go: threading.Event, stop: threading.Event
    ):
        super().__init__(name=f"robot-{index}", daemon=True)
        self.index, self.url, self.store, self.timeout = index, url, store, timeout
        self.go, self.stop_evt = go, stop
        self.connected = threading.Event()
        self.calls: list[tuple[float, float, str | None, str]] = []  # (start, end, container, status)
        self.started = 0
        self.container: str | None = None
        self.failovers = 0
        self.error: str | None = None

    def run(self) -> None:
        from ..client import connect
        from .obs import canonical_obs

        obs = canonical_obs(self.index)
        try:
            client = connect(self.url, modal_store=self.store, token=TOKEN, timeout=self.timeout)
        except Exception as exc:  # noqa: BLE001 - reported, not raised in a thread
            self.error = f"{type(exc).__name__}: {exc}"
            return
        finally:
            self.connected.set()
        self.container = client.container_id
        self.go.wait()
        with client:
            while not self.stop_evt.is_set():
                self._one_call(client, obs)
            self.failovers = client.failovers

    def _one_call(self, client: Any, obs: dict[str, Any]) -> None:
        from ..errors import Pi0RemoteError

        self.container = client.container_id
        self.started += 1
        t0 = time.perf_counter()
        try:
            reply = client.infer(obs)
            status = "ok" if getattr(reply.get("action"), "shape", None) == (50, 14) else "bad_reply"
        except Pi0RemoteError as exc:
            status = type(exc).__name__
        except Exception as exc:  # noqa: BLE001 - an untyped failure counts as a lost call
            status = f"untyped:{type(exc).__name__}"
        self.calls.append((t0, time.perf_counter(), client.container_id, status))


def run_robots(
    n: int,
    url: str,
    store: Any,
    config: FleetConfig,
    duration_s: float,
    on_tick: Callable[[float, list[Robot]], None] | None = None,
) -> tuple[list[Robot], float, float]:
    """Start ``n`` robots together (they connect at once), run ``duration_s``; ``on_tick`` every 20 ms."""
    go, stop = threading.Event(), threading.Event()
    robots = [Robot(i, url, store, config.timeout, go, stop) for i in range(n)]
    for robot in robots:
        robot.start()
    for robot in robots:
        robot.connected.wait(120)
    errors = [r.error for r in robots if r.error]
    if errors:
        stop.set()
        go.set()
        raise RuntimeError(f"{len(errors)} robot(s) could not connect: {errors[0]}")
    go.set()
    t0 = time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < duration_s:
        if on_tick is not None:
            on_tick(elapsed, robots)
        stop.wait(0.02)  # the measurement clock, not a synchronisation
    stop.set()
    t1 = time.perf_counter()
    for robot in robots:
        robot.join(config.timeout + config.failover_s + 5)
    return robots, t0, t1


# -- measuring -------------------------------------------------------------------------------------
def _ok_calls(robots: Sequence[Robot], t0: float, t1: float) -> list[tuple[float, float, str | None, str]]:
    return [c for r in robots for c in r.calls if c[3] == "ok" and t0 <= c[1] <= t1]


def outage(robot: Robot, t_kill: float) -> float | None:
    """Seconds without a reply around the kill: last reply before it to the first reply after it."""
    before = [c[1] for c in robot.calls if c[3] == "ok" and c[1] <= t_kill]
    after = [c[1] for c in robot.calls if c[3] == "ok" and c[1] > t_kill]
    if not after:
        return None
    return after[0] - (before[-1] if before else t_kill)


def call_accounting(robots: Sequence[Robot]) -> dict[str, int]:
    """Every call started gets a result or a typed error; anything else (or a call never finished) is lost."""
    started = sum(r.started for r in robots)
    ok = sum(1 for r in robots for c in r.calls if c[3] == "ok")
    untyped = sum(1 for r in robots for c in r.calls if c[3].startswith("untyped") or c[3] == "bad_reply")
    typed = sum(1 for r in robots for c in r.calls) - ok - untyped
    unfinished = started - sum(len(r.calls) for r in robots)
    return {"started": started, "ok": ok, "typed_errors": typed, "lost_calls": untyped + unfinished}


def spread(counts: Sequence[int]) -> dict[str, float]:
    mean = sum(counts) / len(counts) if counts else 0.0
    dev = max((abs(c - mean) for c in counts), default=0.0)
    return {"mean": mean, "min": min(counts, default=0), "max": max(counts, default=0),
            "max_dev_pct": 100.0 * dev / mean if mean else 0.0}  # fmt: skip


def _percentiles(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"p50": None, "p99": None, "max": None, "robots": 0}
    return {"p50": percentile(list(values), 50), "p99": percentile(list(values), 99), "max": max(values),
            "robots": len(values)}  # fmt: skip


# -- the run ---------------------------------------------------------------------------------------
def _url(config: FleetConfig) -> str:
    return f"modal://{APP}/{config.transport}?failover_s={config.failover_s:g}&watch_s={config.watch_s:g}"


def _published(store: Any) -> dict[str, dict[str, Any]]:
    return {
        cid: dict(entry.get("load") or {}) for cid, entry in list(store.items()) if isinstance(entry, dict)
    }


def measure_baseline(config: FleetConfig, manager: Any, log: Callable[[str], None]) -> dict[str, Any]:
    """One container with ``max_batch=1``, saturated by a few robots: the rate batching and the fleet beat."""
    n = min(config.clients, 4)
    log(f"baseline: 1 container, max_batch 1, {n} robots, {config.baseline_s:g} s")
    with LocalFleet(["baseline-0"], container_env(config, 1), manager) as fleet:
        robots, t0, t1 = run_robots(n, _url(config), fleet.store, config, config.baseline_s)
    calls = _ok_calls(robots, t0, t1)
    return {"robots": n, "max_batch": 1, "calls": len(calls), "calls_per_s": len(calls) / (t1 - t0)}


class _KillPlan:
    """On the robots' clock: sample the published loads, then (optionally) SIGKILL the busiest container."""

    def __init__(self, fleet: LocalFleet, config: FleetConfig) -> None:
        self.fleet, self.config = fleet, config
        self.sample_at = config.kill_one_at if config.kill_one_at is not None else config.duration_s / 2
        self.published: dict[str, dict[str, Any]] | None = None
        self.seen: dict[str, int] = {}
        self.victim: str | None = None
        self.t_kill: float | None = None
        self.affected: list[int] = []

    def __call__(self, elapsed: float, robots: list[Robot]) -> None:
        if self.published is None and elapsed >= self.sample_at:
            self.published = _published(self.fleet.store)
            self.seen = {}
            for r in robots:
                self.seen[r.container or "?"] = self.seen.get(r.container or "?", 0) + 1
        if self.config.kill_one_at is None or self.t_kill is not None or elapsed < self.config.kill_one_at:
            return
        self.victim = max(self.seen, key=lambda cid: self.seen[cid])
        self.affected = [r.index for r in robots if r.container == self.victim]
        self.t_kill = time.perf_counter()
        self.fleet.kill(self.victim)


def run_fleet(config: FleetConfig, log: Callable[[str], None]) -> dict[str, Any]:
    """The whole measurement; returns the result document (``mode: fleet``)."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        baseline = measure_baseline(config, manager, log) if config.baseline_s > 0 else None
        ids = [f"fleet-{i}" for i in range(config.containers)]
        log(f"fleet: {config.containers} containers ({config.policy}, max_batch {config.max_batch}), "
            f"{config.clients} robots, {config.duration_s:g} s" + (
                f", kill one at {config.kill_one_at:g} s" if config.kill_one_at is not None else ""))  # fmt: skip
        with LocalFleet(ids, container_env(config, config.max_batch), manager) as fleet:
            plan = _KillPlan(fleet, config)
            robots, t0, t1 = run_robots(
                config.clients, _url(config), fleet.store, config, config.duration_s, plan
            )
    return fleet_result(config, robots, t0, t1, plan, baseline, ids)


def _containers(
    ids: Sequence[str], robots: Sequence[Robot], plan: _KillPlan, t0: float, t1: float
) -> list[Any]:
    calls = _ok_calls(robots, t0, t1)
    out = []
    for cid in ids:
        load = (plan.published or {}).get(cid, {})
        served = sum(1 for c in calls if c[2] == cid)
        out.append({"container_id": cid, "robots": load.get("robots"), "robots_seen": plan.seen.get(cid, 0),
                    "calls": served, "calls_per_s": served / (t1 - t0), "load": load,
                    "killed": cid == plan.victim})  # fmt: skip
    return out


def fleet_result(
    config: FleetConfig,
    robots: Sequence[Robot],
    t0: float,
    t1: float,
    plan: _KillPlan,
    baseline: dict[str, Any] | None,
    ids: Sequence[str],
) -> dict[str, Any]:
    from .bench.report import environment

    calls = _ok_calls(robots, t0, t1)
    rate = len(calls) / (t1 - t0)
    containers = _containers(ids, robots, plan, t0, t1)
    fleet: dict[str, Any] = {
        "containers": containers,
        "robots": len(robots),
        "calls": len(calls),
        "calls_per_s": rate,
        "spread": spread([c["robots"] or 0 for c in containers]),
        "baseline": baseline,
        "speedup_vs_one_unbatched": rate / baseline["calls_per_s"] if baseline else None,
        **call_accounting(robots),
        "failovers": sum(r.failovers for r in robots),
        "kill": None,
        "outage_s": None,
    }
    if plan.t_kill is not None:
        pre = [c for c in calls if c[1] <= plan.t_kill]
        fleet["calls_per_s_before_kill"] = len(pre) / max(1e-9, plan.t_kill - t0)
        fleet["kill"] = {"at_s": plan.t_kill - t0, "container_id": plan.victim, "robots": len(plan.affected)}
        gaps = [outage(robots[i], plan.t_kill) for i in plan.affected]
        fleet["outage_s"] = _percentiles([g for g in gaps if g is not None])
        fleet["outage_s"]["never_served_again"] = sum(1 for g in gaps if g is None)
        others = [outage(r, plan.t_kill) for r in robots if r.index not in plan.affected]
        fleet["outage_s_unaffected"] = _percentiles([g for g in others if g is not None])
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "mode": "fleet",
        "config": asdict(config),
        "environment": environment(),
        "fleet": fleet,
    }


def render_fleet(result: dict[str, Any]) -> str:
    c, f = result["config"], result["fleet"]
    lines = [
        f"{c['clients']} robots over {c['containers']} containers ({c['policy']}, max batch {c['max_batch']}), "
        f"{c['duration_s']:g} s: {f['calls_per_s']:.1f} calls/s"
        + (
            f" = {f['speedup_vs_one_unbatched']:.2f}x one unbatched container "
            f"({f['baseline']['calls_per_s']:.1f} calls/s)"
            if f["baseline"]
            else ""
        ),  # fmt: skip
        f"robots per container (published): {[x['robots'] for x in f['containers']]}, "
        f"max deviation from the mean {f['spread']['max_dev_pct']:.0f}%",
        f"calls: {f['started']} started, {f['ok']} results, {f['typed_errors']} typed errors, "
        f"{f['lost_calls']} lost; {f['failovers']} failovers",
    ]
    if f["kill"]:
        o = f["outage_s"]
        lines.append(
            f"killed {f['kill']['container_id']} at {f['kill']['at_s']:.1f} s with {f['kill']['robots']} robots: "
            f"outage p50 {o['p50']:.2f} s, p99 {o['p99']:.2f} s, max {o['max']:.2f} s"
            if o["robots"]
            else f"killed {f['kill']['container_id']}: none of its robots was served again"
        )
    return "\n".join(lines)


@dataclass
class FleetCommand:
    """A parsed ``bench --fleet`` command line: the fleet to measure and where the results go."""

    fleet: FleetConfig
    out: str = "bench-results"
    json: bool = False
    quiet: bool = False

    def execute(self) -> int:
        """Run, write results.json / results.md, print the summary (or the JSON with ``--json``)."""
        import json
        import sys

        from .bench.report import jsonable, output_dir

        log = (lambda msg: None) if self.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
        result = run_fleet(self.fleet, log)
        out = output_dir(self.out)
        (out / "results.json").write_text(json.dumps(jsonable(result), indent=1) + "\n")
        md = f"# pi0remote fleet benchmark, {result['created']}\n\n" + render_fleet(result) + "\n"
        (out / "results.md").write_text(md)
        result["output_dir"] = str(out)
        if self.json:
            print(json.dumps(jsonable(result), indent=1))
        else:
            print(render_fleet(result))
            print(f"results: {out}/results.json, results.md")
        return 0


def fleet_command(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> FleetCommand:
    """The bench CLI's ``--fleet`` branch (bad values raise ValueError: a usage error)."""
    default = parser.get_default("policy") if parser is not None else "zeros"
    return FleetCommand(
        FleetConfig.from_args(args, default),
        out=getattr(args, "out", None) or "bench-results",
        json=bool(getattr(args, "json", False)),
        quiet=bool(getattr(args, "quiet", False)),
    )


__all__ = ["FleetCommand", "FleetConfig", "LocalFleet", "add_fleet_args", "fleet_command", "run_fleet"]
