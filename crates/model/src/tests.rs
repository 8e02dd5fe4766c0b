//! The model's own examples, one rule each. (The ledger is compared with the model by the
//! property tests of `drawdown::ledger`.)

use std::collections::BTreeMap;

use rust_decimal::Decimal;

use super::*;

fn d(s: &str) -> Decimal {
    s.parse().expect("a decimal literal")
}

/// A sum meter `m` of property `q` of events `e`.
fn meter(on_exhausted: OnExhausted, lows: Vec<Low>) -> Meter {
    Meter {
        name: "m".into(),
        event: "e".into(),
        filter: BTreeMap::new(),
        aggregation: Aggregation::Sum("q".into()),
        on_exhausted,
        lows,
        auto_top_up: None,
    }
}

fn overage() -> Meter {
    meter(OnExhausted::Overage, vec![])
}

fn top_up(id: &str, amount: &str) -> Grant {
    Grant {
        id: id.into(),
        meter: "m".into(),
        amount: d(amount),
        kind: GrantKind::TopUp,
        priority: 0,
        effective_at: None,
        expires_at: None,
        subscription: None,
        rollover: Decimal::ZERO,
    }
}

fn cycle(id: &str, amount: &str, rollover: &str) -> Grant {
    Grant {
        kind: GrantKind::Cycle,
        priority: 10,
        subscription: Some("s1".into()),
        rollover: d(rollover),
        ..top_up(id, amount)
    }
}

/// One customer driven by hand; time moves by 1 ms per input unless set.
struct Sim {
    rules: Rules,
    c: Customer,
    now: i64,
    out: Vec<Output>,
    events: u32,
}

impl Sim {
    fn new(meters: Vec<Meter>) -> Self {
        Self {
            rules: Rules::new(meters),
            c: Customer::new("c"),
            now: 100,
            out: Vec::new(),
            events: 0,
        }
    }

    fn apply(&mut self, input: Input) -> Result<Applied, Rejected> {
        self.now += 1;
        self.rules
            .apply(&mut self.c, &input, self.now, &mut self.out)
    }

    fn grant(&mut self, g: Grant) {
        assert_eq!(self.apply(Input::Grant(g)), Ok(Applied::Applied));
    }

    /// Usage of `q` units of `m`; returns the event id.
    fn use_(&mut self, q: &str) -> String {
        self.events += 1;
        let id = format!("e{}", self.events);
        let u = Usage {
            id: id.clone(),
            name: "e".into(),
            properties: [("q".to_string(), q.to_string())].into(),
            reservation: None,
        };
        assert_eq!(self.apply(Input::Usage(u)), Ok(Applied::Applied));
        id
    }

    fn advance(&mut self, now: i64) {
        self.now = now;
        self.rules.advance(&mut self.c, now, &mut self.out);
    }

    fn m(&self) -> &MeterBook {
        self.c.meter("m").expect("touched")
    }

    fn balance(&self) -> Decimal {
        self.m().balance()
    }

    /// One letter per version so far.
    fn reasons(&self) -> String {
        self.out
            .iter()
            .filter_map(|o| match o {
                Output::Changed(c) => Some(c.reason.letter()),
                _ => None,
            })
            .collect()
    }

    /// (kind, version, threshold) of the transitions so far.
    fn transitions(&self) -> Vec<(&'static str, u64, Option<Decimal>)> {
        self.out
            .iter()
            .filter_map(|o| match o {
                Output::Transition(t) => Some((t.kind.label(), t.version, t.threshold)),
                _ => None,
            })
            .collect()
    }

    fn kinds(&self) -> Vec<(&'static str, u64)> {
        self.transitions()
            .into_iter()
            .map(|(k, v, _)| (k, v))
            .collect()
    }

    /// (id, remainder) of the grants as listed.
    fn remainders(&self) -> Vec<(String, Decimal)> {
        self.m()
            .listed()
            .into_iter()
            .map(|s| (s.grant.id.clone(), s.remaining))
            .collect()
    }

