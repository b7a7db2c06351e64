"""Charts for the latency benchmark (matplotlib, extra ``harness``).

:func:`latency_breakdown` draws ``charts/latency_breakdown.png``, five panels:

1. waterfall of one median call (the transport with the lowest p50): client encode, network, server
   decode, queue, policy, server encode, client decode, each starting where the previous ended;
2. a stacked bar per transport of the median of each stage;
3. per-call timeline: round trip of every measured call against the time it started;
4. CDF of round trips;
5. box plot of round trips (whiskers at p5 / p95, outliers shown).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .percentiles import median_index

STAGE_COLORS = {
    "client_encode": "#8dd3c7",
    "network": "#80b1d3",
    "server_decode": "#fdb462",
    "queue": "#bebada",
    "policy": "#fb8072",
    "server_encode": "#b3de69",
    "client_decode": "#fccde5",
}
TRANSPORT_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def _fmt_ms(x: float) -> str:
    if x >= 100:
        return f"{x:.0f} ms"
    if x >= 1:
        return f"{x:.1f} ms"
    if x >= 0.01:
        return f"{x * 1000:.0f} µs"
    return f"{x * 1000:.1f} µs"


def _plain_log(axis: Any) -> None:
    """Log axis ticks at 1-2-5 steps, written as plain numbers (0.2, 5, 50) instead of 5×10¹."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=30))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _waterfall(ax: Any, transports: list[dict[str, Any]]) -> None:
    """Panel 1: the median call of the fastest network transport (local if nothing else), stage by stage."""
    from .bench.config import STAGE_LABELS, STAGES

    network = [t for t in transports if t["transport"] != "local"] or transports
    best = min(network, key=lambda t: t["round_trip_ms"]["p50"])
    rtts = [s["round_trip_ms"] for s in best["samples"]]
    call = best["samples"][median_index(rtts)]
    start = 0.0
    total = call["round_trip_ms"]
    for i, stage in enumerate(STAGES):
        dur = max(0.0, float(call[f"{stage}_ms"]))
        ax.barh(
            i,
            max(dur, total * 0.002),
            left=start,
            color=STAGE_COLORS[stage],
            edgecolor="black",
            linewidth=0.6,
        )
        ax.text(start + dur + total * 0.01, i, _fmt_ms(dur), va="center", ha="left", fontsize=9)
        start += dur
    ax.set_yticks(range(len(STAGES)), [STAGE_LABELS[s] for s in STAGES])
    ax.invert_yaxis()
    ax.set_xlim(0, max(start, total) * 1.22)
    ax.set_xlabel("ms since the call began")
    ax.set_title(
        f"1 · Waterfall of the median {best['transport']} call (round trip {_fmt_ms(total)})", fontsize=11
    )
    ax.grid(axis="x", alpha=0.3)


