"""Shared fixtures: real servers on loopback (port 0) and a probe policy whose replies can be checked."""

from __future__ import annotations

import importlib.util
import os
import threading
import time
from typing import Any

import numpy as np
import pytest

from pi0remote.policies import CANONICAL_INPUT_SPEC, PolicyMetadata

os.environ.setdefault("MUJOCO_GL", "egl")
# π₀ policies turn on jax's persistent compilation cache (~/.cache by default); the suite writes none.
os.environ.setdefault("PI0REMOTE_JAX_CACHE", "off")

HAVE_QUIC = importlib.util.find_spec("aioquic") is not None and (
    importlib.util.find_spec("pi0remote.server.quic") is not None
)
NETWORK_TRANSPORTS = ["tcp", "ws", "http"] + (["quic", "quic+tcp"] if HAVE_QUIC else [])
ALL_TRANSPORTS = NETWORK_TRANSPORTS + ["local"]


class ProbePolicy:
    """A policy whose reply is a known function of the request, with switches for misbehaviour.

    ``action = tile(state) + step index``; ``cam_sum`` is the camera's pixel sum; ``raise`` in the
    request makes it raise; ``sleep_ms`` makes it slow.
    """

    def __init__(self) -> None:
        self.metadata = PolicyMetadata(
            name="probe", input_spec=dict(CANONICAL_INPUT_SPEC), extra={"probe": True}
        )
        self.resets = 0
        self.calls = 0
        self.finished = 0
        self.lock = threading.Lock()
        self._idle = threading.Condition(self.lock)

    def wait_idle(self, timeout: float) -> bool:
        """True once every call that started has returned (what a test waits on instead of sleeping)."""
        with self._idle:
            return self._idle.wait_for(lambda: self.finished >= self.calls, timeout)

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.calls += 1
        try:
            return self._infer(obs)
        finally:
            with self._idle:
                self.finished += 1
                self._idle.notify_all()

    def _infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        if obs.get("raise"):
            raise ValueError("boom requested")
        if "sleep_ms" in obs:
            time.sleep(float(obs["sleep_ms"]) / 1000.0)
        received = {
            k: {"dtype": str(v.dtype), "shape": list(v.shape)}
            for k, v in obs.items()
            if isinstance(v, np.ndarray)
        }
        return {
            "action": expected_action(obs["state"]),
            "cam_sum": int(obs["cam_high"].sum(dtype=np.int64)),
            "received": received,
        }

    def reset(self) -> None:
        self.resets += 1


def expected_action(state: np.ndarray) -> np.ndarray:
    return (np.tile(state, (50, 1)) + np.arange(50, dtype=np.float32)[:, None]).astype(np.float32)


def make_obs(seed: int = 0, **extra: Any) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    obs = {
        "cam_high": rng.integers(0, 256, (3, 224, 224), dtype=np.uint8),
        "state": rng.normal(size=14).astype(np.float32),
    }
    obs.update(extra)
    return obs


@pytest.fixture(scope="session")
def probe_server():
    from pi0remote.server import BackgroundServer

    kwargs: dict[str, Any] = {
        "http_port": 0,
        "tcp_port": 0,
        "transports": list(NETWORK_TRANSPORTS),
        "idle_timeout": 30,
    }
    if HAVE_QUIC:
        kwargs["quic_port"] = 0
    with BackgroundServer(ProbePolicy(), name="probe", **kwargs) as srv:
        yield srv


def connect_to(server, transport: str, **kwargs: Any):
    """A client for ``transport``: the shared server's URL, or the in-process path for ``local``."""
    from pi0remote import connect

    if transport == "local":
        return connect(policy=server.server.policy if server is not None else ProbePolicy(), **kwargs)
    url = server.url(transport)
    opts = dict(kwargs)
    if transport.startswith("quic"):
        opts.setdefault("quic_fingerprint", server.server.core.metadata().get("quic_fingerprint"))
    return connect(url, **opts)