    /// The identity, the versions and the deltas hold.
    fn books_balance(&self) {
        let m = self.m();
        assert_eq!(
            m.balance(),
            m.credited - m.consumed - m.expired + m.voided,
            "{m:#?}"
        );
        assert_eq!(self.reasons().len() as u64, m.version);
        let mut last = Decimal::ZERO;
        for o in &self.out {
            if let Output::Changed(c) = o {
                assert_eq!(c.delta, c.balance - last, "{c:?}");
                last = c.balance;
            }
        }
    }
}

fn rem(pairs: &[(&str, &str)]) -> Vec<(String, Decimal)> {
    pairs.iter().map(|(id, r)| (id.to_string(), d(r))).collect()
}

#[test]
fn overage_goes_into_debt_and_a_grant_pays_the_debt_first() {
    let mut s = Sim::new(vec![overage()]);
    s.grant(top_up("a", "10"));
    s.use_("15.5");
    let m = s.m();
    assert_eq!(
        (m.balance(), m.consumed, m.overage, m.debt),
        (d("-5.5"), d("15.5"), d("5.5"), d("5.5"))
    );
    s.use_("2");
    s.grant(top_up("b", "3"));
    assert_eq!(
        s.balance(),
        d("-4.5"),
        "a grant below the debt only lowers it"
    );
    assert_eq!(s.remainders(), rem(&[("a", "0")]), "b all went to the debt");
    s.grant(top_up("c", "10"));
    assert_eq!(s.balance(), d("5.5"));
    assert_eq!(s.reasons(), "guugg");
    assert_eq!(s.kinds(), vec![("exhausted", 2), ("restored", 5)]);
    s.books_balance();
}

#[test]
fn block_floors_at_zero_and_counts_the_rest_as_blocked() {
    let mut s = Sim::new(vec![meter(OnExhausted::Block, vec![])]);
    s.grant(top_up("a", "10"));
    s.use_("12.5");
    let m = s.m();
    assert_eq!(
        (m.balance(), m.consumed, m.blocked, m.overage),
        (d("0"), d("10"), d("2.5"), d("0"))
    );
    s.use_("3");
    assert_eq!(s.m().blocked, d("5.5"));
    assert_eq!(
        s.m().version,
        3,
        "fully blocked usage still makes a version"
    );
    s.grant(top_up("b", "1"));
    s.use_("1");
    assert_eq!(
        s.kinds(),
        vec![("exhausted", 2), ("restored", 4), ("exhausted", 5)]
    );
    s.books_balance();
}

#[test]
fn a_zero_quantity_makes_no_version_but_is_recorded() {
    let mut s = Sim::new(vec![overage()]);
    let id = s.use_("0");
    assert_eq!(s.m().version, 0);
    assert!(s.out.is_empty());
    assert_eq!(s.c.events[&id].draws, vec![]);
    assert_eq!(s.apply(Input::VoidUsage(id)), Ok(Applied::Applied));
    assert!(s.out.is_empty(), "a void of nothing changes nothing");
}

#[test]
fn usage_before_any_grant_is_not_an_exhaustion() {
    let mut s = Sim::new(vec![overage()]);
    s.use_("1");
    assert_eq!(s.balance(), d("-1"));
    assert_eq!(s.m().status(), Status::Exhausted);
    s.grant(top_up("a", "5"));
    assert!(
        s.transitions().is_empty(),
        "never exhausted, so not restored"
    );
}

#[test]
fn low_thresholds_fire_once_and_rearm() {
    let mut s = Sim::new(vec![meter(
        OnExhausted::Overage,
        vec![Low::Units(d("50")), Low::Fraction(d("0.2"))],
    )]);
    s.grant(top_up("a", "100")); // thresholds 50 and 20; from 0 up: nothing
    s.use_("60"); // 40: below 50
    assert_eq!(s.m().status(), Status::Low);
    s.use_("5"); // 35: nothing new
    s.use_("20"); // 15: below 20
    s.grant(top_up("b", "100")); // 115, thresholds 50 and 40: both re-armed
    s.use_("80"); // 35: below both again
    assert_eq!(
        s.transitions(),
        vec![
            ("low", 2, Some(d("50"))),
            ("low", 4, Some(d("20"))),
            ("low", 6, Some(d("50"))),
            ("low", 6, Some(d("40"))),
        ]
    );
}

