"""``python -m pi0remote.bench``: round-trip latency of every transport (see :mod:`pi0remote.harness.bench`).

python -m pi0remote.bench                                   # embedded server, every transport
python -m pi0remote.bench --policy sleep:26 --netem delay=150ms,jitter=10ms,loss=0.1%,rate=50mbit
python -m pi0remote.bench --url tcp://gpu-box:8765 --url ws://gpu-box:8000/ws --n 200
python -m pi0remote.bench --clients 8 --policy sleep:24+8.9 --max-batch 8
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from .harness.bench import main as bench_main

    return bench_main(argv)


if __name__ == "__main__":
    sys.exit(main())
