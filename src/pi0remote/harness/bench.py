"""Latency benchmark: round trip, server time and overhead of every transport, in one run.

``python -m pi0remote.bench`` starts a policy server (a subprocess, built-in policy, loopback) and
measures every available transport against it; ``--url`` measures servers that already run.
Everything is written to a timestamped folder: ``results.json`` (per-call samples included),
``results.md`` and ``charts/latency_breakdown.png``.

Each call's time is split into client encode, network (transport time minus the server's total),
server decode, queue, policy, server encode and client decode. ``overhead`` is round trip minus the
server's reported total time; ``× floor`` is the median of (round trip − policy time) over a raw-socket
floor that sends the same bytes (measured in the same run, interleaved with the transports); ``×
openpi`` compares against openpi-client's ``WebsocketClientPolicy`` when ``openpi-client`` is installed.

``--clients N`` runs N client processes at once against one transport and reports aggregate
throughput and per-client latency (dynamic batching: ``--max-batch``, ``--batch-window-ms``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__, protocol
from .percentiles import percentile, summarize

ALL_TRANSPORTS = ("tcp", "ws", "http", "quic", "quic+tcp", "local")
STAGES = ("client_encode", "network", "server_decode", "queue", "policy", "server_encode", "client_decode")
"""The seven parts of one call, in time order (they add up to the round trip)."""
STAGE_LABELS = {
    "client_encode": "client encode",
    "network": "network",
    "server_decode": "server decode",
    "queue": "queue",
    "policy": "policy",
    "server_encode": "server encode",
    "client_decode": "client decode",
}
SCHEMA = "pi0remote.bench/1"


# -- what can be measured -------------------------------------------------------------------------
def quic_available() -> bool:
    """QUIC needs ``aioquic`` and the server's QUIC listener."""
    try:
        return (
            importlib.util.find_spec("aioquic") is not None
            and importlib.util.find_spec("pi0remote.server.quic") is not None
            and importlib.util.find_spec("pi0remote.client.quic") is not None
        )
    except (ImportError, ValueError):
        return False


def openpi_available() -> bool:
    try:
        return (
            importlib.util.find_spec("openpi_client") is not None
            and importlib.util.find_spec("pi0remote.server.openpi_ws") is not None
        )
    except (ImportError, ValueError):
        return False


def available_transports() -> list[str]:
    return [t for t in ALL_TRANSPORTS if t not in ("quic", "quic+tcp") or quic_available()]


def parse_transports(text: str | None) -> list[str] | None:
    """``"tcp,ws"`` -> ``["tcp", "ws"]``; ``None`` or ``"all"`` -> None (everything available)."""
    if text is None or text.strip().lower() in ("", "all"):
        return None
    out = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [t for t in out if t not in ALL_TRANSPORTS]
    if bad:
        raise ValueError(f"unknown transport(s) {bad}; known: {', '.join(ALL_TRANSPORTS)} or all")
    return out


