"""The benchmark's results: per-transport summaries, the result documents (``results.json``), the
terminal and Markdown tables, and the output folder (``results.json``, ``results.md``, the chart)."""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ... import __version__
from ..percentiles import percentile, summarize
from .config import SCHEMA, STAGE_LABELS, STAGES, BenchConfig

if TYPE_CHECKING:
    from .rig import Payload, Rig


def _col(samples: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [float(s[key]) for s in samples]


def summarize_transport(
    name: str,
    url: str,
    samples: list[dict[str, Any]],
    payload: Payload,
    floor_p50: float | None,
    openpi_p50: float | None,
) -> dict[str, Any]:
    rtt = summarize(_col(samples, "round_trip_ms"))
    policy_p50 = percentile(_col(samples, "policy_ms"), 50)
    server_p50 = percentile(_col(samples, "server_total_ms"), 50)
    overhead_p50 = percentile(_col(samples, "overhead_ms"), 50)
    non_policy = [s["round_trip_ms"] - s["policy_ms"] for s in samples]
    reply_bytes = [s["reply_bytes"] for s in samples if s["reply_bytes"]]
    out: dict[str, Any] = {
        "transport": name,
        "url": url,
        "n": len(samples),
        "round_trip_ms": rtt,
        "policy_p50_ms": policy_p50,
        "inference_p50_ms": percentile(_col(samples, "inference_ms"), 50),
        "server_total_p50_ms": server_p50,
        "overhead_p50_ms": overhead_p50,
        "non_policy_p50_ms": percentile(non_policy, 50),
        "hz": 1000.0 / rtt["p50"] if rtt["p50"] and rtt["p50"] > 0 else math.nan,
        "request_bytes": payload.request_bytes,
        "reply_bytes": int(percentile(reply_bytes, 50)) if reply_bytes else None,
        "x_floor": percentile(non_policy, 50) / floor_p50 if floor_p50 else None,
        "x_openpi": rtt["p50"] / openpi_p50 if openpi_p50 else None,
        "breakdown_p50_ms": {stage: percentile(_col(samples, f"{stage}_ms"), 50) for stage in STAGES},
        "batch_size_p50": percentile(_col(samples, "batch_size"), 50),
    }
    extra_keys = sorted({k for s in samples for k in s.get("server_extra", {})})
    if extra_keys:
        out["server_extra_p50_ms"] = {
            k: percentile([s["server_extra"][k] for s in samples if k in s.get("server_extra", {})], 50)
            for k in extra_keys
        }
    if payload.kind == "jpeg":
        out["jpeg"] = {
            "quality": payload.quality,
            "raw_request_bytes": payload.raw_bytes,
            "bytes_saved": payload.raw_bytes - payload.request_bytes,
            "saved_fraction": 1.0 - payload.request_bytes / payload.raw_bytes,
            "encode_p50_ms": percentile(_col(samples, "jpeg_encode_ms"), 50),
            "server_decode_p50_ms": percentile(_col(samples, "server_decode_ms"), 50),
        }
    return out


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, int):
        return f"{x:,}"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.1f}"
    return f"{x:.{digits}f}"


TABLE_COLUMNS = [
    ("transport", "transport"),
    ("p50 ms", "p50"),
    ("p95 ms", "p95"),
    ("p99 ms", "p99"),
    ("min ms", "min"),
    ("max ms", "max"),
    ("policy p50 ms", "policy"),
    ("overhead p50 ms", "overhead"),
    ("Hz", "hz"),
    ("request B", "req"),
    ("reply B", "rep"),
    ("× floor", "x_floor"),
    ("× openpi", "x_openpi"),
]
"""The per-transport table, in order (``results.md`` and the terminal show the same columns)."""


def _row(name: str, r: dict[str, Any], cells: Sequence[Any]) -> list[str]:
    """A table row: name, the five round-trip figures, then the remaining columns' values."""
    return [name, *(_fmt(r[k]) for k in ("p50", "p95", "p99", "min", "max")), *cells]


