#!/usr/bin/env bash
# `make soak`: DURATION seconds (default 1800) of load on two drawdown instances sharing 8
# partitions, with a SIGKILL every KILL_EVERY seconds (default 180; the instances take turns,
# each restarted on its disk 2 s later) and the broker stopped once for OUTAGE seconds (default
# 20) half way through. The load, from the generator with an exact expectation, is usage at RATE
# events/s in one-minute phases, every third minute a reservations phase, every fifth top-ups.
# RATE defaults to half of the peak `make bench-e2e` saved (its default-threads row), else 2000.
#
# Every 10 s it samples, per instance, resident memory and open files, and RocksDB's size on
# disk; and the changelog's size in the broker's log dirs: samples.csv, drawn into OUT (default
# docs/soak.png, matplotlib in a venv in ~/.cache/drawdown). Plateaus are required: for each of
# RSS, open files, RocksDB and changelog (summed over the instances), the largest value of the
# last third of the run must be at most 1.25x the largest of the middle third. The dedupe window
# is WINDOW (default 120s), so the run spans many windows: ids, reservation records and deltas
# must be forgotten as fast as they come. It ends with the exact verify (balances, every
# version, transitions, DLQ) through the API of each instance. Prints one summary line.
#
# Env: PROFILE (release; debug uses the dev build), CUSTOMERS (10000), KEEP=1 keeps the run dir.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/drawdown/target}"
PROFILE="${PROFILE:-release}"
BIN="$CARGO_TARGET_DIR/$PROFILE/drawdown"
LOADGEN="$CARGO_TARGET_DIR/$PROFILE/drawdown-loadgen"
DURATION="${DURATION:-1800}"
KILL_EVERY="${KILL_EVERY:-180}"
OUTAGE="${OUTAGE:-20}"
CUSTOMERS="${CUSTOMERS:-10000}"
WINDOW="${WINDOW:-120s}"
OUT="${OUT:-docs/soak.png}"
LOGS="${KAFKA_LOG_DIRS:-${KAFKA_DATA:-$HOME/.cache/drawdown/kafka-data}/logs}"
KAFKA=deploy/kafka/kafka.sh
E2E="$CARGO_TARGET_DIR/bench-e2e.json"
if [[ -z "${RATE:-}" && -f "$E2E" ]]; then
    RATE=$(python3 -c 'import json, sys; print(int(json.load(open(sys.argv[1]))["rows"][-1]["records_per_s"] / 2))' "$E2E")
fi
RATE="${RATE:-2000}"
RUN="soak-$(date +%s)-$$"
DIR="$(mktemp -d /tmp/drawdown-soak.XXXXXX)"
BASE_PORT=$(( 20000 + RANDOM % 20000 ))
T0=$(date +%s)

log() { echo "soak: $(date +%T) $*"; }

source scripts/lib.sh
isolate_run "$RUN"
export DRAWDOWN__KAFKA__PARTITIONS=8
export DRAWDOWN__PIPELINE__DEDUPE_WINDOW="$WINDOW"

LOAD="" SAMPLER=""
cleanup() {
    local rc=$?
    [[ -n "$LOAD" ]] && kill "$LOAD" 2>/dev/null || true
    [[ -n "$SAMPLER" ]] && kill "$SAMPLER" 2>/dev/null || true
    for i in 0 1; do [[ -f "$DIR/pid-$i" ]] && kill -9 "$(cat "$DIR/pid-$i")" 2>/dev/null || true; done
    $KAFKA status > /dev/null 2>&1 || $KAFKA start > /dev/null 2>&1 || true
    if (( rc == 0 )) && [[ -z "${KEEP:-}" ]]; then
        $KAFKA topics --delete --topic "$RUN-.*" > /dev/null 2>&1 || true
        rm -rf "$DIR"
    else
        log "logs, samples.csv and expect.json kept in $DIR"
    fi
}
trap cleanup EXIT

$KAFKA status > /dev/null 2>&1 || $KAFKA start
[[ -x "$BIN" && -x "$LOADGEN" ]] || { log "build first: cargo build --bins ${PROFILE/debug/}"; exit 2; }
cp "$BIN" "$DIR/drawdown"
BIN="$DIR/drawdown"
cp "$LOADGEN" "$DIR/drawdown-loadgen"
LOADGEN="$DIR/drawdown-loadgen"
EXPECT="$DIR/expect.json"

start() {
    start_instance "$1"
    echo "${INSTANCE_PIDS[$1]}" > "$DIR/pid-$1"
}
gen() {
    "$LOADGEN" produce --customers "$CUSTOMERS" --prefix "$RUN" --seed 11 --expect "$EXPECT" "$@" >> "$DIR/produce.log" 2>&1
}

log "run $RUN: ${DURATION}s at ${RATE}/s, kill every ${KILL_EVERY}s, ${OUTAGE}s outage, window $WINDOW, $PROFILE build, dir $DIR"
start 0
start 1
wait_ready 0
wait_ready 1
gen --phase grants --events $(( RATE * DURATION ))
"$LOADGEN" wait-idle --timeout 300 > /dev/null

