"""The latency benchmark: percentile math, JPEG payloads, and short end-to-end runs on loopback."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

from pi0remote.harness import bench
from pi0remote.harness.percentiles import median_index, percentile, summarize


# -- percentiles ----------------------------------------------------------------------------------
def test_percentiles_of_known_samples() -> None:
    xs = list(range(1, 11))  # 1..10
    assert percentile(xs, 50) == pytest.approx(5.5)
    assert percentile(xs, 95) == pytest.approx(9.55)
    assert percentile(xs, 99) == pytest.approx(9.91)
    assert percentile(xs, 0) == 1 and percentile(xs, 100) == 10
    assert percentile([7.0], 99) == 7.0
    assert percentile([3, 1, 2], 50) == 2  # order does not matter
    s = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert s == {
        "n": 5,
        "p50": 3.0,
        "p95": pytest.approx(4.8),
        "p99": pytest.approx(4.96),
        "min": 1.0,
        "max": 5.0,
        "mean": 3.0,
    }


def test_percentiles_match_numpy() -> None:
    rng = np.random.default_rng(0)
    for n in (2, 3, 17, 200, 1001):
        xs = rng.lognormal(0, 1, n)
        for q in (1, 5, 25, 50, 75, 95, 99):
            assert percentile(xs.tolist(), q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12)


def test_percentile_edges() -> None:
    assert math.isnan(percentile([], 50))
    assert summarize([])["n"] == 0 and math.isnan(summarize([])["p50"])
    with pytest.raises(ValueError):
        percentile([1.0], 101)
    assert median_index([10.0, 1.0, 5.0, 7.0, 3.0]) == 2


# -- options --------------------------------------------------------------------------------------
def test_parse_transports() -> None:
    assert bench.parse_transports("all") is None
    assert bench.parse_transports("tcp, ws") == ["tcp", "ws"]
    with pytest.raises(ValueError):
        bench.parse_transports("tcp,carrier-pigeon")
    avail = bench.available_transports()
    assert {"tcp", "ws", "http", "local"} <= set(avail)
    assert ("quic" in avail) == bench.quic_available()


# -- JPEG payload ---------------------------------------------------------------------------------
def test_jpeg_fields_are_decoded_by_the_server_before_validation() -> None:
    from pi0remote import codec, connect
    from pi0remote.harness.obs import canonical_obs
    from pi0remote.jpeg import decode_jpeg, encode_jpeg, jpeg_obs

    obs = canonical_obs(0)
    smooth = np.broadcast_to(np.linspace(0, 255, 224, dtype=np.uint8), (3, 224, 224)).copy()
    obs["cam_high"] = smooth
    back = decode_jpeg(encode_jpeg(smooth, 95))
    assert back.shape == (3, 224, 224) and back.dtype == np.uint8
    assert np.abs(back.astype(int) - smooth).mean() < 3
    sent = jpeg_obs(obs, 90)
    assert set(sent["cam_high"]) == {"jpeg"} and len(sent["cam_high"]["jpeg"]) < smooth.nbytes / 10
    with connect("local://echo") as client:
        received = client.infer(sent)["received"]
        assert received["cam_high"] == {"dtype": "uint8", "shape": [3, 224, 224]}
        # Other map values pass through untouched; raw requests are unchanged.
        assert client.infer({**obs, "env_state": {"qpos": [1.0]}})["received"]["env_state"] == {
            "type": "dict"
        }
    from pi0remote.errors import InvalidInputError
    from pi0remote.policies.builtin import EchoPolicy
    from pi0remote.server.core import ServerCore

    core = ServerCore(EchoPolicy())
    with pytest.raises(InvalidInputError):
        core.decode_obs(codec.packb({**obs, "cam_high": {"jpeg": b"not a jpeg"}}))


# -- end to end -----------------------------------------------------------------------------------
def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _run(tmp_path: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[dict, Path]:
    rc = bench.main([*argv, "--out", str(tmp_path), "--json", "--no-progress"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    out = Path(doc["output_dir"])
    assert out.parent == tmp_path and out.is_dir()
    return doc, out


SUMMARY_KEYS = {
    "transport",
    "url",
    "n",
    "round_trip_ms",
    "policy_p50_ms",
    "server_total_p50_ms",
    "overhead_p50_ms",
    "hz",
    "request_bytes",
    "reply_bytes",
    "x_floor",
    "x_openpi",
    "breakdown_p50_ms",
}
SAMPLE_KEYS = {
    "t_s",
    "round_trip_ms",
    "client_encode_ms",
    "network_ms",
    "server_decode_ms",
    "queue_ms",
    "policy_ms",
    "server_encode_ms",
    "client_decode_ms",
    "server_total_ms",
    "overhead_ms",
    "batch_size",
    "reply_bytes",
}


@pytest.mark.slow
def test_end_to_end_latency_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc, out = _run(
        tmp_path,
        capsys,
        "--n",
        "6",
        "--warmup",
        "2",
        "--rounds",
        "2",
        "--transport",
        "tcp,ws,http,local",
        "--policy",
        "sleep:2",
    )
    assert doc["schema"] == bench.SCHEMA and doc["mode"] == "latency"
    assert [t["transport"] for t in doc["transports"]] == ["tcp", "ws", "http", "local"]
    assert doc["config"]["policy"] == "sleep:2" and doc["config"]["embedded_server"]
    for t in doc["transports"]:
        assert SUMMARY_KEYS <= set(t)
        assert "samples" not in t  # --json leaves samples to results.json
        r = t["round_trip_ms"]
        assert t["n"] == 6 and r["min"] <= r["p50"] <= r["p95"] <= r["p99"] <= r["max"]
        assert 1.5 <= t["policy_p50_ms"] <= r["p50"]
        assert t["overhead_p50_ms"] >= 0 and t["hz"] == pytest.approx(1000 / r["p50"])
        assert t["request_bytes"] > 150_000 and t["reply_bytes"] > 2_800
        assert t["x_floor"] is not None and t["x_floor"] > 0
        assert set(t["breakdown_p50_ms"]) == set(bench.STAGES)
    assert doc["baselines"]["floor"]["round_trip_ms"]["p50"] > 0

    full = json.loads((out / "results.json").read_text())
    for t in full["transports"]:
        assert len(t["samples"]) == 6
        for s in t["samples"]:
            assert SAMPLE_KEYS <= set(s)
            stages = sum(s[f"{k}_ms"] for k in bench.STAGES)
            assert stages == pytest.approx(s["round_trip_ms"], rel=0.05, abs=0.05)
    assert len(full["baselines"]["floor"]["samples_ms"]) == 6

    md = (out / "results.md").read_text()
    for header, _ in bench.TABLE_COLUMNS:
        assert f" {header} |" in md
    for name in ("tcp", "ws", "http", "local", "floor"):
        assert f"| {name} |" in md
    width, height = _png_size(out / "charts" / "latency_breakdown.png")
    assert width > 1000 and height > 800
    table = bench.render_table(full)
    assert all(header in table for header, _ in bench.TABLE_COLUMNS)


@pytest.mark.slow
def test_end_to_end_jpeg_and_netem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc, out = _run(
        tmp_path,
        capsys,
        "--n",
        "4",
        "--warmup",
        "1",
        "--rounds",
        "1",
        "--transport",
        "tcp,local",
        "--payload",
        "jpeg",
        "--image",
        "random",
        "--netem",
        "delay=5ms",
        "--no-charts",
    )
    assert doc["config"]["netem"] == "delay=5ms" and doc["config"]["payload"] == "jpeg"
    tcp, local = doc["transports"]
    assert tcp["round_trip_ms"]["min"] >= 10.0  # 5 ms each way
    assert local["round_trip_ms"]["p50"] < 10.0  # in-process: no network to emulate
    for t in (tcp, local):
        j = t["jpeg"]
        assert j["raw_request_bytes"] > t["request_bytes"] and j["bytes_saved"] > 0
        assert j["encode_p50_ms"] > 0 and j["server_decode_p50_ms"] > 0
    assert doc["baselines"]["floor"]["round_trip_ms"]["min"] >= 10.0  # the floor goes through netem too
    assert not (out / "charts").exists()


@pytest.mark.slow
def test_concurrent_clients(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc, out = _run(
        tmp_path,
        capsys,
        "--clients",
        "3",
        "--n",
        "5",
        "--warmup",
        "1",
        "--policy",
        "sleep:10+1",
        "--max-batch",
        "4",
        "--transport",
        "tcp",
    )
    assert doc["mode"] == "clients" and doc["config"]["clients"] == 3 and doc["config"]["max_batch"] == 4
    assert len(doc["per_client"]) == 3 and all(c["n"] == 5 for c in doc["per_client"])
    assert 0 < doc["throughput_calls_per_s"] < 3 * 1000 / 10
    assert 1 <= doc["batch_size"]["mean"] <= 3
    full = json.loads((out / "results.json").read_text())
    assert len(full["samples"]) == 15
    assert "calls/s" in (out / "results.md").read_text()
