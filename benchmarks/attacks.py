"""Rerun issue 16's attack table against ``pi0remote serve`` on loopback and print it (docs/security.md).

    PYTHONPATH=src nice -n 10 python benchmarks/attacks.py            # full counts (~2 min)
    PYTHONPATH=src python benchmarks/attacks.py --scale 0.2          # a quick look

Each row starts a fresh measurement: a well-behaved client in its own process (127.0.0.1) sends the
canonical request every 10 ms over TCP while the attack runs from 127.0.0.2; the server's peak RSS is
sampled from /proc every 20 ms. Columns: what the server did, its peak RSS, the prober's requests,
failures and p99. Targets: no prober failures, p99 <= 50 ms, RSS < 300 MB throughout.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from pi0remote import codec, connect, protocol
from pi0remote.harness import attacks as A
from pi0remote.harness.obs import canonical_obs

TRAP = "pi0remote.harness.attacks:TrapPolicy"
BASE_ARGS = ["--policy", TRAP, "--http-port", "0", "--tcp-port", "0", "--token", A.TOKEN]


def measured(srv: A.AttackServer, attack: Callable[[], str], *, probe: bool = True) -> dict[str, Any]:
    """Run ``attack`` with the prober and the RSS sampler; returns the row's figures."""
    prober = A.Prober(srv.url("tcp")) if probe else None
    base = srv.rss_mb()
    peak = A.PeakRss(srv.proc.pid)
    cpu0 = _cpu_s(srv.proc.pid)
    outcome = attack()
    row = {
        "outcome": outcome,
        "rss_base": base,
        "rss_peak": peak.stop(),
        "cpu_s": _cpu_s(srv.proc.pid) - cpu0,
    }
    row["rss_after"] = srv.rss_mb() if srv.proc.poll() is None else float("nan")
    row["probe"] = prober.stop() if prober is not None else None
    return row


def _cpu_s(pid: int) -> float:
    import os

    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:  # the server has exited (the SIGTERM row)
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- rows ------------------------------------------------------------------------------------------
def big_headers(srv: A.AttackServer, n: int) -> str:
    socks, _ = A.open_many(srv.addr("tcp"), n, struct.pack("!I", 32 * 2**20))
    for _ in range(n):
        sock = A.attacker_socket(srv.addr("tcp"))
        sock.sendall(A.hello_frame())
        A.recv_frame(sock)
        sock.sendall(struct.pack("!I", 32 * 2**20) + b"\x03" + bytes(4096))
        socks.append(sock)
    time.sleep(1.0)
    closed = A.count_closed(socks, wait=0.1)
    A.close_all(socks)
    return f"{n} unauthenticated + {n} authenticated, {closed} closed by the server"


def idle(srv: A.AttackServer, n: int) -> str:
    before = srv.rss_mb()
    t0 = time.monotonic()
    socks, refused = A.open_many(srv.addr("tcp"), n)
    opened_s = time.monotonic() - t0
    grown = srv.rss_mb() - before
    early = A.count_closed(socks, wait=0.3)
    A.close_all(socks)
    held = n - refused - early
    per = grown * 1024 / max(1, held)
    return f"{held} held ({refused + early} refused), {per:.1f} KB each (opened in {opened_s:.1f} s)"


def idle_default_limits(srv: A.AttackServer, n: int) -> str:
    t0 = time.monotonic()
    socks, refused = A.open_many(srv.addr("tcp"), n)
    opened = time.monotonic() - t0
    closed = A.count_closed(socks, wait=15.0)
    A.close_all(socks)
    return (
        f"{n} opened over {opened:.0f} s; {refused + closed} closed by the server within 15 s"
        " (past 256 per address at once, the others at the 10 s handshake deadline)"
    )


def quic_initials(srv: A.AttackServer, n: int) -> str:
    sent = A.quic_initials(srv.addr("quic"), n)
    time.sleep(1.0)
    return f"{sent} Initials sent; half-open capped (--quic-max-half-open), Retry past the threshold"


