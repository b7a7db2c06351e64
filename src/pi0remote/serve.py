"""``python -m pi0remote.serve``: serve one policy on every transport at once.

Prints one ``listening <url>`` line per listener, then ``ready`` once the policy is warm.
SIGINT / SIGTERM shut it down cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

from . import protocol


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pi0remote.serve", description=__doc__.splitlines()[0])
    g = p.add_argument_group("policy")
    g.add_argument(
        "--policy",
        default="zeros",
        help="zeros | echo | sleep:MS | sleep:BASE+PER | expert | pi0 | module:attr",
    )
    g.add_argument("--config", default=None, help="pi0: openpi training config name (default pi0_aloha_sim)")
    g.add_argument("--checkpoint", default=None, help="pi0: checkpoint directory or gs:// URL")
    g.add_argument("--random-weights", action="store_true", help="pi0: random bf16 weights (no download)")
    g.add_argument("--num-steps", type=int, default=None, help="pi0: flow-matching steps (default 10)")
    g.add_argument("--prompt", default=None, help="pi0: default language prompt")
    g = p.add_argument_group("listeners")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument(
        "--http-port", type=int, default=8000, help="HTTP and WebSocket (/ws); 0 picks a free port"
    )
    g.add_argument("--tcp-port", type=int, default=8765, help="raw TCP; 0 picks a free port")
    g.add_argument(
        "--quic-port", type=int, default=None, help="QUIC over UDP and QUIC-over-TCP on this port number"
    )
    g.add_argument("--openpi-port", type=int, default=None, help="openpi-compatible WebSocket server")
    g.add_argument("--transports", default="http,ws,tcp", help="comma list of http,ws,tcp,quic,quic+tcp")
    g = p.add_argument_group("safety")
    g.add_argument("--token", default=None, help="require this token on every transport")
    g.add_argument("--max-message-mb", type=float, default=protocol.DEFAULT_MAX_MESSAGE_BYTES / 2**20)
    g.add_argument(
        "--idle-timeout", type=float, default=300.0, help="close connections idle this many seconds"
    )
    from .server.limits import add_limit_arguments

    add_limit_arguments(p.add_argument_group("limits (docs/security.md)"))
    g = p.add_argument_group("batching")
    g.add_argument("--max-batch", type=int, default=1, help="batch concurrent requests up to this size")
    g.add_argument(
        "--batch-window-ms",
        type=float,
        default=2.0,
        help="with --max-batch: wait up to this long for the rest of a wave of active clients",
    )
    g = p.add_argument_group("QUIC TLS")
    g.add_argument("--cert", default=None, help="PEM certificate (default: self-signed, generated at start)")
    g.add_argument("--key", default=None, help="PEM private key for --cert")
    g.add_argument("--quic-max-datagram", type=int, default=None, help="QUIC datagram size over UDP")
    p.add_argument("--debug", action="store_true", help="send Python tracebacks to openpi clients")
    return p


def policy_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options a policy factory gets: only those the user set."""
    opts = {
        "config": args.config,
        "checkpoint": args.checkpoint,
        "num_steps": args.num_steps,
        "prompt": args.prompt,
    }
    out = {k: v for k, v in opts.items() if v is not None}
    if args.random_weights:
        out["random_weights"] = True
    return out


async def run(args: argparse.Namespace) -> int:
    from .policies import load_policy
    from .server import PolicyServer

    transports = [t for t in args.transports.split(",") if t]
    if args.quic_port is not None:
        transports += [t for t in ("quic", "quic+tcp") if t not in transports]
    options = policy_options(args)
    if args.policy == "pi0":
        options["max_batch"] = args.max_batch  # warm-up compiles every batch size it will see
    elif options:
        print(
            f"pi0remote.serve: ignoring π₀ options {sorted(options)} for --policy {args.policy}",
            file=sys.stderr,
        )
        options = {}
    from .server.limits import limits_from_args, resolve_token

    token = resolve_token(args.token, getattr(args, "token_file", None))
    limits = limits_from_args(args)
    policy = load_policy(args.policy, **options)
    quic_options = {"max_datagram_size": args.quic_max_datagram} if args.quic_max_datagram else {}
    server = PolicyServer(
        policy,
        name=args.policy,
        host=args.host,
        http_port=args.http_port,
        tcp_port=args.tcp_port,
        quic_port=args.quic_port,
        openpi_port=args.openpi_port,
        transports=transports,
        token=token,
        limits=limits,
        max_message_bytes=int(args.max_message_mb * 2**20),
        idle_timeout=args.idle_timeout or None,
        max_batch=args.max_batch,
        batch_window_ms=args.batch_window_ms,
        cert=args.cert,
        key=args.key,
        quic_options=quic_options,
        debug=args.debug,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    for url in await server.start():
        print(f"listening {url}", flush=True)
    await server.warmup()
    print("ready", flush=True)
    await stop.wait()
    await server.close()
    print("stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 0
    except (ImportError, ValueError, TypeError, OSError) as exc:
        print(f"pi0remote.serve: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
