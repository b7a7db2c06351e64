"""Container start-up for a hosted deployment, runnable anywhere (no Modal needed).

Modules: :mod:`.config` (settings), :mod:`.checkpoint` (the checkpoint cache), :mod:`.container` (server,
portals, published entry, heartbeat), :mod:`.asgi` (the ASGI adapter). Everything is importable from here.

``pi0remote.modal_app`` wires these pieces to Modal; everything here is plain Python, so tests run it on
loopback with a dict standing in for the endpoint store:

* :class:`DeployConfig`: every knob of a deployment, read from ``PI0REMOTE_*`` environment variables.
* :func:`start_container`: start one :class:`~pi0remote.server.PolicyServer` on its own event-loop thread,
  warm the policy up, open a public portal per raw transport through a ``forward(port)`` callable
  (``modal.forward(port, unencrypted=True)`` on Modal), publish the portals' ``host:port`` (and the QUIC
  certificate fingerprint) into a dict-like store under the container's id, and keep a heartbeat in that
  entry until :meth:`PolicyContainer.close` removes it.
* :class:`PolicyAsgiApp`: a plain ASGI callable serving ``POST /infer``, ``POST /reset``, ``GET /metadata``,
  ``GET /healthz`` and WebSocket ``/ws`` straight from that server's core (same auth, same bodies and
  errors as the built-in HTTP/WebSocket listener), for platforms that put their own HTTPS front door
  before an ASGI app.
* :func:`fetch_checkpoint` / :func:`cached_checkpoint`: the one-off checkpoint download into a cache
  directory (a Modal Volume), and its lookup at start-up, which never downloads.

Entry published per container (``store[container_id]``)::

    {"container_id": "ta-…", "started_at": 1.7e9, "heartbeat": 1.7e9, "heartbeat_s": 5.0,
     "portals": {"tcp": "r7.modal.host:41234", "quic+tcp": "r7.modal.host:40001"},
     "quic_fingerprint": "ab12…" | None, "policy": "pi0", "region": "us-east" | None, "version": "0.1.0",
     "load": {"robots": 3, "calls_per_s": 31.5, "mean_batch": 2.9, "queue_wait_p50_ms": 4.1,
              "capacity": 8, "ready": True}}

``load`` is rewritten with every heartbeat, and at once (at most every ``LOAD_PUBLISH_MIN_S``) when a robot
connects or leaves. Clients (``pi0remote.client.modal``) choose among live, ready entries by load.
"""

from __future__ import annotations

from .asgi import PolicyAsgiApp
from .checkpoint import (
    PALIGEMMA_TOKENIZER,
    cached_checkpoint,
    ensure_checkpoint,
    fetch_checkpoint,
    load_configured_policy,
    preload_modules,
)
from .config import (
    DEFAULT_HEARTBEAT_S,
    DEFAULT_STALE_AFTER_S,
    LOAD_PUBLISH_MIN_S,
    OPENPI_DATA_HOME,
    PORTAL_TRANSPORTS,
    PRUNE_AFTER_S,
    TOKEN_ENV,
    DeployConfig,
    endpoints_store_name,
)
from .container import (
    Heartbeat,
    PolicyContainer,
    ServerThread,
    container_id_from_env,
    container_load,
    container_region,
    new_entry,
    prune_stale,
    start_container,
    start_from_config,
)

__all__ = [
    "LOAD_PUBLISH_MIN_S",
    "OPENPI_DATA_HOME",
    "PALIGEMMA_TOKENIZER",
    "PRUNE_AFTER_S",
    "TOKEN_ENV",
    "container_load",
    "DEFAULT_HEARTBEAT_S",
    "DEFAULT_STALE_AFTER_S",
    "PORTAL_TRANSPORTS",
    "DeployConfig",
    "Heartbeat",
    "PolicyAsgiApp",
    "PolicyContainer",
    "ServerThread",
    "cached_checkpoint",
    "container_id_from_env",
    "container_region",
    "endpoints_store_name",
    "ensure_checkpoint",
    "fetch_checkpoint",
    "load_configured_policy",
    "new_entry",
    "preload_modules",
    "prune_stale",
    "start_container",
    "start_from_config",
]
