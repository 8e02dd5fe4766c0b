# drawdown: build, run, test. Builds go to a target dir outside the clone (reused by CI and
# later sessions on the same machine); the Kafka jars are cached outside it too.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/drawdown/target
KAFKA := deploy/kafka/kafka.sh
BIN := $(CARGO_TARGET_DIR)/debug/drawdown
LOADGEN := $(CARGO_TARGET_DIR)/debug/drawdown-loadgen

.PHONY: browser-test ops-check promql-check multi-instance-test restore-bench all build run test test-unit kafka-start kafka-stop kafka-reset crash-test throughput lint fmt bench clean-data

all: build

## The workspace's binaries: drawdown and drawdown-loadgen (the root's default-members).
build:
	cargo build --bins

kafka-start:
	$(KAFKA) start

kafka-stop:
	$(KAFKA) stop

kafka-reset:
	$(KAFKA) reset

## The whole pipeline on the local broker with the example meters and the load generator.
run: build kafka-start
	scripts/demo.sh

## Every test: unit, property and the integration tests against the real broker.
test: kafka-start
	cargo test --lib --bins --tests -- --test-threads=4

test-unit:
	cargo test --lib

## 200k events over 1,000 customers x 3 meters, the processor SIGKILLed >= 10 times.
crash-test: build kafka-start
	scripts/crash-test.sh

## Three instances, 16 partitions, SIGKILL / join / SIGTERM, a 20 s broker outage, exact check.
multi-instance-test: build kafka-start
	scripts/multi-instance-test.sh

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

fmt:
	cargo fmt

## Criterion: the rules alone, and the whole pure commit cycle (decode, fold, encode, state writes).
bench:
	cargo bench --bench ledger --bench fold

clean-data:
	rm -rf data
