"""``python -m pi0remote.record``: MP4 videos of evaluation episodes, side by side with ``--compare``.

    python -m pi0remote.record --policy expert --episodes 2
    python -m pi0remote.record --policy expert --compare tcp://127.0.0.1:8765 --episodes 1

One annotated MP4 per episode and mode (step, mode, last round trip); with several modes, one
side-by-side MP4 per seed in which every pane runs on real wall-clock time, so a slow link visibly
freezes its robot between chunks. Written to a timestamped folder under ``--out`` together with the
same JSON results as ``python -m pi0remote.eval``. See docs/eval.md.
"""

from __future__ import annotations

import argparse
import os

from .eval import add_common_arguments, modes_from_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pi0remote.record", description=__doc__.splitlines()[0])
    add_common_arguments(p, episodes=1)
    p.add_argument("--out", default="results/record", help="parent of the timestamped folder")
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MUJOCO_GL", "egl")
    parser = build_parser()
    args = parser.parse_args(argv)
    modes = modes_from_args(parser, args)
    from .harness.eval import EvalConfig
    from .harness.record import record

    cfg = EvalConfig(
        task=args.task, episodes=args.episodes, seed=args.seed, action_horizon=args.action_horizon,
        max_steps=args.max_steps, images=True, out=args.out,
    )  # fmt: skip
    record(modes, cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
