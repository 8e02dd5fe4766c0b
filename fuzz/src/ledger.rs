//! The ledger driver: a fuzzed sequence of grants, top-ups, usage, voids, reservations
//! (reserve, release, settle), time, commits and replays, applied to one customer's book
//! through the ledger's pure API, as the pipeline does.
//!
//! Time is placed as the pipeline places it (`kafka::pipeline::stream_time`): every input has
//! an event time; it applies at that time unless that is before the stream time (the newest
//! event time less the grace), and then at the stream time; ticks apply time at the stream
//! time. Records are loaded into the book from a store, as the refs of each input name them; a
//! commit writes what the book names dirty and starts a new book from the store.
//!
//! After every step, on every meter:
//! - `balance = credited - consumed - expired + voided` (the bookkeeping identity of the
//!   ledger docs), `reserved` = the sum of the holds, at most `MAX_HOLDS` holds;
//! - `0 <= debt <= overage <= consumed`, `blocked >= 0`, a block meter's balance `>= 0`;
//! - each `BalanceChanged` has the next version and `delta` = its balance less the one before,
//!   transitions carry the version and balance of the change they follow, and the last change
//!   names the meter's version and balance.
//!
//! A rejected input (an error), a duplicate and usage that no meter counts leave the book equal
//! (meters, records and dirty keys) and emit nothing. A replay of an input applied before is
//! never applied again. At a commit, the store holds exactly the book's records and meters.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use drawdown::ledger::{
    check_amount, Aggregation, Applied, AutoTopUp, Book, CustomerId, Dirty, EventId, EventRecord,
    Grant, GrantId, GrantKind, GrantRecord, Input, Ledger, MeterDef, MeterName, MeterState,
    MeterStates, Meters, OnExhausted, Output, Refs, ReservationId, ReservationRecord, Reserve,
    Threshold, Usage, MAX_HOLDS,
};
use rust_decimal::Decimal;

/// The pipeline's default grace (`pipeline.grace`).
const GRACE_MS: i64 = 30_000;

/// Where the clock starts unless the input says otherwise: 2026-01-01T00:00:00Z.
const T0: i64 = 1_767_225_600_000;

/// Steps per input at most (the book stays small; coverage comes from variety, not length).
const MAX_STEPS: usize = 256;

fn meter(name: &str) -> MeterName {
    MeterName::parse(name).expect("a valid meter name")
}

fn customer() -> CustomerId {
    CustomerId::parse("cus_1").expect("a valid customer id")
}

fn dec(s: &str) -> Decimal {
    s.parse().expect("a decimal literal")
}

/// The meters: `call` events counted on `api` (overage, low thresholds, a forecast alert) and
/// summed by `tokens` on `tokens` (block, an automatic top-up); `store` events with
/// `tier = hot` summed by `gb` on `storage` (overage, a short burn window, a far horizon).
fn meters() -> Meters {
    let def = |name: &str, event: &str, aggregation, on_exhausted| MeterDef {
        name: meter(name),
        event: event.into(),
        filter: BTreeMap::new(),
        aggregation,
        on_exhausted,
        low_balance: Vec::new(),
        top_up_packs: Vec::new(),
        auto_top_up: None,
        burn_window: Duration::from_secs(3600),
        forecast_horizon: Duration::from_secs(30 * 86_400),
        forecast_alert: None,
    };
    let sum = |p: &str| Aggregation::Sum { property: p.into() };
    Meters::new(vec![
        MeterDef {
            low_balance: vec![Threshold::Units(dec("3")), Threshold::Fraction(dec("0.5"))],
            forecast_alert: Some(Duration::from_secs(3600)),
            ..def("api", "call", Aggregation::Count, OnExhausted::Overage)
        },
        MeterDef {
            low_balance: vec![
                Threshold::Units(dec("10")),
                Threshold::Fraction(dec("0.25")),
            ],
            auto_top_up: Some(AutoTopUp {
                below: dec("5"),
                pack: "tokens-100".into(),
            }),
            forecast_alert: Some(Duration::from_secs(86_400)),
            ..def("tokens", "call", sum("tokens"), OnExhausted::Block)
        },
        MeterDef {
            filter: [("tier".to_string(), "hot".to_string())].into(),
            auto_top_up: Some(AutoTopUp {
                below: dec("2"),
                pack: "gb-10".into(),
            }),
            burn_window: Duration::from_secs(1),
            forecast_horizon: Duration::from_secs(1000 * 365 * 86_400),
            forecast_alert: Some(Duration::from_secs(7 * 86_400)),
            ..def("storage", "store", sum("gb"), OnExhausted::Overage)
        },
    ])
    .expect("valid meters")
}

