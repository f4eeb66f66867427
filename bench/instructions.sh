#!/bin/bash
# Instructions per proxied request, per thread, under valgrind's callgrind: repeatable on a
# shared, noisy machine where CPU seconds move by 20-50% between runs of the same code.
#
#   bash bench/instructions.sh DIR [N] [loadgen options...]      # meterproxy of checkout DIR
#   bash bench/instructions.sh --ceiling FILE [N] [options...]   # a raw forwarder script
#
# The proxy runs under callgrind with instrumentation off; after a warm-up and a pause (so no
# warm-up request is still in flight), instrumentation is switched on for exactly N requests
# (concurrency 8 unless the options say otherwise), then dumped. Prints user-space instructions
# per request for each thread that did work: thread 1 is the event loop, thread 2 the store
# writer. Kernel time (system calls) is not counted: see `strace -c` for those. The writer's
# figure is inflated here (under valgrind the proxy does ~100 req/s, so the writer's batches
# hold a few rows and each pays a whole commit); the event loop's is the figure to compare.
# Needs valgrind (apt-get install valgrind). Ports: $IR_PORT (default 24021) and the next one.
set -euo pipefail
CEILING=""
if [ "${1:-}" = "--ceiling" ]; then CEILING=$2; shift 2; SRC=$(dirname "$CEILING"); else SRC=$(cd "$1" && pwd); shift; fi
N=${1:-2000}; shift || true
PY=${PYTHON:-python}
BENCH=$(cd "$(dirname "$0")" && pwd)
UP=${IR_PORT:-24021}; PX_PORT=$((UP + 1))
OUT=$(mktemp -d)
taskset -c 0 "$PY" "$BENCH/upstream.py" --port "$UP" >/dev/null 2>&1 & UPID=$!
if [ -n "$CEILING" ]; then
    CMD=("$PY" "$CEILING" "$PX_PORT" "$UP")
else
    CMD=("$PY" -c "from meterproxy.cli import main; main()" serve --port "$PX_PORT" --db "$OUT/b.db"
         --upstream "bench=http://127.0.0.1:$UP")
fi
(cd "$SRC" && PYTHONPATH=$SRC METERPROXY_LOG_LEVEL=warning PYTHONMALLOC=malloc exec valgrind --tool=callgrind \
    --separate-threads=yes --instr-atstart=no --callgrind-out-file="$OUT/cg.out" "${CMD[@]}" \
    >"$OUT/proxy.log" 2>&1) & PXID=$!
# Wait for the proxy to exit: a run started right after this one would otherwise find this proxy
# still shutting down on its port (under valgrind that takes a while) and measure the wrong one.
trap 'kill $PXID $UPID 2>/dev/null || true; wait $PXID 2>/dev/null || true' EXIT
UP_OK=""
# Wait for an HTTP answer, not an open port: serve binds its socket before the app is built, and
# under valgrind on a loaded machine the start-up takes minutes (it was counted in the requests').
for _ in $(seq 1 1800); do
    curl -s -o /dev/null --max-time 10 "http://127.0.0.1:$PX_PORT/healthz" && UP_OK=1 && break; sleep 0.5
done
[ -n "$UP_OK" ] || { echo "the proxy never opened port $PX_PORT (log: $OUT/proxy.log)" >&2; exit 1; }
LOAD=("$PY" "$BENCH/loadgen.py" --port "$PX_PORT" --path /bench/v1/chat/completions --concurrency 8 --warmup 0)
taskset -c 0 "${LOAD[@]}" --duration 2 "$@" >/dev/null
sleep 6  # every warm-up request answered before counting starts
callgrind_control -i on "$PXID" >/dev/null 2>&1
taskset -c 0 "${LOAD[@]}" --duration 600 --max-requests "$N" "$@" >"$OUT/load.json"
callgrind_control -i off "$PXID" >/dev/null 2>&1
callgrind_control -d "$PXID" >/dev/null 2>&1
sleep 1
REQ=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['requests'])" "$OUT/load.json")
ERR=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['errors'])" "$OUT/load.json")
[ "$ERR" = 0 ] || echo "warning: $ERR errors while counting ($OUT/load.json)" >&2
echo "callgrind files: $OUT" >&2
for f in "$OUT"/cg.out.1-*; do
    T=$(callgrind_annotate "$f" 2>/dev/null | grep -m1 "PROGRAM TOTALS" | awk '{gsub(",","",$1); print $1}' || true)
    if [ -n "$T" ] && [ "$T" != "." ] && [ "$T" -gt $((REQ * 1000)) ]; then
        echo "$(basename "$SRC") thread ${f##*-}: $((T / REQ)) instructions per request ($REQ requests)"
    fi
done
