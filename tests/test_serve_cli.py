"""``python -m pi0remote.serve`` as a user runs it: output lines, every transport, clean shutdown."""

from __future__ import annotations

import json
import re
import signal
import urllib.request

import numpy as np
import pytest

from conftest import make_obs
from pi0remote import AuthenticationError, connect
from pi0remote.harness.procs import ServerProcess

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_prints_listeners_serves_and_stops_cleanly(sig) -> None:
    with ServerProcess(["--policy", "zeros", "--http-port", "0", "--tcp-port", "0", "--token", "tok"]) as srv:
        assert [re.sub(r":\d+", ":PORT", u) for u in srv.urls] == [
            "http://127.0.0.1:PORT",
            "ws://127.0.0.1:PORT/ws",
            "tcp://127.0.0.1:PORT",
        ]
        assert srv.lines[: len(srv.urls)] == [f"listening {u}" for u in srv.urls]
        assert "ready" in srv.lines
        for url in srv.urls:
            with connect(url, token="tok") as client:
                reply = client.infer(make_obs(0))
                assert reply["action"].shape == (50, 14) and not reply["action"].any()
        with pytest.raises(AuthenticationError):
            connect(srv.url("tcp"), token="nope")
        with urllib.request.urlopen(srv.url("http") + "/healthz", timeout=5) as resp:
            assert json.loads(resp.read()) == {"status": "ok"}
        srv.proc.send_signal(sig)
        assert srv.proc.wait(10) == 0


def test_serve_transport_selection_and_module_policy() -> None:
    args = [
        "--policy",
        "pi0remote.policies.builtin:EchoPolicy",
        "--http-port",
        "0",
        "--tcp-port",
        "0",
        "--transports",
        "tcp",
    ]
    with ServerProcess(args) as srv:
        assert len(srv.urls) == 1 and srv.urls[0].startswith("tcp://")
        with connect(srv.urls[0]) as client:
            assert client.infer({"x": np.zeros(3, np.int16)})["received"] == {
                "x": {"dtype": "int16", "shape": [3]}
            }


def test_sleep_policy_costs_what_it_says() -> None:
    with ServerProcess(
        ["--policy", "sleep:30", "--http-port", "0", "--tcp-port", "0", "--transports", "tcp"]
    ) as srv:
        with connect(srv.urls[0]) as client:
            reply = client.infer(make_obs(0))
    assert 29.0 <= reply["inference_ms"] < 200.0
    assert reply["client_timing"]["round_trip_ms"] >= reply["inference_ms"]


def test_bad_policy_name_fails_with_a_message() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "pi0remote.serve", "--policy", "no_such_module:thing"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "no_such_module" in out.stderr
