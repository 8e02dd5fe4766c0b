//! Tests of the credit rules: examples whose names state the rule, then a property suite that
//! runs the ledger against the one reference model of the rules (`drawdown_model`, a separate,
//! deliberately naive crate) over random sequences of grants, usage, voids, time and replays:
//! `ledger_matches_the_reference_model` (all outputs, every counter and grant, the identity,
//! replays, rejected inputs, batch splits) and the same past the drained-grant cap. (The load
//! generator's own cross-check of its model against the ledger is gone with that model: its
//! expectation is this model now.)

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::LazyLock;

use drawdown_model as model;
use proptest::prelude::*;
use rust_decimal::Decimal;

use super::*;

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

/// The meters of the tests, as plain data the reference model reads too.
struct Spec {
    name: &'static str,
    event: &'static str,
    /// `None` = count, `Some(p)` = sum of property `p`.
    sum: Option<&'static str>,
    filter: Option<(&'static str, &'static str)>,
    block: bool,
    /// (fraction?, value)
    lows: &'static [(bool, &'static str)],
    /// Automatic top-up: (below, pack).
    auto: Option<(&'static str, &'static str)>,
}

const SPECS: &[Spec] = &[
    // One unit per `call`; overage; low at 3 units and at half the cycle's credits.
    Spec {
        name: "api",
        event: "call",
        sum: None,
        filter: None,
        block: false,
        lows: &[(false, "3"), (true, "0.5")],
        auto: None,
    },
    // The `tokens` property of each `call`; credits only.
    Spec {
        name: "tokens",
        event: "call",
        sum: Some("tokens"),
        filter: None,
        block: true,
        lows: &[(false, "10"), (true, "0.25")],
        auto: None,
    },
    // The `gb` property of `store` events with `tier = hot`; overage; a top-up request below 2.
    Spec {
        name: "storage",
        event: "store",
        sum: Some("gb"),
        filter: Some(("tier", "hot")),
        block: false,
        lows: &[],
        auto: Some(("2", "gb-10")),
    },
];

fn dec(s: &str) -> Decimal {
    s.parse().expect("a decimal literal")
}

fn customer() -> CustomerId {
    CustomerId::parse("cus_1").unwrap()
}

fn meter(name: &str) -> MeterName {
    MeterName::parse(name).unwrap()
}

fn meters() -> Meters {
    let defs = SPECS
        .iter()
        .map(|s| MeterDef {
            name: meter(s.name),
            event: s.event.into(),
            filter: s
                .filter
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            aggregation: match s.sum {
                None => Aggregation::Count,
                Some(p) => Aggregation::Sum { property: p.into() },
            },
            on_exhausted: if s.block {
                OnExhausted::Block
            } else {
                OnExhausted::Overage
            },
            low_balance: s
                .lows
                .iter()
                .map(|&(frac, v)| {
                    if frac {
                        Threshold::Fraction(dec(v))
                    } else {
                        Threshold::Units(dec(v))
                    }
                })
                .collect(),
            top_up_packs: Vec::new(),
            auto_top_up: s.auto.map(|(below, pack)| AutoTopUp {
                below: dec(below),
                pack: pack.into(),
            }),
            burn_window: super::default_burn_window(),
            forecast_horizon: super::default_forecast_horizon(),
            forecast_alert: None,
        })
        .collect();
    Meters::new(defs).unwrap()
}

fn grant(id: &str, meter_name: &str, amount: &str) -> Grant {
    Grant::top_up(
        GrantId::parse(id).unwrap(),
        customer(),
        meter(meter_name),
        dec(amount),
    )
}

fn cycle(id: &str, meter_name: &str, amount: &str, sub: &str, rollover: &str) -> Grant {
    Grant {
        kind: GrantKind::Cycle,
        subscription_id: Some(sub.into()),
        rollover: dec(rollover),
        ..grant(id, meter_name, amount)
    }
}

fn usage(id: &str, name: &str, props: &[(&str, &str)]) -> Input {
    Input::Usage(Usage {
        id: EventId::parse(id).unwrap(),
        customer: customer(),
        name: name.into(),
        timestamp_ms: 0,
        properties: props
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        reservation_id: None,
    })
}

fn void_usage(id: &str) -> Input {
    Input::VoidUsage {
        customer: customer(),
        event_id: EventId::parse(id).unwrap(),
    }
}

fn void_grant(id: &str) -> Input {
    Input::VoidGrant {
        customer: customer(),
        grant_id: GrantId::parse(id).unwrap(),
    }
}

/// Loads (as "not stored") the records `input` refers to that the book does not hold yet, as
/// a store holding everything would.
fn load_refs(book: &mut Book, input: &Input) {
    let mut refs = Refs::default();
    input.refs(&mut refs);
    for e in refs.events {
        book.events.entry(e).or_insert(None);
    }
    for g in refs.grants {
        book.grants.entry(g).or_insert(None);
    }
    for r in refs.reservations {
        book.reservations.entry(r).or_insert(None);
    }
}

/// The parts of a book the rules may change.
type Snapshot = (
    MeterStates,
    HashMap<EventId, Option<EventRecord>>,
    HashMap<GrantId, Option<GrantRecord>>,
    HashMap<ReservationId, Option<ReservationRecord>>,
);

fn snapshot(book: &Book) -> Snapshot {
    (
        book.meters.clone(),
        book.events.clone(),
        book.grants.clone(),
        book.reservations.clone(),
    )
}

/// One customer's book driven by hand, for the examples.
struct Sim {
    ledger: Ledger,
    book: Book,
    now: i64,
    out: Vec<Output>,
}

impl Sim {
    fn new() -> Self {
        Self {
            ledger: Ledger::new(meters()),
            book: Book::new(customer()),
            now: 1_000,
            out: Vec::new(),
        }
    }

    fn apply(&mut self, input: Input) -> Result<Applied, LedgerError> {
        load_refs(&mut self.book, &input);
        self.ledger
            .apply(&mut self.book, &input, self.now, &mut self.out)
    }

    fn grant(&mut self, g: Grant) -> Applied {
        self.apply(Input::Grant(g)).expect("grant accepted")
    }

    fn use_api(&mut self, id: &str) -> Applied {
        self.apply(usage(id, "call", &[("tokens", "0")]))
            .expect("usage accepted")
    }

    fn advance_to(&mut self, now: i64) {
        self.now = now;
        self.ledger.advance(&mut self.book, now, &mut self.out);
    }

    fn state(&self, name: &str) -> MeterState {
        self.book
            .meters
            .get(&meter(name))
            .cloned()
            .unwrap_or_default()
    }

    fn balance(&self, name: &str) -> Decimal {
        self.state(name).balance()
    }

    /// Takes the outputs so far.
    fn take(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.out)
    }

    /// Takes the transitions so far, as (meter, kind, threshold).
    fn transitions(&mut self) -> Vec<(String, TransitionKind, Option<Decimal>)> {
        self.take()
            .into_iter()
            .filter_map(|o| match o {
                Output::Transition(t) => Some((t.meter.to_string(), t.kind, t.threshold)),
                Output::Changed(_) | Output::TopUp(_) => None,
            })
            .collect()
    }

    /// Takes the balance changes so far, as (meter, reason, delta).
    fn changes(&mut self) -> Vec<(String, Reason, Decimal)> {
        self.take()
            .into_iter()
            .filter_map(|o| match o {
                Output::Changed(c) => Some((c.meter.to_string(), c.reason, c.delta)),
                Output::Transition(_) | Output::TopUp(_) => None,
            })
            .collect()
    }

    /// Remainders of the active grants (drained ones too, at 0), in draw-down order.
    fn remainders(&self, name: &str) -> Vec<(String, Decimal)> {
        self.state(name)
            .grants
            .iter()
            .filter(|g| g.active)
            .map(|g| (g.id.to_string(), g.remaining))
            .collect()
    }

    /// Ids of the active grants with something left, in draw-down order.
    fn funded(&self, name: &str) -> Vec<String> {
        self.remainders(name)
            .into_iter()
            .filter(|(_, left)| *left > Decimal::ZERO)
            .map(|(id, _)| id)
            .collect()
    }

    /// Whether meter `name` holds grant `id` (active or pending, drained or not).
    fn holds(&self, name: &str, id: &str) -> bool {
        self.state(name).grants.iter().any(|g| g.id.as_str() == id)
    }
}

