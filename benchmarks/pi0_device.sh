#!/usr/bin/env bash
# The π₀ verification on a GPU machine with no internet, run from the repository root.
#
#   benchmarks/pi0_device.sh          serve --policy pi0 --random-weights on loopback, benchmark it over tcp and ws
#   benchmarks/pi0_device.sh model    time the policy object alone (benchmarks/pi0_model_timing.py)
#
# Needs, next to the checkout (both git-ignored): .openpi_src/ holding openpi's src/openpi and openpi_client at the
# commit pinned in docs/pi0.md, and .whl/ holding the pure-Python wheels that machine lacks (jaxtyping==0.2.36,
# beartype, augmax; numpydantic and pydantic for openpi's transforms). Results go to $OUT (default results/pi0).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-results/pi0}
mkdir -p "$OUT"
PY=${PYTHON:-python3}

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
fi
export PYTHONPATH="/tmp/site:$PWD/src:$PWD/.openpi_src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm --format=csv 2>&1 | tee "$OUT/gpu.txt"

if [ "${1:-serve}" = model ]; then
  shift
  $PY benchmarks/pi0_model_timing.py --out "$OUT" "$@" 2>&1 | tee "$OUT/model_timing.log"
  exit "${PIPESTATUS[0]}"
fi

# --- serve + bench -------------------------------------------------------------------------------------------
LOG="$OUT/serve.log"
$PY -m pi0remote.serve --policy pi0 --random-weights --host 127.0.0.1 --http-port 0 --tcp-port 0 >"$LOG" 2>&1 &
SERVER=$!
stop() { kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null; }
trap stop EXIT
is_ready() { grep -E "\bready\b" "$LOG" | grep -viq "not"; }

# Wait for `ready` (model build ~25 s + compile ~10 s on an H200); give up after 300 s.
for _ in $(seq 300); do
  is_ready && break
  kill -0 "$SERVER" 2>/dev/null || { echo "server exited:"; cat "$LOG"; exit 1; }
  sleep 1
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

$PY -m pi0remote.bench "${ARGS[@]}" --n 200 --warmup 10 --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log"
RC=${PIPESTATUS[0]}
stop
trap - EXIT
echo "--- server log tail"; tail -n 20 "$LOG"
exit "$RC"
