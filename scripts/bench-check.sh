#!/usr/bin/env bash
# `make bench-check`: load on the entitlement check of one instance, with wrk.
#
# One drawdown (release build) on topics of its own, 8 partitions, CUSTOMERS customers (default
# 10,000) each with a grant on `api_calls`; then wrk, CONNECTIONS (64) connections on 2 threads
# for SECONDS (30), each request a random customer's
# GET /v1/customers/{id}/meters/api_calls/check?units=N (API key). Prints wrk's summary with
# its latency percentiles; the pipeline is idle (no usage) so the figure is the API's.
# Needs wrk (Debian package; installed here when run as root). PROFILE=debug uses the dev build;
# PERF=FILE records a profile of drawdown during the run.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/drawdown/target}"
PROFILE="${PROFILE:-release}"
BIN="$CARGO_TARGET_DIR/$PROFILE/drawdown"
LOADGEN="$CARGO_TARGET_DIR/$PROFILE/drawdown-loadgen"
CUSTOMERS="${CUSTOMERS:-10000}"
CONNECTIONS="${CONNECTIONS:-64}"
SECONDS_="${SECONDS:-30}"

if ! command -v wrk >/dev/null; then
    if [[ $(id -u) -eq 0 ]]; then
        apt-get install -y -qq wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
    else
        echo "bench-check: wrk is missing: sudo apt-get install -y wrk" >&2
        exit 2
    fi
fi

RUN="bc-$(date +%s)-$$"
DIR="$(mktemp -d /tmp/drawdown-bench-check.XXXXXX)"
PORT=$(( 20000 + RANDOM % 20000 ))
API_KEY="$("$BIN" api-key | sed -n 's/^key: *//p')"
KEY_SHA=$(printf %s "$API_KEY" | sha256sum | cut -c1-64)
cat > "$DIR/drawdown.toml" <<TOML
[kafka]
group_id = "$RUN"
partitions = 8

[topics]
usage = "$RUN-usage"
grants = "$RUN-grants"
balance_changed = "$RUN-balance-changed"
balance_exhausted = "$RUN-balance-exhausted"
dlq = "$RUN-dlq"
top_up_requests = "$RUN-top-up-requests"

[store]
path = "$DIR/state"

[api]
listen = "127.0.0.1:$PORT"
keys = [{ name = "bench", sha256 = "$KEY_SHA" }]

[[meters]]
name = "api_calls"
event = "api_call"
aggregation = { type = "count" }
on_exhausted = "overage"
TOML

DD=""
cleanup() {
    [[ -n "$DD" ]] && { kill -TERM "$DD" 2>/dev/null || true; wait "$DD" 2>/dev/null || true; }
    rm -rf "$DIR"
}
trap cleanup EXIT
source scripts/lib.sh
deploy/kafka/kafka.sh status >/dev/null 2>&1 || deploy/kafka/kafka.sh start
"$BIN" -c "$DIR/drawdown.toml" run > "$DIR/drawdown.log" 2>&1 &
DD=$!
wait_http_ready "http://127.0.0.1:$PORT/readyz" "$DD" "$DIR/drawdown.log"
# Grants for every customer (the load generator's ids: <prefix>-<n>), then wait for the last.
"$LOADGEN" -c "$DIR/drawdown.toml" produce --phase grants --customers "$CUSTOMERS" >/dev/null
last=$(( CUSTOMERS - 1 ))
for _ in $(seq 1 600); do
    code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $API_KEY" \
        "http://127.0.0.1:$PORT/v1/customers/cus-$last/meters/api_calls" || true)
    [[ "$code" == 200 ]] && break
    sleep 0.1
done
[[ "$code" == 200 ]] || { echo "bench-check: grants not folded (last: $code)"; exit 1; }

cat > "$DIR/check.lua" <<LUA
math.randomseed(os.time())
local customers = $CUSTOMERS
request = function()
    local c = math.random(0, customers - 1)
    local units = math.random(0, 200)
    return wrk.format("GET", "/v1/customers/cus-" .. c .. "/meters/api_calls/check?units=" .. units)
end
response = function(status, headers, body)
    if status ~= 200 then
        io.stderr:write("status " .. status .. "\n")
    end
end
LUA
echo "bench-check: $CUSTOMERS customers, $CONNECTIONS connections, ${SECONDS_}s, $(nproc) cores, broker and drawdown on this machine"
# PERF=FILE: also `perf record -g` drawdown during the run into FILE (then `perf report -i FILE`).
if [[ -n "${PERF:-}" ]]; then
    perf record -g -o "$PERF" -p "$DD" -- sleep "$SECONDS_" > /dev/null 2>&1 &
    PERF_PID=$!
fi
wrk -t2 -c"$CONNECTIONS" -d"${SECONDS_}s" --latency -s "$DIR/check.lua" \
    -H "Authorization: Bearer $API_KEY" "http://127.0.0.1:$PORT"
[[ -n "${PERF_PID:-}" ]] && wait "$PERF_PID" || true
