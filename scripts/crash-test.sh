#!/usr/bin/env bash
# `make crash-test`: exactly-once under SIGKILL, with the credit rules. drawdown runs in the
# background and a supervisor SIGKILLs it at random moments (1-6 s after it is ready, or during
# start-up and restore), sometimes deleting its RocksDB directory too, and restarts it, while the
# load generator sends its phases and keeps its own model of what drawdown must end with:
#   grants    cycle grants (rollover caps, two subscriptions for some), top-ups and adjustments
#             stacked on them at varied priorities, replayed grant ids, malformed records;
#   expiring  top-ups expiring after the next usage phase, grants scheduled to start then (some
#             of them cycle grants);
#   usage     usage at RATE, duplicates (same record, and ids of earlier phases), malformed, 2 %
#             late (event time 2 min old: applied at stream time, flagged late); the generator's
#             record timestamps keep its send order under drawdown's merge of the two topics;
#   expire    the barrier: every input so far was processed before the first activation/expiry
#             (else the test fails: raise EXPIRE_IN), sleep past the last one, the tick applies
#             them without new events;
#   reservations  holds on random meters (a block meter refuses what it cannot cover), settled
#             by usage naming them (more or less than held), released, repeated, releases of
#             ended and unknown ids (DLQ reservation_unknown); the rest stay held (the expiring
#             phase's holds run out at the barrier);
#   voids     VoidGrant, VoidUsage (some returned as void:<event> adjustments), repeated voids
#             and unknown ids (DLQ void_duplicate / void_unknown), replayed grant ids;
#   topups, renewal (a new cycle for every subscription: remainders carried up to the rollover,
#             the rest forfeited), usage, reservations and voids (protobuf) again.
# When at least KILLS kills happened and every input is committed, `drawdown-loadgen verify`
# compares the API (totals, expired, voided, version, each grant's remainder in draw-down order),
# balance-changed (one record per version, no gaps, each version's reason), balance-exhausted
# (transitions one for one), top-up-requests (the automatic ones, one for one) and the DLQ
# (reason counts) with the model.
#
# Environment: EVENTS (200000 usage events in all), CUSTOMERS (1000), KILLS (minimum, 10),
# RATE (records/s of the usage phases; default sized so they span the kills), SEED (42),
# EXPIRE_IN (seconds from the expiring phase to the expiries; default the usage phase's
# duration + 45), DRAWDOWN_CONFIG (config/drawdown.toml), KEEP=1 keeps the temp dir and topics
# even on success.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/drawdown/target}"
BIN="$CARGO_TARGET_DIR/debug/drawdown"
LOADGEN="$CARGO_TARGET_DIR/debug/drawdown-loadgen"
EVENTS="${EVENTS:-200000}"
CUSTOMERS="${CUSTOMERS:-1000}"
KILLS="${KILLS:-10}"
SEED="${SEED:-42}"
CONFIG="${DRAWDOWN_CONFIG:-config/drawdown.toml}"
# A cycle (SIGKILL, restart, restore, 1-6 s of work) takes ~10-20 s; the two usage phases
# together should span most of the KILLS cycles.
RATE="${RATE:-$(( EVENTS / (KILLS * 15) > 200 ? EVENTS / (KILLS * 15) : 200 ))}"
# The expiries must come after the usage phase that follows them has been processed, kills and
# restores included (the expire phase checks it exactly, and fails rather than guess).
EXPIRE_IN="${EXPIRE_IN:-$(( EVENTS / 2 / RATE + 45 ))}"
T0=$(date +%s)

log() { echo "crash-test: $*" >&2; }

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

log "building"
cargo build --bins --quiet
RUN="crash-$(date +%s)-$$"
DIR="$(mktemp -d "${TMPDIR:-/tmp}/drawdown-crash.XXXXXX")"
STATE="$DIR/state"
# Private copies: others may rebuild the shared target dir or edit the config while the test
# restarts drawdown.
cp "$BIN" "$DIR/drawdown"
BIN="$DIR/drawdown"
cp "$LOADGEN" "$DIR/drawdown-loadgen"
LOADGEN="$DIR/drawdown-loadgen"
cp "$CONFIG" "$DIR/drawdown.toml"
CONFIG="$DIR/drawdown.toml"
deploy/kafka/kafka.sh status >/dev/null 2>&1 || deploy/kafka/kafka.sh start

PORT="$(free_port)"
export DRAWDOWN_CONFIG="$CONFIG"
source scripts/lib.sh
isolate_run "$RUN"
export DRAWDOWN__STORE__PATH="$STATE"
export DRAWDOWN__API__LISTEN="127.0.0.1:$PORT"
API="http://127.0.0.1:$PORT"
EXPECT="$DIR/expect.json"
echo 0 > "$DIR/kills"
echo 0 > "$DIR/wipes"
log "run $RUN: events=$EVENTS customers=$CUSTOMERS kills>=$KILLS rate=$RATE/s expire-in=${EXPIRE_IN}s dir=$DIR api=$API"

