"""Server cost of two source trees, side by side: one client, two servers, interleaved rounds.

    python benchmarks/server_swap.py OLD_SRC NEW_SRC [--rounds 12] [--n 150]

Starts ``python -m pi0remote.serve --policy zeros`` once from each tree (``PYTHONPATH=OLD_SRC`` and
``NEW_SRC``, e.g. a ``git worktree`` of an older commit and ``src``), connects this process's client to
both, and times the canonical request over tcp, ws and http in interleaved rounds, so both servers see
the same machine noise. The difference of the medians is what the newer server costs per call.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from pi0remote import connect
from pi0remote._malloc import tune_malloc
from pi0remote.harness.obs import canonical_obs

SCHEMES = ("tcp", "ws", "http")


def start(src: str) -> tuple[subprocess.Popen, dict[str, str]]:
    args = ["--policy", "zeros", "--http-port", "0", "--tcp-port", "0", "--transports", "http,ws,tcp"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pi0remote.serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.path.abspath(src)),
    )
    urls: dict[str, str] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.strip()
        if line.startswith("listening "):
            url = line.split()[1]
            urls[url.split(":", 1)[0]] = url
        if line == "ready":
            break
    return proc, urls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old_src")
    ap.add_argument("new_src")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--n", type=int, default=150, help="calls per path per round")
    args = ap.parse_args()
    tune_malloc()
    obs = canonical_obs(0)
    servers = {"old": start(args.old_src), "new": start(args.new_src)}
    try:
        clients = {(t, s): connect(servers[t][1][s]) for t in servers for s in SCHEMES}
        for client in clients.values():
            for _ in range(100):
                client.infer(obs)
        samples: dict[tuple[str, str], list[float]] = {k: [] for k in clients}
        for _ in range(args.rounds):
            for key, client in clients.items():
                for _ in range(args.n):
                    t0 = time.perf_counter()
                    client.infer(obs)
                    samples[key].append(time.perf_counter() - t0)
        for s in SCHEMES:
            old = statistics.median(samples[("old", s)]) * 1e6
            new = statistics.median(samples[("new", s)]) * 1e6
            print(f"{s:5s} old server {old:6.0f} µs  new server {new:6.0f} µs  ({new - old:+.0f} µs)")
    finally:
        for proc, _ in servers.values():
            proc.terminate()


if __name__ == "__main__":
    main()
