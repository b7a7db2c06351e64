"""The benchmark's rig: what is sent (observation, payload), what is measured (connected clients, the
embedded server, the raw-socket floor and the openpi-client baseline) and the netem proxies in front.

:class:`Rig` is a context manager that sets everything up from a :class:`~.config.BenchConfig` and
tears it down again; :mod:`.measure` drives the calls.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ... import protocol
from ...errors import Pi0RemoteError
from ...options import ClientOptions, naming_url
from ..percentiles import percentile
from .config import (
    ALL_TRANSPORTS,
    QUIC_TRANSPORTS,
    BenchConfig,
    available_transports,
    openpi_available,
    quic_available,
)

Log = Callable[[str], None]


# -- observations ---------------------------------------------------------------------------------
def sim_frame() -> np.ndarray:
    """A rendered gym-aloha top-camera frame as the canonical ``uint8[3, 224, 224]`` (needs extra ``sim``)."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    from ...sim.env import make_env, obs_to_request

    with make_env(render=True) as env:
        return obs_to_request(env.reset(0))["cam_high"]


def make_obs(image: str = "random", seed: int = 0) -> tuple[dict[str, Any], str]:
    """The canonical ALOHA request (plausible joint state) with a random image or a sim frame.

    Returns the observation and what image it carries (``random``, ``sim``, or ``random`` after a
    failed ``sim`` render, with the reason).
    """
    from ..obs import canonical_obs

    obs = canonical_obs(seed)
    if image == "random":
        return obs, "random"
    if image != "sim":
        raise ValueError(f"--image is random or sim, got {image!r}")
    try:
        obs["cam_high"] = sim_frame()
        return obs, "sim"
    except Exception as exc:  # gym-aloha / MuJoCo missing or no GL
        return obs, f"random (sim frame unavailable: {type(exc).__name__}: {exc}; extra sim brings it)"


def protocol_size(obs: dict[str, Any]) -> int:
    message = protocol.encode_message(protocol.INFER, obs)
    if isinstance(message, (bytes, bytearray, memoryview)):
        return len(message)
    return sum(len(memoryview(p).cast("B")) for p in message)  # scatter-gather parts


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
        from ...jpeg import jpeg_obs

        t0 = time.perf_counter()
        out = jpeg_obs(self.obs, self.quality)
        return out, (time.perf_counter() - t0) * 1000.0


def jpeg_decode_ms(payload: Payload, repeats: int = 20) -> float | None:
    """Median time to decode the payload's JPEG camera here (an estimate of the server's extra work)."""
    if payload.kind != "jpeg":
        return None
    from ...jpeg import decode_jpeg_fields

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
    """A connected client plus its samples (reply sizes from the client's ``last_reply_bytes``)."""

    def __init__(self, name: str, url: str, client: Any) -> None:
        self.name = name
        self.url = url
        self.client = client
        self.samples: list[dict[str, Any]] = []

    def call(self, payload: Payload, t_origin: float, keep: bool) -> None:
        t0 = time.perf_counter()
        obs, prep_ms = payload.prepare()
        try:
            reply = self.client.infer(obs)
        except Pi0RemoteError as exc:
            named = naming_url(exc, self.url)
            if named is exc:
                raise
            raise named from exc
        if keep:
            self.samples.append(
                call_record(reply, prep_ms, t0 - t_origin, getattr(self.client, "last_reply_bytes", 0))
            )

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


# -- the embedded server and the targets -----------------------------------------------------------
def server_args(cfg: BenchConfig, transports: Sequence[str], openpi: bool) -> list[str]:
    """``pi0remote serve`` flags for the embedded server (the token goes by environment, not argv)."""
    net = [t for t in transports if t != "local"] or ["tcp"]
    out = ["--policy", cfg.policy, "--host", "127.0.0.1", "--transports", ",".join(net)]
    if {"http", "ws"} & set(net):
        out += ["--http-port", "0"]
    if "tcp" in net:
        out += ["--tcp-port", "0"]
    if set(QUIC_TRANSPORTS) & set(net):
        out += ["--quic-port", "0"]
    if openpi:
        out += ["--openpi-port", "0"]
    out += ["--max-batch", str(cfg.max_batch)]
    if cfg.batch_window_ms is not None:  # else the server's default
        out += ["--batch-window-ms", str(cfg.batch_window_ms)]
    return out


def label_urls(urls: Sequence[str]) -> list[tuple[str, str]]:
    """``(name, url)`` per URL, named by scheme (``tcp``, then ``tcp#2`` for a second one)."""
    seen: dict[str, int] = {}
    out = []
    for url in urls:
        scheme = url.split("://", 1)[0].lower()
        seen[scheme] = seen.get(scheme, 0) + 1
        out.append((scheme if seen[scheme] == 1 else f"{scheme}#{seen[scheme]}", url))
    return out


def embedded_transports(cfg: BenchConfig, log: Log) -> list[str]:
    """The transports the embedded server will serve; says which asked-for ones are unavailable."""
    available = available_transports()
    transports = [t for t in (cfg.transports or available) if t in available]
    skipped = [t for t in (cfg.transports or ALL_TRANSPORTS) if t not in transports]
    if skipped and not quic_available():
        log(f"skipping {', '.join(skipped)}: QUIC needs aioquic (pip install 'pi0remote[quic]')")
    return transports


