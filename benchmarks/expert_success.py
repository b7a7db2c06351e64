"""Success rate of the scripted expert on AlohaTransferCube-v0, without rendering.

    MUJOCO_GL=egl python benchmarks/expert_success.py --episodes 50 --action-horizon 10

Runs the same loop as the harness (query the expert for a 50-step chunk, execute ``action_horizon``
steps, query again with the new step index) but calls the policy directly and renders nothing, so it
measures the expert and the environment wrapper alone.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def run_episode(env, policy, seed: int, action_horizon: int) -> tuple[bool, int, float, float]:
    """(success, steps taken, max reward, mean policy ms) for one seeded episode."""
    env.reset(seed=seed)
    env_state = env.env_state()
    policy.reset()
    max_reward, infer_ms, chunk = 0.0, [], None
    for step in range(env.max_steps):
        if step % action_horizon == 0:
            t0 = time.perf_counter()
            chunk = policy.infer({"env_state": env_state, "step": step})["action"]
            infer_ms.append((time.perf_counter() - t0) * 1000)
        _, reward, terminated, truncated, _ = env.step(chunk[step % action_horizon])
        max_reward = max(max_reward, reward)
        if terminated or truncated:
            return terminated, step + 1, max_reward, float(np.mean(infer_ms))
    return False, env.max_steps, max_reward, float(np.mean(infer_ms))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="first seed; episodes use seed, seed+1, ...")
    parser.add_argument("--action-horizon", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=400)
    args = parser.parse_args(argv)

    from pi0remote.sim.env import make_env
    from pi0remote.sim.expert import ExpertPolicy

    env, policy = make_env(render=False, max_steps=args.max_steps), ExpertPolicy()
    t0, successes, steps = time.perf_counter(), 0, []
    for seed in range(args.seed, args.seed + args.episodes):
        ok, n, max_reward, ms = run_episode(env, policy, seed, args.action_horizon)
        successes += ok
        if ok:
            steps.append(n)
        print(
            f"seed {seed:4d}  {'success' if ok else 'FAIL   '}  steps {n:3d}  max reward {max_reward:.0f}  "
            f"policy {ms:.1f} ms/call",
            flush=True,
        )
    rate = successes / args.episodes
    mean_steps = f"{np.mean(steps):.1f}" if steps else "-"
    print(
        f"\nexpert success {successes}/{args.episodes} = {rate:.0%}  (action horizon {args.action_horizon}, "
        f"mean steps to success {mean_steps}, {time.perf_counter() - t0:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