/// Meter names a grant or reservation may name: the three meters and an unknown one.
const METER_NAMES: [&str; 4] = ["api", "tokens", "storage", "nope"];

/// An amount as the codec lets it through (exact, at most 9 places, at most 1e15), or 0.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Amount {
    Units(u8),
    Halves(u16),
    Fine(u32, u8),
    Max,
    Tiny,
    Zero,
}

impl Amount {
    fn value(self) -> Decimal {
        let d = match self {
            Amount::Units(n) => Decimal::from(n),
            Amount::Halves(n) => Decimal::new(i64::from(n) * 5, 1),
            Amount::Fine(m, s) => Decimal::new(i64::from(m), u32::from(s % 10)),
            Amount::Max => Decimal::from(drawdown::ledger::MAX_AMOUNT),
            Amount::Tiny => Decimal::new(1, 9),
            Amount::Zero => Decimal::ZERO,
        };
        check_amount(d).expect("within the codec's limits")
    }
}

/// A usage property's text: an amount, or text the codec passes on that is not one.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Prop {
    Amount(Amount),
    Text(u8),
}

const ODD_TEXT: [&str; 8] = [
    "-1",
    "1e1",
    "x",
    "",
    " 2 ",
    "1000000000000001",
    "0.0000000001",
    "+3",
];

impl Prop {
    fn text(self) -> String {
        match self {
            Prop::Amount(a) => a.value().to_string(),
            Prop::Text(i) => ODD_TEXT[usize::from(i) % ODD_TEXT.len()].to_string(),
        }
    }
}

/// A grant's effective or expiry time, from the time it applies at (`now`).
#[derive(Arbitrary, Debug, Clone, Copy)]
enum When {
    /// `now` plus this many seconds (negative: in the past).
    Secs(i16),
    /// `now` plus this many ms.
    Ms(i16),
    /// Any time at all (protobuf carries any int64).
    At(i64),
    Now,
    Zero,
    Far,
}

impl When {
    fn at(self, now: i64) -> i64 {
        match self {
            When::Secs(s) => now.saturating_add(i64::from(s) * 1000),
            When::Ms(ms) => now.saturating_add(i64::from(ms)),
            When::At(t) => t,
            When::Now => now,
            When::Zero => 0,
            When::Far => i64::MAX,
        }
    }
}

/// A reservation's ttl.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Ttl {
    Secs(u16),
    Ms(u32),
    Week,
    Zero,
    Negative,
    Max,
}

impl Ttl {
    fn ms(self) -> i64 {
        match self {
            Ttl::Secs(s) => i64::from(s) * 1000,
            Ttl::Ms(ms) => i64::from(ms),
            Ttl::Week => 7 * 86_400_000,
            Ttl::Zero => 0,
            Ttl::Negative => -1,
            Ttl::Max => i64::MAX,
        }
    }
}

/// When an input happened, relative to the newest event time so far.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Late {
    /// In order.
    OnTime,
    /// This many ms before the newest event time (up to twice the grace: later ones are late).
    Behind(u16),
}

#[derive(Arbitrary, Debug, Clone)]
enum Op {
    Grant {
        id: u8,
        meter: u8,
        amount: Amount,
        kind: u8,
        priority: u8,
        effective: Option<When>,
        expires: Option<When>,
        subscription: u8,
        rollover: Amount,
        late: Late,
    },
    Usage {
        id: u8,
        name: u8,
        tokens: Option<Prop>,
        gb: Option<Prop>,
        hot: Option<bool>,
        reservation: Option<u8>,
        late: Late,
    },
    VoidGrant(u8, Late),
    VoidUsage(u8, Late),
    Reserve {
        id: u8,
        meter: u8,
        units: Amount,
        ttl: Ttl,
        late: Late,
    },
    Release(u8, Late),
    /// The newest event time moves on by this many ms (`scale` picks ms, s, min, h or days).
    Time {
        by: u16,
        scale: u8,
        tick: bool,
    },
    /// An idle partition: stream time follows the clock (less the grace) and time is applied.
    Tick,
    /// The batch ends: the dirty keys are written, the next batch starts from the store.
    Commit,
    /// An input applied before arrives again.
    Replay(u8, Late),
}