#[test]
fn usage_draws_by_priority_then_soonest_expiry_then_effective_time_then_id() {
    let mut s = Sim::new(vec![overage()]);
    let g = |id, priority, expires_at: Option<i64>| Grant {
        priority,
        expires_at,
        ..top_up(id, "10")
    };
    s.grant(g("never", 5, None));
    s.grant(g("far", 5, Some(2_000)));
    s.grant(g("soon", 5, Some(1_000)));
    s.grant(g("z-earlier", 1, None));
    s.grant(g("a-later", 1, None));
    let ids: Vec<String> = s.remainders().into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, ["z-earlier", "a-later", "soon", "far", "never"]);
    s.use_("25");
    let draw = &s.c.events["e1"].draws[0];
    assert_eq!(
        draw.grants,
        vec![
            ("z-earlier".to_string(), d("10")),
            ("a-later".to_string(), d("10")),
            ("soon".to_string(), d("5")),
        ]
    );
    assert_eq!(
        s.remainders()[..3],
        rem(&[("z-earlier", "0"), ("a-later", "0"), ("soon", "5")])[..],
        "drained grants stay (a void gives back to them)"
    );
    // At the same effective time, the id decides.
    let mut t = Sim::new(vec![overage()]);
    for id in ["b", "a"] {
        t.rules
            .apply(&mut t.c, &Input::Grant(top_up(id, "1")), 7, &mut Vec::new())
            .unwrap();
    }
    let ids: Vec<String> = t.remainders().into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, ["a", "b"]);
    s.books_balance();
}

#[test]
fn a_renewal_caps_the_carry_over_and_crosses_once() {
    let mut s = Sim::new(vec![meter(OnExhausted::Overage, vec![Low::Units(d("10"))])]);
    s.grant(cycle("c1", "20", "0"));
    s.grant(top_up("top", "4"));
    s.use_("17"); // top (priority 0) first: top 0, c1 7
    assert_eq!(s.remainders(), rem(&[("top", "0"), ("c1", "7")]));
    assert_eq!(s.kinds(), vec![("low", 3)]);
    s.grant(cycle("c2", "100", "3"));
    // c1 forfeits its 7 (cycle_end, no crossing judged), then c2: one crossing 7 -> 100.
    assert_eq!(s.reasons(), "ggucg");
    assert_eq!(s.m().expired, d("7"));
    assert_eq!(s.remainders(), rem(&[("top", "0"), ("c2", "100")]));
    assert_eq!(s.kinds(), vec![("low", 3)], "re-armed, nothing emitted");
    assert_eq!(s.m().cycle_credited, d("100"));
    s.use_("95");
    assert_eq!(s.kinds(), vec![("low", 3), ("low", 6)]);
    // c2 keeps 3 of its 5: still active after its cycle, drawn in its priority's place.
    s.grant(cycle("c3", "1", "0"));
    assert_eq!(s.m().expired, d("9"));
    assert_eq!(s.reasons(), "ggucgucg");
    assert_eq!(
        s.remainders(),
        rem(&[("top", "0"), ("c2", "3"), ("c3", "1")])
    );
    assert!(s.m().listed()[1].cycle_ended);
    // The next renewal does not end c2 again.
    s.grant(cycle("c4", "1", "0"));
    assert_eq!(s.m().expired, d("10"));
    assert_eq!(
        s.remainders(),
        rem(&[("top", "0"), ("c2", "3"), ("c4", "1")])
    );
    s.books_balance();
}

