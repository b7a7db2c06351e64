"""QUIC cost by datagram size against the raw-socket floor, all in one run.

    python benchmarks/quic_datagram_sizes.py [--n 500] [--warmup 50] [--rounds 10] [--json]

Serves ``zeros`` in a separate process with ``--quic-port 0`` (UDP and TCP on one port number, server
datagrams of 16000 bytes over UDP so the reply size is not the limit), then measures the p50 round
trip of the canonical request (uint8[3,224,224] image + state, ~150 KB) for:

* the raw-socket floor (pi0remote.harness.floor: same bytes, minimal server, blocking socket);
* ``quic://`` over loopback UDP with client datagrams of 1200 (aioquic's default, safe on any
  network), 9000 and 16000 bytes;
* ``quic+tcp://`` (QUIC datagrams framed on one TCP connection) with 16000-byte datagrams;
* ``tcp://`` for reference;

in interleaved rounds (every path sees the same machine noise), and prints each as a ratio to the
floor. Targets: quic+tcp ≤ 15, quic (16000) ≤ 25.
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


PATHS = {
    # name: (scheme, client datagram size)
    "tcp": ("tcp", None),
    "quic 1200": ("quic", 1200),
    "quic 9000": ("quic", 9000),
    "quic 16000": ("quic", 16000),
    "quic+tcp 16000": ("quic+tcp", 16000),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500, help="calls per path (after warm-up)")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=10, help="interleave the paths in this many rounds")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    obs = canonical_obs(0)
    request, reply_size = canonical_sizes(obs)
    per_round = max(1, args.n // args.rounds)
    samples: dict[str, list[float]] = {name: [] for name in ("floor", *PATHS)}
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
    floor_proc, port = start_floor_server(reply_size)
    try:
        with ServerProcess(server_args) as srv:
            fingerprint = next(
                line.rsplit("sha256:", 1)[1] for line in srv.lines if line.startswith("quic fingerprint")
            )
            clients = {}
            for name, (scheme, size) in PATHS.items():
                opts = {} if size is None else {"quic_max_datagram": size, "quic_fingerprint": fingerprint}
                clients[name] = connect(srv.url(scheme), **opts)
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
    print(f"{'path':16} {'p50 µs':>9} {'× floor':>8} {'target':>7}")
    for name, us in results.items():
        target = TARGETS.get(name)
        mark = "" if target is None else ("ok" if us / floor <= target else "MISS")
        print(f"{name:16} {us:9.1f} {us / floor:8.2f} {'' if target is None else f'≤{target:g}':>7} {mark}")


if __name__ == "__main__":
    main()
