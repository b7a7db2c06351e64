"""A fleet of containers: published load, the resolver's choice, failover, rebalancing, the control loop.

* The control loop's decision (``pi0remote.scaling``) is a pure function: tested on loads given here.
* The resolver chooses among entries of a dict store the test controls; failover runs real containers
  (``deploy.start_container``, real servers on loopback) behind that store, which the test edits.
* ``python -m pi0remote.bench --fleet`` runs end to end (container processes, a manager dict, a kill).
* The Modal app's autoscaler settings and its scheduled control loop are read back from Modal's objects.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import random
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest

from conftest import ProbePolicy, expected_action, make_obs
from pi0remote import ConnectError, connect, deploy
from pi0remote.client import modal as modal_client
from pi0remote.errors import RemotePolicyError
from pi0remote.scaling import ScalingPolicy, autoscale_once, decide, live_loads
from pi0remote.server.stats import LoadStats

pytestmark = pytest.mark.timeout(120)

TOKEN = "fleet-test-token"
HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")


# --------------------------------------------------------------------------------------------------------------
# the control loop's decision


@pytest.mark.parametrize(
    ("robots", "previous", "expected"),
    [
        ([], None, (1, 0)),  # nobody connected: the floor, no buffer
        ([3], None, (2, 1)),  # one container's worth plus one spare
        ([8, 8], None, (3, 1)),  # 16 robots, 8 per container: two plus a spare
        ([8, 8, 1], None, (4, 1)),  # 17 robots need three
        ([7, 6], 4, (4, 1)),  # 13 robots after 17 would fill 2 containers 81%: not yet down
        ([5, 4], 4, (3, 1)),  # 9 robots would fill them 56%: down to 2 plus the spare
        ([3, 2], 4, (2, 1)),  # 5 robots: ceil(5 / 6) + 1 = 2
        ([40], None, (5, 0)),  # 6 needed, capped at the maximum of 5: no room for a buffer
    ],
)
def test_scaling_decision(robots: list[int], previous: int | None, expected: tuple[int, int]) -> None:
    policy = ScalingPolicy(robots_per_container=8, floor=1, max_containers=5, spare=1, buffer_containers=1)
    loads = [{"robots": r, "capacity": 8} for r in robots]
    d = decide(loads, policy, previous)
    assert (d.min_containers, d.buffer_containers) == expected
    assert d.robots == sum(robots) and d.containers == len(robots)
    assert d.capped == (sum(robots) > 32)


def test_scaling_decision_follows_robots_up_and_down_without_flapping() -> None:
    policy = ScalingPolicy(robots_per_container=4, floor=0, spare=0)
    previous = None
    path = []
    for robots in (0, 1, 4, 5, 9, 8, 7, 6, 5, 3, 0):
        previous = decide([{"robots": robots}], policy, previous).min_containers
        path.append(previous)
    # up at once; down only once the robots would fill at most 75% of the smaller fleet (6 of 8 for 2)
    assert path == [0, 1, 1, 2, 3, 3, 3, 2, 2, 1, 0]
    with pytest.raises(ValueError):
        ScalingPolicy(robots_per_container=0)
    # robots_per_container comes from PI0REMOTE_ROBOTS_PER_CONTAINER, the floor and cap from the deploy knobs
    cfg = deploy.DeployConfig.from_env(
        {
            "PI0REMOTE_ROBOTS_PER_CONTAINER": "6",
            "PI0REMOTE_MIN_CONTAINERS": "2",
            "PI0REMOTE_MAX_CONTAINERS": "9",
        }
    )
    assert cfg.scaling_policy() == ScalingPolicy(robots_per_container=6, floor=2, max_containers=9, spare=1)


def test_autoscale_once_reads_the_store_and_sets_the_autoscaler_on_change() -> None:
    now = time.time()
    store: dict[str, Any] = {
        "a": {"heartbeat": now, "load": {"robots": 7, "capacity": 8}},
        "b": {"heartbeat": now - 1, "load": {"robots": 6, "capacity": 8}},
        "dead": {"heartbeat": now - 3600, "load": {"robots": 50}},  # stale: not counted
        "junk": "not an entry",
    }
    calls: list[dict[str, int]] = []
    state: dict[str, Any] = {}
    policy = ScalingPolicy(robots_per_container=8, spare=1)
    assert sorted(x["robots"] for x in live_loads(store, max_age_s=60, now=now)) == [6, 7]
    d = autoscale_once(store, lambda **kw: calls.append(kw), policy, state)
    assert calls == [{"min_containers": 3, "buffer_containers": 0}] and d.robots == 13
    autoscale_once(store, lambda **kw: calls.append(kw), policy, state)
    assert len(calls) == 1  # same decision: Modal is not called again
    store["c"] = {"heartbeat": now, "load": {"robots": 8}}
    autoscale_once(store, lambda **kw: calls.append(kw), policy, state)
    assert calls[-1] == {"min_containers": 4, "buffer_containers": 0} and state["decision"]["robots"] == 21


# --------------------------------------------------------------------------------------------------------------
# the published load


def test_load_stats_counts_sessions_calls_batches_and_waits() -> None:
    stats = LoadStats(window_s=2.0)
    changes = []
    stats.on_change.append(lambda: changes.append(stats.robots))
    a, b = object(), object()
    stats.session_opened(a)
    stats.session_opened(b)
    stats.session_opened(a)  # the same session twice is one robot
    stats.session_closed(b)
    stats.session_closed(b)
    assert changes == [1, 2, 1] and stats.robots == 1
    t = time.monotonic()
    stats.record([1.0, 3.0, 5.0], now=t)
    stats.record([7.0], now=t + 0.5)
    snap = stats.snapshot(now=t + 1.0)
    assert snap["robots"] == 1 and snap["mean_batch"] == 2.0 and snap["queue_wait_p50_ms"] == 5.0
    assert snap["calls_per_s"] == pytest.approx(4 / 1.0, rel=0.2)
    assert stats.snapshot(now=t + 10)["calls_per_s"] == 0.0  # out of the window


def test_load_stats_counts_inline_calls_with_the_waited_ones() -> None:
    stats = LoadStats(window_s=2.0)
    for _ in range(3):
        stats.record_idle()  # an inline policy's calls: no queue wait
    stats.record([4.0, 6.0])
    snap = stats.snapshot()
    assert stats.total_calls == 5 and snap["mean_batch"] == 5 / 4
    assert snap["queue_wait_p50_ms"] == 0.0  # three of the five calls did not wait
    stats.record([8.0, 9.0, 7.0])
    assert stats.snapshot()["queue_wait_p50_ms"] == 6.0  # 0 0 0 4 6 7 8 9: the upper median
    t = time.monotonic()
    stats.record([1.0], now=t + 10)  # much later: everything before has left the window
    later = stats.snapshot(now=t + 10.5)
    assert later["mean_batch"] == 1.0 and later["queue_wait_p50_ms"] == 1.0 and stats.total_calls == 9
    assert stats.snapshot(now=t + 20) == {
        **later,
        "calls_per_s": 0.0,
        "mean_batch": 0.0,
        "queue_wait_p50_ms": 0.0,
    }


class FakeTunnel:
    def __init__(self, port: int) -> None:
        self.tcp_socket = ("127.0.0.1", port)


def local_forward(port: int) -> Any:
    return contextlib.nullcontext(FakeTunnel(port))


class BatchProbe(ProbePolicy):
    """The probe with a batch entry point, so a container's batch capacity is its max_batch."""

    def infer_batch(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [self.infer(obs) for obs in batch]


def start(store: Any, cid: str, *, heartbeat_s: float = 0.1, max_batch: int = 4, policy: Any = None) -> Any:
    return deploy.start_container(
        policy or BatchProbe(),
        store=store,
        forward=local_forward,
        token=TOKEN,
        container_id=cid,
        host="127.0.0.1",
        tcp_port=0,
        portals=("tcp",),
        heartbeat_s=heartbeat_s,
        server_options={"max_batch": max_batch},
    )


def wait_for(predicate: Any, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_container_publishes_its_load_with_the_heartbeat() -> None:
    store: dict[str, Any] = {}
    with start(store, "ta-load", max_batch=4) as container:
        load = store["ta-load"]["load"]
        assert load == {**load, "robots": 0, "capacity": 4, "ready": True}
        with connect("modal://pi0remote/tcp?failover_s=0", modal_store=store, token=TOKEN) as client:
            wait_for(lambda: store["ta-load"]["load"]["robots"] == 1, what="robot counted")
            for i in range(5):
                client.infer(make_obs(i))
            wait_for(lambda: store["ta-load"]["load"]["calls_per_s"] > 0, what="calls published")
            load = store["ta-load"]["load"]
            assert load["mean_batch"] == 1.0 and load["queue_wait_p50_ms"] >= 0.0
        wait_for(lambda: store["ta-load"]["load"]["robots"] == 0, what="robot gone")
        assert container.load()["robots"] == 0
    assert store == {}


# --------------------------------------------------------------------------------------------------------------
# the resolver's choice


def _entry(cid: str, robots: int, capacity: int = 8, ready: bool = True, age: float = 0.0) -> dict[str, Any]:
    now = time.time()
    return {
        "container_id": cid,
        "started_at": now - 100,
        "heartbeat": now - age,
        "heartbeat_s": 5.0,
        "portals": {"tcp": f"{cid}.host:1"},
        "load": {"robots": robots, "capacity": capacity, "ready": ready},
    }


def test_power_of_two_choices_prefers_the_less_loaded() -> None:
    entries = [_entry("a", 0), _entry("b", 0), _entry("c", 8), _entry("d", 8)]
    rng = random.Random(7)
    picks = [modal_client.choose_entry(entries, rng)["container_id"] for _ in range(3000)]
    loaded = sum(p in ("c", "d") for p in picks) / len(picks)
    assert 0.12 < loaded < 0.22  # only when both sampled are loaded: 1/6
    # capacity counts: 6 robots on capacity 8 is lighter than 2 on capacity 1
    assert (
        modal_client.choose_entry([_entry("big", 6, 8), _entry("small", 2, 1)], rng)["container_id"] == "big"
    )


def test_clients_arriving_together_spread_within_a_quarter_of_the_mean() -> None:
    store = {c: _entry(c, 0) for c in "abcd"}
    rng = random.Random(3)
    for _ in range(32):  # each new robot is counted before the next one resolves
        target, _, entry = modal_client.resolve_modal_entry("modal://app/tcp", store, rng=rng)
        assert target == f"tcp://{entry['container_id']}.host:1"
        store[entry["container_id"]]["load"]["robots"] += 1
    counts = [e["load"]["robots"] for e in store.values()]
    assert sum(counts) == 32 and all(6 <= c <= 10 for c in counts), counts


def test_resolver_skips_unready_stale_and_excluded_and_honours_pin() -> None:
    store = {
        "warming": _entry("warming", 0, ready=False),
        "stale": _entry("stale", 0, age=120),
        "busy": _entry("busy", 7),
        "idle": _entry("idle", 1),
    }
    url = "modal://app/tcp"
    for _ in range(10):
        assert modal_client.resolve_modal_entry(url, store)[2]["container_id"] in ("busy", "idle")
    assert modal_client.resolve_modal_entry(url, store, exclude=["idle"])[2]["container_id"] == "busy"
    # everything excluded: the excluded ones are still tried rather than nothing
    assert modal_client.resolve_modal_entry(url, store, exclude=["idle", "busy"])[2] is not None
    assert modal_client.resolve_modal_url(url + "?pin=busy", store)[0] == "tcp://busy.host:1"
    with pytest.raises(ConnectError, match="pin"):
        modal_client.resolve_modal_url(url + "?pin=stale", store)
    with pytest.raises(ConnectError, match="ready"):
        modal_client.resolve_modal_url(url, {"w": _entry("w", 0, ready=False)})


def test_malformed_entries_are_never_chosen_and_garbage_loads_count_as_none() -> None:
    now = time.time()
    store: dict[str, Any] = {
        "good": _entry("good", 3),
        "portals-list": {**_entry("x", 0), "portals": ["tcp"]},
        "portal-number": {**_entry("y", 0), "portals": {"tcp": 12}},
        "nan-beat": {**_entry("z", 0), "heartbeat": float("nan")},
        "bool-beat": {**_entry("w", 0), "heartbeat": True},
        "string": "junk",
        "liar": {**_entry("liar", 0), "load": {"robots": -50, "capacity": float("inf"), "ready": True}},
        "garbage-load": {**_entry("g", 0), "load": {"robots": "many", "capacity": None}},
    }
    live = {e["container_id"] for e in modal_client.live_entries(store, "tcp", max_age_s=60, now=now)}
    assert live == {"good", "liar", "g"}
    liar, garbage = store["liar"], store["garbage-load"]
    assert modal_client.load_ratio(liar) == 0.0 and modal_client.load_ratio(garbage) == 0.0
    for _ in range(20):
        target, _, _ = modal_client.resolve_modal_entry("modal://app/tcp", store)
        assert target in ("tcp://good.host:1", "tcp://liar.host:1", "tcp://g.host:1")
    loads = [{"robots": float("inf")}, {"robots": "x"}, {"robots": -3}, {"robots": 2}]
    assert decide(loads, ScalingPolicy(robots_per_container=8)).robots == 2


def test_rebalance_moves_only_the_excess_towards_room() -> None:
    entries = [_entry("full", 10), _entry("a", 8), _entry("b", 8), _entry("low", 6)]
    rng = random.Random(1)
    moves = [modal_client.rebalance_target(entries, "full", rng) for _ in range(2000)]
    assert set(moves) == {None, "low"}
    assert 0.15 < moves.count("low") / len(moves) < 0.25  # excess 2 of 10 robots
    assert modal_client.rebalance_target(entries, "a", rng) is None  # at its fair share
    assert modal_client.rebalance_target(entries, "low", rng) is None
    assert modal_client.rebalance_target([_entry("x", 9), _entry("y", 8)], "x", rng) is None  # no room
    assert modal_client.rebalance_target([_entry("only", 30)], "only", rng) is None


# --------------------------------------------------------------------------------------------------------------
# failover, real containers behind a store the test edits


def _kill(container: Any) -> None:
    """Die without unpublishing: no more heartbeats, the server and its connections gone, the entry left."""
    if container.heartbeat is not None:
        container.heartbeat.stop()
    container.server_thread.stop()


def test_failover_when_the_container_dies_without_unpublishing() -> None:
    store: dict[str, Any] = {}
    a, b = start(store, "ta-a"), start(store, "ta-b")
    try:
        url = "modal://pi0remote/tcp?failover_s=5&watch_s=0.05&rebalance=0"
        with connect(url, modal_store=store, token=TOKEN) as client:
            first = client.container_id
            obs = make_obs(1)
            np.testing.assert_array_equal(client.infer(obs)["action"], expected_action(obs["state"]))
            victim, other = (a, "ta-b") if first == "ta-a" else (b, "ta-a")
            _kill(victim)
            assert first in store  # still published, not yet stale
            reply = client.infer(obs)  # lands on the other container, no error
            np.testing.assert_array_equal(reply["action"], expected_action(obs["state"]))
            assert client.container_id == other and client.metadata["deployment"]["container_id"] == other
            assert client.failovers == 1
            # a failure the server answered is the caller's, never retried elsewhere
            with pytest.raises(RemotePolicyError):
                client.infer(make_obs(2, **{"raise": np.ones(1, np.float32)}))
            assert client.container_id == other and client.failovers == 1
    finally:
        a.close()
        b.close()


def test_async_client_fails_over_too() -> None:
    import asyncio

    from pi0remote import aconnect

    store: dict[str, Any] = {}
    a, b = start(store, "ta-a"), start(store, "ta-b")

    async def main() -> None:
        url = "modal://pi0remote/tcp?failover_s=5&watch_s=0.05"
        async with await aconnect(url, modal_store=store, token=TOKEN) as client:
            first = client.container_id
            obs = make_obs(5)
            np.testing.assert_array_equal((await client.infer(obs))["action"], expected_action(obs["state"]))
            _kill(a if first == "ta-a" else b)
            reply = await client.infer(obs)
            np.testing.assert_array_equal(reply["action"], expected_action(obs["state"]))
            assert client.container_id != first and client.failovers == 1

    try:
        asyncio.run(main())
    finally:
        a.close()
        b.close()


def test_client_moves_when_its_container_stops_heartbeating() -> None:
    store: dict[str, Any] = {}
    a, b = start(store, "ta-a"), start(store, "ta-b")
    try:
        url = "modal://pi0remote/tcp?pin=ta-a&failover_s=5&watch_s=0.05"
        with connect(url.replace("pin=ta-a&", ""), modal_store=store, token=TOKEN) as client:
            first = client.container_id
            (a if first == "ta-a" else b).heartbeat.stop()  # alive and serving, but silent
            wait_for(lambda: client._moved is not None, what="the watcher noticing")
            client.infer(make_obs(3))
            assert client.container_id != first and client.failovers == 0
        with connect(url, modal_store=store, token=TOKEN) as pinned:  # pin= never moves
            assert pinned.container_id == "ta-a" and not pinned.rebalance
    finally:
        a.close()
        b.close()


def test_a_draining_container_loses_its_robots_without_a_failed_call() -> None:
    """Scale-down: the exit handler unpublishes, the robots' watchers move them, then the server closes."""
    import threading

    store: dict[str, Any] = {}
    a, b = start(store, "ta-a"), start(store, "ta-b")
    try:
        with connect(
            "modal://pi0remote/tcp?watch_s=0.05&rebalance=0", modal_store=store, token=TOKEN
        ) as client:
            victim = a if client.container_id == a.container_id else b
            closer = threading.Thread(target=victim.close, kwargs={"drain_s": 5.0})
            t0 = time.monotonic()
            closer.start()
            while closer.is_alive():
                client.infer(make_obs(0))  # never raises: the move happens between calls
            assert time.monotonic() - t0 < 4.0  # the robot left, so the drain ended early
            assert client.container_id != victim.container_id and client.failovers == 0
    finally:
        a.close()
        b.close()


def test_every_container_gone_is_a_typed_error_within_the_bound() -> None:
    store: dict[str, Any] = {}
    a = start(store, "ta-a")
    client = connect("modal://pi0remote/tcp?failover_s=0.5&watch_s=0.05", modal_store=store, token=TOKEN)
    try:
        client.infer(make_obs(0))
        _kill(a)
        t0 = time.monotonic()
        with pytest.raises(ConnectError, match="failover_s=0.5"):
            client.infer(make_obs(0))
        assert time.monotonic() - t0 < 3.0
        # a container coming up again serves the same client
        with start(store, "ta-new"):
            client.infer(make_obs(0))
            assert client.container_id == "ta-new"
    finally:
        client.close()
        a.close()


def test_first_connect_fails_fast_on_an_empty_store_and_skips_a_dead_entry() -> None:
    t0 = time.monotonic()
    with pytest.raises(ConnectError, match="no container has published"):
        connect("modal://pi0remote/tcp?failover_s=10", modal_store={}, token=TOKEN)
    assert time.monotonic() - t0 < 2.0  # nothing to wait for: the failover bound is for a running client
    store: dict[str, Any] = {}
    with start(store, "ta-live", heartbeat_s=0):
        dead = start(store, "ta-dead", heartbeat_s=0)
        _kill(dead)  # its entry stays, its port refuses
        for _ in range(4):  # whichever the resolver picks first, the client ends up on the live one
            with connect("modal://pi0remote/tcp?watch_s=0", modal_store=store, token=TOKEN) as client:
                assert client.container_id == "ta-live"
                client.infer(make_obs(0))
        dead.close()


def test_rebalancing_moves_robots_to_a_new_container() -> None:
    store: dict[str, Any] = {}
    a = start(store, "ta-a", max_batch=2)
    clients = []
    try:
        for _ in range(4):
            clients.append(connect("modal://pi0remote/tcp?watch_s=0.05", modal_store=store, token=TOKEN))
        wait_for(lambda: store["ta-a"]["load"]["robots"] == 4, what="four robots on the only container")
        with start(store, "ta-b", max_batch=2):  # the autoscaler brought another one up

            def balanced() -> bool:
                for c in clients:
                    c.infer(make_obs(0))  # moves happen between calls
                return sorted(c.container_id for c in clients) == ["ta-a", "ta-a", "ta-b", "ta-b"]

            wait_for(balanced, timeout=10, what="two robots on each")
    finally:
        for c in clients:
            c.close()
        a.close()


# --------------------------------------------------------------------------------------------------------------
# the local fleet, end to end through the bench CLI


def test_bench_fleet_end_to_end_with_a_kill(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PI0REMOTE_", "MODAL_"))}
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "pi0remote.bench", "--fleet", "2", "--clients", "4", "--fleet-duration", "4",
           "--kill-one-at", "2.5", "--baseline-s", "0.5", "--json", "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fleet = json.loads(proc.stdout)["fleet"]
    containers = fleet["containers"]
    assert [c["container_id"] for c in containers] == ["fleet-0", "fleet-1"]
    assert sum(c["robots"] for c in containers) == 4 and all(c["calls"] > 0 for c in containers)
    assert fleet["kill"]["robots"] >= 1 and sum(c["killed"] for c in containers) == 1
    assert fleet["lost_calls"] == 0 and fleet["ok"] == fleet["started"] > 0
    assert fleet["outage_s"]["robots"] == fleet["kill"]["robots"]
    assert fleet["outage_s"]["never_served_again"] == 0 and fleet["outage_s"]["p99"] < 3.0
    assert fleet["calls_per_s"] > 0 and fleet["baseline"]["calls_per_s"] > 0
    assert any(tmp_path.glob("*/results.json"))


def test_bench_clients_through_a_modal_url(tmp_path) -> None:
    """``bench --clients N --url modal://…``: every client process resolves through the (stand-in) Dict."""
    import multiprocessing as mp
    from multiprocessing.managers import BaseManager, DictProxy

    shared: dict[str, Any] = {}

    class StoreManager(BaseManager):
        pass

    StoreManager.register("store", callable=lambda: shared, proxytype=DictProxy)
    manager = StoreManager(address=("127.0.0.1", 0), authkey=b"fleet-test", ctx=mp.get_context("fork"))
    manager.start()
    try:
        store = manager.store()
        with start(store, "ta-a"), start(store, "ta-b"):
            host, port = manager.address
            env = {k: v for k, v in os.environ.items() if not k.startswith(("PI0REMOTE_", "MODAL_"))}
            fake = os.path.join(HERE, "fake_modal_dict")
            env.update(
                PYTHONPATH=os.pathsep.join([fake, SRC, env.get("PYTHONPATH", "")]),
                FAKE_MODAL_DICT=f"{host}:{port}:{b'fleet-test'.hex()}",
                PI0REMOTE_TOKEN=TOKEN,
            )
            cmd = [sys.executable, "-m", "pi0remote.bench", "--clients", "4", "--url", "modal://pi0remote/tcp",
                   "--n", "10", "--warmup", "1", "--json", "--no-progress", "--out", str(tmp_path)]  # fmt: skip
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=110)
            assert proc.returncode == 0, proc.stderr[-3000:]
            result = json.loads(proc.stdout)
            assert result["mode"] == "clients" and len(result["per_client"]) == 4
            assert all(c["n"] == 10 for c in result["per_client"])
            served = [store[c]["load"]["calls_per_s"] for c in ("ta-a", "ta-b")]
            assert max(served) > 0  # the calls went to the containers the Dict names
    finally:
        manager.shutdown()


# --------------------------------------------------------------------------------------------------------------
# the Modal app, read back through Modal's own objects


def _closure(obj: Any) -> dict[str, Any]:
    from modal._utils.async_utils import synchronizer

    return inspect.getclosurevars(synchronizer._translate_in(obj)._load).nonlocals


def test_app_autoscaler_settings_and_control_loop() -> None:
    modal = pytest.importorskip("modal")
    from modal._utils.async_utils import synchronizer

    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("PI0REMOTE_")}
    try:
        import pi0remote.modal_app as m
    finally:
        os.environ.update(saved)
    c = _closure(synchronizer._translate_in(m.Pi0Server)._class_service_function)
    assert (c["min_containers"], c["buffer_containers"], c["max_containers"]) == (1, 0, None)
    assert isinstance(m.autoscale, modal.Function)
    f = _closure(m.autoscale)
    assert f["gpu"] is None and f["timeout"] <= 300
    assert "seconds: 60" in str(synchronizer._translate_in(f["schedule"]).proto_message)
    image = f["image"]  # the light image: no openpi in the control loop
    assert image is synchronizer._translate_in(m.control_image)
    assert image is not synchronizer._translate_in(m.image)


def test_control_round_sets_the_class_autoscaler(monkeypatch) -> None:
    """The scheduled function's body, with Modal's Dict and Cls lookups as the only stand-ins."""
    modal = pytest.importorskip("modal")
    import pi0remote.modal_app as m

    now = time.time()
    dicts: dict[str, dict[str, Any]] = {
        "pi0remote-endpoints": {
            "a": {"heartbeat": now, "load": {"robots": 8, "capacity": 8}},
            "b": {"heartbeat": now, "load": {"robots": 3, "capacity": 8}},
        }
    }
    calls: list[tuple[str, str, dict[str, Any]]] = []

    class FakeCls:
        def __init__(self, app: str, name: str) -> None:
            self.key = (app, name)

        def __call__(self) -> Any:
            return self

        def update_autoscaler(self, **settings: Any) -> None:
            calls.append((*self.key, settings))

    monkeypatch.setattr(modal.Dict, "from_name", lambda name, **kw: dicts.setdefault(name, {}))
    monkeypatch.setattr(modal.Cls, "from_name", lambda app, name, **kw: FakeCls(app, name))
    for key in [k for k in os.environ if k.startswith("PI0REMOTE_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PI0REMOTE_ROBOTS_PER_CONTAINER", "4")
    out = m.control_round()
    assert out["robots"] == 11 and out["min_containers"] == 4  # ceil(11 / 4) + one spare
    assert calls == [("pi0remote", "Pi0Server", {"min_containers": 4, "buffer_containers": 0})]
    assert dicts["pi0remote-scaling"]["decision"]["min_containers"] == 4
    m.control_round()
    assert len(calls) == 1  # unchanged: Modal is not called again


def test_app_autoscaler_environment_overrides(tmp_path) -> None:
    pytest.importorskip("modal")
    code = (
        "import json, inspect\n"
        "import pi0remote.modal_app as m\n"
        "from modal._utils.async_utils import synchronizer\n"
        "svc = synchronizer._translate_in(m.Pi0Server)._class_service_function\n"
        "c = inspect.getclosurevars(svc._load).nonlocals\n"
        "print(json.dumps({'buffer': c['buffer_containers'], 'max': c['max_containers'],\n"
        "  'control_loop': type(m.autoscale).__name__, 'per': m.CONFIG.scaling_policy().robots_per_container}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PI0REMOTE_", "MODAL_"))}
    env.update(
        PYTHONPATH=SRC + os.pathsep + env.get("PYTHONPATH", ""),
        HOME=str(tmp_path),
        MODAL_CONFIG_PATH=str(tmp_path / "absent.toml"),
        MODAL_SERVER_URL="http://127.0.0.1:9",
        PI0REMOTE_BUFFER_CONTAINERS="2",
        PI0REMOTE_MAX_CONTAINERS="6",
        PI0REMOTE_ROBOTS_PER_CONTAINER="4",
        PI0REMOTE_AUTOSCALE_S="0",
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {
        "buffer": 2,
        "max": 6,
        "control_loop": "function",
        "per": 4,
    }  # AUTOSCALE_S=0: not scheduled
