# Shared by the test scripts: `source scripts/lib.sh`.

# isolate_run ID: points drawdown (and the generator) at a consumer group and topics of their
# own, `ID` and `ID-<role>`, so a run never sees another run's records.
isolate_run() {
    local id=$1 t
    export DRAWDOWN__KAFKA__GROUP_ID="$id"
    for t in usage grants balance_changed balance_exhausted dlq top_up_requests changelog; do
        export "DRAWDOWN__TOPICS__${t^^}=$id-$t"
    done
}

# Instances of the multi-instance scripts. Needs BIN, DIR, BASE_PORT and a `log` function;
# instance I gets the id "${INSTANCE_PREFIX:-}I", its API on BASE_PORT+I, its store in
# $DIR/state-I and its log in $DIR/instance-I.log. INSTANCE_PIDS maps I to its pid.
declare -A INSTANCE_PIDS
port() { echo $(( BASE_PORT + $1 )); }
api() { echo "http://127.0.0.1:$(port "$1")"; }

start_instance() {
    local i=$1
    DRAWDOWN__KAFKA__INSTANCE_ID="${INSTANCE_PREFIX:-}$i" \
    DRAWDOWN__API__LISTEN="127.0.0.1:$(port "$i")" \
    DRAWDOWN__STORE__PATH="$DIR/state-$i" \
        "$BIN" run >> "$DIR/instance-$i.log" 2>&1 &
    INSTANCE_PIDS[$i]=$!
    log "instance $i started (pid ${INSTANCE_PIDS[$i]}, $(api "$i"))"
}

# wait_http_ready URL PID LOG: until URL answers (60 s at most); fails with LOG's tail if the
# process PID exits first or it never answers.
wait_http_ready() {
    local url=$1 pid=$2 log=$3
    for _ in $(seq 1 240); do
        curl -fs "$url" >/dev/null 2>&1 && return 0
        kill -0 "$pid" 2>/dev/null || { echo "drawdown exited"; tail -20 "$log"; return 1; }
        sleep 0.25
    done
    curl -fs "$url" >/dev/null || { echo "drawdown not ready"; tail -20 "$log"; return 1; }
}

wait_ready() {
    local i=$1 deadline=$(( $(date +%s) + 120 ))
    until curl -fs "$(api "$i")/readyz" > /dev/null 2>&1; do
        (( $(date +%s) < deadline )) || { log "instance $i not ready in 120 s"; tail -30 "$DIR/instance-$i.log"; return 1; }
        sleep 0.5
    done
}

# wait_idle_resolving_hangs SECONDS: `wait-idle`, for at most SECONDS. A broker stopped with
# SIGTERM in the middle of a transaction has left it hanging (seen three times with Kafka 4.4 in
# CI runs of `make multi-instance-test`): its records and offsets stay open on the partitions and
# read_committed readers stop at them. The tests' outages are now SIGKILLs (`kafka.sh crash`),
# which recover through the log; if one hangs anyway, the runbook's remedy (DrawdownStalled) is
# applied: every 90 s of lag, transactions hanging for over a minute are aborted
# (`kafka.sh hanging --abort 1`) and counted in HANGING_ABORTED. The exact verify that follows
# still judges the result: an abort of a transaction that its coordinator had committed drops
# its records from those partitions, and the verify fails. Needs LOADGEN and a `log` function.
HANGING_ABORTED=0
wait_idle_resolving_hangs() {
    local deadline=$(( $(date +%s) + $1 )) found
    while ! "$LOADGEN" wait-idle --timeout 90; do
        (( $(date +%s) < deadline )) || return 1
        found="$(deploy/kafka/kafka.sh hanging --abort 1 2>/dev/null)" || true
        if [[ -n "$found" ]]; then
            HANGING_ABORTED=$(( HANGING_ABORTED + $(wc -l <<< "$found") ))
            log "the broker left transactions hanging; aborted (topic partition producer start):"
            sed 's/^/    /' <<< "$found"
        fi
    done
}
