#!/usr/bin/env bash
# `make api-fuzz`: property-based API fuzzing with schemathesis (issue 13, item 4) against one
# live drawdown with API keys and a portal secret (auth really enforced), on the local broker.
# Its own group, topics, port and data dir. Two customers are seeded through kcat on the example
# meters: `cus-1` (the document's example id: a cycle grant with rollover, a pending grant, usage
# over a page of history and a voided event, a blocked meter, a meter in overage) and `cus-2`.
#
#   1. `st run` of docs/openapi.json: every operation with the credential its `security` names
#      first (the API key; a cus-1 portal token where only a portal token is accepted).
#   2. `st run` again with only the cus-1 portal token, on the routes that accept one.
#   3. An auth matrix read from the document's `security`: every `/v1` operation with no, an
#      unknown, a non-Bearer, a tampered and an expired credential (401, `WWW-Authenticate`),
#      with each kind of credential (accepted, or 403 when the route takes the other kind), and
#      with a portal token for another or an unknown customer (403, the id never echoed).
#
# Checks of 1 and 2: not_a_server_error, status_code_conformance, content_type_conformance,
# response_schema_conformance, ignored_auth (an operation answering 2xx is replayed without
# and with wrong credentials: it must answer 401 / 403); every request times out after 5 s
# (a hang fails). The seeded customer ids, meter names and packs are drawn half of the time for
# ids, meters and packs, so requests reach real data and not only 404s.
#
# Env: API_FUZZ_EXAMPLES (examples per operation and phase; default 600, about 10 minutes;
# 10-20 for CI, under 2 minutes), API_FUZZ_SEED (schemathesis seed, for a replay),
# API_FUZZ_SPEC (default docs/openapi.json), DRAWDOWN_CONFIG (default config/drawdown.toml),
# API_FUZZ_CHECKS (schemathesis' --checks, default the five above; `all` adds the stricter ones).
# schemathesis is installed from PyPI into a venv, $HOME/.cache/drawdown/venv-api-fuzz, on first
# use. Logs and schemathesis' JUnit reports are kept in a temp dir on failure (and with KEEP=1).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/drawdown/target}"
BIN="$CARGO_TARGET_DIR/debug/drawdown"
LOADGEN="$CARGO_TARGET_DIR/debug/drawdown-loadgen"
EXAMPLES="${API_FUZZ_EXAMPLES:-600}"
SPEC="${API_FUZZ_SPEC:-docs/openapi.json}"
CONFIG="${DRAWDOWN_CONFIG:-config/drawdown.toml}"
ST_VERSION=4.32.5
VENV="${API_FUZZ_VENV:-$HOME/.cache/drawdown/venv-api-fuzz}"
RUN="af-$(date +%s)-$$"
DIR="$(mktemp -d /tmp/drawdown-api-fuzz.XXXXXX)"
BASE_PORT=$(( 20000 + RANDOM % 20000 ))
KAFKA=deploy/kafka/kafka.sh
BOOTSTRAP="${DRAWDOWN__KAFKA__BOOTSTRAP_SERVERS:-127.0.0.1:9092}"
CHECKS="${API_FUZZ_CHECKS:-not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,ignored_auth}"
started=$(date +%s)

log() { echo "api-fuzz: $*"; }

source scripts/lib.sh

cleanup() {
    local rc=$?
    for pid in "${INSTANCE_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if (( rc == 0 )) && [[ "${KEEP:-0}" != 1 ]]; then
        rm -rf "$DIR"
    else
        rm -f "$DIR/drawdown" "$DIR/drawdown-loadgen"
        log "logs kept in $DIR"
    fi
}
trap cleanup EXIT

for tool in kcat curl jq; do
    command -v "$tool" > /dev/null || { log "$tool is missing (make setup)"; exit 2; }
done
if [[ "$("$VENV/bin/st" --version 2>/dev/null)" != *" $ST_VERSION" ]]; then
    log "installing schemathesis $ST_VERSION into $VENV"
    rm -rf "$VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$ST_VERSION"
fi
ST="$VENV/bin/st"
PY="$VENV/bin/python"

