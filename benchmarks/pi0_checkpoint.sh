#!/usr/bin/env bash
# The π₀ checkpoint path on a GPU machine, in one run (called by `benchmarks/pi0_device.sh checkpoint`):
#
#  1. benchmarks/make_pi0_checkpoint.py: random bf16 weights in openpi's layout at $CKPT (and a small tokenizer in
#     $OPENPI_DATA_HOME when openpi's cache has none);
#  2. benchmarks/pi0_checkpoint_check.py: fast path vs openpi's Policy.infer (same observation and noise), --exact
#     vs Policy.infer, in-process timing (batch 1, 2, 4, 8);
#  3. `python -m pi0remote.serve --policy pi0 --checkpoint $CKPT --max-batch 8` (fast): tcp round trip at batch 1,
#     then 8 client processes;
#  4. the same with --exact: tcp round trip at batch 1;
#  5. openpi's own WebsocketPolicyServer on the same checkpoint (benchmarks/openpi_reference.py): openpi_client
#     round trip at batch 1, then 8 client processes (pi0remote's openpi:// client);
#  6. (PARTS=...,restart) the fast server started twice on an empty compilation cache of its own: seconds to
#     `ready` on a first start and on a restart, into $WORK/restart.json;
#  7. benchmarks/pi0_checkpoint_summary.py: the ratios, into $OUT/results.json.
#
# PARTS (default "make,check,fast,openpi,exact") picks steps; CHECK_PARTS goes to step 2 (default
# equiv,floor,rtc,timing).
# Expects the environment pi0_device.sh sets (PYTHONPATH with openpi's source and wheels). Each step's JSON lands
# in $WORK; logs go to $OUT/logs.txt.
set -uo pipefail
PY=${PYTHON:-python3}
OUT=${OUT:-results/pi0}
WORK=${WORK:-/tmp/pi0_checkpoint_run}
CKPT=${CKPT:-/tmp/pi0_checkpoint}
PARTS=${PARTS:-make,check,fast,openpi,exact}
N=${N:-200}
CLIENT_N=${CLIENT_N:-60}
export OPENPI_DATA_HOME=${OPENPI_DATA_HOME:-/tmp/openpi_home}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}
mkdir -p "$OUT" "$WORK"
LOGS="$OUT/logs.txt"
: >"$LOGS"
has() { [[ ",$PARTS," == *",$1,"* ]]; }
log() { echo "=== $(date -u +%H:%M:%S) $*" | tee -a "$LOGS"; }

