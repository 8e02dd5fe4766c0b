#!/usr/bin/env bash
# `make browser-test`: the customer portal in headless Chromium against a running drawdown and
# the local broker (tests/browser/portal.mjs). Needs Debian's `chromium` (the browser is never
# downloaded: playwright-core drives /usr/bin/chromium), node + npm, and kcat. Its own topics,
# group, port and data dir; an API key and a portal secret made for the run.
# Screenshots: $OUT_DIR (default $CARGO_TARGET_DIR/browser-test): portal.png, portal-pending.png,
# portal-exhausted.png. KEEP=1 keeps the drawdown log and config.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/drawdown/target}"
BIN="$CARGO_TARGET_DIR/debug/drawdown"
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
OUT_DIR="${OUT_DIR:-$CARGO_TARGET_DIR/browser-test}"
# node_modules live outside the clone (reused across clones and CI runs), keyed by the lock file.
NODE_CACHE="${NODE_CACHE:-$HOME/.cache/drawdown/browser-test}"

for tool in node npm kcat curl; do
    command -v "$tool" >/dev/null || { echo "browser-test: $tool is missing"; exit 2; }
done
[[ -x "$CHROMIUM" ]] || { echo "browser-test: no $CHROMIUM (apt-get install chromium chromium-driver)"; exit 2; }
[[ -x "$BIN" ]] || cargo build --bins

lock_sum=$(sha256sum tests/browser/package-lock.json | cut -c1-16)
if [[ ! -f "$NODE_CACHE/$lock_sum.ok" ]]; then
    rm -rf "$NODE_CACHE"
    mkdir -p "$NODE_CACHE"
    cp tests/browser/package.json tests/browser/package-lock.json "$NODE_CACHE/"
    (cd "$NODE_CACHE" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --ignore-scripts --no-audit --no-fund)
    touch "$NODE_CACHE/$lock_sum.ok"
fi
ln -sfn "$NODE_CACHE/node_modules" tests/browser/node_modules

RUN="bt-$(date +%s)-$$"
DIR="$(mktemp -d /tmp/drawdown-browser.XXXXXX)"
PORT=$(( 20000 + RANDOM % 20000 ))
API_KEY="$("$BIN" api-key | sed -n 's/^key: *//p')"
KEY_SHA=$(printf %s "$API_KEY" | sha256sum | cut -c1-64)
SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')

cat > "$DIR/drawdown.toml" <<TOML
[kafka]
group_id = "$RUN"
partitions = 3
transaction_timeout = "10s"

[topics]
usage = "$RUN-usage"
grants = "$RUN-grants"
balance_changed = "$RUN-balance-changed"
balance_exhausted = "$RUN-balance-exhausted"
dlq = "$RUN-dlq"
top_up_requests = "$RUN-top-up-requests"

[pipeline]
commit_interval = "50ms"

[store]
path = "$DIR/state"
block_cache_mb = 16
write_buffer_mb = 16

[api]
listen = "127.0.0.1:$PORT"
keys = [{ name = "browser-test", sha256 = "$KEY_SHA" }]
portal_secret = "$SECRET"

[[meters]]
name = "api_calls"
event = "api_call"
aggregation = { type = "count" }
on_exhausted = "overage"
low_balance = [{ units = "50" }]
top_up_packs = ["calls-500", "calls-5000"]
auto_top_up = { below = "10", pack = "calls-500" }

[[meters]]
name = "tokens"
event = "llm_completion"
aggregation = { type = "sum", property = "tokens" }
on_exhausted = "block"
low_balance = [{ fraction = "0.2" }]
top_up_packs = ["tokens-100k"]
TOML

DD=""
cleanup() {
    [[ -n "$DD" ]] && { kill -TERM "$DD" 2>/dev/null || true; wait "$DD" 2>/dev/null || true; }
    if [[ "${KEEP:-0}" == 1 ]]; then echo "browser-test: kept $DIR"; else rm -rf "$DIR"; fi
}
trap cleanup EXIT
source scripts/lib.sh
deploy/kafka/kafka.sh status >/dev/null 2>&1 || deploy/kafka/kafka.sh start
"$BIN" -c "$DIR/drawdown.toml" run > "$DIR/drawdown.log" 2>&1 &
DD=$!
wait_http_ready "http://127.0.0.1:$PORT/readyz" "$DD" "$DIR/drawdown.log"

status=0
DRAWDOWN_BASE="http://127.0.0.1:$PORT" DRAWDOWN_API_KEY="$API_KEY" \
DRAWDOWN_BOOTSTRAP="${DRAWDOWN_BOOTSTRAP:-127.0.0.1:9092}" \
DRAWDOWN_TOPIC_USAGE="$RUN-usage" DRAWDOWN_TOPIC_GRANTS="$RUN-grants" \
DRAWDOWN_TOPIC_TOP_UPS="$RUN-top-up-requests" OUT_DIR="$OUT_DIR" CHROMIUM="$CHROMIUM" \
    node tests/browser/portal.mjs || status=$?
if ((status)); then
    echo "browser-test: failed; drawdown log:"
    tail -30 "$DIR/drawdown.log"
fi
exit $status
