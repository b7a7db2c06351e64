"""``modal://APP/TRANSPORT``: find a pi0remote deployment on Modal and return the URL to connect to.

``connect("modal://pi0remote/tcp")`` resolves here, then connects with the ordinary client of that transport:

==============================  ==========================================================================
``modal://APP/tcp``             the newest live container's raw TCP portal, ``tcp://host:port``
``modal://APP/quic+tcp``        its QUIC-over-TCP portal, ``quic+tcp://host:port`` plus ``quic_fingerprint``
``modal://APP/ws``              the web endpoint's WebSocket, ``wss://…modal.run/ws``
``modal://APP/http``            the web endpoint, ``https://…modal.run``
==============================  ==========================================================================

Portals come from the ``modal.Dict`` named ``APP-endpoints`` where each container publishes its entry
(``pi0remote.deploy``) and refreshes a heartbeat every ``heartbeat_s`` seconds. An entry is *live* while its
heartbeat is younger than ``max_age`` seconds (default 60, four missed heartbeats; ``?max_age=S`` or
``PI0REMOTE_PORTAL_MAX_AGE_S``); among live entries the most recently started container wins. The web URL
comes from the deployed class's ASGI method through the Modal SDK.

Query options: ``?environment=NAME`` (Modal environment), ``?max_age=SECONDS``. The token defaults to
``$PI0REMOTE_TOKEN``. Tests pass ``modal_store=`` (any mapping) instead of the Modal Dict.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..errors import ConnectError

PORTAL_TRANSPORTS = ("tcp", "quic+tcp")
WEB_TRANSPORTS = ("http", "https", "ws", "wss")
DEFAULT_MAX_AGE_S = 60.0
CLASS_NAME = "Pi0Server"
WEB_METHOD = "web"
TOKEN_ENV = "PI0REMOTE_TOKEN"

_DEPLOY_HINT = "deploy it with `modal deploy -m pi0remote.modal_app` (docs/modal.md)"


def parse_modal_url(url: str) -> tuple[str, str, dict[str, str]]:
    """``modal://APP/TRANSPORT?opts`` -> ``(app, transport, opts)``."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "modal":
        raise ValueError(f"not a modal:// URL: {url!r}")
    app = parts.netloc
    transport = parts.path.strip("/").lower()
    if not app or not transport or "/" in transport:
        raise ValueError(f"a Modal URL is modal://APP/TRANSPORT (tcp, quic+tcp, ws or http), got {url!r}")
    if transport not in PORTAL_TRANSPORTS + WEB_TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r} in {url!r}; choose tcp, quic+tcp, ws or http")
    opts = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    return app, transport, opts


def endpoints_store(app: str, environment: str | None = None) -> Any:
    """The ``modal.Dict`` where the deployment's containers publish their portals."""
    try:
        import modal
    except ImportError as exc:
        raise ConnectError("modal:// URLs need the Modal SDK: pip install 'pi0remote[modal]'") from exc
    return modal.Dict.from_name(f"{app}-endpoints", environment_name=environment)


def live_entries(
    store: Any, transport: str, *, max_age_s: float, now: float | None = None
) -> list[dict[str, Any]]:
    """Entries publishing ``transport`` whose heartbeat is fresh, newest container first."""
    t = time.time() if now is None else now
    found = []
    for _, entry in list(store.items()):
        if not isinstance(entry, Mapping):
            continue
        portal = (entry.get("portals") or {}).get(transport)
        beat = entry.get("heartbeat")
        if not portal or not isinstance(beat, (int, float)):
            continue
        if t - beat > max_age_s:
            continue
        found.append(dict(entry))
    found.sort(key=lambda e: (e.get("started_at") or 0.0, e.get("heartbeat") or 0.0), reverse=True)
    return found


