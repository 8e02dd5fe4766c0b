//! The store against a real RocksDB in a temp dir: the production mapping both ways, restore
//! from the changelog records the layout writes, forgetting by bucket, the format check.

use std::collections::BTreeMap;
use std::time::Duration;

use super::layout::{drop_deltas, Layout, StateBatch};
use super::*;
use crate::ledger::{
    BalanceChanged, Book, CustomerId, EventId, Grant, GrantId, Input, Ledger, MeterDef, MeterName,
    Meters, Output, Refs, ReservationId, ReservationOutcome, Reserve, Usage,
};

fn layout() -> Layout {
    Layout::new(200, Duration::from_secs(80)) // buckets of 10 s
}

fn open(dir: &Path) -> Store {
    Store::open_path(dir, 8, 8, layout()).unwrap()
}

fn ledger() -> Ledger {
    let def: MeterDef = toml::from_str(
        r#"name = "api"
event = "call"
aggregation = { type = "count" }
on_exhausted = "overage""#,
    )
    .unwrap();
    Ledger::new(Meters::new(vec![def]).unwrap())
}

fn usage(c: &CustomerId, id: &str) -> Input {
    Input::Usage(Usage {
        id: EventId::parse(id).unwrap(),
        customer: c.clone(),
        name: "call".into(),
        timestamp_ms: 0,
        properties: Default::default(),
        reservation_id: None,
    })
}

/// Loads `c`'s book with `inputs`' refs, applies them at `now`, and writes the result as the
/// pipeline would: returns the writes (changelog and local).
fn fold(
    s: &Store,
    cache: &mut BookCache,
    p: i32,
    c: &CustomerId,
    inputs: &[Input],
    now: i64,
    seq: u64,
) -> Vec<StateWrite> {
    let mut refs = Refs::default();
    for i in inputs {
        i.refs(&mut refs);
    }
    let want = BookRequest {
        partition: p,
        customer: c,
        refs: &refs,
    };
    let mut book = s.load_books(&[want], cache).unwrap().remove(0);
    let mut out = Vec::new();
    let l = ledger();
    for i in inputs {
        let _ = l.apply(&mut book, i, now, &mut out);
    }
    let mut batch = StateBatch::new(s.layout());
    let dirty = book.take_dirty();
    batch.book(p, &book, &dirty);
    for o in &out {
        if let Output::Changed(ch) = o {
            batch.change(p, ch);
        }
    }
    let (writes, used) = batch.finish(&BTreeMap::from([(p, seq)]), &BTreeMap::new());
    assert!(used.iter().all(|(q, _, s)| *q == p && *s >= seq));
    s.write(&writes, &[(p, 42)]).unwrap();
    writes
}

/// A usage movement of `customer`'s `meter` (for the layout and history tests too).
pub(super) fn movement(customer: &str, meter: &str, version: u64, at: i64) -> BalanceChanged {
    BalanceChanged {
        customer_id: CustomerId::parse(customer).unwrap(),
        meter: MeterName::parse(meter).unwrap(),
        version,
        delta: (-1).into(),
        reason: crate::ledger::Reason::Usage,
        cause_id: format!("event-{version:012}"),
        balance: 5.into(),
        credited: 5.into(),
        consumed: 1.into(),
        overage: 0.into(),
        blocked: 0.into(),
        reserved: 0.into(),
        available: 5.into(),
        at,
        late: false,
    }
}

/// What the changelog would hold: the records produced, in order.
fn changelog(writes: &[StateWrite]) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    writes
        .iter()
        .filter(|w| w.target.changelog())
        .map(|w| (w.key.clone(), w.value.clone()))
        .collect()
}