# -- observations ---------------------------------------------------------------------------------
def sim_frame() -> np.ndarray:
    """A rendered gym-aloha top-camera frame as the canonical ``uint8[3, 224, 224]`` (needs extra ``sim``)."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    from ..sim.env import make_env, obs_to_request

    with make_env(render=True) as env:
        return obs_to_request(env.reset(0))["cam_high"]


def make_obs(image: str = "random", seed: int = 0) -> tuple[dict[str, Any], str]:
    """The canonical ALOHA request (plausible joint state) with a random image or a sim frame.

    Returns the observation and what image it carries (``random``, ``sim``, or ``random`` after a
    failed ``sim`` render, with the reason).
    """
    from .obs import canonical_obs

    obs = canonical_obs(seed)
    if image == "random":
        return obs, "random"
    if image != "sim":
        raise ValueError(f"--image is random or sim, got {image!r}")
    try:
        obs["cam_high"] = sim_frame()
        return obs, "sim"
    except Exception as exc:  # gym-aloha / MuJoCo missing or no GL
        return obs, f"random (sim frame unavailable: {type(exc).__name__}: {exc})"


class Payload:
    """Turns the observation into what is sent on each call (raw arrays, or the camera as JPEG)."""

    def __init__(self, obs: dict[str, Any], kind: str = "raw", quality: int = 90) -> None:
        if kind not in ("raw", "jpeg"):
            raise ValueError(f"--payload is raw or jpeg, got {kind!r}")
        self.obs = obs
        self.kind = kind
        self.quality = quality
        self.raw_bytes = protocol_size(obs)
        self.sample = self.prepare()[0]
        self.request_bytes = protocol_size(self.sample)

    def prepare(self) -> tuple[dict[str, Any], float]:
        """The observation to send and the milliseconds spent preparing it (JPEG encoding)."""
        if self.kind == "raw":
            return self.obs, 0.0
        from ..jpeg import jpeg_obs

        t0 = time.perf_counter()
        out = jpeg_obs(self.obs, self.quality)
        return out, (time.perf_counter() - t0) * 1000.0


def protocol_size(obs: dict[str, Any]) -> int:
    message = protocol.encode_message(protocol.INFER, obs)
    if isinstance(message, (bytes, bytearray, memoryview)):
        return len(message)
    return sum(len(memoryview(p).cast("B")) for p in message)  # scatter-gather parts


def jpeg_decode_ms(payload: Payload, repeats: int = 20) -> float | None:
    """Median time to decode the payload's JPEG camera here (an estimate of the server's extra work)."""
    if payload.kind != "jpeg":
        return None
    from ..jpeg import decode_jpeg_fields

    times = []
    for _ in range(repeats):
        obs = dict(payload.sample)
        t0 = time.perf_counter()
        decode_jpeg_fields(obs)
        times.append((time.perf_counter() - t0) * 1000.0)
    return percentile(times, 50)


# -- one call -------------------------------------------------------------------------------------
_SERVER_KEYS = ("decode_ms", "queue_ms", "policy_ms", "encode_ms", "total_ms", "batch_size")


def call_record(reply: dict[str, Any], prep_ms: float, t_start: float, reply_bytes: int) -> dict[str, Any]:
    """One call's figures (milliseconds) from a reply's ``client_timing`` and ``server_timing``."""
    ct = reply.get("client_timing") or {}
    st = reply.get("server_timing") or {}
    total = float(st.get("total_ms", 0.0) or 0.0)
    transport = float(ct.get("transport_ms", 0.0))
    policy = float(st.get("policy_ms", reply.get("inference_ms", 0.0)) or 0.0)
    rec: dict[str, Any] = {
        "t_s": t_start,
        "round_trip_ms": float(ct.get("round_trip_ms", 0.0)) + prep_ms,
        "client_encode_ms": float(ct.get("encode_ms", 0.0)) + prep_ms,
        "jpeg_encode_ms": prep_ms,
        "transport_ms": transport,
        "network_ms": max(0.0, transport - total),
        "client_decode_ms": float(ct.get("decode_ms", 0.0)),
        "server_decode_ms": float(st.get("decode_ms", 0.0) or 0.0),
        "queue_reported_ms": float(st.get("queue_ms", 0.0) or 0.0),
        "policy_ms": policy,
        "server_encode_ms": float(st.get("encode_ms", 0.0) or 0.0),
        "server_total_ms": total,
        "inference_ms": float(reply.get("inference_ms", policy) or 0.0),
        "batch_size": int(st.get("batch_size", 1) or 1),
        "reply_bytes": reply_bytes,
    }
    # "queue" is all server time that is not decode, policy or encode: waiting for the policy thread
    # (reported queue_ms) plus the hand-offs between event loop and policy thread, so the seven stages
    # add up to the round trip.
    rec["queue_ms"] = max(0.0, total - rec["server_decode_ms"] - policy - rec["server_encode_ms"])
    rec["overhead_ms"] = rec["round_trip_ms"] - total
    extra = {k: float(v) for k, v in st.items() if k not in _SERVER_KEYS and isinstance(v, (int, float))}
    if extra:
        rec["server_extra"] = extra  # e.g. π₀'s preprocess_ms / device_ms / postprocess_ms
    return rec


class Measured:
    """A connected client plus its samples; counts reply bytes by wrapping the transport."""

    def __init__(self, name: str, url: str, client: Any) -> None:
        self.name = name
        self.url = url
        self.client = client
        self.samples: list[dict[str, Any]] = []
        self._reply_bytes = 0
        transport = getattr(client, "transport", None)
        if transport is not None and hasattr(transport, "roundtrip"):
            inner = transport.roundtrip

            def counted(message: Any) -> Any:
                kind, body = inner(message)
                self._reply_bytes = len(body) + 1
                return kind, body

            transport.roundtrip = counted

    def call(self, payload: Payload, t_origin: float, keep: bool) -> None:
        t0 = time.perf_counter()
        obs, prep_ms = payload.prepare()
        reply = self.client.infer(obs)
        if keep:
            self.samples.append(call_record(reply, prep_ms, t0 - t_origin, self._reply_bytes))

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:
            pass


class OpenpiMeasured:
    """openpi-client's ``WebsocketClientPolicy`` against the server's openpi listener (a baseline)."""

    def __init__(self, url: str, obs: dict[str, Any]) -> None:
        from urllib.parse import urlsplit

        from openpi_client.websocket_client_policy import WebsocketClientPolicy

        parts = urlsplit(url)
        self.name = "openpi-client"
        self.url = url
        self.policy = WebsocketClientPolicy(host=parts.hostname or "127.0.0.1", port=parts.port)
        self.obs = {
            "images": {k: v for k, v in obs.items() if k.startswith("cam_")},
            **{k: v for k, v in obs.items() if not k.startswith("cam_")},
        }
        self.samples: list[float] = []

    def call(self, t_origin: float, keep: bool) -> None:
        t0 = time.perf_counter()
        self.policy.infer(self.obs)
        if keep:
            self.samples.append((time.perf_counter() - t0) * 1000.0)

    def close(self) -> None:
        ws = getattr(self.policy, "_ws", None)
        if ws is not None:
            try:
                ws.close()
            except Exception:
                pass


# -- summaries ------------------------------------------------------------------------------------
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


def table_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = [h for h, _ in TABLE_COLUMNS]
    jpeg = result["config"]["payload"] == "jpeg"
    if jpeg:
        headers += ["JPEG saved", "+encode ms", "server decode ms"]
    rows = []
    for t in result["transports"]:
        r = t["round_trip_ms"]
        row = [
            t["transport"],
            _fmt(r["p50"]),
            _fmt(r["p95"]),
            _fmt(r["p99"]),
            _fmt(r["min"]),
            _fmt(r["max"]),
            _fmt(t["policy_p50_ms"], 3),
            _fmt(t["overhead_p50_ms"], 3),
            _fmt(t["hz"], 1),
            _fmt(t["request_bytes"]),
            _fmt(t["reply_bytes"]),
            _fmt(t["x_floor"]),
            _fmt(t["x_openpi"]),
        ]
        if jpeg:
            j = t["jpeg"]
            row += [
                f"{j['bytes_saved']:,} B ({j['saved_fraction']:.0%})",
                _fmt(j["encode_p50_ms"], 3),
                _fmt(j["server_decode_p50_ms"], 3),
            ]
        rows.append(row)
    for name, key in (("floor", "floor"), ("openpi-client", "openpi")):
        base = result["baselines"].get(key)
        if base:
            r = base["round_trip_ms"]
            row = [
                name,
                _fmt(r["p50"]),
                _fmt(r["p95"]),
                _fmt(r["p99"]),
                _fmt(r["min"]),
                _fmt(r["max"]),
                "–",
                "–",
                _fmt(1000.0 / r["p50"], 1),
                _fmt(base.get("request_bytes")),
                _fmt(base.get("reply_bytes")),
                "1.00" if key == "floor" else "–",
                "1.00" if key == "openpi" else "–",
            ]
            rows.append(row + (["", "", ""] if jpeg else []))
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


# -- the run --------------------------------------------------------------------------------------
def _progress(total: int, desc: str, enabled: bool) -> Any:
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="call", file=sys.stderr, disable=not enabled, leave=False)
    except ImportError:  # pragma: no cover - tqdm is a dependency

        class _Null:
            def update(self, n: int = 1) -> None: ...
            def set_description(self, d: str) -> None: ...
            def close(self) -> None: ...

        return _Null()


def server_args(args: argparse.Namespace, transports: Sequence[str], openpi: bool) -> list[str]:
    """``pi0remote.serve`` flags for the embedded server."""
    net = [t for t in transports if t != "local"]
    out = ["--policy", args.policy, "--host", "127.0.0.1", "--http-port", "0", "--tcp-port", "0"]
    plain = [t for t in net if t in ("http", "ws", "tcp")]
    out += ["--transports", ",".join(plain) or "tcp"]
    if any(t in ("quic", "quic+tcp") for t in net):
        out += ["--quic-port", "0"]
    if openpi:
        out += ["--openpi-port", "0"]
    out += ["--max-batch", str(args.max_batch)]
    if args.batch_window_ms is not None:  # else the server's default
        out += ["--batch-window-ms", str(args.batch_window_ms)]
    return out


def _label_urls(urls: Sequence[str]) -> list[tuple[str, str]]:
    seen: dict[str, int] = {}
    out = []
    for url in urls:
        scheme = url.split("://", 1)[0].lower()
        seen[scheme] = seen.get(scheme, 0) + 1
        out.append((scheme if seen[scheme] == 1 else f"{scheme}#{seen[scheme]}", url))
    return out


def _connect(url: str, quic_fingerprint: str | None, quic_insecure: bool, timeout: float) -> Any:
    from ..client import connect

    options: dict[str, Any] = {}
    if url.startswith(("quic://", "quic+tcp://")):
        if quic_fingerprint:
            options["quic_fingerprint"] = quic_fingerprint
        elif quic_insecure:
            options["quic_insecure_skip_verify"] = True
    return connect(url, timeout=timeout, **options)


def run_latency(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """Measure every selected transport; returns the result document (not yet written)."""
    from .floor import canonical_sizes, measure_floor, start_floor_server
    from .netem import NetemGroup, NetemProxy, NetemSpec
    from .procs import ServerProcess

    wanted = parse_transports(args.transport)
    obs, image = make_obs(
        args.image if args.image != "auto" else ("sim" if args.payload == "jpeg" else "random")
    )
    payload = Payload(obs, args.payload, args.jpeg_quality)
    spec = NetemSpec.parse(args.netem) if args.netem else None
    embedded = not args.url
    rounds = max(1, min(args.rounds, args.n))
    per_round = [args.n // rounds + (1 if i < args.n % rounds else 0) for i in range(rounds)]

    with ExitStack() as stack:
        targets: list[tuple[str, str]] = []
        quic_fp: str | None = None
        openpi_url: str | None = None
        if embedded:
            transports = [t for t in (wanted or available_transports()) if t in available_transports()]
            skipped = [t for t in (wanted or []) if t not in transports]
            if skipped:
                log(f"skipping {', '.join(skipped)}: not available here (QUIC needs aioquic)")
            use_openpi = args.baselines and openpi_available()
            log(
                f"starting server: python -m pi0remote.serve {' '.join(server_args(args, transports, use_openpi))}"
            )
            srv = stack.enter_context(ServerProcess(server_args(args, transports, use_openpi)))
            for url in srv.urls:
                scheme = url.split("://", 1)[0]
                if scheme == "openpi":
                    openpi_url = url
                elif scheme in transports:
                    targets.append((scheme, url))
            targets.sort(key=lambda t: ALL_TRANSPORTS.index(t[0]))
            if "local" in transports:
                targets.append(("local", f"local://{args.policy}"))
        else:
            labelled = _label_urls(args.url)
            targets = [(n, u) for n, u in labelled if wanted is None or n.split("#")[0] in wanted]
        if not targets:
            raise SystemExit("pi0remote.bench: no transport to measure")

        group = stack.enter_context(NetemGroup([u for _, u in targets], spec)) if spec else None

        # Connect everything first (the QUIC fingerprint comes from another transport's metadata).
        measured: list[Measured] = []
        for name, url in sorted(targets, key=lambda t: t[0].startswith("quic")):
            via = group.url_for(url) if group else url
            client = _connect(via, quic_fp, args.quic_insecure or embedded, args.timeout)
            quic_fp = quic_fp or client.metadata.get("quic_fingerprint")
            measured.append(Measured(name, url, client))
            stack.callback(measured[-1].close)
        measured.sort(key=lambda m: [t[0] for t in targets].index(m.name))
        server_meta = measured[0].client.metadata

        floor_port = None
        request, reply_size = canonical_sizes(payload.sample)
        loopback = all(
            u.startswith("local://") or "127.0.0.1" in u or "localhost" in u or "[::1]" in u
            for _, u in targets
        )
        if args.baselines and loopback:
            floor_proc, floor_port = start_floor_server(reply_size)
            stack.callback(floor_proc.kill)
            if spec:
                proxy = stack.enter_context(NetemProxy("127.0.0.1", floor_port, spec))
                floor_port = proxy.port
        openpi: OpenpiMeasured | None = None
        if openpi_url:
            try:
                openpi = OpenpiMeasured(
                    group.url_for(openpi_url.replace("openpi://", "ws://")) if group else openpi_url, obs
                )
                stack.callback(openpi.close)
            except Exception as exc:
                log(f"openpi-client baseline skipped: {type(exc).__name__}: {exc}")
                openpi = None

        total = (args.warmup + args.n) * (len(measured) + (floor_port is not None) + (openpi is not None))
        bar = stack.enter_context(_closing(_progress(total, "warm-up", not args.no_progress)))
        t_origin = time.perf_counter()
        for m in measured:
            bar.set_description(f"warm-up {m.name}")
            for _ in range(args.warmup):
                m.call(payload, t_origin, keep=False)
                bar.update()
        if floor_port is not None:
            measure_floor(floor_port, request, 0, args.warmup)
            bar.update(args.warmup)
        if openpi is not None:
            for _ in range(args.warmup):
                openpi.call(t_origin, keep=False)
                bar.update()
        floor_samples: list[float] = []
        t_origin = time.perf_counter()
        for r, k in enumerate(per_round):  # interleaved rounds: every path sees the same machine noise
            if floor_port is not None:
                bar.set_description(f"round {r + 1}/{rounds} floor")
                floor_samples += [s * 1000.0 for s in measure_floor(floor_port, request, k, 1)]
                bar.update(k)
            for m in measured:
                bar.set_description(f"round {r + 1}/{rounds} {m.name}")
                for _ in range(k):
                    m.call(payload, t_origin, keep=True)
                    bar.update()
            if openpi is not None:
                bar.set_description(f"round {r + 1}/{rounds} openpi-client")
                for _ in range(k):
                    openpi.call(t_origin, keep=True)
                    bar.update()
        netem_stats = (
            {f"{h}:{p}": proxy.stats() for (h, p), proxy in group.proxies.items()} if group else None
        )

    baselines: dict[str, Any] = {}
    if floor_samples:
        baselines["floor"] = {
            "round_trip_ms": summarize(floor_samples),
            "request_bytes": len(request) + 4,
            "reply_bytes": reply_size + 4,
            "samples_ms": floor_samples,
            "note": "raw TCP socket, length-prefixed frames, server answers without decoding",
        }
    if openpi is not None and openpi.samples:
        baselines["openpi"] = {"round_trip_ms": summarize(openpi.samples), "samples_ms": openpi.samples}
    floor_p50 = baselines.get("floor", {}).get("round_trip_ms", {}).get("p50")
    openpi_p50 = baselines.get("openpi", {}).get("round_trip_ms", {}).get("p50")
    summaries = []
    for m in measured:
        s = summarize_transport(m.name, m.url, m.samples, payload, floor_p50, openpi_p50)
        s["samples"] = m.samples
        summaries.append(s)
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "mode": "latency",
        "config": {
            "policy": args.policy if embedded else server_meta.get("policy", {}).get("name", "?"),
            "embedded_server": embedded,
            "urls": [u for _, u in targets],
            "n": args.n,
            "warmup": args.warmup,
            "rounds": rounds,
            "payload": payload.kind,
            "jpeg_quality": payload.quality if payload.kind == "jpeg" else None,
            "image": image,
            "netem": str(spec) if spec else None,
            "netem_note": spec.describe() if spec else None,
            "max_batch": args.max_batch,
            "batch_window_ms": args.batch_window_ms,
        },
        "environment": environment(),
        "server": {"metadata": _jsonable(server_meta)},
        "payload": {
            "kind": payload.kind,
            "request_bytes": payload.request_bytes,
            "raw_request_bytes": payload.raw_bytes,
            "jpeg_decode_estimate_ms": jpeg_decode_ms(payload),
        },
        "baselines": baselines,
        "netem_stats": netem_stats,
        "transports": summaries,
    }


class _closing:
    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def __enter__(self) -> Any:
        return self.bar

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def environment() -> dict[str, Any]:
    return {
        "pi0remote": __version__,
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}",
        "cpus": os.cpu_count(),
    }


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, (bytes, bytearray)):
        return f"<{len(x)} bytes>"
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# -- several clients at once ----------------------------------------------------------------------
def _client_worker(
    index: int,
    url: str,
    n: int,
    warmup: int,
    payload_kind: str,
    quality: int,
    image: str,
    quic_fp: str | None,
    timeout: float,
    start: Any,
    ready: Any,
    counter: Any,
    results: Any,
) -> None:
    try:
        obs, _ = make_obs(image, seed=index)
        payload = Payload(obs, payload_kind, quality)
        client = _connect(url, quic_fp, True, timeout)
        m = Measured(f"client{index}", url, client)
        for _ in range(warmup):
            m.call(payload, 0.0, keep=False)
        ready.put(index)
        start.wait()
        t_origin = 0.0
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            m.call(payload, t_origin, keep=True)
            rec = m.samples[-1]
            rec["t_start"] = t0
            rec["t_end"] = time.perf_counter()
            out.append(rec)
            with counter.get_lock():
                counter.value += 1
        m.close()
        results.put((index, out, None))
    except BaseException as exc:  # report, never hang the parent
        ready.put(index)
        results.put((index, [], f"{type(exc).__name__}: {exc}"))


def run_clients(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """``--clients N``: N processes call one transport at once; aggregate throughput and per-client latency."""
    from .netem import NetemGroup, NetemSpec
    from .procs import ServerProcess

    wanted = parse_transports(args.transport) or ["tcp"]
    scheme = wanted[0]
    if scheme == "local":
        raise SystemExit("pi0remote.bench: --clients needs a network transport")
    spec = NetemSpec.parse(args.netem) if args.netem else None
    embedded = not args.url
    image = args.image if args.image != "auto" else ("sim" if args.payload == "jpeg" else "random")
    with ExitStack() as stack:
        if embedded:
            sargs = server_args(args, [scheme], False)
            log(f"starting server: python -m pi0remote.serve {' '.join(sargs)}")
            srv = stack.enter_context(ServerProcess(sargs))
            url = srv.url(scheme)
        else:
            matches = [u for u in args.url if u.split("://", 1)[0] == scheme] or list(args.url)
            url = matches[0]
            scheme = url.split("://", 1)[0]
        group = stack.enter_context(NetemGroup([url], spec)) if spec else None
        via = group.url_for(url) if group else url
        probe = _connect(via, None, True, args.timeout)
        meta = probe.metadata
        probe.close()
        ctx = mp.get_context("spawn")
        start, ready, results = ctx.Event(), ctx.Queue(), ctx.Queue()
        counter = ctx.Value("i", 0)
        procs = [
            ctx.Process(
                target=_client_worker,
                args=(
                    i,
                    via,
                    args.n,
                    args.warmup,
                    args.payload,
                    args.jpeg_quality,
                    image,
                    meta.get("quic_fingerprint"),
                    args.timeout,
                    start,
                    ready,
                    counter,
                    results,
                ),
                daemon=True,
            )
            for i in range(args.clients)
        ]
        for p in procs:
            p.start()
            stack.callback(lambda p=p: (p.join(5), p.is_alive() and p.kill()))
        for _ in procs:
            ready.get(timeout=300)
        bar = stack.enter_context(
            _closing(_progress(args.n * args.clients, f"{args.clients} clients", not args.no_progress))
        )
        start.set()
        got: dict[int, tuple[list[dict[str, Any]], str | None]] = {}
        seen = 0
        while len(got) < len(procs):
            try:
                index, samples, error = results.get(timeout=0.2)
                got[index] = (samples, error)
            except Exception:
                if not any(p.is_alive() for p in procs) and results.empty():
                    break
            bar.update(counter.value - seen)
            seen = counter.value
        bar.update(counter.value - seen)
    errors = {i: e for i, (_, e) in got.items() if e}
    if errors:
        raise SystemExit(f"pi0remote.bench: client(s) failed: {errors}")
    all_samples = [s for i in sorted(got) for s in got[i][0]]
    t0 = min(s["t_start"] for s in all_samples)
    t1 = max(s["t_end"] for s in all_samples)
    per_client = []
    for i in sorted(got):
        rtt = _col(got[i][0], "round_trip_ms")
        per_client.append(
            {"client": i, "n": len(rtt), **{k: v for k, v in summarize(rtt).items() if k != "n"}}
        )
    rtt_all = summarize(_col(all_samples, "round_trip_ms"))
    batch = _col(all_samples, "batch_size")
    for s in all_samples:
        s["t_s"] = s.pop("t_start") - t0
        s.pop("t_end")
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "mode": "clients",
        "config": {
            "policy": args.policy if embedded else meta.get("policy", {}).get("name", "?"),
            "embedded_server": embedded,
            "url": url,
            "transport": scheme,
            "clients": args.clients,
            "n": args.n,
            "warmup": args.warmup,
            "payload": args.payload,
            "image": image,
            "netem": str(spec) if spec else None,
            "max_batch": args.max_batch if embedded else meta.get("max_batch"),
            "batch_window_ms": args.batch_window_ms if embedded else None,
        },
        "environment": environment(),
        "throughput_calls_per_s": len(all_samples) / (t1 - t0),
        "wall_s": t1 - t0,
        "round_trip_ms": rtt_all,
        "per_client": per_client,
        "per_client_p50_ms": percentile([c["p50"] for c in per_client], 50),
        "per_client_p95_ms": percentile([c["p95"] for c in per_client], 50),
        "batch_size": {"mean": float(np.mean(batch)), "p50": percentile(batch, 50), "max": max(batch)},
        "policy_p50_ms": percentile(_col(all_samples, "policy_ms"), 50),
        "samples": all_samples,
    }


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


# -- output ---------------------------------------------------------------------------------------
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
            from .charts import latency_breakdown

            chart = out / "charts" / "latency_breakdown.png"
            latency_breakdown(result, chart)
            result["chart"] = "charts/latency_breakdown.png"
        except ImportError as exc:
            result["chart_error"] = f"charts need matplotlib (extra harness): {exc}"
    (out / "results.json").write_text(json.dumps(_jsonable(result), indent=1) + "\n")
    if result["mode"] == "latency":
        md = render_markdown(result)
    else:
        md = (
            f"# pi0remote concurrent-clients benchmark, {result['created']}\n\n"
            + render_clients(result, True)
            + "\n"
        )
    (out / "results.md").write_text(md)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pi0remote.bench",
        description="Round-trip latency of every pi0remote transport (starts its own server without --url).",
    )
    p.add_argument(
        "--url",
        action="append",
        default=[],
        help="measure this server URL (repeatable); none: embedded server",
    )
    p.add_argument("--transport", default="all", help=f"comma list of {','.join(ALL_TRANSPORTS)}, or all")
    p.add_argument("--n", type=int, default=30, help="measured calls per transport")
    p.add_argument("--warmup", type=int, default=5, help="unmeasured calls per transport first")
    p.add_argument("--rounds", type=int, default=5, help="interleave the transports in this many rounds")
    p.add_argument(
        "--policy",
        default="zeros",
        help="embedded server's policy: zeros, sleep:26 (GPU-like), sleep:24+8.9, ...",
    )
    p.add_argument("--payload", choices=("raw", "jpeg"), default="raw", help="camera as raw uint8 or as JPEG")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument(
        "--image",
        choices=("auto", "random", "sim"),
        default="auto",
        help="camera content: random noise or a rendered gym-aloha frame (auto: sim for jpeg)",
    )
    p.add_argument(
        "--netem", default=None, help="WAN emulation, e.g. delay=150ms,jitter=10ms,loss=0.1%%,rate=50mbit"
    )
    p.add_argument("--clients", type=int, default=0, help="N concurrent client processes (throughput mode)")
    p.add_argument(
        "--max-batch", type=int, default=1, help="embedded server: dynamic batching up to this size"
    )
    p.add_argument(
        "--batch-window-ms",
        type=float,
        default=None,
        help="embedded server: wait this long for the rest of a wave (default: the server's)",
    )
    p.add_argument(
        "--out", default=None, help="parent folder of the timestamped results folder (default bench-results)"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the result JSON (without per-call samples) instead of the table",
    )
    p.add_argument(
        "--no-baselines", dest="baselines", action="store_false", help="skip the floor and openpi baselines"
    )
    p.add_argument("--no-charts", dest="charts", action="store_false")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--quic-insecure", action="store_true", help="skip QUIC certificate checks for --url servers"
    )
    p.add_argument("--timeout", type=float, default=30.0, help="per-call timeout, seconds")
    from .fleet import add_fleet_args

    add_fleet_args(p)
    return p


def _strip_samples(result: dict[str, Any]) -> dict[str, Any]:
    out = dict(result)
    out.pop("samples", None)
    out["transports"] = [{k: v for k, v in t.items() if k != "samples"} for t in result.get("transports", [])]
    out["baselines"] = {
        k: {kk: vv for kk, vv in v.items() if kk != "samples_ms"}
        for k, v in result.get("baselines", {}).items()
    }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.fleet:
        from .fleet import fleet_main

        return fleet_main(args, parser.get_default("policy"))
    if args.n < 1 or args.warmup < 0:
        raise SystemExit("pi0remote.bench: --n must be ≥ 1 and --warmup ≥ 0")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    from .._malloc import tune_malloc

    tune_malloc()
    result = run_clients(args, log) if args.clients > 0 else run_latency(args, log)
    out = output_dir(args.out)
    write_outputs(result, out, charts=args.charts)
    result["output_dir"] = str(out)
    if args.json:
        print(json.dumps(_jsonable(_strip_samples(result)), indent=1))
    else:
        if result["mode"] == "latency":
            print(describe_config(result))
            print(render_table(result))
        else:
            print(render_clients(result))
        print(
            f"results: {out}/results.json, results.md"
            + (f", {result['chart']}" if result.get("chart") else "")
        )
    return 0


__all__ = ["ALL_TRANSPORTS", "STAGES", "build_parser", "main", "run_clients", "run_latency"]
