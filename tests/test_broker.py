"""The action-chunk broker on a fake clock: time alignment, dropping the past, prefetch threshold,
blending, warm start, and the background-thread requester. Nothing here sleeps."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from pi0remote.broker import ActionChunkBroker, SimulatedLatency, ThreadRequester, delay_steps

DT = 0.02


class StepPolicy:
    """Replies with ``chunk[i] = step + i + offset * call`` on every joint: an executed value says which
    step (and which call) it was planned for."""

    def __init__(self, chunk: int = 50, offset: float = 0.0) -> None:
        self.chunk, self.offset, self.requests = chunk, offset, []

    def infer(self, obs):
        self.requests.append(obs)
        base = obs["step"] + self.offset * (len(self.requests) - 1)
        values = base + np.arange(self.chunk, dtype=np.float64)
        return {"action": np.repeat(values[:, None], 14, axis=1)}


def drive(broker, ticks, start=0, t0=0.0):
    """Run ``ticks`` control ticks on the fake clock; returns (step, value or None, fresh, requested)."""
    out = []
    for k in range(start, start + ticks):
        action = broker.act(lambda k=k: {"step": k}, k, t0 + k * DT)
        value = None if action is None else float(action[0])
        out.append((k, value, broker.last.fresh, broker.last.requested))
    return out


def sim_broker(policy, latency, **kw):
    return ActionChunkBroker(requester=SimulatedLatency(policy, latency), **kw)


def test_delay_steps_is_ceil_of_latency_over_dt():
    assert [delay_steps(x) for x in (0.0, 0.001, 0.02, 0.021, 0.1, 0.3, 0.30001)] == [0, 1, 1, 2, 5, 15, 16]


def test_blocking_holds_while_waiting_and_aligns_by_step():
    policy = StepPolicy()
    broker = sim_broker(policy, 0.1, prefetch_at=0, horizon=10)  # 100 ms = 5 ticks
    ticks = drive(broker, 40)
    # ticks 0-4: nothing yet; 5-14: chunk[k - 0] (chunk[0:5] was in the past); 15-19 hold 14 ...
    assert [v for _, v, _, _ in ticks[:5]] == [None] * 5
    assert [v for _, v, _, _ in ticks[5:15]] == list(range(5, 15))
    assert [(v, f) for _, v, f, _ in ticks[15:20]] == [(14.0, False)] * 5
    assert [v for _, v, _, _ in ticks[20:30]] == list(range(20, 30))
    assert [k for k, _, _, r in ticks if r] == [0, 15, 30]
    assert [r["step"] for r in policy.requests] == [0, 15, 30]
    first, second = broker.history[:2]
    assert (first.delay_steps, first.dropped, first.kept) == (5, 5, 10)
    assert (second.step, second.arrived_step, second.dropped, second.overlap) == (15, 20, 5, 0)
    assert (broker.startup_ticks, broker.stalls, broker.fresh_ticks) == (5, 10, 25)


def test_zero_latency_blocking_is_the_sync_loop():
    policy = StepPolicy()
    broker = sim_broker(policy, 0.0, prefetch_at=0, horizon=10)
    ticks = drive(broker, 30)
    assert [v for _, v, _, _ in ticks] == list(range(30))
    assert all(f for _, _, f, _ in ticks)
    assert [r["step"] for r in policy.requests] == [0, 10, 20]


def test_async_prefetch_threshold_hides_latency():
    policy = StepPolicy()
    broker = sim_broker(policy, 0.1, prefetch_at=7)  # 5 ticks of delay, asks with 7 left
    broker.prime({"step": 0}, 0, 0.0)  # warm start: the first chunk is queued before tick 0
    assert broker.remaining(0) == 50
    ticks = drive(broker, 150)
    assert [v for _, v, _, _ in ticks] == list(range(150))  # every tick runs its own step's target
    assert all(f for _, _, f, _ in ticks) and broker.stalls == 0
    requested = [k for k, _, _, r in ticks if r]
    assert requested == [43, 86, 129]  # remaining <= 7: a chunk from step t lasts to t + 49
    for a in broker.history[1:]:
        assert (a.delay_steps, a.dropped, a.overlap, a.kept) == (5, 5, 2, 45)


def test_async_threshold_below_latency_stalls_for_the_difference():
    broker = sim_broker(StepPolicy(), 0.2, prefetch_at=4)  # 10 ticks of delay, 4 ticks of margin
    broker.prime({"step": 0}, 0, 0.0)
    ticks = drive(broker, 60)
    holds = [k for k, _, f, _ in ticks if not f]
    assert holds == list(range(50, 56))  # the queue ran out at step 50; the chunk came at 56
    assert [v for k, v, _, _ in ticks if k >= 56] == list(range(56, 60))


def test_auto_threshold_follows_observed_delay():
    broker = sim_broker(StepPolicy(), 0.1, prefetch_at="auto", auto_margin=2)
    assert broker.threshold() == 0
    drive(broker, 6)  # cold start: asked at 0, arrived at 5
    assert broker.history[0].delay_steps == 5 and broker.threshold() == 7


def test_linear_blend_ramps_across_the_overlap():
    policy = StepPolicy(offset=100.0)  # the second call's values are 100 higher
    broker = sim_broker(policy, 0.1, prefetch_at=8, blend="linear")
    broker.prime({"step": 0}, 0, 0.0)
    ticks = dict((k, v) for k, v, _, _ in drive(broker, 50))
    # asked at 42 (8 left), arrived at 47: steps 47-49 overlap (m = 3), weights 1/4, 2/4, 3/4
    assert broker.history[1].step == 42 and broker.history[1].overlap == 3
    for j, k in enumerate((47, 48, 49)):
        w = (j + 1) / 4
        assert ticks[k] == pytest.approx((1 - w) * k + w * (k + 100))
    assert ticks[46] == 46.0
    assert broker.act({"step": 50}, 50, 50 * DT)[0] == pytest.approx(150.0)  # after the overlap: new only


def test_latest_blend_replaces_the_overlap():
    policy = StepPolicy(offset=100.0)
    broker = sim_broker(policy, 0.1, prefetch_at=8, blend="latest")
    broker.prime({"step": 0}, 0, 0.0)
    ticks = dict((k, v) for k, v, _, _ in drive(broker, 50))
    assert [ticks[k] for k in (45, 46, 47, 48, 49)] == [45, 46, 147, 148, 149]


def test_jittered_latency_is_drawn_per_request():
    delays = iter([0.1, 0.3, 0.04])
    broker = sim_broker(StepPolicy(), lambda: next(delays), prefetch_at=0, horizon=10)
    drive(broker, 45)  # asked at 0 (arrives 5), 15 (arrives 30), 40 (arrives 42)
    assert [(a.step, a.delay_steps) for a in broker.history] == [(0, 5), (15, 15), (40, 2)]


def test_chunk_entirely_in_the_past_keeps_the_queue():
    broker = sim_broker(StepPolicy(chunk=4), 0.2, prefetch_at=0, horizon=10)  # 10 ticks > 4 actions
    ticks = drive(broker, 12)
    assert broker.history[0].kept == 0 and broker.history[0].dropped == 4
    assert all(v is None for _, v, _, _ in ticks[:10])


def test_reset_discards_a_request_in_flight():
    policy = StepPolicy()
    broker = sim_broker(policy, 0.1, prefetch_at=0, horizon=10)
    drive(broker, 2)
    broker.reset()
    ticks = drive(broker, 8)  # the old reply arrives at t = 0.1 s (tick 5) and is thrown away
    assert [v for _, v, _, _ in ticks] == [None] * 8
    assert [a.step for a in broker.history] == [5]  # asked again once the stale one was gone


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        ActionChunkBroker(StepPolicy(), blend="cubic")
    with pytest.raises(ValueError):
        ActionChunkBroker(StepPolicy(), prefetch_at=-1)
    with pytest.raises(ValueError):
        ActionChunkBroker()


class GatedPolicy(StepPolicy):
    """Blocks in ``infer`` until the test opens the gate (no sleeping: an Event)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def infer(self, obs):
        assert self.gate.wait(10)
        if obs.get("boom"):
            raise RuntimeError("policy failed")
        return super().infer(obs)


