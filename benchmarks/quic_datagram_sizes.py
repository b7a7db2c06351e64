"""QUIC cost by datagram size against the raw-socket floor, all in one run.

    python benchmarks/quic_datagram_sizes.py [--n 500] [--warmup 50] [--json]

Serves ``zeros`` in a separate process with ``--quic-port 0`` (UDP and TCP on one port number, server
datagrams of 16000 bytes over UDP so the reply size is not the limit), then measures the p50 round
trip of the canonical request (uint8[3,224,224] image + state, ~150 KB) for:

* the raw-socket floor (pi0remote.harness.floor: same bytes, minimal server, blocking socket);
* ``quic://`` over loopback UDP with client datagrams of 1200 (aioquic's default, safe on any
  network), 9000 and 16000 bytes;
* ``quic+tcp://`` (QUIC datagrams framed on one TCP connection) with 16000-byte datagrams;
* ``tcp://`` for reference;

and prints each as a ratio to the floor. Targets: quic+tcp ≤ 15, quic (16000) ≤ 25.
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

TARGETS = {"quic+tcp 16000": 15.0, "quic 16000": 25.0}


def measure(url: str, obs: dict, n: int, warmup: int, **options: object) -> list[float]:
    samples = []
    with connect(url, **options) as client:
        for i in range(warmup + n):
            t0 = time.perf_counter()
            client.infer(obs)
            if i >= warmup:
                samples.append(time.perf_counter() - t0)
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500)
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
    server_args = [
        "--policy",
        "zeros",
        "--http-port",
        "0",
        "--tcp-port",
        "0",
        "--transports",
        "tcp",
        "--quic-port",
        "0",
        "--quic-max-datagram",
        "16000",
    ]
    with ServerProcess(server_args) as srv:
        fingerprint = next(
            line.rsplit("sha256:", 1)[1] for line in srv.lines if line.startswith("quic fingerprint")
        )
        pin = {"quic_fingerprint": fingerprint}
        results["tcp"] = statistics.median(measure(srv.url("tcp"), obs, args.n, args.warmup)) * 1e6
        for size in (1200, 9000, 16000):
            samples = measure(srv.url("quic"), obs, args.n, args.warmup, quic_max_datagram=size, **pin)
            results[f"quic {size}"] = statistics.median(samples) * 1e6
        samples = measure(srv.url("quic+tcp"), obs, args.n, args.warmup, quic_max_datagram=16000, **pin)
        results["quic+tcp 16000"] = statistics.median(samples) * 1e6
    floor = results["floor"]
    if args.json:
        print(json.dumps({"p50_us": results, "ratio": {k: v / floor for k, v in results.items()}}, indent=2))
        return
    print(f"request {len(request)} B, reply {reply_size} B, n={args.n} after {args.warmup} warm-up calls")
    print(f"{'path':16} {'p50 µs':>9} {'× floor':>8} {'target':>7}")
    for name, us in results.items():
        target = TARGETS.get(name)
        mark = "" if target is None else ("ok" if us / floor <= target else "MISS")
        print(f"{name:16} {us:9.1f} {us / floor:8.2f} {'' if target is None else f'≤{target:g}':>7} {mark}")


if __name__ == "__main__":
    main()
