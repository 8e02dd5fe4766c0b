# drawdown: build, run, test. Builds go to a target dir outside the clone (reused by CI and
# later sessions on the same machine); the Kafka jars are cached outside it too.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/drawdown/target
KAFKA := deploy/kafka/kafka.sh
BIN := $(CARGO_TARGET_DIR)/debug/drawdown
LOADGEN := $(CARGO_TARGET_DIR)/debug/drawdown-loadgen

.PHONY: fuzz fuzz-smoke soak setup reservation-kill-test demo-stop-test bench-check handover-test bench-e2e bench-latency bounded-state browser-test api-fuzz ops-check promql-check multi-instance-test restore-bench all build run test test-unit kafka-start kafka-stop kafka-reset crash-test throughput lint fmt bench clean-data

all: build

## The workspace's binaries: drawdown and drawdown-loadgen (the root's default-members).
build:
	cargo build --bins

## Installs what a fresh machine lacks (Debian packages as root, the Kafka jars); idempotent.
setup:
	scripts/setup.sh

kafka-start:
	$(KAFKA) start

kafka-stop:
	$(KAFKA) stop

kafka-reset:
	$(KAFKA) reset

## The whole pipeline on the local broker with the example meters and the load generator.
run: setup build kafka-start
	scripts/demo.sh

## The demo stops drawdown and the generator on SIGINT / SIGTERM / Ctrl-C; the broker runs on.
demo-stop-test: build kafka-start
	scripts/demo-stop-test.sh

## Every test: unit, property and the integration tests against the real broker.
test: setup kafka-start
	cargo test --lib --bins --tests -- --test-threads=4

test-unit:
	cargo test --lib

## 200k events over 1,000 customers x 3 meters, the processor SIGKILLed >= 10 times.
crash-test: build kafka-start
	scripts/crash-test.sh

## Three instances, 16 partitions, SIGKILL / join / SIGTERM, a 20 s broker outage, exact check.
multi-instance-test: build kafka-start
	scripts/multi-instance-test.sh

## Two instances; one frozen (SIGSTOP) inside a transaction past its session, then thawed: the
## new owner must take over from exactly the committed state. Exact check.
handover-test: build kafka-start
	scripts/handover-test.sh

## A reservation survives kill -9 (local state kept, then wiped and restored from the changelog)
## and is settled exactly once.
reservation-kill-test: build kafka-start
	scripts/reservation-kill-test.sh

RELEASE := $(CARGO_TARGET_DIR)/release

## End to end on one fixed input (1M usage events + grants, 10k customers, 8 partitions), with
## fresh groups: an exactly-once pass-through, drawdown with 1 thread, drawdown with the default
## threads. Release build. Figures also in $(CARGO_TARGET_DIR)/bench-e2e.json.
bench-e2e: kafka-start
	cargo build --release --bins
	$(RELEASE)/drawdown-loadgen bench e2e --save $(CARGO_TARGET_DIR)/bench-e2e.json

## Produce -> committed balance-changed / balance-exhausted, p50/p99/max, at RATE records/s
## (default: half of the last bench-e2e's peak).
bench-latency: kafka-start
	cargo build --release --bins
	$(RELEASE)/drawdown-loadgen bench latency $(if $(RATE),--rate $(RATE),--rate-from $(CARGO_TARGET_DIR)/bench-e2e.json)

## The entitlement check under wrk: requests/s and latency percentiles against one instance.
bench-check: kafka-start
	cargo build --release --bins
	scripts/bench-check.sh

## 30 min on 2 instances at half of the peak: a SIGKILL every 3 min, a 20 s broker outage; RSS,
## open files, RocksDB and changelog sampled every 10 s into docs/soak.png, plateaus required,
## the exact verify at the end. Release build (PROFILE=debug: the dev build). Not in CI.
soak: kafka-start
	cargo build $(if $(filter debug,$(PROFILE)),,--release) --bins
	scripts/soak.sh

## 10 min at load with a 60 s dedupe window: RocksDB, changelog and memory must plateau.
bounded-state: build kafka-start
	scripts/bounded-state.sh

## Restore speed for a partition holding 100k projections.
restore-bench: build kafka-start
	scripts/restore-bench.sh

## 1M events end to end (generator -> broker -> drawdown -> outputs committed).
throughput: build kafka-start
	scripts/throughput.sh

## The customer portal in headless Chromium (Debian `chromium`, playwright-core from npm) against
## drawdown and the broker: meters, live usage, "Top up" -> TopUpRequested. Screenshots in
## $(CARGO_TARGET_DIR)/browser-test.
browser-test: build kafka-start
	scripts/browser-test.sh

## schemathesis (pip, in a venv in ~/.cache/drawdown) against one drawdown with API keys and portal
## tokens, seeded through kcat: no 5xx, no hang (5 s), docs/openapi.json's schemas, status codes
## and content types, and 401 / 403 exactly where its `security` says. API_FUZZ_EXAMPLES per
## operation and phase (default 600, ~10 min; CI: 15).
api-fuzz: build kafka-start
	scripts/api-fuzz.sh

## Alert rules, their unit tests and the Prometheus config (Debian package `prometheus`).
ops-check:
	promtool check rules deploy/prometheus/alerts.yml
	promtool test rules deploy/prometheus/alerts_test.yml
	promtool check config deploy/prometheus/prometheus.yml

## Prometheus scraping drawdown under load: every dashboard and alert query evaluated (~1 min).
promql-check: build kafka-start
	scripts/promql-check.sh

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy -p drawdown --lib --no-default-features -- -D warnings

fmt:
	cargo fmt

## cargo fuzz (fuzz/: decoders, portal tokens, history cursor, config, a ledger driver), each
## target FUZZ_SECONDS (default 600) on its corpus; fails on any crash. Stable Rust (see the
## script). fuzz-smoke: 30 s each, in CI.
fuzz:
	scripts/fuzz.sh

fuzz-smoke:
	FUZZ_SECONDS=30 scripts/fuzz.sh

## Criterion: the rules alone, and the whole pure commit cycle (decode, fold, encode, state writes).
bench:
	cargo bench --bench ledger --bench fold

clean-data:
	rm -rf data
