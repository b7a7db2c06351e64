"""``pi0remote bench``: its flags, the :class:`~.config.BenchConfig` they build, and the run that prints
and writes the results. The shared option groups come from :mod:`pi0remote.cli`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ... import cli
from .config import ALL_TRANSPORTS, IMAGES, PAYLOADS, BenchConfig, charts_available, quic_available

EXAMPLES = """examples:
  pi0remote bench                                   # embedded server, every transport
  pi0remote bench --policy sleep:26 --netem delay=150ms,jitter=10ms,loss=0.1%,rate=50mbit
  pi0remote bench --url tcp://gpu-box:8765 --url ws://gpu-box:8000/ws --n 200 --token-file tok.txt
  pi0remote bench --clients 8 --policy sleep:24+8.9 --max-batch 8
  pi0remote bench --clients 16 --url modal://pi0remote/tcp         # robots spread over a Modal fleet
  pi0remote bench --fleet 4 --clients 32 --kill-one-at 5 --json    # a local fleet, one container killed
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every ``bench`` flag (a new flag is one line in the right group)."""
    cli.add_target(p, multiple=True, help="measure this running server (repeatable); none: embedded server")
    g = p.add_argument_group("what to measure")
    g.add_argument(
        "--transport", "--transports", dest="transport", type=cli.choice_list(ALL_TRANSPORTS, allow_all=True),
        default="all", help=f"comma list of {','.join(ALL_TRANSPORTS)}, or all",
    )  # fmt: skip
    g.add_argument("--n", type=int, default=30, help="measured calls per transport")
    g.add_argument("--warmup", type=int, default=5, help="unmeasured calls per transport first")
    g.add_argument("--rounds", type=int, default=5, help="interleave the transports in this many rounds")
    g.add_argument("--payload", choices=PAYLOADS, default="raw", help="camera as raw uint8 or as JPEG")
    g.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality with --payload jpeg")
    g.add_argument(
        "--image", choices=IMAGES, default="auto",
        help="camera content: random noise or a rendered gym-aloha frame (auto: sim for jpeg)",
    )  # fmt: skip
    g.add_argument(
        "--netem", type=cli.netem_spec, default=None, metavar="SPEC",
        help="WAN emulation, e.g. delay=150ms,jitter=10ms,loss=0.1%%,rate=50mbit (each direction)",
    )  # fmt: skip
    g.add_argument("--clients", type=int, default=0, help="N concurrent client processes (throughput mode)")
    g.add_argument(
        "--no-baselines", dest="baselines", action="store_false", help="skip the floor and openpi baselines"
    )
    g = p.add_argument_group("embedded server (without --url)")
    g.add_argument(
        "--policy",
        default="zeros",
        type=cli.policy_name,
        help="zeros, sleep:26 (GPU-like), sleep:24+8.9, ...",
    )
    g.add_argument("--max-batch", type=int, default=1, help="dynamic batching up to this size")
    g.add_argument(
        "--batch-window-ms", type=float, default=None,
        help="wait this long for the rest of a wave (default: the server's)",
    )  # fmt: skip
    cli.add_client_options(p)
    cli.add_output(p, out="bench-results")
    p.add_argument(
        "--no-charts", dest="charts", action="store_false", help="skip charts/latency_breakdown.png"
    )
    from ..fleet import add_fleet_args

    add_fleet_args(p)


@dataclass
class BenchCommand:
    """A parsed ``pi0remote bench`` command line: what to measure and where the results go."""

    bench: BenchConfig
    out: str = "bench-results"
    json: bool = False
    quiet: bool = False


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> Any:
    if getattr(args, "fleet", 0):  # --fleet K: harness/fleet.py
        from ..fleet import fleet_command

        return fleet_command(args, parser)
    transports = args.transport if isinstance(args.transport, list) else [args.transport]
    bench = BenchConfig(
        urls=list(args.url or []),
        transports=None if set(transports) == set(ALL_TRANSPORTS) else transports,
        n=args.n, warmup=args.warmup, rounds=args.rounds, policy=args.policy, payload=args.payload,
        jpeg_quality=args.jpeg_quality, image=args.image, netem=args.netem, clients=args.clients,
        max_batch=args.max_batch, batch_window_ms=args.batch_window_ms, baselines=args.baselines,
        charts=args.charts, progress=not (args.no_progress or args.quiet), client=cli.client_options(args),
    )  # fmt: skip
    return BenchCommand(bench, out=args.out, json=args.json, quiet=args.quiet)


def parse_config(argv: Sequence[str]) -> BenchConfig:
    """The :class:`BenchConfig` a ``bench`` command line asks for (for scripts under benchmarks/)."""
    parser = cli.command_parser("bench")
    return config_from_args(parser.parse_args(list(argv)), parser).bench


def announce_missing(cfg: BenchConfig, log: Callable[[str], None]) -> None:
    """Say which asked-for parts this install cannot do, and the extra that brings them."""
    if cfg.charts and cfg.clients == 0 and not charts_available():
        log("no charts: matplotlib is missing (pip install 'pi0remote[harness]'; --no-charts hides this)")
    quic_urls = [u for u in cfg.urls if u.lower().startswith(("quic://", "quic+tcp://"))]
    if quic_urls and not quic_available():
        raise ImportError("quic:// needs aioquic", name="aioquic")


def run(cfg: BenchConfig, log: Callable[[str], None]) -> dict[str, Any]:
    """Measure as ``cfg`` says; the result document (not yet written)."""
    from .measure import run_clients, run_latency

    announce_missing(cfg, log)
    from ..._malloc import tune_malloc

    tune_malloc()
    return run_clients(cfg, log) if cfg.clients > 0 else run_latency(cfg, log)


def execute(cmd: Any) -> int:
    if not isinstance(cmd, BenchCommand):  # --fleet K
        return cmd.execute()
    from .report import (
        describe_config,
        jsonable,
        output_dir,
        render_clients,
        render_table,
        strip_samples,
        write_outputs,
    )

    log = cli.logger(argparse.Namespace(quiet=cmd.quiet))
    result = run(cmd.bench, log)
    out = output_dir(cmd.out)
    write_outputs(result, out, charts=cmd.bench.charts)
    result["output_dir"] = str(out)
    if cmd.json:
        print(json.dumps(jsonable(strip_samples(result)), indent=1))
        return 0
    if result["mode"] == "latency":
        print(describe_config(result))
        print(render_table(result))
    else:
        print(render_clients(result))
    chart = f", {result['chart']}" if result.get("chart") else ""
    print(f"results: {out}/results.json, results.md{chart}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m pi0remote.bench`` parser (the same flags as ``pi0remote bench``)."""
    return cli.command_parser("bench", "python -m pi0remote.bench")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pi0remote.bench``."""
    return cli.command_main("bench", argv, "python -m pi0remote.bench")
