"""What a benchmark run is asked to do: :class:`BenchConfig` (typed; the CLI only builds it) and the
transport names it may measure."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from ...options import ClientOptions

ALL_TRANSPORTS = ("tcp", "ws", "http", "quic", "quic+tcp", "local")
QUIC_TRANSPORTS = ("quic", "quic+tcp")
STAGES = ("client_encode", "network", "server_decode", "queue", "policy", "server_encode", "client_decode")
"""The seven parts of one call, in time order (they add up to the round trip)."""
STAGE_LABELS = {stage: stage.replace("_", " ") for stage in STAGES}
SCHEMA = "pi0remote.bench/1"
PAYLOADS = ("raw", "jpeg")
IMAGES = ("auto", "random", "sim")


@dataclass
class BenchConfig:
    """One ``pi0remote bench`` run. ``urls`` empty: an embedded server serves ``policy``."""

    urls: list[str] = field(default_factory=list)
    transports: list[str] | None = None
    """None: every available transport."""
    n: int = 30
    warmup: int = 5
    rounds: int = 5
    policy: str = "zeros"
    payload: str = "raw"
    jpeg_quality: int = 90
    image: str = "auto"
    netem: str | None = None
    clients: int = 0
    max_batch: int = 1
    batch_window_ms: float | None = None
    baselines: bool = True
    charts: bool = True
    progress: bool = True
    client: ClientOptions = field(default_factory=ClientOptions)

    def __post_init__(self) -> None:
        if self.n < 1 or self.warmup < 0 or self.rounds < 1:
            raise ValueError("--n and --rounds must be ≥ 1 and --warmup ≥ 0")
        if self.payload not in PAYLOADS:
            raise ValueError(f"--payload is raw or jpeg, got {self.payload!r}")
        if self.image not in IMAGES:
            raise ValueError(f"--image is one of {', '.join(IMAGES)}, got {self.image!r}")
        if self.transports is not None:
            self.transports = parse_transports(",".join(self.transports))

    @property
    def embedded(self) -> bool:
        return not self.urls

    @property
    def image_kind(self) -> str:
        """The camera content actually asked for (``auto``: a sim frame for JPEG, else random)."""
        if self.image != "auto":
            return self.image
        return "sim" if self.payload == "jpeg" else "random"


def parse_transports(text: str | None) -> list[str] | None:
    """``"tcp,ws"`` -> ``["tcp", "ws"]``; ``None`` or ``"all"`` -> None (everything available)."""
    if text is None or text.strip().lower() in ("", "all"):
        return None
    out = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [t for t in out if t not in ALL_TRANSPORTS]
    if bad:
        raise ValueError(f"unknown transport(s) {', '.join(bad)}; known: {', '.join(ALL_TRANSPORTS)} or all")
    return out


def _found(*modules: str) -> bool:
    try:
        return all(importlib.util.find_spec(m) is not None for m in modules)
    except (ImportError, ValueError):
        return False


def quic_available() -> bool:
    """QUIC needs ``aioquic`` (extra ``quic``) and the QUIC listener and client modules."""
    return _found("aioquic", "pi0remote.server.quic", "pi0remote.client.quic")


def openpi_available() -> bool:
    return _found("openpi_client", "pi0remote.server.openpi_ws")


def charts_available() -> bool:
    """Charts need matplotlib (extra ``harness``)."""
    return _found("matplotlib")


def available_transports() -> list[str]:
    return [t for t in ALL_TRANSPORTS if t not in QUIC_TRANSPORTS or quic_available()]
