"""The benchmark's measuring loops: :func:`run_latency` (every transport in interleaved rounds, with
the floor and openpi-client baselines) and :func:`run_clients` (N client processes at once on one
transport). Both take a :class:`~.config.BenchConfig` and return the result document (not yet written)."""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
from contextlib import ExitStack
from typing import Any

from ...options import ClientOptions
from .config import BenchConfig
from .report import clients_result, latency_result
from .rig import Log, Measured, Payload, Rig, make_obs


def progress(total: int, desc: str, enabled: bool, unit: str = "call") -> Any:
    """A tqdm bar on stderr (a no-op one when disabled); use as a context manager."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled, leave=False)


def split_rounds(n: int, rounds: int) -> list[int]:
    """``n`` calls in ``rounds`` interleaved rounds (at most ``n``), as even as possible."""
    rounds = max(1, min(rounds, n))
    return [n // rounds + (1 if i < n % rounds else 0) for i in range(rounds)]


# -- latency: every transport, interleaved ---------------------------------------------------------
def _warm_up(rig: Rig, bar: Any) -> None:
    from ..floor import measure_floor

    warmup = rig.cfg.warmup
    for m in rig.measured:
        bar.set_description(f"warm-up {m.name}")
        for _ in range(warmup):
            m.call(rig.payload, 0.0, keep=False)
            bar.update()
    if rig.floor_port is not None:
        measure_floor(rig.floor_port, rig.floor_request, 0, warmup)
        bar.update(warmup)
    if rig.openpi is not None:
        for _ in range(warmup):
            rig.openpi.call(0.0, keep=False)
            bar.update()


def _round(rig: Rig, k: int, label: str, t_origin: float, bar: Any) -> list[float]:
    """``k`` calls on every path; returns the floor's samples (ms)."""
    from ..floor import measure_floor

    floor: list[float] = []
    if rig.floor_port is not None:
        bar.set_description(f"{label} floor")
        floor = [s * 1000.0 for s in measure_floor(rig.floor_port, rig.floor_request, k, 1)]
        bar.update(k)
    for m in rig.measured:
        bar.set_description(f"{label} {m.name}")
        for _ in range(k):
            m.call(rig.payload, t_origin, keep=True)
            bar.update()
    if rig.openpi is not None:
        bar.set_description(f"{label} openpi-client")
        for _ in range(k):
            rig.openpi.call(t_origin, keep=True)
            bar.update()
    return floor


def run_latency(cfg: BenchConfig, log: Log) -> dict[str, Any]:
    """Measure every selected transport; returns the result document (not yet written)."""
    per_round = split_rounds(cfg.n, cfg.rounds)
    with Rig(cfg, log) as rig:
        total = (cfg.warmup + cfg.n) * rig.paths
        with progress(total, "warm-up", cfg.progress) as bar:
            _warm_up(rig, bar)
            floor: list[float] = []
            t_origin = time.perf_counter()
            for r, k in enumerate(per_round):  # interleaved rounds: every path sees the same machine noise
                floor += _round(rig, k, f"round {r + 1}/{len(per_round)}", t_origin, bar)
        return latency_result(rig, floor, len(per_round))


# -- several clients at once ------------------------------------------------------------------------
def _client_worker(
    index: int, url: str, cfg: BenchConfig, options: ClientOptions, image: str, sync: dict[str, Any]
) -> None:
    """One client process: warm up, wait for the start signal, make ``cfg.n`` calls, report samples."""
    from ..._malloc import tune_malloc

    tune_malloc()  # like the parent process: the benchmark measures a tuned client (docs/decisions.md)
    try:
        obs, _ = make_obs(image, seed=index)
        payload = Payload(obs, cfg.payload, cfg.jpeg_quality)
        m = Measured(f"client{index}", url, options.connect(url))
        for _ in range(cfg.warmup):
            m.call(payload, 0.0, keep=False)
        sync["ready"].put(index)
        sync["start"].wait()
        out = []
        for _ in range(cfg.n):
            t0 = time.perf_counter()
            m.call(payload, 0.0, keep=True)
            rec = m.samples[-1]
            rec["t_start"], rec["t_end"] = t0, time.perf_counter()
            out.append(rec)
            with sync["counter"].get_lock():
                sync["counter"].value += 1
        m.close()
        sync["results"].put((index, out, None))
    except BaseException as exc:  # report, never hang the parent
        sync["ready"].put(index)
        sync["results"].put((index, [], f"{type(exc).__name__}: {exc}"))


def _clients_target(cfg: BenchConfig, log: Log, stack: ExitStack) -> tuple[str, str, ClientOptions]:
    """The URL the clients call (starting the embedded server if needed), its scheme and options."""
    from .rig import start_server

    scheme = (cfg.transports or ["tcp"])[0]
    if scheme == "local":
        raise ValueError("--clients needs a network transport (--transport tcp, ws, http, quic or quic+tcp)")
    if cfg.embedded:
        srv = start_server(cfg, [scheme], False, log, stack)
        return srv.url(scheme), scheme, cfg.client.with_fingerprint(srv.quic_fingerprint)
    url = next((u for u in cfg.urls if u.split("://", 1)[0] == scheme), cfg.urls[0])
    return url, url.split("://", 1)[0], cfg.client


def _collect(procs: list[Any], sync: dict[str, Any], bar: Any) -> dict[int, tuple[list, str | None]]:
    got: dict[int, tuple[list, str | None]] = {}
    seen = 0
    while len(got) < len(procs):
        try:
            index, samples, error = sync["results"].get(timeout=0.2)
            got[index] = (samples, error)
        except Exception:
            if not any(p.is_alive() for p in procs) and sync["results"].empty():
                break
        bar.update(sync["counter"].value - seen)
        seen = sync["counter"].value
    return got


def run_clients(cfg: BenchConfig, log: Log) -> dict[str, Any]:
    """``--clients N``: N processes call one transport at once; aggregate throughput and per-client latency."""
    from ..netem import NetemGroup, NetemSpec

    spec = NetemSpec.parse(cfg.netem) if cfg.netem else None
    with ExitStack() as stack:
        url, scheme, options = _clients_target(cfg, log, stack)
        via = stack.enter_context(NetemGroup([url], spec)).url_for(url) if spec else url
        with options.connect(via) as probe:
            meta = probe.metadata
        options = options.with_fingerprint(meta.get("quic_fingerprint"))
        ctx = mp.get_context("spawn")
        sync = {
            "start": ctx.Event(),
            "ready": ctx.Queue(),
            "results": ctx.Queue(),
            "counter": ctx.Value("i", 0),
        }
        procs = [
            ctx.Process(target=_client_worker, args=(i, via, cfg, options, cfg.image_kind, sync), daemon=True)
            for i in range(cfg.clients)
        ]
        for p in procs:
            p.start()
            stack.callback(lambda p=p: (p.join(5), p.is_alive() and p.kill()))
        for _ in procs:
            sync["ready"].get(timeout=300)
        with progress(cfg.n * cfg.clients, f"{cfg.clients} clients", cfg.progress) as bar:
            sync["start"].set()
            got = _collect(procs, sync, bar)
    errors = {i: e for i, (_, e) in got.items() if e}
    if errors:
        raise RuntimeError(f"client(s) failed: {errors}")
    return clients_result(cfg, {i: s for i, (s, _) in got.items()}, url, scheme, meta, spec)