/// The bookkeeping identity every meter keeps.
fn assert_books_balance(state: &MeterState) {
    assert_eq!(
        state.balance(),
        state.credited - state.consumed - state.expired + state.voided,
        "{state:#?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Examples
// ---------------------------------------------------------------------------------------------

#[test]
fn grant_then_usage_gives_the_right_balance() {
    let mut s = Sim::new();
    assert_eq!(s.grant(grant("g1", "api", "10")), Applied::Applied);
    for i in 0..3 {
        assert_eq!(s.use_api(&format!("e{i}")), Applied::Applied);
    }
    let api = s.state("api");
    assert_eq!(api.balance(), dec("7"));
    assert_eq!(api.credited, dec("10"));
    assert_eq!(api.consumed, dec("3"));
    assert_eq!(api.overage, Decimal::ZERO);
    assert_eq!(api.status(), Status::Active);
    assert_books_balance(&api);
}

#[test]
fn top_ups_stack_on_the_existing_balance() {
    let mut s = Sim::new();
    s.grant(grant("g1", "api", "10"));
    s.use_api("e1");
    s.grant(grant("g2", "api", "5.5"));
    assert_eq!(s.balance("api"), dec("14.5"));
    assert_eq!(
        s.remainders("api"),
        vec![("g1".into(), dec("9")), ("g2".into(), dec("5.5"))]
    );
}

#[test]
fn top_up_restores_an_exhausted_meter() {
    let mut s = Sim::new();
    s.grant(grant("g1", "api", "1"));
    s.take();
    s.use_api("e1");
    assert_eq!(s.state("api").status(), Status::Exhausted);
    assert!(s
        .transitions()
        .contains(&("api".into(), TransitionKind::Exhausted, None)));
    s.grant(grant("g2", "api", "5"));
    assert_eq!(
        s.transitions(),
        vec![("api".into(), TransitionKind::Restored, None)]
    );
    assert_eq!(s.balance("api"), dec("5"));
    assert_eq!(s.state("api").status(), Status::Active);
}

#[test]
fn a_meter_never_funded_is_not_exhausted() {
    let mut s = Sim::new();
    s.use_api("e1");
    assert_eq!(s.balance("api"), dec("-1"));
    assert_eq!(s.state("api").status(), Status::Exhausted);
    // It never crossed from > 0, so no `exhausted` transition, and funding it is no `restored`.
    assert_eq!(s.transitions(), vec![]);
    s.grant(grant("g1", "api", "10"));
    assert_eq!(s.transitions(), vec![]);
    assert_eq!(s.balance("api"), dec("9"));
}

#[test]
fn duplicate_event_is_ignored() {
    let mut s = Sim::new();
    s.grant(grant("g1", "api", "10"));
    s.use_api("e1");
    s.take();
    let before = snapshot(&s.book);
    assert_eq!(s.use_api("e1"), Applied::Duplicate);
    // Even with different content: the id decides.
    assert_eq!(
        s.apply(usage("e1", "store", &[("gb", "5"), ("tier", "hot")])),
        Ok(Applied::Duplicate)
    );
    assert_eq!(snapshot(&s.book), before);
    assert!(s.take().is_empty());
    assert_eq!(s.balance("api"), dec("9"));
}

#[test]
fn duplicate_grant_is_ignored() {
    let mut s = Sim::new();
    s.grant(grant("g1", "api", "10"));
    s.take();
    let before = snapshot(&s.book);
    assert_eq!(s.grant(grant("g1", "api", "10")), Applied::Duplicate);
    assert_eq!(s.grant(grant("g1", "tokens", "99")), Applied::Duplicate);
    assert_eq!(snapshot(&s.book), before);
    assert!(s.take().is_empty());
}

#[test]
fn block_mode_floors_at_zero_and_counts_blocked() {
    let mut s = Sim::new();
    s.grant(grant("g1", "tokens", "10"));
    s.apply(usage("e1", "call", &[("tokens", "7")])).unwrap();
    s.apply(usage("e2", "call", &[("tokens", "5")])).unwrap();
    let t = s.state("tokens");
    assert_eq!(t.balance(), Decimal::ZERO);
    assert_eq!(t.consumed, dec("10"));
    assert_eq!(t.blocked, dec("2"));
    assert_eq!(t.debt, Decimal::ZERO);
    s.take();
    // Nothing left: the event is still versioned, with delta 0.
    s.apply(usage("e3", "call", &[("tokens", "4")])).unwrap();
    let changes = s.changes();
    assert!(changes.contains(&("tokens".into(), Reason::Usage, Decimal::ZERO)));
    let t = s.state("tokens");
    assert_eq!(
        (t.balance(), t.blocked, t.version),
        (Decimal::ZERO, dec("6"), 4)
    );
    assert_books_balance(&t);
}

#[test]
fn overage_debt_is_paid_first_by_the_next_grant() {
    let mut s = Sim::new();
    s.grant(grant("g1", "api", "2"));
    for i in 0..5 {
        s.use_api(&format!("e{i}"));
    }
    let api = s.state("api");
    assert_eq!(
        (api.balance(), api.debt, api.overage),
        (dec("-3"), dec("3"), dec("3"))
    );
    s.grant(grant("g2", "api", "10"));
    let api = s.state("api");
    assert_eq!(
        (api.balance(), api.debt, api.overage),
        (dec("7"), Decimal::ZERO, dec("3"))
    );
    // g1, drained, stays held (at 0) for voids.
    assert_eq!(
        s.remainders("api"),
        vec![("g1".into(), Decimal::ZERO), ("g2".into(), dec("7"))]
    );
    // A grant smaller than the debt is swallowed whole: it never held anything, so it is not
    // kept.
    for i in 5..20 {
        s.use_api(&format!("e{i}"));
    }
    s.grant(grant("g3", "api", "5"));
    assert_eq!(s.balance("api"), dec("-3"));
    assert_eq!(
        s.remainders("api"),
        vec![("g1".into(), Decimal::ZERO), ("g2".into(), Decimal::ZERO)]
    );
    assert!(!s.holds("api", "g3"));
    assert_books_balance(&s.state("api"));
}

#[test]
fn draw_down_follows_priority_then_expiry() {
    let mut s = Sim::new();
    let never = grant("a_never", "api", "1");
    let late = Grant {
        expires_at: Some(9_000),
        ..grant("b_late", "api", "1")
    };
    let soon = Grant {
        expires_at: Some(5_000),
        ..grant("c_soon", "api", "1")
    };
    let low_priority = Grant {
        priority: 1,
        expires_at: Some(2_000),
        ..grant("d_prio1", "api", "1")
    };
    let older = Grant {
        expires_at: Some(9_000),
        effective_at: Some(10),
        ..grant("e_older", "api", "1")
    };
    for g in [low_priority, never, late, soon, older] {
        s.grant(g);
    }
    let order: Vec<String> = s.remainders("api").into_iter().map(|(id, _)| id).collect();
    assert_eq!(order, ["c_soon", "e_older", "b_late", "a_never", "d_prio1"]);
    // Usage drains in that order, one unit each.
    let mut drained = Vec::new();
    for i in 0..5 {
        let left = s.funded("api");
        s.use_api(&format!("e{i}"));
        let now_left = s.funded("api");
        drained.extend(left.into_iter().filter(|id| !now_left.contains(id)));
    }
    assert_eq!(
        drained,
        ["c_soon", "e_older", "b_late", "a_never", "d_prio1"]
    );
    // Drained, they are all still held, in the same order.
    let held: Vec<(String, Decimal)> = order.into_iter().map(|id| (id, Decimal::ZERO)).collect();
    assert_eq!(s.remainders("api"), held);
}

#[test]
fn draw_down_ties_break_on_grant_id() {
    let mut s = Sim::new();
    s.grant(Grant {
        effective_at: Some(500),
        ..grant("z", "api", "1")
    });
    s.grant(Grant {
        effective_at: Some(500),
        ..grant("y", "api", "1")
    });
    s.use_api("e1");
    assert_eq!(
        s.remainders("api"),
        vec![("y".into(), Decimal::ZERO), ("z".into(), dec("1"))]
    );
}

#[test]
fn one_event_draws_across_grants() {
    let mut s = Sim::new();
    s.grant(Grant {
        priority: 0,
        ..grant("g1", "tokens", "3")
    });
    s.grant(Grant {
        priority: 1,
        ..grant("g2", "tokens", "10")
    });
    s.apply(usage("e1", "call", &[("tokens", "5")])).unwrap();
    assert_eq!(
        s.remainders("tokens"),
        vec![("g1".into(), Decimal::ZERO), ("g2".into(), dec("8"))]
    );
    let rec = s.book.events[&EventId::parse("e1").unwrap()]
        .clone()
        .unwrap();
    let tokens = rec
        .draws
        .iter()
        .find(|d| d.meter == meter("tokens"))
        .unwrap();
    assert_eq!(
        tokens.grants,
        vec![
            (GrantId::parse("g1").unwrap(), dec("3")),
            (GrantId::parse("g2").unwrap(), dec("2"))
        ]
    );
}

#[test]
fn pending_grant_activates_at_effective_at() {
    let mut s = Sim::new();
    s.grant(Grant {
        effective_at: Some(2_000),
        ..grant("g1", "api", "10")
    });
    assert_eq!(s.balance("api"), Decimal::ZERO);
    assert_eq!(s.state("api").credited, Decimal::ZERO);
    assert_eq!(s.state("api").next_due(), Some(2_000));
    assert_eq!(
        s.changes(),
        vec![("api".into(), Reason::GrantScheduled, Decimal::ZERO)]
    );
    s.advance_to(1_999);
    assert_eq!(s.balance("api"), Decimal::ZERO);
    assert!(s.take().is_empty());
    s.advance_to(2_000);
    assert_eq!(s.balance("api"), dec("10"));
    assert_eq!(s.state("api").credited, dec("10"));
    assert_eq!(
        s.changes(),
        vec![("api".into(), Reason::Activated, dec("10"))]
    );
}

#[test]
fn usage_applies_time_to_its_meter_before_drawing() {
    let mut s = Sim::new();
    s.grant(Grant {
        effective_at: Some(2_000),
        ..grant("g1", "api", "10")
    });
    s.now = 2_500; // no tick in between
    s.use_api("e1");
    assert_eq!(s.balance("api"), dec("9"));
    assert_eq!(s.state("api").overage, Decimal::ZERO);
}

#[test]
fn grant_expires_on_advance() {
    let mut s = Sim::new();
    s.grant(Grant {
        expires_at: Some(3_000),
        ..grant("g1", "api", "10")
    });
    s.grant(grant("g2", "api", "1"));
    s.use_api("e1");
    s.take();
    s.advance_to(2_999);
    assert_eq!(s.balance("api"), dec("10"));
    assert!(s.take().is_empty());
    // `expires_at` is exclusive: at 3000 the grant is gone.
    s.advance_to(3_000);
    assert_eq!(s.balance("api"), dec("1"));
    assert_eq!(s.state("api").expired, dec("9"));
    assert_eq!(
        s.changes(),
        vec![("api".into(), Reason::Expired, dec("-9"))]
    );
    assert_books_balance(&s.state("api"));
    // Nothing more is due.
    s.advance_to(10_000);
    assert!(s.take().is_empty());
    assert_eq!(s.state("api").next_due(), None);
}

#[test]
fn grant_already_expired_on_arrival_is_credited_and_forfeited() {
    let mut s = Sim::new();
    s.grant(Grant {
        expires_at: Some(1_000),
        ..grant("g1", "api", "10")
    });
    let api = s.state("api");
    assert_eq!(
        (api.balance(), api.credited, api.expired),
        (Decimal::ZERO, dec("10"), dec("10"))
    );
    assert_eq!(
        s.changes(),
        vec![("api".into(), Reason::Expired, Decimal::ZERO)]
    );
    assert_eq!(
        s.grant(Grant {
            expires_at: Some(1_000),
            ..grant("g1", "api", "10")
        }),
        Applied::Duplicate
    );
}

#[test]
fn grant_that_starts_and_ends_between_ticks_is_credited_then_forfeited() {
    let mut s = Sim::new();
    s.use_api("e1"); // a debt of 1
    s.grant(Grant {
        effective_at: Some(2_000),
        expires_at: Some(2_500),
        ..grant("g1", "api", "10")
    });
    s.advance_to(3_000);
    let api = s.state("api");
    assert_eq!(
        (api.balance(), api.credited, api.expired),
        (Decimal::ZERO, dec("10"), dec("9"))
    );
    assert_books_balance(&api);
}

#[test]
fn cycle_grant_ends_previous_cycle_keeping_rollover() {
    let mut s = Sim::new();
    s.grant(cycle("c1", "api", "100", "sub_1", "20"));
    for i in 0..30 {
        s.use_api(&format!("e{i}"));
    }
    s.take();
    s.now = 2_000;
    s.grant(cycle("c2", "api", "100", "sub_1", "20"));
    let api = s.state("api");
    // 70 left of c1: 20 roll over, 50 are forfeited.
    assert_eq!(api.balance(), dec("120"));
    assert_eq!(api.expired, dec("50"));
    assert_eq!(api.cycle_credited, dec("100"));
    assert_eq!(
        s.changes(),
        vec![
            ("api".into(), Reason::CycleEnd, dec("-50")),
            ("api".into(), Reason::Grant, dec("100"))
        ]
    );
    // The carried-over remainder is a cycle that has ended: the next cycle does not end it again.
    s.grant(cycle("c3", "api", "100", "sub_1", "20"));
    assert_eq!(
        s.remainders("api"),
        vec![
            ("c1".into(), dec("20")),
            ("c2".into(), dec("20")),
            ("c3".into(), dec("100"))
        ]
    );
    assert_books_balance(&s.state("api"));
}

#[test]
fn cycle_renewal_does_not_flap_through_exhausted_or_low() {
    let mut s = Sim::new();
    s.grant(cycle("c1", "api", "10", "sub_1", "0"));
    s.use_api("e1");
    s.take();
    s.grant(cycle("c2", "api", "10", "sub_1", "0"));
    // Two changes (the 9 left forfeited, then 10 granted) but no crossing: 9 -> 10.
    let out = s.take();
    let reasons: Vec<Reason> = out
        .iter()
        .filter_map(|o| match o {
            Output::Changed(c) => Some(c.reason),
            Output::Transition(_) | Output::TopUp(_) => None,
        })
        .collect();
    assert_eq!(reasons, [Reason::CycleEnd, Reason::Grant]);
    assert!(
        out.iter().all(|o| matches!(o, Output::Changed(_))),
        "{out:?}"
    );
    assert!(!s.state("api").exhausted);
    // A renewal that does lift an exhausted meter is one `restored`.
    for i in 2..12 {
        s.use_api(&format!("e{i}"));
    }
    s.take();
    s.grant(cycle("c3", "api", "10", "sub_1", "0"));
    assert_eq!(
        s.transitions(),
        vec![("api".into(), TransitionKind::Restored, None)]
    );
}

#[test]
fn cycle_grant_without_rollover_forfeits_the_whole_remainder() {
    let mut s = Sim::new();
    s.grant(cycle("c1", "api", "10", "sub_1", "0"));
    s.grant(cycle("c2", "api", "10", "sub_1", "0"));
    assert_eq!(s.remainders("api"), vec![("c2".into(), dec("10"))]);
    assert_eq!(s.state("api").expired, dec("10"));
}

#[test]
fn cycle_grant_leaves_top_ups_and_other_subscriptions_alone() {
    let mut s = Sim::new();
    s.grant(cycle("c1", "api", "10", "sub_1", "0"));
    s.grant(cycle("d1", "api", "10", "sub_2", "0"));
    s.grant(grant("t1", "api", "5"));
    s.grant(cycle("c2", "api", "10", "sub_1", "0"));
    let mut left = s.remainders("api");
    left.sort();
    assert_eq!(
        left,
        vec![
            ("c2".into(), dec("10")),
            ("d1".into(), dec("10")),
            ("t1".into(), dec("5"))
        ]
    );
}

#[test]
fn pending_cycle_grant_ends_the_previous_cycle_when_it_activates() {
    let mut s = Sim::new();
    s.grant(cycle("c1", "api", "10", "sub_1", "2"));
    s.grant(Grant {
        effective_at: Some(5_000),
        ..cycle("c2", "api", "10", "sub_1", "2")
    });
    assert_eq!(s.balance("api"), dec("10"));
    s.advance_to(5_000);
    assert_eq!(s.balance("api"), dec("12"));
    assert_eq!(s.state("api").expired, dec("8"));
}

#[test]
fn void_usage_gives_back_to_the_grants_it_drew_from() {
    let mut s = Sim::new();
    s.grant(Grant {
        priority: 0,
        ..grant("g1", "tokens", "5")
    });
    s.grant(Grant {
        priority: 1,
        ..grant("g2", "tokens", "5")
    });
    s.apply(usage("e1", "call", &[("tokens", "3")])).unwrap();
    s.apply(usage("e2", "call", &[("tokens", "4")])).unwrap();
    assert_eq!(
        s.remainders("tokens"),
        vec![("g1".into(), Decimal::ZERO), ("g2".into(), dec("3"))]
    );
    s.take();
    s.apply(void_usage("e2")).unwrap();
    // e2 drew 2 from g1 (drained, still held) and 2 from g2: both get their units back.
    assert_eq!(
        s.remainders("tokens"),
        vec![("g1".into(), dec("2")), ("g2".into(), dec("5"))]
    );
    let t = s.state("tokens");
    assert_eq!(
        (t.balance(), t.consumed, t.voided),
        (dec("7"), dec("7"), dec("4"))
    );
    assert_books_balance(&t);
    // The api meter's unit of e2 comes back too (it was overage: the debt is repaid).
    let api = s.state("api");
    assert_eq!(
        (api.balance(), api.overage, api.debt),
        (dec("-1"), dec("1"), dec("1"))
    );
    assert!(s.changes().iter().all(|(_, r, _)| *r == Reason::VoidUsage));
}

#[test]
fn void_usage_returns_units_to_a_drained_grant_still_held() {
    let mut s = Sim::new();
    s.grant(Grant {
        expires_at: Some(5_000),
        ..grant("g1", "tokens", "4")
    });
    s.apply(usage("e1", "call", &[("tokens", "4")])).unwrap();
    assert_eq!(s.remainders("tokens"), vec![("g1".into(), Decimal::ZERO)]);
    assert_eq!(s.state("tokens").status(), Status::Exhausted);
    s.take();
    s.apply(void_usage("e1")).unwrap();
    // Back on g1 itself: no adjustment, and the units keep g1's expiry.
    assert_eq!(s.remainders("tokens"), vec![("g1".into(), dec("4"))]);
    assert!(!s.holds("tokens", "void:e1"));
    assert!(s
        .transitions()
        .contains(&("tokens".into(), TransitionKind::Restored, None)));
    let t = s.state("tokens");
    assert_eq!((t.balance(), t.voided), (dec("4"), dec("4")));
    assert_books_balance(&t);
    s.advance_to(5_000);
    let t = s.state("tokens");
    assert_eq!((t.balance(), t.expired), (Decimal::ZERO, dec("4")));
    assert!(t.grants.is_empty());
    assert_books_balance(&t);
}

#[test]
fn void_usage_of_an_expired_grant_returns_a_non_expiring_adjustment() {
    let mut s = Sim::new();
    s.grant(Grant {
        expires_at: Some(5_000),
        ..grant("g1", "tokens", "4")
    });
    s.apply(usage("e1", "call", &[("tokens", "4")])).unwrap();
    s.advance_to(5_000);
    assert!(!s.holds("tokens", "g1"));
    s.apply(void_usage("e1")).unwrap();
    let t = s.state("tokens");
    let slot = t
        .grants
        .iter()
        .find(|g| g.id.as_str() == "void:e1")
        .expect("adjustment");
    assert_eq!(
        (slot.kind, slot.priority, slot.expires_at, slot.remaining),
        (GrantKind::Adjustment, 255, None, dec("4"))
    );
    assert_eq!(slot.effective_at, 5_000);
    s.advance_to(60_000);
    assert_eq!(s.balance("tokens"), dec("4"));
    assert_books_balance(&s.state("tokens"));
}

#[test]
fn void_usage_of_a_voided_or_cycle_ended_grant_returns_an_adjustment() {
    let mut s = Sim::new();
    s.grant(grant("t1", "api", "1"));
    s.use_api("e1");
    s.apply(void_grant("t1")).unwrap();
    assert!(!s.holds("api", "t1"));
    s.apply(void_usage("e1")).unwrap();
    assert_eq!(s.remainders("api"), vec![("void:e1".into(), dec("1"))]);
    // A cycle grant drained to 0 ends with nothing carried over: gone at the next cycle.
    s.grant(Grant {
        priority: 0,
        ..cycle("c1", "tokens", "3", "sub_1", "5")
    });
    s.apply(usage("e2", "call", &[("tokens", "3")])).unwrap();
    assert_eq!(s.remainders("tokens"), vec![("c1".into(), Decimal::ZERO)]);
    s.grant(cycle("c2", "tokens", "10", "sub_1", "5"));
    assert!(!s.holds("tokens", "c1"));
    assert_eq!(s.state("tokens").expired, Decimal::ZERO);
    s.apply(void_usage("e2")).unwrap();
    assert_eq!(
        s.remainders("tokens"),
        vec![("c2".into(), dec("10")), ("void:e2".into(), dec("3"))]
    );
    assert_books_balance(&s.state("tokens"));
}

#[test]
fn a_carried_over_cycle_grant_drained_later_stays_held() {
    let mut s = Sim::new();
    s.grant(cycle("c1", "tokens", "10", "sub_1", "4"));
    s.apply(usage("e1", "call", &[("tokens", "2")])).unwrap();
    // c1 ends keeping 4 of its 8; the new cycle's grant is drawn after it (same priority, no
    // expiry, older first).
    s.grant(cycle("c2", "tokens", "10", "sub_1", "4"));
    s.apply(usage("e2", "call", &[("tokens", "5")])).unwrap();
    assert_eq!(
        s.remainders("tokens"),
        vec![("c1".into(), Decimal::ZERO), ("c2".into(), dec("9"))]
    );
    // Its cycle already ended (it is never ended again): neither this subscription's next
    // cycle nor another subscription's removes it.
    s.grant(cycle("d1", "tokens", "10", "sub_2", "0"));
    s.grant(cycle("c3", "tokens", "10", "sub_1", "4"));
    assert!(s.holds("tokens", "c1"));
    s.apply(void_usage("e2")).unwrap();
    assert!(!s.holds("tokens", "void:e2"));
    let c1 = s
        .state("tokens")
        .grants
        .into_iter()
        .find(|g| g.id.as_str() == "c1")
        .expect("held");
    assert_eq!((c1.remaining, c1.cycle_ended), (dec("4"), true));
    assert_books_balance(&s.state("tokens"));
}

#[test]
fn drained_grant_is_removed_at_expiry_without_a_change() {
    let mut s = Sim::new();
    s.grant(Grant {
        expires_at: Some(3_000),
        ..grant("g1", "api", "2")
    });
    s.grant(grant("g2", "api", "5"));
    s.use_api("e1");
    s.use_api("e2");
    assert_eq!(
        s.remainders("api"),
        vec![("g1".into(), Decimal::ZERO), ("g2".into(), dec("5"))]
    );
    assert_eq!(s.state("api").next_due(), Some(3_000));
    s.take();
    s.book.take_dirty();
    let version = s.state("api").version;
    s.advance_to(3_000);
    // Nothing was left to forfeit: no change, no version, only the slot is gone.
    assert!(s.take().is_empty());
    let api = s.state("api");
    assert_eq!(
        (api.version, api.balance(), api.expired),
        (version, dec("5"), Decimal::ZERO)
    );
    assert_eq!(s.remainders("api"), vec![("g2".into(), dec("5"))]);
    assert_eq!(api.next_due(), None);
    // The projection did change (the slot is gone), so it is still written.
    assert!(s.book.take_dirty().contains(&Dirty::Meter(meter("api"))));
    // Gone, so a void gives the units back as an adjustment.
    s.apply(void_usage("e1")).unwrap();
    assert_eq!(
        s.remainders("api"),
        vec![("g2".into(), dec("5")), ("void:e1".into(), dec("1"))]
    );
}

#[test]
fn drained_grants_beyond_the_cap_are_pruned_oldest_first() {
    let mut s = Sim::new();
    assert_eq!(MAX_DRAINED, 16);
    // Two old grants (a tie on `effective_at`) drawn last, then MAX_DRAINED - 1 newer ones
    // drawn first (they expire sooner): the drained ones dropped are the oldest, not the first
    // drained.
    for id in ["old_b", "old_a"] {
        s.grant(Grant {
            effective_at: Some(100),
            expires_at: Some(50_000),
            ..grant(id, "api", "1")
        });
    }
    let newer: Vec<String> = (1..MAX_DRAINED).map(|i| format!("n{i:02}")).collect();
    for (i, id) in newer.iter().enumerate() {
        s.grant(Grant {
            effective_at: Some(200 + i as i64),
            expires_at: Some(10_000),
            ..grant(id, "api", "1")
        });
    }
    for i in 1..MAX_DRAINED {
        s.use_api(&format!("e{i:02}"));
    }
    assert_eq!(s.funded("api"), ["old_a", "old_b"]);
    s.use_api("e_a"); // drains old_a: MAX_DRAINED drained, all kept
    assert!(s.holds("api", "old_a"));
    s.use_api("e_b"); // drains old_b: one too many, the oldest goes (old_a, by id)
    let drained = |s: &Sim| -> Vec<String> {
        let mut ids: Vec<String> = s.remainders("api").into_iter().map(|(id, _)| id).collect();
        ids.sort();
        ids
    };
    let mut expected = newer.clone();
    expected.push("old_b".into());
    assert_eq!(drained(&s), expected);
    assert_eq!(s.state("api").grants.len(), MAX_DRAINED);
    // One more drained grant, newer than all: old_b, now the oldest, goes.
    s.grant(grant("n99", "api", "1"));
    s.use_api("e99");
    let mut expected = newer.clone();
    expected.push("n99".into());
    assert_eq!(drained(&s), expected);
    let api = s.state("api");
    assert_eq!(
        (api.balance(), api.expired, api.version),
        (Decimal::ZERO, Decimal::ZERO, 2 * MAX_DRAINED as u64 + 4)
    );
    // Voids: a pruned grant's units come back as the adjustment, a held one's to it.
    s.apply(void_usage("e_a")).unwrap();
    s.apply(void_usage("e_b")).unwrap();
    s.apply(void_usage("e01")).unwrap();
    let api = s.state("api");
    let held: BTreeMap<String, Decimal> = api
        .grants
        .iter()
        .filter(|g| g.remaining > Decimal::ZERO)
        .map(|g| (g.id.to_string(), g.remaining))
        .collect();
    let want: BTreeMap<String, Decimal> = [("void:e_a", "1"), ("void:e_b", "1"), ("n01", "1")]
        .into_iter()
        .map(|(id, v)| (id.to_string(), dec(v)))
        .collect();
    assert_eq!(held, want);
    assert_eq!(api.balance(), dec("3"));
    assert_books_balance(&api);
    // n01's unit keeps its expiry (the other n.. go silently, drained); the adjustments never
    // expire; n99, drained and never expiring, is still held.
    s.take();
    s.advance_to(60_000);
    assert_eq!(
        s.changes(),
        vec![("api".into(), Reason::Expired, dec("-1"))]
    );
    assert_eq!(
        s.remainders("api"),
        vec![
            ("n99".into(), Decimal::ZERO),
            ("void:e_a".into(), dec("1")),
            ("void:e_b".into(), dec("1"))
        ]
    );
    assert_books_balance(&s.state("api"));
}

#[test]
fn pruning_a_drained_slot_leaves_a_funded_slot_of_the_same_id() {
    // Event ids too long for `void:<id>` give their adjustments the same id, `void`.
    let long = |c: &str| c.repeat(MAX_ID_LEN - 4);
    let mut s = Sim::new();
    for (g, e, exp) in [("g1", long("a"), 2_000), ("g2", long("b"), 3_000)] {
        s.grant(Grant {
            expires_at: Some(exp),
            ..grant(g, "api", "1")
        });
        s.use_api(&e);
        s.advance_to(exp);
        s.apply(void_usage(&e)).unwrap();
    }
    assert_eq!(
        s.remainders("api"),
        vec![("void".into(), dec("1")), ("void".into(), dec("1"))]
    );
    // The older `void` is drained, then MAX_DRAINED newer grants: it is the one pruned.
    s.use_api("e0");
    for i in 1..=MAX_DRAINED {
        s.grant(grant(&format!("n{i:02}"), "api", "1"));
        s.use_api(&format!("e{i:02}"));
    }
    let api = s.state("api");
    assert_eq!(api.grants.len(), MAX_DRAINED + 1);
    assert_eq!(api.balance(), dec("1"));
    assert_books_balance(&api);
}

#[test]
fn void_usage_repays_the_debt_it_made() {
    let mut s = Sim::new();
    s.use_api("e1");
    s.use_api("e2");
    s.apply(void_usage("e1")).unwrap();
    let api = s.state("api");
    assert_eq!(
        (api.balance(), api.debt, api.overage),
        (dec("-1"), dec("1"), dec("1"))
    );
    // Debt already paid by a grant comes back as credit.
    s.grant(grant("g1", "api", "3"));
    s.apply(void_usage("e2")).unwrap();
    let api = s.state("api");
    assert_eq!(
        (api.balance(), api.debt, api.overage),
        (dec("3"), Decimal::ZERO, Decimal::ZERO)
    );
    assert_books_balance(&api);
}

#[test]
fn void_usage_takes_back_blocked_units() {
    let mut s = Sim::new();
    s.grant(grant("g1", "tokens", "2"));
    s.apply(usage("e1", "call", &[("tokens", "5")])).unwrap();
    assert_eq!(s.state("tokens").blocked, dec("3"));
    s.apply(void_usage("e1")).unwrap();
    let t = s.state("tokens");
    assert_eq!(
        (t.balance(), t.blocked, t.voided),
        (dec("2"), Decimal::ZERO, dec("2"))
    );
}

#[test]
fn void_usage_twice_is_rejected_and_changes_nothing() {
    let mut s = Sim::new();
    s.grant(grant("g1", "api", "10"));
    s.use_api("e1");
    assert_eq!(s.apply(void_usage("e1")), Ok(Applied::Applied));
    s.take();
    let before = snapshot(&s.book);
    s.now += 10;
    let err = s.apply(void_usage("e1")).unwrap_err();
    assert_eq!(err, LedgerError::AlreadyVoided("usage event"));
    assert_eq!(err.reason(), "void_duplicate");
    assert_eq!(snapshot(&s.book), before);
    assert!(s.take().is_empty());
    // A voided event id is still a duplicate.
    assert_eq!(s.use_api("e1"), Applied::Duplicate);
    assert_eq!(s.balance("api"), dec("10"));
}

#[test]
fn void_of_unknown_ids_is_rejected_and_changes_nothing() {
    let mut s = Sim::new();
    s.grant(Grant {
        expires_at: Some(2_000),
        ..grant("g1", "api", "10")
    });
    s.take();
    s.now = 3_000; // an expiry is due, yet a rejected input must not apply it
    load_refs(&mut s.book, &void_usage("nope"));
    load_refs(&mut s.book, &void_grant("nope"));
    let before = snapshot(&s.book);
    let err = s.apply(void_usage("nope")).unwrap_err();
    assert_eq!(err.reason(), "void_unknown");
    assert_eq!(
        s.apply(void_grant("nope")).unwrap_err(),
        LedgerError::VoidUnknown("grant")
    );
    assert_eq!(snapshot(&s.book), before);
    assert!(s.take().is_empty());
}

#[test]
fn void_grant_removes_remainder() {
    let mut s = Sim::new();
    s.grant(grant("g1", "api", "10"));
    s.grant(grant("g2", "api", "5"));
    s.use_api("e1");
    s.take();
    s.apply(void_grant("g1")).unwrap();
    let api = s.state("api");
    assert_eq!((api.balance(), api.credited), (dec("5"), dec("6")));
    assert_eq!(
        s.changes(),
        vec![("api".into(), Reason::VoidGrant, dec("-9"))]
    );
    assert_books_balance(&api);
    assert_eq!(
        s.apply(void_grant("g1")).unwrap_err(),
        LedgerError::AlreadyVoided("grant")
    );
    // A voided grant id is still a duplicate.
    assert_eq!(s.grant(grant("g1", "api", "10")), Applied::Duplicate);
}

#[test]
fn void_grant_of_a_pending_grant_never_credits_it() {
    let mut s = Sim::new();
    s.grant(Grant {
        effective_at: Some(2_000),
        ..grant("g1", "api", "10")
    });
    s.apply(void_grant("g1")).unwrap();
    s.advance_to(3_000);
    let api = s.state("api");
    assert_eq!(
        (api.balance(), api.credited, api.grants.len()),
        (Decimal::ZERO, Decimal::ZERO, 0)
    );
}

#[test]
fn void_grant_of_a_drained_grant_is_recorded_with_delta_zero() {
    let mut s = Sim::new();
    s.grant(grant("g1", "api", "1"));
    s.use_api("e1");
    s.take();
    assert!(s.holds("api", "g1"));
    s.apply(void_grant("g1")).unwrap();
    assert_eq!(
        s.changes(),
        vec![("api".into(), Reason::VoidGrant, Decimal::ZERO)]
    );
    assert!(s.state("api").grants.is_empty());
}

#[test]
fn low_balance_fires_once_per_threshold_and_rearms() {
    let mut s = Sim::new();
    // A top-up keeps the fractional threshold at half of all credits: 5 of 10.
    s.grant(grant("g1", "api", "10"));
    s.take();
    let mut fired = Vec::new();
    for i in 0..8 {
        s.use_api(&format!("e{i}"));
        fired.push(s.transitions());
    }
    // 10 -> 9 ... -> 2: below 5 at the 6th event (balance 4), below 3 at the 8th (balance 2).
    let low = |t: &str| vec![("api".to_string(), TransitionKind::Low, Some(dec(t)))];
    assert_eq!(fired[5], low("5"));
    assert_eq!(fired[7], low("3"));
    assert!(fired
        .iter()
        .enumerate()
        .all(|(i, f)| i == 5 || i == 7 || f.is_empty()));
    assert_eq!(s.state("api").status(), Status::Low);
    assert_eq!(s.state("api").low_fired, 0b11);
    // Back above 3 only (balance 6 of 14 credited: the fraction is now 7): one re-armed.
    s.grant(grant("g2", "api", "4"));
    assert_eq!(s.transitions(), vec![]);
    assert_eq!(s.state("api").low_fired, 0b10);
    for i in 8..12 {
        s.use_api(&format!("e{i}"));
    }
    assert_eq!(s.transitions(), low("3"));
    // Well above both: re-armed, status active again.
    s.grant(grant("g3", "api", "100"));
    assert_eq!(s.state("api").low_fired, 0);
    assert_eq!(s.state("api").status(), Status::Active);
}

#[test]
fn fractional_thresholds_are_relative_to_the_cycle_credits() {
    let mut s = Sim::new();
    s.grant(cycle("c1", "tokens", "100", "sub_1", "0"));
    s.take();
    s.apply(usage("e1", "call", &[("tokens", "74")])).unwrap();
    assert_eq!(s.transitions(), vec![]);
    s.apply(usage("e2", "call", &[("tokens", "2")])).unwrap();
    assert_eq!(
        s.transitions(),
        vec![("tokens".into(), TransitionKind::Low, Some(dec("25")))]
    );
    // A new cycle of 40: the base is now 40, the threshold 10.
    s.grant(cycle("c2", "tokens", "40", "sub_1", "0"));
    assert_eq!(s.transitions(), vec![]);
    assert_eq!(s.state("tokens").cycle_credited, dec("40"));
    assert_eq!(s.state("tokens").low_fired, 0);
    s.apply(usage("e3", "call", &[("tokens", "31")])).unwrap();
    let t = s.transitions();
    assert!(
        t.contains(&("tokens".into(), TransitionKind::Low, Some(dec("10")))),
        "{t:?}"
    );
}

#[test]
fn multi_meter_event_draws_from_each() {
    let mut s = Sim::new();
    s.grant(grant("g1", "api", "10"));
    s.grant(grant("g2", "tokens", "100"));
    s.take();
    s.apply(usage("e1", "call", &[("tokens", "42.5")])).unwrap();
    assert_eq!(s.balance("api"), dec("9"));
    assert_eq!(s.balance("tokens"), dec("57.5"));
    let changes = s.changes();
    assert_eq!(
        changes,
        vec![
            ("api".into(), Reason::Usage, dec("-1")),
            ("tokens".into(), Reason::Usage, dec("-42.5"))
        ]
    );
    let rec = s.book.events[&EventId::parse("e1").unwrap()]
        .clone()
        .unwrap();
    assert_eq!(rec.draws.len(), 2);
    // A zero quantity draws nothing and is not versioned.
    s.apply(usage("e2", "call", &[("tokens", "0")])).unwrap();
    assert_eq!(s.state("tokens").version, 2);
    assert_eq!(s.state("api").version, 3);
}

#[test]
fn meter_filters_select_the_events_counted() {
    let mut s = Sim::new();
    s.grant(grant("g1", "storage", "10"));
    assert_eq!(
        s.apply(usage("e1", "store", &[("gb", "3"), ("tier", "cold")])),
        Ok(Applied::NoMeter)
    );
    assert_eq!(
        s.apply(usage("e2", "store", &[("gb", "3")])),
        Ok(Applied::NoMeter)
    );
    assert_eq!(
        s.apply(usage("e3", "store", &[("gb", "3"), ("tier", "hot")])),
        Ok(Applied::Applied)
    );
    assert_eq!(s.balance("storage"), dec("7"));
}

#[test]
fn event_matching_no_meter_changes_nothing() {
    let mut s = Sim::new();
    s.grant(grant("g1", "api", "10"));
    s.take();
    let before = snapshot(&s.book);
    assert_eq!(s.apply(usage("e1", "signup", &[])), Ok(Applied::NoMeter));
    assert_eq!(snapshot(&s.book).0, before.0);
    assert_eq!(s.book.events[&EventId::parse("e1").unwrap()], None);
    assert!(s.take().is_empty());
}

#[test]
fn sum_meter_rejects_missing_or_negative_property_and_changes_nothing() {
    let mut s = Sim::new();
    s.grant(grant("g1", "api", "10"));
    s.grant(grant("g2", "tokens", "10"));
    s.take();
    let before = snapshot(&s.book);
    let cases: [&[(&str, &str)]; 5] = [
        &[],
        &[("tokens", "-1")],
        &[("tokens", "abc")],
        &[("tokens", "1e3")],
        &[("tokens", "NaN")],
    ];
    for props in cases {
        let err = s.apply(usage("e1", "call", props)).unwrap_err();
        assert!(
            matches!(
                err,
                LedgerError::MissingProperty(_) | LedgerError::InvalidAmount(_)
            ),
            "{err}"
        );
        // The whole event is rejected: the count meter does not draw either.
        assert_eq!(snapshot(&s.book).0, before.0, "{props:?}");
        assert_eq!(s.book.events[&EventId::parse("e1").unwrap()], None);
    }
    assert_eq!(
        s.apply(usage("e1", "call", &[])).unwrap_err().reason(),
        "missing_property"
    );
    assert!(s.take().is_empty());
    // The id is not burnt: a corrected event applies.
    assert_eq!(
        s.apply(usage("e1", "call", &[("tokens", "2")])),
        Ok(Applied::Applied)
    );
}

#[test]
fn unknown_meter_grant_is_rejected() {
    let mut s = Sim::new();
    let before = snapshot(&s.book);
    let err = s
        .apply(Input::Grant(grant("g1", "nope", "10")))
        .unwrap_err();
    assert_eq!(err, LedgerError::UnknownMeter("nope".into()));
    assert_eq!(err.reason(), "unknown_meter");
    assert_eq!(snapshot(&s.book).0, before.0);
    assert_eq!(s.book.grants[&GrantId::parse("g1").unwrap()], None);
}

#[test]
fn invalid_grants_are_rejected_and_change_nothing() {
    let mut s = Sim::new();
    s.grant(grant("g0", "api", "1"));
    s.take();
    s.now = 5_000;
    let before = snapshot(&s.book);
    let bad = [
        (grant("g1", "api", "0"), "invalid_amount"),
        (grant("g2", "api", "-3"), "invalid_amount"),
        (
            Grant {
                subscription_id: None,
                ..cycle("g3", "api", "1", "s", "0")
            },
            "invalid_grant",
        ),
        (
            Grant {
                effective_at: Some(6_000),
                expires_at: Some(6_000),
                ..grant("g4", "api", "1")
            },
            "invalid_grant",
        ),
    ];
    for (g, reason) in bad {
        assert_eq!(s.apply(Input::Grant(g)).unwrap_err().reason(), reason);
    }
    assert_eq!(snapshot(&s.book).0, before.0);
    assert!(s.take().is_empty());
}

#[test]
fn versions_increase_by_one_per_change() {
    let mut s = Sim::new();
    s.grant(cycle("c1", "api", "10", "sub", "1"));
    s.grant(Grant {
        effective_at: Some(2_000),
        expires_at: Some(3_000),
        ..grant("g2", "api", "5")
    });
    s.use_api("e1");
    s.use_api("e1");
    s.grant(cycle("c2", "api", "10", "sub", "1")); // cycle end + grant: two changes
    s.apply(void_usage("e1")).unwrap();
    s.advance_to(2_000);
    s.advance_to(3_000);
    s.apply(void_grant("c1")).unwrap();
    let versions: Vec<u64> = s
        .take()
        .into_iter()
        .filter_map(|o| match o {
            Output::Changed(c) => Some(c.version),
            Output::Transition(_) | Output::TopUp(_) => None,
        })
        .collect();
    assert_eq!(versions, (1..=9).collect::<Vec<u64>>());
    assert_eq!(s.state("api").version, 9);
    assert_eq!(s.state("api").updated_at, 3_000);
}

#[test]
fn dirty_names_every_changed_key() {
    let mut s = Sim::new();
    s.grant(grant("g1", "api", "10"));
    s.use_api("e1");
    let dirty = s.book.take_dirty();
    // `tokens` saw a zero quantity: unchanged, so not to be written.
    let expected: BTreeSet<Dirty> = [
        Dirty::Meter(meter("api")),
        Dirty::Grant(GrantId::parse("g1").unwrap()),
        Dirty::Event(EventId::parse("e1").unwrap()),
    ]
    .into_iter()
    .collect();
    assert_eq!(dirty, expected);
    assert!(s.book.take_dirty().is_empty());
    s.use_api("e1");
    assert!(s.book.take_dirty().is_empty());
}

#[test]
fn outputs_carry_the_cause_and_the_time() {
    let mut s = Sim::new();
    s.now = 1_234;
    s.grant(grant("g1", "api", "1"));
    s.use_api("e1");
    let out = s.take();
    let Output::Changed(c) = &out[1] else {
        panic!("{out:?}")
    };
    assert_eq!(
        (c.cause_id.as_str(), c.at, c.reason, c.balance),
        ("e1", 1_234, Reason::Usage, Decimal::ZERO)
    );
    assert_eq!(c.customer_id, customer());
    let Output::Transition(t) = &out[2] else {
        panic!("{out:?}")
    };
    assert_eq!(
        (t.kind, t.version, t.cause_id.as_str()),
        (TransitionKind::Exhausted, 2, "e1")
    );
}

#[test]
fn parse_amount_rejects_exponents_separators_and_hidden_precision() {
    for s in ["1e3", "1E3", "1_000", "0x10", " 1 2"] {
        assert!(parse_amount(s).is_err(), "{s}");
    }
    // Digits beyond what a Decimal holds are rounded by its parser: still too precise.
    assert!(parse_amount("1.0000000000000000000000000000001").is_err());
    assert!(parse_amount("0.00000000000000000000000000001").is_err());
    assert_eq!(parse_amount("0.1234567890").unwrap(), dec("0.123456789"));
    assert_eq!(parse_amount(" 12.50 ").unwrap(), dec("12.5"));
    assert_eq!(parse_amount("+3").unwrap(), dec("3"));
}

// ---------------------------------------------------------------------------------------------
// The reference model (`drawdown_model`): the same meters and inputs, in its own types.
// ---------------------------------------------------------------------------------------------

/// The test meters as the model's.
static RULES: LazyLock<model::Rules> = LazyLock::new(|| {
    model::Rules::new(
        SPECS
            .iter()
            .map(|s| model::Meter {
                name: s.name.into(),
                event: s.event.into(),
                filter: s
                    .filter
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                aggregation: match s.sum {
                    None => model::Aggregation::Count,
                    Some(p) => model::Aggregation::Sum(p.into()),
                },
                on_exhausted: if s.block {
                    model::OnExhausted::Block
                } else {
                    model::OnExhausted::Overage
                },
                lows: s
                    .lows
                    .iter()
                    .map(|&(fraction, v)| {
                        if fraction {
                            model::Low::Fraction(dec(v))
                        } else {
                            model::Low::Units(dec(v))
                        }
                    })
                    .collect(),
                auto_top_up: s.auto.map(|(below, pack)| model::AutoTopUp {
                    below: dec(below),
                    pack: pack.into(),
                }),
            })
            .collect(),
    )
});

/// An input in the model's types.
fn to_model(input: &Input) -> model::Input {
    match input {
        Input::Usage(u) => model::Input::Usage(model::Usage {
            id: u.id.to_string(),
            name: u.name.clone(),
            properties: u.properties.clone(),
            reservation: u.reservation_id.as_ref().map(|r| r.to_string()),
        }),
        Input::Grant(g) => model::Input::Grant(model::Grant {
            id: g.grant_id.to_string(),
            meter: g.meter.to_string(),
            amount: g.amount,
            kind: match g.kind {
                GrantKind::Cycle => model::GrantKind::Cycle,
                GrantKind::TopUp => model::GrantKind::TopUp,
                GrantKind::Adjustment => model::GrantKind::Adjustment,
            },
            priority: g.priority,
            effective_at: g.effective_at,
            expires_at: g.expires_at,
            subscription: g.subscription_id.clone(),
            rollover: g.rollover,
        }),
        Input::VoidGrant { grant_id, .. } => model::Input::VoidGrant(grant_id.to_string()),
        Input::VoidUsage { event_id, .. } => model::Input::VoidUsage(event_id.to_string()),
        Input::Reserve(r) => model::Input::Reserve(model::Reserve {
            id: r.reservation_id.to_string(),
            meter: r.meter.to_string(),
            units: r.units,
            ttl: r.ttl_ms,
        }),
        Input::Release { reservation_id, .. } => model::Input::Release(reservation_id.to_string()),
    }
}

/// A ledger output in the model's types, so that outputs compare field by field. (That a
/// top-up request is automatic and carries its balance and threshold: `check_outputs`.)
fn output_to_model(o: &Output) -> model::Output {
    match o {
        Output::Changed(c) => model::Output::Changed(model::Change {
            customer: c.customer_id.to_string(),
            meter: c.meter.to_string(),
            version: c.version,
            delta: c.delta,
            reason: model::Reason::from_label(c.reason.as_str()).expect("a reason of the model"),
            cause: c.cause_id.clone(),
            balance: c.balance,
            credited: c.credited,
            consumed: c.consumed,
            overage: c.overage,
            blocked: c.blocked,
            at: c.at,
        }),
        Output::Transition(t) => model::Output::Transition(model::Transition {
            kind: match t.kind {
                TransitionKind::Exhausted => model::TransitionKind::Exhausted,
                TransitionKind::Restored => model::TransitionKind::Restored,
                TransitionKind::Low => model::TransitionKind::Low,
                TransitionKind::Forecast => {
                    unreachable!("no meter of the tests has forecast_alert")
                }
            },
            customer: t.customer_id.to_string(),
            meter: t.meter.to_string(),
            version: t.version,
            balance: t.balance,
            threshold: t.threshold,
            cause: t.cause_id.clone(),
            at: t.at,
        }),
        Output::TopUp(t) => model::Output::TopUp(model::TopUp {
            request_id: t.request_id.clone(),
            customer: t.customer_id.to_string(),
            meter: t.meter.to_string(),
            pack: t.pack.clone(),
            at: t.requested_at,
            balance: t.balance.unwrap_or_default(),
            threshold: t.threshold.unwrap_or_default(),
        }),
    }
}

/// What became of an input, as a label: the ledger's.
fn outcome(r: &Result<Applied, &'static str>) -> Result<&'static str, &'static str> {
    r.map(|a| match a {
        Applied::Applied => "applied",
        Applied::Duplicate => "duplicate",
        Applied::NoMeter => "no_meter",
    })
}

/// What became of an input, as a label: the model's.
fn model_outcome(r: Result<model::Applied, model::Rejected>) -> Result<&'static str, &'static str> {
    r.map(|a| match a {
        model::Applied::Applied => "applied",
        model::Applied::Duplicate => "duplicate",
        model::Applied::NoMeter => "no_meter",
    })
    .map_err(model::Rejected::reason)
}

/// The units usage `u` (accepted) adds to each test meter, by index in [`SPECS`], per the model.
fn quantities(u: &Usage) -> Vec<(usize, Decimal)> {
    RULES
        .quantities(&u.name, &u.properties)
        .expect("an accepted event")
        .into_iter()
        .map(|(m, q)| {
            let i = SPECS.iter().position(|s| s.name == m.name);
            (i.expect("a test meter"), q)
        })
        .collect()
}

/// Asserts the ledger's projection of meter `m` equals the model's.
fn assert_same_meter(
    state: &MeterState,
    model: &model::MeterBook,
    m: usize,
) -> Result<(), TestCaseError> {
    let name = SPECS[m].name;
    let fields = (
        state.version,
        state.balance(),
        state.credited,
        state.consumed,
        state.expired,
        state.voided,
        state.overage,
        state.blocked,
        state.debt,
        state.cycle_credited,
    );
    let model_fields = (
        model.version,
        model.balance(),
        model.credited,
        model.consumed,
        model.expired,
        model.voided,
        model.overage,
        model.blocked,
        model.debt,
        model.cycle_credited,
    );
    prop_assert_eq!(fields, model_fields, "meter {}", name);
    let holds: Vec<(String, Decimal, i64)> = state
        .holds
        .iter()
        .map(|h| (h.id.to_string(), h.units, h.expires_at))
        .collect();
    let model_holds: Vec<(String, Decimal, i64)> = model
        .holds
        .iter()
        .map(|h| (h.id.clone(), h.units, h.expires_at))
        .collect();
    prop_assert_eq!(
        (state.reserved, state.available(), &holds),
        (model.reserved(), model.available(), &model_holds),
        "meter {} holds",
        name
    );
    let fired: BTreeSet<usize> = (0..32)
        .filter(|i| state.low_fired & (1 << i) != 0)
        .collect();
    prop_assert_eq!(
        (state.exhausted, &fired, state.auto_top_up_fired),
        (model.exhausted, &model.low_fired, model.auto_top_up_fired),
        "meter {}",
        name
    );
    if state.version > 0 {
        prop_assert_eq!(state.updated_at, model.updated_at, "meter {}", name);
    }
    let status = match model.status() {
        model::Status::Active => Status::Active,
        model::Status::Low => Status::Low,
        model::Status::Exhausted => Status::Exhausted,
    };
    prop_assert_eq!(state.status(), status, "meter {}", name);
    let kind = |k| match k {
        GrantKind::Cycle => "cycle",
        GrantKind::TopUp => "top_up",
        GrantKind::Adjustment => "adjustment",
    };
    let grants: Vec<_> = state
        .grants
        .iter()
        .map(|g| {
            (
                (g.id.to_string(), g.active, g.remaining, g.cycle_ended),
                (g.priority, g.effective_at, g.expires_at),
                (
                    g.amount,
                    g.subscription_id.clone(),
                    g.rollover,
                    kind(g.kind),
                ),
            )
        })
        .collect();
    let model_grants: Vec<_> = model
        .listed()
        .into_iter()
        .map(|s| {
            let g = &s.grant;
            (
                (g.id.clone(), s.active, s.remaining, s.cycle_ended),
                (g.priority, s.starts_at, g.expires_at),
                (g.amount, g.subscription.clone(), g.rollover, g.kind.label()),
            )
        })
        .collect();
    prop_assert_eq!(grants, model_grants, "meter {}", name);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Random sequences
// ---------------------------------------------------------------------------------------------

/// One generated step; times are offsets from the current `now`.
#[derive(Clone, Debug)]
enum Op {
    Grant {
        id: u8,
        meter: usize,
        amount: Decimal,
        kind: GrantKind,
        priority: u8,
        eff: Option<i64>,
        exp: Option<i64>,
        sub: Option<&'static str>,
        rollover: Decimal,
    },
    Usage {
        id: u8,
        name: &'static str,
        tokens: Option<String>,
        gb: Option<String>,
        tier: Option<&'static str>,
        reservation: Option<u8>,
    },
    Reserve {
        id: u8,
        meter: usize,
        units: Decimal,
        ttl: i64,
    },
    Release(u8),
    VoidUsage(u8),
    VoidGrant(u8),
    /// Time passes by `dt`; with `tick`, the periodic [`Ledger::advance`] runs.
    Time {
        dt: i64,
        tick: bool,
    },
}

/// A step with absolute times, as the pipeline sees it.
#[derive(Clone, Debug)]
enum Step {
    Apply(Input, i64),
    Tick(i64),
}

/// Amounts in halves up to `max_halves`, sometimes 0 (rejected as a grant amount).
fn amount(max_halves: i64) -> impl Strategy<Value = Decimal> {
    prop_oneof![
        1 => Just(Decimal::ZERO),
        12 => (1i64..=max_halves).prop_map(|n| Decimal::new(n * 5, 1)),
    ]
}

/// A property value: usually a plain decimal, sometimes negative or not a plain decimal.
fn property() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        12 => (0i64..=16).prop_map(|n| Some(Decimal::new(n * 5, 1).normalize().to_string())),
        1 => Just(None),
        1 => prop::sample::select(vec!["-1", "1e1", "x", "2.50"]).prop_map(|s| Some(s.to_string())),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let grant = (
        (
            0u8..6,
            prop_oneof![12 => Just(0usize), 8 => Just(1usize), 5 => Just(2usize), 1 => Just(3usize)],
            amount(40),
        ),
        prop::sample::select(vec![
            GrantKind::Cycle,
            GrantKind::Cycle,
            GrantKind::TopUp,
            GrantKind::Adjustment,
        ]),
        prop::sample::select(vec![0u8, 0, 1, 2, 255]),
        (
            prop::option::weighted(0.3, -20i64..80),
            prop::option::weighted(0.4, -10i64..150),
        ),
        prop::sample::select(vec![None, Some("s1"), Some("s1"), Some("s1"), Some("s2")]),
        prop_oneof![Just(Decimal::ZERO), (1i64..=10).prop_map(Decimal::from)],
    )
        .prop_map(
            |((id, meter, amount), kind, priority, (eff, exp), sub, rollover)| Op::Grant {
                id,
                meter,
                amount,
                kind,
                priority,
                eff,
                exp,
                sub,
                rollover,
            },
        );
    let usage = (
        0u8..8,
        prop::sample::select(vec!["call", "call", "call", "store", "store", "signup"]),
        property(),
        property(),
        prop::sample::select(vec![
            Some("hot"),
            Some("hot"),
            Some("hot"),
            Some("cold"),
            None,
        ]),
        prop::option::weighted(0.3, 0u8..4),
    )
        .prop_map(|(id, name, tokens, gb, tier, reservation)| Op::Usage {
            id,
            name,
            tokens,
            gb,
            tier,
            reservation,
        });
    let reserve = (
        0u8..4,
        prop_oneof![6 => Just(0usize), 6 => Just(1usize), 3 => Just(2usize), 1 => Just(3usize)],
        amount(30),
        prop_oneof![1 => Just(0i64), 12 => 1i64..80],
    )
        .prop_map(|(id, meter, units, ttl)| Op::Reserve {
            id,
            meter,
            units,
            ttl,
        });
    prop_oneof![
        5 => grant,
        8 => usage,
        3 => reserve,
        1 => (0u8..5).prop_map(Op::Release),
        3 => (0u8..9).prop_map(Op::VoidUsage),
        2 => (0u8..7).prop_map(Op::VoidGrant),
        3 => (0i64..60, any::<bool>()).prop_map(|(dt, tick)| Op::Time { dt, tick }),
    ]
}

/// Many small grants, mostly top-ups on `api` drained by calls, with many ids: meters go past
/// [`MAX_DRAINED`] drained grants, so drained grants are pruned and voids find some gone.
fn crowded_op() -> impl Strategy<Value = Op> {
    let grant = (
        (
            0u8..64,
            prop_oneof![8 => Just(0usize), 1 => Just(1usize)],
            amount(3),
        ),
        prop::sample::select(vec![
            GrantKind::TopUp,
            GrantKind::TopUp,
            GrantKind::TopUp,
            GrantKind::Adjustment,
            GrantKind::Cycle,
        ]),
        prop::sample::select(vec![0u8, 0, 1, 255]),
        (
            prop::option::weighted(0.1, -20i64..80),
            prop::option::weighted(0.2, -10i64..400),
        ),
        prop::sample::select(vec![None, Some("s1"), Some("s2")]),
        prop_oneof![Just(Decimal::ZERO), (1i64..=2).prop_map(Decimal::from)],
    )
        .prop_map(
            |((id, meter, amount), kind, priority, (eff, exp), sub, rollover)| Op::Grant {
                id,
                meter,
                amount,
                kind,
                priority,
                eff,
                exp,
                sub,
                rollover,
            },
        );
    let usage = (
        0u8..96,
        prop::sample::select(vec!["call", "call", "call", "call", "call", "store"]),
        property(),
        property(),
        prop::sample::select(vec![Some("hot"), Some("cold")]),
    )
        .prop_map(|(id, name, tokens, gb, tier)| Op::Usage {
            id,
            name,
            tokens,
            gb,
            tier,
            reservation: None,
        });
    prop_oneof![
        8 => grant,
        6 => usage,
        2 => (0u8..=96).prop_map(Op::VoidUsage),
        1 => (0u8..=64).prop_map(Op::VoidGrant),
        2 => (0i64..60, any::<bool>()).prop_map(|(dt, tick)| Op::Time { dt, tick }),
    ]
}

/// Turns ops into steps, with processing time starting at 1000.
fn steps(ops: &[Op]) -> Vec<Step> {
    let mut now = 1_000;
    let mut out = Vec::new();
    for op in ops {
        let input = match op.clone() {
            Op::Time { dt, tick } => {
                now += dt;
                if tick {
                    out.push(Step::Tick(now));
                }
                continue;
            }
            Op::Grant {
                id,
                meter: m,
                amount,
                kind,
                priority,
                eff,
                exp,
                sub,
                rollover,
            } => Input::Grant(Grant {
                grant_id: GrantId::parse(format!("g{id}")).unwrap(),
                customer: customer(),
                meter: meter(SPECS.get(m).map_or("nope", |s| s.name)),
                amount,
                kind,
                priority,
                effective_at: eff.map(|o| now + o),
                expires_at: exp.map(|o| now + o),
                subscription_id: sub.map(String::from),
                rollover,
            }),
            Op::Reserve {
                id,
                meter: m,
                units,
                ttl,
            } => Input::Reserve(Reserve {
                reservation_id: ReservationId::parse(format!("r{id}")).unwrap(),
                customer: customer(),
                meter: meter(SPECS.get(m).map_or("nope", |s| s.name)),
                units,
                ttl_ms: ttl,
            }),
            Op::Release(id) => Input::Release {
                customer: customer(),
                reservation_id: ReservationId::parse(format!("r{id}")).unwrap(),
            },
            Op::Usage {
                id,
                name,
                tokens,
                gb,
                tier,
                reservation,
            } => {
                let mut props = BTreeMap::new();
                props.extend(tokens.map(|v| ("tokens".to_string(), v)));
                props.extend(gb.map(|v| ("gb".to_string(), v)));
                props.extend(tier.map(|v| ("tier".to_string(), v.to_string())));
                Input::Usage(Usage {
                    id: EventId::parse(format!("e{id}")).unwrap(),
                    customer: customer(),
                    name: name.into(),
                    timestamp_ms: now,
                    properties: props,
                    reservation_id: reservation
                        .map(|r| ReservationId::parse(format!("r{r}")).unwrap()),
                })
            }
            Op::VoidUsage(id) => void_usage(&format!("e{id}")),
            Op::VoidGrant(id) => void_grant(&format!("g{id}")),
        };
        out.push(Step::Apply(input, now));
    }
    out
}

/// Records as a store keeps them: only what the books marked dirty is written.
#[derive(Clone, Debug, Default, PartialEq)]
struct Store {
    meters: MeterStates,
    events: BTreeMap<EventId, EventRecord>,
    grants: BTreeMap<GrantId, GrantRecord>,
    reservations: BTreeMap<ReservationId, ReservationRecord>,
}

/// Runs `steps` in batches ending at `cuts` (a fresh book per batch, loaded from the store and
/// written back from its dirty keys), returning the store, the outputs and each input's result.
fn run_batches(
    ledger: &Ledger,
    steps: &[Step],
    cuts: &[usize],
) -> (Store, Vec<Output>, Vec<String>) {
    let mut store = Store::default();
    let mut out = Vec::new();
    let mut results = Vec::new();
    let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (steps.len() + 1)).collect();
    bounds.push(0);
    bounds.push(steps.len());
    bounds.sort_unstable();
    bounds.dedup();
    for w in bounds.windows(2) {
        let batch = &steps[w[0]..w[1]];
        let mut book = Book::new(customer());
        book.meters = store.meters.clone();
        for step in batch {
            if let Step::Apply(input, _) = step {
                let mut refs = Refs::default();
                input.refs(&mut refs);
                for e in refs.events {
                    let rec = store.events.get(&e).cloned();
                    book.events.entry(e).or_insert(rec);
                }
                for g in refs.grants {
                    let rec = store.grants.get(&g).cloned();
                    book.grants.entry(g).or_insert(rec);
                }
                for r in refs.reservations {
                    let rec = store.reservations.get(&r).cloned();
                    book.reservations.entry(r).or_insert(rec);
                }
            }
        }
        for step in batch {
            match step {
                Step::Apply(input, now) => {
                    let r = ledger.apply(&mut book, input, *now, &mut out);
                    results.push(format!("{:?}", r.map_err(|e| e.reason())));
                }
                Step::Tick(now) => ledger.advance(&mut book, *now, &mut out),
            }
        }
        for key in book.take_dirty() {
            match key {
                Dirty::Meter(m) => {
                    let state = book.meters[&m].clone();
                    store.meters.insert(m, state);
                }
                Dirty::Event(e) => {
                    let rec = book.events[&e].clone().expect("a dirty event has a record");
                    store.events.insert(e, rec);
                }
                Dirty::Grant(g) => {
                    let rec = book.grants[&g].clone().expect("a dirty grant has a record");
                    store.grants.insert(g, rec);
                }
                Dirty::Reservation(r) => {
                    let rec = book.reservations[&r]
                        .clone()
                        .expect("a dirty reservation has a record");
                    store.reservations.insert(r, rec);
                }
            }
        }
    }
    (store, out, results)
}

/// A meter's totals, leaving out its history (versions, grant slots, flags).
fn totals(s: &MeterState) -> [Decimal; 9] {
    [
        s.balance(),
        s.credited,
        s.consumed,
        s.expired,
        s.voided,
        s.overage,
        s.blocked,
        s.debt,
        s.cycle_credited,
    ]
}

/// Runs `steps` on one book, then applies time up to `end`; returns the book, the results and
/// the changes of each meter in order, each without the time it applied at (which ticks
/// move): meter, version, reason, cause, balance, reserved.
fn run_direct(ledger: &Ledger, steps: &[Step], end: i64) -> (Book, Vec<String>, Vec<String>) {
    let mut book = Book::new(customer());
    let mut out = Vec::new();
    let mut results = Vec::new();
    for step in steps {
        match step {
            Step::Apply(input, now) => {
                load_refs(&mut book, input);
                let r = ledger.apply(&mut book, input, *now, &mut out);
                results.push(format!("{:?}", r.map_err(|e| e.reason())));
            }
            Step::Tick(now) => ledger.advance(&mut book, *now, &mut out),
        }
    }
    ledger.advance(&mut book, end, &mut out);
    let mut changes: Vec<(MeterName, String)> = out
        .iter()
        .filter_map(|o| match o {
            Output::Changed(c) => Some((
                c.meter.clone(),
                format!(
                    "{} v{} {} {} {} {}",
                    c.meter,
                    c.version,
                    c.reason.as_str(),
                    c.cause_id,
                    c.balance,
                    c.reserved
                ),
            )),
            _ => None,
        })
        .collect();
    // Meters are independent: only the order within one is fixed.
    changes.sort_by(|a, b| a.0.cmp(&b.0));
    let changes = changes.into_iter().map(|(_, c)| c).collect();
    (book, results, changes)
}

/// Voiding usage `u` right after it was applied (to `pre`, giving `after`) restores every
/// meter it touched, whatever the event drew from.
fn check_void_undoes_usage(
    ledger: &Ledger,
    pre: &Book,
    after: &Book,
    u: &Usage,
    now: i64,
) -> Result<(), TestCaseError> {
    let mut pre = pre.clone();
    ledger.advance(&mut pre, now, &mut Vec::new());
    let mut undone = after.clone();
    let r = ledger.apply(
        &mut undone,
        &void_usage(u.id.as_str()),
        now,
        &mut Vec::new(),
    );
    prop_assert_eq!(r, Ok(Applied::Applied));
    for (m, _) in quantities(u) {
        let name = meter(SPECS[m].name);
        let a = pre.meters.get(&name).cloned().unwrap_or_default();
        let b = undone.meters.get(&name).cloned().unwrap_or_default();
        let view = |s: &MeterState| {
            let [balance, credited, consumed, expired, voided, overage, blocked, debt, cycle] =
                totals(s);
            let used = consumed - voided;
            (
                balance,
                credited,
                used,
                expired,
                overage,
                blocked,
                debt,
                cycle,
                s.exhausted,
                s.low_fired,
            )
        };
        prop_assert_eq!(
            view(&a),
            view(&b),
            "voiding {} right away on {}",
            u.id,
            name
        );
    }
    Ok(())
}

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn config(default_cases: u32) -> ProptestConfig {
    // No regression files are written: a failure prints its minimal case instead.
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::with_cases(cases(default_cases))
    }
}

