#!/usr/bin/env bash
# `make multi-instance-test`: three drawdown instances share 16 partitions under load from the
# generator; one is SIGKILLed, a new one joins, another is stopped with SIGTERM (it must exit
# cleanly within the shutdown timeout); then the broker is stopped for 20 s in the middle of a
# load run and restarted. At the end every balance, read through the API of *any* instance
# (requests for partitions owned elsewhere are forwarded), equals the generator's expectation, and
# `balance-changed` has exactly one record per (customer, meter, version), gapless. An instance
# is also frozen (SIGSTOP) past its session timeout and thawed, to check zombie fencing.
# The outage is a broker crash (SIGKILL, `kafka.sh crash`): a SIGTERM's controlled shutdown of
# this single node has lost the markers of a transaction its coordinator had recorded as
# committed (docs/runbook.md, DrawdownStalled), a broker fault no client can repair.
#
# Env: EVENTS (default 60000), CUSTOMERS (500), RATE (events/s, 1500), OUTAGE (seconds, 20).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/drawdown/target}"
BIN="$CARGO_TARGET_DIR/debug/drawdown"
LOADGEN="$CARGO_TARGET_DIR/debug/drawdown-loadgen"
EVENTS="${EVENTS:-60000}"
CUSTOMERS="${CUSTOMERS:-500}"
RATE="${RATE:-1500}"
OUTAGE="${OUTAGE:-20}"
RUN="mi-$(date +%s)-$$"
DIR="$(mktemp -d /tmp/drawdown-mi.XXXXXX)"
BASE_PORT=$(( 20000 + RANDOM % 20000 ))
KAFKA=deploy/kafka/kafka.sh
started=$(date +%s)

log() { echo "multi-instance-test: $*"; }

source scripts/lib.sh
isolate_run "$RUN"
export DRAWDOWN__KAFKA__PARTITIONS=16
export DRAWDOWN__KAFKA__TRANSACTION_TIMEOUT=10s
export DRAWDOWN__STORE__BLOCK_CACHE_MB=16 DRAWDOWN__STORE__WRITE_BUFFER_MB=16

cleanup() {
    local rc=$?
    for pid in "${INSTANCE_PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    [[ -n "${GEN:-}" ]] && kill "$GEN" 2>/dev/null || true
    $KAFKA status > /dev/null 2>&1 || $KAFKA start > /dev/null 2>&1 || true
    if (( rc == 0 )); then rm -rf "$DIR"; else log "FAILED; logs kept in $DIR"; fi
}
trap cleanup EXIT

$KAFKA status > /dev/null 2>&1 || $KAFKA start
[[ -x "$BIN" && -x "$LOADGEN" ]] || cargo build --bins
# Private copies: a rebuild of the shared target dir mid-test must not change what restarts.
cp "$BIN" "$DIR/drawdown"
BIN="$DIR/drawdown"
cp "$LOADGEN" "$DIR/drawdown-loadgen"
LOADGEN="$DIR/drawdown-loadgen"

EXPECT="$DIR/expect.json"
gen() { "$LOADGEN" produce --customers "$CUSTOMERS" --prefix "$RUN" --seed 7 --expect "$EXPECT" "$@"; }

for i in 0 1 2; do start_instance "$i"; done
for i in 0 1 2; do wait_ready "$i"; done
log "3 instances ready"

gen --phase grants
"$LOADGEN" wait-idle --timeout 300

log "load 1: usage at $RATE/s; kill -9 instance 0, start instance 3, SIGTERM instance 1"
gen --phase usage --events $(( EVENTS / 2 )) --rate "$RATE" --duplicates 0.01 &
GEN=$!
sleep 4
kill -9 "${INSTANCE_PIDS[0]}"; unset 'INSTANCE_PIDS[0]'
log "instance 0 SIGKILLed"
sleep 4
start_instance 3
sleep 6
t0=$(date +%s)
kill -TERM "${INSTANCE_PIDS[1]}"
if ! wait "${INSTANCE_PIDS[1]}"; then log "instance 1 exited non-zero after SIGTERM"; exit 1; fi
t1=$(date +%s)
grep -q "drawdown stopped cleanly" "$DIR/instance-1.log" || { log "instance 1 did not log a clean stop"; exit 1; }
log "instance 1 stopped cleanly in $(( t1 - t0 ))s after SIGTERM"
unset 'INSTANCE_PIDS[1]'
# A zombie: instance 2 is frozen past its session timeout while the group moves on, then thawed;
# its in-flight transaction must be fenced (KIP-447) and it must rejoin without double counting.
kill -STOP "${INSTANCE_PIDS[2]}"
log "instance 2 frozen (SIGSTOP) for 15s"
sleep 15
kill -CONT "${INSTANCE_PIDS[2]}"
log "instance 2 thawed"
wait "$GEN"; GEN=""
"$LOADGEN" wait-idle --timeout 300

log "load 2: top-ups and usage; the broker crashes (SIGKILL) and is down for ${OUTAGE}s in the middle"
gen --phase topups
"$LOADGEN" wait-idle --timeout 300
gen --phase usage --events $(( EVENTS / 2 )) --rate "$RATE" --duplicates 0.01 &
GEN=$!
sleep 5
$KAFKA crash
log "broker killed"
sleep "$OUTAGE"
$KAFKA start
log "broker back"
wait "$GEN"; GEN=""
wait_idle_resolving_hangs 600

for i in 2 3; do wait_ready "$i"; done
for i in 2 3; do
    log "verifying through instance $i's API"
    "$LOADGEN" verify --expect "$EXPECT" --api "$(api "$i")"
done
for i in 2 3; do
    grep -h "restored from the changelog\|partition ready" "$DIR/instance-$i.log" | tail -3 || true
done
log "OK instances=4 kills=1 sigterms=1 zombies=1 outage=${OUTAGE}s hanging_aborted=$HANGING_ABORTED events=$EVENTS customers=$CUSTOMERS elapsed=$(( $(date +%s) - started ))s"