#[test]
fn a_renewal_from_an_exhausted_meter_restores_once() {
    let mut s = Sim::new(vec![overage()]);
    s.grant(cycle("c1", "10", "5"));
    s.use_("10");
    s.grant(cycle("c2", "10", "0"));
    assert_eq!(
        s.reasons(),
        "gug",
        "nothing forfeited: no cycle_end version"
    );
    assert_eq!(s.kinds(), vec![("exhausted", 2), ("restored", 3)]);
    assert_eq!(s.remainders(), rem(&[("c2", "10")]), "drained c1 is gone");
    // Another subscription's cycle is not ended.
    s.grant(Grant {
        subscription: Some("s2".into()),
        ..cycle("o1", "5", "0")
    });
    s.grant(cycle("c3", "1", "0"));
    assert_eq!(s.remainders(), rem(&[("o1", "5"), ("c3", "1")]));
    s.books_balance();
}

#[test]
fn scheduled_grants_activate_then_expiries_forfeit() {
    let mut s = Sim::new(vec![overage()]);
    let expiring = |id, amount| Grant {
        expires_at: Some(2_000),
        ..top_up(id, amount)
    };
    s.grant(expiring("exp", "10"));
    s.grant(expiring("drained", "2"));
    s.grant(Grant {
        effective_at: Some(1_500),
        ..top_up("later", "20")
    });
    assert_eq!(s.balance(), d("12"), "pending grants are not usable");
    s.use_("15"); // same expiry: by effective time, exp then drained; 3 into debt
    assert_eq!(
        s.remainders(),
        rem(&[("exp", "0"), ("drained", "0"), ("later", "20")])
    );
    assert_eq!(s.m().next_due(), Some(1_500));
    s.advance(1_000);
    assert_eq!(s.m().version, 4, "nothing due yet");
    s.advance(2_000);
    // Activated (pays the debt of 3), then the expiring ones: drained, so no version.
    assert_eq!(s.reasons(), "ggsua");
    assert_eq!(s.remainders(), rem(&[("later", "17")]));
    assert_eq!(s.kinds(), vec![("exhausted", 4), ("restored", 5)]);
    assert_eq!(s.m().next_due(), None);
    s.grant(Grant {
        expires_at: Some(3_000),
        ..top_up("x", "4")
    });
    s.use_("1");
    s.advance(2_999);
    assert_eq!(s.m().expired, d("0"), "usable while now < expires_at");
    s.advance(3_000);
    assert_eq!(s.reasons(), "ggsuagux");
    assert_eq!(s.m().expired, d("3"));
    s.books_balance();
}

#[test]
fn a_grant_expired_on_arrival_is_credited_and_forfeited() {
    let mut s = Sim::new(vec![overage()]);
    s.grant(Grant {
        expires_at: Some(50),
        ..top_up("old", "5")
    });
    let m = s.m();
    assert_eq!(
        (m.credited, m.expired, m.balance()),
        (d("5"), d("5"), d("0"))
    );
    assert_eq!(s.reasons(), "x");
    s.books_balance();
}

#[test]
fn a_void_gives_back_to_the_grants_or_as_an_adjustment() {
    let mut s = Sim::new(vec![overage()]);
    s.grant(Grant {
        expires_at: Some(1_000),
        ..top_up("exp", "5")
    });
    s.grant(Grant {
        priority: 50,
        ..top_up("keep", "5")
    });
    let ev = s.use_("12"); // exp 5, keep 5, debt 2
    assert_eq!(s.c.events[&ev].draws[0].debt, d("2"));
    s.advance(1_000); // exp drained: gone without a version
    s.grant(top_up("pay", "3")); // pays the debt 2, 1 left
    assert_eq!(s.apply(Input::VoidUsage(ev)), Ok(Applied::Applied));
    // keep gets its 5 back; exp is gone (5) and the debt was repaid (2): adjustment of 7.
    assert_eq!(
        s.remainders(),
        rem(&[("pay", "1"), ("keep", "5"), ("void:e1", "7")])
    );
    let adjustment = &s.m().listed()[2].grant;
    assert_eq!(
        (adjustment.priority, adjustment.expires_at, adjustment.kind),
        (255, None, GrantKind::Adjustment)
    );
    let m = s.m();
    assert_eq!((m.voided, m.overage, m.debt), (d("12"), d("0"), d("0")));
    assert_eq!(s.reasons(), "ggugv", "the drained expiry made no version");
    assert_eq!(s.kinds(), vec![("exhausted", 3), ("restored", 4)]);
    s.books_balance();
}