def _transport_row(t: dict[str, Any], jpeg: bool) -> list[str]:
    row = _row(
        t["transport"],
        t["round_trip_ms"],
        [
            _fmt(t["policy_p50_ms"], 3),
            _fmt(t["overhead_p50_ms"], 3),
            _fmt(t["hz"], 1),
            _fmt(t["request_bytes"]),
            _fmt(t["reply_bytes"]),
            _fmt(t["x_floor"]),
            _fmt(t["x_openpi"]),
        ],
    )
    if jpeg:
        j = t["jpeg"]
        row += [
            f"{j['bytes_saved']:,} B ({j['saved_fraction']:.0%})",
            _fmt(j["encode_p50_ms"], 3),
            _fmt(j["server_decode_p50_ms"], 3),
        ]
    return row


def _baseline_row(name: str, key: str, base: dict[str, Any], jpeg: bool) -> list[str]:
    r = base["round_trip_ms"]
    cells = [
        "–",
        "–",
        _fmt(1000.0 / r["p50"], 1),
        _fmt(base.get("request_bytes")),
        _fmt(base.get("reply_bytes")),
    ]
    cells += ["1.00" if key == "floor" else "–", "1.00" if key == "openpi" else "–"]
    return _row(name, r, cells) + (["", "", ""] if jpeg else [])


def table_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = [h for h, _ in TABLE_COLUMNS]
    jpeg = result["config"]["payload"] == "jpeg"
    if jpeg:
        headers += ["JPEG saved", "+encode ms", "server decode ms"]
    rows = [_transport_row(t, jpeg) for t in result["transports"]]
    for name, key in (("floor", "floor"), ("openpi-client", "openpi")):
        base = result["baselines"].get(key)
        if base:
            rows.append(_baseline_row(name, key, base, jpeg))
    return headers, rows


def render_table(result: dict[str, Any], markdown: bool = False) -> str:
    headers, rows = table_rows(result)
    if markdown:
        lines = [
            "| " + " | ".join(headers) + " |",
            "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|",
        ]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=False))
        )

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def describe_config(result: dict[str, Any]) -> str:
    c = result["config"]
    parts = [
        f"policy {c['policy']}" + (" (embedded server)" if c["embedded_server"] else ""),
        f"payload {c['payload']}" + (f" q{c['jpeg_quality']}" if c["payload"] == "jpeg" else ""),
        f"image {c['image']}",
        f"n={c['n']} after {c['warmup']} warm-up calls, {c['rounds']} interleaved rounds",
    ]
    if c.get("netem"):
        parts.append(f"netem {c['netem']} (each direction)")
    return ", ".join(parts)


def render_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# pi0remote latency benchmark, {result['created']}",
        "",
        describe_config(result) + ".",
        "",
        render_table(result, markdown=True),
        "",
        "Round trip is from having the observation to having the decoded action (JPEG encoding included). "
        "Overhead = round trip − server-reported total time. × floor = median(round trip − policy time) / "
        "raw-socket floor p50 (same request bytes, minimal server, same run). Stages: network = client "
        "transport time − server total; queue = server total − decode − policy − encode (waiting for the "
        "policy thread and the hand-offs). Bytes are pi0remote messages "
        "without transport framing (HTTP headers, WebSocket and QUIC framing come on top).",
        "",
        "## Median call, by stage (ms)",
        "",
        "| transport | " + " | ".join(STAGE_LABELS[s] for s in STAGES) + " |",
        "|---|" + "---:|" * len(STAGES),
    ]
    for t in result["transports"]:
        b = t["breakdown_p50_ms"]
        lines.append(f"| {t['transport']} | " + " | ".join(_fmt(b[s], 3) for s in STAGES) + " |")
    if result.get("chart"):
        lines += ["", f"![latency breakdown]({result['chart']})"]
    env = result["environment"]
    lines += [
        "",
        f"pi0remote {env['pi0remote']}, Python {env['python']}, {env['machine']}, {env['cpus']} CPUs.",
    ]
    return "\n".join(lines) + "\n"


