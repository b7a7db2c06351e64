"""``pi0remote record`` (also ``python -m pi0remote.record``): MP4 videos of evaluation episodes, side by
side with ``--compare`` (extra ``sim``).

One annotated MP4 per episode and mode (step, mode, last round trip); with several modes, one
side-by-side MP4 per seed in which every pane runs on real wall-clock time, so a slow link visibly
freezes its robot between chunks. Written to a timestamped folder under ``--out`` together with the
same JSON results as ``pi0remote eval``. See docs/eval.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from . import cli
from .eval import (
    EVAL_NEEDS,
    EvalCommand,
    add_common_arguments,
    modes_from_args,
    open_clients,
    print_json,
    require,
)

EXAMPLES = """examples:
  pi0remote record --policy expert --episodes 2
  pi0remote record --policy expert --compare tcp://127.0.0.1:8765 --episodes 1
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p, episodes=1, out="results/record")


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> EvalCommand:
    modes = modes_from_args(parser, args)
    from .harness.eval import EvalConfig

    cfg = EvalConfig(
        task=args.task, episodes=args.episodes, seed=args.seed, action_horizon=args.action_horizon,
        max_steps=args.max_steps, images=True, out=args.out,
    )  # fmt: skip
    return EvalCommand(modes, cfg, cli.client_options(args), json=args.json)


def execute(cmd: EvalCommand) -> int:
    os.environ.setdefault("MUJOCO_GL", "egl")
    require(*EVAL_NEEDS, "imageio", "imageio_ffmpeg", "PIL")  # and the MP4 writer, the annotations
    from .harness.record import record

    out = contextlib.redirect_stdout(sys.stderr) if cmd.json else contextlib.nullcontext()
    with open_clients(cmd.modes, cmd.client, None) as clients, out:
        folder, aggregates = record(cmd.modes, cmd.config, clients)
    if cmd.json:
        print_json(folder, aggregates)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m pi0remote.record`` parser (the same flags as ``pi0remote record``)."""
    return cli.command_parser("record", "python -m pi0remote.record")


def main(argv: list[str] | None = None) -> int:
    return cli.command_main("record", argv, "python -m pi0remote.record")


if __name__ == "__main__":
    raise SystemExit(main())
