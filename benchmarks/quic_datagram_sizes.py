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

from pi0remote import connect
from pi0remote.harness.floor import compare_to_floor, print_report
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
    server_args = ["--policy", "zeros", "--tcp-port", "0", "--transports", "tcp,quic,quic+tcp"]
    server_args += ["--quic-port", "0", "--quic-max-datagram", "16000"]
    with ServerProcess(server_args) as srv:
        fingerprint = next(
            line.rsplit("sha256:", 1)[1] for line in srv.lines if line.startswith("quic fingerprint")
        )
        clients = {}
        for name, (scheme, size) in PATHS.items():
            opts = {} if size is None else {"quic_max_datagram": size, "quic_fingerprint": fingerprint}
            clients[name] = connect(srv.url(scheme), **opts)
        try:
            p50, about = compare_to_floor(clients, obs, n=args.n, warmup=args.warmup, rounds=args.rounds)
        finally:
            for client in clients.values():
                client.close()
    print_report(p50, about, TARGETS, as_json=args.json)


if __name__ == "__main__":
    main()