/// Records as the store keeps them.
#[derive(Default)]
struct Store {
    meters: MeterStates,
    events: BTreeMap<EventId, EventRecord>,
    grants: BTreeMap<GrantId, GrantRecord>,
    reservations: BTreeMap<ReservationId, ReservationRecord>,
}

/// Everything a rejected input must leave as it was.
#[derive(PartialEq, Debug)]
struct Snapshot {
    meters: MeterStates,
    events: HashMap<EventId, Option<EventRecord>>,
    grants: HashMap<GrantId, Option<GrantRecord>>,
    reservations: HashMap<ReservationId, Option<ReservationRecord>>,
    dirty: BTreeSet<Dirty>,
}

fn snapshot(book: &Book) -> Snapshot {
    Snapshot {
        meters: book.meters.clone(),
        events: book.events.clone(),
        grants: book.grants.clone(),
        reservations: book.reservations.clone(),
        dirty: book.clone().take_dirty(),
    }
}

struct Driver {
    ledger: Ledger,
    store: Store,
    book: Book,
    /// The newest event time so far.
    clock: i64,
    /// The partition's stream time: never goes back.
    stream: i64,
    /// Each meter's (version, balance) as its last `BalanceChanged` said.
    last: BTreeMap<MeterName, (u64, Decimal)>,
    /// Inputs applied (or refused) before, for replays.
    seen: Vec<Input>,
}

impl Driver {
    fn new(clock: i64) -> Self {
        Self {
            ledger: Ledger::new(meters()),
            store: Store::default(),
            book: Book::new(customer()),
            clock,
            stream: i64::MIN,
            last: BTreeMap::new(),
            seen: Vec::new(),
        }
    }

    /// The time an input with this lateness applies at, moving stream time on.
    fn place(&mut self, late: Late) -> i64 {
        let t = match late {
            Late::OnTime => self.clock,
            Late::Behind(ms) => self.clock.saturating_sub(i64::from(ms) * 2),
        };
        if t < self.stream {
            return self.stream;
        }
        self.stream = self.stream.max(t.saturating_sub(GRACE_MS));
        t
    }

    /// Loads the records `input` refers to that the book does not hold yet, from the store.
    fn load(&mut self, input: &Input) {
        let mut refs = Refs::default();
        input.refs(&mut refs);
        for e in refs.events {
            let rec = self.store.events.get(&e).cloned();
            self.book.events.entry(e).or_insert(rec);
        }
        for g in refs.grants {
            let rec = self.store.grants.get(&g).cloned();
            self.book.grants.entry(g).or_insert(rec);
        }
        for r in refs.reservations {
            let rec = self.store.reservations.get(&r).cloned();
            self.book.reservations.entry(r).or_insert(rec);
        }
    }

    fn apply(&mut self, input: Input, now: i64) {
        self.load(&input);
        let before = snapshot(&self.book);
        let mut out = Vec::new();
        let result = self.ledger.apply(&mut self.book, &input, now, &mut out);
        if result != Ok(Applied::Applied) {
            assert!(out.is_empty(), "{input:?} -> {result:?} emitted {out:?}");
            assert!(
                snapshot(&self.book) == before,
                "{input:?} -> {result:?} changed the book"
            );
        }
        self.check(&out);
        // A void or release of an unknown id may find its target later: not a replay.
        let unknown = matches!(
            result.as_ref().map_err(|e| e.reason()),
            Err("void_unknown" | "reservation_unknown")
        );
        if !unknown {
            self.seen.push(input);
        }
    }

    fn replay(&mut self, k: u8, now: i64) {
        if self.seen.is_empty() {
            return;
        }
        let input = self.seen[usize::from(k) % self.seen.len()].clone();
        self.load(&input);
        let before = snapshot(&self.book);
        let mut out = Vec::new();
        let result = self.ledger.apply(&mut self.book, &input, now, &mut out);
        assert!(
            result != Ok(Applied::Applied),
            "a replay of {input:?} was applied again"
        );
        assert!(out.is_empty(), "a replay of {input:?} emitted {out:?}");
        assert!(
            snapshot(&self.book) == before,
            "a replay of {input:?} changed the book"
        );
    }

