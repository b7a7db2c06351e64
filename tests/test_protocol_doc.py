"""docs/protocol.md's hand-written client (msgpack + sockets only) works against the real server."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from pi0remote.policies.builtin import ZerosPolicy
from pi0remote.server import BackgroundServer

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"


def test_protocol_doc_client_runs() -> None:
    code = re.search(r"## A client in a few lines.*?```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    with BackgroundServer(ZerosPolicy(), http_port=0, tcp_port=0, transports=["tcp"]) as srv:
        port = srv.url("tcp").rsplit(":", 1)[1]
        scope: dict = {}
        exec(compile(code.replace("8765", port), str(DOC), "exec"), scope)
    assert scope["kind"] == 4
    assert (
        scope["chunk"].shape == (50, 14) and scope["chunk"].dtype == np.float32 and not scope["chunk"].any()
    )
