"""Hostile clients for the security tests and ``benchmarks/attacks.py`` (docs/security.md).

Owns: a server subprocess whose RSS can be read (:class:`AttackServer`, optionally with a low
``RLIMIT_NOFILE``), a well-behaved client in its own process measuring failures and latency while an
attack runs (:class:`Prober`), the attacks of issue 16's table (each a bounded function that sends
bytes to loopback only), and misbehaving policies loadable as ``pi0remote.harness.attacks:NAME``.
Attack sockets bind source address 127.0.0.2 so that per-address limits can tell them from the prober.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

from ..policies import CANONICAL_INPUT_SPEC, PolicyMetadata
from .procs import ServerProcess

ATTACKER_IP = "127.0.0.2"
TOKEN = "s3cret-token"


# -- misbehaving policies ----------------------------------------------------------------------------
class _Base:
    def __init__(self) -> None:
        self.metadata = PolicyMetadata(name=type(self).__name__, input_spec=dict(CANONICAL_INPUT_SPEC))
        self._action = np.zeros((50, 14), np.float32)


class TrapPolicy(_Base):
    """Behaves until a request carries ``trap``: then hangs (``"hang"``: 30 s), exits, or replies badly."""

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        trap = obs.get("trap")
        if trap is not None:
            print(f"trap {trap}", flush=True)  # lets a test know the call has reached the policy
        if trap == "hang":
            time.sleep(float(obs.get("hang_s", 30.0)))
        elif trap == "exit":
            sys.exit(3)
        elif trap == "interrupt":
            raise KeyboardInterrupt
        elif trap == "string":
            return {"action": "not an array"}
        elif trap == "shape":
            return {"action": np.zeros((3, 3), np.float32)}
        elif trap == "huge":
            return {"action": self._action, "blob": b"\0" * (int(obs.get("huge_bytes", 2**20)))}
        return {"action": self._action}


# -- the server under attack ------------------------------------------------------------------------
class AttackServer(ServerProcess):
    """``python -m pi0remote.serve ARGS`` in a subprocess; ``rss_mb()`` reads its memory from /proc."""

    def __init__(
        self,
        args: list[str],
        *,
        nofile: int | None = None,
        env: dict[str, str] | None = None,
        ready_timeout: float = 60.0,
    ) -> None:
        def limit() -> None:  # runs in the child before exec
            if nofile is not None:
                import resource

                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        super().__init__(args, ready_timeout=ready_timeout, env=env, preexec_fn=limit)

    def wait_for_line(self, text: str, timeout: float = 10.0) -> bool:
        """True once a line equal to ``text`` was printed (polls the captured output)."""
        deadline = time.monotonic() + timeout
        while text not in self.lines:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                return False
            time.sleep(0.02)
        return True

    def addr(self, scheme: str) -> tuple[str, int]:
        host, _, port = self.url(scheme).split("://", 1)[1].split("/", 1)[0].rpartition(":")
        return host, int(port)

    def rss_mb(self) -> float:
        return rss_mb(self.proc.pid)

    def stop(self, timeout: float = 10.0) -> float:  # type: ignore[override]
        """SIGTERM; returns the seconds it took to exit (killed after ``timeout``)."""
        t0 = time.monotonic()
        super().stop(timeout)
        return time.monotonic() - t0

    def __enter__(self) -> AttackServer:
        return self


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


class PeakRss:
    """Samples a process's RSS every ``period`` seconds in a thread; ``peak`` is the largest seen."""

    def __init__(self, pid: int, period: float = 0.02) -> None:
        self.pid = pid
        self.peak = rss_mb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._thread.start()

    def _run(self, period: float) -> None:
        while not self._stop.wait(period):
            try:
                self.peak = max(self.peak, rss_mb(self.pid))
            except OSError:
                return

    def stop(self) -> float:
        self._stop.set()
        self._thread.join(1.0)
        return self.peak


