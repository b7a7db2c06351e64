"""Dynamic batching: the same simulated GPU served with ``--max-batch 1`` and ``--max-batch 8``, one run.

    python benchmarks/batching.py [--clients 8] [--n 60] [--policy sleep:24+8.9] [--batch-window-ms MS]

``sleep:24+8.9`` models a GPU whose batch of b costs 24 + 8.9·b ms (π₀ on an H200, roughly). N client
processes call the TCP transport in closed loops. Targets (recorded in docs/benchmarks.md, not a test):
throughput with batching ≥ 2.5 × without, and p95 latency with batching ≤ 1.6 × one batch-N call.
"""

from __future__ import annotations

import argparse
import json
import sys

from pi0remote.harness.bench import parse_config, run_clients

THROUGHPUT_TARGET = 2.5
P95_TARGET = 1.6


def measure(max_batch: int, a: argparse.Namespace) -> dict:
    argv = [
        "--clients",
        str(a.clients),
        "--n",
        str(a.n),
        "--warmup",
        str(a.warmup),
        "--policy",
        a.policy,
        "--transport",
        a.transport,
        "--max-batch",
        str(max_batch),
        "--no-progress",
    ]
    if a.batch_window_ms is not None:
        argv += ["--batch-window-ms", str(a.batch_window_ms)]
    return run_clients(parse_config(argv), lambda m: print(m, file=sys.stderr))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--n", type=int, default=60, help="measured calls per client")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--policy", default="sleep:24+8.9")
    ap.add_argument("--transport", default="tcp")
    ap.add_argument("--batch-window-ms", type=float, default=None, help="default: the server's")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    base, per = (float(x) for x in a.policy.split(":", 1)[1].split("+"))
    one_batch_ms = base + per * a.clients
    runs = {mb: measure(mb, a) for mb in (1, a.clients)}
    r1, rb = runs[1], runs[a.clients]
    ratio = rb["throughput_calls_per_s"] / r1["throughput_calls_per_s"]
    p95_ratio = rb["per_client_p95_ms"] / one_batch_ms
    summary = {
        "policy": a.policy,
        "clients": a.clients,
        "n_per_client": a.n,
        "batch_window_ms": a.batch_window_ms,
        "one_batch_ms": one_batch_ms,
        "runs": {
            str(mb): {
                "throughput_calls_per_s": r["throughput_calls_per_s"],
                "per_client_p50_ms": r["per_client_p50_ms"],
                "per_client_p95_ms": r["per_client_p95_ms"],
                "round_trip_ms": r["round_trip_ms"],
                "batch_size": r["batch_size"],
            }
            for mb, r in runs.items()
        },
        "throughput_ratio": ratio,
        "p95_over_one_batch": p95_ratio,
    }
    if a.json:
        print(json.dumps(summary, indent=1))
        return 0
    print(
        f"{a.clients} clients, policy {a.policy} (one batch of {a.clients}: {one_batch_ms:.1f} ms), "
        f"{a.n} calls per client, transport {a.transport}, batch window "
        f"{'server default' if a.batch_window_ms is None else f'{a.batch_window_ms:g} ms'}"
    )
    print(
        f"{'max batch':>9} {'calls/s':>8} {'mean batch':>10} {'p50 ms':>8} {'p95 ms':>8}   (per-client medians)"
    )
    for mb, r in runs.items():
        print(
            f"{mb:>9} {r['throughput_calls_per_s']:8.1f} {r['batch_size']['mean']:10.2f} "
            f"{r['per_client_p50_ms']:8.1f} {r['per_client_p95_ms']:8.1f}"
        )
    ok1 = "ok" if ratio >= THROUGHPUT_TARGET else "MISS"
    ok2 = "ok" if p95_ratio <= P95_TARGET else "MISS"
    print(f"throughput ratio {ratio:.2f} (target ≥ {THROUGHPUT_TARGET}) {ok1}")
    print(f"p95 / one batch-{a.clients} call {p95_ratio:.2f} (target ≤ {P95_TARGET}) {ok2}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
