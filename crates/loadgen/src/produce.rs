//! `produce`: one phase of generated records, applied to the expectation as they are sent.
//!
//! # What is generated
//! `--phase` chooses the records, for customers `<prefix>-0 .. <prefix>-(N-1)` over the
//! configured meters, keyed by `customer_id`, written by an idempotent producer with the Java
//! client's partitioner (`murmur2_random`), as JSON or protobuf (`content-type` header):
//! - `grants`: per customer x meter, for most customers a `cycle` grant of subscription
//!   `<customer>-s1` (some also `-s2`; rollover cap 0, a quarter or all of it; priority 10 or
//!   50), and (always for the others) a `top_up` or `adjustment` stacked on it (priorities
//!   0-200, a fifth with a far expiry), sized around the usage planned by `--events`;
//! - `expiring`: for some meters a top-up expiring `--expire-in` from now (priority 0 or 10,
//!   so usage draws it first), for some a grant scheduled to start a second before that (a
//!   few of them cycle grants: a renewal on a tick), for some a reservation whose hold runs out
//!   half a second before the expiries;
//! - `expire`: the time barrier, sends nothing: run after `wait-idle`, it fails unless every
//!   input so far was processed before the first pending activation/expiry, sleeps until 3 s
//!   past the last one (the periodic tick applies them without new events) and applies them
//!   to the expectation;
//! - `usage`: `--events` usage events; the event names are the meters' `event`s, sum meters get
//!   exact decimal quantities (`"12.5"`), and an event matching several meters (the example's
//!   `llm_completion` feeds `tokens` and `llm_requests`) draws from each. `--duplicates F`
//!   re-sends a fraction of them with the same id, and F/2 reuse ids of earlier phases' events
//!   (voided or not) with other contents (all must be counted once);
//! - `topups`: top-ups for a random subset, restoring most of the exhausted meters (and, on
//!   purpose, paying only part of some debts so they stay exhausted);
//! - `renewal`: a new cycle grant for every subscription (half of the second ones): the
//!   previous cycle ends, its remainder carried over up to the rollover cap; some top-ups;
//! - `voids`: for a random subset of customers `VoidGrant` (often of a grant that a kept
//!   event drew from), `VoidUsage` of kept events (some of which drew from grants since
//!   expired, ended or voided: returned as `void:<event>` adjustments), repeated voids (DLQ
//!   `void_duplicate`) and voids of unknown ids (DLQ `void_unknown`);
//! - `reservations`: holds made, settled by usage naming them (more or less than held),
//!   released, repeated, or left held; see [`reservations`]. The `expiring` phase also makes
//!   holds that run out at the barrier;
//! - `mixed`: usage with grants and top-ups interleaved, for demos and throughput. The relative
//!   order of two topics is not defined, so nothing exact can be predicted: `--expect` is refused.
//!
//! The grant phases also replay a few known grant ids (another amount: ignored). `--bad N` adds
//! N malformed records (garbage bytes, wrong types, missing fields, a negative amount, an
//! unknown meter, ...) that must end in the DLQ and change nothing.
//!
//! # Why the expectation is exact
//! Each record is applied to the model ([`crate::expect`]) when it is sent, with the wall clock
//! of that moment as its processing time. drawdown processes it later, but in the same order:
//! - each customer's records go to one partition of one topic per phase, in order (idempotent
//!   producer), voids and grants on the same topic, and phases are separated by `wait-idle`;
//! - the only time-driven changes are the `expiring` phase's, and the `expire` barrier proves
//!   that nothing else was processed at or after them and sends nothing before they are due
//!   (the pipeline applies due changes before any later input);
//! - the rules break draw-down ties by `effective_at` (the processing time of a grant without
//!   one) and then id. Sending times order a customer's grants as drawdown's processing times
//!   do, ids of one phase sort in sending order (zero-padded), later phases sort and are
//!   processed later, scheduled grants start between the phases before and after the barrier,
//!   and priority 255 is left to the `void:` adjustments, which the `voids` phase creates in
//!   ascending event id order.
//!
//! Not generated (so not modelled ambiguously): grants already expired on arrival, voids of
//! pending grants, more than `MAX_DRAINED` drained grants per meter (`verify` reports if the
//! model ever pruned), and `mixed` with an expectation.

use std::time::Duration;

