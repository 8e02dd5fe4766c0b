#!/usr/bin/env bash
# `make run`: the whole pipeline on the local broker: drawdown with the example meters, plus
# the load generator (grants, then a steady mix of usage and top-ups). Ctrl-C (SIGINT) or SIGTERM
# stops both; the broker keeps running (`make kafka-stop` stops it).
set -euo pipefail
# Started in the background by a non-interactive shell (`scripts/demo.sh &`, as some supervisors
# do), bash runs with SIGINT ignored, and a signal ignored on entry cannot be trapped: SIGINT did
# nothing. Run again once with SIGINT at its default, so the trap below catches it.
if [[ -z "${DRAWDOWN_DEMO_SIGNALS:-}" ]]; then
    export DRAWDOWN_DEMO_SIGNALS=1
    exec env --default-signal=INT bash "$0" "$@"
fi
cd "$(dirname "$0")/.."
BIN="${CARGO_TARGET_DIR:-$HOME/.cache/drawdown/target}/debug/drawdown"
LOADGEN="${CARGO_TARGET_DIR:-$HOME/.cache/drawdown/target}/debug/drawdown-loadgen"
CONFIG="${DRAWDOWN_CONFIG:-config/drawdown.toml}"
RATE="${RATE:-200}"
CUSTOMERS="${CUSTOMERS:-50}"
mkdir -p data
# An API key and a portal secret for this run (the config keeps only the key's SHA-256).
API_KEY="$("$BIN" -c "$CONFIG" api-key --name demo | sed -n 's/^key: *//p')"
KEY_SHA=$(printf %s "$API_KEY" | sha256sum | cut -c1-64)
DRAWDOWN__API__KEYS="[{ name = \"demo\", sha256 = \"$KEY_SHA\" }]" \
DRAWDOWN__API__PORTAL_SECRET="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" \
    "$BIN" -c "$CONFIG" run > data/drawdown.log 2>&1 &
DD=$!
GEN=""
# Stops the generator (its loop first, then the generator it runs, then the loop: killing the
# loop first orphaned the generator) and drawdown. The broker is left running for the next run.
stop() {
    trap - EXIT INT TERM
    if [[ -n "$GEN" ]]; then
        kill -STOP "$GEN" 2>/dev/null || true
        pkill -TERM -P "$GEN" 2>/dev/null || true
        kill -TERM "$GEN" 2>/dev/null || true
        kill -CONT "$GEN" 2>/dev/null || true
    fi
    kill -TERM "$DD" 2>/dev/null || true
    wait 2>/dev/null || true
    echo "demo stopped: drawdown and the load generator are down; the broker keeps running for the next run (stop it: make kafka-stop)"
}
trap stop EXIT
trap 'stop; exit 130' INT
trap 'stop; exit 143' TERM
for _ in $(seq 1 120); do
    curl -fs http://127.0.0.1:8080/readyz >/dev/null 2>&1 && break
    kill -0 $DD 2>/dev/null || { echo "drawdown exited; see data/drawdown.log"; tail -20 data/drawdown.log; exit 1; }
    sleep 0.5
done
PORTAL=$(curl -fs -H "Authorization: Bearer $API_KEY" -H 'Content-Type: application/json' \
    -d '{"customer_id": "cus-1", "ttl": "8h"}' http://127.0.0.1:8080/v1/portal-sessions \
    | sed -n 's/.*"url":"\([^"]*\)".*/\1/p' || true)
cat <<MSG

drawdown is running (log: data/drawdown.log); the load generator sends ~$RATE events/s for $CUSTOMERS customers.

  API (key for this run: $API_KEY):
            curl -s -H "Authorization: Bearer $API_KEY" http://127.0.0.1:8080/v1/customers/cus-1/state
            curl -s -H "Authorization: Bearer $API_KEY" http://127.0.0.1:8080/v1/customers/cus-1/meters/api_calls
  Portal of cus-1 (8 h):
            $PORTAL
  Metrics:  curl -s http://127.0.0.1:8080/metrics | grep ^drawdown_
  Watch exhausted / restored / low transitions:
            kcat -b 127.0.0.1:9092 -C -t balance-exhausted -X isolation.level=read_committed -f '%k %s\n'
  Dead letters:
            kcat -b 127.0.0.1:9092 -C -t drawdown-dlq -f '%k %h %s\n'
  Top-up requests (portal "Top up" and automatic ones below 50 api_calls):
            kcat -b 127.0.0.1:9092 -C -t top-up-requests -X isolation.level=read_committed -f '%k %s\n'

Ctrl-C to stop.
MSG
"$LOADGEN" -c "$CONFIG" produce --phase grants --customers "$CUSTOMERS"
# Rounds of usage with top-ups sized for each round, so some customers run out (exhausted) and
# get topped up again (restored) while you watch.
(
    round=0
    while true; do
        round=$((round + 1))
        "$LOADGEN" -c "$CONFIG" produce --phase mixed --customers "$CUSTOMERS" --events 20000 \
            --rate "$RATE" --bad 5 --seed "$round" || exit 1
    done
) &
GEN=$!
wait $GEN