def start_server(
    cfg: BenchConfig, transports: Sequence[str], openpi: bool, log: Log, stack: ExitStack
) -> Any:
    """Start the embedded ``pi0remote serve`` subprocess (closed with ``stack``)."""
    from ...options import TOKEN_ENV
    from ..procs import ServerProcess

    sargs = server_args(cfg, transports, openpi)
    log(f"starting server: pi0remote serve {' '.join(sargs)}")
    env = {TOKEN_ENV: cfg.client.token} if cfg.client.token else None
    return stack.enter_context(ServerProcess(sargs, env=env))


def is_loopback(url: str) -> bool:
    return url.startswith("local://") or any(h in url for h in ("127.0.0.1", "localhost", "[::1]"))


@dataclass
class Rig:
    """Everything one latency run measures, set up from a config; ``with Rig(cfg, log) as rig: ...``."""

    cfg: BenchConfig
    log: Log
    payload: Payload = field(init=False)
    image: str = field(init=False)
    targets: list[tuple[str, str]] = field(default_factory=list)
    measured: list[Measured] = field(default_factory=list)
    openpi: OpenpiMeasured | None = None
    floor_port: int | None = None
    group: Any = None
    spec: Any = None
    client_options: ClientOptions = field(init=False)
    _openpi_url: str | None = None

    def __enter__(self) -> Rig:
        from ..netem import NetemSpec

        self.stack = ExitStack().__enter__()
        try:
            obs, self.image = make_obs(self.cfg.image_kind)
            self.obs = obs
            self.payload = Payload(obs, self.cfg.payload, self.cfg.jpeg_quality)
            self.spec = NetemSpec.parse(self.cfg.netem) if self.cfg.netem else None
            self.client_options = self.cfg.client
            self._find_targets()
            self._connect_all()
            self._start_baselines()
        except BaseException:
            self.stack.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stack.__exit__(*exc)

    def _find_targets(self) -> None:
        cfg = self.cfg
        if cfg.embedded:
            transports = embedded_transports(cfg, self.log)
            use_openpi = cfg.baselines and openpi_available()
            srv = start_server(cfg, transports, use_openpi, self.log, self.stack)
            self.client_options = cfg.client.with_fingerprint(srv.quic_fingerprint)
            for url in srv.urls:
                scheme = url.split("://", 1)[0]
                if scheme == "openpi":
                    self._openpi_url = url
                elif scheme in transports:
                    self.targets.append((scheme, url))
            self.targets.sort(key=lambda t: ALL_TRANSPORTS.index(t[0]))
            if "local" in transports:
                self.targets.append(("local", f"local://{cfg.policy}"))
        else:
            wanted = cfg.transports
            labelled = label_urls(cfg.urls)
            self.targets = [(n, u) for n, u in labelled if wanted is None or n.split("#")[0] in wanted]
        if not self.targets:
            raise ValueError("no transport to measure: check --transport against the --url schemes")
        if self.spec:
            from ..netem import NetemGroup

            self.group = self.stack.enter_context(NetemGroup([u for _, u in self.targets], self.spec))

    def via(self, url: str) -> str:
        """``url`` as reached through the netem proxies (unchanged without ``--netem``)."""
        return self.group.url_for(url) if self.group else url

    def _connect_all(self) -> None:
        # Connect QUIC last: without a fingerprint yet, another transport's metadata may carry it.
        for name, url in sorted(self.targets, key=lambda t: t[0].startswith("quic")):
            client = self.client_options.connect(self.via(url))
            self.client_options = self.client_options.with_fingerprint(
                client.metadata.get("quic_fingerprint")
            )
            self.measured.append(Measured(name, url, client))
            self.stack.callback(self.measured[-1].close)
        order = [t[0] for t in self.targets]
        self.measured.sort(key=lambda m: order.index(m.name))

    def _start_baselines(self) -> None:
        from ..floor import canonical_sizes, start_floor_server
        from ..netem import NetemProxy

        self.floor_request, self.floor_reply_size = canonical_sizes(self.payload.sample)
        if self.cfg.baselines and all(is_loopback(u) for _, u in self.targets):
            floor_proc, self.floor_port = start_floor_server(self.floor_reply_size)
            self.stack.callback(floor_proc.kill)
            if self.spec:
                proxy = self.stack.enter_context(NetemProxy("127.0.0.1", self.floor_port, self.spec))
                self.floor_port = proxy.port
        if self._openpi_url:
            try:
                self.openpi = OpenpiMeasured(
                    self.via(self._openpi_url.replace("openpi://", "ws://")), self.obs
                )
                self.stack.callback(self.openpi.close)
            except Exception as exc:
                self.log(f"openpi-client baseline skipped: {type(exc).__name__}: {exc}")

    @property
    def server_metadata(self) -> dict[str, Any]:
        return self.measured[0].client.metadata

    @property
    def paths(self) -> int:
        """How many things are measured per round (transports, floor, openpi-client)."""
        return len(self.measured) + (self.floor_port is not None) + (self.openpi is not None)

    def netem_stats(self) -> dict[str, Any] | None:
        if not self.group:
            return None
        return {f"{h}:{p}": proxy.stats() for (h, p), proxy in self.group.proxies.items()}