/// Checks the outputs of one step against the meters' previous (version, balance).
fn check_outputs(
    out: &[Output],
    last: &mut BTreeMap<MeterName, (u64, Decimal)>,
) -> Result<(), TestCaseError> {
    for o in out {
        match o {
            Output::Changed(c) => {
                let (version, balance) = last.get(&c.meter).copied().unwrap_or((0, Decimal::ZERO));
                prop_assert_eq!(c.version, version + 1, "{:?}", c);
                prop_assert_eq!(c.delta, c.balance - balance, "{:?}", c);
                last.insert(c.meter.clone(), (c.version, c.balance));
            }
            Output::Transition(t) => {
                prop_assert_eq!(
                    last.get(&t.meter).copied(),
                    Some((t.version, t.balance)),
                    "{:?}",
                    t
                );
            }
            Output::TopUp(t) => {
                // Automatic, right after the change that crossed, with what it crossed.
                prop_assert_eq!(t.source, TopUpSource::Auto);
                prop_assert_eq!(
                    last.get(&t.meter).map(|(_, balance)| *balance),
                    t.balance,
                    "{:?}",
                    t
                );
                prop_assert!(t.threshold.is_some(), "{:?}", t);
            }
        }
    }
    Ok(())
}

/// The ledger agrees with the reference model step by step, keeps its books, leaves the state
/// untouched on rejected or replayed inputs, and does not depend on ticks or batching.
fn check_against_the_model(ops: &[Op], cuts: &[usize]) -> Result<(), TestCaseError> {
    let ledger = Ledger::new(meters());
    let steps = steps(ops);
    let mut book = Book::new(customer());
    let mut model = model::Customer::new(customer().as_str());
    let mut last: BTreeMap<MeterName, (u64, Decimal)> = BTreeMap::new();
    let mut applied: Vec<(Input, i64)> = Vec::new();
    let mut all_out = Vec::new();
    let mut results = Vec::new();
    // Usage applied and not voided, with its units per meter: a closed form for the totals.
    let mut live: BTreeMap<EventId, Vec<(usize, Decimal)>> = BTreeMap::new();
    for (i, step) in steps.iter().enumerate() {
        let mut out = Vec::new();
        let mut model_out = Vec::new();
        match step {
            Step::Tick(now) => {
                ledger.advance(&mut book, *now, &mut out);
                RULES.advance(&mut model, *now, &mut model_out);
            }
            Step::Apply(input, now) => {
                load_refs(&mut book, input);
                let before = snapshot(&book);
                let pre = book.clone();
                let got = ledger
                    .apply(&mut book, input, *now, &mut out)
                    .map_err(|e| e.reason());
                let model_before = model.clone();
                let want = RULES.apply(&mut model, &to_model(input), *now, &mut model_out);
                prop_assert_eq!(
                    outcome(&got),
                    model_outcome(want),
                    "step {}: {:?}",
                    i,
                    input
                );
                if want != Ok(model::Applied::Applied) {
                    prop_assert!(
                        model_out.is_empty() && model == model_before,
                        "model step {}",
                        i
                    );
                }
                if let (Input::Usage(u), Ok(Applied::Applied)) = (input, got) {
                    check_void_undoes_usage(&ledger, &pre, &book, u, *now)?;
                }
                if got != Ok(Applied::Applied) {
                    prop_assert!(out.is_empty(), "step {}: {:?}", i, out);
                    prop_assert!(
                        snapshot(&book) == before,
                        "step {}: {:?} changed the book",
                        i,
                        input
                    );
                }
                // Replays of what came before: all ids seen, nothing changes. (A void or a
                // release that found nothing then may find its target now: not a replay of an
                // effect.)
                if got != Err("void_unknown") && got != Err("reservation_unknown") {
                    applied.push((input.clone(), *now));
                }
                let replayed = snapshot(&book);
                let mut replay_out = Vec::new();
                for (input, _) in &applied {
                    let r = ledger.apply(&mut book, input, *now, &mut replay_out);
                    prop_assert!(r != Ok(Applied::Applied), "replay of {:?} applied", input);
                }
                prop_assert!(replay_out.is_empty(), "replays emitted {:?}", replay_out);
                prop_assert!(snapshot(&book) == replayed, "a replay changed the book");
                results.push(format!("{:?}", got));
                match input {
                    Input::Usage(u) if got == Ok(Applied::Applied) => {
                        live.insert(u.id.clone(), quantities(u));
                    }
                    Input::VoidUsage { event_id, .. } if got == Ok(Applied::Applied) => {
                        live.remove(event_id);
                    }
                    _ => {}
                }
            }
        }
        let converted: Vec<model::Output> = out.iter().map(output_to_model).collect();
        prop_assert_eq!(&converted, &model_out, "step {}: {:?}", i, step);
        check_outputs(&out, &mut last)?;
        for (m, spec) in SPECS.iter().enumerate() {
            let state = book
                .meters
                .get(&meter(spec.name))
                .cloned()
                .unwrap_or_default();
            let reference = model.meter(spec.name).cloned().unwrap_or_default();
            assert_same_meter(&state, &reference, m)?;
            prop_assert_eq!(
                state.balance(),
                state.credited - state.consumed - state.expired + state.voided,
                "meter {}",
                spec.name
            );
            prop_assert_eq!(
                last.get(&meter(spec.name))
                    .copied()
                    .unwrap_or((0, Decimal::ZERO)),
                (state.version, state.balance())
            );
            if spec.block {
                prop_assert!(state.balance() >= Decimal::ZERO);
            }
            let used: Decimal = live
                .values()
                .flatten()
                .filter(|(q_m, _)| *q_m == m)
                .map(|(_, q)| *q)
                .sum();
            prop_assert_eq!(
                state.consumed + state.blocked - state.voided,
                used,
                "meter {}",
                spec.name
            );
            prop_assert!(
                Decimal::ZERO <= state.debt && state.debt <= state.overage,
                "meter {}",
                spec.name
            );
            prop_assert!(state.overage <= state.consumed && state.blocked >= Decimal::ZERO);
        }
        all_out.extend(out);
    }

    // Ticks only bring expiries, activations and the ends of holds forward: without them
    // (each input applying time to its meters) the same changes come out in the same order,
    // and the totals are the same.
    let end = steps
        .iter()
        .map(|s| match s {
            Step::Apply(_, n) | Step::Tick(n) => *n,
        })
        .max();
    let end = end.unwrap_or(0);
    let (ticked, ticked_results, ticked_changes) = run_direct(&ledger, &steps, end);
    let untimed: Vec<Step> = steps
        .iter()
        .filter(|s| matches!(s, Step::Apply(..)))
        .cloned()
        .collect();
    let (lazy, lazy_results, lazy_changes) = run_direct(&ledger, &untimed, end);
    prop_assert_eq!(&lazy_results, &ticked_results);
    prop_assert_eq!(&lazy_changes, &ticked_changes);
    for spec in SPECS {
        let a = ticked
            .meters
            .get(&meter(spec.name))
            .cloned()
            .unwrap_or_default();
        let b = lazy
            .meters
            .get(&meter(spec.name))
            .cloned()
            .unwrap_or_default();
        prop_assert_eq!(totals(&a), totals(&b), "meter {}", spec.name);
    }

    // Batches: the same results, outputs and stored state however the steps are cut.
    let (whole, whole_out, whole_results) = run_batches(&ledger, &steps, &[]);
    prop_assert_eq!(&whole_out, &all_out);
    prop_assert_eq!(&whole_results, &results);
    let (split, split_out, split_results) = run_batches(&ledger, &steps, cuts);
    prop_assert_eq!(&split_out, &all_out);
    prop_assert_eq!(&split_results, &results);
    prop_assert_eq!(&split, &whole);
    // What the store holds is all the book changed: dirty tracking misses nothing.
    let changed: MeterStates = book
        .meters
        .into_iter()
        .filter(|(_, s)| *s != MeterState::default())
        .collect();
    prop_assert_eq!(&whole.meters, &changed);
    let events: BTreeMap<EventId, EventRecord> = book
        .events
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect();
    prop_assert_eq!(&whole.events, &events);
    let grants: BTreeMap<GrantId, GrantRecord> = book
        .grants
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect();
    prop_assert_eq!(&whole.grants, &grants);
    Ok(())
}

