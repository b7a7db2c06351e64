"""The raw-socket floor: the least any transport could cost for the same bytes.

A minimal asyncio server that answers every length-prefixed frame with a fixed reply frame of the
canonical reply's size, without decoding, and a blocking client socket with TCP_NODELAY that sends the
canonical request in one write. Benchmarks report every transport as a ratio to this, measured in the
same run on the same machine.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import subprocess
import sys
import time
from typing import Any

from .. import protocol

_HEADER = struct.Struct("!I")


class _FloorProtocol(asyncio.Protocol):
    def __init__(self, reply: bytes) -> None:
        self.reply = _HEADER.pack(len(reply)) + reply
        self.buf = bytearray()
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 4:
            (n,) = _HEADER.unpack_from(self.buf)
            if len(self.buf) < 4 + n:
                return
            del self.buf[: 4 + n]
            self.transport.write(self.reply)


async def _serve(reply_size: int) -> None:
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(lambda: _FloorProtocol(b"\x04" * reply_size), "127.0.0.1", 0)
    print(f"listening tcp://127.0.0.1:{srv.sockets[0].getsockname()[1]}", flush=True)
    await srv.serve_forever()


def start_floor_server(reply_size: int) -> tuple[subprocess.Popen, int]:
    """Start the floor server in its own process; returns it and its port."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pi0remote.harness.floor", str(reply_size)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("listening tcp://"):
        proc.kill()
        raise RuntimeError(f"floor server did not start: {line!r}")
    return proc, int(line.rsplit(":", 1)[1])


def measure_floor(port: int, request: bytes, n: int, warmup: int) -> list[float]:
    """Round-trip seconds of ``n`` frames of ``request`` bytes after ``warmup`` calls."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    header = _HEADER.pack(len(request))
    buf = bytearray(1 << 16)
    samples: list[float] = []
    try:
        for i in range(warmup + n):
            t0 = time.perf_counter()
            sock.sendmsg([header, request])
            got = sock.recv_into(buf)  # header and (usually) the whole reply in one read
            while got < 4:
                got += sock.recv_into(memoryview(buf)[got:])
            (length,) = _HEADER.unpack_from(buf)
            body = bytearray(length)
            body[: got - 4] = buf[4:got]
            view = memoryview(body)[got - 4 :]
            while view:
                view = view[sock.recv_into(view) :]
            if i >= warmup:
                samples.append(time.perf_counter() - t0)
    finally:
        sock.close()
    return samples


def canonical_sizes(obs: dict[str, Any], reply_size: int | None = None) -> tuple[bytes, int]:
    """The request message for ``obs`` and the size of a canonical reply message."""
    import numpy as np

    request = protocol.encode_message(protocol.INFER, obs)
    if reply_size is None:
        reply = {"action": np.zeros((50, 14), np.float32), "inference_ms": 0.0}
        reply_size = len(
            protocol.encode_result(
                reply, {"decode_ms": 0.0, "queue_ms": 0.0, "policy_ms": 0.0}, time.perf_counter()
            )
        )
    return request, reply_size


if __name__ == "__main__":
    asyncio.run(_serve(int(sys.argv[1])))


def compare_to_floor(
    clients: dict[str, Any], obs: dict[str, Any], *, n: int, warmup: int, rounds: int
) -> tuple[dict[str, float], str]:
    """p50 µs of each client's ``infer(obs)`` and of the floor for the same bytes, in interleaved rounds.

    Every path is measured ``n // rounds`` times per round, so all of them see the same machine noise.
    Returns the p50s (``"floor"`` first) and a one-line description of the run.
    """
    import statistics

    request, reply_size = canonical_sizes(obs)
    per_round = max(1, n // rounds)
    samples: dict[str, list[float]] = {name: [] for name in ("floor", *clients)}
    floor_proc, port = start_floor_server(reply_size)
    try:
        for client in clients.values():
            for _ in range(warmup):
                client.infer(obs)
        measure_floor(port, request, 0, warmup)
        for _ in range(rounds):
            samples["floor"] += measure_floor(port, request, per_round, 2)
            for name, client in clients.items():
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    client.infer(obs)
                    samples[name].append(time.perf_counter() - t0)
    finally:
        floor_proc.kill()
    about = (
        f"request {len(request)} B, reply {reply_size} B, {per_round * rounds} calls per path "
        f"in {rounds} interleaved rounds after {warmup} warm-up calls"
    )
    return {name: statistics.median(v) * 1e6 for name, v in samples.items()}, about


def ratio_table(p50_us: dict[str, float], targets: dict[str, float]) -> str:
    """The p50s as a table of ratios to ``p50_us["floor"]``, each target marked ok or MISS."""
    floor = p50_us["floor"]
    width = max(len(name) for name in p50_us) + 2
    lines = [f"{'path':{width}} {'p50 µs':>9} {'× floor':>8} {'target':>7}"]
    for name, us in p50_us.items():
        target = targets.get(name)
        mark = "" if target is None else ("ok" if us / floor <= target else "MISS")
        shown = "" if target is None else f"≤{target:g}"
        lines.append(f"{name:{width}} {us:9.1f} {us / floor:8.2f} {shown:>7} {mark}")
    return "\n".join(lines)


def print_report(p50_us: dict[str, float], about: str, targets: dict[str, float], *, as_json: bool) -> None:
    """Print :func:`compare_to_floor`'s result: JSON (p50s and ratios), or ``about`` and the ratio table."""
    if as_json:
        import json

        ratios = {k: v / p50_us["floor"] for k, v in p50_us.items()}
        print(json.dumps({"p50_us": p50_us, "ratio": ratios}, indent=2))
    else:
        print(about)
        print(ratio_table(p50_us, targets))
