//! The fold without I/O: routing, input order and event time.

use std::time::Duration;

use super::*;
use crate::ledger::Book;

const PARTITIONS: i32 = 8;

fn folder() -> Folder {
    let cfg = Config::load(Some(std::path::Path::new("config/drawdown.toml")), [])
        .expect("config/drawdown.toml");
    let ledger = Ledger::new(cfg.meter_set().expect("meters"));
    Folder::new(ledger, &cfg, PARTITIONS)
}

/// An owned input record (the fold borrows them).
struct Rec {
    topic: InputTopic,
    partition: i32,
    offset: i64,
    timestamp: i64,
    key: Option<String>,
    payload: String,
}

impl Rec {
    fn usage(customer: &str, id: &str, timestamp: i64) -> Self {
        Self {
            topic: InputTopic::Usage,
            partition: partition_for(customer.as_bytes(), PARTITIONS),
            offset: 0,
            timestamp,
            key: Some(customer.into()),
            payload: format!(
                r#"{{"id":"{id}","customer_id":"{customer}","name":"api_call","timestamp":{timestamp}}}"#
            ),
        }
    }

    fn grant(customer: &str, id: &str, amount: &str, timestamp: i64) -> Self {
        Self {
            topic: InputTopic::Grants,
            partition: partition_for(customer.as_bytes(), PARTITIONS),
            offset: 0,
            timestamp,
            key: Some(customer.into()),
            payload: format!(
                r#"{{"type":"grant","grant_id":"{id}","customer_id":"{customer}","meter":"api_calls","amount":"{amount}","effective_at":{timestamp}}}"#
            ),
        }
    }

    fn borrow(&self) -> InputRecord<'_> {
        InputRecord {
            topic: self.topic,
            partition: self.partition,
            offset: self.offset,
            timestamp: Some(self.timestamp),
            key: self.key.as_deref().map(str::as_bytes),
            payload: Some(self.payload.as_bytes()),
            content_type: Some("application/json"),
        }
    }
}

/// Numbers the records' offsets per (topic, partition) in the order given.
fn numbered(mut recs: Vec<Rec>) -> Vec<Rec> {
    let mut next: BTreeMap<(InputTopic, i32), i64> = BTreeMap::new();
    for r in &mut recs {
        let o = next.entry((r.topic, r.partition)).or_default();
        r.offset = *o;
        *o += 1;
    }
    recs
}

/// Stream times with a grace of 30 s and a future skew of 5 min.
fn times() -> StreamTimes {
    StreamTimes::new(Duration::from_secs(30), Duration::from_secs(300))
}

/// Folds `recs` as one batch over empty books, the wall clock at `now`.
fn fold(folder: &Folder, recs: &[Rec], now: i64) -> Commit {
    fold_with(folder, recs, now, &mut times())
}

/// Folds `recs` as one batch over empty books with `times`, the wall clock at `now`.
fn fold_with(folder: &Folder, recs: &[Rec], now: i64, times: &mut StreamTimes) -> Commit {
    let records: Vec<InputRecord<'_>> = recs.iter().map(Rec::borrow).collect();
    let decoded = folder.decode(&records, times, now);
    let books = decoded
        .requests()
        .iter()
        .map(|r| {
            // As the store loads them: the referenced ids, none seen before.
            let mut book = Book::new(r.customer.clone());
            for e in &r.refs.events {
                book.events.insert(e.clone(), None);
            }
            for g in &r.refs.grants {
                book.grants.insert(g.clone(), None);
            }
            book
        })
        .collect();
    folder.fold(&records, decoded, books, &BTreeMap::new(), times)
}

fn dlq_reasons(c: &Commit) -> Vec<String> {
    c.outputs
        .iter()
        .filter(|o| o.topic == OutputTopic::Dlq)
        .map(|o| {
            let (_, v) = o
                .headers
                .iter()
                .find(|(k, _)| *k == "error.reason")
                .unwrap();
            String::from_utf8(v.to_vec()).unwrap()
        })
        .collect()
}

fn changed(c: &Commit) -> usize {
    c.outputs
        .iter()
        .filter(|o| o.topic == OutputTopic::BalanceChanged)
        .count()
}

#[test]
fn a_record_without_a_key_is_dead_lettered_as_misrouted_and_never_applied() {
    let f = folder();
    let mut r = Rec::grant("alice", "g1", "10", 1_000);
    r.key = None;
    let mut empty = Rec::usage("alice", "e1", 1_000);
    empty.key = Some(String::new());
    let c = fold(&f, &numbered(vec![r, empty]), 2_000);
    assert_eq!(dlq_reasons(&c), ["misrouted", "misrouted"]);
    assert_eq!(changed(&c), 0);
    assert!(c.books.is_empty(), "no book was touched");
    assert_eq!(c.counts.misrouted, 2);
    let dlq = &c.outputs[0];
    let (_, message) = dlq
        .headers
        .iter()
        .find(|(k, _)| *k == "error.message")
        .unwrap();
    assert!(String::from_utf8_lossy(message).contains("no key"));
}