def jpeg_bomb(srv: A.AttackServer, n: int) -> str:
    obs = canonical_obs()
    obs["cam_high"] = {"jpeg": A.bomb_jpeg()}
    t0 = time.perf_counter()
    kinds = set()
    with connect(srv.url("tcp"), token=A.TOKEN) as client:
        for _ in range(n):
            try:
                client.infer(obs)
            except Exception as exc:  # noqa: BLE001 - the typed error is the outcome
                kinds.add(getattr(exc, "code", type(exc).__name__))
    each = (time.perf_counter() - t0) * 1000 / n
    return f"{n} x {len(A.bomb_jpeg())}-byte JPEG claiming 16000x16000: {sorted(kinds)}, {each:.2f} ms each"


def unauth_uploads(srv: A.AttackServer, n: int) -> str:
    head = b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Length: 8388608\r\nExpect: 100-continue\r\n\r\n"
    reply = A.http_request(srv.addr("http"), head, read_timeout=1.0)
    socks = []
    for _ in range(n):
        sock = A.attacker_socket(srv.addr("http"), timeout=0.5)
        sock.sendall(head.replace(b"Expect: 100-continue\r\n", b""))
        try:
            sock.sendall(bytes(8 * 2**20))
        except OSError:
            pass
        socks.append(sock)
    A.close_all(socks)
    status = reply.split(b"\r\n", 1)[0].decode()
    return f"Expect: 100-continue -> {status!r} ({'no' if b'100 Continue' not in reply else 'a'} 100 Continue); {n} x 8 MiB refused"


def flood_in_flight(srv: A.AttackServer, mb: int) -> str:
    obs = canonical_obs()
    obs["trap"], obs["hang_s"] = "hang", 0.6
    body = codec.packb(obs)
    head = f"POST /infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {A.TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n"
    sock = A.attacker_socket(srv.addr("http"), timeout=0.5)
    sock.sendall(head.encode() + body)
    sent, chunk, deadline = 0, bytes(1 << 20), time.monotonic() + 0.5
    while sent < mb * 2**20 and time.monotonic() < deadline:
        try:
            sent += sock.send(chunk)
        except OSError:
            break
    sock.close()
    return (
        f"server took {sent / 2**20:.1f} of {mb} MiB while the request was in flight (then stopped reading)"
    )


def ws_pipeline(srv: A.AttackServer, n: int) -> str:
    from websockets.sync.client import connect as ws_connect

    message = protocol.encode_message(protocol.INFER, canonical_obs())
    headers = {"Authorization": f"Bearer {A.TOKEN}"}
    with ws_connect(srv.url("ws"), additional_headers=headers, max_size=None) as ws:
        ws.send(protocol.encode_message(protocol.HELLO, protocol.hello_body(A.TOKEN)))
        done = [0]

        def flood() -> None:
            try:
                for _ in range(n):
                    ws.send(message)
                    done[0] += 1
            except Exception:
                pass

        t = threading.Thread(target=flood, daemon=True)
        t.start()
        t.join(40.0)
        ws.socket.close()
    return f"{done[0]} of {n} sent and served at the policy's pace (reading paused while 8 wait)"


def idle_raised(n: int) -> dict[str, Any]:
    """The cost of an idle connection itself: limits raised so that all of them are held."""
    raised = ["--max-connections", "5000", "--max-connections-per-ip", "5000", "--handshake-timeout", "120"]
    with A.AttackServer(BASE_ARGS + raised, nofile=8192) as srv:
        return measured(srv, lambda: idle(srv, n))


def unread_replies(srv: A.AttackServer, n: int) -> str:
    """Requests whose replies are large, never read: paused, then dropped (--write-stall-timeout)."""
    obs = {**canonical_obs(), "trap": "huge", "huge_bytes": 256 * 1024}
    message = protocol.encode_message(protocol.INFER, obs)
    sock = A.attacker_socket(srv.addr("tcp"), timeout=2.0)
    sock.sendall(A.hello_frame())
    A.recv_frame(sock)
    sent = 0
    try:
        for _ in range(n):
            sock.sendall(protocol.frame_header(len(message)) + message)
            sent += 1
    except OSError:
        pass
    time.sleep(8.0)  # never read: --write-stall-timeout 5 must drop us meanwhile
    dropped = _reset_or_eof(sock)
    sock.close()
    return f"{sent} requests sent, replies never read: {'dropped' if dropped else 'NOT dropped'} within 8 s"


