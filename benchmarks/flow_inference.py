"""Inference time of the ``flow`` policy: p50 of one call (10 Euler steps) at batch 1 and batch 8.

    python benchmarks/flow_inference.py [--weights PATH] [--calls 200]

Prints wall-clock medians in ms after a warm-up (jit compilation excluded), on whatever JAX sees
(the CPU here). The same figure is in the training card (``inference_p50_ms``).
"""

from __future__ import annotations

import argparse
import json
import os

from pi0remote.policies.flow import default_weights_path
from pi0remote.train_flow import inference_p50


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=str(default_weights_path()))
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args()
    result = inference_p50(args.weights, calls=args.calls)
    result["load_avg_1m"] = os.getloadavg()[0]
    result["cpus"] = os.cpu_count()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