# The sampler: one CSV row every 10 s. Not under `set -e`: a probe of an instance that was just
# killed fails, and must give 0, not end the sampling.
sample() {
    set +e +o pipefail
    echo "t_s,rss0,rss1,fds0,fds1,rocksdb0,rocksdb1,changelog"
    local t pid i row
    while true; do
        t=$(( $(date +%s) - T0 ))
        row="$t"
        for what in rss fds; do
            for i in 0 1; do
                pid="$(cat "$DIR/pid-$i" 2>/dev/null || echo 0)"
                case $what in
                    rss) row+=",$(( $(awk '/VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0) * 1024 ))" ;;
                    fds) row+=",$(ls "/proc/$pid/fd" 2>/dev/null | wc -l)" ;;
                esac
            done
        done
        for i in 0 1; do row+=",$(du -sb "$DIR/state-$i" 2>/dev/null | cut -f1 || echo 0)"; done
        row+=",$(du -scb "$LOGS/$RUN-changelog-"* 2>/dev/null | tail -1 | cut -f1)"
        echo "$row"
        sleep 10
    done
}
sample > "$DIR/samples.csv" &
SAMPLER=$!

# The load: one-minute usage phases; every third minute reservations, every fifth top-ups. A
# phase does not start while the broker is away (its topic check would fail before it sends).
load() {
    local minute=0
    while (( $(date +%s) < T0 + DURATION )); do
        while [[ -f "$DIR/outage" ]]; do sleep 1; done
        date +%s > "$DIR/phase-started"
        gen --phase usage --events $(( RATE * 60 )) --rate "$RATE" --duplicates 0
        minute=$(( minute + 1 ))
        if (( minute % 3 == 0 )); then
            gen --phase reservations --events $(( RATE * 5 )) --rate "$RATE" --duplicates 0
        fi
        if (( minute % 5 == 0 )); then
            gen --phase topups
        fi
    done
}
load &
LOAD=$!

# The faults.
kills=0 victim=0 outage_done=0
next_kill=$(( $(date +%s) + KILL_EVERY ))
outage_at=$(( T0 + DURATION / 2 ))
while kill -0 "$LOAD" 2>/dev/null; do
    now=$(date +%s)
    if (( now >= next_kill )); then
        pid="$(cat "$DIR/pid-$victim")"
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        kills=$(( kills + 1 ))
        echo "$(( now - T0 )),kill,$victim" >> "$DIR/events.csv"
        log "kill #$kills: instance $victim (pid $pid)"
        sleep 2
        start "$victim"
        victim=$(( 1 - victim ))
        next_kill=$(( next_kill + KILL_EVERY ))
    fi
    # The outage in the middle of a phase (one that started over 10 s ago).
    if (( !outage_done && now >= outage_at )) && (( now - $(cat "$DIR/phase-started") > 10 )); then
        touch "$DIR/outage"
        echo "$(( now - T0 )),outage_start," >> "$DIR/events.csv"
        $KAFKA crash > /dev/null   # SIGKILL: see multi-instance-test.sh on why not SIGTERM
        log "broker killed, down for ${OUTAGE}s"
        sleep "$OUTAGE"
        $KAFKA start > /dev/null
        echo "$(( $(date +%s) - T0 )),outage_end," >> "$DIR/events.csv"
        rm -f "$DIR/outage"
        outage_done=1
        log "broker back"
    fi
    sleep 1
done
wait "$LOAD" || { log "FAILED: the generator failed"; tail -20 "$DIR/produce.log"; exit 1; }
LOAD=""
wait_idle_resolving_hangs 900
kill "$SAMPLER" 2>/dev/null || true
SAMPLER=""
for i in 0 1; do wait_ready "$i"; done
VERIFY=""
for i in 0 1; do
    VERIFY="$("$LOADGEN" verify --expect "$EXPECT" --api "$(api "$i")")" || { echo "$VERIFY"; log "FAILED: verify through instance $i"; exit 1; }
done
echo "$VERIFY"

# The plot and the plateau verdicts.
VENV="$HOME/.cache/drawdown/venv-soak"
if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import matplotlib' 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q matplotlib==3.10.7
fi
VERDICT="$("$VENV/bin/python" scripts/soak_plot.py "$DIR/samples.csv" "$DIR/events.csv" "$OUT")" || { echo "$VERDICT"; log "FAILED: not a plateau"; exit 1; }
produced=$(grep -c '^produce:' "$DIR/produce.log" || true)
log "$VERDICT"
echo "soak: OK duration=${DURATION}s rate=${RATE}/s kills=$kills outage=${OUTAGE}s hanging_aborted=$HANGING_ABORTED phases=$produced window=$WINDOW $(grep -o 'samples=.*' <<< "$VERDICT") elapsed=$(( $(date +%s) - T0 ))s plot=$OUT"