def _reset_or_eof(sock: Any) -> bool:
    """Drain what the socket holds without blocking: True when it ends in EOF or a reset."""
    sock.setblocking(False)
    try:
        while sock.recv(1 << 20):
            pass
        return True  # EOF
    except BlockingIOError:
        return False  # still open
    except OSError:
        return True  # reset


def fd_limit(n: int) -> dict[str, Any]:
    args = ["--policy", "zeros", "--http-port", "0", "--tcp-port", "0", "--max-connections-per-ip", "5000"]
    with A.AttackServer(args, nofile=1024) as srv:

        def attack() -> str:
            socks, refused = A.open_many(srv.addr("tcp"), n)
            closed = A.count_closed(socks, wait=1.0)
            t0 = time.perf_counter()
            try:
                with connect(srv.url("tcp"), timeout=5, retries=0) as client:
                    client.infer(canonical_obs())
                fresh = "a new client got a reply"
            except Exception as exc:  # noqa: BLE001
                ms = (time.perf_counter() - t0) * 1000
                fresh = f"a new client over the limit is refused ({type(exc).__name__} after {ms:.0f} ms), no timeout"
            A.close_all(socks)
            logs = sum("refusing connections" in line or "accept() failed" in line for line in srv.lines)
            tracebacks = sum("Traceback" in line for line in srv.lines)
            return f"{n - refused - closed} held, {refused + closed} refused cleanly; {fresh}; {logs} log lines, {tracebacks} tracebacks"

        return measured(srv, attack)


def hanging_policy() -> dict[str, Any]:
    with A.AttackServer(BASE_ARGS + ["--policy-timeout", "1"]) as srv:

        def attack() -> str:
            client = connect(srv.url("tcp"), token=A.TOKEN, timeout=60)
            t0 = time.perf_counter()
            try:
                client.infer({**canonical_obs(), "trap": "hang", "hang_s": 30.0})
            except Exception as exc:  # noqa: BLE001
                err = f"{getattr(exc, 'code', type(exc).__name__)} after {time.perf_counter() - t0:.1f} s"
            health = A.http_request(srv.addr("http"), b"GET /healthz HTTP/1.0\r\n\r\n").split(b"\r\n", 1)[0]
            took = srv.stop(timeout=30)
            return f"client: {err}; /healthz {health.decode()!r} while stuck; SIGTERM exit in {took:.1f} s"

        row = measured(srv, attack, probe=False)
    return row


def policy_traps(srv: A.AttackServer) -> str:
    out = []
    with connect(srv.url("tcp"), token=A.TOKEN) as client:
        for trap in ("exit", "interrupt", "string", "shape", "huge"):
            try:
                client.infer({**canonical_obs(), "trap": trap, "huge_bytes": 33 * 2**20})
                out.append(f"{trap}: accepted")
            except Exception as exc:  # noqa: BLE001
                out.append(f"{trap}: {getattr(exc, 'code', type(exc).__name__)}")
            client.infer(canonical_obs())  # the same connection keeps working
    alive = srv.proc.poll() is None
    return ", ".join(out) + f"; server {'alive' if alive else 'EXITED'}, next call on the same connection ok"


HEADS = {
    "ws upgrade, line without colon": b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nno colon\r\n\r\n",
    "duplicate Content-Length": b"POST /infer HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabc",
    "Content-Length: +150690": b"POST /infer HTTP/1.1\r\nContent-Length: +150690\r\n\r\n",
    "100 KB header in one write": b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 100_000 + b"\r\n\r\n",
    "HEAD with a body": b"HEAD /healthz HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody",
}


def malformed_http(srv: A.AttackServer) -> str:
    out = []
    for name, raw in HEADS.items():
        reply = A.http_request(srv.addr("http"), raw, read_timeout=1.0)
        out.append(f"{name}: {reply[9:12].decode() or 'closed'}")
    t0 = time.perf_counter()
    A.http_request(srv.addr("http"), b"GET /healthz HTTP/1.0\r\n\r\n", read_timeout=5.0)
    out.append(f"HTTP/1.0: closed after {1000 * (time.perf_counter() - t0):.0f} ms")
    return "; ".join(out)


