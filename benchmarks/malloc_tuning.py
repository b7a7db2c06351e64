"""What glibc's allocator thresholds cost a message round trip (docs/decisions.md, "malloc tuning").

python benchmarks/malloc_tuning.py [--processes 6] [--calls 3000]

Each measurement is a fresh process (the thresholds are per process and glibc adapts its own over time), so the
script alternates processes with ``_malloc.tune_malloc()`` applied and with glibc's defaults, and reports the
median µs of one ``codec.packb`` + ``codec.unpackb`` of the canonical request in each, then the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

CHILD = "child"


def child(tuned: bool, calls: int) -> float:
    if tuned:
        from pi0remote._malloc import tune_malloc

        if not tune_malloc():
            raise SystemExit("mallopt is not available here (glibc only)")
    from pi0remote import codec

    rng = np.random.default_rng(0)
    obs = {
        "cam_high": rng.integers(0, 256, (3, 224, 224), dtype=np.uint8),
        "state": rng.uniform(-1, 1, 14).astype(np.float32),
    }
    times = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        codec.unpackb(codec.packb(obs))
        times.append(time.perf_counter_ns() - t0)
    return float(np.median(times[calls // 6 :])) / 1000


def run(tuned: bool, calls: int) -> float:
    env = {**os.environ, "PI0REMOTE_MALLOC_TUNING": "1"}
    out = subprocess.run(
        [sys.executable, __file__, CHILD, str(int(tuned)), str(calls)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip())


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        print(child(sys.argv[2] == "1", int(sys.argv[3])))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=6, help="processes per setting (alternating)")
    ap.add_argument("--calls", type=int, default=3000, help="round trips per process")
    args = ap.parse_args()
    results: dict[str, list[float]] = {"defaults": [], "tuned": []}
    for _ in range(args.processes):
        results["defaults"].append(run(False, args.calls))
        results["tuned"].append(run(True, args.calls))
    med = {k: float(np.median(v)) for k, v in results.items()}
    print(
        json.dumps(
            {
                "us_per_round_trip": results,
                "median_us": med,
                "defaults_over_tuned": round(med["defaults"] / med["tuned"], 2),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
