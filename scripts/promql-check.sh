#!/usr/bin/env bash
# `make promql-check`: do the dashboard's and the alert rules' queries really work?
#
# Starts drawdown (fresh topics and group, JSON logs) on the local broker, the load generator
# (grants, then the mixed phase with a few malformed records) and a little API traffic, and
# Debian's Prometheus scraping drawdown every 2 s with deploy/prometheus/alerts.yml loaded.
# After a warm-up it evaluates, through Prometheus' HTTP API:
#   - every expression of deploy/grafana/drawdown.json (Grafana variables substituted): it must
#     be valid and return data;
#   - every rule of deploy/prometheus/alerts.yml: Prometheus must have evaluated it with health
#     "ok", and the expression must be a valid query (alerts are expected to be silent);
#   - the instance variable's label_values() query, through the label values API.
# Prints a report; exits non-zero if anything failed.
# Environment: WARMUP (seconds, default 45), RATE (events/s, default 300), DRAWDOWN_BIN,
# LOADGEN_BIN.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN="${DRAWDOWN_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/drawdown/target}/debug/drawdown}"
LOADGEN="${LOADGEN_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/drawdown/target}/debug/drawdown-loadgen}"
WARMUP="${WARMUP:-45}"
RATE="${RATE:-300}"
for tool in prometheus jq curl python3; do
    command -v "$tool" >/dev/null || { echo "promql-check: $tool is missing (apt-get install prometheus jq curl)"; exit 2; }
done
[[ -x "$BIN" && -x "$LOADGEN" ]] || { echo "promql-check: no $BIN or $LOADGEN (make build)"; exit 2; }

WORK=$(mktemp -d /tmp/drawdown-promql.XXXXXX)
ID="promql-$$-$RANDOM"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

source scripts/lib.sh
isolate_run "$ID"
export DRAWDOWN__KAFKA__PARTITIONS=3
export DRAWDOWN__STORE__PATH="$WORK/state"
export DRAWDOWN__STORE__BLOCK_CACHE_MB=16
export DRAWDOWN__STORE__WRITE_BUFFER_MB=16
export DRAWDOWN__API__LISTEN=127.0.0.1:0
export RUST_LOG=info,rdkafka=warn

"$BIN" -c config/drawdown.toml --log-format json run >"$WORK/drawdown.log" 2>&1 &
PIDS+=($!)
API=""
for _ in $(seq 1 120); do
    # The JSON logs (flattened): {"message":"API listening","addr":"127.0.0.1:PORT",...}
    API=$(jq -Rr 'fromjson? | select(.message == "API listening") | .addr' "$WORK/drawdown.log" | head -1)
    [[ -n "$API" ]] && curl -fs "http://$API/readyz" >/dev/null 2>&1 && break
    kill -0 "${PIDS[0]}" 2>/dev/null || { echo "drawdown exited:"; tail -20 "$WORK/drawdown.log"; exit 1; }
    sleep 0.5
done
curl -fs "http://$API/readyz" >/dev/null || { echo "drawdown not ready"; tail -20 "$WORK/drawdown.log"; exit 1; }
if ! jq -e . "$WORK/drawdown.log" >/dev/null 2>&1; then
    echo "promql-check: --log-format json printed a line that is not JSON:"; grep -v '^{' "$WORK/drawdown.log" | head -3; exit 1
fi

PROM_PORT=$(free_port)
cat >"$WORK/prometheus.yml" <<EOF
global: { scrape_interval: 2s, evaluation_interval: 2s }
rule_files: ["$ROOT/deploy/prometheus/alerts.yml"]
scrape_configs:
  - job_name: drawdown
    static_configs: [{ targets: ["$API"] }]
EOF
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
    --web.listen-address="127.0.0.1:$PROM_PORT" --log.level=warn >"$WORK/prometheus.log" 2>&1 &
PIDS+=($!)
PROM="http://127.0.0.1:$PROM_PORT"

