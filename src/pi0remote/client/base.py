"""``PolicyClient`` and its async twin: two thin front ends driving one :class:`ClientSession` over a byte pump.

The session (:mod:`pi0remote.client.session`) decides everything (handshake, encoding, size limit, typed
errors, the retry rule); the pump (one module per transport) moves whole messages. The two front ends
below differ only in ``await``: each call is *connect if needed, send (resent once only when it was not
delivered), receive, decode*, and any failure drops the connection so the next call starts fresh.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .. import protocol
from ..errors import Pi0RemoteError, ProtocolError
from ..policies.base import PolicyMetadata
from .session import AsyncBytePump, BytePump, ClientSession, Message, add_client_timing


class _ClientBase:
    def __init__(self, pump: BytePump, url: str) -> None:
        self.url = url
        self.pump = pump
        self.session = ClientSession(pump.options, pump)
        self._open = False
        self.calls = 0
        self.last_reply_bytes = 0
        """Size of the last reply message (bytes after framing), for benchmarks."""

    @property
    def transport(self) -> BytePump:
        """The byte pump (kept under its old name)."""
        return self.pump

    @property
    def metadata(self) -> dict[str, Any]:
        """What the server said about itself and its policy (protocol, policy name, input spec, ...)."""
        if self.session.metadata is None:
            raise ProtocolError("not connected")
        return self.session.metadata

    @property
    def policy_metadata(self) -> PolicyMetadata:
        return PolicyMetadata.from_dict(self.metadata.get("policy", {}))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"


class PolicyClient(_ClientBase):
    """``infer(obs) -> dict`` against a policy wherever it runs. Use :func:`pi0remote.connect`."""

    def connect(self) -> PolicyClient:
        if self._open:
            return self
        attempt = 0
        while True:
            try:
                self.pump.open()
                break
            except Pi0RemoteError as exc:
                self.pump.close()
                time.sleep(self.session.connect_delay(exc, attempt))
                attempt += 1
        self._open = True
        try:
            self.pump.send(self.session.hello())
            self.pump.on_metadata(self.session.accept_metadata(self.pump.receive()))
        except BaseException:
            self._drop()
            raise
        return self

    def _drop(self) -> None:
        self._open = False
        self.pump.close()

    def _receive_after(self, message: Message) -> Any:
        """Send ``message`` (once more on a fresh connection if it was not delivered), return the reply."""
        for attempt in (0, 1):
            if not self._open:
                self.connect()
            try:
                self.pump.send(message)
            except Pi0RemoteError as exc:
                self._drop()
                if self.session.resend_after(exc, attempt, sent=False):
                    continue
                raise
            try:
                return self.pump.receive()
            except Pi0RemoteError as exc:
                self._drop()
                if self.session.resend_after(exc, attempt, sent=True):
                    continue
                raise self.session.receive_failure(exc) from exc
        raise AssertionError("unreachable")

    def _reply(self, data: Any, expected: int) -> dict[str, Any]:
        try:
            return self.session.reply(data, expected)
        except Pi0RemoteError as exc:
            if not self.session.keeps_connection(exc):
                self._drop()
            raise

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        """Send one observation; return the policy's reply with ``client_timing`` added."""
        t0 = time.perf_counter()
        message = self.session.request(protocol.INFER, obs)
        t1 = time.perf_counter()
        data = self._receive_after(message)
        t2 = time.perf_counter()
        self.last_reply_bytes = len(data)
        reply = self._reply(data, protocol.RESULT)
        self.calls += 1
        return add_client_timing(reply, t0, t1, t2, time.perf_counter())

    def reset(self) -> None:
        """Tell the policy a new episode starts."""
        self._reply(self._receive_after(protocol.encode_message(protocol.RESET, {})), protocol.RESET_OK)

    def close(self) -> None:
        if self._open:
            self._drop()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncPolicyClient(_ClientBase):
    """Async twin of :class:`PolicyClient`. Use ``await pi0remote.aconnect(url)``."""

    pump: AsyncBytePump

    async def connect(self) -> AsyncPolicyClient:
        if self._open:
            return self
        attempt = 0
        while True:
            try:
                await self.pump.open()
                break
            except Pi0RemoteError as exc:
                await self.pump.close()
                await asyncio.sleep(self.session.connect_delay(exc, attempt))
                attempt += 1
        self._open = True
        try:
            await self.pump.send(self.session.hello())
            self.pump.on_metadata(self.session.accept_metadata(await self.pump.receive()))
        except BaseException:
            await self._drop()
            raise
        return self

    async def _drop(self) -> None:
        self._open = False
        await self.pump.close()

    async def _receive_after(self, message: Message) -> Any:
        for attempt in (0, 1):
            if not self._open:
                await self.connect()
            try:
                await self.pump.send(message)
            except Pi0RemoteError as exc:
                await self._drop()
                if self.session.resend_after(exc, attempt, sent=False):
                    continue
                raise
            try:
                return await self.pump.receive()
            except Pi0RemoteError as exc:
                await self._drop()
                if self.session.resend_after(exc, attempt, sent=True):
                    continue
                raise self.session.receive_failure(exc) from exc
        raise AssertionError("unreachable")

    async def _reply(self, data: Any, expected: int) -> dict[str, Any]:
        try:
            return self.session.reply(data, expected)
        except Pi0RemoteError as exc:
            if not self.session.keeps_connection(exc):
                await self._drop()
            raise

    async def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        message = self.session.request(protocol.INFER, obs)
        t1 = time.perf_counter()
        data = await self._receive_after(message)
        t2 = time.perf_counter()
        self.last_reply_bytes = len(data)
        reply = await self._reply(data, protocol.RESULT)
        self.calls += 1
        return add_client_timing(reply, t0, t1, t2, time.perf_counter())

    async def reset(self) -> None:
        data = await self._receive_after(protocol.encode_message(protocol.RESET, {}))
        await self._reply(data, protocol.RESET_OK)

    async def close(self) -> None:
        if self._open:
            await self._drop()

    async def __aenter__(self) -> AsyncPolicyClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


Transport = BytePump
AsyncTransport = AsyncBytePump
"""The seam's former names."""

__all__ = ["AsyncPolicyClient", "AsyncTransport", "PolicyClient", "Transport"]
