"""Transport cost against the raw-socket floor, all in one run (the foundation's benchmark).

    python benchmarks/transports.py [--n 1000] [--warmup 50]

Serves ``zeros`` in a separate process, then measures p50 round trip of the canonical request for the
raw-socket floor (same framing, minimal server, blocking client socket) and for tcp, ws, http and
local, in interleaved rounds so every path sees the same machine noise, and prints each as a ratio to
the floor. A last row serves the same zeros through the policy thread (``sleep:0``): the cost of the
thread hand-off every real policy pays. docs/benchmarks.md records the results.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="calls per path (after warm-up)")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=10, help="interleave the paths in this many rounds")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    obs = canonical_obs(0)
    request, reply_size = canonical_sizes(obs)
    per_round = max(1, args.n // args.rounds)
    names = ("floor", "tcp", "ws", "http", "local", "tcp, policy thread")
    samples: dict[str, list[float]] = {name: [] for name in names}
    floor_proc, port = start_floor_server(reply_size)
    try:
        threaded = ["--policy", "sleep:0", "--http-port", "0", "--tcp-port", "0", "--transports", "tcp"]
        with (
            ServerProcess(["--policy", "zeros", "--http-port", "0", "--tcp-port", "0"]) as srv,
            ServerProcess(threaded) as srv2,
        ):
            clients = {s: connect(srv.url(s)) for s in ("tcp", "ws", "http")}
            clients["local"] = connect("local://zeros")
            # the same zeros reply, but handed to the policy thread and back (as every real policy is)
            clients["tcp, policy thread"] = connect(srv2.url("tcp"))
            for client in clients.values():
                for _ in range(args.warmup):
                    client.infer(obs)
            measure_floor(port, request, 0, args.warmup)
            # Interleaved rounds: every path sees the same machine noise.
            for _ in range(args.rounds):
                samples["floor"] += measure_floor(port, request, per_round, 2)
                for name, client in clients.items():
                    for _ in range(per_round):
                        t0 = time.perf_counter()
                        client.infer(obs)
                        samples[name].append(time.perf_counter() - t0)
            for client in clients.values():
                client.close()
    finally:
        floor_proc.kill()
    results = {name: statistics.median(v) * 1e6 for name, v in samples.items()}
    floor = results["floor"]
    if args.json:
        print(json.dumps({"p50_us": results, "ratio": {k: v / floor for k, v in results.items()}}, indent=2))
        return
    print(
        f"request {len(request)} B, reply {reply_size} B, {per_round * args.rounds} calls per path "
        f"in {args.rounds} interleaved rounds after {args.warmup} warm-up calls"
    )
    print(f"{'path':18} {'p50 µs':>9} {'× floor':>8} {'target':>7}")
    for name, us in results.items():
        target = TARGETS.get(name)
        mark = "" if target is None else ("ok" if us / floor <= target else "MISS")
        print(f"{name:18} {us:9.1f} {us / floor:8.2f} {'' if target is None else f'≤{target:g}':>7} {mark}")


if __name__ == "__main__":
    main()
