"""``python -m pi0remote.eval``: success rate of a policy on gym-aloha, through any transport.

    python -m pi0remote.eval --policy expert --episodes 10
    python -m pi0remote.eval --policy-url tcp://127.0.0.1:8765 --episodes 10
    python -m pi0remote.eval --policy expert --compare tcp://127.0.0.1:8765 ws://127.0.0.1:8000/ws

Every mode runs the same seeds (``--seed``, ``--seed + 1``, ...). Results go to a timestamped folder
under ``--out``: episodes.jsonl, aggregate.json, summary.md and success_rate.png. See docs/eval.md.
"""

from __future__ import annotations

import argparse
import os


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pi0remote.eval", description=__doc__.splitlines()[0])
    add_common_arguments(p, episodes=10)
    p.add_argument("--out", default="results/eval", help="parent of the timestamped results folder")
    p.add_argument(
        "--no-images", action="store_true", help="do not render or send cam_high (state-only policies)"
    )
    return p


def add_common_arguments(p: argparse.ArgumentParser, episodes: int) -> None:
    """Arguments shared with ``python -m pi0remote.record``."""
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--policy-url", metavar="URL", help="a running server: tcp://, http://, ws://, local://NAME ..."
    )
    g.add_argument(
        "--policy", metavar="NAME", help="run a policy in process (expert, zeros, pi0, module:attr)"
    )
    p.add_argument("--compare", nargs="+", default=[], metavar="URL_OR_NAME", help="more modes, same seeds")
    p.add_argument("--task", default="AlohaTransferCube-v0", help="AlohaTransferCube-v0 or AlohaInsertion-v0")
    p.add_argument("--episodes", type=int, default=episodes)
    p.add_argument("--seed", type=int, default=0, help="first seed; episode i uses seed + i")
    p.add_argument("--action-horizon", type=int, default=10, help="steps executed from each 50-step chunk")
    p.add_argument("--max-steps", type=int, default=400)


def modes_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    first = args.policy_url or args.policy
    modes = ([first] if first else []) + list(args.compare)
    if not modes:
        parser.error("give --policy-url URL, --policy NAME or --compare ...")
    if args.episodes < 1 or args.action_horizon < 1 or args.max_steps < 1:
        parser.error("--episodes, --action-horizon and --max-steps must be positive")
    return modes


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MUJOCO_GL", "egl")
    parser = build_parser()
    args = parser.parse_args(argv)
    modes = modes_from_args(parser, args)
    from .harness.eval import EvalConfig, evaluate

    cfg = EvalConfig(
        task=args.task, episodes=args.episodes, seed=args.seed, action_horizon=args.action_horizon,
        max_steps=args.max_steps, images=not args.no_images, out=args.out,
    )  # fmt: skip
    evaluate(modes, cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
