"""``connect(url)`` picks the transport by URL scheme; one small module per transport.

==============  =====================================================================
scheme          transport
==============  =====================================================================
``http(s)://``  ``POST /infer`` on a keep-alive HTTP/1.1 connection
``ws(s)://``    one binary WebSocket message per request, at ``/ws``
``tcp://``      length-prefixed frames on a raw TCP connection
``quic://``     QUIC over UDP (extra ``quic``)
``quic+tcp://`` QUIC with its datagrams carried as frames over one TCP connection
``local://``    a built-in or ``module:attr`` policy in this process, through the codec
``openpi://``   a stock openpi WebSocket policy server
``modal://``    a pi0remote deployment on Modal (extra ``modal``)
==============  =====================================================================
"""

from __future__ import annotations

import importlib
from typing import Any

from .._malloc import tune_malloc
from .base import AsyncPolicyClient, AsyncTransport, PolicyClient, Transport

# scheme -> (module, sync transport class, async transport class); imported on first use.
SCHEMES: dict[str, tuple[str, str, str]] = {
    "tcp": ("pi0remote.client.tcp", "TcpTransport", "AsyncTcpTransport"),
    "ws": ("pi0remote.client.ws", "WsTransport", "AsyncWsTransport"),
    "wss": ("pi0remote.client.ws", "WsTransport", "AsyncWsTransport"),
    "http": ("pi0remote.client.http", "HttpTransport", "AsyncHttpTransport"),
    "https": ("pi0remote.client.http", "HttpTransport", "AsyncHttpTransport"),
    "local": ("pi0remote.client.local", "LocalTransport", "AsyncLocalTransport"),
    "quic": ("pi0remote.client.quic", "QuicTransport", "AsyncQuicTransport"),
    "quic+tcp": ("pi0remote.client.quic", "QuicTransport", "AsyncQuicTransport"),
    "openpi": ("pi0remote.client.openpi", "OpenpiTransport", "AsyncOpenpiTransport"),
}


def _scheme(url: str) -> str:
    if "://" not in url:
        raise ValueError(f"URL needs a scheme (one of {sorted(SCHEMES)} or modal://): {url!r}")
    return url.split("://", 1)[0].lower()


def _transport_class(url: str, which: int) -> type:
    scheme = _scheme(url)
    if scheme not in SCHEMES:
        raise ValueError(f"unknown URL scheme {scheme!r}; known: {sorted(SCHEMES)} and modal://")
    entry = SCHEMES[scheme]
    module = importlib.import_module(entry[0])
    return getattr(module, entry[which])


def _resolve(url: str | None, policy: Any, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if policy is not None:
        if url is not None:
            raise ValueError("pass a URL or policy=, not both")
        kwargs["policy"] = policy
        return f"local://{type(policy).__name__}", kwargs
    if url is None:
        raise ValueError("connect() needs a URL or policy=")
    if _scheme(url) == "modal":
        from .modal import resolve_modal_url

        url, extra = resolve_modal_url(url, **{k: kwargs[k] for k in ("modal_store",) if k in kwargs})
        kwargs.pop("modal_store", None)
        for key, value in extra.items():
            if kwargs.get(key) is None:  # the caller's explicit options win; None means "not given"
                kwargs[key] = value
    return url, kwargs


def connect(
    url: str | None = None,
    *,
    timeout: float = 10.0,
    token: str | None = None,
    policy: Any = None,
    **options: Any,
) -> Any:
    """Connect to a policy server and return a ready :class:`PolicyClient`.

    ``timeout`` bounds each call (and each connect attempt); ``token`` is sent on every transport.
    Transport-specific options (``retries``, ``max_message_bytes``, ``quic_fingerprint``, ...) pass through.
    """
    tune_malloc()
    if policy is None and url is not None and _scheme(url) == "modal":
        from .modal import connect_modal  # resolver choice and failover across containers

        return connect_modal(url, timeout=timeout, token=token, **options)
    url, kwargs = _resolve(url, policy, dict(options, timeout=timeout, token=token))
    transport: Transport = _transport_class(url, 1)(url, **kwargs)
    return PolicyClient(transport, url).connect()


async def aconnect(
    url: str | None = None,
    *,
    timeout: float = 10.0,
    token: str | None = None,
    policy: Any = None,
    **options: Any,
) -> AsyncPolicyClient:
    """Async twin of :func:`connect`."""
    tune_malloc()
    url, kwargs = _resolve(url, policy, dict(options, timeout=timeout, token=token))
    transport: AsyncTransport = _transport_class(url, 2)(url, **kwargs)
    return await AsyncPolicyClient(transport, url).connect()


__all__ = ["SCHEMES", "AsyncPolicyClient", "PolicyClient", "aconnect", "connect"]
