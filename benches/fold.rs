//! The whole pure commit cycle without I/O: decode -> fold -> encode -> state writes, for one
//! batch of 50,000 usage events over 10,000 customers (the example meters of
//! `config/drawdown.toml`). `cargo bench --bench fold` reports events/s on one core. The
//! `store` group then writes such commits' state into RocksDB (the local write after each
//! transaction).

// The service's allocator (src/main.rs), so the figure is the service's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use drawdown::config::Config;
use drawdown::kafka::pipeline::fold::{Decoded, Folder, InputRecord};
use drawdown::kafka::pipeline::stream_time::StreamTimes;
use drawdown::kafka::{partition_for, InputTopic};
use drawdown::ledger::{Book, CustomerId, Grant, GrantId, Input, Ledger, MeterName};
use drawdown::store::{StateWrite, Store};
use rust_decimal::Decimal;

const EVENTS: usize = 50_000;
const CUSTOMERS: usize = 10_000;
const PARTITIONS: i32 = 8;

/// The key and payload of usage event `i`.
fn event(i: usize) -> (String, String) {
    let customer = format!("cus-{}", i % CUSTOMERS);
    let payload = if i.is_multiple_of(2) {
        format!(
            r#"{{"id":"e{i}","customer_id":"{customer}","name":"api_call","timestamp":1767225600000}}"#
        )
    } else {
        format!(
            r#"{{"id":"e{i}","customer_id":"{customer}","name":"llm_completion","timestamp":1767225600000,"properties":{{"tokens":"12.5","model":"small"}}}}"#
        )
    };
    (customer, payload)
}

fn record(i: usize, (key, payload): &(String, String)) -> InputRecord<'_> {
    InputRecord {
        topic: InputTopic::Usage,
        partition: partition_for(key.as_bytes(), PARTITIONS),
        offset: i as i64,
        timestamp: Some(1_767_225_600_000),
        key: Some(key.as_bytes()),
        payload: Some(payload.as_bytes()),
        content_type: Some("application/json"),
    }
}

/// The books as the store would load them for `decoded`: every customer funded on every meter,
/// and the batch's usage ids not seen before.
fn funded_books(folder: &Folder, ledger: &Ledger, decoded: &Decoded) -> Vec<Book> {
    decoded
        .requests()
        .iter()
        .map(|r| {
            let mut book = Book::new(r.customer.clone());
            for (i, m) in folder.meters().iter().enumerate() {
                let g = Grant::top_up(
                    GrantId::parse(format!("g{i}")).unwrap(),
                    CustomerId::clone(r.customer),
                    MeterName::clone(m),
                    Decimal::from(1_000_000),
                );
                book.grants.insert(g.grant_id.clone(), None);
                ledger
                    .apply(&mut book, &Input::Grant(g), 0, &mut Vec::new())
                    .unwrap();
            }
            book.take_dirty();
            for e in &r.refs.events {
                book.events.insert(e.clone(), None);
            }
            book
        })
        .collect()
}

/// The example config, its ledger, and a folder over `PARTITIONS` partitions.
fn setup() -> (Config, Ledger, Folder) {
    let cfg = Config::load(Some(std::path::Path::new("config/drawdown.toml")), [])
        .expect("config/drawdown.toml");
    let ledger = Ledger::new(cfg.meter_set().expect("meters"));
    let folder = Folder::new(ledger.clone(), &cfg, PARTITIONS);
    (cfg, ledger, folder)
}

/// The input records of `events`, numbered from offset 0.
fn records(events: &[(String, String)]) -> Vec<InputRecord<'_>> {
    events
        .iter()
        .enumerate()
        .map(|(i, e)| record(i, e))
        .collect()
}

fn bench(c: &mut Criterion) {
    let (cfg, ledger, folder) = setup();
    let events: Vec<(String, String)> = (0..EVENTS).map(event).collect();
    let records = records(&events);
    let times = || StreamTimes::new(cfg.pipeline.grace, cfg.pipeline.max_future_skew);
    let wall = 1_767_225_600_000;
    let decoded = folder.decode(&records, &mut times(), wall);
    let books = funded_books(&folder, &ledger, &decoded);
    let mut g = c.benchmark_group("fold");
    g.throughput(Throughput::Elements(EVENTS as u64));
    g.sample_size(10);
    g.bench_function("decode_fold_encode_50k_events", |b| {
        b.iter_batched(
            || books.clone(),
            |books| {
                let mut times = times();
                let decoded = folder.decode(&records, &mut times, wall);
                let commit = folder.fold(&records, decoded, books, &Default::default(), &times);
                assert!(commit.outputs.len() >= EVENTS);
                commit
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

/// The local write of a commit's state (`Store::write_timed`) into real RocksDB in a temp dir:
/// `BATCHES` successive commits of the fold above (new usage ids each), so later commits land
/// on a memtable that earlier ones filled, and flushes run as in the service.
fn write(c: &mut Criterion) {
    const BATCHES: usize = 6;
    let (cfg, ledger, folder) = setup();
    let wall = 1_767_225_600_000;
    let commits: Vec<Vec<StateWrite>> = (0..BATCHES)
        .map(|b| {
            let events: Vec<(String, String)> = (b * EVENTS..(b + 1) * EVENTS).map(event).collect();
            let records = records(&events);
            let mut times = StreamTimes::new(cfg.pipeline.grace, cfg.pipeline.max_future_skew);
            let decoded = folder.decode(&records, &mut times, wall);
            let books = funded_books(&folder, &ledger, &decoded);
            folder
                .fold(&records, decoded, books, &Default::default(), &times)
                .state
        })
        .collect();
    let mut g = c.benchmark_group("store");
    g.throughput(Throughput::Elements((EVENTS * BATCHES) as u64));
    g.sample_size(10);
    g.bench_function("write_6_commits_of_50k_events", |b| {
        b.iter_batched(
            || {
                let dir = tempfile::tempdir().expect("a temp dir");
                let store = Store::open_path(
                    dir.path(),
                    cfg.store.block_cache_mb,
                    cfg.store.write_buffer_mb,
                    folder.layout(),
                )
                .expect("a store");
                (dir, store)
            },
            |(dir, store)| {
                for (i, state) in commits.iter().enumerate() {
                    let checkpoints = [(0, i as i64 + 1)];
                    store
                        .write_timed(state, &checkpoints, &Default::default())
                        .expect("written");
                }
                (dir, store)
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, bench, write);
criterion_main!(benches);