#[test]
fn a_folded_book_round_trips_and_restores_from_its_changelog_records() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let s = open(a.path());
    let mut cache = BookCache::new(0);
    let c = CustomerId::parse("c1").unwrap();
    let m = MeterName::parse("api").unwrap();
    let grant = Input::Grant(Grant::top_up(
        GrantId::parse("g1").unwrap(),
        c.clone(),
        m.clone(),
        5.into(),
    ));
    let mut log = changelog(&fold(
        &s,
        &mut cache,
        2,
        &c,
        &[grant, usage(&c, "e1")],
        10_000,
        0,
    ));
    log.extend(changelog(&fold(
        &s,
        &mut cache,
        2,
        &c,
        &[usage(&c, "e2"), usage(&c, "e1")],
        11_000,
        1,
    )));
    // Records per commit: one book, the grant record once, one delta per bucket touched.
    assert_eq!(log.len(), 2 + 1 + 1 + 1, "{log:?}");
    assert_eq!(s.checkpoint(2).unwrap(), Some(42));
    assert_eq!(s.checkpoint(3).unwrap(), None);
    let state = s.meter(2, &c, &m).unwrap().unwrap();
    assert_eq!(
        (state.version, state.balance()),
        (3, 3.into()),
        "e1 counted once"
    );
    let history: Vec<u64> = s
        .history(2, &c, &m, None, 10)
        .unwrap()
        .iter()
        .map(|h| h.version)
        .collect();
    assert_eq!(history, vec![3, 2, 1]);
    // Another store rebuilt from the changelog records alone reads the same.
    let r = open(b.path());
    r.restore(2, &log, 5).unwrap();
    assert_eq!(r.checkpoint(2).unwrap(), Some(5));
    assert_eq!(r.meters(2, &c).unwrap(), s.meters(2, &c).unwrap());
    assert_eq!(
        r.history(2, &c, &m, None, 10).unwrap(),
        s.history(2, &c, &m, None, 10).unwrap()
    );
    let refs = Refs {
        events: vec![EventId::parse("e1").unwrap(), EventId::parse("e9").unwrap()],
        grants: vec![GrantId::parse("g1").unwrap()],
        reservations: vec![],
    };
    let want = [BookRequest {
        partition: 2,
        customer: &c,
        refs: &refs,
    }];
    let (x, y) = (
        s.load_books(&want, &mut cache).unwrap().remove(0),
        r.load_books(&want, &mut BookCache::new(0))
            .unwrap()
            .remove(0),
    );
    assert_eq!(
        (&x.meters, &x.events, &x.grants),
        (&y.meters, &y.events, &y.grants)
    );
    assert!(x.events[&refs.events[0]].is_some() && x.events[&refs.events[1]].is_none());
    assert_eq!(
        r.deltas(2).unwrap(),
        (std::collections::BTreeSet::from([10_000]), 2)
    );
    s.drop_partition(2).unwrap();
    assert!(s.meter(2, &c, &m).unwrap().is_none());
    assert_eq!(s.checkpoint(2).unwrap(), None);
}