"$LOADGEN" -c config/drawdown.toml produce --phase grants --customers 30 >"$WORK/produce.log" 2>&1
"$LOADGEN" -c config/drawdown.toml produce --phase mixed --customers 30 --events 100000000 --rate "$RATE" --bad 20 \
    >>"$WORK/produce.log" 2>&1 &
PIDS+=($!)
( while true; do
    for c in 0 1 2 3; do
        curl -s -o /dev/null "http://$API/v1/customers/cus-$c/state"
        curl -s -o /dev/null "http://$API/v1/customers/cus-$c/meters/api_calls/events?limit=5"
    done
    curl -s -o /dev/null "http://$API/v1/customers/nobody/state"
    sleep 1
done ) &
PIDS+=($!)

echo "promql-check: drawdown at $API, Prometheus at $PROM, load ~$RATE events/s; warming up ${WARMUP}s"
sleep "$WARMUP"

query() { curl -s -G --data-urlencode "query=$1" "$PROM/api/v1/query"; }
fail=0
printf '\n%-6s %-7s %s\n' RESULT SERIES "DASHBOARD PANEL / EXPRESSION"
while IFS=$'\t' read -r title expr; do
    q=${expr//\$__rate_interval/30s}
    q=${q//\$__interval/10s}
    q=${q//\$__range/5m}
    q=${q//\$\{instance\}/.*}
    q=${q//\$instance/.*}
    r=$(query "$q")
    status=$(jq -r .status <<<"$r")
    if [[ "$status" != success ]]; then
        printf '%-6s %-7s %s\n         %s\n' ERROR - "$title" "$(jq -r .error <<<"$r")"; fail=1; continue
    fi
    n=$(jq '.data.result | length' <<<"$r")
    sample=$(jq -r '[.data.result[:3][] | .value[1]] | join(", ")' <<<"$r")
    if ((n == 0)); then
        printf '%-6s %-7s %s\n' EMPTY 0 "$title"; fail=1
    else
        printf '%-6s %-7s %s  [%s]\n' OK "$n" "$title" "$sample"
    fi
done < <(jq -r '.. | objects | select(has("targets")) | .title as $t | .targets[] | select(.expr) | [$t + " (" + .refId + ")", .expr] | @tsv' deploy/grafana/drawdown.json)

# The template variable: label_values(drawdown_build_info, instance) is Grafana's; ask the label API.
vals=$(curl -s -G --data-urlencode 'match[]=drawdown_build_info' "$PROM/api/v1/label/instance/values" | jq -r '.data | join(",")')
if [[ -n "$vals" ]]; then printf '%-6s %-7s %s\n' OK 1 "variable instance = label_values(drawdown_build_info, instance) -> $vals"
else printf '%-6s %-7s %s\n' EMPTY 0 "variable instance"; fail=1; fi

printf '\n%-6s %-8s %s\n' HEALTH STATE "ALERT RULE (evaluated by Prometheus)"
rules=$(curl -s "$PROM/api/v1/rules")
while IFS=$'\t' read -r name health state query_ lasterr; do
    r=$(query "$query_")
    if [[ "$health" != ok || $(jq -r .status <<<"$r") != success ]]; then
        printf '%-6s %-8s %s\n         %s %s\n' "${health:-?}" "$state" "$name" "$lasterr" "$(jq -r '.error // ""' <<<"$r")"; fail=1
    else
        printf '%-6s %-8s %s\n' ok "$state" "$name"
    fi
done < <(jq -r '.data.groups[].rules[] | [.name, .health, .state, .query, (.lastError // "")] | @tsv' <<<"$rules")
nrules=$(jq '[.data.groups[].rules[]] | length' <<<"$rules")
ndefined=$(grep -c '^ *- alert:' deploy/prometheus/alerts.yml)
if [[ "$nrules" != "$ndefined" ]]; then echo "Prometheus loaded $nrules rules, alerts.yml has $ndefined"; fail=1; fi

echo
if ((fail)); then echo "promql-check: FAILED"; exit 1; fi
echo "promql-check: every dashboard query returns data and every alert rule evaluates"
