"""``local://NAME`` and ``connect(policy=obj)``: the policy runs in this process, still through the codec.

Every request is encoded and decoded exactly as on the wire and handled by the same server core as
the network transports, so codec and validation bugs show up without sockets.
"""

from __future__ import annotations

import asyncio
from typing import Any

from .. import codec, protocol
from ..errors import ConnectionLost
from .base import AsyncTransport, Transport


class LocalTransport(Transport):
    scheme = "local"
    accepts_parts = True  # joining the parts copies the camera once; encode_message would copy it twice

    def __init__(
        self, url: str = "local://", *, policy: Any = None, token: str | None = None, **options: Any
    ) -> None:
        from .._malloc import tune_malloc
        from ..policies import load_policy
        from ..server.core import ServerCore, Session

        tune_malloc()
        name = url.split("://", 1)[1] if "://" in url else url
        if policy is None:
            policy = load_policy(name, **{k: v for k, v in options.items() if k in _POLICY_OPTIONS})
        self.core = ServerCore(policy, name=name or type(policy).__name__)
        self.session = Session(authenticated=True, transport="local")
        self.closed = True

    def open(self) -> dict[str, Any]:
        warm = getattr(self.core.policy, "warmup", None)
        if warm is not None and not self.core.ready:
            warm()
            self.core.refresh_metadata()
        self.core.ready = True
        self.closed = False
        return codec.unpackb(self.core.metadata_body())

    def roundtrip(self, message: bytes | list) -> tuple[int, memoryview]:
        if self.closed:
            raise ConnectionLost("local transport is closed")
        if isinstance(message, list):
            message = b"".join(message)
        reply, _ = self.core.handle_now(message, self.session, blocking=True)  # type: ignore[misc]
        return protocol.split_message(reply)

    def close(self) -> None:
        self.closed = True


_POLICY_OPTIONS = {"config", "checkpoint", "random_weights", "num_steps", "prompt"}


class AsyncLocalTransport(AsyncTransport):
    """Runs the policy on a worker thread so the caller's event loop keeps going."""

    scheme = "local"

    def __init__(self, url: str = "local://", **kwargs: Any) -> None:
        self.sync = LocalTransport(url, **kwargs)

    async def open(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.sync.open)

    accepts_parts = True

    async def roundtrip(self, message: bytes | list) -> tuple[int, memoryview]:
        if self.sync.core.runner.inline:
            return self.sync.roundtrip(message)
        return await asyncio.to_thread(self.sync.roundtrip, message)

    async def close(self) -> None:
        self.sync.close()
