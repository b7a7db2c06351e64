"""Transport cost against the raw-socket floor, all in one run (the foundation's benchmark).

    python benchmarks/transports.py [--n 1000] [--warmup 50]

Serves ``zeros`` in a separate process, then measures p50 round trip of the canonical request for the
raw-socket floor (same framing, minimal server, blocking client socket) and for tcp, ws, http and
local, and prints each as a ratio to the floor. docs/benchmarks.md records the results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from pi0remote import connect
from pi0remote.harness.floor import canonical_sizes, measure_floor, start_floor_server
from pi0remote.harness.obs import canonical_obs
from pi0remote.harness.procs import ServerProcess

TARGETS = {"tcp": 1.25, "ws": 3.0, "http": 6.0, "local": 0.5}


def measure_client(url: str, obs: dict, n: int, warmup: int) -> list[float]:
    samples = []
    with connect(url) as client:
        for i in range(warmup + n):
            t0 = time.perf_counter()
            client.infer(obs)
            if i >= warmup:
                samples.append(time.perf_counter() - t0)
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    obs = canonical_obs(0)
    request, reply_size = canonical_sizes(obs)
    results: dict[str, float] = {}
    floor_proc, port = start_floor_server(reply_size)
    try:
        results["floor"] = statistics.median(measure_floor(port, request, args.n, args.warmup)) * 1e6
    finally:
        floor_proc.kill()
    with ServerProcess(["--policy", "zeros", "--http-port", "0", "--tcp-port", "0"]) as srv:
        for scheme in ("tcp", "ws", "http"):
            results[scheme] = (
                statistics.median(measure_client(srv.url(scheme), obs, args.n, args.warmup)) * 1e6
            )
    results["local"] = statistics.median(measure_client("local://zeros", obs, args.n, args.warmup)) * 1e6
    floor = results["floor"]
    if args.json:
        print(json.dumps({"p50_us": results, "ratio": {k: v / floor for k, v in results.items()}}, indent=2))
        return
    print(f"request {len(request)} B, reply {reply_size} B, n={args.n} after {args.warmup} warm-up calls")
    print(f"{'path':8} {'p50 µs':>9} {'× floor':>8} {'target':>7}")
    for name, us in results.items():
        target = TARGETS.get(name)
        mark = "" if target is None else ("ok" if us / floor <= target else "MISS")
        print(f"{name:8} {us:9.1f} {us / floor:8.2f} {'' if target is None else f'≤{target:g}':>7} {mark}")


if __name__ == "__main__":
    main()
