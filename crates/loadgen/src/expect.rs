//! The expectation of a run: what drawdown must end with, kept between phases in a JSON file.
//!
//! The credit rules are `drawdown-model`'s (the same model the ledger's property tests check
//! the ledger against); this file adds only the bookkeeping of a run around it:
//! - per customer, the model's [`Customer`] book (every grant id; of the usage events, a
//!   sample of at most [`KEEP_EVENTS`] not voided, and the voided ones: the rest is forgotten,
//!   as the service forgets them past its dedupe window, so the file stays small);
//! - per (customer, meter), the log of what the output topics must show: one reason letter per
//!   version, the transitions in order, the automatic top-up requests in order;
//! - per customer and meter, the subscriptions that have cycle grants (for renewals);
//! - per run, the time-driven changes still pending and the DLQ records expected.
//!
//! The model is given, as processing time, the wall clock when a record is sent. That is not
//! drawdown's processing time, but it orders the same way wherever the rules look at it (see
//! `produce`'s module docs), so the expectation is exact.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use drawdown::config::Config;
use drawdown::ledger::{Aggregation, MeterDef, OnExhausted, Threshold};
use drawdown_model::{self as model, Applied, Customer, Input, MeterBook, Output, Rejected, Rules};
use rand::rngs::StdRng;
use rand::Rng;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// The usage events not voided a customer keeps for later voids and replays.
pub const KEEP_EVENTS: usize = 4;

/// The configured meters as the model's rules.
pub fn rules(cfg: &Config) -> Rules {
    Rules::new(cfg.meters.iter().map(meter_of).collect())
}

fn meter_of(d: &MeterDef) -> model::Meter {
    model::Meter {
        name: d.name.to_string(),
        event: d.event.clone(),
        filter: d.filter.clone(),
        aggregation: match &d.aggregation {
            Aggregation::Count => model::Aggregation::Count,
            Aggregation::Sum { property } => model::Aggregation::Sum(property.clone()),
        },
        on_exhausted: match d.on_exhausted {
            OnExhausted::Overage => model::OnExhausted::Overage,
            OnExhausted::Block => model::OnExhausted::Block,
        },
        lows: d
            .low_balance
            .iter()
            .map(|t| match *t {
                Threshold::Units(u) => model::Low::Units(u),
                Threshold::Fraction(f) => model::Low::Fraction(f),
            })
            .collect(),
        auto_top_up: d.auto_top_up.as_ref().map(|a| model::AutoTopUp {
            below: a.below,
            pack: a.pack.clone(),
        }),
    }
}

/// One transition the `balance-exhausted` topic must carry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpectedTransition {
    /// exhausted | restored | low.
    pub kind: String,
    /// The version of the change that crossed.
    pub version: u64,
    /// The threshold (low only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<Decimal>,
}

/// What the output topics must show for one (customer, meter).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeterLog {
    /// One [`model::Reason::letter`] per version, from version 1.
    pub reasons: String,
    /// The transitions, in order.
    pub transitions: Vec<ExpectedTransition>,
    /// The automatic top-up requests, in order: (request id, pack).
    pub top_ups: Vec<(String, String)>,
}

/// One customer of the run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerExpect {
    /// The model's book of the customer.
    pub book: Customer,
    /// meter -> what its output records must show.
    pub logs: BTreeMap<String, MeterLog>,
    /// meter -> the subscriptions with cycle grants, in order of their first grant.
    pub subs: BTreeMap<String, Vec<String>>,
}

impl CustomerExpect {
    /// The meter's book, if the meter was touched.
    pub fn meter(&self, name: &str) -> Option<&MeterBook> {
        self.book.meter(name)
    }

    /// The ids of the usage events kept and not voided.
    pub fn kept_events(&self) -> Vec<String> {
        self.book
            .events
            .iter()
            .filter(|(_, e)| !e.voided)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Logs what the rules emitted.
    fn log(&mut self, out: Vec<Output>) {
        for o in out {
            match o {
                Output::Changed(c) => self
                    .logs
                    .entry(c.meter)
                    .or_default()
                    .reasons
                    .push(c.reason.letter()),
                Output::Transition(t) => {
                    self.logs
                        .entry(t.meter)
                        .or_default()
                        .transitions
                        .push(ExpectedTransition {
                            kind: t.kind.label().into(),
                            version: t.version,
                            threshold: t.threshold,
                        })
                }
                Output::TopUp(t) => self
                    .logs
                    .entry(t.meter)
                    .or_default()
                    .top_ups
                    .push((t.request_id, t.pack)),
            }
        }
    }
}

/// The expectation file.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Expectation {
    /// Customer id prefix of the run.
    pub prefix: String,
    /// Phases produced so far (part of the record ids and of the RNG seed).
    pub phases: u64,
    /// customer -> what it must end with.
    pub customers: BTreeMap<String, CustomerExpect>,
    /// Pending time-driven changes (activations, expiries): the first and the last time.
    #[serde(default)]
    pub due: Option<(i64, i64)>,
    /// The last time-driven change applied so far (by the `expire` phase).
    #[serde(default)]
    pub last_due: Option<i64>,
    /// Expected DLQ records of the run's customers: `void_duplicate`, `void_unknown`, and
    /// `malformed` (the `--bad` records, whatever their reason).
    #[serde(default)]
    pub dlq: BTreeMap<String, u64>,
}

