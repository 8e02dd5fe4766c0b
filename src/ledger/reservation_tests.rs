//! Reservations: reserve, settle, release and expiry, on an overage and a block meter.

use std::collections::BTreeMap;

use rust_decimal::Decimal;

use super::*;

const T0: i64 = 1_767_225_600_000;
const MIN: i64 = 60_000;

fn d(s: &str) -> Decimal {
    s.parse().unwrap()
}

fn meter(name: &str) -> MeterName {
    MeterName::parse(name).unwrap()
}

fn def(name: &str, on_exhausted: OnExhausted) -> MeterDef {
    MeterDef {
        name: meter(name),
        event: "call".into(),
        filter: BTreeMap::new(),
        aggregation: Aggregation::Sum {
            property: "units".into(),
        },
        on_exhausted,
        low_balance: vec![],
        top_up_packs: vec![],
        auto_top_up: None,
        burn_window: default_burn_window(),
        forecast_horizon: default_forecast_horizon(),
        forecast_alert: None,
    }
}

/// `jobs` (overage) and `tokens` (block) both count the `units` of `call` events.
struct Sim {
    ledger: Ledger,
    book: Book,
    out: Vec<Output>,
    n: u32,
}

impl Sim {
    fn new() -> Self {
        let meters = Meters::new(vec![
            def("jobs", OnExhausted::Overage),
            def("tokens", OnExhausted::Block),
        ])
        .unwrap();
        Self {
            ledger: Ledger::new(meters),
            book: Book::new(CustomerId::parse("cus_1").unwrap()),
            out: Vec::new(),
            n: 0,
        }
    }

    fn load(&mut self, input: &Input) {
        let mut refs = Refs::default();
        input.refs(&mut refs);
        for e in refs.events {
            self.book.events.entry(e).or_insert(None);
        }
        for g in refs.grants {
            self.book.grants.entry(g).or_insert(None);
        }
        for r in refs.reservations {
            self.book.reservations.entry(r).or_insert(None);
        }
    }

    fn apply(&mut self, input: Input, at: i64) -> Result<Applied, LedgerError> {
        self.load(&input);
        let before = self.book.meters.clone();
        let r = self.ledger.apply(&mut self.book, &input, at, &mut self.out);
        if r.is_err() {
            assert_eq!(self.book.meters, before, "a rejected input changes nothing");
        }
        for s in self.book.meters.values() {
            assert_eq!(s.reserved, s.holds.iter().map(|h| h.units).sum::<Decimal>());
        }
        r
    }

    fn grant(&mut self, m: &str, amount: &str) {
        self.n += 1;
        let g = Grant::top_up(
            GrantId::parse(format!("g{}", self.n)).unwrap(),
            self.book.customer.clone(),
            meter(m),
            d(amount),
        );
        self.apply(Input::Grant(g), T0).unwrap();
    }

    fn reserve(&mut self, id: &str, m: &str, units: &str, ttl_ms: i64, at: i64) -> Applied {
        let r = Reserve {
            reservation_id: ReservationId::parse(id).unwrap(),
            customer: self.book.customer.clone(),
            meter: meter(m),
            units: d(units),
            ttl_ms,
        };
        self.apply(Input::Reserve(r), at).unwrap()
    }

    fn release(&mut self, id: &str, at: i64) -> Result<Applied, LedgerError> {
        let input = Input::Release {
            customer: self.book.customer.clone(),
            reservation_id: ReservationId::parse(id).unwrap(),
        };
        self.apply(input, at)
    }

    /// A `call` of `units` (both meters count it), settling `reservation` if given.
    fn call(&mut self, units: &str, reservation: Option<&str>, at: i64) {
        self.n += 1;
        let u = Usage {
            id: EventId::parse(format!("e{}", self.n)).unwrap(),
            customer: self.book.customer.clone(),
            name: "call".into(),
            timestamp_ms: at,
            properties: [("units".to_string(), units.to_string())].into(),
            reservation_id: reservation.map(|r| ReservationId::parse(r).unwrap()),
        };
        self.apply(Input::Usage(u), at).unwrap();
    }

    fn state(&self, m: &str) -> &MeterState {
        &self.book.meters[&meter(m)]
    }

    fn record(&self, id: &str) -> ReservationRecord {
        self.book.reservations[&ReservationId::parse(id).unwrap()]
            .clone()
            .unwrap()
    }

