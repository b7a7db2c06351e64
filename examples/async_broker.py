"""Hide a remote policy's latency from a 50 Hz control loop with the action-chunk broker.

Robot code calls ``broker.act(...)`` once per control tick and always gets a target back; requests for
the next chunk go out ahead of time on a background thread, late chunks are aligned to the step their
request was made at, and the overlap with the previous chunk is blended.

Run it against a server (here the scripted expert on gym-aloha, which needs ``env_state`` and
``step`` in the request; a learned policy such as π₀ would get camera images and joint positions)::

    pi0remote serve --policy expert --tcp-port 8765 &   # TCP only
    python examples/async_broker.py --url tcp://127.0.0.1:8765 --steps 250

or without a server (the policy in this process, behind the same client API)::

    python examples/async_broker.py --url local://expert

``--extra-latency 300`` adds a fixed delay to every call in this process (a stand-in for a slow
link), so the effect of ``--prefetch-at`` is visible on a fast machine. The loop paces itself on the
wall clock like a robot would; the simulator is only there to have something to drive.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np

import pi0remote
from pi0remote.broker import ActionChunkBroker

DT = 0.02  # 50 Hz


class SlowLink:
    """Wraps a client and adds ``extra_ms`` of delay to each call (the call itself runs on the broker's
    background thread, so the control loop does not wait for it)."""

    def __init__(self, client, extra_ms: float) -> None:
        self.client, self.extra_s = client, extra_ms / 1000.0

    def infer(self, obs):
        time.sleep(self.extra_s)
        reply = self.client.infer(obs)
        timing = reply.setdefault("client_timing", {})
        timing["round_trip_ms"] = timing.get("round_trip_ms", 0.0) + self.extra_s * 1000
        return reply


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="local://expert")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefetch-at", default="auto", help="N actions, or auto (recent delay in ticks + 2)")
    p.add_argument("--blend", choices=("latest", "linear"), default="linear")
    p.add_argument("--extra-latency", type=float, default=0.0, metavar="MS")
    args = p.parse_args()
    prefetch = args.prefetch_at if args.prefetch_at == "auto" else int(args.prefetch_at)

    from pi0remote.sim.env import make_env, obs_to_request

    env = make_env(render=False)
    env.reset(seed=args.seed)
    env_state = env.env_state()  # privileged: only the scripted expert uses it

    def observation(step: int):
        """What a robot would send: called only on ticks where a request goes out."""
        return obs_to_request(env.observation(pixels=False), step=step, env_state=env_state)

    with pi0remote.connect(args.url) as client:
        policy = SlowLink(client, args.extra_latency) if args.extra_latency else client
        with ActionChunkBroker(policy, prefetch_at=prefetch, blend=args.blend) as broker:
            broker.prime(observation(0))  # wait at rest for the first chunk, then start the clock
            start = time.monotonic()
            success = None
            for step in range(args.steps):
                target = broker.act(lambda s=step: observation(s), step, time.monotonic())
                if target is None:  # nothing yet (only without prime): keep the current pose
                    target = env.observation(pixels=False)["agent_pos"]
                _, reward, terminated, _, _ = env.step(target)
                if terminated and success is None:
                    success = step + 1
                # pace the loop like a robot: sleep until the next 20 ms tick
                time.sleep(max(0.0, start + (step + 1) * DT - time.monotonic()))
            delays = [a.delay_steps for a in broker.history if a.delay_steps is not None]
            print(
                f"{args.steps} ticks: {broker.fresh_ticks} fresh, {broker.stalls} holding "
                f"({broker.stalls / args.steps:.1%}); {len(broker.history)} requests, "
                f"delay {np.median(delays[1:]) if len(delays) > 1 else 0:.0f} ticks (median); "
                f"success at step {success}"
            )
    env.close()


if __name__ == "__main__":
    main()