use anyhow::{bail, Context};
use drawdown::clock::now_ms;
use drawdown::config::Config;
use drawdown_model::{Applied, Grant, GrantKind, Input, Usage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;

use crate::args::{Phase, ProduceArgs};
use crate::expect::{self, Expectation};
use crate::gen::{Gen, Rec, VoidCmd};
use crate::sender::Sender;

mod reservations;

/// The chance that a new usage event is kept for later voids.
const SAMPLE_EVENTS: f64 = 0.05;

/// Expiries further out than this never come due during a run.
const NEAR: i64 = 24 * 3600 * 1000;

/// `produce`: sends one phase of generated records (see the module docs).
pub async fn produce(cfg: &Config, args: ProduceArgs) -> anyhow::Result<()> {
    if args.phase == Phase::Mixed && args.expect.is_some() {
        bail!("--expect cannot be used with --phase mixed: the order of grants relative to usage (two topics) is not defined");
    }
    if args.customers == 0 {
        bail!("--customers must be >= 1");
    }
    if !(0.0..=1.0).contains(&args.late) {
        bail!("--late is a fraction in [0, 1]");
    }
    if !(0.0..=1.0).contains(&args.duplicates) {
        bail!("--duplicates is a fraction in [0, 1]");
    }
    if cfg.meters.is_empty() {
        bail!("no meters configured");
    }
    // Creates missing topics with the configured partitions (the broker's auto-creation would
    // not co-partition them).
    drawdown::kafka::admin::ensure_topics(cfg)
        .await
        .context("preparing topics")?;
    let cfg = cfg.clone();
    tokio::task::spawn_blocking(move || produce_blocking(&cfg, args))
        .await
        .context("produce task")?
}

fn produce_blocking(cfg: &Config, args: ProduceArgs) -> anyhow::Result<()> {
    let mut expectation = match &args.expect {
        Some(p) => Expectation::load(p)?.unwrap_or_default(),
        None => Expectation::default(),
    };
    if expectation.phases > 0 && expectation.prefix != args.prefix {
        bail!(
            "the expectation is for prefix {:?}, not {:?}",
            expectation.prefix,
            args.prefix
        );
    }
    if let Some((first, _)) = expectation.due {
        if args.phase != Phase::Expire && now_ms() >= first {
            bail!("activations/expiries are due since {first}: run --phase expire first");
        }
    }
    expectation.prefix = args.prefix.clone();
    expectation.phases += 1;
    // Record ids must be unique across phases: with an expectation the phase number makes them
    // so (deterministically); without one, the clock does.
    let run_tag = if args.expect.is_some() {
        format!("p{:03}", expectation.phases)
    } else {
        format!("t{}", now_ms())
    };
    let phase_code = args.phase as u64;
    let gen = Gen {
        rng: StdRng::seed_from_u64(
            args.seed ^ expectation.phases.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (phase_code << 56),
        ),
        rules: expect::rules(cfg),
        prefix: args.prefix.clone(),
        customers: args.customers,
        tag: format!("{}-{run_tag}", args.prefix),
        format: args.format,
        events: args.events,
        seq: 0,
        late: args.late,
        late_allowed: false,
    };
    let mut run = Run {
        gen,
        sender: Sender::new(cfg, args.rate)?,
        expect: &mut expectation,
        duplicates: args.duplicates,
        recent: Vec::new(),
        bad_left: args.bad,
        bad_sent: 0,
    };
    match args.phase {
        Phase::Grants => run.phase_grants()?,
        Phase::Expiring => run.phase_expiring(args.expire_in)?,
        Phase::Expire => run.phase_expire()?,
        Phase::Usage => run.phase_usage()?,
        Phase::Topups => run.phase_topups()?,
        Phase::Renewal => run.phase_renewal()?,
        Phase::Voids => run.phase_voids()?,
        Phase::Reservations => run.phase_reservations()?,
        Phase::Mixed => run.phase_mixed()?,
    }
    run.flush_bad()?;
    let bad_sent = run.bad_sent;
    run.expect.count_dlq("malformed", bad_sent);
    let sent = run.sender.finish()?;
    if let Some(p) = &args.expect {
        expectation.save(p)?;
    }
    let counts: Vec<String> = sent
        .counts
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!(
        "produce: phase={} records={} ({}) elapsed={:.1}s rate={:.0}/s",
        format!("{:?}", args.phase).to_lowercase(),
        sent.records,
        counts.join(" "),
        sent.elapsed.as_secs_f64(),
        sent.records as f64 / sent.elapsed.as_secs_f64().max(1e-9)
    );
    Ok(())
}

/// Sends the records of one phase and applies them to the expectation.
struct Run<'a> {
    gen: Gen,
    sender: Sender,
    expect: &'a mut Expectation,
    duplicates: f64,
    /// A sample of the usage records sent, for exact re-sends.
    recent: Vec<Rec>,
    bad_left: u64,
    bad_sent: u64,
}

