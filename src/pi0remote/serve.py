"""``pi0remote serve`` (also ``python -m pi0remote.serve``): serve one policy on every transport at once.

Prints one ``listening <url>`` line per listener, then ``ready`` once the policy is warm.
SIGINT / SIGTERM shut it down cleanly.

Which listeners open: ``--transports`` when given; otherwise the ones whose port flag is given
(``--http-port``: http and ws, ``--tcp-port``: tcp, ``--quic-port``: quic and quic+tcp); with no port
flag at all, http, ws and tcp on their default ports. A port flag for a transport that ``--transports``
leaves out is ignored, with a note.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import re
import signal
import socket
import sys
from dataclasses import dataclass, field
from typing import Any

from . import cli, protocol

EXAMPLES = """which listeners open:
  --transports when given; otherwise the transports whose port flag is given (--http-port: http and ws,
  --tcp-port: tcp, --quic-port: quic and quic+tcp); with no port flag, http, ws and tcp on 8000 / 8765.
  A port flag for a transport that --transports leaves out opens nothing (a note says so).

examples:
  pi0remote serve --policy expert                        # http, ws on 8000 and tcp on 8765
  pi0remote serve --policy expert --tcp-port 8765        # tcp only
  pi0remote serve --policy pi0 --host 0.0.0.0 --token-file token.txt --transports tcp,quic
"""

TRANSPORTS = ("http", "ws", "tcp", "quic", "quic+tcp")
PORT_FLAG = {
    "http": "http_port",
    "ws": "http_port",
    "tcp": "tcp_port",
    "quic": "quic_port",
    "quic+tcp": "quic_port",
}
DEFAULT_PORTS = {"http_port": 8000, "tcp_port": 8765, "quic_port": 4433}
POLICY_OPTIONS = ("config", "checkpoint", "num_steps", "prompt", "random_weights", "exact")
"""Flags (dests) handed to the policy factory when the user set them: a new one is one line here."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every ``serve`` flag, group by group (a new flag is one line in its group)."""
    add_policy_arguments(p)
    add_listener_arguments(p)
    cli.add_auth(p, server=True)
    add_server_arguments(p)
    cli.add_output(p, out=None, json=False, progress=False)


def add_policy_arguments(p: argparse.ArgumentParser) -> None:
    """Which policy, and the options its factory gets (π₀, real-time chunking)."""
    g = p.add_argument_group("policy")
    g.add_argument(
        "--policy", default="zeros", type=cli.policy_name,
        help="zeros | echo | sleep:MS | sleep:BASE+PER | expert | pi0 | module:attr",
    )  # fmt: skip
    g.add_argument("--config", default=None, help="pi0: openpi training config name (default pi0_aloha_sim)")
    g.add_argument("--checkpoint", default=None, help="pi0: checkpoint directory or gs:// URL")
    g.add_argument("--random-weights", action="store_true", help="pi0: random bf16 weights (no download)")
    g.add_argument(
        "--exact",
        action="store_true",
        help="pi0: openpi's own Policy.infer steps (bit-identical actions) instead of the fast path",
    )
    g.add_argument("--num-steps", type=int, default=None, help="pi0: flow-matching steps (default 10)")
    g.add_argument("--prompt", default=None, help="pi0: default language prompt")
    g = p.add_argument_group("real-time chunking (flow policies: pi0, flow; docs/rtc.md)")
    g.add_argument(
        "--rtc-beta", type=float, default=None, metavar="BETA",
        help="guidance clip β for requests carrying 'rtc' (default 5)",
    )  # fmt: skip
    g.add_argument(
        "--rtc-schedule", choices=("exp", "linear"), default=None,
        help="soft prefix mask past the delay (default exp)",
    )  # fmt: skip


def add_listener_arguments(p: argparse.ArgumentParser) -> None:
    """Where to listen and on which transports (the rule: ``select_listeners``)."""
    g = p.add_argument_group("listeners (see 'which listeners open' below)")
    g.add_argument("--host", default="127.0.0.1", help="bind address; 0.0.0.0: every interface")
    g.add_argument(
        "--http-port", type=int, default=None, help="HTTP and WebSocket (/ws) (default 8000; 0: free)"
    )
    g.add_argument("--tcp-port", type=int, default=None, help="raw TCP (default 8765; 0: a free port)")
    g.add_argument(
        "--quic-port", type=int, default=None, help="QUIC over UDP and QUIC-over-TCP (default 4433)"
    )
    g.add_argument("--openpi-port", type=int, default=None, help="openpi-compatible WebSocket server")
    g.add_argument(
        "--transports", type=cli.choice_list(TRANSPORTS), default=None, metavar="LIST",
        help="comma list of http,ws,tcp,quic,quic+tcp (default: from the port flags given, else http,ws,tcp)",
    )  # fmt: skip


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    """Safety bounds, limits, batching and QUIC TLS: what :class:`~pi0remote.server.PolicyServer` gets."""
    g = p.add_argument_group("safety")
    g.add_argument("--max-message-mb", type=float, default=protocol.DEFAULT_MAX_MESSAGE_BYTES / 2**20)
    g.add_argument(
        "--idle-timeout", type=float, default=300.0, help="close connections idle this many seconds"
    )
    from .server.limits import add_limit_arguments

    add_limit_arguments(p.add_argument_group("limits (docs/security.md)"))
    g = p.add_argument_group("batching")
    g.add_argument("--max-batch", type=int, default=1, help="batch concurrent requests up to this size")
    g.add_argument(
        "--batch-window-ms", type=float, default=2.0,
        help="with --max-batch: wait up to this long for the rest of a wave of active clients",
    )  # fmt: skip
    g = p.add_argument_group("QUIC TLS")
    g.add_argument("--cert", default=None, help="PEM certificate (default: self-signed, generated at start)")
    g.add_argument("--key", default=None, help="PEM private key for --cert")
    g.add_argument("--quic-max-datagram", type=int, default=None, help="QUIC datagram size over UDP")


