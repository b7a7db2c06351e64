"""``pi0remote eval`` (also ``python -m pi0remote.eval``): success rate of a policy on gym-aloha, through
any transport (extra ``sim``).

Every mode runs the same seeds (``--seed``, ``--seed + 1``, ...). Results go to a timestamped folder
under ``--out``: episodes.jsonl, aggregate.json, summary.md and success_rate.png (plus sweep.json and
sweep.png for a sweep). See docs/eval.md and docs/latency.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from . import cli
from .options import ClientOptions

EXAMPLES = """examples:
  pi0remote eval --policy expert --episodes 10
  pi0remote eval --url tcp://127.0.0.1:8765 --episodes 10 --token-file token.txt
  pi0remote eval --policy expert --compare tcp://127.0.0.1:8765 ws://127.0.0.1:8000/ws
  pi0remote eval --policy expert --no-images --clock realtime --latency 300ms --exec async
  pi0remote eval --policy expert --no-images --sweep-latency 0,100,300 --exec blocking,async
  pi0remote eval --policy flow --no-images --clock realtime --latency 300ms --exec rtc
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p, episodes=10, out="results/eval")
    p.add_argument(
        "--no-images", action="store_true", help="do not render or send cam_high (state-only policies)"
    )
    add_latency_arguments(p)


def add_latency_arguments(p: argparse.ArgumentParser) -> None:
    """Clock, execution strategy, latency injection and the latency sweep (docs/latency.md)."""
    g = p.add_argument_group("latency (docs/latency.md)")
    g.add_argument(
        "--clock", choices=("sync", "realtime"), default=None,
        help="sync: the simulator waits for every reply (default); realtime: it keeps going while a "
        "request is in flight (default when --latency or --sweep-latency is given)",
    )  # fmt: skip
    g.add_argument(
        "--exec", dest="strategy", default="blocking", metavar="blocking|async|async-linear|rtc",
        help="blocking: ask, wait, run --action-horizon steps; async: ask ahead (--prefetch-at), blend the "
        "overlap (async-latest / async-linear: with that --blend); rtc: ask ahead, the flow policy continues "
        "the rest of the current chunk (docs/rtc.md). A comma list with --sweep-latency",
    )  # fmt: skip
    g.add_argument(
        "--latency", default=None, metavar="300ms[±50ms]",
        help="inject this round-trip latency on the realtime clock instead of the measured one "
        "(uniform jitter, seeded per episode)",
    )  # fmt: skip
    g.add_argument(
        "--netem", default=None, metavar="SPEC", type=cli.netem_spec,
        help="put the WAN emulator in front of every mode (e.g. delay=150ms,jitter=10ms: each direction); "
        "a policy name is served by a local server subprocess first. The realtime clock then uses the "
        "measured round trip",
    )  # fmt: skip
    g.add_argument(
        "--prefetch-at", default="auto", metavar="N|auto",
        help="async: ask for the next chunk when at most N actions remain (auto: the largest recent delay "
        "in ticks + 2)",
    )  # fmt: skip
    g.add_argument("--blend", choices=("latest", "linear"), default="latest", help="async overlap rule")
    g.add_argument(
        "--max-in-flight", type=int, default=1, metavar="N",
        help="async: requests in flight at once (default 1; more pipelines requests over a slow link)",
    )  # fmt: skip
    g.add_argument(
        "--cold-start", action="store_true",
        help="realtime: start ticking at once (the robot holds its reset pose until the first chunk) "
        "instead of waiting at rest for it",
    )  # fmt: skip
    g.add_argument(
        "--sweep-latency", default=None, metavar="MS,MS,...",
        help="run every --exec strategy at each injected latency (realtime clock); writes sweep.json and "
        "sweep.png",
    )  # fmt: skip