/// The ids a customer's voids choose from.
#[derive(Default)]
struct VoidPools {
    /// Kept usage events not voided.
    events: Vec<String>,
    /// Grants not voided that those events drew from.
    drawn_from: Vec<String>,
    /// Grants not voided.
    grants: Vec<String>,
    /// Grants voided.
    voided_grants: Vec<String>,
}

impl Run<'_> {
    fn send_usage(&mut self, i: usize) -> anyhow::Result<()> {
        let (customer, e) = self.gen.usage_event(i);
        self.send_event(&customer, e)
    }

    /// Sends usage event `e` of `customer` (and now and then a duplicate or a replayed id).
    fn send_event(&mut self, customer: &str, e: Usage) -> anyhow::Result<()> {
        let customer = customer.to_string();
        let input = Input::Usage(e.clone());
        match self
            .expect
            .apply(&self.gen.rules, &customer, &input, now_ms())
        {
            Ok(Applied::Applied) => {}
            other => bail!("the model took generated event {} as {other:?}", e.id),
        }
        let drew = !self.expect.customers[&customer].book.events[&e.id]
            .draws
            .is_empty();
        let keep = drew && self.gen.rng.random_bool(SAMPLE_EVENTS);
        self.expect
            .sample_event(&customer, &e.id, keep, &mut self.gen.rng);
        self.gen.late_allowed = self.expect.late_allowed(now_ms());
        let rec = self.gen.encode_usage(&customer, &e);
        self.sender.send(&rec, "usage")?;
        if self.recent.len() < 1000 {
            self.recent.push(rec);
        } else {
            let k = self.gen.rng.random_range(0..self.recent.len());
            self.recent[k] = rec;
        }
        if self.duplicates > 0.0 && self.gen.rng.random_bool(self.duplicates.min(1.0)) {
            let dup = self.recent[self.gen.rng.random_range(0..self.recent.len())].clone();
            self.sender.send(&dup, "duplicates")?;
        }
        if self.duplicates > 0.0 && self.gen.rng.random_bool((self.duplicates / 2.0).min(1.0)) {
            self.replay_usage()?;
        }
        Ok(())
    }

    /// Re-sends the id of an event of an earlier phase (voided or not) with other contents:
    /// a duplicate all the same.
    fn replay_usage(&mut self) -> anyhow::Result<()> {
        let i = self.gen.pick_index();
        let c = self.gen.customer(i);
        let ids: Vec<String> = self
            .expect
            .customers
            .get(&c)
            .map(|x| x.book.events.keys().cloned().collect())
            .unwrap_or_default();
        if ids.is_empty() {
            return Ok(());
        }
        let (_, mut e) = self.gen.usage_event(i);
        e.id = ids[self.gen.rng.random_range(0..ids.len())].clone();
        let rec = self.gen.encode_usage(&c, &e);
        self.sender.send(&rec, "replays")
    }

    fn send_grant(&mut self, customer: &str, g: &Grant) -> anyhow::Result<()> {
        let now = now_ms();
        let input = Input::Grant(g.clone());
        let what = match self.expect.apply(&self.gen.rules, customer, &input, now) {
            Ok(Applied::Applied) => {
                if let Some(e) = g.effective_at {
                    self.expect.due_at(e);
                }
                if let Some(x) = g.expires_at.filter(|x| *x < now + NEAR) {
                    self.expect.due_at(x);
                }
                "grants"
            }
            Ok(Applied::Duplicate) => "grant_replays",
            other => bail!("the model took generated grant {} as {other:?}", g.id),
        };
        let rec = self.gen.encode_grant(customer, g);
        self.sender.send(&rec, what)
    }

    /// Re-sends a known grant id of `customer` with another amount: ignored.
    fn maybe_replay_grant(&mut self, customer: &str, chance: f64) -> anyhow::Result<()> {
        if !self.gen.rng.random_bool(chance) {
            return Ok(());
        }
        let known: Vec<(String, String)> = self
            .expect
            .customers
            .get(customer)
            .map(|c| {
                c.book
                    .grants
                    .iter()
                    .map(|(id, g)| (id.clone(), g.meter.clone()))
                    .collect()
            })
            .unwrap_or_default();
        if known.is_empty() {
            return Ok(());
        }
        let (id, meter) = known[self.gen.rng.random_range(0..known.len())].clone();
        let m = self
            .gen
            .rules
            .meter(&meter)
            .expect("a configured meter")
            .clone();
        let mut g = self
            .gen
            .new_grant(&m, Decimal::from(7), GrantKind::TopUp, 0);
        g.id = id;
        self.send_grant(customer, &g)
    }

    fn send_void(&mut self, customer: &str, v: &VoidCmd) -> anyhow::Result<()> {
        let input = match v {
            VoidCmd::Usage(id) => Input::VoidUsage(id.clone()),
            VoidCmd::Grant(id) => Input::VoidGrant(id.clone()),
        };
        let what = match (
            v,
            self.expect
                .apply(&self.gen.rules, customer, &input, now_ms()),
        ) {
            (VoidCmd::Usage(_), Ok(Applied::Applied)) => "void_usage",
            (VoidCmd::Grant(_), Ok(Applied::Applied)) => "void_grant",
            (_, Err(rejected)) => {
                self.expect.count_dlq(rejected.reason(), 1);
                rejected.reason()
            }
            (_, Ok(other)) => bail!("the model took a void as {other:?}"),
        };
        let rec = self.gen.encode_void(customer, v);
        self.sender.send(&rec, what)
    }

    /// Sends a bad record now and then, so that `--bad` are spread over `steps` steps.
    fn maybe_bad(&mut self, step: u64, steps: u64) -> anyhow::Result<()> {
        if self.bad_left == 0 {
            return Ok(());
        }
        let every = (steps / (self.bad_left + self.bad_sent + 1)).max(1);
        if step.is_multiple_of(every) || step + 1 >= steps {
            self.send_bad()?;
        }
        Ok(())
    }

    fn flush_bad(&mut self) -> anyhow::Result<()> {
        while self.bad_left > 0 {
            self.send_bad()?;
        }
        Ok(())
    }

    fn send_bad(&mut self) -> anyhow::Result<()> {
        let rec = self.gen.bad_record(self.bad_sent);
        self.sender.send(&rec, "bad")?;
        self.bad_left -= 1;
        self.bad_sent += 1;
        Ok(())
    }

    /// Runs `f` for every (customer, meter), then `maybe_bad`.
    fn each_meter(
        &mut self,
        mut f: impl FnMut(&mut Self, &str, &drawdown_model::Meter) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let steps = (self.gen.customers * self.gen.meters().len()) as u64;
        let mut step = 0;
        for i in 0..self.gen.customers {
            let c = self.gen.customer(i);
            for mi in 0..self.gen.meters().len() {
                let m = self.gen.meters()[mi].clone();
                f(self, &c, &m)?;
                self.maybe_bad(step, steps)?;
                step += 1;
            }
        }
        Ok(())
    }

    /// Cycle grants for most customers (sometimes two subscriptions), top-ups and
    /// adjustments stacked on them or alone, a few replayed grant ids.
    fn phase_grants(&mut self) -> anyhow::Result<()> {
        let mut subscriber = false;
        let mut last_customer = String::new();
        self.each_meter(|run, c, m| {
            if c != last_customer {
                last_customer = c.to_string();
                subscriber = run.gen.rng.random_bool(0.6);
            }
            if subscriber {
                let g = run.gen.cycle_grant(m, &format!("{c}-s1"));
                run.send_grant(c, &g)?;
                if run.gen.rng.random_bool(0.15) {
                    let g = run.gen.cycle_grant(m, &format!("{c}-s2"));
                    run.send_grant(c, &g)?;
                }
            }
            if !subscriber || run.gen.rng.random_bool(0.5) {
                let base = run.gen.planned_use(m);
                let amount = run.gen.amount(m, base);
                let kind = if run.gen.rng.random_bool(0.8) {
                    GrantKind::TopUp
                } else {
                    GrantKind::Adjustment
                };
                let g = run.gen.grant(m, amount, kind);
                run.send_grant(c, &g)?;
            }
            run.maybe_replay_grant(c, 0.05)
        })
    }

    /// Top-ups expiring at `now + expire_in` (priority 0 or 10: drawn first), and grants
    /// scheduled a second before that (some of them cycle grants: a renewal on a tick).
    fn phase_expiring(&mut self, expire_in: Duration) -> anyhow::Result<()> {
        let expires_at = now_ms() + expire_in.as_millis() as i64;
        let effective_at = expires_at - 1000;
        self.each_meter(|run, c, m| {
            let base = run.gen.planned_use(m);
            if run.gen.rng.random_bool(0.35) {
                let amount = run.gen.amount(m, base / Decimal::TWO);
                let priority = [0u8, 10][run.gen.rng.random_range(0..2)];
                let mut g = run.gen.new_grant(m, amount, GrantKind::TopUp, priority);
                g.expires_at = Some(expires_at);
                run.send_grant(c, &g)?;
            }
            if run.gen.rng.random_bool(0.12) {
                let sub = run
                    .expect
                    .customers
                    .get(c)
                    .and_then(|x| x.subs.get(&m.name))
                    .and_then(|s| s.first().cloned());
                let mut g = match sub {
                    Some(sub) if run.gen.rng.random_bool(0.4) => run.gen.cycle_grant(m, &sub),
                    _ => {
                        let amount = run.gen.amount(m, base);
                        run.gen.grant(m, amount, GrantKind::TopUp)
                    }
                };
                g.effective_at = Some(effective_at);
                run.send_grant(c, &g)?;
            }
            if run.gen.rng.random_bool(0.08) {
                // A hold that runs out just before the grants expire.
                run.reserve_until(c, m, expires_at - 500)?;
            }
            Ok(())
        })
    }

    /// The time barrier: see [`Phase::Expire`].
    fn phase_expire(&mut self) -> anyhow::Result<()> {
        let Some((first, last)) = self.expect.due else {
            println!("expire: nothing pending");
            return Ok(());
        };
        let now = now_ms();
        if now >= first {
            bail!(
                "expire: the earlier inputs may have been processed after the first pending \
                 activation/expiry ({} ms ago), so their order is unknown; give the expiring \
                 phase a longer --expire-in",
                now - first
            );
        }
        // Past the last one, plus a tick or two, so that the tick (not a later input) applies
        // most of them.
        let until = last + 3000;
        println!(
            "expire: {:.1}s of slack before the first activation; sleeping {:.1}s",
            (first - now) as f64 / 1000.0,
            (until - now) as f64 / 1000.0
        );
        std::thread::sleep(Duration::from_millis((until - now).max(0) as u64));
        self.expect.advance(&self.gen.rules, last);
        self.expect.last_due = Some(last);
        self.expect.due = None;
        Ok(())
    }

    fn phase_usage(&mut self) -> anyhow::Result<()> {
        let steps = self.gen.events;
        for step in 0..steps {
            let i = self.gen.pick_index();
            self.send_usage(i)?;
            self.maybe_bad(step, steps)?;
        }
        Ok(())
    }

    fn phase_topups(&mut self) -> anyhow::Result<()> {
        self.each_meter(|run, c, m| {
            let balance = run
                .expect
                .meter(c, &m.name)
                .map(|b| b.balance())
                .unwrap_or_default();
            let chance = if balance <= Decimal::ZERO { 0.7 } else { 0.3 };
            if run.gen.rng.random_bool(chance) {
                let debt = (-balance).max(Decimal::ZERO);
                let amount = if debt > Decimal::ONE && run.gen.rng.random_bool(0.2) {
                    // Pays only part of the debt: stays exhausted.
                    (debt / Decimal::TWO).floor().max(Decimal::ONE)
                } else {
                    let base = run.gen.planned_use(m);
                    debt + run.gen.amount(m, base)
                };
                let g = run.gen.grant(m, amount, GrantKind::TopUp);
                run.send_grant(c, &g)?;
            }
            Ok(())
        })
    }

    /// A new cycle for every first subscription (half of the second ones), ending the
    /// previous cycle; some top-ups on top; a few replayed grant ids.
    fn phase_renewal(&mut self) -> anyhow::Result<()> {
        self.each_meter(|run, c, m| {
            let subs = run
                .expect
                .customers
                .get(c)
                .and_then(|x| x.subs.get(&m.name))
                .cloned()
                .unwrap_or_default();
            for (k, sub) in subs.iter().enumerate() {
                if k == 0 || run.gen.rng.random_bool(0.5) {
                    let g = run.gen.cycle_grant(m, sub);
                    run.send_grant(c, &g)?;
                }
            }
            if run.gen.rng.random_bool(0.25) {
                let base = run.gen.planned_use(m);
                let amount = run.gen.amount(m, base);
                let g = run.gen.grant(m, amount, GrantKind::TopUp);
                run.send_grant(c, &g)?;
            }
            run.maybe_replay_grant(c, 0.05)
        })
    }

    /// What `customer`'s voids choose from.
    fn void_pools(&self, customer: &str) -> VoidPools {
        let Some(c) = self.expect.customers.get(customer) else {
            return VoidPools::default();
        };
        let book = &c.book;
        let live = |g: &String| book.grants.get(g).is_some_and(|x| !x.voided);
        VoidPools {
            events: c.kept_events(),
            drawn_from: book
                .events
                .values()
                .filter(|e| !e.voided)
                .flat_map(|e| e.draws.iter().flat_map(|d| d.grants.iter()))
                .map(|(g, _)| g.clone())
                .filter(live)
                .collect(),
            grants: book.grants.keys().filter(|g| live(g)).cloned().collect(),
            voided_grants: book.grants.keys().filter(|g| !live(g)).cloned().collect(),
        }
    }

    /// Voids for a random subset of the customers: a grant (often one a kept event drew
    /// from), kept events (ascending ids), repeats of both, unknown ids, replayed grant ids.
    fn phase_voids(&mut self) -> anyhow::Result<()> {
        let steps = self.gen.customers as u64;
        for i in 0..self.gen.customers {
            let c = self.gen.customer(i);
            self.maybe_bad(i as u64, steps)?;
            if !self.gen.rng.random_bool(0.4) {
                continue;
            }
            let pools = self.void_pools(&c);
            let rng = &mut self.gen.rng;
            let mut cmds: Vec<VoidCmd> = Vec::new();
            if rng.random_bool(0.3) {
                let pool = if !pools.drawn_from.is_empty() && rng.random_bool(0.6) {
                    &pools.drawn_from
                } else {
                    &pools.grants
                };
                if !pool.is_empty() {
                    cmds.push(VoidCmd::Grant(
                        pool[rng.random_range(0..pool.len())].clone(),
                    ));
                }
            }
            let n = rng.random_range(1..=2usize).min(pools.events.len());
            let mut chosen: Vec<String> = Vec::new();
            while chosen.len() < n {
                let e = pools.events[rng.random_range(0..pools.events.len())].clone();
                if !chosen.contains(&e) {
                    chosen.push(e);
                }
            }
            // Ascending ids: the `void:` adjustments they may create tie-break by id.
            chosen.sort();
            cmds.extend(chosen.iter().cloned().map(VoidCmd::Usage));
            if !chosen.is_empty() && rng.random_bool(0.3) {
                cmds.push(VoidCmd::Usage(chosen[0].clone()));
            }
            if let Some(VoidCmd::Grant(g)) = cmds.first().cloned() {
                if rng.random_bool(0.3) {
                    cmds.push(VoidCmd::Grant(g));
                }
            }
            let voided = &pools.voided_grants;
            if !voided.is_empty() && rng.random_bool(0.1) {
                cmds.push(VoidCmd::Grant(
                    voided[rng.random_range(0..voided.len())].clone(),
                ));
            }
            if self.gen.rng.random_bool(0.08) {
                cmds.push(VoidCmd::Usage(self.gen.next_id("unknown")));
            }
            if self.gen.rng.random_bool(0.05) {
                cmds.push(VoidCmd::Grant(self.gen.next_id("unknown")));
            }
            for v in &cmds {
                self.send_void(&c, v)?;
            }
            self.maybe_replay_grant(&c, 0.1)?;
        }
        Ok(())
    }

    fn phase_mixed(&mut self) -> anyhow::Result<()> {
        let mut granted = vec![false; self.gen.customers];
        let steps = self.gen.events;
        for step in 0..steps {
            // A customer gets its first grants just before its first usage event (on the other
            // topic, so not necessarily processed first), and now and then a top-up.
            let i = self.gen.pick_index();
            if !granted[i] || self.gen.rng.random_bool(0.005) {
                granted[i] = true;
                let c = self.gen.customer(i);
                for mi in 0..self.gen.meters().len() {
                    let m = self.gen.meters()[mi].clone();
                    let base = self.gen.planned_use(&m);
                    let amount = self.gen.amount(&m, base);
                    let g = self.gen.grant(&m, amount, GrantKind::TopUp);
                    self.send_grant(&c, &g)?;
                }
            }
            self.send_usage(i)?;
            self.maybe_bad(step, steps)?;
        }
        Ok(())
    }
}
