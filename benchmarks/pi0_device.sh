#!/usr/bin/env bash
# The π₀ verification on a GPU machine with no internet, run from the repository root.
#
#   benchmarks/pi0_device.sh [serve] [BENCH_ARGS...]  serve --policy pi0 --random-weights on loopback and run
#                                                      python -m pi0remote.bench over tcp and ws (extra args go to it)
#   benchmarks/pi0_device.sh model [ARGS...]           time the policy object alone (benchmarks/pi0_model_timing.py)
#   SERVE_ARGS="--max-batch 8" benchmarks/pi0_device.sh serve --clients 8 --transport tcp   dynamic batching
#   benchmarks/pi0_device.sh checkpoint                the checkpoint path (benchmarks/pi0_checkpoint.sh): make a
#                                                      checkpoint in openpi's layout, check fast vs openpi, bench
#                                                      fast, --exact and openpi's own server in one run
#   benchmarks/pi0_device.sh profile [ARGS...]         where a batch-1 call's GPU time goes
#                                                      (benchmarks/pi0_profile.py: split vs scanned layers, a trace)
#
# Needs, next to the checkout (both git-ignored): .openpi_src/ holding openpi's src/openpi and openpi_client at the
# commit pinned in docs/pi0.md, and .whl/ holding the pure-Python wheels that machine lacks (jaxtyping==0.2.36,
# beartype, augmax; numpydantic and pydantic for openpi's transforms). Results go to $OUT (default results/pi0).
set -uo pipefail
export PYTHONUNBUFFERED=1
export OUT=${OUT:-results/pi0}
mkdir -p "$OUT"
PY=${PYTHON:-python3}

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
fi
export PYTHONPATH="/tmp/site:$PWD/src:$PWD/.openpi_src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm --format=csv 2>&1 | tee "$OUT/gpu.txt"

if [ "${1:-serve}" = checkpoint ]; then
  shift
  bash benchmarks/pi0_checkpoint.sh "$@"
  exit $?
fi

if [ "${1:-serve}" = profile ]; then
  shift
  $PY benchmarks/pi0_profile.py --out "$OUT/profile" "$@" 2>&1 | tee "$OUT/profile.log"
  exit "${PIPESTATUS[0]}"
fi

if [ "${1:-serve}" = model ]; then
  shift
  $PY benchmarks/pi0_model_timing.py --out "$OUT" "$@" 2>&1 | tee "$OUT/model_timing.log"
  exit "${PIPESTATUS[0]}"
fi

# --- serve + bench -------------------------------------------------------------------------------------------
[ "${1:-}" = serve ] && shift
LOG="$OUT/serve.log"
# SERVE_ARGS adds server flags, e.g. SERVE_ARGS="--max-batch 8" with bench args "--clients 8 --transport tcp".
# shellcheck disable=SC2086
$PY -m pi0remote.serve --policy pi0 --random-weights --host 127.0.0.1 --http-port 0 --tcp-port 0 ${SERVE_ARGS:-} >"$LOG" 2>&1 &
SERVER=$!
stop() { kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null; }
trap stop EXIT
is_ready() { grep -E "\bready\b" "$LOG" | grep -viq "not"; }

# Wait for `ready` (model build ~35 s, then compile ~6 s on an H200); give up after 300 s. While it compiles,
# /healthz must say not-ready: record what it answers once the listeners are up.
HEALTH_CHECKED=
for _ in $(seq 600); do
  is_ready && break
  kill -0 "$SERVER" 2>/dev/null || { echo "server exited:"; cat "$LOG"; exit 1; }
  if [ -z "$HEALTH_CHECKED" ] && grep -qoE 'http://[0-9.]+:[0-9]+' "$LOG"; then
    H=$(grep -oE 'http://[0-9.]+:[0-9]+' "$LOG" | head -1)
    $PY - "$H/healthz" <<'PYEOF' | tee "$OUT/healthz_before_ready.txt"
import sys, urllib.error, urllib.request
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=5)
    print("healthz before ready:", r.status, r.read().decode())
except urllib.error.HTTPError as e:
    print("healthz before ready:", e.code, e.read().decode())
except Exception as e:  # noqa: BLE001
    print("healthz before ready: no answer", e)
PYEOF
    HEALTH_CHECKED=1
  fi
  sleep 0.5
done
is_ready || { echo "server not ready after 300 s:"; cat "$LOG"; exit 1; }
echo "--- server log up to ready"; cat "$LOG"

# `listening` lines carry the URLs; with port 0 the real ports are only known from them.
LISTEN=$(grep -i "listening" "$LOG")
TCP_URL=$(grep -oE 'tcp://[0-9.]+:[0-9]+' <<<"$LISTEN" | head -1)
WS_URL=$(grep -oE 'ws://[0-9.]+:[0-9]+[^ ]*' <<<"$LISTEN" | head -1)
if [ -z "$WS_URL" ]; then
  HTTP=$(grep -oE 'https?://[0-9.]+:[0-9]+' <<<"$LISTEN" | head -1)
  [ -n "$HTTP" ] && WS_URL="ws://${HTTP#http://}/ws"
fi
echo "tcp: ${TCP_URL:-?}  ws: ${WS_URL:-?}"
ARGS=()
[ -n "$TCP_URL" ] && ARGS+=(--url "$TCP_URL")
[ -n "$WS_URL" ] && ARGS+=(--url "$WS_URL")
[ ${#ARGS[@]} -gt 0 ] || { echo "no tcp/ws URL in the listening lines"; exit 1; }

if $PY -c "import pi0remote.bench" 2>/dev/null; then
  $PY -m pi0remote.bench "${ARGS[@]}" --n 200 --warmup 10 --out "$OUT/bench" "$@" 2>&1 | tee "$OUT/bench.log"
  RC=${PIPESTATUS[0]}
else
  # No pi0remote.bench in this checkout: the same loop, small (round trip per transport vs inference_ms).
  echo "pi0remote.bench not found; running the inline round-trip loop"
  $PY - "$TCP_URL" "$WS_URL" <<'PYEOF' 2>&1 | tee "$OUT/bench.log"
import json, os, sys
import numpy as np
import pi0remote

rng = np.random.default_rng(0)
obs = {"cam_high": rng.integers(0, 256, (3, 224, 224), dtype=np.uint8),
       "state": rng.uniform(-1, 1, 14).astype(np.float32)}
res = {}
for url in [u for u in sys.argv[1:] if u]:
    with pi0remote.connect(url) as client:
        meta = client.metadata
        for _ in range(10):
            client.infer(obs)
        rt, inf, srv = [], [], []
        for _ in range(200):
            r = client.infer(obs)
            rt.append(r["client_timing"]["round_trip_ms"])
            inf.append(r["inference_ms"])
            srv.append(r.get("server_timing", {}))
    p50 = lambda xs: round(float(np.percentile(xs, 50)), 3)
    res[url] = {"round_trip_ms_p50": p50(rt), "round_trip_ms_p95": round(float(np.percentile(rt, 95)), 3),
                "inference_ms_p50": p50(inf), "overhead_ms_p50": p50(np.subtract(rt, inf)),
                "server_timing_last": srv[-1]}
    print(url, json.dumps(res[url]))
res["policy_metadata"] = meta.get("policy", meta)
open(os.path.join(os.environ.get("OUT", "."), "roundtrip.json"), "w").write(json.dumps(res, indent=2, default=str))
PYEOF
  RC=${PIPESTATUS[0]}
fi
stop
trap - EXIT
echo "--- server log tail"; tail -n 20 "$LOG"
exit "$RC"