def _clipped_top(totals: Any) -> float:
    """The y limit of panel 2: one slow transport must not flatten the others (its bar is clipped)."""
    ordered = sorted(totals)
    typical = ordered[len(ordered) // 2] if ordered else 1.0
    top = max(max(ordered, default=0.0), 1e-6) * 1.18
    if typical > 0 and ordered[-1] > 6 * typical:
        top = max(typical * 3.0, ordered[-2] * 1.3 if len(ordered) > 1 else typical * 3.0)
    return top


def _bar_labels(ax: Any, transports: list[dict[str, Any]], totals: Any, top: float) -> None:
    """The p50 above each bar, in dark text on white (a clipped bar gets its label inside the axes)."""
    box = {"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1}
    for i, t in enumerate(transports):
        label = f"p50 {_fmt_ms(t['round_trip_ms']['p50'])}"
        if totals[i] > top:
            ax.text(
                i, top * 0.97, "↑ " + label, ha="center", va="top", fontsize=9, fontweight="bold", bbox=box
            )
        else:
            ax.text(i, totals[i], label, ha="center", va="bottom", fontsize=9, bbox=box)


def _stacked(ax: Any, transports: list[dict[str, Any]], floor: dict[str, Any] | None) -> None:
    """Panel 2: a stacked bar per transport of the median of each stage, the floor as a line."""
    import numpy as np

    from .bench.config import STAGE_LABELS, STAGES

    x = np.arange(len(transports))
    bottom = np.zeros(len(transports))
    for stage in STAGES:
        vals = np.array([t["breakdown_p50_ms"][stage] or 0.0 for t in transports])
        ax.bar(
            x, vals, bottom=bottom, color=STAGE_COLORS[stage], edgecolor="black", linewidth=0.4,
            label=STAGE_LABELS[stage],
        )  # fmt: skip
        bottom += vals
    top = _clipped_top(bottom)
    _bar_labels(ax, transports, bottom, top)
    if floor and floor["round_trip_ms"]["p50"] < top:
        p50 = floor["round_trip_ms"]["p50"]
        ax.axhline(
            p50, color="black", linestyle=":", linewidth=1.2, label=f"raw-socket floor p50 ({_fmt_ms(p50)})"
        )
    ax.set_xticks(x, [t["transport"] for t in transports])
    ax.set_ylim(0, top)
    ax.set_ylabel("ms (median of each stage)")
    ax.set_title("2 · Where the time goes, per transport", fontsize=11)
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False)
    ax.grid(axis="y", alpha=0.3)


def _timeline(ax: Any, transports: list[dict[str, Any]], colors: dict[str, str]) -> None:
    """Panel 3: the round trip of every measured call against the time it started."""
    for t in transports:
        ts = [s["t_s"] for s in t["samples"]]
        ys = [s["round_trip_ms"] for s in t["samples"]]
        ax.plot(ts, ys, "o", markersize=3, color=colors[t["transport"]], label=t["transport"], alpha=0.8)
    ax.set_xlabel("seconds since measuring began (transports interleaved in rounds)")
    ax.set_ylabel("round trip, ms")
    ax.set_yscale("log")
    ax.legend(fontsize=8, ncol=len(transports), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.set_title("3 · Every measured call", fontsize=11, pad=22)
    _plain_log(ax.yaxis)
    ax.grid(alpha=0.3, which="both")


def _cdf(
    ax: Any, transports: list[dict[str, Any]], colors: dict[str, str], floor: dict[str, Any] | None
) -> None:
    """Panel 4: CDF of round trips (the floor dotted)."""
    import numpy as np

    curves = [
        (t["transport"], [s["round_trip_ms"] for s in t["samples"]], colors[t["transport"]], "-")
        for t in transports
    ]
    if floor and floor.get("samples_ms"):
        curves.append(("floor", floor["samples_ms"], "black", ":"))
    for name, samples, color, style in curves:
        ys = np.sort(samples)
        ax.step(
            ys, np.arange(1, len(ys) + 1) / len(ys), where="post", color=color, linestyle=style, label=name
        )
    ax.set_xscale("log")
    _plain_log(ax.xaxis)
    ax.set_xlabel("round trip, ms (log)")
    ax.set_ylabel("fraction of calls ≤ x")
    ax.axhline(0.5, color="grey", linewidth=0.6)
    ax.axhline(0.95, color="grey", linewidth=0.6, linestyle="--")
    ax.set_title("4 · CDF (lines at p50 and p95)", fontsize=11)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, which="both")


def _box(ax: Any, transports: list[dict[str, Any]], colors: dict[str, str]) -> None:
    """Panel 5: box plot of round trips (whiskers at p5 / p95, outliers shown)."""
    names = [t["transport"] for t in transports]
    data = [[s["round_trip_ms"] for s in t["samples"]] for t in transports]
    bp = ax.boxplot(data, whis=(5, 95), patch_artist=True, flierprops={"markersize": 3})
    ax.set_xticks(range(1, len(names) + 1), names)
    for patch, n in zip(bp["boxes"], names, strict=False):
        patch.set_facecolor(colors[n])
        patch.set_alpha(0.6)
    ax.set_yscale("log")
    _plain_log(ax.yaxis)
    ax.set_ylabel("round trip, ms (log)")
    ax.set_title("5 · Spread (box p25–p75, whiskers p5–p95)", fontsize=11)
    ax.grid(axis="y", alpha=0.3, which="both")


def latency_breakdown(result: dict[str, Any], path: str | Path) -> Path:
    """Write the five-panel chart for a latency ``result`` (see :mod:`pi0remote.harness.bench`)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .bench.report import describe_config

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    transports = [t for t in result["transports"] if t["samples"]]
    colors = {t["transport"]: TRANSPORT_COLORS[i % len(TRANSPORT_COLORS)] for i, t in enumerate(transports)}
    floor = result.get("baselines", {}).get("floor")

    fig = plt.figure(figsize=(16, 13), dpi=110)
    gs = fig.add_gridspec(3, 2, height_ratios=[1.0, 0.9, 1.0], hspace=0.5, wspace=0.22)
    subtitle = "\n".join(textwrap.wrap(describe_config(result), 120))
    fig.suptitle(f"pi0remote round-trip latency\n{subtitle}", fontsize=12, fontweight="bold", y=0.995)
    fig.subplots_adjust(top=0.92)
    _waterfall(fig.add_subplot(gs[0, 0]), transports)
    _stacked(fig.add_subplot(gs[0, 1]), transports, floor)
    _timeline(fig.add_subplot(gs[1, :]), transports, colors)
    _cdf(fig.add_subplot(gs[2, 0]), transports, colors, floor)
    _box(fig.add_subplot(gs[2, 1]), transports, colors)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


__all__ = ["latency_breakdown"]