$KAFKA status > /dev/null 2>&1 || $KAFKA start
[[ -x "$BIN" && -x "$LOADGEN" ]] || cargo build --bins
# Private copies: a rebuild of the shared target dir, or an edit of the config or the document,
# must not change what this run tests.
cp "$BIN" "$DIR/drawdown"
BIN="$DIR/drawdown"
cp "$LOADGEN" "$DIR/drawdown-loadgen"
LOADGEN="$DIR/drawdown-loadgen"
cp "$CONFIG" "$DIR/drawdown.toml"
export DRAWDOWN_CONFIG="$DIR/drawdown.toml"
cp "$SPEC" "$DIR/openapi.json"

isolate_run "$RUN"
export DRAWDOWN__KAFKA__PARTITIONS=4
export DRAWDOWN__KAFKA__TRANSACTION_TIMEOUT=10s
export DRAWDOWN__PIPELINE__COMMIT_INTERVAL=50ms
export DRAWDOWN__STORE__BLOCK_CACHE_MB=16 DRAWDOWN__STORE__WRITE_BUFFER_MB=16
# Auth as in production: a key (only its SHA-256 configured), no open API, a portal secret.
keygen="$("$BIN" api-key --name api-fuzz)"
API_KEY="$(sed -n 's/^key: *//p' <<< "$keygen")"
export DRAWDOWN__API__KEYS="$(sed -n 's/^config: *keys = //p' <<< "$keygen")"
export DRAWDOWN__API__ALLOW_UNAUTHENTICATED=false
export DRAWDOWN__API__PORTAL_SECRET="api-fuzz-$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
[[ -n "$API_KEY" && "$DRAWDOWN__API__KEYS" == "[{"* ]] || { log "drawdown api-key: $keygen"; exit 1; }

start_instance 0
wait_ready 0
URL="$(api 0)"
# The binary serves the document it was built with: another one means a stale build.
curl -fsS "$URL/openapi.json" | cmp -s - "$DIR/openapi.json" \
    || log "WARNING: $SPEC differs from the document the binary serves (built from another version?)"
# `curl_api METHOD PATH [BODY]` with the API key: the body on stdout, the status in $DIR/status.
curl_api() {
    curl -s -o "$DIR/body" -w '%{http_code}' -X "$1" -H "Authorization: Bearer $API_KEY" \
        -H 'Content-Type: application/json' ${3:+--data "$3"} "$URL$2" > "$DIR/status" || true
    cat "$DIR/body"
}

