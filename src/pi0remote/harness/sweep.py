"""Latency sweep: success, stalls and discontinuity versus injected latency, one line per strategy.

``python -m pi0remote.eval --policy expert --no-images --sweep-latency 0,100,200,300,500,800
--exec blocking,async --episodes 50`` (or ``--exec blocking,async-latest,async-linear,rtc`` for a flow
policy) runs every (strategy, latency) point on the realtime clock with
the same seeds, and writes, besides the usual results folder (episodes.jsonl, aggregate.json,
summary.md), ``sweep.json`` (one entry per point) and ``sweep.png`` (six panels: success rate with 95 %
Wilson bars, stall fraction, time to success, largest joint jump, largest jump at a chunk switch, and
real-time chunking's prefix error).
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from .clock import LatencySpec, delay_ticks
from .eval import EvalConfig, ResultsWriter, aggregate, evaluate_mode

POINT_KEYS = (
    "episodes", "successes", "success_rate", "wilson95_low", "wilson95_high", "mean_steps_to_success",
    "mean_success_time_s", "stall_fraction", "stall_fraction_max", "stall_fraction_total",
    "effective_rate_hz", "discontinuity_rad_mean", "discontinuity_rad_max", "boundary_jump_rad_mean", "boundary_jump_rad_max",
    "policy_calls_per_episode", "round_trip_ms_p50", "prefix_error_max_mean",
)  # fmt: skip


def parse_latencies(text: str) -> list[float]:
    """``0,100,200,300ms`` -> milliseconds (units as in ``--latency``; no jitter in a sweep)."""
    out = []
    for part in text.split(","):
        if part.strip():
            spec = LatencySpec.parse(part)
            if spec.jitter_ms:
                raise ValueError("--sweep-latency takes fixed latencies (no ±jitter)")
            out.append(spec.mean_ms)
    if not out:
        raise ValueError("--sweep-latency needs at least one latency")
    return out


def point_label(mode: str, strategy: str, latency_ms: float) -> str:
    return f"{mode} {strategy} {latency_ms:g}ms"


def run_sweep(
    mode: str, cfg: EvalConfig, latencies_ms: list[float], strategies: list[str], *,
    client: Any = None, env: Any = None,
) -> tuple[Path, dict[str, Any]]:  # fmt: skip
    """Every strategy at every latency on the realtime clock (same seeds); returns the folder and the
    sweep document written to ``sweep.json``."""
    from contextlib import nullcontext

    from .eval import open_policy

    base = replace(cfg, clock="realtime")
    writer = ResultsWriter(
        cfg.out, {**asdict(base), "modes": [mode], "sweep_latency_ms": latencies_ms, "strategies": strategies},
        prefix="sweep-",
    )  # fmt: skip
    own = client is None
    client = open_policy(mode) if own else client
    points, aggregates = [], []
    try:
        if env is None:
            from ..sim.env import make_env

            env_cm: Any = make_env(cfg.task, render=False, max_steps=cfg.max_steps)
        else:
            env_cm = nullcontext(env)
        with env_cm as sim:
            for strategy in strategies:
                for lat in latencies_ms:
                    point_cfg = replace(base, strategy=strategy, latency=f"{lat:g}ms")
                    label = point_label(mode, strategy, lat)
                    results = evaluate_mode(label, point_cfg, sim, writer, client)
                    agg = aggregate(label, results)
                    aggregates.append(agg)
                    points.append(
                        {"strategy": strategy, "latency_ms": lat, "delay_ticks": delay_ticks(lat)}
                        | {k: agg.get(k) for k in POINT_KEYS}
                    )
    finally:
        if own and hasattr(client, "close"):
            client.close()
    doc = {
        "mode": mode,
        "task": cfg.task,
        "episodes": cfg.episodes,
        "seeds": [cfg.seed, cfg.seed + cfg.episodes - 1],
        "action_horizon": cfg.action_horizon,
        "prefetch_at": cfg.prefetch_at,
        "blend": cfg.blend,
        "max_in_flight": cfg.max_in_flight,
        "warm_start": cfg.warm_start,
        "dt_s": 0.02,
        "points": points,
    }
    table = writer.finish(aggregates)
    (writer.dir / "sweep.json").write_text(json.dumps(doc, indent=2) + "\n")
    plot_sweep(doc, writer.dir / "sweep.png")
    print(f"\n{table}\n\n{format_sweep(doc)}\n\nresults: {writer.dir}")
    return writer.dir, doc


def format_sweep(doc: dict[str, Any]) -> str:
    """A compact Markdown table: one row per point."""
    lines = [
        "| strategy | latency ms | ticks | success [95% CI] | stall | jump rad mean / max | switch jump rad "
        "| steps to success | t success s |",
        "|" + "---|" * 9,
    ]

    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for p in doc["points"]:
        rate = f"{p['successes']}/{p['episodes']} [{p['wilson95_low']:.0%}, {p['wilson95_high']:.0%}]"
        lines.append(
            f"| {p['strategy']} | {p['latency_ms']:g} | {p['delay_ticks']} | {rate} "
            f"| {f(p['stall_fraction'], '.1%')} "
            f"| {f(p['discontinuity_rad_mean'], '.2f')} / {f(p['discontinuity_rad_max'], '.2f')} "
            f"| {f(p.get('boundary_jump_rad_mean'), '.3f')} "
            f"| {f(p['mean_steps_to_success'], '.1f')} | {f(p['mean_success_time_s'], '.2f')} |"
        )
    return "\n".join(lines)


def plot_sweep(doc: dict[str, Any], path: Path) -> Path:
    """Six panels versus latency, one line per strategy (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    strategies = list(dict.fromkeys(p["strategy"] for p in doc["points"]))
    fig, axes = plt.subplots(2, 3, figsize=(15, 7), sharex=True)
    panels = [
        (axes[0, 0], "success rate (95% Wilson)", "success_rate"),
        (axes[0, 1], "stall fraction (ticks holding)", "stall_fraction"),
        (axes[0, 2], "time to success (s, mean over successes, incl. first wait)", "mean_success_time_s"),
        (axes[1, 0], "largest arm-joint jump per episode (rad, mean)", "discontinuity_rad_mean"),
        (axes[1, 1], "largest jump at a chunk switch per episode (rad, mean)", "boundary_jump_rad_mean"),
        (axes[1, 2], "rtc: largest prefix_error per episode (mean)", "prefix_error_max_mean"),
    ]
    markers = {"blocking": "s", "async": "o", "async-latest": "o", "async-linear": "^", "rtc": "D"}
    span = max((p["latency_ms"] for p in doc["points"]), default=0.0) or 1.0
    for i, s in enumerate(strategies):
        pts = [p for p in doc["points"] if p["strategy"] == s]
        shift = (i - (len(strategies) - 1) / 2) * 0.012 * span  # keep error bars apart
        x = np.array([p["latency_ms"] for p in pts], dtype=float) + shift
        for ax, _, key in panels:
            y = np.array([np.nan if p[key] is None else p[key] for p in pts], dtype=float)
            if key == "success_rate":
                low = np.array([p["wilson95_low"] for p in pts])
                high = np.array([p["wilson95_high"] for p in pts])
                ax.errorbar(x, y, yerr=[y - low, high - y], marker=markers.get(s, "o"), capsize=4, label=s)
            else:
                ax.plot(x, y, marker=markers.get(s, "o"), label=s)
    for ax, title, key in panels:
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if key in ("success_rate", "stall_fraction"):
            ax.set_ylim(-0.03, 1.05)
    for ax in axes[1]:
        ax.set_xlabel("injected round-trip latency (ms)")
    axes[0, 0].legend(loc="lower left")
    fig.suptitle(
        f"{doc['mode']} on {doc['task']}: {doc['episodes']} seeds per point, realtime clock\n"
        f"(async: prefetch_at={doc['prefetch_at']}, blend={doc['blend']}, max_in_flight="
        f"{doc.get('max_in_flight', 1)}; blocking: {doc['action_horizon']} steps per chunk)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["format_sweep", "parse_latencies", "plot_sweep", "run_sweep"]
