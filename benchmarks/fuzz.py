"""Fuzz every decode path with the full case count (>= 200,000): only pi0remote's typed errors may escape.

    PYTHONPATH=src nice -n 10 python benchmarks/fuzz.py                # 2,800 examples x 8 x 9 paths ~ 200k
    PYTHONPATH=src python benchmarks/fuzz.py --examples 5000 --seed 7  # more, another seed

Prints one line per decode path (cases, seconds) and the total; exits non-zero on the first input that
lets a builtin exception escape (hypothesis prints the shrunk input).
"""

from __future__ import annotations

import argparse
import sys
import time

from pi0remote.harness import fuzz


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=2800, help="hypothesis examples per decode path")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: derandomized)")
    p.add_argument("--only", default=None, help="run only the paths whose name contains this")
    args = p.parse_args(argv)
    total_t = time.perf_counter()
    for name in sorted(fuzz.TARGETS):
        if args.only and args.only not in name:
            continue
        before, t0 = fuzz.CASES[0], time.perf_counter()
        fuzz.run_target(name, args.examples, seed=args.seed)
        print(
            f"{name:28s} {fuzz.CASES[0] - before:>9,d} cases  {time.perf_counter() - t0:6.1f} s", flush=True
        )
    print(
        f"{'total':28s} {fuzz.CASES[0]:>9,d} cases  {time.perf_counter() - total_t:6.1f} s  (no builtin error escaped)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
