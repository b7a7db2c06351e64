"""Start ``python -m pi0remote.serve`` as a subprocess and learn its URLs from its output."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence


class ServerProcess:
    """A ``pi0remote.serve`` subprocess; ``urls`` holds its ``listening`` lines. A context manager."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        ready_timeout: float = 120.0,
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.args = [sys.executable, "-m", "pi0remote.serve", *args]
        self.urls: list[str] = []
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
            preexec_fn=preexec_fn,
        )
        self._wait_ready(ready_timeout)

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc.stdout is not None
        ready = threading.Event()

        def reader() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                line = line.rstrip("\n")
                self.lines.append(line)
                if line.startswith("listening "):
                    self.urls.append(line.split(" ", 1)[1])
                elif line == "ready":
                    ready.set()
            ready.set()

        threading.Thread(target=reader, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.05):
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"server not ready after {timeout}s: {self.lines[-5:]}")
        if self.proc.poll() is not None and "ready" not in self.lines:
            raise RuntimeError(f"server exited with {self.proc.returncode}: {self.lines[-10:]}")

    def url(self, scheme: str) -> str:
        for url in self.urls:
            if url.split("://", 1)[0] == scheme:
                return url
        raise KeyError(f"server is not listening on {scheme}: {self.urls}")

    @property
    def quic_fingerprint(self) -> str | None:
        """The SHA-256 fingerprint of the server's QUIC certificate, when it printed one."""
        for line in self.lines:
            if line.startswith("quic fingerprint sha256:"):
                return line.split(":", 1)[1].strip()
        return None

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