#[test]
fn a_void_of_usage_still_in_debt_repays_it_and_takes_back_blocked_units() {
    let mut s = Sim::new(vec![overage()]);
    s.grant(top_up("a", "1"));
    let ev = s.use_("4");
    s.apply(Input::VoidUsage(ev)).unwrap();
    let m = s.m();
    assert_eq!((m.balance(), m.debt, m.overage), (d("1"), d("0"), d("0")));
    assert_eq!(s.remainders(), rem(&[("a", "1")]));
    s.books_balance();
    let mut b = Sim::new(vec![meter(OnExhausted::Block, vec![])]);
    b.grant(top_up("a", "1"));
    let ev = b.use_("4");
    b.apply(Input::VoidUsage(ev)).unwrap();
    let m = b.m();
    assert_eq!(
        (m.balance(), m.blocked, m.consumed),
        (d("1"), d("0"), d("1"))
    );
    b.books_balance();
}

#[test]
fn voids_of_grants_remove_the_remainder_and_repeats_are_refused() {
    let mut s = Sim::new(vec![meter(
        OnExhausted::Overage,
        vec![Low::Fraction(d("0.5"))],
    )]);
    s.grant(cycle("c1", "10", "0"));
    s.grant(top_up("t", "10"));
    assert_eq!(
        s.apply(Input::Grant(top_up("t", "99"))),
        Ok(Applied::Duplicate)
    );
    let ev = s.use_("1");
    assert_eq!(s.apply(Input::VoidGrant("t".into())), Ok(Applied::Applied));
    let m = s.m();
    assert_eq!(
        (m.balance(), m.credited, m.cycle_credited),
        (d("10"), d("11"), d("20"))
    );
    let refused = |s: &mut Sim, input| s.apply(input).map_err(Rejected::reason);
    assert_eq!(
        refused(&mut s, Input::VoidGrant("t".into())),
        Err("void_duplicate")
    );
    assert_eq!(
        refused(&mut s, Input::VoidGrant("nope".into())),
        Err("void_unknown")
    );
    // The event drew 1 from t (priority 0), which is gone: back as an adjustment.
    assert_eq!(s.apply(Input::VoidUsage(ev.clone())), Ok(Applied::Applied));
    assert_eq!(refused(&mut s, Input::VoidUsage(ev)), Err("void_duplicate"));
    assert_eq!(
        refused(&mut s, Input::VoidUsage("e9".into())),
        Err("void_unknown")
    );
    assert_eq!(s.remainders(), rem(&[("c1", "10"), ("void:e1", "1")]));
    // Voiding the cycle grant lowers the cycle's credits too.
    s.apply(Input::VoidGrant("c1".into())).unwrap();
    let m = s.m();
    assert_eq!((m.balance(), m.cycle_credited), (d("1"), d("10")));
    assert_eq!(s.reasons(), "gguwvw");
    assert_eq!(s.kinds(), vec![("low", 6)], "1 < 0.5 x 10");
    s.books_balance();
}

#[test]
fn a_void_of_a_grant_already_gone_is_still_a_version() {
    let mut s = Sim::new(vec![overage()]);
    s.grant(Grant {
        expires_at: Some(500),
        ..top_up("x", "3")
    });
    s.advance(500);
    s.apply(Input::VoidGrant("x".into())).unwrap();
    assert_eq!(s.reasons(), "gxw");
    let m = s.m();
    assert_eq!(
        (m.credited, m.expired, m.balance()),
        (d("3"), d("3"), d("0"))
    );
    s.books_balance();
}

#[test]
fn a_void_of_a_pending_grant_never_credits_it() {
    let mut s = Sim::new(vec![overage()]);
    s.grant(Grant {
        effective_at: Some(5_000),
        ..top_up("p", "3")
    });
    s.apply(Input::VoidGrant("p".into())).unwrap();
    s.advance(6_000);
    assert_eq!((s.m().credited, s.balance()), (d("0"), d("0")));
    assert_eq!(s.reasons(), "sw");
}