def add_common_arguments(p: argparse.ArgumentParser, episodes: int, out: str) -> None:
    """Arguments shared with ``pi0remote record``: what to evaluate, how to connect, where results go."""
    g = p.add_mutually_exclusive_group()
    cli.add_target(g)
    g.add_argument(
        "--policy", metavar="NAME", type=cli.policy_name,
        help="run a policy in process (expert, zeros, pi0, module:attr)",
    )  # fmt: skip
    p.add_argument("--compare", nargs="+", default=[], metavar="URL_OR_NAME", help="more modes, same seeds")
    g = p.add_argument_group("episodes")
    g.add_argument("--task", default="AlohaTransferCube-v0", help="AlohaTransferCube-v0 or AlohaInsertion-v0")
    g.add_argument("--episodes", type=int, default=episodes)
    g.add_argument("--seed", type=int, default=0, help="first seed; episode i uses seed + i")
    g.add_argument("--action-horizon", type=int, default=10, help="steps executed from each 50-step chunk")
    g.add_argument("--max-steps", type=int, default=400)
    cli.add_client_options(p)
    cli.add_output(p, out=out)


def modes_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    first = args.url or args.policy
    modes = ([first] if first else []) + list(args.compare)
    if not modes:
        parser.error("give --url URL, --policy NAME or --compare ...")
    for mode in modes:
        try:
            cli.server_url(mode) if "://" in mode else cli.policy_name(mode)
        except argparse.ArgumentTypeError as exc:
            parser.error(f"argument --compare: {exc}")
    if args.episodes < 1 or args.action_horizon < 1 or args.max_steps < 1:
        parser.error("--episodes, --action-horizon and --max-steps must be positive")
    return modes


def latency_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """Check the latency flags; returns EvalConfig fields plus ``strategies`` and ``sweep`` (ms or None)."""
    from .harness.clock import STRATEGIES, LatencySpec
    from .harness.sweep import parse_latencies

    strategies = [s.strip() for s in str(args.strategy).split(",") if s.strip()]
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad or not strategies:
        parser.error(f"--exec takes {' or '.join(STRATEGIES)} (a comma list with --sweep-latency)")
    sweep = None
    if args.sweep_latency is not None:
        try:
            sweep = parse_latencies(args.sweep_latency)
        except ValueError as e:
            parser.error(str(e))
        if args.latency is not None or args.netem is not None:
            parser.error("--sweep-latency injects its own latencies: drop --latency / --netem")
        if args.clock == "sync":
            parser.error("--sweep-latency runs on the realtime clock")
    elif len(strategies) > 1:
        parser.error("several --exec strategies need --sweep-latency (or run them one at a time)")
    if args.latency is not None:
        try:
            LatencySpec.parse(args.latency)
        except ValueError as e:
            parser.error(str(e))
        if args.clock == "sync":
            parser.error("--latency needs --clock realtime (the sync clock waits for every reply)")
        if args.netem is not None:
            parser.error("give --latency (injected) or --netem (emulated network), not both")
    if args.max_in_flight < 1:
        parser.error("--max-in-flight must be positive")
    prefetch: int | str = args.prefetch_at
    if prefetch != "auto":
        try:
            prefetch = int(prefetch)
        except ValueError:
            prefetch = -1
        if prefetch < 0:
            parser.error("--prefetch-at takes a non-negative integer or 'auto'")
    clock = args.clock or ("realtime" if (args.latency is not None or sweep is not None) else "sync")
    return {
        "clock": clock, "strategy": strategies[0], "latency": args.latency, "prefetch_at": prefetch,
        "blend": args.blend, "netem": args.netem, "warm_start": not args.cold_start,
        "max_in_flight": args.max_in_flight,
        "strategies": strategies, "sweep": sweep,
    }  # fmt: skip


