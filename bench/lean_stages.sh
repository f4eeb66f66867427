#!/bin/bash
# Instructions per request of the lean server's or the upstream client's own work (see
# bench/lean_stages.py): bash bench/lean_stages.sh DIR [server|upstream] [N]
set -eu
SRC=$(cd "$1" && pwd); STAGE=${2:-server}; N=${3:-5000}
PY=${PYTHON:-python}
BENCH=$(cd "$(dirname "$0")" && pwd)
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
(cd "$SRC" && CG=1 PYTHONPATH=$SRC PYTHONMALLOC=malloc valgrind --tool=callgrind --instr-atstart=no \
    --callgrind-out-file="$OUT/cg.out" "$PY" "$BENCH/lean_stages.py" "$N" "$STAGE" >/dev/null 2>&1)
T=$(callgrind_annotate "$OUT/cg.out" 2>/dev/null | grep -m1 "PROGRAM TOTALS" | awk '{gsub(",","",$1); print $1}')
echo "$(basename "$SRC") $STAGE: $((T / N)) instructions per request"