#[test]
fn a_dropped_bucket_forgets_its_ids_at_once_and_compaction_removes_them() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let mut cache = BookCache::new(1 << 20);
    let c = CustomerId::parse("c1").unwrap();
    let m = MeterName::parse("api").unwrap();
    fold(&s, &mut cache, 0, &c, &[usage(&c, "old")], 10_500, 0);
    fold(&s, &mut cache, 0, &c, &[usage(&c, "new")], 20_500, 1);
    let (buckets, next) = s.deltas(0).unwrap();
    assert_eq!(
        (buckets.into_iter().collect::<Vec<_>>(), next),
        (vec![10_000, 20_000], 2)
    );
    let keys = s.delta_keys(0, 10_000, 100).unwrap();
    assert_eq!(keys.len(), 1);
    let dropping = drop_deltas(0, keys, 20_000);
    assert_eq!(
        changelog(&dropping)
            .iter()
            .filter(|(_, v)| v.is_none())
            .count(),
        1,
        "a tombstone"
    );
    s.write(&dropping, &[]).unwrap();
    assert_eq!(s.horizon(0), 20_000);
    // "old" is forgotten (a replay counts again), "new" is not.
    fold(
        &s,
        &mut cache,
        0,
        &c,
        &[usage(&c, "old"), usage(&c, "new")],
        21_000,
        2,
    );
    assert_eq!(s.meter(0, &c, &m).unwrap().unwrap().version, 3);
    assert_eq!(
        s.deltas(0).unwrap().0.into_iter().collect::<Vec<_>>(),
        vec![20_000]
    );
    // The re-applied "old" lives in the new bucket; forget that bucket too, then compact.
    let keys = s.delta_keys(0, 20_000, 100).unwrap();
    s.write(&drop_deltas(0, keys, 30_000), &[]).unwrap();
    assert!(s.holds_event(0, &c, "new").unwrap());
    s.flush().unwrap();
    s.compact_ids(0);
    assert!(!s.holds_event(0, &c, "new").unwrap());
    assert!(!s.holds_event(0, &c, "old").unwrap());
    // The horizon survives a reopen and a restore from the meta record.
    drop(s);
    let s = open(dir.path());
    assert_eq!(s.horizon(0), i64::MIN);
    s.load_meta(0).unwrap();
    assert_eq!(s.horizon(0), 30_000);
}

#[test]
fn a_reservation_id_rides_in_the_bucket_of_its_holds_end_and_is_forgotten_with_it() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let s = open(a.path());
    let mut cache = BookCache::new(0);
    let c = CustomerId::parse("c1").unwrap();
    let m = MeterName::parse("api").unwrap();
    let id = ReservationId::parse("job-1").unwrap();
    let grant = Input::Grant(Grant::top_up(
        GrantId::parse("g1").unwrap(),
        c.clone(),
        m.clone(),
        5.into(),
    ));
    let reserve = Input::Reserve(Reserve {
        reservation_id: id.clone(),
        customer: c.clone(),
        meter: m.clone(),
        units: 2.into(),
        ttl_ms: 15_000,
    });
    // Made at 10.5 s, its hold ends at 25.5 s: the bucket of 20 s.
    let log = changelog(&fold(&s, &mut cache, 0, &c, &[grant, reserve], 10_500, 0));
    assert!(
        log.iter()
            .all(|(k, _)| Kind::of(k) != Some(Kind::Reservation)),
        "no changelog record of its own"
    );
    assert_eq!(
        s.deltas(0).unwrap().0.into_iter().collect::<Vec<_>>(),
        vec![10_000, 20_000]
    );
    let held = s.reservation(0, &c, &id).unwrap().unwrap();
    assert_eq!(
        (held.outcome, held.expires_at, held.units),
        (ReservationOutcome::Held, 25_500, 2.into())
    );
    // Restored from the deltas alone.
    let r = open(b.path());
    r.restore(0, &log, 3).unwrap();
    assert_eq!(r.reservation(0, &c, &id).unwrap(), Some(held.clone()));
    // Dropping the bucket it was made in keeps it; dropping the one its hold ends in forgets it.
    let keys = s.delta_keys(0, 10_000, 100).unwrap();
    s.write(&drop_deltas(0, keys, 20_000), &[]).unwrap();
    assert_eq!(s.reservation(0, &c, &id).unwrap(), Some(held));
    let keys = s.delta_keys(0, 20_000, 100).unwrap();
    s.write(&drop_deltas(0, keys, 30_000), &[]).unwrap();
    assert_eq!(s.reservation(0, &c, &id).unwrap(), None);
    let refs = Refs {
        reservations: vec![id.clone()],
        ..Refs::default()
    };
    let want = [BookRequest {
        partition: 0,
        customer: &c,
        refs: &refs,
    }];
    let book = s.load_books(&want, &mut cache).unwrap().remove(0);
    assert_eq!(book.reservations.get(&id), Some(&None), "forgotten at load");
    s.flush().unwrap();
    s.compact_ids(0);
    let key = keys::reservation(0, &c, id.as_str());
    assert!(s.db.get_pinned(key).unwrap().is_none(), "compacted away");
}