proptest! {
    #![proptest_config(config(10_000))]

    /// The ledger matches the reference model (see `check_against_the_model`).
    #[test]
    fn ledger_matches_the_reference_model(
        ops in prop::collection::vec(op(), 1..64),
        cuts in prop::collection::vec(any::<usize>(), 0..4),
    ) {
        check_against_the_model(&ops, &cuts)?;
    }

    /// Any amount within the limits survives a round trip through its text.
    #[test]
    fn amounts_round_trip_through_text(mantissa in 0i64..=MAX_AMOUNT, scale in 0u32..=MAX_SCALE) {
        let d = Decimal::new(mantissa, scale);
        prop_assert_eq!(parse_amount(&d.to_string()), Ok(d));
        prop_assert_eq!(model::parse_amount(&d.to_string()), Some(d));
        let too_precise = Decimal::new(mantissa * 10 + 1, scale + 1);
        prop_assert_eq!(parse_amount(&too_precise.to_string()).is_err(), scale + 1 > MAX_SCALE);
    }

    /// The ledger and the model read the same text as the same amount, or both refuse it.
    #[test]
    fn the_model_reads_amounts_as_the_ledger_does(text in "[ 0-9.+eE_x-]{0,12}") {
        prop_assert_eq!(parse_amount(&text).ok(), model::parse_amount(&text), "{:?}", text);
    }
}