def render_clients(result: dict[str, Any], markdown: bool = False) -> str:
    c = result["config"]
    head = (
        f"{c['clients']} clients on {c['transport']} ({c['url']}), policy {c['policy']}, max batch {c['max_batch']}"
        f", {c['n']} calls each: {result['throughput_calls_per_s']:.1f} calls/s, "
        f"mean batch {result['batch_size']['mean']:.2f}, round trip p50 {result['round_trip_ms']['p50']:.1f} ms, "
        f"p95 {result['round_trip_ms']['p95']:.1f} ms"
    )
    headers = ["client", "n", "p50 ms", "p95 ms", "p99 ms", "min ms", "max ms"]
    rows = [
        [
            str(p["client"]),
            str(p["n"]),
            _fmt(p["p50"]),
            _fmt(p["p95"]),
            _fmt(p["p99"]),
            _fmt(p["min"]),
            _fmt(p["max"]),
        ]
        for p in result["per_client"]
    ]
    if markdown:
        body = ["| " + " | ".join(headers) + " |", "|---|" + "---:|" * (len(headers) - 1)]
        body += ["| " + " | ".join(r) + " |" for r in rows]
        return head + "\n\n" + "\n".join(body)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(x.rjust(w) for x, w in zip(r, widths, strict=False)) for r in [headers, *rows]]
    return head + "\n" + "\n".join(lines)


def environment() -> dict[str, Any]:
    return {
        "pi0remote": __version__,
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}",
        "cpus": os.cpu_count(),
    }


def jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, (bytes, bytearray)):
        return f"<{len(x)} bytes>"
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def strip_samples(result: dict[str, Any]) -> dict[str, Any]:
    out = dict(result)
    out.pop("samples", None)
    out["transports"] = [{k: v for k, v in t.items() if k != "samples"} for t in result.get("transports", [])]
    out["baselines"] = {
        k: {kk: vv for kk, vv in v.items() if kk != "samples_ms"}
        for k, v in result.get("baselines", {}).items()
    }
    return out


def output_dir(base: str | None) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    root = Path(base or "bench-results")
    path = root / stamp
    i = 1
    while path.exists():
        i += 1
        path = root / f"{stamp}-{i}"
    path.mkdir(parents=True)
    return path