    fn tick(&mut self) {
        let mut out = Vec::new();
        self.ledger.advance(&mut self.book, self.stream, &mut out);
        self.check(&out);
    }

    fn commit(&mut self) {
        for key in self.book.take_dirty() {
            match key {
                Dirty::Meter(m) => {
                    let state = self.book.meters[&m].clone();
                    self.store.meters.insert(m, state);
                }
                Dirty::Event(e) => {
                    let rec = self.book.events[&e]
                        .clone()
                        .expect("a dirty event has a record");
                    self.store.events.insert(e, rec);
                }
                Dirty::Grant(g) => {
                    let rec = self.book.grants[&g]
                        .clone()
                        .expect("a dirty grant has a record");
                    self.store.grants.insert(g, rec);
                }
                Dirty::Reservation(r) => {
                    let rec = self.book.reservations[&r]
                        .clone()
                        .expect("a dirty reservation has a record");
                    self.store.reservations.insert(r, rec);
                }
            }
        }
        // What was written is all the book changed: nothing changed stays unwritten.
        let changed = |m: &MeterStates| -> MeterStates {
            m.iter()
                .filter(|(_, s)| **s != MeterState::default())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        assert_eq!(changed(&self.store.meters), changed(&self.book.meters));
        fn held<K: Eq + std::hash::Hash + Ord, V: PartialEq>(
            book: &HashMap<K, Option<V>>,
            store: &BTreeMap<K, V>,
        ) -> bool {
            book.iter().all(|(k, v)| v.as_ref() == store.get(k))
        }
        assert!(held(&self.book.events, &self.store.events), "event records");
        assert!(held(&self.book.grants, &self.store.grants), "grant records");
        assert!(
            held(&self.book.reservations, &self.store.reservations),
            "reservation records"
        );
        self.book = Book::new(customer());
        self.book.meters = self.store.meters.clone();
    }

    /// The outputs of one step, then every meter's books.
    fn check(&mut self, out: &[Output]) {
        for o in out {
            match o {
                Output::Changed(c) => {
                    let (version, balance) = self
                        .last
                        .get(&c.meter)
                        .copied()
                        .unwrap_or((0, Decimal::ZERO));
                    assert_eq!(c.version, version + 1, "{c:?}");
                    assert_eq!(c.delta, c.balance - balance, "{c:?}");
                    assert_eq!(c.available, c.balance - c.reserved, "{c:?}");
                    self.last.insert(c.meter.clone(), (c.version, c.balance));
                }
                Output::Transition(t) => {
                    assert_eq!(
                        self.last.get(&t.meter).copied(),
                        Some((t.version, t.balance)),
                        "{t:?}"
                    );
                }
                Output::TopUp(t) => {
                    assert_eq!(self.last.get(&t.meter).map(|(_, b)| *b), t.balance, "{t:?}");
                }
            }
        }
        for (name, s) in &self.book.meters {
            let balance = s.balance();
            assert_eq!(
                balance,
                s.credited - s.consumed - s.expired + s.voided,
                "the books of {name} do not balance: {s:#?}"
            );
            assert_eq!(
                s.reserved,
                s.holds.iter().map(|h| h.units).sum::<Decimal>(),
                "{name}: reserved is not the sum of the holds"
            );
            assert!(s.holds.len() <= MAX_HOLDS);
            assert!(
                Decimal::ZERO <= s.debt && s.debt <= s.overage && s.overage <= s.consumed,
                "{name}: debt {} overage {} consumed {}",
                s.debt,
                s.overage,
                s.consumed
            );
            assert!(s.blocked >= Decimal::ZERO, "{name}: blocked {}", s.blocked);
            if name.as_str() == "tokens" {
                assert!(balance >= Decimal::ZERO, "a block meter went below 0");
            }
            assert_eq!(
                self.last.get(name).copied().unwrap_or((0, Decimal::ZERO)),
                (s.version, balance),
                "{name}: the last change does not name the meter's state"
            );
        }
    }

    fn step(&mut self, op: Op) {
        let c = customer();
        let (input, now) = match op {
            Op::Time { by, scale, tick } => {
                let unit: i64 = [1, 1000, 60_000, 3_600_000, 86_400_000][usize::from(scale % 5)];
                self.clock = self.clock.saturating_add(i64::from(by) * unit);
                if tick {
                    self.tick();
                }
                return;
            }
            Op::Tick => {
                self.stream = self.stream.max(self.clock.saturating_sub(GRACE_MS));
                self.tick();
                return;
            }
            Op::Commit => {
                self.commit();
                return;
            }
            Op::Replay(k, late) => {
                let now = self.place(late);
                self.replay(k, now);
                return;
            }
            Op::Grant {
                id,
                meter: m,
                amount,
                kind,
                priority,
                effective,
                expires,
                subscription,
                rollover,
                late,
            } => {
                let now = self.place(late);
                let grant = Grant {
                    grant_id: GrantId::parse(format!("g{}", id % 24)).unwrap(),
                    customer: c,
                    meter: meter(METER_NAMES[usize::from(m) % 4]),
                    amount: amount.value(),
                    kind: [GrantKind::Cycle, GrantKind::TopUp, GrantKind::Adjustment]
                        [usize::from(kind % 3)],
                    priority,
                    effective_at: effective.map(|w| w.at(now)),
                    expires_at: expires.map(|w| w.at(now)),
                    subscription_id: [None, Some("s1"), Some("s2")][usize::from(subscription % 3)]
                        .map(String::from),
                    rollover: rollover.value(),
                };
                (Input::Grant(grant), now)
            }
            Op::Usage {
                id,
                name,
                tokens,
                gb,
                hot,
                reservation,
                late,
            } => {
                let now = self.place(late);
                let mut properties = BTreeMap::new();
                properties.extend(tokens.map(|p| ("tokens".to_string(), p.text())));
                properties.extend(gb.map(|p| ("gb".to_string(), p.text())));
                properties.extend(hot.map(|h| {
                    (
                        "tier".to_string(),
                        if h { "hot" } else { "cold" }.to_string(),
                    )
                }));
                let usage = Usage {
                    id: EventId::parse(format!("e{}", id % 48)).unwrap(),
                    customer: c,
                    name: ["call", "call", "store", "signup"][usize::from(name % 4)].into(),
                    timestamp_ms: now,
                    properties,
                    reservation_id: reservation
                        .map(|r| ReservationId::parse(format!("r{}", r % 12)).unwrap()),
                };
                (Input::Usage(usage), now)
            }
            Op::VoidGrant(id, late) => {
                let now = self.place(late);
                (
                    Input::VoidGrant {
                        customer: c,
                        grant_id: GrantId::parse(format!("g{}", id % 24)).unwrap(),
                    },
                    now,
                )
            }
            Op::VoidUsage(id, late) => {
                let now = self.place(late);
                (
                    Input::VoidUsage {
                        customer: c,
                        event_id: EventId::parse(format!("e{}", id % 48)).unwrap(),
                    },
                    now,
                )
            }
            Op::Reserve {
                id,
                meter: m,
                units,
                ttl,
                late,
            } => {
                let now = self.place(late);
                (
                    Input::Reserve(Reserve {
                        reservation_id: ReservationId::parse(format!("r{}", id % 12)).unwrap(),
                        customer: c,
                        meter: meter(METER_NAMES[usize::from(m) % 4]),
                        units: units.value(),
                        ttl_ms: ttl.ms(),
                    }),
                    now,
                )
            }
            Op::Release(id, late) => {
                let now = self.place(late);
                (
                    Input::Release {
                        customer: c,
                        reservation_id: ReservationId::parse(format!("r{}", id % 12)).unwrap(),
                    },
                    now,
                )
            }
        };
        self.apply(input, now);
    }
}

/// Where the clock starts: the seeds' time, the epoch, or any time (protobuf event times are
/// any int64; a new partition's stream time starts below all of them).
#[derive(Arbitrary, Debug)]
enum Start {
    T0,
    Epoch,
    At(i64),
}

/// One fuzz input.
pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let clock = match Start::arbitrary(&mut u) {
        Ok(Start::T0) | Err(_) => T0,
        Ok(Start::Epoch) => 0,
        Ok(Start::At(t)) => t,
    };
    let mut driver = Driver::new(clock);
    for op in u
        .arbitrary_iter::<Op>()
        .into_iter()
        .flatten()
        .take(MAX_STEPS)
    {
        let Ok(op) = op else { break };
        driver.step(op);
    }
    // The end of the run: time applied far ahead, then committed.
    driver.clock = driver.clock.saturating_add(400 * 86_400_000);
    driver.step(Op::Tick);
    driver.commit();
}
