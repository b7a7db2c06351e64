"""openpi's own server and client, as the reference the π₀ checkpoint path is measured against.

    python benchmarks/openpi_reference.py serve --checkpoint DIR [--config pi0_aloha_sim] [--port 0]
    python benchmarks/openpi_reference.py client --port PORT [--n 200] [--warmup 10] [--out FILE]

``serve`` is openpi's ``scripts/serve_policy.py`` in substance: ``create_trained_policy(get_config(config), DIR)``
behind openpi's ``WebsocketPolicyServer`` (one change: the checkpoint loads through pi0remote's loader, which
is openpi's ``create_trained_policy`` with a fallback for orbax versions newer than openpi's pin). The policy is
called twice before the port opens, so that no measured call compiles. It prints ``listening ws://HOST:PORT``
then ``ready``.

``client`` runs ``openpi_client.WebsocketClientPolicy.infer`` in a loop on the canonical ALOHA request (one
camera, 14 joints) and prints the round-trip percentiles as JSON.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT / "src", ROOT / ".openpi_src"):
    if p.is_dir() and str(p) not in sys.path:
        sys.path.insert(0, str(p))


def openpi_obs(rng: np.random.Generator) -> dict:
    return {
        "images": {"cam_high": rng.integers(0, 256, (3, 224, 224), dtype=np.uint8)},
        "state": rng.uniform(-0.5, 0.5, 14).astype(np.float32),
    }


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def serve(args: argparse.Namespace) -> int:
    from openpi.serving import websocket_policy_server

    from pi0remote.policies.pi0 import load_openpi_policy

    policy, _ = load_openpi_policy(config=args.config, checkpoint=args.checkpoint, num_steps=10, prompt=None)
    rng = np.random.default_rng(0)
    for _ in range(2):
        policy.infer(openpi_obs(rng))
    port = args.port or free_port(args.host)
    print(f"listening ws://{args.host}:{port}", flush=True)
    print("ready", flush=True)
    server = websocket_policy_server.WebsocketPolicyServer(
        policy, host=args.host, port=port, metadata=policy.metadata
    )
    server.serve_forever()
    return 0


def client(args: argparse.Namespace) -> int:
    from openpi_client import websocket_client_policy

    c = websocket_client_policy.WebsocketClientPolicy(host=args.host, port=args.port)
    rng = np.random.default_rng(1)
    obs = [openpi_obs(rng) for _ in range(8)]
    for i in range(args.warmup):
        c.infer(obs[i % 8])
    rtt, own = [], []
    for i in range(args.n):
        t0 = time.perf_counter()
        r = c.infer(obs[i % 8])
        rtt.append((time.perf_counter() - t0) * 1000)
        own.append(float(r.get("policy_timing", {}).get("infer_ms", float("nan"))))
        assert np.asarray(r["actions"]).shape == (50, 14)
    q = lambda xs, p: round(float(np.percentile(xs, p)), 3)  # noqa: E731
    res = {
        "client": "openpi_client.WebsocketClientPolicy",
        "n": args.n,
        "round_trip_ms": {"p50": q(rtt, 50), "p95": q(rtt, 95), "min": q(rtt, 0)},
        "openpi_infer_ms_p50": q(own, 50),
    }
    print(json.dumps(res))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--config", default="pi0_aloha_sim")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=0)
    c = sub.add_parser("client")
    c.add_argument("--host", default="127.0.0.1")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--n", type=int, default=200)
    c.add_argument("--warmup", type=int, default=10)
    c.add_argument("--out", default=None)
    args = ap.parse_args()
    return serve(args) if args.cmd == "serve" else client(args)


if __name__ == "__main__":
    sys.exit(main())
