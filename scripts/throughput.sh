#!/usr/bin/env bash
# `make throughput`: EVENTS (default 1M) usage events + grants end to end: the generator writes
# them as fast as it can, drawdown folds and commits them; the clock stops when the group has
# committed every input record (so every output is committed too). Prints events/s.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/drawdown/target}/debug/drawdown}"
LOADGEN="${LOADGEN:-${CARGO_TARGET_DIR:-$HOME/.cache/drawdown/target}/debug/drawdown-loadgen}"
EVENTS="${EVENTS:-1000000}"
CUSTOMERS="${CUSTOMERS:-10000}"
RUN="tp-$(date +%s)-$$"
DIR="$(mktemp -d)"
source scripts/lib.sh
isolate_run "$RUN"
export DRAWDOWN__STORE__PATH="$DIR/state"
export DRAWDOWN__API__LISTEN="127.0.0.1:${PORT:-18181}"
"$BIN" run > "$DIR/drawdown.log" 2>&1 &
DD=$!
trap 'kill $DD 2>/dev/null || true; wait $DD 2>/dev/null || true; rm -rf "$DIR"' EXIT
until curl -fs "http://$DRAWDOWN__API__LISTEN/readyz" >/dev/null 2>&1; do
    kill -0 $DD 2>/dev/null || { tail -20 "$DIR/drawdown.log"; exit 1; }
    sleep 0.2
done
start=$(date +%s.%N)
"$LOADGEN" produce --phase mixed --customers "$CUSTOMERS" --events "$EVENTS" --rate 0 --duplicates 0
produced=$(date +%s.%N)
"$LOADGEN" wait-idle --timeout 1800
end=$(date +%s.%N)
python3 - "$start" "$produced" "$end" "$EVENTS" <<'PY'
import sys
s, p, e, n = map(float, sys.argv[1:])
print(f"throughput: events={int(n)} produce_s={p - s:.1f} end_to_end_s={e - s:.1f} "
      f"end_to_end_events_per_s={n / (e - s):.0f}")
PY