# -- the well-behaved client ------------------------------------------------------------------------
class Prober:
    """A client in its own process sending canonical requests every ``period`` s until :meth:`stop`."""

    def __init__(self, url: str, token: str | None = TOKEN, period: float = 0.01) -> None:
        cmd = [sys.executable, "-m", "pi0remote.harness.attacks", "probe", url, token or "", str(period)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        started = self.proc.stdout.readline().strip()
        if started != "started":
            raise RuntimeError(f"prober did not start: {started!r}")

    def stop(self) -> dict[str, Any]:
        """``{"n", "failures", "p50_ms", "p99_ms", "max_ms", "errors"}`` over the probing period."""
        out, _ = self.proc.communicate("stop\n", timeout=60)
        return json.loads(out.strip().splitlines()[-1])


def _probe_main(url: str, token: str, period: float) -> None:
    from .. import connect
    from .obs import canonical_obs

    client = connect(url, token=token or None, timeout=5.0)
    obs = canonical_obs()
    client.infer(obs)  # connected and warm before the attack starts
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    print("started", flush=True)
    lat: list[float] = []
    errors: list[str] = []
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            client.infer(obs)
            lat.append((time.perf_counter() - t0) * 1000.0)
        except Exception as exc:  # noqa: BLE001 - counted and reported
            errors.append(f"{type(exc).__name__}: {exc}"[:200])
        stop.wait(period)
    arr = np.asarray(lat or [float("nan")])
    result = {
        "n": len(lat),
        "failures": len(errors),
        "p50_ms": float(np.percentile(arr, 50)),
        "p99_ms": float(np.percentile(arr, 99)),
        "max_ms": float(arr.max()),
        "errors": errors[:5],
    }
    print(json.dumps(result), flush=True)


# -- attacks -----------------------------------------------------------------------------------------
def attacker_socket(addr: tuple[str, int], timeout: float = 5.0) -> socket.socket:
    """A TCP connection to ``addr`` from the attacker's source address."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.bind((ATTACKER_IP, 0))
    sock.connect(addr)
    return sock


def open_many(addr: tuple[str, int], n: int, first: bytes = b"") -> tuple[list[socket.socket], int]:
    """Up to ``n`` connections (each sending ``first``); returns them and how many were refused."""
    socks: list[socket.socket] = []
    refused = 0
    for _ in range(n):
        try:
            sock = attacker_socket(addr)
            if first:
                sock.sendall(first)
            socks.append(sock)
        except OSError:
            refused += 1
    return socks, refused


def count_closed(socks: list[socket.socket], wait: float = 2.0) -> int:
    """How many of ``socks`` the server has closed (EOF or reset) within ``wait`` seconds in total."""
    import selectors

    closed = 0
    deadline = time.monotonic() + wait
    pending = list(socks)
    with selectors.DefaultSelector() as sel:
        for s in pending:
            sel.register(s, selectors.EVENT_READ)
        while pending and (left := deadline - time.monotonic()) > 0:
            for key, _ in sel.select(left):
                s = key.fileobj
                try:
                    data = s.recv(65536)  # type: ignore[union-attr]
                except OSError:
                    data = b""
                if not data:
                    closed += 1
                    sel.unregister(s)
                    pending.remove(s)  # type: ignore[arg-type]
    return closed


def close_all(socks: list[Any]) -> None:
    for s in socks:
        try:
            s.close()
        except OSError:
            pass


def frame(kind: int, body: Any) -> bytes:
    from .. import protocol

    message = protocol.encode_message(kind, body)
    return protocol.frame_header(len(message)) + message


def hello_frame(token: str | None = TOKEN) -> bytes:
    from .. import protocol

    return frame(protocol.HELLO, protocol.hello_body(token))


def recv_frame(sock: socket.socket) -> tuple[int, Any]:
    from .. import protocol

    header = _recv_exact(sock, 4)
    (length,) = struct.unpack("!I", header)
    return protocol.decode_message(_recv_exact(sock, length))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return bytes(buf)


def bomb_jpeg(height: int = 16000, width: int = 16000) -> bytes:
    """A small valid JPEG whose frame header is rewritten to claim ``height`` x ``width`` pixels."""
    from ..jpeg import encode_jpeg

    data = bytearray(encode_jpeg(np.zeros((3, 16, 16), np.uint8)))
    i = 2
    while i < len(data):
        marker, length = data[i + 1], (data[i + 2] << 8) | data[i + 3]
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 5 : i + 9] = struct.pack("!HH", height, width)
            return bytes(data)
        i += 2 + length
    raise AssertionError("no SOF marker")


def http_request(addr: tuple[str, int], raw: bytes, *, read_timeout: float = 3.0) -> bytes:
    """Send raw bytes on a new connection; everything the server answers until it closes or goes quiet."""
    with attacker_socket(addr, read_timeout) as sock:
        try:
            sock.sendall(raw)
        except OSError:
            pass
        out = bytearray()
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except OSError:
            pass
        return bytes(out)


def quic_initials(addr: tuple[str, int], n: int) -> int:
    """Send ``n`` fresh QUIC Initials (real ClientHellos, new connection IDs) and never finish them."""
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    from ..quic_common import ALPN

    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((ATTACKER_IP, 0))
        config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN])
        config.verify_mode = 0
        for _ in range(n):
            quic = QuicConnection(configuration=config)
            quic.connect(addr, now=time.monotonic())
            for data, _ in quic.datagrams_to_send(now=time.monotonic()):
                try:
                    sock.sendto(data, addr)
                    sent += 1
                except BlockingIOError:
                    pass
    return sent


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "probe":
    _probe_main(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    os._exit(0)
