//! Every metric drawdown exports, with its description and unit, in one place.
//!
//! Names follow `drawdown_<subsystem>_<thing>_<unit|total>`. Labels are bounded: topics (by
//! role: `usage`, `grants`, `balance_changed`, ...), reasons, kinds, stages, routes, statuses and
//! partitions, never a customer id.
//!
//! A counter or histogram is only exported once it has been touched, so [`install`] registers
//! every series whose labels are known in advance at zero: a dashboard then shows 0 rather than
//! "no data", `rate()` sees the first increment, and `tests/ops.rs` can check that every metric
//! the dashboard and the alert rules query exists from the start.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Input records read, by `topic`.
pub const RECORDS_CONSUMED: &str = "drawdown_records_consumed_total";
/// Input records that changed state, by `topic`.
pub const RECORDS_APPLIED: &str = "drawdown_records_applied_total";
/// Input records whose id was seen before, by `topic`.
pub const RECORDS_DUPLICATE: &str = "drawdown_records_duplicate_total";
/// Usage events that match no meter.
pub const RECORDS_UNMETERED: &str = "drawdown_records_unmetered_total";
/// Input records sent to the dead-letter topic, by `reason` and `stage`.
pub const RECORDS_REJECTED: &str = "drawdown_records_rejected_total";
/// Input records without a key or in a partition other than murmur2(customer) says (each also
/// dead-lettered as `misrouted`).
pub const RECORDS_MISROUTED: &str = "drawdown_records_misrouted_total";
/// Input records later than `pipeline.grace` behind their partition's newest event time,
/// applied at stream time.
pub const RECORDS_LATE: &str = "drawdown_records_late_total";
/// Input records folded after waiting `pipeline.max_idle` for the other input topic's
/// partition, without knowing that it had nothing earlier (their order depends on timing).
pub const RECORDS_UNORDERED: &str = "drawdown_records_unordered_total";
/// Input records held back for the other input topic's partition (folded in a later batch).
pub const RECORDS_HELD: &str = "drawdown_records_held";
/// Input topic-partitions paused because the merge held `pipeline.max_batch` of their records
/// (backpressure while the other input topic's partition is fetched).
pub const INPUT_THROTTLED: &str = "drawdown_input_throttled_total";
/// Output records produced (committed), by `topic`.
pub const OUTPUTS_PRODUCED: &str = "drawdown_outputs_produced_total";
/// Top-up requests published, by `source` (`auto`: in the pipeline's transaction; `portal`,
/// `api`: through the HTTP API).
pub const TOP_UP_REQUESTS: &str = "drawdown_top_up_requests_total";
/// Transitions emitted, by `kind`.
pub const TRANSITIONS: &str = "drawdown_transitions_total";
/// Transactions committed.
pub const TXN_COMMITTED: &str = "drawdown_transactions_committed_total";
/// Transactions aborted or failed, by `reason`.
pub const TXN_ABORTED: &str = "drawdown_transactions_aborted_total";
/// Time from begin to commit of a transaction.
pub const TXN_COMMIT_SECONDS: &str = "drawdown_transaction_commit_seconds";
/// Input records per committed batch.
pub const BATCH_RECORDS: &str = "drawdown_batch_records";
/// From the input record's timestamp to its outputs' commit.
pub const E2E_LATENCY_SECONDS: &str = "drawdown_end_to_end_latency_seconds";
/// Partitions owned by this instance.
pub const PARTITIONS_OWNED: &str = "drawdown_partitions_owned";
/// Rebalance events, by `kind` (assign | revoke).
pub const REBALANCES: &str = "drawdown_rebalances_total";
/// Changelog records applied while restoring.
pub const RESTORE_RECORDS: &str = "drawdown_restore_records_total";
/// Partitions currently restoring.
pub const RESTORING_PARTITIONS: &str = "drawdown_restore_partitions_in_progress";
/// Changelog records left to replay by the restores in progress.
pub const RESTORE_REMAINING: &str = "drawdown_restore_remaining_records";
/// Broker connection failures seen by the pipeline's clients.
pub const BROKER_ERRORS: &str = "drawdown_broker_errors_total";
/// Pipeline restarts after an error, by `reason`.
pub const PIPELINE_RESTARTS: &str = "drawdown_pipeline_restarts_total";
/// Whether the instance is ready (restored, consuming): 1 or 0.
pub const READY: &str = "drawdown_ready";
/// Estimated live data in RocksDB.
pub const STORE_LIVE_BYTES: &str = "drawdown_store_live_data_bytes";
/// Records of the group not yet committed, by input `topic` (role) and `partition`.
pub const CONSUMER_LAG: &str = "drawdown_consumer_lag_records";
/// Failed attempts to measure the consumer lag.
pub const CONSUMER_LAG_ERRORS: &str = "drawdown_consumer_lag_errors_total";
/// (customer, meter) projections in the partitions this instance owns.
pub const STORE_METERS: &str = "drawdown_store_meters";
/// Distinct customers with at least one meter in the partitions this instance owns.
pub const STORE_CUSTOMERS: &str = "drawdown_store_customers";
/// RocksDB's estimate of its keys (every kind: meters, event ids, grants, history).
pub const STORE_KEYS: &str = "drawdown_store_estimated_keys";
/// Size of the RocksDB SST files.
pub const STORE_SST_BYTES: &str = "drawdown_store_sst_files_size_bytes";
/// RocksDB's estimate of the SST bytes of each kind of state key, by `kind`.
pub const STORE_KIND_BYTES: &str = "drawdown_store_kind_bytes";
/// Size of the RocksDB memtables.
pub const STORE_MEMTABLE_BYTES: &str = "drawdown_store_memtable_size_bytes";
/// Bytes held in the shared block cache (memtables are charged to it too).
pub const STORE_BLOCK_CACHE_USAGE: &str = "drawdown_store_block_cache_usage_bytes";
/// Capacity of the shared block cache.
pub const STORE_BLOCK_CACHE_CAPACITY: &str = "drawdown_store_block_cache_capacity_bytes";
/// Bytes RocksDB estimates compaction has to rewrite to settle.
pub const STORE_PENDING_COMPACTION: &str = "drawdown_store_pending_compaction_bytes";
/// Always 1, labelled with the `version`.
pub const BUILD_INFO: &str = "drawdown_build_info";
/// HTTP requests, by `route` and `status`.
pub const HTTP_REQUESTS: &str = "drawdown_http_requests_total";
/// HTTP request latency, by `route`.
pub const HTTP_SECONDS: &str = "drawdown_http_request_duration_seconds";

