#!/usr/bin/env bash
# `make handover-test`: a partition's new owner must not lose its old owner's last transaction.
#
# Two drawdown instances share the partitions under load. Instance A is frozen (SIGSTOP) at a
# moment when it holds a transaction open that has sent its input offsets (checked with
# `drawdown-loadgen open-transactions`: the group's offsets are not stable for a second), and
# kept frozen past its session timeout (the group gives its partitions to B) but within its
# transaction timeout. Then it is thawed: its transaction commits (if it had sent its offsets) or
# is fenced and aborted. B must take the partitions over from exactly the state the committed
# offsets describe. At the end every balance equals the generator's expectation, and
# `balance-changed` has exactly one record per (customer, meter, version), gapless.
#
# The load goes on through the freeze and well after the thaw: the new owner must process the
# partitions with the state it took over (a later rebalance, when the thawed instance rejoins,
# would otherwise restore the missing batch and hide the loss).
#
# Env: CUSTOMERS (400), RATE (events/s, 1500), DURATION (seconds of load, 180), FREEZES (2: frozen
# inside such a transaction this many times, at most), FREEZE (seconds, 16; the session timeout
# is 10 s).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/drawdown/target}"
BIN="${BIN:-$CARGO_TARGET_DIR/debug/drawdown}"
LOADGEN="$CARGO_TARGET_DIR/debug/drawdown-loadgen"
CUSTOMERS="${CUSTOMERS:-400}"
RATE="${RATE:-1500}"
FREEZES="${FREEZES:-2}"
FREEZE="${FREEZE:-16}"
DURATION="${DURATION:-180}"
RUN="ho-$(date +%s)-$$"
DIR="$(mktemp -d /tmp/drawdown-ho.XXXXXX)"
BASE_PORT=$(( 20000 + RANDOM % 20000 ))
KAFKA=deploy/kafka/kafka.sh
started=$(date +%s)

log() { echo "handover-test: $*"; }

source scripts/lib.sh
isolate_run "$RUN"
# The freeze must outlast the session (10 s) and not the transaction.
export DRAWDOWN__KAFKA__TRANSACTION_TIMEOUT=60s
export DRAWDOWN__STORE__BLOCK_CACHE_MB=16 DRAWDOWN__STORE__WRITE_BUFFER_MB=16

INSTANCE_PREFIX="ho-"

cleanup() {
    local rc=$?
    for pid in "${INSTANCE_PIDS[@]}"; do kill -CONT "$pid" 2>/dev/null || true; kill -9 "$pid" 2>/dev/null || true; done
    [[ -n "${GEN:-}" ]] && kill "$GEN" 2>/dev/null || true
    if (( rc == 0 )); then rm -rf "$DIR"; else log "FAILED; logs kept in $DIR"; fi
}
trap cleanup EXIT

$KAFKA status > /dev/null 2>&1 || $KAFKA start
[[ -x "$BIN" && -x "$LOADGEN" ]] || cargo build --bins
cp "$BIN" "$DIR/drawdown"
BIN="$DIR/drawdown"
cp "$LOADGEN" "$DIR/drawdown-loadgen"
LOADGEN="$DIR/drawdown-loadgen"

EXPECT="$DIR/expect.json"
gen() { "$LOADGEN" produce --customers "$CUSTOMERS" --prefix "$RUN" --seed 11 --expect "$EXPECT" "$@"; }

for i in 0 1; do start_instance "$i"; done
for i in 0 1; do wait_ready "$i"; done
log "2 instances ready"
gen --phase grants
"$LOADGEN" wait-idle --timeout 300

# What open transactions hold now: "changelog P LSO END" lines and/or "offsets pending".
open_now() { "$LOADGEN" open-transactions 2>/dev/null || true; }

# One usage phase for the whole test; the freezes happen during it, none in its last 30 s.
EVENTS=$(( RATE * DURATION ))
gen --phase usage --events "$EVENTS" --rate "$RATE" --duplicates 0.01 &
GEN=$!
phase_started=$(date +%s)
sleep 3
A=0
caught=0
attempts=0
while (( caught < FREEZES )) && (( $(date +%s) - phase_started < DURATION - FREEZE - 30 )); do
    attempts=$(( attempts + 1 ))
    sleep "0.$(( RANDOM % 10 ))"
    kill -STOP "${INSTANCE_PIDS[$A]}"
    now="$(open_now)"
    # Offsets still pending after a second are the frozen instance's: it froze between
    # send_offsets_to_transaction and commit_transaction, the window that lost a batch.
    if grep -q "^offsets pending" <<< "$now"; then
        log "instance $A frozen inside a transaction holding offsets (attempt $attempts; $(grep changelog <<< "$now" | tr '\n' ' ')); thawing in ${FREEZE}s"
        sleep "$FREEZE"
        kill -CONT "${INSTANCE_PIDS[$A]}"
        log "instance $A thawed"
        caught=$(( caught + 1 ))
        A=$(( 1 - A ))
        sleep 10
    else
        kill -CONT "${INSTANCE_PIDS[$A]}"
    fi
done
wait "$GEN"; GEN=""
"$LOADGEN" wait-idle --timeout 300
if (( caught == 0 )); then
    log "never froze an instance inside a transaction holding offsets ($attempts attempts)"
    exit 1
fi

for i in 0 1; do wait_ready "$i"; done
for i in 0 1; do
    log "verifying through instance $i's API"
    "$LOADGEN" verify --expect "$EXPECT" --api "$(api "$i")"
done
grep -h "committed offsets are still not stable\|restored from the changelog" "$DIR"/instance-*.log | tail -4 || true
log "OK freezes=$caught attempts=$attempts events=$EVENTS customers=$CUSTOMERS elapsed=$(( $(date +%s) - started ))s"