#[test]
fn another_state_format_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = rocksdb::DB::open_default(dir.path()).unwrap();
        db.put(b"S\x00\x01mcus\x00api", br#"{"version":3}"#)
            .unwrap();
    }
    let err = Store::open_path(dir.path(), 8, 8, layout())
        .err()
        .expect("refused");
    assert!(err.is_fatal());
    assert!(err.to_string().contains("format 1"), "{err}");
    let fresh = tempfile::tempdir().unwrap();
    let s = open(fresh.path());
    let err = s
        .restore(
            0,
            &[(
                keys::book(0, &CustomerId::parse("c").unwrap()),
                Some(br#"{"a":1}"#.to_vec()),
            )],
            1,
        )
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Format { found: b'{', .. }),
        "{err}"
    );
}

#[test]
fn count_meters_counts_books_and_their_meters_of_one_partition() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let mut batch = StateBatch::new(s.layout());
    for (p, c, ms) in [
        (1, "a", &["x", "y"][..]),
        (1, "ab", &["x"][..]),
        (2, "a", &["x"][..]),
    ] {
        let mut book = Book::new(CustomerId::parse(c).unwrap());
        let mut dirty = std::collections::BTreeSet::new();
        for m in ms {
            let m = MeterName::parse(*m).unwrap();
            book.meters.insert(m.clone(), Default::default());
            dirty.insert(crate::ledger::Dirty::Meter(m));
        }
        batch.book(p, &book, &dirty);
    }
    let (writes, _) = batch.finish(&BTreeMap::new(), &BTreeMap::new());
    s.write(&writes, &[]).unwrap();
    assert_eq!(s.count_meters(1).unwrap(), (2, 3));
    assert_eq!(s.count_meters(2).unwrap(), (1, 1));
    assert_eq!(s.count_meters(3).unwrap(), (0, 0));
    assert!(s.property_int("rocksdb.estimate-num-keys").is_some());
    assert!(s.property_int("rocksdb.block-cache-capacity").unwrap() >= 8 << 20);
}

#[test]
fn bytes_by_kind_sums_the_flushed_keys_of_each_kind_over_the_partitions_asked() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let mut batch = StateBatch::new(s.layout());
    let m = MeterName::parse("api_calls").unwrap();
    for i in 0..3000 {
        let mut book = Book::new(CustomerId::parse(format!("customer-{i:05}")).unwrap());
        book.meters.insert(m.clone(), Default::default());
        let dirty = [crate::ledger::Dirty::Meter(m.clone())]
            .into_iter()
            .collect();
        batch.book(1, &book, &dirty);
    }
    let (writes, _) = batch.finish(&BTreeMap::new(), &BTreeMap::new());
    s.write(&writes, &[(1, 1)]).unwrap();
    let of = |partitions: &[i32], kind: &str| {
        let all = s.bytes_by_kind(partitions.iter().copied());
        assert_eq!(all.len(), Kind::ALL.len());
        all.into_iter().find(|(k, _)| *k == kind).unwrap().1
    };
    assert_eq!(of(&[1], "book"), 0, "still in the memtable: not counted");
    s.db.flush().unwrap();
    let books = of(&[1], "book");
    assert!(books > 10_000, "{books}");
    assert_eq!(of(&[1, 2], "book"), books);
    assert_eq!(of(&[2], "book"), 0);
    assert_eq!(of(&[1], "event"), 0);
    assert_eq!(of(&[1], "history"), 0);
}

