//! Every metric drawdown exports, with its description and unit, in one place.
//!
//! Names follow `drawdown_<subsystem>_<thing>_<unit|total>`. Labels are bounded: topics,
//! reasons, kinds and partitions, never a customer id.

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
/// Input records found in a partition other than murmur2(customer) says.
pub const RECORDS_MISROUTED: &str = "drawdown_records_misrouted_total";
/// Output records produced (committed), by `topic`.
pub const OUTPUTS_PRODUCED: &str = "drawdown_outputs_produced_total";
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
/// Pipeline restarts after an error, by `reason`.
pub const PIPELINE_RESTARTS: &str = "drawdown_pipeline_restarts_total";
/// Whether the instance is ready (restored, consuming): 1 or 0.
pub const READY: &str = "drawdown_ready";
/// Estimated live data in RocksDB.
pub const STORE_LIVE_BYTES: &str = "drawdown_store_live_data_bytes";
/// HTTP requests, by `route` and `status`.
pub const HTTP_REQUESTS: &str = "drawdown_http_requests_total";
/// HTTP request latency, by `route`.
pub const HTTP_SECONDS: &str = "drawdown_http_request_duration_seconds";

/// Installs the Prometheus recorder and describes every metric. Call once per process.
pub fn install() -> PrometheusHandle {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(BATCH_RECORDS.into()),
                &[1.0, 10.0, 100.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 50000.0],
            )
        })
        .expect("valid buckets")
        .install_recorder()
        .expect("metrics recorder installed once");
    describe();
    handle
}

fn describe() {
    describe_counter!(RECORDS_CONSUMED, Unit::Count, "Input records read, by topic.");
    describe_counter!(RECORDS_APPLIED, Unit::Count, "Input records that changed state, by topic.");
    describe_counter!(RECORDS_DUPLICATE, Unit::Count, "Input records whose id was seen before (ignored), by topic.");
    describe_counter!(RECORDS_UNMETERED, Unit::Count, "Usage events that match no configured meter (skipped).");
    describe_counter!(RECORDS_REJECTED, Unit::Count, "Input records sent to the dead-letter topic, by reason and stage.");
    describe_counter!(RECORDS_MISROUTED, Unit::Count, "Input records in a partition other than murmur2(customer_id) gives.");
    describe_counter!(OUTPUTS_PRODUCED, Unit::Count, "Output records committed, by topic.");
    describe_counter!(TRANSITIONS, Unit::Count, "Balance transitions emitted, by kind.");
    describe_counter!(TXN_COMMITTED, Unit::Count, "Kafka transactions committed.");
    describe_counter!(TXN_ABORTED, Unit::Count, "Kafka transactions aborted or failed, by reason.");
    describe_histogram!(TXN_COMMIT_SECONDS, Unit::Seconds, "Time from begin_transaction to a committed transaction.");
    describe_histogram!(BATCH_RECORDS, Unit::Count, "Input records per committed batch.");
    describe_histogram!(E2E_LATENCY_SECONDS, Unit::Seconds, "From an input record's timestamp to the commit of its outputs.");
    describe_gauge!(PARTITIONS_OWNED, Unit::Count, "Input partitions owned by this instance.");
    describe_counter!(REBALANCES, Unit::Count, "Rebalance events, by kind.");
    describe_counter!(RESTORE_RECORDS, Unit::Count, "Changelog records applied while restoring state.");
    describe_gauge!(RESTORING_PARTITIONS, Unit::Count, "Partitions whose state is being restored.");
    describe_counter!(PIPELINE_RESTARTS, Unit::Count, "Pipeline restarts after an error, by reason.");
    describe_gauge!(READY, Unit::Count, "1 when the instance is restored and consuming, else 0.");
    describe_gauge!(STORE_LIVE_BYTES, Unit::Bytes, "Estimated live data in RocksDB.");
    describe_counter!(HTTP_REQUESTS, Unit::Count, "HTTP requests, by route and status.");
    describe_histogram!(HTTP_SECONDS, Unit::Seconds, "HTTP request latency, by route.");
}
