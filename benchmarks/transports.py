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

from pi0remote import connect
from pi0remote._malloc import tune_malloc
from pi0remote.harness.floor import compare_to_floor, print_report
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
    tune_malloc()  # this process measures latency, so it opts in as a robot loop would (docs/decisions.md)
    threaded = ["--policy", "sleep:0", "--http-port", "0", "--tcp-port", "0", "--transports", "tcp"]
    with (
        ServerProcess(["--policy", "zeros", "--http-port", "0", "--tcp-port", "0"]) as srv,
        ServerProcess(threaded) as srv2,
    ):
        clients = {s: connect(srv.url(s)) for s in ("tcp", "ws", "http")}
        clients["local"] = connect("local://zeros")
        # the same zeros reply, but handed to the policy thread and back (as every real policy is)
        clients["tcp, policy thread"] = connect(srv2.url("tcp"))
        try:
            p50, about = compare_to_floor(clients, obs, n=args.n, warmup=args.warmup, rounds=args.rounds)
        finally:
            for client in clients.values():
                client.close()
    print_report(p50, about, TARGETS, as_json=args.json)


if __name__ == "__main__":
    main()