def _read_store(app: str, store: Any, transport: str, max_age_s: float) -> list[dict[str, Any]]:
    try:
        entries = live_entries(store, transport, max_age_s=max_age_s)
        total = len(entries) or sum(1 for _ in store.items())
    except Exception as exc:  # NotFoundError, AuthError, network: say what to check
        raise ConnectError(
            f"cannot read the endpoints of Modal app {app!r} ({type(exc).__name__}: {exc}); is Modal set up "
            f"(`modal token new`) and is the app deployed? {_DEPLOY_HINT}"
        ) from exc
    if not entries:
        what = (
            f"none of its {total} published container(s) has a heartbeat younger than {max_age_s:g} s"
            if total
            else "no container has published any"
        )
        raise ConnectError(
            f"no live {transport} portal for Modal app {app!r}: {what}. Is the app deployed and a container "
            f"running (min_containers=1 keeps one up)? {_DEPLOY_HINT}"
        )
    return entries


def web_url(app: str, environment: str | None = None) -> str:
    """The HTTPS URL of the deployment's ASGI endpoint (``Pi0Server.web``), through the Modal SDK."""
    try:
        import modal
    except ImportError as exc:
        raise ConnectError("modal:// URLs need the Modal SDK: pip install 'pi0remote[modal]'") from exc
    errors = []
    try:
        cls = modal.Cls.from_name(app, CLASS_NAME, environment_name=environment)
        url = getattr(cls(), WEB_METHOD).get_web_url()
        if url:
            return str(url)
        errors.append(f"{CLASS_NAME}.{WEB_METHOD} has no web URL")
    except Exception as exc:  # noqa: BLE001
        errors.append(f"{type(exc).__name__}: {exc}")
    try:
        url = modal.Function.from_name(app, WEB_METHOD, environment_name=environment).get_web_url()
        if url:
            return str(url)
    except Exception as exc:  # noqa: BLE001
        errors.append(f"{type(exc).__name__}: {exc}")
    raise ConnectError(
        f"cannot find the web endpoint of Modal app {app!r} ({'; '.join(errors)}); is Modal set up "
        f"(`modal token new`) and is the app deployed? {_DEPLOY_HINT}"
    )


def _web_target(base: str, transport: str) -> str:
    base = base.rstrip("/")
    if transport in ("ws", "wss"):
        if base.startswith("https://"):
            return "wss://" + base[len("https://") :] + "/ws"
        if base.startswith("http://"):
            return "ws://" + base[len("http://") :] + "/ws"
        raise ConnectError(f"unexpected web URL {base!r}")
    return base


def resolve_modal_url(url: str, modal_store: Any = None) -> tuple[str, dict[str, Any]]:
    """``modal://APP/TRANSPORT`` -> ``(url, extra connect() options)``.

    ``modal_store``: a mapping standing in for the ``APP-endpoints`` Dict (tests, or a Dict handle the caller
    already holds). Raises :class:`~pi0remote.errors.ConnectError` when nothing live is published.
    """
    app, transport, opts = parse_modal_url(url)
    environment = opts.get("environment") or opts.get("env") or None
    max_age_s = float(
        opts.get("max_age") or os.environ.get("PI0REMOTE_PORTAL_MAX_AGE_S") or DEFAULT_MAX_AGE_S
    )
    extra: dict[str, Any] = {}
    token = os.environ.get(TOKEN_ENV)
    if token:
        extra["token"] = token
    if transport in WEB_TRANSPORTS:
        return _web_target(web_url(app, environment), transport), extra
    store = modal_store if modal_store is not None else endpoints_store(app, environment)
    entry = _read_store(app, store, transport, max_age_s)[0]
    target = f"{transport}://{entry['portals'][transport]}"
    if transport == "quic+tcp":
        fingerprint = entry.get("quic_fingerprint")
        if not fingerprint:
            raise ConnectError(
                f"container {entry.get('container_id')} publishes no QUIC certificate fingerprint"
            )
        extra["quic_fingerprint"] = fingerprint
    return target, extra


__all__ = ["endpoints_store", "live_entries", "parse_modal_url", "resolve_modal_url", "web_url"]