@contextlib.contextmanager
def netem_clients(
    modes: list[str], spec: str, options: ClientOptions | None = None
) -> Iterator[dict[str, Any]]:
    """A client per mode through the WAN emulator (:class:`pi0remote.harness.netem.NetemGroup`); a policy
    name (or ``local://NAME``) is first served by a ``pi0remote serve`` subprocess on loopback TCP."""
    from .harness.netem import NetemGroup
    from .harness.procs import ServerProcess

    options = options or ClientOptions()
    with contextlib.ExitStack() as stack:
        urls: dict[str, str] = {}
        for mode in modes:
            if "://" in mode and not mode.startswith("local://"):
                urls[mode] = mode
                continue
            name = mode.removeprefix("local://")
            server = stack.enter_context(
                ServerProcess(["--policy", name, "--host", "127.0.0.1", "--tcp-port", "0"])
            )
            urls[mode] = server.url("tcp")
        group = stack.enter_context(NetemGroup(list(urls.values()), spec))
        clients = {}
        for mode, url in urls.items():
            clients[mode] = stack.enter_context(options.connect(group.url_for(url)))
            print(f"{mode}: {group.url_for(url)} (netem {group.spec.describe()})", file=sys.stderr)
        yield clients


EVAL_NEEDS = ("gym_aloha", "matplotlib")
"""What ``eval`` imports on its way (the simulator; the success-rate chart), checked before any episode runs."""


def require(*modules: str) -> None:
    """Import ``modules`` now, or raise an ImportError naming the first missing one (the CLI adds its extra)."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            name = getattr(exc, "name", None) or module
            raise ImportError(f"{module} is not installed ({exc})", name=name) from None


@contextlib.contextmanager
def open_clients(modes: list[str], options: ClientOptions, netem: str | None) -> Iterator[dict[str, Any]]:
    """Clients for the URL modes (policy names run in process, opened by the harness)."""
    if netem:
        with netem_clients(modes, netem, options) as clients:
            yield clients
        return
    with contextlib.ExitStack() as stack:
        yield {
            m: stack.enter_context(options.connect(m))
            for m in modes
            if "://" in m and not m.startswith("local://")
        }


@dataclass
class EvalCommand:
    """A parsed ``pi0remote eval`` command line."""

    modes: list[str]
    config: Any
    """:class:`pi0remote.harness.eval.EvalConfig`."""
    client: ClientOptions = field(default_factory=ClientOptions)
    strategies: list[str] = field(default_factory=lambda: ["blocking"])
    sweep: list[float] | None = None
    json: bool = False


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> EvalCommand:
    modes = modes_from_args(parser, args)
    opts = latency_options(parser, args)
    strategies, sweep = opts.pop("strategies"), opts.pop("sweep")
    if sweep is not None and len(modes) > 1:
        parser.error("--sweep-latency evaluates one mode (drop --compare)")
    from .harness.eval import EvalConfig

    cfg = EvalConfig(
        task=args.task, episodes=args.episodes, seed=args.seed, action_horizon=args.action_horizon,
        max_steps=args.max_steps, images=not args.no_images, out=args.out, **opts,
    )  # fmt: skip
    return EvalCommand(modes, cfg, cli.client_options(args), strategies, sweep, args.json)


def print_json(results_dir: Any, doc: Any) -> None:
    print(json.dumps({"results_dir": str(results_dir), "results": doc}, indent=1, default=str))


def execute(cmd: EvalCommand) -> int:
    os.environ.setdefault("MUJOCO_GL", "egl")
    require(*EVAL_NEEDS)
    from .harness.eval import evaluate
    from .harness.sweep import run_sweep

    out = contextlib.redirect_stdout(sys.stderr) if cmd.json else contextlib.nullcontext()
    with open_clients(cmd.modes, cmd.client, cmd.config.netem) as clients, out:
        if cmd.sweep is not None:
            mode = cmd.modes[0]
            folder, doc = run_sweep(mode, cmd.config, cmd.sweep, cmd.strategies, client=clients.get(mode))
        else:
            folder, doc = evaluate(cmd.modes, cmd.config, clients=clients)
    if cmd.json:
        print_json(folder, doc)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m pi0remote.eval`` parser (the same flags as ``pi0remote eval``)."""
    return cli.command_parser("eval", "python -m pi0remote.eval")


def main(argv: list[str] | None = None) -> int:
    return cli.command_main("eval", argv, "python -m pi0remote.eval")


if __name__ == "__main__":
    raise SystemExit(main())