# ---- seed: grants first (their record timestamps precede the usage they fund), then usage,
# then a void of one usage event.
produce() { kcat -b "$BOOTSTRAP" -P -t "$1" -K $'\t' -X topic.partitioner=murmur2_random; }
in_days() { date -u -d "+$1 days" +%Y-%m-%dT%H:%M:%SZ; }
{
    printf 'cus-1\t{"type":"grant","grant_id":"cus-1-plan","customer_id":"cus-1","meter":"api_calls","amount":"1000","kind":"cycle","subscription_id":"sub-1","rollover":"100","expires_at":"%s"}\n' "$(in_days 30)"
    printf 'cus-1\t{"type":"grant","grant_id":"cus-1-next","customer_id":"cus-1","meter":"api_calls","amount":"200","kind":"top_up","priority":5,"effective_at":"%s"}\n' "$(in_days 1)"
    printf 'cus-1\t{"type":"grant","grant_id":"cus-1-tokens","customer_id":"cus-1","meter":"tokens","amount":"10000","kind":"top_up"}\n'
    printf 'cus-1\t{"type":"grant","grant_id":"cus-1-requests","customer_id":"cus-1","meter":"llm_requests","amount":"5","kind":"adjustment"}\n'
    printf 'cus-2\t{"type":"grant","grant_id":"cus-2-plan","customer_id":"cus-2","meter":"api_calls","amount":"50","kind":"top_up"}\n'
} | produce "$DRAWDOWN__TOPICS__GRANTS"
sleep 0.2
{
    for i in $(seq 1 120); do printf 'cus-1\t{"id":"cus-1-call-%d","customer_id":"cus-1","name":"api_call"}\n' "$i"; done
    for i in $(seq 1 10); do printf 'cus-1\t{"id":"cus-1-llm-%d","customer_id":"cus-1","name":"llm_completion","properties":{"tokens":1200}}\n' "$i"; done
    for i in 1 2 3; do printf 'cus-2\t{"id":"cus-2-call-%d","customer_id":"cus-2","name":"api_call"}\n' "$i"; done
} | produce "$DRAWDOWN__TOPICS__USAGE"
"$LOADGEN" wait-idle --timeout 120 > "$DIR/wait-idle.log" 2>&1 || { log "seed: drawdown did not catch up"; cat "$DIR/wait-idle.log"; exit 1; }
printf 'cus-1\t{"type":"void_usage","customer_id":"cus-1","event_id":"cus-1-call-1"}\n' | produce "$DRAWDOWN__TOPICS__GRANTS"
"$LOADGEN" wait-idle --timeout 120 > "$DIR/wait-idle.log" 2>&1 || { log "seed: drawdown did not catch up"; cat "$DIR/wait-idle.log"; exit 1; }
deadline=$(( $(date +%s) + 60 ))
until state="$(curl_api GET /v1/customers/cus-1/state)" && [[ "$(cat "$DIR/status")" == 200 ]] \
    && [[ "$(jq '.meters | length' <<< "$state")" == 3 ]] \
    && [[ "$(curl_api GET /v1/customers/cus-2/state > /dev/null; cat "$DIR/status")" == 200 ]]; do
    (( $(date +%s) < deadline )) || { log "seed: GET /v1/customers/cus-1/state: $(cat "$DIR/status") $state"; exit 1; }
    sleep 0.5
done
log "seeded: $(jq -c '[.meters[] | {meter, balance, consumed, overage, blocked, voided, status}]' <<< "$state")"

# ---- portal sessions: cus-1 (the fuzzing), a second one about to expire (the auth matrix).
session="$(curl_api POST /v1/portal-sessions '{"customer_id":"cus-1","ttl":"2h"}')"
[[ "$(cat "$DIR/status")" == 201 ]] || { log "POST /v1/portal-sessions: $(cat "$DIR/status") $session"; exit 1; }
PORTAL_TOKEN="$(jq -r .token <<< "$session")"
expiring="$(curl_api POST /v1/portal-sessions '{"customer_id":"cus-1","ttl":1}')"
EXPIRED_TOKEN="$(jq -r .token <<< "$expiring")"
current="$(curl -fsS -H "Authorization: Bearer $PORTAL_TOKEN" "$URL/v1/portal-sessions/current")"
METERS="$(jq -c '[.meters[].meter]' <<< "$current")"
PACKS="$(jq -c '[.meters[].top_up_packs[]] | unique' <<< "$current")"
export API_FUZZ_KEY="$API_KEY" API_FUZZ_PORTAL_TOKEN="$PORTAL_TOKEN"

# st_config FILE CUSTOMERS AUTH: a schemathesis.toml (credentials from the environment).
st_config() {
    cat > "$1" <<TOML
color = false
# One worker: with two, Python 3.11's ast (hypothesis describing a lambda while another thread
# parses) fails at random with "AST constructor recursion depth mismatch" (CPython gh-106905).
workers = 1
request-timeout = 5

[cache]
enabled = false

[generation]
max-examples = $EXAMPLES
database = "none"

[dictionaries.customers]
values = $2
[dictionaries.meters]
values = $METERS
[dictionaries.packs]
values = $PACKS

[parameters]
"path.id" = { dictionary = "customers", probability = 0.5 }
"path.meter" = { dictionary = "meters", probability = 0.5 }
"body.customer_id" = { dictionary = "customers", probability = 0.5 }
"body.checks[*].customer_id" = { dictionary = "customers", probability = 0.5 }
"body.checks[*].meter" = { dictionary = "meters", probability = 0.5 }
"body.pack" = { dictionary = "packs", probability = 0.5 }

[auth]
auto-signup = false
$3
TOML
}
st_config "$DIR/st-api-key.toml" '["cus-1", "cus-2"]' '[auth.openapi.apiKey]
bearer = "${API_FUZZ_KEY}"
[auth.openapi.portalToken]
bearer = "${API_FUZZ_PORTAL_TOKEN}"'
st_config "$DIR/st-portal.toml" '["cus-1"]' '[auth.openapi.portalToken]
bearer = "${API_FUZZ_PORTAL_TOKEN}"'

