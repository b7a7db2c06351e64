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

Each transport module holds one *byte pump* (sync and async) that only moves whole messages; the
protocol rules live once in :mod:`pi0remote.client.session` (docs/architecture.md).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from ..errors import InvalidURL, MissingDependency, UnknownScheme
from .base import AsyncPolicyClient, AsyncTransport, PolicyClient, Transport
from .session import AsyncBytePump, BytePump, TransportOptions, check_options

# scheme -> (module, sync pump class, async pump class); imported on first use.
SCHEMES: dict[str, tuple[str, str, str]] = {
    "tcp": ("pi0remote.client.tcp", "TcpPump", "AsyncTcpPump"),
    "ws": ("pi0remote.client.ws", "WsPump", "AsyncWsPump"),
    "wss": ("pi0remote.client.ws", "WsPump", "AsyncWsPump"),
    "http": ("pi0remote.client.http", "HttpPump", "AsyncHttpPump"),
    "https": ("pi0remote.client.http", "HttpPump", "AsyncHttpPump"),
    "local": ("pi0remote.client.local", "LocalPump", "AsyncLocalPump"),
    "quic": ("pi0remote.client.quic", "QuicPump", "AsyncQuicPump"),
    "quic+tcp": ("pi0remote.client.quic", "QuicPump", "AsyncQuicPump"),
    "openpi": ("pi0remote.client.openpi", "OpenpiPump", "AsyncOpenpiPump"),
}
EXTRAS = {"quic": "quic", "quic+tcp": "quic", "modal": "modal"}
"""Schemes whose pump needs an optional extra (``pip install 'pi0remote[EXTRA]'``)."""
TUNE_MALLOC_ENV = "PI0REMOTE_TUNE_MALLOC"


def _known() -> str:
    return ", ".join(f"{s}://" for s in [*SCHEMES, "modal"])


def _scheme(url: str) -> str:
    if not isinstance(url, str) or "://" not in url:
        raise InvalidURL(f"URL needs a scheme (one of {_known()}): {url!r}")
    return url.split("://", 1)[0].lower()


def _pump_class(url: str, which: int) -> type[BytePump]:
    scheme = _scheme(url)
    if scheme not in SCHEMES:
        raise UnknownScheme(f"unknown URL scheme {scheme!r} in {url!r}; known: {_known()}")
    entry = SCHEMES[scheme]
    try:
        module = importlib.import_module(entry[0])
    except ImportError as exc:
        extra = EXTRAS.get(scheme)
        if extra is None or exc.name is None or exc.name.split(".")[0] == "pi0remote":
            raise  # our own import error, not a missing extra
        raise MissingDependency(
            f"{scheme}:// needs {exc.name}, which is not installed: pip install 'pi0remote[{extra}]'"
        ) from exc
    return getattr(module, entry[which])


def _resolve(url: str | None, policy: Any, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if policy is not None:
        if url is not None:
            raise InvalidURL("pass a URL or policy=, not both")
        kwargs["policy"] = policy
        return f"local://{type(policy).__name__}", kwargs
    if url is None:
        raise InvalidURL("connect() needs a URL or policy=")
    if _scheme(url) == "modal":
        from .modal import resolve_modal_url

        url, extra = resolve_modal_url(url, **{k: kwargs[k] for k in ("modal_store",) if k in kwargs})
        kwargs.pop("modal_store", None)
        for key, value in extra.items():
            if kwargs.get(key) is None:  # the caller's explicit options win; None means "not given"
                kwargs[key] = value
    return url, kwargs


def _make_pump(url: str | None, policy: Any, options: dict[str, Any], which: int) -> tuple[str, BytePump]:
    url, kwargs = _resolve(url, policy, options)
    cls = _pump_class(url, which)
    check_options(_scheme(url), cls.OPTIONS, kwargs)
    opts = TransportOptions(url, **kwargs)
    if opts.tune_malloc or (opts.tune_malloc is None and os.environ.get(TUNE_MALLOC_ENV) == "1"):
        from .._malloc import tune_malloc

        tune_malloc()
    return url, cls(opts)


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
    Options every transport takes: ``retries`` (connect attempts after the first, default 3),
    ``max_message_bytes`` (largest reply accepted), ``tune_malloc`` (raise glibc's malloc thresholds in
    this process, as the server does; off unless asked, or ``PI0REMOTE_TUNE_MALLOC=1``). Transport-specific
    ones (``quic_fingerprint``, ...) are listed in the transport's module; an unknown keyword is a TypeError.
    """
    if policy is None and isinstance(url, str) and "://" in url and _scheme(url) == "modal":
        from .modal import connect_modal  # resolver choice and failover across containers

        return connect_modal(url, timeout=timeout, token=token, **options)
    url, pump = _make_pump(url, policy, dict(options, timeout=timeout, token=token), 1)
    return PolicyClient(pump, url).connect()


async def aconnect(
    url: str | None = None,
    *,
    timeout: float = 10.0,
    token: str | None = None,
    policy: Any = None,
    **options: Any,
) -> Any:
    """Async twin of :func:`connect`."""
    if policy is None and isinstance(url, str) and "://" in url and _scheme(url) == "modal":
        from .modal import aconnect_modal  # resolver choice and failover across containers

        return await aconnect_modal(url, timeout=timeout, token=token, **options)
    url, pump = _make_pump(url, policy, dict(options, timeout=timeout, token=token), 2)
    return await AsyncPolicyClient(pump, url).connect()  # type: ignore[arg-type]


__all__ = [
    "SCHEMES",
    "AsyncBytePump",
    "AsyncPolicyClient",
    "AsyncTransport",
    "BytePump",
    "PolicyClient",
    "Transport",
    "aconnect",
    "connect",
]