    /// (meter, reason, delta, balance) of the changes since the last call.
    fn changes(&mut self) -> Vec<(String, Reason, Decimal, Decimal)> {
        std::mem::take(&mut self.out)
            .into_iter()
            .filter_map(|o| match o {
                Output::Changed(c) => Some((c.meter.to_string(), c.reason, c.delta, c.balance)),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn a_reservation_holds_units_available_drops_and_the_balance_does_not() {
    let mut s = Sim::new();
    s.grant("tokens", "100");
    s.changes();
    assert_eq!(
        s.reserve("r1", "tokens", "30", 10 * MIN, T0),
        Applied::Applied
    );
    assert_eq!(
        s.changes(),
        [("tokens".into(), Reason::Reserved, d("0"), d("100"))]
    );
    let t = s.state("tokens");
    assert_eq!(
        (t.balance(), t.reserved, t.available()),
        (d("100"), d("30"), d("70"))
    );
    let rec = s.record("r1");
    assert_eq!(rec.outcome, ReservationOutcome::Held);
    assert_eq!(rec.expires_at, T0 + 10 * MIN);
    assert!(s
        .book
        .take_dirty()
        .contains(&Dirty::Reservation(ReservationId::parse("r1").unwrap())));
    // The same id again: the first answer stands, nothing changes.
    assert_eq!(
        s.reserve("r1", "tokens", "99", MIN, T0 + 1),
        Applied::Duplicate
    );
    assert!(s.changes().is_empty());
    assert_eq!(s.record("r1"), rec);
    assert_eq!(s.state("tokens").reserved, d("30"));
}

#[test]
fn a_block_meter_refuses_what_it_cannot_cover_and_remembers_the_answer() {
    let mut s = Sim::new();
    s.grant("tokens", "100");
    s.reserve("r1", "tokens", "80", MIN, T0);
    let version = s.state("tokens").version;
    s.changes();
    assert_eq!(s.reserve("r2", "tokens", "30", MIN, T0), Applied::Applied);
    assert_eq!(s.record("r2").outcome, ReservationOutcome::Insufficient);
    assert!(
        s.changes().is_empty(),
        "a refusal is no change of the meter"
    );
    assert_eq!(s.state("tokens").version, version);
    assert_eq!(s.reserve("r2", "tokens", "30", MIN, T0), Applied::Duplicate);
    // An overage meter holds beyond its balance: usage past it would be overage anyway.
    s.grant("jobs", "10");
    s.reserve("j1", "jobs", "25", MIN, T0);
    assert_eq!(s.record("j1").outcome, ReservationOutcome::Held);
    assert_eq!(s.state("jobs").available(), d("-15"));
}

#[test]
fn settling_draws_the_real_amount_and_ends_the_hold() {
    let mut s = Sim::new();
    s.grant("tokens", "100");
    s.grant("jobs", "100");
    s.reserve("r1", "tokens", "30", MIN, T0);
    s.changes();
    // Less than reserved: the rest is free again.
    s.call("20", Some("r1"), T0 + 1);
    let changes = s.changes();
    assert!(changes.contains(&("tokens".into(), Reason::Settled, d("-20"), d("80"))));
    assert!(
        changes.contains(&("jobs".into(), Reason::Usage, d("-20"), d("80"))),
        "a meter without that hold counts plain usage: {changes:?}"
    );
    let t = s.state("tokens");
    assert_eq!((t.reserved, t.available()), (d("0"), d("80")));
    // The hold is gone: the same reservation again settles nothing.
    s.call("5", Some("r1"), T0 + 2);
    assert!(s
        .changes()
        .contains(&("tokens".into(), Reason::Usage, d("-5"), d("75"))));
}

#[test]
fn on_a_block_meter_usage_never_draws_what_other_reservations_hold() {
    let mut s = Sim::new();
    s.grant("tokens", "100");
    s.reserve("r1", "tokens", "30", MIN, T0);
    s.reserve("r2", "tokens", "50", MIN, T0);
    // More than its hold: r1's 30 plus the 20 nobody holds; the other 10 are blocked, r2's 50
    // stay.
    s.call("60", Some("r1"), T0 + 1);
    let t = s.state("tokens");
    assert_eq!(
        (t.balance(), t.reserved, t.blocked),
        (d("50"), d("50"), d("10"))
    );
    assert_eq!(t.available(), d("0"));
    // Plain usage: nothing is available, all of it is blocked.
    s.call("5", None, T0 + 2);
    let t = s.state("tokens");
    assert_eq!((t.balance(), t.blocked), (d("50"), d("15")));
    // r2 settles with all it held.
    s.call("50", Some("r2"), T0 + 3);
    let t = s.state("tokens");
    assert_eq!(
        (t.balance(), t.reserved, t.blocked),
        (d("0"), d("0"), d("15"))
    );
    assert_eq!(t.credited - t.consumed - t.expired + t.voided, t.balance());
}

#[test]
fn release_ends_a_hold_once_and_an_unknown_one_is_rejected() {
    let mut s = Sim::new();
    s.grant("tokens", "100");
    s.reserve("r1", "tokens", "30", MIN, T0);
    s.changes();
    assert_eq!(s.release("r1", T0 + 1), Ok(Applied::Applied));
    assert_eq!(
        s.changes(),
        [("tokens".into(), Reason::Released, d("0"), d("100"))]
    );
    assert_eq!(s.state("tokens").available(), d("100"));
    assert_eq!(s.release("r1", T0 + 2), Ok(Applied::Duplicate));
    assert_eq!(
        s.release("nope", T0 + 2),
        Err(LedgerError::ReservationUnknown)
    );
    assert_eq!(
        LedgerError::ReservationUnknown.reason(),
        "reservation_unknown"
    );
    // A refused reservation has nothing to release.
    s.reserve("big", "tokens", "500", MIN, T0 + 3);
    assert_eq!(s.release("big", T0 + 4), Ok(Applied::Duplicate));
    assert!(s.changes().is_empty());
}

#[test]
fn a_hold_expires_at_its_ttl_in_stream_time() {
    let mut s = Sim::new();
    s.grant("tokens", "100");
    s.reserve("r1", "tokens", "30", 5 * MIN, T0);
    assert_eq!(s.state("tokens").next_due(), Some(T0 + 5 * MIN));
    s.changes();
    s.ledger.advance(&mut s.book, T0 + 5 * MIN - 1, &mut s.out);
    assert!(s.changes().is_empty());
    s.ledger.advance(&mut s.book, T0 + 5 * MIN, &mut s.out);
    assert_eq!(
        s.changes(),
        [(
            "tokens".into(),
            Reason::ReservationExpired,
            d("0"),
            d("100")
        )]
    );
    assert_eq!(s.state("tokens").reserved, d("0"));
    // Usage that names it afterwards is plain usage; a release is a no-op.
    s.call("10", Some("r1"), T0 + 6 * MIN);
    assert!(s
        .changes()
        .contains(&("tokens".into(), Reason::Usage, d("-10"), d("90"))));
    assert_eq!(s.release("r1", T0 + 7 * MIN), Ok(Applied::Duplicate));
}

#[test]
fn a_usage_after_the_ttl_expires_the_hold_first() {
    let mut s = Sim::new();
    s.grant("tokens", "100");
    s.reserve("r1", "tokens", "30", MIN, T0);
    s.changes();
    s.call("10", Some("r1"), T0 + MIN);
    let reasons: Vec<Reason> = s
        .changes()
        .into_iter()
        .filter(|c| c.0 == "tokens")
        .map(|c| c.1)
        .collect();
    assert_eq!(reasons, [Reason::ReservationExpired, Reason::Usage]);
}

#[test]
fn invalid_reservations_are_rejected_and_change_nothing() {
    let mut s = Sim::new();
    s.grant("tokens", "100");
    let bad = |units: &str, ttl_ms: i64, m: &str| {
        Input::Reserve(Reserve {
            reservation_id: ReservationId::parse("x").unwrap(),
            customer: CustomerId::parse("cus_1").unwrap(),
            meter: meter(m),
            units: d(units),
            ttl_ms,
        })
    };
    for (input, reason) in [
        (bad("0", MIN, "tokens"), "invalid_reservation"),
        (bad("-1", MIN, "tokens"), "invalid_reservation"),
        (bad("5", 0, "tokens"), "invalid_reservation"),
        (bad("5", MIN, "nope"), "unknown_meter"),
    ] {
        let e = s.apply(input, T0).unwrap_err();
        assert_eq!(e.reason(), reason);
    }
    assert!(s.book.reservations[&ReservationId::parse("x").unwrap()].is_none());
}

#[test]
fn a_meter_holds_at_most_max_holds_reservations() {
    let mut s = Sim::new();
    s.grant("jobs", "1");
    for i in 0..MAX_HOLDS {
        s.reserve(&format!("r{i}"), "jobs", "1", MIN, T0);
    }
    s.reserve("one-more", "jobs", "1", MIN, T0);
    assert_eq!(s.record("one-more").outcome, ReservationOutcome::TooMany);
    assert_eq!(s.state("jobs").holds.len(), MAX_HOLDS);
}