def typed_decode_errors(srv: A.AttackServer) -> str:
    out = []
    bad_dtype = {b"nd": True, b"type": ",", b"kind": b"", b"shape": [1], b"data": b"\0" * 4}
    cases = {
        'dtype ","': [A.hello_frame(), A.frame(protocol.INFER, {"state": bad_dtype})],
        "HELLO token 12345": [A.frame(protocol.HELLO, {"protocol": 1, "token": 12345})],
    }
    for name, frames in cases.items():
        with A.attacker_socket(srv.addr("tcp")) as sock:
            for f in frames:
                sock.sendall(f)
                kind, body = A.recv_frame(sock)
        out.append(f"{name}: {body.get('type') if kind == protocol.ERROR else 'accepted'}")
    out.append(f"openpi image 300: {_openpi_300(srv)}")
    return "; ".join(out)


def _openpi_300(srv: A.AttackServer) -> str:
    from websockets.sync.client import connect as ws_connect

    from pi0remote.server.openpi_ws import openpi_packb

    url = "ws://" + srv.url("openpi").split("://", 1)[1]
    with ws_connect(url, additional_headers={"Authorization": f"Api-Key {A.TOKEN}"}) as ws:
        ws.recv(timeout=5)  # metadata
        ws.send(openpi_packb({"images": {"cam_high": [[[300]]]}, "state": [0.0] * 14}))
        reply = ws.recv(timeout=5)
    return reply.split(" error", 1)[0].rsplit(" ", 1)[-1] if isinstance(reply, str) else "accepted"


ROWS = [
    ("40 TCP connections each declaring a 32 MiB frame", lambda s, k: big_headers(s, int(40 * k))),
    ("2,000 idle TCP connections, default limits", lambda s, k: idle_default_limits(s, int(2000 * k))),
    ("1,500 QUIC Initials that never finish", lambda s, k: quic_initials(s, int(1500 * k))),
    ("632-byte JPEG claiming 16000x16000", lambda s, k: jpeg_bomb(s, max(5, int(50 * k)))),
    (
        "unauthenticated Expect: 100-continue / 8 MiB uploads",
        lambda s, k: unauth_uploads(s, max(2, int(20 * k))),
    ),
    ("1,000 pipelined WebSocket requests never read", lambda s, k: ws_pipeline(s, int(1000 * k))),
    ("policy calls sys.exit / KeyboardInterrupt / bad replies", lambda s, k: policy_traps(s)),
    ("malformed HTTP heads", lambda s, k: malformed_http(s)),
    ('dtype "," / HELLO token not a string / openpi int > 255', lambda s, k: typed_decode_errors(s)),
]


def _fmt(name: str, row: dict[str, Any]) -> str:
    p = row["probe"]
    probe = "-" if p is None else f"{p['n']} / {p['failures']} / {p['p99_ms']:.1f}"
    return f"| {name} | {row['outcome']} | {row['rss_base']:.0f} -> {row['rss_peak']:.0f} | {row['cpu_s']:.1f} | {probe} |"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=float, default=1.0, help="multiply the attack counts")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    print(
        "| attack (loopback) | what the server did | RSS MB base -> peak | server CPU s | probe n / failures / p99 ms |"
    )
    print("|---|---|---|---|---|")
    rows: dict[str, Any] = {}
    main_args = BASE_ARGS + ["--quic-port", "0", "--transports", "http,ws,tcp,quic", "--openpi-port", "0"]
    with A.AttackServer(main_args + ["--write-stall-timeout", "5", "--max-message-mb", "32"]) as srv:
        for name, fn in ROWS:
            rows[name] = measured(srv, lambda fn=fn: fn(srv, args.scale))
            print(_fmt(name, rows[name]), flush=True)
        name = "a client that never reads 256 KB replies"
        rows[name] = measured(srv, lambda: unread_replies(srv, int(400 * args.scale)))
        print(_fmt(name, rows[name]), flush=True)
        name = "256 MB sent on HTTP while the request is in flight"
        rows[name] = measured(srv, lambda: flood_in_flight(srv, 256), probe=False)
        print(_fmt(name, rows[name]), flush=True)
    for name, fn in (
        ("2,000 idle TCP connections, limits raised", lambda: idle_raised(int(2000 * args.scale))),
        ("RLIMIT_NOFILE 1024 and 1,100 idle connections", lambda: fd_limit(int(1100 * args.scale))),
        ("a policy that hangs 30 s (--policy-timeout 1)", hanging_policy),
    ):
        rows[name] = fn()
        print(_fmt(name, rows[name]), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