SERVER=
stop_server() {
  [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null
  SERVER=
}
summary() { $PY benchmarks/pi0_checkpoint_summary.py "$WORK" "$OUT/results.json" >>"$LOGS" 2>&1; }
trap 'stop_server; summary' EXIT

# start_server LOGFILE CMD...: start it, wait for `ready` (up to 600 s), leave its pid in $SERVER
start_server() {
  local logf=$1
  shift
  "$@" >"$logf" 2>&1 &
  SERVER=$!
  for _ in $(seq 1200); do
    grep -qE '^ready|\bready$' "$logf" && return 0
    kill -0 "$SERVER" 2>/dev/null || { echo "server exited:"; tail -n 40 "$logf"; SERVER=; return 1; }
    sleep 0.5
  done
  echo "server not ready after 600 s"; tail -n 40 "$logf"; return 1
}

bench() {  # bench NAME URL ARGS...: pi0remote.bench JSON into $WORK/NAME.json
  local name=$1 url=$2
  shift 2
  $PY -m pi0remote.bench --url "$url" --json --no-baselines --no-charts --no-progress --out "$WORK/bench" "$@" \
    >"$WORK/$name.json" 2>>"$LOGS" || { echo "bench $name failed"; tail -n 20 "$LOGS"; }
  $PY - "$WORK/$name.json" <<'PYEOF' | tee -a "$LOGS"
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:  # noqa: BLE001
    print("no result:", e); sys.exit(0)
if d.get("mode") == "clients":
    print(sys.argv[1], "calls/s", round(d["throughput_calls_per_s"], 2), "rtt p50", round(d.get("round_trip_ms", {}).get("p50", float("nan")), 2))
else:
    for t in d.get("transports", []):
        print(sys.argv[1], t["transport"], "rtt p50", round(t["round_trip_ms"]["p50"], 2), "inference p50", round(t["inference_p50_ms"], 2))
PYEOF
}

serve_pi0() {  # serve_pi0 LOGNAME EXTRA_ARGS...
  local name=$1
  shift
  start_server "$WORK/$name.log" $PY -m pi0remote.serve --policy pi0 --checkpoint "$CKPT" --host 127.0.0.1 \
    --http-port 0 --tcp-port 0 --transports tcp "$@"
}
tcp_url() { grep -oE 'tcp://[0-9.]+:[0-9]+' "$1" | head -1; }

if has make && [ ! -d "$CKPT/params" ]; then
  log "make checkpoint $CKPT"
  $PY benchmarks/make_pi0_checkpoint.py "$CKPT" 2>&1 | tee -a "$LOGS" | tail -n 20
  cp "$CKPT/make_pi0_checkpoint.json" "$WORK/make.json" 2>/dev/null
fi
if has check; then
  log "in-process check (${CHECK_PARTS:-equiv,floor,rtc,timing})"
  $PY benchmarks/pi0_checkpoint_check.py --checkpoint "$CKPT" --out "$WORK" --n "${CHECK_N:-40}" \
    --parts "${CHECK_PARTS:-equiv,floor,rtc,timing}" 2>&1 | tee -a "$LOGS" | grep -vE "^\s*$" | tail -n 30
fi
if has fast; then
  log "serve fast (--max-batch 8)"
  if serve_pi0 serve_fast --max-batch 8; then
    URL=$(tcp_url "$WORK/serve_fast.log")
    bench fast_b1 "$URL" --n "$N" --warmup 10
    bench fast_clients8 "$URL" --clients 8 --n "$CLIENT_N" --warmup 5
  fi
  cat "$WORK/serve_fast.log" >>"$LOGS"
  stop_server
fi
if has openpi; then
  log "openpi's own server"
  if start_server "$WORK/serve_openpi.log" $PY benchmarks/openpi_reference.py serve --checkpoint "$CKPT"; then
    PORT=$(grep -oE 'ws://[0-9.]+:[0-9]+' "$WORK/serve_openpi.log" | head -1 | sed 's/.*://')
    $PY benchmarks/openpi_reference.py client --port "$PORT" --n "$N" --out "$WORK/openpi_b1.json" 2>&1 | tee -a "$LOGS"
    bench openpi_clients8 "openpi://127.0.0.1:$PORT" --clients 8 --n "$((CLIENT_N / 2))" --warmup 3
  fi
  cat "$WORK/serve_openpi.log" >>"$LOGS"
  stop_server
fi
if has exact; then
  log "serve --exact"
  if serve_pi0 serve_exact --exact; then
    bench exact_b1 "$(tcp_url "$WORK/serve_exact.log")" --n "$N" --warmup 10
  fi
  cat "$WORK/serve_exact.log" >>"$LOGS"
  stop_server
fi
if has restart; then
  # pi0remote's own compilation cache (no JAX_COMPILATION_CACHE_DIR), empty: the fast server's first start, then
  # a restart that reads what the first compiled; seconds from launch to `ready` into $WORK/restart.json.
  log "restart: first start and restart on an empty compilation cache"
  SAVED_CACHE=${JAX_COMPILATION_CACHE_DIR:-}
  unset JAX_COMPILATION_CACHE_DIR
  export PI0REMOTE_JAX_CACHE=$(mktemp -d)
  READY=()
  for k in 1 2; do
    T0=$(date +%s.%N)
    serve_pi0 "restart_$k" --max-batch 8 && READY+=("$($PY -c "import time; print(round(time.time() - $T0, 1))")")
    [ "$k" = 2 ] && [ -n "$SERVER" ] && bench restart_b1 "$(tcp_url "$WORK/restart_2.log")" --n 100 --warmup 5
    grep -iE "loaded|compiled|warm" "$WORK/restart_$k.log" | tail -n 12 >>"$LOGS"
    stop_server
  done
  $PY -c 'import json, sys; print(json.dumps({"ready_s": [float(x) for x in sys.argv[2:]], "cache": sys.argv[1]}))' \
    "$PI0REMOTE_JAX_CACHE" "${READY[@]}" | tee "$WORK/restart.json" | tee -a "$LOGS"
  unset PI0REMOTE_JAX_CACHE
  [ -n "$SAVED_CACHE" ] && export JAX_COMPILATION_CACHE_DIR=$SAVED_CACHE
fi
log "summary"
trap stop_server EXIT
$PY benchmarks/pi0_checkpoint_summary.py "$WORK" "$OUT/results.json" 2>&1 | tee -a "$LOGS"