#[test]
fn beyond_sixteen_drained_grants_the_oldest_go() {
    let mut s = Sim::new(vec![overage()]);
    for i in 0..20 {
        s.grant(top_up(&format!("g{i:02}"), "1"));
    }
    let ev = s.use_("18");
    assert_eq!(s.m().pruned, 2);
    assert_eq!(s.m().slots.len(), 18);
    assert_eq!(s.remainders()[0].0, "g02");
    // What the event drew from the dropped grants comes back as an adjustment.
    s.apply(Input::VoidUsage(ev)).unwrap();
    assert_eq!(
        s.remainders().last().unwrap(),
        &("void:e1".to_string(), d("2"))
    );
    s.books_balance();
}

#[test]
fn a_void_adjustment_whose_id_would_be_too_long_is_called_void() {
    let mut s = Sim::new(vec![overage()]);
    let id = "e".repeat(200);
    let u = Usage {
        id: id.clone(),
        name: "e".into(),
        properties: [("q".to_string(), "2".to_string())].into(),
        reservation: None,
    };
    s.apply(Input::Usage(u)).unwrap();
    s.grant(top_up("a", "5")); // pays the event's debt of 2
    s.apply(Input::VoidUsage(id)).unwrap();
    assert_eq!(s.remainders(), rem(&[("a", "3"), ("void", "2")]));
}

#[test]
fn an_event_feeds_every_meter_it_matches() {
    let calls = Meter {
        name: "calls".into(),
        aggregation: Aggregation::Count,
        ..overage()
    };
    let hot = Meter {
        name: "hot".into(),
        filter: [("tier".to_string(), "hot".to_string())].into(),
        ..overage()
    };
    let rules = Rules::new(vec![overage(), calls, hot]);
    let props: BTreeMap<String, String> = [("q".to_string(), "12.5".to_string())].into();
    let names = |props| {
        rules
            .quantities("e", props)
            .unwrap()
            .into_iter()
            .map(|(m, q)| (m.name.clone(), q))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(&props),
        vec![("m".into(), d("12.5")), ("calls".into(), d("1"))]
    );
    let mut hot_props = props.clone();
    hot_props.insert("tier".into(), "hot".into());
    assert_eq!(names(&hot_props).len(), 3);
    assert!(rules.quantities("other", &props).unwrap().is_empty());
    assert_eq!(
        rules.quantities("e", &BTreeMap::new()).map(|_| ()),
        Err(Rejected::MissingProperty)
    );
}

#[test]
fn rejected_and_duplicate_inputs_change_nothing() {
    let mut s = Sim::new(vec![overage()]);
    s.grant(top_up("a", "5"));
    s.use_("1");
    let (before, outputs) = (s.c.clone(), s.out.len());
    let bad_usage = Usage {
        id: "e9".into(),
        name: "e".into(),
        properties: [("q".to_string(), "-1".to_string())].into(),
        reservation: None,
    };
    let rejected = [
        (Input::Usage(bad_usage), Rejected::InvalidAmount),
        (
            Input::Grant(Grant {
                meter: "nope".into(),
                ..top_up("b", "1")
            }),
            Rejected::UnknownMeter,
        ),
        (Input::Grant(top_up("b", "0")), Rejected::InvalidAmount),
        (
            Input::Grant(Grant {
                kind: GrantKind::Cycle,
                ..top_up("b", "1")
            }),
            Rejected::InvalidGrant,
        ),
        (
            Input::Grant(Grant {
                effective_at: Some(10),
                expires_at: Some(10),
                ..top_up("b", "1")
            }),
            Rejected::InvalidGrant,
        ),
    ];
    for (input, why) in rejected {
        assert_eq!(s.apply(input), Err(why));
    }
    let dup = Usage {
        id: "e1".into(),
        name: "e".into(),
        properties: BTreeMap::new(),
        reservation: None,
    };
    assert_eq!(s.apply(Input::Usage(dup)), Ok(Applied::Duplicate));
    assert_eq!(
        s.apply(Input::Grant(top_up("a", "7"))),
        Ok(Applied::Duplicate)
    );
    let unmetered = Usage {
        id: "e7".into(),
        name: "nothing".into(),
        properties: BTreeMap::new(),
        reservation: None,
    };
    assert_eq!(s.apply(Input::Usage(unmetered)), Ok(Applied::NoMeter));
    assert_eq!(s.c, before);
    assert_eq!(s.out.len(), outputs);
}