failed=()
# st_run NAME ARGS...: schemathesis in $DIR (so nothing is written into the clone).
st_run() {
    local name=$1 rc=0
    shift
    log "schemathesis: $name ($EXAMPLES examples per operation and phase)"
    (cd "$DIR" && "$ST" --config-file "st-$name.toml" run openapi.json --url "$URL" --checks "$CHECKS" \
        --report junit --report-junit-path "junit-$name.xml" ${API_FUZZ_SEED:+--seed "$API_FUZZ_SEED"} "$@") 2>&1 | tee "$DIR/st-$name.log" || rc=$?
    (( rc == 0 )) || failed+=("schemathesis-$name")
    local cases
    cases="$(sed -n '/^Test cases:/{n;s/^ *//;p}' "$DIR/st-$name.log" | tail -1)"
    ST_SUMMARY+=("$name: $cases; $(grep '^Seed:' "$DIR/st-$name.log" | tail -1)")
    ST_CASES+=("${cases%% generated*}")
}
ST_SUMMARY=()
ST_CASES=()
st_run api-key
st_run portal --include-path-regex '^/v1/(customers/|portal-sessions/current$)'

# ---- the auth matrix, from the document's `security`.
log "auth matrix"
matrix_rc=0
URL="$URL" SPEC="$DIR/openapi.json" API_KEY="$API_KEY" PORTAL_TOKEN="$PORTAL_TOKEN" \
EXPIRED_TOKEN="$EXPIRED_TOKEN" PACK="$(jq -r '.[0]' <<< "$PACKS")" \
    "$PY" - > "$DIR/auth-matrix.log" 2>&1 <<'PY' || matrix_rc=$?
import json, os, sys, requests

