#!/usr/bin/env bash
# `make restore-bench`: restore speed from the changelog. One partition is filled with
# PROJECTIONS (default 100k) meter projections (grants for PROJECTIONS/3 customers x 3 meters,
# each also leaving a grant record and a history record in the changelog); drawdown is then
# stopped, its RocksDB directory deleted, and started again: it restores the partition from the
# changelog. Prints the changelog records replayed, records/s, and the time from assignment to
# ready, as logged by drawdown. PERF=FILE also records `perf record --call-graph dwarf` of the
# restoring process into FILE (then `perf report -i FILE`).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/drawdown/target}"
BIN="${BIN:-$CARGO_TARGET_DIR/debug/drawdown}"
LOADGEN="${LOADGEN:-$CARGO_TARGET_DIR/debug/drawdown-loadgen}"
PROJECTIONS="${PROJECTIONS:-100000}"
RUN="rb-$(date +%s)-$$"
DIR="$(mktemp -d /tmp/drawdown-rb.XXXXXX)"
PORT=$(( 20000 + RANDOM % 20000 ))
source scripts/lib.sh
isolate_run "$RUN"
export DRAWDOWN__KAFKA__PARTITIONS=1
export DRAWDOWN__STORE__PATH="$DIR/state" DRAWDOWN__API__LISTEN="127.0.0.1:$PORT"
trap 'kill $DD 2>/dev/null || true; rm -rf "$DIR"' EXIT

deploy/kafka/kafka.sh status > /dev/null 2>&1 || deploy/kafka/kafka.sh start
ready() { until curl -fs "http://127.0.0.1:$PORT/readyz" > /dev/null 2>&1; do sleep 0.2; done; }

"$BIN" run > "$DIR/fill.log" 2>&1 &
DD=$!
ready
"$LOADGEN" produce --phase grants --customers $(( PROJECTIONS / 3 )) --prefix "$RUN" > /dev/null
"$LOADGEN" wait-idle --timeout 900 > /dev/null
kill -TERM $DD; wait $DD || true
rm -rf "$DIR/state"

t0=$(date +%s.%N)
if [[ -n "${PERF:-}" ]]; then
    perf record ${PERF_ARGS:---call-graph dwarf,16384 -F 250} -o "$PERF" -- "$BIN" run > "$DIR/restore.log" 2>&1 &
else
    "$BIN" run > "$DIR/restore.log" 2>&1 &
fi
DD=$!
ready
t1=$(date +%s.%N)
if [[ -n "${PERF:-}" ]]; then
    # Stop drawdown (perf's child); perf then writes its file and exits.
    pkill -TERM -P "$DD" || true
    wait "$DD" || true
fi
plain() { sed 's/\x1b\[[0-9;]*m//g' "$DIR/restore.log"; }
line=$(plain | grep "restored from the changelog" | tail -1)
ready_line=$(plain | grep "partition ready" | tail -1)
records=$(sed -n 's/.*records=\([0-9]*\).*/\1/p' <<< "$line")
secs=$(sed -n 's/.* secs=\([0-9.]*\).*/\1/p' <<< "$line")
to_ready=$(sed -n 's/.*secs_since_assignment=\([0-9.]*\).*/\1/p' <<< "$ready_line")
python3 - "$PROJECTIONS" "$records" "$secs" "$to_ready" "$t0" "$t1" <<'PY'
import sys
proj, records, secs, to_ready, t0, t1 = sys.argv[1:]
records, secs = int(records), float(secs)
print(f"restore-bench: projections={proj} changelog_records={records} restore_s={secs:.2f} "
      f"records_per_s={records / secs:.0f} assignment_to_ready_s={float(to_ready):.2f} "
      f"process_start_to_ready_s={float(t1) - float(t0):.2f}")
PY