#[test]
fn auto_top_up_fires_once_on_crossing_and_rearms_at_the_threshold() {
    let mut m = overage();
    m.auto_top_up = Some(AutoTopUp {
        below: d("5"),
        pack: "p".into(),
    });
    let mut s = Sim::new(vec![m]);
    s.use_("1");
    s.grant(top_up("a", "10")); // -1 -> 9: never at 5 before, nothing
    s.use_("4"); // 5: at the threshold is not below it
    s.use_("1"); // 4: below
    s.use_("10"); // -6: disarmed
    s.grant(top_up("b", "10")); // 4: still disarmed
    s.grant(top_up("c", "1")); // 5: re-armed
    s.use_("2"); // 3: fires again
    let ups: Vec<(String, Decimal)> = s
        .out
        .iter()
        .filter_map(|o| match o {
            Output::TopUp(t) => Some((t.request_id.clone(), t.balance)),
            _ => None,
        })
        .collect();
    assert_eq!(
        ups,
        vec![
            ("auto:c:m:4".to_string(), d("4")),
            ("auto:c:m:8".to_string(), d("3"))
        ]
    );
}

#[test]
fn auto_top_up_request_ids_fit_in_an_id() {
    assert_eq!(auto_top_up_request_id("c", "m", 3), "auto:c:m:3");
    let long = "c".repeat(200);
    let id = auto_top_up_request_id(&long, "m", 7);
    assert!(id.len() <= 200 && id.starts_with("auto:") && id.ends_with(":7"));
    assert_eq!(id, auto_top_up_request_id(&long, "m", 7));
    assert_ne!(id, auto_top_up_request_id(&long, "n", 7));
}

#[test]
fn amounts_are_exact_plain_decimals_within_bounds() {
    assert_eq!(
        parse_amount("0.1").unwrap() + parse_amount("0.2").unwrap(),
        d("0.3")
    );
    for ok in [
        "1",
        " 12.50 ",
        "+3",
        "-0",
        ".5",
        "5.",
        "0.123456789",
        "1000000000000000",
    ] {
        assert!(parse_amount(ok).is_some(), "{ok:?}");
    }
    for bad in [
        "",
        "-",
        ".",
        "-1",
        "1e3",
        "1_000",
        "0x10",
        "NaN",
        "inf",
        "1.2.3",
        "--1",
        "1 2",
        "0.0000000001",
        "1000000000000000.1",
    ] {
        assert_eq!(parse_amount(bad), None, "{bad:?}");
    }
    assert_eq!(parse_amount("0.1234567890"), Some(d("0.123456789")));
    assert_eq!(parse_amount("2.500").unwrap().to_string(), "2.5");
}

#[test]
fn reasons_have_distinct_labels_and_letters() {
    for r in Reason::ALL {
        assert_eq!(Reason::from_label(r.label()), Some(r));
        assert_eq!(Reason::from_letter(r.letter()), Some(r));
    }
}

#[test]
fn the_book_survives_a_json_round_trip() {
    let mut s = Sim::new(vec![meter(OnExhausted::Overage, vec![Low::Units(d("1"))])]);
    s.grant(cycle("g", "2.25", "1"));
    s.grant(Grant {
        effective_at: Some(9_000),
        expires_at: Some(9_500),
        ..top_up("later", "1")
    });
    let ev = s.use_("3");
    s.apply(Input::VoidUsage(ev)).unwrap();
    let text = serde_json::to_string(&s.c).unwrap();
    let back: Customer = serde_json::from_str(&text).unwrap();
    assert_eq!(back, s.c);
}