impl Expectation {
    /// The expectation saved at `path`, `None` if there is none yet.
    pub fn load(path: &Path) -> anyhow::Result<Option<Self>> {
        match std::fs::read(path) {
            Ok(bytes) => Ok(Some(
                serde_json::from_slice(&bytes)
                    .with_context(|| format!("parsing {}", path.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Saves to `path` (through a temporary file, so a crash leaves the old one).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
        Ok(())
    }

    /// The customer, created empty if new.
    pub fn customer(&mut self, id: &str) -> &mut CustomerExpect {
        self.customers
            .entry(id.into())
            .or_insert_with(|| CustomerExpect {
                book: Customer::new(id),
                ..CustomerExpect::default()
            })
    }

    /// The book of one (customer, meter), if touched.
    pub fn meter(&self, customer: &str, meter: &str) -> Option<&MeterBook> {
        self.customers.get(customer)?.meter(meter)
    }

    /// Applies an input of `customer` sent at `now` to the model, and logs its outputs.
    pub fn apply(
        &mut self,
        rules: &Rules,
        customer: &str,
        input: &Input,
        now: i64,
    ) -> Result<Applied, Rejected> {
        let c = self.customer(customer);
        let mut out = Vec::new();
        let applied = rules.apply(&mut c.book, input, now, &mut out)?;
        c.log(out);
        if let (Input::Grant(g), Applied::Applied) = (input, applied) {
            if let (model::GrantKind::Cycle, Some(sub)) = (g.kind, &g.subscription) {
                let subs = c.subs.entry(g.meter.clone()).or_default();
                if !subs.contains(sub) {
                    subs.push(sub.clone());
                }
            }
        }
        Ok(applied)
    }

    /// Keeps usage event `id` of `customer` for later voids (forgetting a random kept one
    /// beyond [`KEEP_EVENTS`]), or forgets it now.
    pub fn sample_event(&mut self, customer: &str, id: &str, keep: bool, rng: &mut StdRng) {
        let c = self.customer(customer);
        if !keep {
            c.book.forget_event(id);
            return;
        }
        let others: Vec<String> = c.kept_events().into_iter().filter(|e| e != id).collect();
        if others.len() >= KEEP_EVENTS {
            c.book
                .forget_event(&others[rng.random_range(0..others.len())]);
        }
    }

    /// Applies every pending activation and expiry up to `now`, as drawdown's tick does.
    pub fn advance(&mut self, rules: &Rules, now: i64) {
        for c in self.customers.values_mut() {
            let mut out = Vec::new();
            rules.advance(&mut c.book, now, &mut out);
            c.log(out);
        }
    }

    /// Whether a usage event sent now may carry an event time [`crate::gen::LATE_BY`] old. The
    /// model applies every event at the time it is sent, drawdown a late one at its stream time
    /// (up to the grace, 30 s, behind the newest event): the two agree unless a time-driven
    /// change came due in between, so none may lie within that window (a minute of margin).
    pub fn late_allowed(&self, now: i64) -> bool {
        let window = crate::gen::LATE_BY.as_millis() as i64 + 60_000;
        self.last_due.is_none_or(|t| t < now - window)
            && self.due.is_none_or(|(first, _)| first > now + 60_000)
    }

    /// Notes a pending time-driven change at `at`.
    pub fn due_at(&mut self, at: i64) {
        self.due = Some(match self.due {
            None => (at, at),
            Some((a, b)) => (a.min(at), b.max(at)),
        });
    }

    /// Expects `n` more DLQ records with this reason.
    pub fn count_dlq(&mut self, reason: &str, n: u64) {
        if n > 0 {
            *self.dlq.entry(reason.into()).or_default() += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    fn example_config() -> Config {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/drawdown.toml");
        Config::load(Some(&path), Vec::new()).unwrap()
    }

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    fn top_up(id: &str, meter: &str, amount: &str) -> Input {
        Input::Grant(model::Grant {
            id: id.into(),
            meter: meter.into(),
            amount: d(amount),
            kind: model::GrantKind::TopUp,
            priority: 0,
            effective_at: None,
            expires_at: None,
            subscription: None,
            rollover: Decimal::ZERO,
        })
    }

    fn calls(id: &str) -> Input {
        Input::Usage(model::Usage {
            id: id.into(),
            name: "api_call".into(),
            properties: BTreeMap::new(),
            reservation: None,
        })
    }

    #[test]
    fn the_example_meters_keep_their_rules_in_the_model() {
        let rules = rules(&example_config());
        let props: BTreeMap<String, String> = [("tokens".to_string(), "12.5".to_string())].into();
        let q: Vec<_> = rules
            .quantities("llm_completion", &props)
            .unwrap()
            .into_iter()
            .map(|(m, q)| (m.name.as_str(), q))
            .collect();
        assert_eq!(q, vec![("tokens", d("12.5")), ("llm_requests", d("1"))]);
        let api = rules.meter("api_calls").unwrap();
        assert_eq!(
            api.lows,
            vec![model::Low::Units(d("100")), model::Low::Fraction(d("0.1"))]
        );
        assert_eq!(api.auto_top_up.as_ref().unwrap().below, d("50"));
        assert_eq!(
            rules.meter("tokens").unwrap().on_exhausted,
            model::OnExhausted::Block
        );
    }

    #[test]
    fn outputs_are_logged_per_meter_and_subscriptions_noted() {
        let rules = rules(&example_config());
        let mut x = Expectation::default();
        let cycle = Input::Grant(model::Grant {
            kind: model::GrantKind::Cycle,
            subscription: Some("s1".into()),
            ..match top_up("c1", "api_calls", "60") {
                Input::Grant(g) => g,
                _ => unreachable!(),
            }
        });
        assert_eq!(x.apply(&rules, "cus-1", &cycle, 1), Ok(Applied::Applied));
        assert_eq!(x.apply(&rules, "cus-1", &cycle, 2), Ok(Applied::Duplicate));
        for i in 0..11 {
            x.apply(&rules, "cus-1", &calls(&format!("e{i}")), 3 + i)
                .unwrap();
        }
        let c = &x.customers["cus-1"];
        let log = &c.logs["api_calls"];
        assert_eq!(log.reasons, format!("g{}", "u".repeat(11)));
        // 60 -> 49: below 100 was never armed from 60, below 6 not yet; the top-up at 49 < 50.
        assert_eq!(
            log.top_ups,
            vec![("auto:cus-1:api_calls:12".into(), "calls-1000".into())]
        );
        assert_eq!(c.subs["api_calls"], vec!["s1".to_string()]);
        assert_eq!(
            x.apply(&rules, "cus-1", &Input::VoidUsage("nope".into()), 20),
            Err(Rejected::VoidUnknown)
        );
    }

    #[test]
    fn a_sample_of_the_events_is_kept_and_the_rest_forgotten() {
        let rules = rules(&example_config());
        let mut x = Expectation::default();
        let mut rng = StdRng::seed_from_u64(1);
        x.apply(&rules, "c", &top_up("g", "api_calls", "100"), 1)
            .unwrap();
        for i in 0..10 {
            let id = format!("e{i}");
            x.apply(&rules, "c", &calls(&id), 2 + i).unwrap();
            x.sample_event("c", &id, i % 2 == 0, &mut rng);
        }
        let kept = x.customers["c"].kept_events();
        assert_eq!(kept.len(), KEEP_EVENTS);
        assert!(kept
            .iter()
            .all(|id| id.trim_start_matches('e').parse::<u32>().unwrap() % 2 == 0));
        assert_eq!(
            x.apply(&rules, "c", &Input::VoidUsage("e1".into()), 20),
            Err(Rejected::VoidUnknown),
            "a forgotten event is unknown"
        );
        let id = kept[0].clone();
        x.apply(&rules, "c", &Input::VoidUsage(id), 21).unwrap();
        assert_eq!(x.customers["c"].kept_events().len(), KEEP_EVENTS - 1);
        assert_eq!(x.meter("c", "api_calls").unwrap().voided, d("1"));
    }

    #[test]
    fn the_expectation_tracks_what_is_due_and_applies_it() {
        let rules = rules(&example_config());
        let mut x = Expectation::default();
        x.due_at(5_000);
        x.due_at(4_000);
        assert_eq!(x.due, Some((4_000, 5_000)));
        let g = match top_up("a", "api_calls", "2") {
            Input::Grant(g) => Input::Grant(model::Grant {
                expires_at: Some(5_000),
                ..g
            }),
            _ => unreachable!(),
        };
        x.apply(&rules, "c", &g, 1).unwrap();
        x.advance(&rules, 4_999);
        assert_eq!(x.meter("c", "api_calls").unwrap().expired, d("0"));
        x.advance(&rules, 5_000);
        assert_eq!(x.meter("c", "api_calls").unwrap().expired, d("2"));
        assert_eq!(x.customers["c"].logs["api_calls"].reasons, "gx");
    }

    #[test]
    fn the_expectation_survives_a_round_trip_through_its_file() {
        let rules = rules(&example_config());
        let mut x = Expectation {
            prefix: "cus".into(),
            ..Default::default()
        };
        x.apply(&rules, "cus-1", &top_up("g", "tokens", "2.25"), 1)
            .unwrap();
        x.count_dlq("void_unknown", 2);
        x.due_at(9);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("expect.json");
        assert!(Expectation::load(&path).unwrap().is_none());
        x.save(&path).unwrap();
        let back = Expectation::load(&path).unwrap().unwrap();
        assert_eq!(back.customers, x.customers);
        assert_eq!((back.dlq, back.due), (x.dlq, x.due));
    }
}
