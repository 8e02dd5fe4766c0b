#!/usr/bin/env bash
# `make fuzz` / `make fuzz-smoke`: every cargo fuzz target (fuzz/, libFuzzer) for FUZZ_SECONDS
# each, one after the other, on its corpus; fails on any crash, panic, timeout or leak, and
# prints one summary line per target.
#
#   scripts/fuzz.sh [TARGET...]        (default: every target of fuzz/Cargo.toml)
#
# Env: FUZZ_SECONDS (per target, default 600), FUZZ_SANITIZER (cargo fuzz -s: none, the
# default, or address), FUZZ_TARGET_DIR (default ~/.cache/drawdown/fuzz-target),
# FUZZ_CORPUS_DIR (where each target's corpus grows, default ~/.cache/drawdown/fuzz-corpus),
# FUZZ_ARGS (more libFuzzer flags), BUILD_LOCK (a file to `flock` around the build, so builds
# sharing a machine take turns).
#
# Stable Rust: cargo fuzz passes nightly flags (-Z sanitizer, sancov passes); RUSTC_BOOTSTRAP=1
# lets the stable compiler take them. The build is the crate without its `service` feature: no
# RocksDB or librdkafka, about a minute from cold. Each target reads the committed seeds
# (fuzz/corpus/TARGET, never written) and its own grown corpus (FUZZ_CORPUS_DIR/TARGET, where
# new inputs go). A crash leaves its input in fuzz/artifacts/TARGET/ (ignored by git) and the
# command that replays it in the output.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH="${FUZZ_SECONDS:-600}"
SANITIZER="${FUZZ_SANITIZER:-none}"
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$HOME/.cache/drawdown/fuzz-target}"
CORPUS="${FUZZ_CORPUS_DIR:-$HOME/.cache/drawdown/fuzz-corpus}"
export RUSTC_BOOTSTRAP=1
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz from crates.io"
    cargo install cargo-fuzz --locked
fi

lock=()
[[ -n "${BUILD_LOCK:-}" ]] && lock=(flock "$BUILD_LOCK")

if (( $# )); then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)
fi

# Release with debug assertions (overflow checks) and coverage instrumentation. `cargo fuzz
# build` takes one target or all of them (one cargo call either way).
echo "fuzz: building ${targets[*]} (sanitizer: $SANITIZER) into $CARGO_TARGET_DIR"
mkdir -p "$CORPUS"
one=()
(( ${#targets[@]} == 1 )) && one=("${targets[0]}")
if ! "${lock[@]}" cargo fuzz build --fuzz-dir fuzz -s "$SANITIZER" "${one[@]}" \
        > "$CORPUS/build.log" 2>&1; then
    tail -40 "$CORPUS/build.log"
    echo "fuzz: build failed"
    exit 1
fi
triple=$(rustc -vV | sed -n 's/^host: //p')
bindir="$CARGO_TARGET_DIR/$triple/release"

failed=()
summary=()
for t in "${targets[@]}"; do
    bin="$bindir/$t"
    [[ -x "$bin" ]] || { echo "fuzz: $bin missing"; exit 1; }
    mkdir -p "$CORPUS/$t" "fuzz/artifacts/$t"
    log="$CORPUS/$t.log"
    echo "fuzz: $t for ${SECONDS_EACH}s (log: $log)"
    set +e
    # -timeout: one input running 10 s is a hang; -rss_limit_mb: 2 GiB is a leak.
    # shellcheck disable=SC2086
    "$bin" -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="fuzz/artifacts/$t/" ${FUZZ_ARGS:-} "$CORPUS/$t" "fuzz/corpus/$t" \
        > "$log" 2>&1
    rc=$?
    set -e
    # libFuzzer's last status line: "#N DONE cov: C ft: F corp: U/S exec/s: E rss: M".
    last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<< "$last")
    ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<< "$last")
    corp=$(sed -nE 's/.* corp: ([0-9]+\/[0-9]+[a-zA-Z]*).*/\1/p' <<< "$last")
    line="fuzz: $t: ${SECONDS_EACH}s, runs ${runs:-?}, ${speed:-?} exec/s, cov ${cov:-?}, features ${ft:-?}, corpus ${corp:-?}"
    if (( rc != 0 )); then
        artifact=$(sed -nE 's/.*Test unit written to (.*)$/\1/p' "$log" | tail -1)
        line="$line, FAILED (exit $rc${artifact:+, input $artifact})"
        failed+=("$t")
        grep -E -m1 -A12 "panicked at|ERROR: libFuzzer|==ERROR|SUMMARY" "$log" || tail -30 "$log"
        [[ -n "$artifact" ]] && echo "fuzz: replay with: $bin $artifact"
    fi
    echo "$line"
    summary+=("$line")
done

echo "fuzz: summary"
printf '%s\n' "${summary[@]}"
if (( ${#failed[@]} )); then
    echo "fuzz: FAILED: ${failed[*]}"
    exit 1
fi
echo "fuzz: ${#targets[@]} targets, no crash"
