#!/usr/bin/env bash
# `make reservation-kill-test`: a reservation survives `kill -9`, once with the local state kept
# and once with it wiped (restored from the changelog), and is then settled exactly once.
#
#   1. a grant of 1000 tokens; POST a reservation of 400 (answered after the commit);
#   2. kill -9, restart on the same disk: the hold is there (reserved 400, available 600), and a
#      repeated POST gets the first answer (same expires_at);
#   3. kill -9, wipe the disk, restart: restored from the changelog, the same;
#   4. usage of 300 tokens settles it: balance 700, reserved 0; a retry of that usage (same id)
#      changes nothing; `balance-changed` holds versions 1-3 (grant, reserved, settled), once each.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/drawdown/target}"
BIN="$CARGO_TARGET_DIR/debug/drawdown"
RUN="rk-$(date +%s)-$$"
DIR="$(mktemp -d /tmp/drawdown-rk.XXXXXX)"
BASE_PORT=$(( 20000 + RANDOM % 20000 ))
KAFKA=deploy/kafka/kafka.sh
BOOTSTRAP="${DRAWDOWN__KAFKA__BOOTSTRAP_SERVERS:-127.0.0.1:9092}"
C=rk-cus-1
started=$(date +%s)

log() { echo "reservation-kill-test: $*"; }
fail() { log "FAILED: $*"; exit 1; }

source scripts/lib.sh
isolate_run "$RUN"

cleanup() {
    local rc=$?
    for pid in "${INSTANCE_PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    if (( rc == 0 )); then rm -rf "$DIR"; else log "logs kept in $DIR"; fi
}
trap cleanup EXIT

$KAFKA status > /dev/null 2>&1 || $KAFKA start
[[ -x "$BIN" ]] || cargo build --bins
cp "$BIN" "$DIR/drawdown"
BIN="$DIR/drawdown"

produce() { # TOPIC JSON
    printf '%s\t%s\n' "$C" "$2" | kcat -b "$BOOTSTRAP" -P -t "$1" -K $'\t' -X topic.partitioner=murmur2_random
}
meter() { curl -fsS "$(api 0)/v1/customers/$C/meters/tokens"; }
reserve() {
    curl -sS -o "$DIR/reserve.json" -w '%{http_code}' -H 'Content-Type: application/json' \
        -d '{"reservation_id": "job-1", "units": "400", "ttl": "10m"}' \
        "$(api 0)/v1/customers/$C/meters/tokens/reservations"
}
until_meter() { # JQ-CONDITION WHAT
    local deadline=$(( $(date +%s) + 60 ))
    until meter 2>/dev/null | jq -e "$1" > /dev/null; do
        (( $(date +%s) < deadline )) || fail "$2: $(meter 2>&1 | head -c 600)"
        sleep 0.2
    done
}

start_instance 0
wait_ready 0
produce "$DRAWDOWN__TOPICS__GRANTS" \
    "{\"type\": \"grant\", \"grant_id\": \"g1\", \"customer_id\": \"$C\", \"meter\": \"tokens\", \"amount\": \"1000\"}"
until_meter '.credited == "1000"' "the grant"
code=$(reserve)
[[ "$code" == 200 ]] && jq -e '.status == "held"' "$DIR/reserve.json" > /dev/null \
    || fail "reserve answered $code $(cat "$DIR/reserve.json")"
first=$(jq -r .expires_at "$DIR/reserve.json")
meter | jq -e '.reserved == "400" and .available == "600"' > /dev/null \
    || fail "not committed when answered: $(meter)"
log "held 400 (expires_at $first), answered after the commit"

# kill -9, optionally wipe the disk, restart: the hold is back and a repeat gets the first answer.
kill_and_check() { # WIPE(0|1) WHAT
    kill -9 "${INSTANCE_PIDS[0]}"
    wait "${INSTANCE_PIDS[0]}" 2>/dev/null || true
    unset 'INSTANCE_PIDS[0]'
    (( $1 )) && rm -rf "$DIR/state-0"
    start_instance 0
    wait_ready 0
    until_meter '.reserved == "400" and .available == "600" and .version == 2' "the hold after $2"
    code=$(reserve)
    [[ "$code" == 200 && "$(jq -r .expires_at "$DIR/reserve.json")" == "$first" ]] \
        || fail "repeat after $2: $code $(cat "$DIR/reserve.json")"
    log "$2: hold kept, the repeat got the first answer"
}
kill_and_check 0 "kill -9, same disk"
kill_and_check 1 "kill -9, disk wiped (restored from the changelog)"

usage="{\"id\": \"e1\", \"customer_id\": \"$C\", \"name\": \"llm_completion\", \"properties\": {\"tokens\": 300, \"model\": \"small\"}, \"reservation_id\": \"job-1\"}"
produce "$DRAWDOWN__TOPICS__USAGE" "$usage"
until_meter '.balance == "700" and .reserved == "0" and .version == 3' "the settle"
produce "$DRAWDOWN__TOPICS__USAGE" "$usage"
sleep 3
meter | jq -e '.balance == "700" and .version == 3' > /dev/null || fail "the retried usage changed the meter: $(meter)"
versions=$(kcat -b "$BOOTSTRAP" -C -t "$DRAWDOWN__TOPICS__BALANCE_CHANGED" -o beginning -e -q \
    -X isolation.level=read_committed -f '%s\n' \
    | jq -r "select(.customer_id == \"$C\" and .meter == \"tokens\") | \"\(.version):\(.reason)\"" | sort | tr '\n' ' ')
[[ "$versions" == "1:grant 2:reserved 3:settled " ]] || fail "balance-changed: $versions"
log "OK kills=2 wipes=1 versions=[${versions% }] elapsed=$(( $(date +%s) - started ))s"