def write_outputs(result: dict[str, Any], out: Path, charts: bool = True) -> None:
    if result["mode"] == "latency" and charts:
        try:
            from ..charts import latency_breakdown

            chart = out / "charts" / "latency_breakdown.png"
            latency_breakdown(result, chart)
            result["chart"] = "charts/latency_breakdown.png"
        except ImportError as exc:
            result["chart_error"] = f"charts need matplotlib: pip install 'pi0remote[harness]' ({exc})"
    (out / "results.json").write_text(json.dumps(jsonable(result), indent=1) + "\n")
    if result["mode"] == "latency":
        md = render_markdown(result)
    else:
        md = (
            f"# pi0remote concurrent-clients benchmark, {result['created']}\n\n"
            + render_clients(result, True)
            + "\n"
        )
    (out / "results.md").write_text(md)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def baselines_doc(rig: Rig, floor_samples: list[float]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if floor_samples:
        out["floor"] = {
            "round_trip_ms": summarize(floor_samples),
            "request_bytes": len(rig.floor_request) + 4,
            "reply_bytes": rig.floor_reply_size + 4,
            "samples_ms": floor_samples,
            "note": "raw TCP socket, length-prefixed frames, server answers without decoding",
        }
    if rig.openpi is not None and rig.openpi.samples:
        out["openpi"] = {"round_trip_ms": summarize(rig.openpi.samples), "samples_ms": rig.openpi.samples}
    return out


def latency_config_doc(rig: Rig, rounds: int) -> dict[str, Any]:
    cfg, spec, payload = rig.cfg, rig.spec, rig.payload
    return {
        "policy": cfg.policy if cfg.embedded else rig.server_metadata.get("policy", {}).get("name", "?"),
        "embedded_server": cfg.embedded,
        "urls": [u for _, u in rig.targets],
        "n": cfg.n,
        "warmup": cfg.warmup,
        "rounds": rounds,
        "payload": payload.kind,
        "jpeg_quality": payload.quality if payload.kind == "jpeg" else None,
        "image": rig.image,
        "netem": str(spec) if spec else None,
        "netem_note": spec.describe() if spec else None,
        "max_batch": cfg.max_batch,
        "batch_window_ms": cfg.batch_window_ms,
    }


def latency_result(rig: Rig, floor_samples: list[float], rounds: int) -> dict[str, Any]:
    """The ``mode: latency`` result document of a finished :class:`~.rig.Rig` run."""
    baselines = baselines_doc(rig, floor_samples)
    floor_p50 = baselines.get("floor", {}).get("round_trip_ms", {}).get("p50")
    openpi_p50 = baselines.get("openpi", {}).get("round_trip_ms", {}).get("p50")
    summaries = []
    for m in rig.measured:
        s = summarize_transport(m.name, m.url, m.samples, rig.payload, floor_p50, openpi_p50)
        s["samples"] = m.samples
        summaries.append(s)
    return {
        "schema": SCHEMA,
        "created": _now(),
        "mode": "latency",
        "config": latency_config_doc(rig, rounds),
        "environment": environment(),
        "server": {"metadata": jsonable(rig.server_metadata)},
        "payload": {
            "kind": rig.payload.kind,
            "request_bytes": rig.payload.request_bytes,
            "raw_request_bytes": rig.payload.raw_bytes,
            "jpeg_decode_estimate_ms": _jpeg_decode_ms(rig.payload),
        },
        "baselines": baselines,
        "netem_stats": rig.netem_stats(),
        "transports": summaries,
    }


def _jpeg_decode_ms(payload: Payload) -> float | None:
    from .rig import jpeg_decode_ms

    return jpeg_decode_ms(payload)


def clients_result(
    cfg: BenchConfig,
    got: dict[int, list[dict[str, Any]]],
    url: str,
    scheme: str,
    meta: dict[str, Any],
    spec: Any,
) -> dict[str, Any]:
    """The ``mode: clients`` result document from every client's samples (``t_start`` / ``t_end`` each)."""
    all_samples = [s for i in sorted(got) for s in got[i]]
    t0 = min(s["t_start"] for s in all_samples)
    t1 = max(s["t_end"] for s in all_samples)
    per_client = []
    for i in sorted(got):
        rtt = summarize(_col(got[i], "round_trip_ms"))
        per_client.append({"client": i, "n": len(got[i]), **{k: v for k, v in rtt.items() if k != "n"}})
    batch = _col(all_samples, "batch_size")
    for s in all_samples:
        s["t_s"] = s.pop("t_start") - t0
        s.pop("t_end")
    return {
        "schema": SCHEMA,
        "created": _now(),
        "mode": "clients",
        "config": {
            "policy": cfg.policy if cfg.embedded else meta.get("policy", {}).get("name", "?"),
            "embedded_server": cfg.embedded,
            "url": url,
            "transport": scheme,
            "clients": cfg.clients,
            "n": cfg.n,
            "warmup": cfg.warmup,
            "payload": cfg.payload,
            "image": cfg.image_kind,
            "netem": str(spec) if spec else None,
            "max_batch": cfg.max_batch if cfg.embedded else meta.get("max_batch"),
            "batch_window_ms": cfg.batch_window_ms if cfg.embedded else None,
        },
        "environment": environment(),
        "throughput_calls_per_s": len(all_samples) / (t1 - t0),
        "wall_s": t1 - t0,
        "round_trip_ms": summarize(_col(all_samples, "round_trip_ms")),
        "per_client": per_client,
        "per_client_p50_ms": percentile([c["p50"] for c in per_client], 50),
        "per_client_p95_ms": percentile([c["p95"] for c in per_client], 50),
        "batch_size": {"mean": float(np.mean(batch)), "p50": percentile(batch, 50), "max": max(batch)},
        "policy_p50_ms": percentile(_col(all_samples, "policy_ms"), 50),
        "samples": all_samples,
    }
