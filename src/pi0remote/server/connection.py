"""What every server-side connection shares: an inbox served in order, an idle timer, the core.

Also the per-connection bounds of :class:`~pi0remote.server.limits.Limits` that do not depend on the
transport: the handshake deadline (authenticate within ``handshake_timeout`` seconds), back-pressure
both ways (reading pauses while the inbox is full or while the client leaves its replies unread) and
the drop of a client that stays unread longer than ``write_stall_timeout``.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

from .core import ServerCore, Session

LINGER_S = 2.0


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """TCP_NODELAY on a TCP transport (every reply is one write; never wait for Nagle)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def linger_close(transport: asyncio.BaseTransport, linger: float = LINGER_S) -> None:
    """Close after the last reply without resetting the peer.

    Closing a socket that still has unread input makes the kernel send RST, which can destroy the
    error reply we just wrote (a client still sending an oversized message would never see why).
    So: send FIN, keep reading (and discarding) for a moment, then close.
    """
    if transport.is_closing():
        return
    if isinstance(transport, asyncio.WriteTransport) and transport.can_write_eof():
        transport.write_eof()
        asyncio.get_running_loop().call_later(linger, transport.close)
    else:
        transport.close()


class MessageConnection:
    """Serves complete messages one at a time, in arrival order, and closes idle peers.

    A subclass (or owner) delivers complete messages with :meth:`message_received` and provides
    ``send(reply)`` and ``close()`` callbacks. The idle timer runs only while nothing is in flight, and
    restarts on each complete message and each reply, so a peer that connects and sends nothing, or
    stalls in the middle of a message, is closed after ``idle_timeout`` seconds.
    """

    MAX_QUEUED = 8
    MAX_UNPAUSED = 64
    """Requests queued on a connection that cannot pause its reading before it is closed."""

    def __init__(
        self,
        core: ServerCore,
        session: Session,
        *,
        send: Callable[[bytes], None],
        close: Callable[[], None],
        idle_timeout: float | None,
        pause: Callable[[bool], None] | None = None,
        handshake_timeout: float | None = None,
        write_stall_timeout: float | None = None,
        abort: Callable[[], None] | None = None,
        write_buffered: Callable[[], int] | None = None,
    ) -> None:
        self.core = core
        self.session = session
        self._send = send
        self._close = close
        self._abort = abort
        self._pause = pause
        self.idle_timeout = idle_timeout
        self._inbox: deque[Any] = deque()
        self._task: asyncio.Task | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._last_active = 0.0
        self._suspended = False
        self.closed = False
        self._paused = False
        self._write_blocked = False
        self._write_resumed: asyncio.Event | None = None
        self._stall_timeout = write_stall_timeout
        self._stall: asyncio.TimerHandle | None = None
        self._write_buffered = write_buffered
        self._stall_bytes = -1
        self._handshake: asyncio.TimerHandle | None = None
        if handshake_timeout and not session.authenticated:
            self._handshake = asyncio.get_running_loop().call_later(handshake_timeout, self._on_handshake)
        self.restart_idle_timer()

    def _on_handshake(self) -> None:
        self._handshake = None
        if not self.session.authenticated and not self.closed:
            self.shutdown()

    # -- back-pressure ---------------------------------------------------------------------------
    def writing_paused(self, paused: bool) -> None:
        """The transport's write buffer passed its high-water mark (True) or drained (False).

        While paused nothing more is served or read; a client that stays unread longer than
        ``write_stall_timeout`` is dropped.
        """
        self._write_blocked = paused
        loop = asyncio.get_running_loop()
        if paused:
            if self._stall is None and self._stall_timeout:
                self._stall_bytes = self._write_buffered() if self._write_buffered else -1
                self._stall = loop.call_later(self._stall_timeout, self._on_stall)
        else:
            if self._stall is not None:
                self._stall.cancel()
                self._stall = None
            if self._write_resumed is not None:
                self._write_resumed.set()
        self._update_reading()

    def _on_stall(self) -> None:
        """Still paused after ``write_stall_timeout``: drop the client, unless it read something meanwhile."""
        self._stall = None
        now = self._write_buffered() if self._write_buffered else -1
        if 0 <= now < self._stall_bytes and self._stall_timeout and not self.closed:
            self._stall_bytes = now  # a slow reader, not a stalled one
            self._stall = asyncio.get_running_loop().call_later(self._stall_timeout, self._on_stall)
            return
        self.abort()

    def abort(self) -> None:
        """Drop the connection at once (a client that does not read its replies)."""
        self._stall = None
        self.shutdown(abort=True)

    def _update_reading(self) -> None:
        want = len(self._inbox) >= self.MAX_QUEUED or self._write_blocked
        if self._pause is not None and want != self._paused and not self.closed:
            self._paused = want
            self._pause(want)

    def restart_idle_timer(self) -> None:
        """Mark activity now (a complete message or a reply); the idle clock restarts from here.

        Cheap on purpose (called twice per request): it stores a time; the one timer re-arms itself.
        """
        self._suspended = False
        if not self.idle_timeout or self.closed:
            return
        loop = asyncio.get_running_loop()
        self._last_active = loop.time()
        if self._idle is None:
            self._idle = loop.call_at(self._last_active + self.idle_timeout, self._on_idle)

    def suspend_idle_timer(self) -> None:
        """Stop the idle clock while the owner has a request in flight."""
        self._suspended = True

    def _on_idle(self) -> None:
        self._idle = None
        if self.closed or not self.idle_timeout:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._suspended or self._task is not None:
            self._idle = loop.call_at(now + self.idle_timeout, self._on_idle)
        elif now - self._last_active >= self.idle_timeout - 1e-3:
            self.shutdown()
        else:
            self._idle = loop.call_at(self._last_active + self.idle_timeout, self._on_idle)

    def _cancel_timers(self) -> None:
        for timer in (self._idle, self._stall, self._handshake):
            if timer is not None:
                timer.cancel()
        self._idle = self._stall = self._handshake = None
        if self._write_resumed is not None:
            self._write_resumed.set()

    def shutdown(self, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self._cancel_timers()
        self._inbox.clear()
        if abort and self._abort is not None:
            self._abort()
        else:
            self._close()

    def connection_lost(self) -> None:
        self.closed = True
        self.core.load.session_closed(self.session)
        self._cancel_timers()
        self._inbox.clear()

    def message_received(self, message: Any) -> None:
        if self.closed:
            return
        if self._task is None and not self._inbox and not self._write_blocked:
            now = self.core.handle_now(message, self.session)
            if now is not None:
                self._deliver(*now)
                return
        self._inbox.append(message)
        self.suspend_idle_timer()
        if self._pause is None and len(self._inbox) > self.MAX_UNPAUSED:
            self.shutdown()  # a transport that cannot stop reading (QUIC): too many pipelined requests
            return
        self._update_reading()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._serve())

    def _deliver(self, reply: bytes, keep_open: bool) -> None:
        if self.closed:
            return
        self._send(reply)
        if not keep_open:
            self.shutdown()
        else:
            self.restart_idle_timer()

    async def _serve(self) -> None:
        try:
            while self._inbox and not self.closed:
                while self._write_blocked and not self.closed:
                    self._write_resumed = self._write_resumed or asyncio.Event()
                    self._write_resumed.clear()
                    await self._write_resumed.wait()
                if self.closed or not self._inbox:
                    break
                message = self._inbox.popleft()
                if len(self._inbox) < self.MAX_QUEUED // 2:
                    self._update_reading()
                reply, keep_open = await self.core.handle(message, self.session)
                self._deliver(reply, keep_open)
        finally:
            self._task = None
            if not self.closed:
                self.restart_idle_timer()
