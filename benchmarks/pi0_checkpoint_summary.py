"""Merge the JSONs of ``benchmarks/pi0_checkpoint.sh`` into one results file and print the headline ratios.

python benchmarks/pi0_checkpoint_summary.py WORK_DIR OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def load(work: Path, name: str) -> Any:
    try:
        return json.loads((work / name).read_text())
    except (OSError, ValueError):
        return None


def strip(d: Any) -> Any:
    """Drop per-call samples from bench JSON (they are large)."""
    if isinstance(d, dict):
        return {k: strip(v) for k, v in d.items() if k not in ("samples", "per_client", "environment")}
    if isinstance(d, list):
        return [strip(v) for v in d]
    return d


def rtt(bench: Any) -> float | None:
    try:
        return float(bench["transports"][0]["round_trip_ms"]["p50"])
    except (TypeError, KeyError, IndexError):
        return None


def headline(r: dict[str, Any]) -> dict[str, Any]:
    h: dict[str, Any] = {}
    fast, exact = rtt(r.get("fast_b1")), rtt(r.get("exact_b1"))
    openpi = (r.get("openpi_b1") or {}).get("round_trip_ms", {}).get("p50")
    h["fast_tcp_b1_ms"], h["exact_tcp_b1_ms"], h["openpi_server_b1_ms"] = fast, exact, openpi
    if fast and openpi:
        h["fast_over_openpi"] = round(fast / openpi, 3)
    if exact and openpi:
        h["exact_over_openpi"] = round(exact / openpi, 3)
    fc, oc = r.get("fast_clients8") or {}, r.get("openpi_clients8") or {}
    h["fast_8clients_calls_per_s"] = fc.get("throughput_calls_per_s")
    h["openpi_8clients_calls_per_s"] = oc.get("throughput_calls_per_s")
    if h["fast_8clients_calls_per_s"] and h["openpi_8clients_calls_per_s"]:
        h["throughput_ratio"] = round(h["fast_8clients_calls_per_s"] / h["openpi_8clients_calls_per_s"], 2)
    restart = r.get("restart") or {}
    h["ready_s_first_start_and_restart"] = restart.get("ready_s")
    h["restart_tcp_b1_ms"] = rtt(r.get("restart_b1"))
    check = r.get("check") or {}
    batches = (check.get("timing") or {}).get("fast_batches") or {}
    if "8" in batches:
        h["fast_batch8_wall_ms_p50"] = batches["8"]["wall_ms"]["p50"]
    h["bf16_noise_floor"] = check.get("floor")
    rtc = check.get("rtc") or {}
    h["rtc"] = {k: v for k, v in rtc.items() if k.startswith(("n=", "batch")) or k in ("beta", "schedule")}
    eq = check.get("equiv") or {}
    h["equivalence"] = {
        k: {
            m: v.get(m)
            for m in ("max_abs_diff", "mean_abs_diff", "mean_abs_action", "bit_identical")
            if m in v
        }
        for k, v in eq.items()
        if isinstance(v, dict)
    }
    return h


def main() -> int:
    work, out = Path(sys.argv[1]), Path(sys.argv[2])
    r: dict[str, Any] = {"make": load(work, "make.json"), "check": load(work, "pi0_checkpoint_check.json")}
    for name in (
        "fast_b1",
        "fast_clients8",
        "exact_b1",
        "openpi_b1",
        "openpi_clients8",
        "restart",
        "restart_b1",
    ):
        r[name] = strip(load(work, f"{name}.json"))
    r["headline"] = headline(r)
    out.write_text(json.dumps(r, indent=2, default=str))
    print(json.dumps(r["headline"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
