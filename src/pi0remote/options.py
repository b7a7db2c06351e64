"""How the command-line tools connect to a server: :class:`ClientOptions` (timeout, token, QUIC trust),
built once by the CLI's option groups and handed to the harness. Light: no transport is imported here."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

TOKEN_ENV = "PI0REMOTE_TOKEN"
"""Environment variable read for the token when neither ``--token`` nor ``--token-file`` is given."""


def read_token(
    token: str | None = None, token_file: str | None = None, env: Mapping[str, str] | None = None
) -> str | None:
    """The token: ``token`` (``--token``) if given, else the first line of ``token_file`` (``--token-file``),
    else ``$PI0REMOTE_TOKEN`` (from ``env``, default ``os.environ``); None when none is set.

    The one reader of tokens, for clients and servers alike (``server.limits.resolve_token`` calls it). A
    token on the command line is visible to every local user (``ps``); a file (mode 0600) or the
    environment is not. An empty token, file or variable is an error rather than "no token".
    """
    if token is not None and token_file is not None:
        raise ValueError("give --token or --token-file, not both")
    if token is not None:
        if not token:
            raise ValueError("--token is empty")
        return token
    if token_file is not None:
        try:
            with open(token_file, encoding="utf-8") as fh:
                text = fh.readline().strip()
        except OSError as exc:
            raise ValueError(f"cannot read --token-file {token_file}: {exc.strerror or exc}") from None
        if not text:
            raise ValueError(f"--token-file {token_file} is empty")
        return text
    value = (os.environ if env is None else env).get(TOKEN_ENV)
    if value is not None:
        value = value.strip()
        if not value:
            raise ValueError(f"${TOKEN_ENV} is set but empty")
        return value
    return None


def naming_url(exc: Exception, url: str) -> Exception:
    """``exc`` with ``url`` in its message (the same type), so a one-line error says which server failed."""
    if url in str(exc):
        return exc
    try:
        return type(exc)(f"{url}: {exc}")
    except TypeError:  # an exception class with another constructor: leave it as it is
        return exc


@dataclass(frozen=True)
class ClientOptions:
    """Options every client the tools open gets (``connect(url, **options.connect_kwargs(url))``)."""

    timeout: float = 30.0
    token: str | None = None
    quic_fingerprint: str | None = None
    quic_cafile: str | None = None
    quic_insecure: bool = False

    def connect_kwargs(self, url: str) -> dict[str, Any]:
        out: dict[str, Any] = {"timeout": self.timeout}
        if self.token is not None:
            out["token"] = self.token
        if url.lower().startswith(("quic://", "quic+tcp://")):
            if self.quic_fingerprint:
                out["quic_fingerprint"] = self.quic_fingerprint
            if self.quic_cafile:
                out["quic_cafile"] = self.quic_cafile
            if self.quic_insecure:
                out["quic_insecure_skip_verify"] = True
        return out

    def connect(self, url: str) -> Any:
        """A connected :class:`~pi0remote.client.PolicyClient` for ``url`` with these options."""
        from .client import connect
        from .errors import Pi0RemoteError

        try:
            return connect(url, **self.connect_kwargs(url))
        except Pi0RemoteError as exc:
            named = naming_url(exc, url)
            if named is exc:
                raise
            raise named from exc

    def with_fingerprint(self, fingerprint: str | None) -> ClientOptions:
        """These options trusting ``fingerprint`` too (learnt from a server's metadata), if none was set."""
        if not fingerprint or self.quic_fingerprint or self.quic_cafile:
            return self
        return ClientOptions(self.timeout, self.token, fingerprint, None, self.quic_insecure)