RTC_POLICIES = ("pi0", "flow")
"""Built-in flow policies: they get ``rtc_beta`` / ``rtc_schedule`` (a ``module:attr`` policy only when set)."""


def rtc_options(args: argparse.Namespace) -> dict[str, Any]:
    """``rtc_beta`` and ``rtc_schedule`` for a flow policy's factory (checked here)."""
    from .rtc import DEFAULT_BETA, DEFAULT_SCHEDULE, check_beta

    builtin = args.policy in RTC_POLICIES or args.policy.startswith("flow:")  # flow:WEIGHTS.npz
    if not builtin and ":" not in args.policy:
        return {}
    out = {"rtc_beta": args.rtc_beta, "rtc_schedule": args.rtc_schedule}
    if builtin:
        out["rtc_beta"] = DEFAULT_BETA if args.rtc_beta is None else args.rtc_beta
        out["rtc_schedule"] = args.rtc_schedule or DEFAULT_SCHEDULE
    out = {k: v for k, v in out.items() if v is not None}
    if "rtc_beta" in out:
        out["rtc_beta"] = check_beta(out["rtc_beta"])
    return out


@dataclass
class ServeConfig:
    """A parsed ``pi0remote serve`` command line."""

    policy: str = "zeros"
    policy_options: dict[str, Any] = field(default_factory=dict)
    host: str = "127.0.0.1"
    transports: list[str] = field(default_factory=lambda: ["http", "ws", "tcp"])
    ports: dict[str, int | None] = field(default_factory=dict)
    """``http_port`` / ``tcp_port`` / ``quic_port`` / ``openpi_port``: None for a listener not opened."""
    server_options: dict[str, Any] = field(default_factory=dict)
    """Everything else :class:`~pi0remote.server.PolicyServer` takes (token, limits, batching, TLS)."""
    notes: list[str] = field(default_factory=list)
    quiet: bool = False


def select_listeners(args: argparse.Namespace) -> tuple[list[str], dict[str, int | None], list[str]]:
    """The transports to open, the port of each listener, and notes on port flags that were ignored."""
    given = {d for d in (*DEFAULT_PORTS, "openpi_port") if getattr(args, d, None) is not None}
    if args.transports is not None:
        transports = list(dict.fromkeys(args.transports))
    elif given:
        transports = [t for t in TRANSPORTS if PORT_FLAG[t] in given]
    else:
        transports = ["http", "ws", "tcp"]
    if not transports and args.openpi_port is None:
        raise cli.UsageError("nothing to serve: give --transports or a port flag")
    ports: dict[str, int | None] = {"openpi_port": args.openpi_port}
    for dest, default in DEFAULT_PORTS.items():
        wanted = any(PORT_FLAG[t] == dest for t in transports)
        value = getattr(args, dest, None)
        ports[dest] = (default if value is None else value) if wanted else None
    notes = [
        f"--{d.replace('_', '-')} ignored: --transports {','.join(transports)} opens no listener on it"
        for d in sorted(given - {"openpi_port"})
        if ports[d] is None
    ]
    return transports, ports, notes


def policy_options(args: argparse.Namespace, notes: list[str]) -> dict[str, Any]:
    """The options a policy factory gets: only those the user set (π₀ options only for π₀)."""
    out = {k: getattr(args, k) for k in POLICY_OPTIONS if getattr(args, k, None) not in (None, False)}
    if args.policy == "pi0":
        out["max_batch"] = args.max_batch  # warm-up compiles every batch size it will see
    elif out:
        notes.append(f"ignoring π₀ options {sorted(out)} for --policy {args.policy}")
        out = {}
    out.update(rtc_options(args))
    return out


