"""The ASGI adapter: :class:`PolicyAsgiApp` serves the HTTP and WebSocket endpoints from a server core running
on another event loop, for platforms (Modal's web endpoints) that put their own HTTPS front before an ASGI
app."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from .. import codec, protocol
from ..errors import MessageTooLarge, to_wire


class PolicyAsgiApp:
    """A plain ASGI 3 app serving the HTTP and WebSocket endpoints from a server core running on ``loop``.

    Same contract as the built-in listener (``server/http.py``): msgpack bodies, ``Authorization: Bearer``
    on everything but ``/healthz``, typed errors (msgpack, or JSON when the client accepts only JSON).
    Requests are handed to the core's own event loop (one thread hop, no network hop); the ASGI server
    may run on any loop or thread.
    """

    def __init__(
        self,
        core: Any,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        max_message_bytes: int = protocol.DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.core = core
        self.loop = loop
        self.max_message_bytes = max_message_bytes

    async def _on_core_loop(self, make: Callable[[], Any]) -> Any:
        here = asyncio.get_running_loop()
        if self.loop is None or self.loop is here:
            return await make()
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(make(), self.loop))

    async def __call__(
        self, scope: dict[str, Any], receive: Callable[[], Any], send: Callable[[dict[str, Any]], Any]
    ) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    @staticmethod
    def _header(scope: dict[str, Any], name: bytes) -> str | None:
        for key, value in scope.get("headers") or ():
            if key.lower() == name:
                return value.decode("latin-1")
        return None

    # -- HTTP -------------------------------------------------------------------------------------------
    @staticmethod
    async def _respond(send: Callable[..., Any], status: int, content_type: str, body: bytes) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", content_type.encode()),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _error(
        self, send: Callable[..., Any], scope: dict[str, Any], status: int, exc: BaseException
    ) -> None:
        body = to_wire(exc)
        if "application/json" in (self._header(scope, b"accept") or ""):
            await self._respond(send, status, "application/json", json.dumps(body).encode())
        else:
            await self._respond(send, status, "application/msgpack", codec.packb(body))

    async def _read_body(self, receive: Callable[[], Any]) -> bytes | None:
        """The request body, or None when it exceeds the message size limit."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ConnectionError("client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_message_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _http(
        self, scope: dict[str, Any], receive: Callable[[], Any], send: Callable[..., Any]
    ) -> None:
        """Read the bounded body, then the core's own dispatch (:meth:`ServerCore.handle_http`) answers."""
        try:
            body = await self._read_body(receive)
        except ConnectionError:
            return
        if body is None:
            exc = MessageTooLarge(f"body exceeds the limit of {self.max_message_bytes} bytes")
            await self._error(send, scope, 413, exc)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or ()}
        method, path, core = scope.get("method", "GET"), scope.get("path", "/"), self.core
        reply = await self._on_core_loop(lambda: core.handle_http(method, path, headers, body))
        await self._respond(send, reply.status, reply.content_type, reply.body)

    # -- WebSocket --------------------------------------------------------------------------------------
    async def _websocket(
        self, scope: dict[str, Any], receive: Callable[[], Any], send: Callable[..., Any]
    ) -> None:
        from ..server.core import Session

        first = await receive()
        if first["type"] != "websocket.connect":
            return
        if scope.get("path") != "/ws":
            await send({"type": "websocket.close", "code": 1008, "reason": "no WebSocket endpoint here"})
            return
        authorised = self.core.check_bearer(self._header(scope, b"authorization"))
        if not authorised and "websocket.http.response" in (scope.get("extensions") or {}):
            # Same answer as the built-in listener: refuse the upgrade with 401.
            body = b"missing or wrong token\n"
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": 401,
                    "headers": [
                        (b"content-type", b"text/plain"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "websocket.http.response.body", "body": body})
            return
        # Without that extension the upgrade is accepted and the HELLO must carry the token instead
        # (the core answers a typed authentication error and closes, as on the raw TCP transport).
        await send({"type": "websocket.accept"})
        session = Session(authenticated=authorised, transport="ws")
        try:
            await self._ws_loop(session, receive, send)
        finally:
            self.core.load.session_closed(session)

    async def _ws_loop(self, session: Any, receive: Callable[[], Any], send: Callable[..., Any]) -> None:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is None:
                text = message.get("text")
                data = text.encode() if text is not None else b""
            if len(data) > self.max_message_bytes:
                err = MessageTooLarge(
                    f"message of {len(data)} bytes exceeds the limit of {self.max_message_bytes}"
                )
                await send({"type": "websocket.send", "bytes": protocol.encode_error(err)})
                await send({"type": "websocket.close", "code": 1009, "reason": "message too big"})
                return
            reply, keep_open = await self._on_core_loop(lambda data=data: self.core.handle(data, session))
            await send({"type": "websocket.send", "bytes": bytes(reply)})
            if not keep_open:
                await send({"type": "websocket.close", "code": 1008, "reason": "authentication failed"})
                return