OK=0
SUP=""
cleanup() {
    touch "$DIR/stop"
    [[ -n "$SUP" ]] && kill "$SUP" 2>/dev/null || true
    if [[ -f "$DIR/dd.pid" ]]; then
        local pid
        pid="$(cat "$DIR/dd.pid")"
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait 2>/dev/null || true
    if ((OK)) && [[ -z "${KEEP:-}" ]]; then
        deploy/kafka/kafka.sh topics --delete --topic "$RUN-.*" >/dev/null 2>&1 || true
        rm -rf "$DIR"
    else
        log "kept $DIR (drawdown.log, supervisor.log, expect.json); topics $RUN-*"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_dd() {
    echo "=== start $(date +%T.%N)" >> "$DIR/drawdown.log"
    "$BIN" run >> "$DIR/drawdown.log" 2>&1 &
    echo $! > "$DIR/dd.pid"
}

ready() { curl -fs -m 2 "$API/readyz" >/dev/null 2>&1; }

# Waits until /readyz answers 200 (or $1 seconds, or the stop flag).
wait_ready() {
    local until=$(( $(date +%s) + $1 ))
    while (( $(date +%s) < until )); do
        ready && return 0
        [[ -f "$DIR/stop" ]] && return 1
        sleep 0.2
    done
    return 1
}

# The supervisor: kill at random moments, sometimes wipe the state, restart.
supervise() {
    local kills=0 wipes=0 pid when pause
    start_dd
    while [[ ! -f "$DIR/stop" ]]; do
        if (( RANDOM % 5 )); then
            when="after ready"      # usually kill while processing ...
            wait_ready 120 || when="not ready in 120 s"
        else
            when="during start-up"  # ... sometimes during start-up or restore
        fi
        pause="$(( RANDOM % 5 + 1 )).$(( RANDOM % 10 ))"
        sleep "$pause"
        [[ -f "$DIR/stop" ]] && break
        pid="$(cat "$DIR/dd.pid")"
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        kills=$((kills + 1))
        echo "$kills" > "$DIR/kills"
        when="$(date +%T.%N | cut -c1-12) kill #$kills of $pid, ${pause}s $when"
        if (( (wipes == 0 && kills >= 2) || RANDOM % 4 == 0 )); then
            rm -rf "$STATE"
            wipes=$((wipes + 1))
            echo "$wipes" > "$DIR/wipes"
            when="$when, state wiped"
        fi
        echo "$when" >> "$DIR/supervisor.log"
        start_dd
    done
}

supervise &
SUP=$!
wait_ready 120 || { log "drawdown did not become ready"; tail -20 "$DIR/drawdown.log"; exit 1; }

loadgen() { "$LOADGEN" "$@"; }
phase() {
    log "phase: $* (kills so far: $(cat "$DIR/kills"))"
    loadgen produce --customers "$CUSTOMERS" --seed "$SEED" --expect "$EXPECT" "$@"
    loadgen wait-idle --timeout 900
}

HALF=$(( EVENTS / 2 ))
phase --phase grants --events "$HALF" --bad 20
phase --phase expiring --events "$HALF" --expire-in "$EXPIRE_IN" --bad 5
# 2 % of the usage is late (event time 2 min old, past the 30 s grace): applied at stream time.
phase --phase usage --events "$HALF" --rate "$RATE" --duplicates 0.01 --late 0.02 --bad 50
phase --phase expire
phase --phase reservations --events $(( EVENTS / 20 )) --rate "$RATE" --duplicates 0.01 --bad 10
phase --phase voids --bad 10
phase --phase topups --events "$HALF" --format protobuf --bad 20
phase --phase renewal --events "$HALF" --format protobuf --bad 10
phase --phase usage --events $(( EVENTS - HALF )) --rate "$RATE" --duplicates 0.01 --late 0.02 --format protobuf --bad 50
phase --phase reservations --events $(( EVENTS / 40 )) --rate "$RATE" --format protobuf --bad 5
phase --phase voids --format protobuf --bad 10

deadline=$(( $(date +%s) + 60 * KILLS ))
while (( $(cat "$DIR/kills") < KILLS )); do
    (( $(date +%s) < deadline )) || { log "FAILED: only $(cat "$DIR/kills") kills"; exit 1; }
    sleep 1
done
touch "$DIR/stop"
wait "$SUP" 2>/dev/null || true
SUP=""
pid="$(cat "$DIR/dd.pid")"
if ! kill -0 "$pid" 2>/dev/null; then
    start_dd
fi
wait_ready_final() {
    local until=$(( $(date +%s) + 180 ))
    while (( $(date +%s) < until )); do ready && return 0; sleep 0.2; done
    return 1
}
wait_ready_final || { log "FAILED: drawdown not ready after the kills"; tail -20 "$DIR/drawdown.log"; exit 1; }
loadgen wait-idle --timeout 900
KILLED="$(cat "$DIR/kills")"
WIPED="$(cat "$DIR/wipes")"
if VERIFY="$(loadgen verify --expect "$EXPECT")"; then
    echo "$VERIFY"
    grep -q "late=[1-9]" <<< "$VERIFY" || { log "FAILED: no balance change flagged late"; exit 1; }
    for reason in reserved settled released reservation_expired; do
        grep -q " $reason=[1-9]" <<< "$VERIFY" || { log "FAILED: no $reason version"; exit 1; }
    done
    OK=1
    echo "crash-test: OK kills=$KILLED wipes=$WIPED events=$EVENTS customers=$CUSTOMERS elapsed=$(( $(date +%s) - T0 ))s"
else
    echo "$VERIFY"
    echo "crash-test: FAILED kills=$KILLED wipes=$WIPED events=$EVENTS customers=$CUSTOMERS elapsed=$(( $(date +%s) - T0 ))s"
    exit 1
fi