def test_thread_requester_uses_the_reply_at_the_first_tick_after_it_returned():
    policy = GatedPolicy()
    broker = ActionChunkBroker(policy, prefetch_at=0, horizon=10)
    try:
        assert isinstance(broker.requester, ThreadRequester)
        assert broker.act({"step": 0}, 0, 0.0) is None and broker.last.requested
        assert broker.act({"step": 1}, 1, 0.02) is None and broker.in_flight  # still thinking
        policy.gate.set()
        assert broker.requester.join(10)
        action = broker.act({"step": 2}, 2, 0.04)
        assert action[0] == 2.0 and broker.last.fresh  # chunk[2 - 0]: steps 0 and 1 had passed
        assert broker.history[0].dropped == 2 and broker.history[0].latency_s > 0
    finally:
        broker.close()


def test_thread_requester_reraises_the_policy_error():
    policy = GatedPolicy()
    broker = ActionChunkBroker(policy, prefetch_at=0)
    try:
        broker.act({"step": 0, "boom": True}, 0, 0.0)
        policy.gate.set()
        assert broker.requester.join(10)
        with pytest.raises(RuntimeError, match="policy failed"):
            broker.act({"step": 1}, 1, 0.02)
    finally:
        broker.close()


def test_thread_prime_blocks_until_the_first_chunk():
    policy = GatedPolicy()
    policy.gate.set()
    with ActionChunkBroker(policy, prefetch_at=5) as broker:
        broker.prime({"step": 0})
        assert broker.remaining(0) == 50 and broker.act({"step": 0}, 0)[0] == 0.0


def test_pipelined_requests_hide_a_delay_longer_than_half_a_chunk():
    # 30 ticks of delay: one request at a time runs dry; three in flight keep every tick fresh
    single = sim_broker(StepPolicy(), 0.6, prefetch_at=32)
    single.prime({"step": 0}, 0, 0.0)
    drive(single, 200)
    assert single.stalls > 0
    piped = sim_broker(StepPolicy(), 0.6, prefetch_at=32, max_in_flight=3)
    piped.prime({"step": 0}, 0, 0.0)
    ticks = drive(piped, 200)
    assert [v for _, v, _, _ in ticks] == list(range(200)) and piped.stalls == 0
    assert [k for k, _, _, r in ticks if r][:4] == [18, 36, 54, 72]  # in flight, a request covers t..t+49


def test_a_reply_overtaken_by_a_newer_one_is_discarded():
    delays = iter([0.0, 0.6, 0.1, 0.1, 0.1])
    broker = sim_broker(StepPolicy(offset=1000.0), lambda: next(delays), prefetch_at=32, max_in_flight=2)
    broker.prime({"step": 0}, 0, 0.0)
    ticks = dict((k, v) for k, v, _, _ in drive(broker, 50))
    slow, fast = broker.history[1:3]
    assert (slow.step, fast.step) == (18, 36)
    assert fast.arrived_step == 41 and slow.arrived_step == 48 and slow.superseded and slow.kept == 0
    assert ticks[40] == 40 and ticks[41] == 41 + 2000 and ticks[48] == 48 + 2000  # the third call's chunk
