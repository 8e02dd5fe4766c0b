#!/usr/bin/env bash
# `make demo-stop-test`: `scripts/demo.sh` (what `make run` runs) stops drawdown and the load
# generator when it is stopped, and leaves the broker running. Three ways, as a supervisor, a
# service manager and a terminal stop it: SIGINT to its pid, SIGTERM to its pid, SIGINT to its
# whole process group (Ctrl-C). Each time every process the demo started must be gone within
# 30 s, the demo must say how to stop the broker, and the broker must still answer.
# Uses the demo's config (config/drawdown.toml: API on 127.0.0.1:8080, the default topics).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/drawdown/target}"
[[ -x "$CARGO_TARGET_DIR/debug/drawdown" && -x "$CARGO_TARGET_DIR/debug/drawdown-loadgen" ]] \
    || cargo build --bins
deploy/kafka/kafka.sh status >/dev/null 2>&1 || deploy/kafka/kafka.sh start

# Every descendant of $1.
descendants() {
    local kid
    for kid in $(pgrep -P "$1" || true); do
        echo "$kid"
        descendants "$kid"
    done
}

fail() { echo "demo-stop-test: FAILED: $*"; exit 1; }

LOG="$(mktemp /tmp/drawdown-demo-stop.XXXXXX)"
trap 'rm -f "$LOG"' EXIT
for how in "INT pid" "TERM pid" "INT group"; do
    read -r sig target <<<"$how"
    # Its own process group (so the group signal reaches only the demo). Started as a
    # background job of this non-interactive shell, it begins with SIGINT ignored; the demo
    # resets that itself (it used to ignore SIGINT when started so).
    setsid scripts/demo.sh > "$LOG" 2>&1 &
    demo=$!
    # Running: the banner is out and the generator produces usage.
    for _ in $(seq 1 240); do
        grep -q "drawdown is running" "$LOG" && pgrep -f "drawdown-loadgen .*--phase mixed" >/dev/null && break
        kill -0 "$demo" 2>/dev/null || { cat "$LOG"; fail "the demo exited on its own"; }
        sleep 0.5
    done
    pgrep -f "drawdown-loadgen .*--phase mixed" >/dev/null || { cat "$LOG"; fail "the generator never started"; }
    started=$(descendants "$demo" | sort -u)
    if [[ "$target" == group ]]; then
        kill -"$sig" -- "-$demo"
    else
        kill -"$sig" "$demo"
    fi
    for _ in $(seq 1 60); do
        left=""
        for p in $demo $started; do
            kill -0 "$p" 2>/dev/null && left="$left $p"
        done
        [[ -z "$left" ]] && break
        sleep 0.5
    done
    if [[ -n "$left" ]]; then
        ps -o pid,cmd -p "${left// /,}" || true
        kill -KILL $left 2>/dev/null || true
        fail "SIG$sig to the demo's $target left processes running:$left"
    fi
    grep -q "make kafka-stop" "$LOG" || { cat "$LOG"; fail "the demo did not say how to stop the broker"; }
    deploy/kafka/kafka.sh status >/dev/null 2>&1 || fail "the broker stopped with the demo"
    echo "demo-stop-test: SIG$sig to the $target: drawdown and the generator stopped ($(wc -w <<<"$started") processes), the broker runs on"
done
echo "demo-stop-test: ok"