#[test]
fn stream_time_is_kept_with_the_checkpoint_and_restored_from_the_deltas() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let s = open(a.path());
    let c = CustomerId::parse("c1").unwrap();
    let g = GrantId::parse("g1").unwrap();
    let mut book = Book::new(c.clone());
    book.grants.insert(g.clone(), None);
    let mut out = Vec::new();
    let grant = Input::Grant(Grant::top_up(
        g,
        c,
        MeterName::parse("api").unwrap(),
        5.into(),
    ));
    ledger().apply(&mut book, &grant, 10_000, &mut out).unwrap();
    let mut batch = StateBatch::new(s.layout());
    let dirty = book.take_dirty();
    batch.book(2, &book, &dirty);
    for o in &out {
        if let Output::Changed(ch) = o {
            batch.change(2, ch);
        }
    }
    let times = BTreeMap::from([(2, 12_345)]);
    let (writes, _) = batch.finish(&BTreeMap::new(), &times);
    s.write_timed(&writes, &[(2, 7)], &times).unwrap();
    assert_eq!(s.checkpoint(2).unwrap(), Some(7));
    assert_eq!(s.stream_time(2).unwrap(), Some(12_345));
    // A checkpoint written without one (tests, tools) has none.
    s.write(&[], &[(3, 1)]).unwrap();
    assert_eq!(s.stream_time(3).unwrap(), None);
    assert_eq!(s.checkpoint(3).unwrap(), Some(1));
    // Restored from the changelog alone: the deltas carry it.
    let r = open(b.path());
    r.restore(2, &changelog(&writes), 9).unwrap();
    assert_eq!(r.checkpoint(2).unwrap(), Some(9));
    assert_eq!(r.stream_time(2).unwrap(), Some(12_345));
}

#[test]
fn the_due_index_is_rebuilt_by_a_restore_and_built_once_for_a_store_without_it() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let s = open(a.path());
    let mut cache = BookCache::new(0);
    let c = CustomerId::parse("c1").unwrap();
    let m = MeterName::parse("api").unwrap();
    let mut g = Grant::top_up(
        GrantId::parse("g1").unwrap(),
        c.clone(),
        m.clone(),
        5.into(),
    );
    g.expires_at = Some(50_000);
    let log = changelog(&fold(&s, &mut cache, 2, &c, &[Input::Grant(g)], 10_000, 0));
    let due = |s: &Store| -> Vec<(i64, CustomerId, MeterName)> {
        s.due(2, i64::MIN, i64::MAX, 10)
            .unwrap()
            .into_iter()
            .map(|d| (d.at, d.customer, d.meter))
            .collect()
    };
    // The test's fold writes no due keys: the store above has none.
    assert_eq!(due(&s), []);
    // A restore indexes the books it replays.
    let r = open(b.path());
    r.restore(2, &log, 5).unwrap();
    assert_eq!(due(&r), [(50_000, c.clone(), m.clone())]);
    assert!(r.due(2, i64::MIN, 49_999, 10).unwrap().is_empty());
    // A store written before the index existed (no `I` key) gets it from its books at open.
    s.db.delete(keys::LOCAL_INDEXES).unwrap();
    drop(s);
    let s = open(a.path());
    assert_eq!(due(&s), [(50_000, c.clone(), m.clone())]);
    assert_eq!(
        s.db.get(keys::LOCAL_INDEXES).unwrap(),
        Some(vec![LOCAL_INDEXES_VERSION])
    );
}

