"""``pi0remote bench`` (also ``python -m pi0remote.bench``): round-trip latency of every transport.

    pi0remote bench                                   # embedded server, every transport
    pi0remote bench --policy sleep:26 --netem delay=150ms,jitter=10ms,loss=0.1%,rate=50mbit
    pi0remote bench --url tcp://gpu-box:8765 --url ws://gpu-box:8000/ws --n 200 --token-file tok.txt
    pi0remote bench --clients 8 --policy sleep:24+8.9 --max-batch 8

See :mod:`pi0remote.harness.bench` and docs/cli.md.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from .harness.bench.cli import main as bench_main

    return bench_main(argv)


if __name__ == "__main__":
    sys.exit(main())
