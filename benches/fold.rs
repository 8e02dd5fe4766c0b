//! The whole pure commit cycle without I/O: decode -> fold -> encode -> state writes, for one
//! batch of 50,000 usage events over 10,000 customers (the example meters of
//! `config/drawdown.toml`). `cargo bench --bench fold` reports events/s on one core.

// The service's allocator (src/main.rs), so the figure is the service's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use drawdown::config::Config;
use drawdown::kafka::pipeline::fold::{Folder, InputRecord};
use drawdown::kafka::pipeline::stream_time::StreamTimes;
use drawdown::kafka::{partition_for, InputTopic};
use drawdown::ledger::{Book, CustomerId, Grant, GrantId, Input, Ledger, MeterName};
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

fn bench(c: &mut Criterion) {
    let cfg = Config::load(Some(std::path::Path::new("config/drawdown.toml")), [])
        .expect("config/drawdown.toml");
    let ledger = Ledger::new(cfg.meter_set().expect("meters"));
    let folder = Folder::new(ledger.clone(), &cfg, PARTITIONS);
    let events: Vec<(String, String)> = (0..EVENTS).map(event).collect();
    let records: Vec<InputRecord<'_>> = events
        .iter()
        .enumerate()
        .map(|(i, e)| record(i, e))
        .collect();
    // The books as the store would load them: every customer funded on every meter, and the
    // batch's event ids not seen before.
    let times = || StreamTimes::new(cfg.pipeline.grace, cfg.pipeline.max_future_skew);
    let wall = 1_767_225_600_000;
    let decoded = folder.decode(&records, &mut times(), wall);
    let books: Vec<Book> = decoded
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
        .collect();
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

criterion_group!(benches, bench);
criterion_main!(benches);
