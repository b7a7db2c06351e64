"""Dynamic batching: concurrent requests share policy calls, each client gets its own result, failures stay isolated."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import numpy as np
import pytest

from conftest import ProbePolicy, expected_action, make_obs
from pi0remote import RemotePolicyError, connect, protocol
from pi0remote.server import BackgroundServer

pytestmark = pytest.mark.timeout(120)


class BatchProbe(ProbePolicy):
    """ProbePolicy with ``infer_batch``: 40 ms per call plus 5 ms per item; records batch sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_sizes: list[int] = []

    def infer_batch(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.batch_sizes.append(len(batch))
        if any(obs.get("raise") for obs in batch):
            raise ValueError("boom requested")
        time.sleep(0.040 + 0.005 * len(batch))
        return [{"action": expected_action(obs["state"])} for obs in batch]


def run_clients(url: str, n_clients: int, calls: int, bad: set[int] = frozenset()) -> tuple[dict, list]:
    results: dict[int, list[dict]] = {k: [] for k in range(n_clients)}
    errors: list[BaseException] = []
    barrier = threading.Barrier(n_clients)

    def worker(k: int) -> None:
        try:
            with connect(url) as client:
                barrier.wait()
                for i in range(calls):
                    obs = make_obs(k)
                    obs["state"] = np.full(14, 100 * k + i, np.float32)
                    if k in bad:
                        obs["raise"] = True
                    try:
                        reply = client.infer(obs)
                    except RemotePolicyError as exc:
                        results[k].append({"error": str(exc)})
                        continue
                    assert reply["action"][0, 0] == 100 * k + i, "a client got someone else's result"
                    results[k].append(reply)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(100)
    return results, errors


def test_concurrent_requests_are_batched_and_routed_back() -> None:
    policy = BatchProbe()
    with BackgroundServer(policy, max_batch=8, transports=["tcp"]) as srv:
        results, errors = run_clients(srv.url("tcp"), 6, 6)
    assert not errors, errors
    sizes = [r["server_timing"]["batch_size"] for rs in results.values() for r in rs]
    assert len(sizes) == 36 and max(sizes) > 1
    assert max(policy.batch_sizes) <= 8
    assert sum(policy.batch_sizes) + policy.calls == 36  # batched items + single-item calls
    assert len(policy.batch_sizes) + policy.calls < 36  # fewer policy calls than requests
    assert all(r["server_timing"]["queue_ms"] >= 0 for rs in results.values() for r in rs)


def test_lone_client_is_not_delayed_by_the_window() -> None:
    policy = BatchProbe()
    with BackgroundServer(policy, max_batch=8, batch_window_ms=200, transports=["tcp"]) as srv:
        with connect(srv.url("tcp")) as client:
            for _ in range(3):
                reply = client.infer(make_obs(0))
                assert reply["server_timing"]["batch_size"] == 1
                assert reply["server_timing"]["queue_ms"] < 50  # the 200 ms window did not apply
    assert policy.calls == 3 and policy.batch_sizes == []  # a lone request takes the single-item path


def test_a_bad_request_fails_only_itself() -> None:
    policy = BatchProbe()
    with BackgroundServer(policy, max_batch=8, transports=["tcp"]) as srv:
        results, errors = run_clients(srv.url("tcp"), 4, 5, bad={2})
    assert not errors, errors
    assert all("error" in r and "boom requested" in r["error"] for r in results[2])
    for k in (0, 1, 3):
        assert len(results[k]) == 5 and all("action" in r for r in results[k])


def test_a_client_that_disconnects_does_not_cancel_the_others() -> None:
    policy = BatchProbe()
    with BackgroundServer(policy, max_batch=8, transports=["tcp"]) as srv:
        host, port = srv.url("tcp")[len("tcp://") :].rsplit(":", 1)

        def hit_and_run() -> None:
            sock = socket.create_connection((host, int(port)))
            for kind, body in ((protocol.HELLO, protocol.hello_body(None)), (protocol.INFER, make_obs(7))):
                msg = protocol.encode_message(kind, body)
                sock.sendall(protocol.frame_header(len(msg)) + msg)
            time.sleep(0.01)
            sock.close()  # gone before its result

        leavers = [threading.Thread(target=hit_and_run) for _ in range(3)]
        for t in leavers:
            t.start()
        results, errors = run_clients(srv.url("tcp"), 3, 4)
        for t in leavers:
            t.join()
    assert not errors, errors
    assert all(len(rs) == 4 and all("action" in r for r in rs) for rs in results.values())


def test_first_come_first_batched() -> None:
    """With a batch limit of 2 and 5 waiting requests, the earliest ones go first: nobody starves."""
    policy = BatchProbe()
    order: list[float] = []
    with BackgroundServer(policy, max_batch=2, transports=["tcp"]) as srv:
        url = srv.url("tcp")
        replies: dict[int, dict] = {}

        def one(k: int) -> None:
            with connect(url) as client:
                time.sleep(0.03 * k)  # staggered arrival
                order.append(k)
                obs = make_obs(k)
                obs["state"] = np.full(14, k, np.float32)
                replies[k] = client.infer(obs)
                replies[k]["done"] = time.perf_counter()

        threads = [threading.Thread(target=one, args=(k,)) for k in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    done = [replies[k]["done"] for k in range(5)]
    assert all(replies[k]["action"][0, 0] == k for k in range(5))
    # requests finish in arrival order, batch by batch (two may finish together)
    assert all(done[i] <= done[i + 2] for i in range(3))


def test_builtin_policies_batch() -> None:
    from pi0remote.policies.builtin import SleepPolicy, ZerosPolicy

    assert len(ZerosPolicy().infer_batch([{}, {}, {}])) == 3
    policy = SleepPolicy.parse("20+5")
    t0 = time.perf_counter()
    out = policy.infer_batch([{}] * 4)
    assert len(out) == 4 and 0.039 <= time.perf_counter() - t0 < 0.2
    assert policy.metadata.name == "sleep:20+5"


def test_unnamed_callers_do_not_count_as_active_robots() -> None:
    """Callers that pass no client id (the openpi listener used to) never make a lone request wait."""
    import asyncio

    from pi0remote.server.runner import PolicyRunner

    async def main() -> list[float]:
        runner = PolicyRunner(BatchProbe(), max_batch=8, batch_window_ms=200)
        await asyncio.gather(*(runner.submit(make_obs(i)) for i in range(3)))  # a wave, then lone calls
        queued = []
        for i in range(3):
            _, timing = await runner.submit(make_obs(i))
            queued.append(timing["queue_ms"])
        runner.close()
        return queued

    assert max(asyncio.run(main())) < 50