/// Installs the Prometheus recorder and describes every metric. Call once per process.
pub fn install() -> PrometheusHandle {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ],
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(BATCH_RECORDS.into()),
                &[
                    1.0, 10.0, 100.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 50000.0,
                ],
            )
        })
        .expect("valid buckets")
        .install_recorder()
        .expect("metrics recorder installed once");
    describe();
    zero_initialise();
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    handle
}

/// Topic labels of the input topics.
pub const INPUT_TOPICS: [&str; 2] = ["usage", "grants"];
/// Topic labels of the output topics.
pub const OUTPUT_TOPICS: [&str; 5] = [
    "balance_changed",
    "balance_exhausted",
    "dlq",
    "changelog",
    "top_up_requests",
];
/// `reason` labels of records rejected while decoding (`codec::CodecError::reason`).
pub const DECODE_REASONS: [&str; 11] = [
    "empty",
    "undecodable",
    "missing_field",
    "wrong_type",
    "key_mismatch",
    "misrouted",
    "timestamp_in_future",
    "invalid_id",
    "invalid_amount",
    "missing_property",
    "invalid_grant",
];
/// `reason` labels of records rejected by the credit rules (`ledger::LedgerError::reason`).
pub const APPLY_REASONS: [&str; 4] = [
    "unknown_meter",
    "invalid_grant",
    "void_unknown",
    "void_duplicate",
];