#[test]
fn a_replay_writes_and_indexes_only_the_last_version_of_each_book() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let s = open(a.path());
    let mut cache = BookCache::new(0);
    let (c, d) = (
        CustomerId::parse("c1").unwrap(),
        CustomerId::parse("c2").unwrap(),
    );
    let m = MeterName::parse("api").unwrap();
    let grant = |id: &str, c: &CustomerId, expires_at| {
        let mut g = Grant::top_up(GrantId::parse(id).unwrap(), c.clone(), m.clone(), 5.into());
        g.expires_at = Some(expires_at);
        Input::Grant(g)
    };
    // Three commits: c1's book twice (the second adds a grant expiring first), c2's once.
    let mut log = changelog(&fold(
        &s,
        &mut cache,
        2,
        &c,
        &[grant("g1", &c, 50_000)],
        1,
        0,
    ));
    log.extend(changelog(&fold(
        &s,
        &mut cache,
        2,
        &d,
        &[grant("g2", &d, 70_000)],
        1,
        1,
    )));
    log.extend(changelog(&fold(
        &s,
        &mut cache,
        2,
        &c,
        &[grant("g3", &c, 30_000)],
        1,
        2,
    )));
    let books = log
        .iter()
        .filter(|(k, _)| Kind::of(k) == Some(Kind::Book))
        .count();
    assert_eq!(books, 3);
    let r = open(b.path());
    let mut replay = r.replay(2).unwrap();
    for (k, v) in &log {
        r.replay_record(&mut replay, k, v.as_deref()).unwrap();
    }
    assert_eq!(replay.len(), log.len());
    r.finish_replay(replay, 9).unwrap();
    assert_eq!(r.checkpoint(2).unwrap(), Some(9));
    assert_eq!(r.meters(2, &c).unwrap(), s.meters(2, &c).unwrap());
    assert_eq!(r.meters(2, &d).unwrap(), s.meters(2, &d).unwrap());
    // The due index from the last version of c1's book only (no stale key of the first).
    let due: Vec<(i64, CustomerId)> = r
        .due(2, i64::MIN, i64::MAX, 10)
        .unwrap()
        .into_iter()
        .map(|x| (x.at, x.customer))
        .collect();
    assert_eq!(due, [(30_000, c.clone()), (70_000, d.clone())]);
    // A book's tombstone after its value in one replay deletes it.
    let mut replay = r.replay(2).unwrap();
    let (k, v) = log
        .iter()
        .rev()
        .find(|(k, _)| Kind::of(k) == Some(Kind::Book))
        .unwrap();
    r.replay_record(&mut replay, k, v.as_deref()).unwrap();
    r.replay_record(&mut replay, k, None).unwrap();
    r.finish_replay(replay, 10).unwrap();
    assert_eq!(r.meters(2, &c).unwrap(), Default::default());
}

#[test]
fn a_rewrite_in_rounds_sees_every_key_once_and_ends_rounds_only_where_asked() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    for i in 0..1_000u32 {
        s.db.put(format!("k{i:04}"), i.to_be_bytes()).unwrap();
    }
    s.db.put("l", b"outside").unwrap();
    let (mut seen, mut rounds, mut pair) = (Vec::new(), 0, Vec::new());
    s.rewrite_in_rounds(b"k", b"l", |item, batch| {
        let Some((k, _)) = item else {
            rounds += 1;
            // What a round holds is put before its batch is written: pairs are never split.
            assert!(pair.len().is_multiple_of(2), "a pair split across rounds");
            pair.clear();
            return Ok(Round::Next);
        };
        // End a round every 100 keys, but only before an even key (a "pair" starts there).
        let i: u32 = std::str::from_utf8(&k[1..]).unwrap().parse().unwrap();
        if batch.len() >= 100 && i.is_multiple_of(2) {
            return Ok(Round::EndBefore);
        }
        seen.push(i);
        pair.push(i);
        // Rewrites the keys it reads, as the conversions do.
        batch.delete(k);
        batch.put([b"m", k].concat(), []);
        Ok(Round::Next)
    })
    .unwrap();
    assert_eq!(seen, (0..1_000).collect::<Vec<_>>());
    assert_eq!(rounds, 20, "50 keys (100 writes) per round");
    assert!(s.db.get("k0000").unwrap().is_none());
    assert!(s.db.get("mk0999").unwrap().is_some());
    assert_eq!(s.db.get("l").unwrap().as_deref(), Some(&b"outside"[..]));
}
