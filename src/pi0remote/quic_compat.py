"""Every use of aioquic's private attributes, in one place, behind a version check.

pi0remote's QUIC code reaches into ``QuicConnection`` internals for latency only: piggy-backing a pending
ACK on the next packet, sending a large request in bursts, skipping an empty packet-building pass,
and reading the probe-timeout count to declare a silent server dead. None of it is needed for
correctness. aioquic older than 1.4 is refused (:data:`OLDEST_WORKING`). With a version in
:data:`TESTED` (the range the test suite ran against,
pyproject's bound) these fast paths are used; with any other version, or when an attribute is
missing, each function falls back to aioquic's public API (send everything at once, always build
packets, count timeouts from our own timer). Nothing outside this module touches ``quic._*``.
"""

from __future__ import annotations

from typing import Any

import aioquic
from aioquic import tls
from aioquic.quic.recovery import QuicPacketRecovery

TESTED = ((1, 4, 0), (1, 7, 99))
"""Oldest and newest aioquic versions the test suite passed with (pyproject: ``aioquic>=1.4,<1.8``)."""
OLDEST_WORKING = (1, 4, 0)
"""aioquic 1.3.0 and older (the newest on Python 3.10) encrypt at most 1500-byte packets and fail with
``CryptoError: Invalid payload length`` on pi0remote's larger datagrams: they are refused at import."""


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


AIOQUIC_VERSION = _version(getattr(aioquic, "__version__", "0"))
if AIOQUIC_VERSION < OLDEST_WORKING:
    raise ImportError(
        f"pi0remote's QUIC transport needs aioquic >= 1.4 (found {aioquic.__version__}; aioquic 1.4 needs "
        "Python >= 3.11): pip install 'pi0remote[quic]'"
    )
PRIVATE_OK = TESTED[0] <= AIOQUIC_VERSION <= TESTED[1]
"""True when the private fast paths may be used (an aioquic version in :data:`TESTED`)."""


def ack_now(quic: Any) -> None:
    """Send a pending 1-RTT ACK with the next packet instead of after the ACK delay (no-op fallback)."""
    if not PRIVATE_OK:
        return
    try:
        space = quic._spaces[tls.Epoch.ONE_RTT]
    except (AttributeError, KeyError):
        return
    if space.ack_at is not None:
        space.ack_at = 0.0


class _BurstRecovery(QuicPacketRecovery):
    """aioquic's loss recovery, but one packet-building pass may be told to stop after ``burst_bytes``.

    aioquic reads ``congestion_window`` here only to bound one ``datagrams_to_send`` call (the congestion
    controller keeps its own figure), so lowering it splits a flight into bursts and changes nothing else.
    """

    burst_bytes: int | None = None

    @property
    def congestion_window(self) -> int:
        window = self._cc.congestion_window
        if self.burst_bytes is not None:
            return min(window, self._cc.bytes_in_flight + self.burst_bytes)
        return window


def enable_bursts(quic: Any) -> bool:
    """Make ``quic`` able to send in bursts (:func:`set_burst`); False when this aioquic cannot."""
    if not PRIVATE_OK:
        return False
    loss = getattr(quic, "_loss", None)
    if type(loss) is QuicPacketRecovery and hasattr(loss, "_cc"):
        loss.__class__ = _BurstRecovery
        return True
    return isinstance(loss, _BurstRecovery)


def set_burst(quic: Any, burst: int | None) -> bool:
    """Bound the next ``datagrams_to_send`` calls to about ``burst`` bytes (None: unbounded).

    Returns False (and changes nothing) when bursts are not enabled on ``quic``.
    """
    loss = getattr(quic, "_loss", None) if PRIVATE_OK else None
    if not isinstance(loss, _BurstRecovery):
        return False
    if burst is not None:
        burst = max(burst, max_datagram_size(quic))
    loss.burst_bytes = burst
    return True


def max_datagram_size(quic: Any) -> int:
    """The connection's current datagram size (the configured one as the public fallback)."""
    size = getattr(quic, "_max_datagram_size", None) if PRIVATE_OK else None
    if isinstance(size, int):
        return size
    return int(quic.configuration.max_datagram_size)


def pto_count(quic: Any) -> int:
    """Probe timeouts in a row without an acknowledgement (0 when this aioquic does not say)."""
    if not PRIVATE_OK:
        return 0
    count = getattr(getattr(quic, "_loss", None), "_pto_count", 0)
    return count if isinstance(count, int) else 0


def send_buffered(quic: Any, stream_id: int) -> int:
    """Bytes queued on a stream and not yet acknowledged by the peer (0 when this aioquic does not say)."""
    if not PRIVATE_OK:
        return 0
    try:
        sender = quic._streams[stream_id].sender
        return int(sender._buffer_stop - sender._buffer_start)
    except (AttributeError, KeyError, TypeError):
        return 0


def close_event(quic: Any) -> Any:
    """The ``ConnectionTerminated`` event aioquic holds once a close was sent or received, before it
    emits it after draining (None when unknown: the caller then waits for the event itself)."""
    return getattr(quic, "_close_event", None) if PRIVATE_OK else None


def nothing_due(quic: Any, now: float) -> bool:
    """True when building packets now would produce nothing (False whenever unsure: always send)."""
    if not PRIVATE_OK:
        return False
    try:
        if (
            not quic._handshake_confirmed
            or quic._handshake_done_pending
            or quic._close_pending
            or quic._probe_pending
            or quic._ping_pending
            or quic._retire_connection_ids
            or quic._streams_blocked_pending
            or quic._loss.bytes_in_flight
        ):
            return False
        if any(path.remote_challenges for path in quic._network_paths):
            return False
        for stream in quic._streams.values():  # data queued but held back (congestion, pacing)
            if not stream.sender.buffer_is_empty or stream.sender._pending_eof:
                return False
        ack_at = quic._spaces[tls.Epoch.ONE_RTT].ack_at
    except (AttributeError, KeyError, TypeError):  # internals changed: always send
        return False
    return ack_at is None or ack_at > now


__all__ = [
    "AIOQUIC_VERSION",
    "PRIVATE_OK",
    "TESTED",
    "ack_now",
    "close_event",
    "enable_bursts",
    "max_datagram_size",
    "nothing_due",
    "pto_count",
    "send_buffered",
    "set_burst",
]