/// Registers, at zero, every series whose labels are known before any traffic. `increment(0)`
/// leaves a series that already counts alone, so calling this again is harmless.
fn zero_initialise() {
    use metrics::{counter, gauge, histogram};
    for topic in INPUT_TOPICS {
        for name in [RECORDS_CONSUMED, RECORDS_APPLIED, RECORDS_DUPLICATE] {
            counter!(name, "topic" => topic).increment(0);
        }
    }
    for (stage, reasons) in [
        ("decode", &DECODE_REASONS[..]),
        ("apply", &APPLY_REASONS[..]),
    ] {
        for reason in reasons {
            counter!(RECORDS_REJECTED, "reason" => *reason, "stage" => stage).increment(0);
        }
    }
    counter!(RECORDS_UNMETERED).increment(0);
    counter!(RECORDS_MISROUTED).increment(0);
    counter!(RECORDS_LATE).increment(0);
    counter!(RECORDS_UNORDERED).increment(0);
    counter!(INPUT_THROTTLED).increment(0);
    for topic in OUTPUT_TOPICS {
        counter!(OUTPUTS_PRODUCED, "topic" => topic).increment(0);
    }
    for kind in ["exhausted", "restored", "low"] {
        counter!(TRANSITIONS, "kind" => kind).increment(0);
    }
    for source in ["auto", "portal", "api"] {
        counter!(TOP_UP_REQUESTS, "source" => source).increment(0);
    }
    counter!(TXN_COMMITTED).increment(0);
    for reason in ["fenced", "error"] {
        counter!(TXN_ABORTED, "reason" => reason).increment(0);
    }
    for kind in ["assign", "revoke"] {
        counter!(REBALANCES, "kind" => kind).increment(0);
    }
    counter!(RESTORE_RECORDS).increment(0);
    for reason in ["fenced", "kafka", "store", "restore", "delivery"] {
        counter!(PIPELINE_RESTARTS, "reason" => reason).increment(0);
        counter!(BROKER_ERRORS).increment(0);
    }
    counter!(CONSUMER_LAG_ERRORS).increment(0);
    // Histograms are rendered (with zero counts) once registered.
    let _ = histogram!(TXN_COMMIT_SECONDS);
    let _ = histogram!(BATCH_RECORDS);
    let _ = histogram!(E2E_LATENCY_SECONDS);
    for name in [
        PARTITIONS_OWNED,
        RESTORING_PARTITIONS,
        RESTORE_REMAINING,
        READY,
        STORE_LIVE_BYTES,
        STORE_METERS,
        STORE_CUSTOMERS,
        STORE_KEYS,
        STORE_SST_BYTES,
        STORE_MEMTABLE_BYTES,
        STORE_BLOCK_CACHE_USAGE,
        STORE_BLOCK_CACHE_CAPACITY,
        STORE_PENDING_COMPACTION,
    ] {
        gauge!(name).increment(0.0);
    }
}

