"""How the command-line tools connect to a server: :class:`ClientOptions` (timeout, token, QUIC trust),
built once by the CLI's option groups and handed to the harness. Light: no transport is imported here."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOKEN_ENV = "PI0REMOTE_TOKEN"
"""Environment variable read for the token when neither ``--token`` nor ``--token-file`` is given."""


def read_token(token: str | None = None, token_file: str | None = None, env: bool = True) -> str | None:
    """The token from ``--token``, else ``--token-file`` (first line, stripped), else ``$PI0REMOTE_TOKEN``."""
    if token and token_file:
        raise ValueError("give --token or --token-file, not both")
    if token:
        return token
    if token_file:
        try:
            text = Path(token_file).read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read --token-file {token_file}: {exc.strerror or exc}") from None
        if not text:
            raise ValueError(f"--token-file {token_file} is empty")
        return text.splitlines()[0].strip()
    return (os.environ.get(TOKEN_ENV) or None) if env else None


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

        return connect(url, **self.connect_kwargs(url))

    def with_fingerprint(self, fingerprint: str | None) -> ClientOptions:
        """These options trusting ``fingerprint`` too (learnt from a server's metadata), if none was set."""
        if not fingerprint or self.quic_fingerprint or self.quic_cafile:
            return self
        return ClientOptions(self.timeout, self.token, fingerprint, None, self.quic_insecure)