#[test]
fn a_record_in_another_partition_than_murmur2_gives_is_dead_lettered_as_misrouted() {
    let f = folder();
    let right = Rec::grant("alice", "g1", "10", 1_000);
    let mut wrong = Rec::usage("alice", "e1", 1_000);
    wrong.partition = (right.partition + 1) % PARTITIONS;
    let c = fold(&f, &numbered(vec![right, wrong]), 2_000);
    assert_eq!(dlq_reasons(&c), ["misrouted"]);
    assert_eq!(
        changed(&c),
        1,
        "only the grant, in its own partition, is applied"
    );
    assert_eq!(c.books.len(), 1);
    let (p, book) = &c.books[0];
    assert_eq!(*p, partition_for(b"alice", PARTITIONS));
    assert!(
        book.events.values().all(Option::is_none),
        "the usage was not applied"
    );
    let offsets: Vec<_> = c.offsets.keys().copied().collect();
    assert_eq!(
        offsets.len(),
        2,
        "both records are consumed (committed past)"
    );
}

const S: i64 = 1_000;

/// The book of `customer` in a commit.
fn book<'c>(c: &'c Commit, customer: &str) -> &'c Book {
    &c.books
        .iter()
        .find(|(_, b)| b.customer.as_str() == customer)
        .expect("a book")
        .1
}

#[test]
fn usage_from_before_an_expiry_is_applied_before_it_after_an_outage() {
    let f = folder();
    let mut g = Rec::grant("carol", "g1", "10", 100 * S);
    g.payload = g.payload.replace(
        r#""effective_at":100000"#,
        r#""effective_at":100000,"expires_at":1000000"#,
    );
    // Usage at 900 s, folded long after the grant expired (at 1000 s) by the wall clock.
    let recs = numbered(vec![
        g,
        Rec::usage("carol", "e1", 900 * S),
        Rec::usage("carol", "e2", 901 * S),
    ]);
    let c = fold(&f, &recs, 5_000 * S);
    let m = &book(&c, "carol").meters[&MeterName::parse("api_calls").unwrap()];
    assert_eq!(m.consumed, 2.into());
    assert_eq!(m.overage, 0.into(), "drawn from the grant valid at 900 s");
    assert_eq!(
        m.expired,
        0.into(),
        "stream time (871 s) is before the expiry"
    );
    assert_eq!(m.balance(), 8.into());
    assert_eq!(c.counts.late, 0);
    // In one batch: usage after the expiry applies after it (the remainder is forfeited first).
    let mut g = Rec::grant("cora", "g1", "10", 100 * S);
    g.payload = g.payload.replace(
        r#""effective_at":100000"#,
        r#""effective_at":100000,"expires_at":1000000"#,
    );
    let recs = numbered(vec![
        g,
        Rec::usage("cora", "e1", 900 * S),
        Rec::usage("cora", "e2", 1_031 * S),
    ]);
    let c = fold(&f, &recs, 5_000 * S);
    let m = &book(&c, "cora").meters[&MeterName::parse("api_calls").unwrap()];
    assert_eq!(
        (m.consumed, m.expired, m.overage),
        (2.into(), 9.into(), 1.into())
    );
}

#[test]
fn a_timestamp_too_far_ahead_is_dead_lettered_and_moves_no_time() {
    let f = folder();
    let mut times = times();
    let wall = 1_000 * S;
    let recs = numbered(vec![
        Rec::usage("dan", "e1", wall + 301 * S),
        Rec::usage("dan", "e2", wall),
    ]);
    let c = fold_with(&f, &recs, wall, &mut times);
    assert_eq!(dlq_reasons(&c), ["timestamp_in_future"]);
    assert_eq!(changed(&c), 1);
    assert_eq!(times.get(recs[0].partition), wall - 30 * S);
}

#[test]
fn usage_later_than_the_grace_is_applied_at_stream_time_and_counted() {
    let f = folder();
    let recs = numbered(vec![
        Rec::grant("erin", "g1", "10", 1_000 * S),
        Rec::usage("erin", "e1", 1_000 * S),
        Rec::usage("erin", "e2", 980 * S),
        Rec::usage("erin", "e3", 900 * S),
    ]);
    let c = fold(&f, &recs, 1_000 * S);
    assert_eq!(c.counts.late, 1, "only e3 is more than 30 s behind");
    let m = &book(&c, "erin").meters[&MeterName::parse("api_calls").unwrap()];
    assert_eq!(m.consumed, 3.into(), "late usage still counts");
}