/// Registers the HTTP series of `routes` (status 200) at zero; see [`zero_initialise`].
pub fn zero_initialise_http(routes: &[&'static str]) {
    for route in routes {
        metrics::counter!(HTTP_REQUESTS, "route" => *route, "status" => "200").increment(0);
        let _ = metrics::histogram!(HTTP_SECONDS, "route" => *route);
    }
}

fn describe() {
    describe_counter!(
        RECORDS_CONSUMED,
        Unit::Count,
        "Input records read, by topic."
    );
    describe_counter!(
        RECORDS_APPLIED,
        Unit::Count,
        "Input records that changed state, by topic."
    );
    describe_counter!(
        RECORDS_DUPLICATE,
        Unit::Count,
        "Input records whose id was seen before (ignored), by topic."
    );
    describe_counter!(
        RECORDS_UNMETERED,
        Unit::Count,
        "Usage events that match no configured meter (skipped)."
    );
    describe_counter!(
        RECORDS_REJECTED,
        Unit::Count,
        "Input records sent to the dead-letter topic, by reason and stage."
    );
    describe_counter!(
        RECORDS_LATE,
        Unit::Count,
        "Input records later than pipeline.grace behind their partition's newest event time (applied at stream time)."
    );
    describe_counter!(
        RECORDS_UNORDERED,
        Unit::Count,
        "Input records folded after waiting pipeline.max_idle for the other input topic's partition (order not guaranteed)."
    );
    describe_counter!(
        INPUT_THROTTLED,
        Unit::Count,
        "Input topic-partitions paused because the merge held pipeline.max_batch of their records while waiting for the other input topic's partition (resumed at half)."
    );
    describe_gauge!(
        RECORDS_HELD,
        Unit::Count,
        "Input records polled and held so a partition's two input topics are folded in timestamp order."
    );
    describe_counter!(
        RECORDS_MISROUTED,
        Unit::Count,
        "Input records without a key or in a partition other than murmur2(customer_id) gives (dead-lettered, never applied)."
    );
    describe_counter!(
        OUTPUTS_PRODUCED,
        Unit::Count,
        "Output records committed, by topic."
    );
    describe_counter!(
        TRANSITIONS,
        Unit::Count,
        "Balance transitions emitted, by kind."
    );
    describe_counter!(
        TOP_UP_REQUESTS,
        Unit::Count,
        "Top-up requests published, by source (auto, portal, api)."
    );
    describe_counter!(TXN_COMMITTED, Unit::Count, "Kafka transactions committed.");
    describe_counter!(
        TXN_ABORTED,
        Unit::Count,
        "Kafka transactions aborted or failed, by reason."
    );
    describe_histogram!(
        TXN_COMMIT_SECONDS,
        Unit::Seconds,
        "Time from begin_transaction to a committed transaction."
    );
    describe_histogram!(
        BATCH_RECORDS,
        Unit::Count,
        "Input records per committed batch."
    );
    describe_histogram!(
        E2E_LATENCY_SECONDS,
        Unit::Seconds,
        "From an input record's timestamp to the commit of its outputs."
    );
    describe_gauge!(
        PARTITIONS_OWNED,
        Unit::Count,
        "Input partitions owned by this instance."
    );
    describe_counter!(REBALANCES, Unit::Count, "Rebalance events, by kind.");
    describe_counter!(
        RESTORE_RECORDS,
        Unit::Count,
        "Changelog records applied while restoring state."
    );
    describe_gauge!(
        RESTORING_PARTITIONS,
        Unit::Count,
        "Partitions whose state is being restored."
    );
    describe_gauge!(
        RESTORE_REMAINING,
        Unit::Count,
        "Changelog records left to replay by the restores in progress."
    );
    describe_counter!(
        PIPELINE_RESTARTS,
        Unit::Count,
        "Pipeline restarts after an error, by reason."
    );
    describe_counter!(
        BROKER_ERRORS,
        Unit::Count,
        "Broker connection failures seen by the pipeline's clients (librdkafka retries)."
    );
    describe_gauge!(
        READY,
        Unit::Count,
        "1 when the instance is restored and consuming, else 0."
    );
    describe_gauge!(
        STORE_LIVE_BYTES,
        Unit::Bytes,
        "Estimated live data in RocksDB."
    );
    describe_gauge!(CONSUMER_LAG, Unit::Count, "Input records not yet committed by the consumer group (high watermark - committed offset), by topic and partition; every instance reports every partition of the group, aggregate with max.");
    describe_counter!(CONSUMER_LAG_ERRORS, Unit::Count, "Failed attempts to read the group's committed offsets or the watermarks (the lag gauge keeps its last value).");
    describe_gauge!(STORE_METERS, Unit::Count, "(customer, meter) projections in the partitions this instance owns, counted by a key scan every 30 s.");
    describe_gauge!(STORE_CUSTOMERS, Unit::Count, "Distinct customers with at least one meter in the partitions this instance owns, counted by the same scan.");
    describe_gauge!(STORE_KEYS, Unit::Count, "RocksDB's estimate of its keys (rocksdb.estimate-num-keys): meters, remembered event ids, grants and history.");
    describe_gauge!(
        STORE_SST_BYTES,
        Unit::Bytes,
        "Size of all RocksDB SST files (rocksdb.total-sst-files-size)."
    );
    describe_gauge!(STORE_KIND_BYTES, Unit::Bytes, "RocksDB's estimate of the SST bytes of each kind of state key in the owned partitions, by kind (book, grant, event, delta, history, due, ...): which state grows. Data a compaction has yet to drop counts; memtables do not.");
    describe_gauge!(
        STORE_MEMTABLE_BYTES,
        Unit::Bytes,
        "Size of the RocksDB memtables (rocksdb.cur-size-all-mem-tables)."
    );
    describe_gauge!(STORE_BLOCK_CACHE_USAGE, Unit::Bytes, "Bytes held in the shared block cache, memtable reservations included (rocksdb.block-cache-usage).");
    describe_gauge!(
        STORE_BLOCK_CACHE_CAPACITY,
        Unit::Bytes,
        "Capacity of the shared block cache (rocksdb.block-cache-capacity)."
    );
    describe_gauge!(STORE_PENDING_COMPACTION, Unit::Bytes, "Bytes RocksDB estimates compaction must rewrite (rocksdb.estimate-pending-compaction-bytes).");
    describe_gauge!(
        BUILD_INFO,
        Unit::Count,
        "Always 1; the version label tells which build runs."
    );
    describe_counter!(
        HTTP_REQUESTS,
        Unit::Count,
        "HTTP requests, by route and status."
    );
    describe_histogram!(
        HTTP_SECONDS,
        Unit::Seconds,
        "HTTP request latency, by route."
    );
}
