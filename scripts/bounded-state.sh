#!/usr/bin/env bash
# `make bounded-state`: state stays bounded at load. drawdown runs with a short dedupe window
# (WINDOW, default 60s) while the generator sends usage at RATE events/s (default 20000) for
# DURATION seconds (default 600) over CUSTOMERS customers (default 10000, granted first). Every
# 10 s it samples RocksDB's size on disk, the SST bytes of the history and of every other kind of
# state (`drawdown_store_kind_bytes`), the changelog's size in the broker's log dirs, the resident
# memory and the store's key estimate, into samples.csv, then judges the plateau: the largest
# value of the last third of the run must be at most 1.25x the largest of the middle third.
#
# Judged: the state the dedupe window bounds (usage and reservation ids, deltas: `ids_bytes`),
# the changelog and the resident memory. The rest of RocksDB is bounded by the customers, not by
# the window, and fills as they use their meters: the books and grants (`customer_bytes`), and
# the movement history, which grows until every meter holds HISTORY_LEN movements (CUSTOMERS x
# METERS x HISTORY_LEN). So RocksDB's whole size is judged too only if the run writes at least
# twice that many movements (the default run does); else it is reported (at 1M customers the
# history is far from full after 10 minutes, and most books get their first usage during it).
# Prints the table and one summary line; exits non-zero on growth.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/drawdown/target}"
BIN="${BIN:-$CARGO_TARGET_DIR/debug/drawdown}"
LOADGEN="${LOADGEN:-$(dirname "$BIN")/drawdown-loadgen}"
WINDOW="${WINDOW:-60s}"
RATE="${RATE:-20000}"
DURATION="${DURATION:-600}"
CUSTOMERS="${CUSTOMERS:-10000}"
HISTORY_LEN="${DRAWDOWN__PIPELINE__HISTORY_LEN:-200}"
METERS="${METERS:-3}" # the generator's meters per customer
LOGS="${KAFKA_LOG_DIRS:-$HOME/.cache/drawdown/kafka-data/logs}"
RUN="bs-$(date +%s)-$$"
DIR="$(mktemp -d /tmp/drawdown-bs.XXXXXX)"
PORT=$(( 20000 + RANDOM % 20000 ))
source scripts/lib.sh
isolate_run "$RUN"
export DRAWDOWN__STORE__PATH="$DIR/state" DRAWDOWN__API__LISTEN="127.0.0.1:$PORT"
export DRAWDOWN__PIPELINE__DEDUPE_WINDOW="$WINDOW"
deploy/kafka/kafka.sh status > /dev/null 2>&1 || deploy/kafka/kafka.sh start
"$BIN" run > "$DIR/drawdown.log" 2>&1 &
DD=$!
GEN=""
trap 'kill $GEN 2>/dev/null || true; kill $DD 2>/dev/null || true; wait 2>/dev/null || true' EXIT
until curl -fs "http://127.0.0.1:$PORT/readyz" > /dev/null 2>&1; do
    kill -0 $DD 2>/dev/null || { tail -20 "$DIR/drawdown.log"; exit 1; }
    sleep 0.2
done
"$LOADGEN" produce --phase grants --customers "$CUSTOMERS" --prefix "$RUN" --events $(( RATE * DURATION )) > "$DIR/produce.log"
"$LOADGEN" produce --phase usage --customers "$CUSTOMERS" --prefix "$RUN" --events $(( RATE * DURATION )) \
    --rate "$RATE" --duplicates 0.01 >> "$DIR/produce.log" 2>&1 &
GEN=$!
echo "t_s,rocksdb_bytes,ids_bytes,customer_bytes,history_bytes,changelog_bytes,rss_bytes,store_keys" > "$DIR/samples.csv"
start=$(date +%s)
while kill -0 $GEN 2>/dev/null; do
    t=$(( $(date +%s) - start ))
    rocks=$(du -sb "$DIR/state" | cut -f1)
    changelog=$(du -scb "$LOGS/$RUN-changelog-"* 2>/dev/null | tail -1 | cut -f1)
    rss=$(( $(awk '/VmRSS/ {print $2}' "/proc/$DD/status") * 1024 ))
    metrics=$(curl -fs "http://127.0.0.1:$PORT/metrics" || true)
    keys=$(awk '/^drawdown_store_estimated_keys / {print $2}' <<< "$metrics")
    read -r ids customer history < <(awk '/^drawdown_store_kind_bytes\{/ {
        if ($1 ~ /kind="history/) h += $2; else if ($1 ~ /kind="(event|delta|reservation)"/) i += $2; else c += $2 }
        END {printf "%d %d %d\n", i, c, h}' <<< "$metrics")
    echo "$t,$rocks,$ids,$customer,$history,$changelog,$rss,${keys:-0}" | tee -a "$DIR/samples.csv"
    sleep 10
done
python3 - "$DIR/samples.csv" "$WINDOW" "$RATE" $(( RATE * DURATION )) $(( CUSTOMERS * METERS * HISTORY_LEN )) <<'PY'
import csv, sys
events, history_cap = int(sys.argv[4]), int(sys.argv[5])
history_full = events >= 2 * history_cap
rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(open(sys.argv[1]))]
n = len(rows)
if n < 9:
    sys.exit("bounded-state: too few samples")
mid, last = rows[n // 3: 2 * n // 3], rows[2 * n // 3:]
verdicts = []
for col in ("ids_bytes", "changelog_bytes", "rss_bytes", "rocksdb_bytes", "customer_bytes", "history_bytes"):
    a, b = max(r[col] for r in mid), max(r[col] for r in last)
    judged = col in ("ids_bytes", "changelog_bytes", "rss_bytes") or (col == "rocksdb_bytes" and history_full)
    verdicts.append((col if judged else col + "(reported)", a, b, b <= 1.25 * a or not judged))
ok = all(v[3] for v in verdicts)
if not history_full:
    print(f"bounded-state: the history is not full ({events} usage events against {history_cap} movements kept at most), so RocksDB's whole size is reported, not judged")
print("bounded-state: " + ("OK" if ok else "GROWING") + f" window={sys.argv[2]} rate={sys.argv[3]}/s samples={n} " +
      " ".join(f"{c}={a / 2**20:.0f}MiB->{b / 2**20:.0f}MiB" for c, a, b, _ in verdicts))
sys.exit(0 if ok else 1)
PY
