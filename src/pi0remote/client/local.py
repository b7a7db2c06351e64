"""``local://NAME`` and ``connect(policy=obj)``: the policy runs in this process, still through the codec.

The pump hands each encoded request to the same :class:`~pi0remote.server.core.ServerCore` the network
listeners use and returns its encoded reply, so codec and validation bugs show up without sockets; the
session applies the same size limit and decoding as on every transport.
"""

from __future__ import annotations

import asyncio

from ..errors import ConnectionLost
from .session import AsyncBytePump, BytePump, Message, TransportOptions

POLICY_OPTIONS = frozenset({"config", "checkpoint", "random_weights", "num_steps", "prompt"})
"""``load_policy`` keywords a ``local://NAME`` URL passes through."""


class LocalPump(BytePump):
    scheme = "local"
    OPTIONS = POLICY_OPTIONS | {"policy"}
    accepts_parts = True  # joining the parts copies the camera once; encode_message would copy it twice

    def __init__(self, options: TransportOptions) -> None:
        from ..policies import load_policy
        from ..server.core import ServerCore, Session

        super().__init__(options)
        url = options.url
        name = url.split("://", 1)[1] if "://" in url else url
        policy = options.extra.get("policy")
        if policy is None:
            policy = load_policy(name, **{k: v for k, v in options.extra.items() if k in POLICY_OPTIONS})
        self.core = ServerCore(policy, name=name or type(policy).__name__)
        self.session = Session(authenticated=True, transport="local")
        self.closed = True
        self._reply: bytes | None = None

    def open(self) -> None:
        warm = getattr(self.core.policy, "warmup", None)
        if warm is not None and not self.core.ready:
            warm()
            self.core.refresh_metadata()
        self.core.ready = True
        self.closed = False

    def send(self, message: Message) -> None:
        if self.closed:
            raise ConnectionLost("local transport is closed")
        if isinstance(message, list):
            message = b"".join(message)
        self._reply, _ = self.core.handle_now(message, self.session, blocking=True)  # type: ignore[misc]

    def receive(self) -> bytes:
        reply, self._reply = self._reply, None
        if reply is None:
            raise ConnectionLost("local transport has no reply waiting")
        return reply

    def close(self) -> None:
        self.closed = True


class AsyncLocalPump(AsyncBytePump):
    """Runs the policy on a worker thread (unless it is inline) so the caller's event loop keeps going."""

    scheme = "local"
    OPTIONS = LocalPump.OPTIONS
    accepts_parts = True

    def __init__(self, options: TransportOptions) -> None:
        super().__init__(options)
        self.sync = LocalPump(options)

    async def open(self) -> None:
        await asyncio.to_thread(self.sync.open)

    async def send(self, message: Message) -> None:
        if self.sync.core.runner.inline:
            self.sync.send(message)
        else:
            await asyncio.to_thread(self.sync.send, message)

    async def receive(self) -> bytes:
        return self.sync.receive()

    async def close(self) -> None:
        self.sync.close()


LocalTransport = LocalPump
AsyncLocalTransport = AsyncLocalPump

__all__ = ["AsyncLocalPump", "LocalPump"]
