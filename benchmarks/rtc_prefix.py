"""Does real-time chunking make the next chunk continue the current one? prefix_error with and without.

    MUJOCO_GL=egl python benchmarks/rtc_prefix.py --policy flow --seeds 10 --delays 1,5,10,15,25
    python benchmarks/rtc_prefix.py --policy-url tcp://gpu-box:8765 --seeds 10     # a served flow policy

For every seed, a gym-aloha episode runs blocking (ask, execute ``--execute`` steps of the chunk, ask
again). At every request after the first, the chunk being executed has ``n = H - execute`` actions left
(the prefix). For each delay ``d`` the same observation is sent twice: with ``"rtc": {"prefix", d}``
(guided) and without (plain), each right after a policy reset (the flow policy re-seeds its noise
there, so both start from the same noise draw: a paired comparison), and both chunks are compared with the prefix on the first ``d`` steps
(``max |new[:d] - prefix[:d]|``, all 14 action dims, robot units). The yardstick is the chunk's own
step-to-step motion (``max |chunk[i+1] - chunk[i]|``). Prints a Markdown table and writes JSON
(``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np


def percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.median(a)), "p90": float(np.percentile(a, 90)), "max": float(a.max())}


def paired_reset(client: Any) -> None:
    """Re-seed the policy's noise (the flow policy's ``reset``), so the two requests of a pair share it."""
    if hasattr(client, "reset"):
        client.reset()


def measure_seed(client: Any, env: Any, seed: int, delays: list[int], execute: int, max_steps: int,
                 images: bool) -> dict[str, list[float]]:  # fmt: skip
    """Errors of guided and plain chunks against the prefix, per delay, over one blocking episode."""
    from pi0remote.harness.eval import make_request, metadata_dict

    out: dict[str, list[float]] = {"motion": []}
    for d in delays:
        out[f"guided_{d}"], out[f"plain_{d}"] = [], []
    env.reset(seed=seed)
    env_state = env.env_state() if metadata_dict(client).get("needs_env_state") else None
    if hasattr(client, "reset"):
        client.reset()
    chunk, step = None, 0
    while step < max_steps:
        obs = make_request(env, step, env_state, images)
        if chunk is not None:
            prefix = np.asarray(chunk[execute:], np.float32)
            out["motion"].append(float(np.abs(np.diff(chunk, axis=0)).max()))
            for d in delays:
                paired_reset(client)  # guided and plain start from the same noise draw
                guided = client.infer({**obs, "rtc": {"prefix": prefix, "delay_steps": d}})
                paired_reset(client)
                plain = client.infer(obs)["action"]
                out[f"guided_{d}"].append(float(guided["rtc"]["prefix_error"]))
                out[f"plain_{d}"].append(float(np.abs(plain[:d] - prefix[:d]).max()))
        chunk = np.asarray(client.infer(obs)["action"], np.float32)
        for i in range(execute):
            _, _, terminated, truncated, _ = env.step(chunk[i])
            step += 1
            if terminated or truncated or step >= max_steps:
                return out
    return out


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MUJOCO_GL", "egl")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--policy", default="flow", help="a flow policy run in process (local://NAME)")
    g.add_argument("--policy-url", default=None, help="a running server")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--delays", default="1,5,10,15,25")
    p.add_argument("--execute", type=int, default=25, help="steps executed per chunk (n = H - this)")
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--images", action="store_true", help="send cam_high (π₀)")
    p.add_argument("--out", default=None, help="write the JSON here")
    args = p.parse_args(argv)
    delays = [int(x) for x in args.delays.split(",") if x.strip()]
    from pi0remote.harness.eval import open_policy
    from pi0remote.sim.env import make_env

    client = open_policy(args.policy_url or args.policy)
    merged: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    with make_env(render=args.images, max_steps=args.max_steps) as env:
        for seed in range(args.seed, args.seed + args.seeds):
            for k, v in measure_seed(
                client, env, seed, delays, args.execute, args.max_steps, args.images
            ).items():
                merged.setdefault(k, []).extend(v)
    client.close()
    doc = {
        "policy": args.policy_url or args.policy, "seeds": [args.seed, args.seed + args.seeds - 1],
        "execute": args.execute, "prefix_len": 50 - args.execute, "requests": len(merged["motion"]),
        "motion": percentiles(merged["motion"]), "wall_s": time.perf_counter() - t0,
        "delays": {d: {"guided": percentiles(merged[f"guided_{d}"]), "plain": percentiles(merged[f"plain_{d}"])}
                   for d in delays},
    }  # fmt: skip
    m = doc["motion"]
    print(f"{doc['requests']} request points, n = {doc['prefix_len']}; chunk step-to-step motion "
          f"p50 {m['p50']:.4f}, p90 {m['p90']:.4f}, max {m['max']:.4f}\n")  # fmt: skip
    print("| d | guided prefix_error p50 / p90 / max | unguided p50 / p90 / max |\n|---|---|---|")
    for d, r in doc["delays"].items():
        gd, pl = r["guided"], r["plain"]
        print(f"| {d} | {gd['p50']:.4f} / {gd['p90']:.4f} / {gd['max']:.4f} "
              f"| {pl['p50']:.4f} / {pl['p90']:.4f} / {pl['max']:.4f} |")  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
