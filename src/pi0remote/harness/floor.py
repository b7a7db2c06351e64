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