spec = json.load(open(os.environ["SPEC"]))
base, key, token = os.environ["URL"], os.environ["API_KEY"], os.environ["PORTAL_TOKEN"]
sig = token.rsplit(".", 1)
tampered = sig[0] + "." + ("A" if sig[1][0] != "A" else "B") + sig[1][1:]
expired = os.environ["EXPIRED_TOKEN"]
OWN, OTHER, UNKNOWN, METER = "cus-1", "cus-2", "cus-api-fuzz-unknown", "api_calls"
bodies = {
    "/v1/portal-sessions": {"customer_id": OWN},
    "/v1/checks": {"checks": [{"customer_id": OWN, "meter": METER, "units": "1"}]},
    "/v1/customers/{id}/meters/{meter}/top-ups": {"pack": os.environ["PACK"]},
}
queries = {"/v1/customers/{id}/meters/{meter}/check": {"units": "1"}}
runs = failures = 0
for path, item in spec["paths"].items():
    for method, op in item.items():
        if method not in ("get", "post", "put", "patch", "delete"):
            continue
        security = op.get("security", spec.get("security", []))
        schemes = {name for req in security for name in req}
        documented = set(op["responses"])
        cases = []  # (what, Authorization, customer, expected: a status or "accepted")
        if not security or {} in security:
            cases.append(("no credentials", None, OWN, "accepted"))
        else:
            cases += [
                ("no credentials", None, OWN, 401),
                ("an unknown API key", "Bearer dd_not-a-key", OWN, 401),
                ("a non-Bearer scheme", "Basic YTpi", OWN, 401),
                ("a tampered portal token", "Bearer " + tampered, OWN, 401),
                ("an expired portal token", "Bearer " + expired, OWN, 401),
                ("the API key", "Bearer " + key, OWN, "accepted" if "apiKey" in schemes else 403),
                ("a portal token", "Bearer " + token, OWN, "accepted" if "portalToken" in schemes else 403),
            ]
            if "{id}" in path:
                cases += [
                    ("a portal token for another customer", "Bearer " + token, OTHER, 403),
                    ("a portal token for an unknown customer", "Bearer " + token, UNKNOWN, 403),
                ]
        for what, auth, customer, expected in cases:
            url = base + path.replace("{id}", customer).replace("{meter}", METER).replace("{asset}", "app.js")
            headers = {"Authorization": auth} if auth else {}
            r = requests.request(method.upper(), url, headers=headers, params=queries.get(path),
                                 json=bodies.get(path), timeout=5)
            runs += 1
            problems = []
            if expected == "accepted":
                if r.status_code in (401, 403) or r.status_code >= 500:
                    problems.append(f"expected to be accepted, got {r.status_code}")
            elif r.status_code != expected:
                problems.append(f"expected {expected}, got {r.status_code}")
            if str(r.status_code) not in documented:
                problems.append(f"{r.status_code} is not documented for {method.upper()} {path}")
            if r.status_code == 401:
                challenge = r.headers.get("WWW-Authenticate", "")
                want = 'Bearer realm="drawdown"' + (', error="invalid_token"' if auth else "")
                if challenge != want:
                    problems.append(f"WWW-Authenticate {challenge!r}, expected {want!r}")
            if r.status_code in (401, 403):
                try:
                    code = r.json()["error"]["code"]
                except Exception:
                    code = None
                if code != {401: "unauthorized", 403: "forbidden"}[r.status_code]:
                    problems.append(f"error body {r.text[:200]!r}")
                if customer != OWN and customer in r.text:
                    problems.append(f"the error names the customer: {r.text[:200]!r}")
            if problems:
                failures += 1
                cred = f"-H 'Authorization: {auth[:12]}...' " if auth else ""
                data = f"-d '{json.dumps(bodies[path])}' " if path in bodies else ""
                print(f"FAIL {method.upper()} {path} with {what}: {'; '.join(problems)}\n"
                      f"     curl -X {method.upper()} {cred}{data}'{r.url}'\n"
                      f"     -> {r.status_code} {r.text[:300]}")
print(f"auth matrix: {runs} requests, {failures} failed")
sys.exit(1 if failures else 0)
PY
cat "$DIR/auth-matrix.log"
(( matrix_rc == 0 )) || failed+=("auth-matrix")
MATRIX_REQUESTS="$(sed -n 's/^auth matrix: \([0-9]*\) requests.*/\1/p' "$DIR/auth-matrix.log")"

if ! kill -0 "${INSTANCE_PIDS[0]}" 2>/dev/null; then
    log "drawdown exited during the run:"
    tail -30 "$DIR/instance-0.log"
    failed+=("drawdown-exited")
fi
if grep -q "panicked" "$DIR/instance-0.log"; then
    log "drawdown panicked:"
    grep -A5 "panicked" "$DIR/instance-0.log" | head -30
    failed+=("drawdown-panic")
fi

# What the requests reached: responses by route and status, from drawdown's own counters.
log "responses by route and status (drawdown_http_requests_total):"
curl -fsS "$URL/metrics" | awk '/^drawdown_http_requests_total\{/ {
        r = $0; sub(/.*route="/, "", r); sub(/".*/, "", r)
        s = $0; sub(/.*status="/, "", s); sub(/".*/, "", s)
        if ($NF + 0 > 0) by[r] = by[r] " " s "=" $NF
    } END { for (r in by) printf "    %-45s%s\n", r, by[r] }' | sort || true
for s in "${ST_SUMMARY[@]}"; do log "$s"; done
figures="examples=$EXAMPLES operations=$(jq '[.paths[] | keys[]] | length' "$DIR/openapi.json")"
figures+=" cases=$(IFS=+; echo "${ST_CASES[*]}") auth-matrix=${MATRIX_REQUESTS:-0}"
figures+=" schemathesis=$ST_VERSION elapsed=$(( $(date +%s) - started ))s"
if (( ${#failed[@]} )); then
    log "FAILED (${failed[*]}) $figures"
    exit 1
fi
log "OK $figures"
