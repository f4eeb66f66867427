#!/bin/bash
# Instructions per JSON request of the whole proxy path in one process (see bench/proxy_stages.py):
# bash bench/proxy_stages.sh DIR [N]. Prints the event loop thread's count (the writer thread's is
# left out: its batches here are as large as the run).
set -eu
SRC=$(cd "$1" && pwd); N=${2:-2000}
PY=${PYTHON:-python}
BENCH=$(cd "$(dirname "$0")" && pwd)
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
(cd "$SRC" && CG=1 PYTHONPATH=$SRC METERPROXY_LOG_LEVEL=error PYTHONMALLOC=malloc valgrind --tool=callgrind \
    --instr-atstart=no --separate-threads=yes --callgrind-out-file="$OUT/cg.out" \
    "$PY" "$BENCH/proxy_stages.py" "$N" >"$OUT/log" 2>&1) || { cat "$OUT/log" >&2; exit 1; }
T=$(callgrind_annotate "$OUT/cg.out-01" 2>/dev/null | grep -m1 "PROGRAM TOTALS" | awk '{gsub(",","",$1); print $1}')
echo "$(basename "$SRC") proxy stages: $((T / N)) instructions per request (event loop thread)"