def config_from_args(args: argparse.Namespace, parser: Any = None) -> ServeConfig:
    from .server.limits import limits_from_args

    transports, ports, notes = select_listeners(args)
    server_options = {
        "token": cli.token_from_args(args),
        "max_message_bytes": int(args.max_message_mb * 2**20),
        "idle_timeout": args.idle_timeout or None,
        "max_batch": args.max_batch,
        "batch_window_ms": args.batch_window_ms,
        "cert": args.cert,
        "key": args.key,
        "quic_options": {"max_datagram_size": args.quic_max_datagram} if args.quic_max_datagram else {},
        "debug": args.debug,
        "limits": limits_from_args(args),
    }
    return ServeConfig(
        policy=args.policy, policy_options=policy_options(args, notes), host=args.host, transports=transports,
        ports=ports, server_options=server_options, notes=notes, quiet=args.quiet,
    )  # fmt: skip


# -- running ----------------------------------------------------------------------------------------
def all_interfaces(host: str) -> bool:
    return host in ("", "0.0.0.0", "::", "[::]")


def outward_address() -> str:
    """This machine's address as other machines on its network see it (a guess; no packet is sent):
    the source address of a route out, else what the hostname resolves to, else the hostname."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
        except OSError:
            pass
    name = socket.gethostname()
    try:
        addr = socket.gethostbyname(name)
        return name if addr.startswith("127.") else addr
    except OSError:
        return name


def display_urls(urls: list[str], host: str) -> tuple[list[str], str | None]:
    """URLs a user can connect to, and a hint when bound to every interface (0.0.0.0)."""
    if not all_interfaces(host):
        return urls, None
    addr = outward_address()
    shown = [re.sub(r"://(127\.0\.0\.1|\[::1?\])", f"://{addr}", u, count=1) for u in urls]
    hint = (
        f"bound to {host or '0.0.0.0'} (every interface): other machines connect to this machine's address "
        f"({addr} here, or its hostname / public IP); this machine can also use 127.0.0.1"
    )
    return shown, hint


def _taken(host: str, port: int, kind: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, kind) as s:
        try:
            s.bind((host, port))
            return False
        except OSError:
            return True


def port_in_use(exc: OSError, cfg: ServeConfig) -> RuntimeError:
    """The error for a port that is taken, naming the flag that chose it."""
    m = re.search(r", (\d+)\)", str(exc))
    chosen = {d: p for d, p in cfg.ports.items() if p}
    if m:
        flags = [d for d, p in chosen.items() if p == int(m.group(1))]
    else:  # the UDP bind (QUIC) does not say which port: find the taken one
        flags = [
            d for d, p in chosen.items()
            if _taken(cfg.host, p, socket.SOCK_STREAM) or (d == "quic_port" and _taken(cfg.host, p, socket.SOCK_DGRAM))
        ]  # fmt: skip
    if not flags:
        return RuntimeError(
            f"{exc}: pick other ports with --http-port / --tcp-port / --quic-port (0: a free one)"
        )
    names = " / ".join(f"--{d.replace('_', '-')}" for d in flags)
    ports = " / ".join(str(chosen[d]) for d in flags)
    return RuntimeError(f"port {ports} is already in use: pick another with {names} (0 picks a free one)")


def load(cfg: ServeConfig) -> Any:
    """The policy; a ``module:attr`` that does not import is a usage error."""
    from .policies import load_policy

    try:
        return load_policy(cfg.policy, **cfg.policy_options)
    except ModuleNotFoundError as exc:
        if exc.name and cfg.policy.split(":", 1)[0].startswith(exc.name) and exc.name not in cli.EXTRAS:
            raise cli.UsageError(f"--policy {cfg.policy}: no module named {exc.name!r}") from None
        raise
    except AttributeError as exc:
        raise cli.UsageError(f"--policy {cfg.policy}: {exc}") from None


async def serve(cfg: ServeConfig) -> int:
    from .server import PolicyServer

    log = cli.logger(argparse.Namespace(quiet=cfg.quiet))
    for note in cfg.notes:
        log(f"pi0remote serve: {note}")
    server = PolicyServer(
        load(cfg),
        name=cfg.policy,
        host=cfg.host,
        transports=cfg.transports,
        **cfg.ports,
        **cfg.server_options,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        urls = await server.start()
    except OSError as exc:
        await server.close()
        raise port_in_use(exc, cfg) if exc.errno == errno.EADDRINUSE else exc from None
    shown, hint = display_urls(urls, cfg.host)
    for url in shown:
        print(f"listening {url}", flush=True)
    if hint:
        log(f"pi0remote serve: {hint}")
    if cfg.server_options.get("token"):
        log("pi0remote serve: clients must send the token (--token, --token-file or $PI0REMOTE_TOKEN)")
    log(f"pi0remote serve: warming up {cfg.policy} (the first calls compile / load; 'ready' follows)")
    await server.warmup()
    print("ready", flush=True)
    await stop.wait()
    await server.close()
    print("stopped", flush=True)
    return 0


def execute(cfg: ServeConfig) -> int:
    try:
        return asyncio.run(serve(cfg))
    except KeyboardInterrupt:
        return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m pi0remote.serve`` parser (the same flags as ``pi0remote serve``)."""
    return cli.command_parser("serve", "python -m pi0remote.serve")


def main(argv: list[str] | None = None) -> int:
    return cli.command_main("serve", argv, "python -m pi0remote.serve")


if __name__ == "__main__":
    sys.exit(main())