proptest! {
    #![proptest_config(config(300))]

    /// The same with many small grants drained fast, so that drained grants are pruned and
    /// voids find some of them gone.
    #[test]
    fn ledger_matches_the_reference_model_past_the_drained_cap(
        ops in prop::collection::vec(crowded_op(), 96..192),
        cuts in prop::collection::vec(any::<usize>(), 0..4),
    ) {
        check_against_the_model(&ops, &cuts)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Automatic top-up
// ---------------------------------------------------------------------------------------------

/// A simulator whose `api` meter asks for `pack-100` when its balance crosses below 5.
fn auto_sim() -> Sim {
    let mut defs = meters().all().to_vec();
    defs[0].auto_top_up = Some(AutoTopUp {
        below: dec("5"),
        pack: "pack-100".into(),
    });
    Sim {
        ledger: Ledger::new(Meters::new(defs).unwrap()),
        ..Sim::new()
    }
}

impl Sim {
    /// Takes the top-up requests so far.
    fn top_ups(&mut self) -> Vec<TopUpRequested> {
        self.take()
            .into_iter()
            .filter_map(|o| match o {
                Output::TopUp(t) => Some(t),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn auto_top_up_fires_once_when_the_balance_crosses_below() {
    let mut s = auto_sim();
    s.grant(grant("g1", "api", "10"));
    for i in 0..5 {
        s.use_api(&format!("e{i}"));
    }
    assert_eq!(s.balance("api"), dec("5"));
    assert!(s.top_ups().is_empty(), "at the threshold is not below it");
    s.use_api("e5");
    let fired = s.top_ups();
    assert_eq!(fired.len(), 1);
    let t = &fired[0];
    let version = s.state("api").version;
    assert_eq!(t.request_id, format!("auto:cus_1:api:{version}"));
    assert_eq!(
        (t.pack.as_str(), t.source, t.balance, t.threshold),
        (
            "pack-100",
            TopUpSource::Auto,
            Some(dec("4")),
            Some(dec("5"))
        )
    );
    assert_eq!(t.requested_at, s.now);
    // Further usage, down into debt and back up just short of the threshold: no new request.
    for i in 6..12 {
        s.use_api(&format!("e{i}"));
    }
    s.grant(grant("g2", "api", "6"));
    assert_eq!(s.balance("api"), dec("4"));
    assert!(
        s.top_ups().is_empty(),
        "disarmed until the balance is back at 5"
    );
    assert!(s.state("api").auto_top_up_fired);
}

#[test]
fn auto_top_up_rearms_at_the_threshold_and_fires_again_on_the_next_crossing() {
    let mut s = auto_sim();
    s.grant(grant("g1", "api", "6"));
    s.use_api("e1");
    s.use_api("e2");
    let first = s.top_ups();
    assert_eq!(first.len(), 1);
    // The billing system grants the pack with grant_id = request_id: re-armed, nothing emitted.
    s.grant(grant(&first[0].request_id, "api", "100"));
    assert_eq!(s.balance("api"), dec("104"));
    assert!(!s.state("api").auto_top_up_fired);
    assert!(s.top_ups().is_empty());
    for i in 0..100 {
        s.use_api(&format!("u{i}"));
    }
    let second = s.top_ups();
    assert_eq!(second.len(), 1, "exactly once for the second crossing");
    assert_ne!(second[0].request_id, first[0].request_id);
    assert_eq!(second[0].balance, Some(dec("4")));
}

#[test]
fn auto_top_up_fires_when_an_expiry_crosses_and_not_for_a_meter_never_funded() {
    let mut s = auto_sim();
    s.use_api("e1");
    assert_eq!(s.balance("api"), dec("-1"));
    assert!(s.top_ups().is_empty(), "never at or above the threshold");
    s.grant(Grant {
        expires_at: Some(5_000),
        ..grant("g1", "api", "20")
    });
    assert!(s.top_ups().is_empty());
    s.advance_to(5_000);
    let fired = s.top_ups();
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0].requested_at, 5_000);
    assert_eq!(fired[0].balance, Some(Decimal::ZERO));
}

#[test]
fn auto_top_up_request_ids_are_deterministic_and_bounded() {
    let c = CustomerId::parse("c".repeat(MAX_ID_LEN)).unwrap();
    let m = meter("api");
    let id = auto_top_up_request_id(&c, &m, 7);
    assert!(id.len() <= MAX_ID_LEN && id.starts_with("auto:") && id.ends_with(":7"));
    assert_eq!(id, auto_top_up_request_id(&c, &m, 7));
    assert_ne!(id, auto_top_up_request_id(&c, &meter("other"), 7));
    assert_eq!(
        auto_top_up_request_id(&customer(), &m, 3),
        "auto:cus_1:api:3"
    );
}

#[test]
fn auto_top_up_config_is_validated() {
    let mut defs = meters().all().to_vec();
    defs[0].auto_top_up = Some(AutoTopUp {
        below: dec("-1"),
        pack: "p".into(),
    });
    assert!(Meters::new(defs.clone()).is_err(), "negative threshold");
    defs[0].auto_top_up = Some(AutoTopUp {
        below: dec("1"),
        pack: String::new(),
    });
    assert!(Meters::new(defs.clone()).is_err(), "empty pack");
    defs[0].auto_top_up = None;
    defs[0].top_up_packs = vec!["a\nb".into()];
    assert!(Meters::new(defs).is_err(), "control characters");
}
