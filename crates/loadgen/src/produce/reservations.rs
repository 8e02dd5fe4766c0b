//! Reservations: the `reservations` phase, and the holds of the `expiring` phase.
//!
//! # What is generated
//! `--events` steps. Each makes a hold on a random customer's meter (units around one usage
//! event's quantity, a tenth of them far larger: a block meter refuses what it cannot cover,
//! and the refusal is recorded) or ends an open one:
//! - settled by a usage event naming it, whose quantity is 0.5x-1.5x the held units (more or
//!   less than held; on a meter counting events, one);
//! - released;
//! - or the reserve is sent again with other units: a duplicate, the first answer stands.
//!
//! A few releases repeat an ended reservation (nothing changes) or name an unknown one (DLQ
//! `reservation_unknown`). The holds still open at the end stay held (an hour's ttl: none runs
//! out during a run), so `verify` compares `reserved`, and the later usage of a block meter
//! may not draw what they keep. The `expiring` phase adds holds that run out half a second
//! before its grants expire, at the `expire` barrier.
//!
//! # Why the expectation stays exact
//! A command is applied by drawdown at its record timestamp, so each reservation command
//! takes its timestamp first ([`Sender::stamp`]) and the model applies it at that time: a
//! hold's expiry (`time + ttl`) is the same instant in both. A customer's record on one topic
//! is only sent once its records on the other topic are on the broker ([`crate::sender`]): the
//! merge orders the topics by record timestamp, but only among records the broker already
//! holds. Without that, a settle overtook its reservation about once in 100k at 8,000
//! records/s, and a reserve the plain usage sent just before it (both found by the soak).

use anyhow::bail;
use drawdown_model::{Applied, Input, Meter, Reserve};
use rand::Rng;
use rust_decimal::Decimal;

use super::Run;
use crate::gen::{sum_property, InputTopic, ReservationCmd};

/// The ttl of the `reservations` phase's holds: longer than any run.
const HOLD_TTL_MS: i64 = 3_600_000;

/// A reservation of this phase that was not ended yet.
struct Open {
    /// The customer's index.
    index: usize,
    /// The meter's index.
    meter: usize,
    /// The command as first sent.
    reserve: Reserve,
}

impl Run<'_> {
    /// Sends a reservation command of `customer`, applied to the model at its record
    /// timestamp. With `ends_at`, a reserve's ttl is set so that the hold ends then.
    fn send_reservation(
        &mut self,
        customer: &str,
        mut cmd: ReservationCmd,
        ends_at: Option<i64>,
    ) -> anyhow::Result<()> {
        let at = self.sender.stamp(InputTopic::Grants, customer);
        if let (ReservationCmd::Reserve(r), Some(end)) = (&mut cmd, ends_at) {
            r.ttl = end - at;
            if r.ttl <= 0 {
                bail!("a hold to end at {end} sent at {at}: give --expire-in more time");
            }
        }
        let input = match &cmd {
            ReservationCmd::Reserve(r) => Input::Reserve(r.clone()),
            ReservationCmd::Release(id) => Input::Release(id.clone()),
        };
        let applied = self.expect.apply(&self.gen.rules, customer, &input, at);
        let what = match (&cmd, applied) {
            (ReservationCmd::Reserve(r), Ok(Applied::Applied)) => {
                let held = self.expect.customers[customer].book.reservations[&r.id].held;
                if !held {
                    "refused"
                } else if let Some(end) = ends_at {
                    self.expect.due_at(end);
                    "expiring_holds"
                } else {
                    "reserved"
                }
            }
            (ReservationCmd::Release(_), Ok(Applied::Applied)) => "released",
            (_, Ok(Applied::Duplicate)) => "reservation_repeats",
            (_, Err(rejected)) => {
                self.expect.count_dlq(rejected.reason(), 1);
                rejected.reason()
            }
            (_, Ok(other)) => bail!("the model took a reservation command as {other:?}"),
        };
        let rec = self.gen.encode_reservation(customer, &cmd);
        self.sender.send_at(&rec, at, what)
    }

    /// Units to hold on `m`: around one event's quantity, a tenth of them far more.
    fn hold_units(&mut self, m: &Meter) -> Decimal {
        let rng = &mut self.gen.rng;
        let base = if sum_property(m).is_some() {
            Decimal::from(rng.random_range(50..=600u32))
        } else {
            Decimal::from(rng.random_range(1..=3u32))
        };
        if rng.random_bool(0.1) {
            base * Decimal::from(rng.random_range(20..=200u32))
        } else {
            base
        }
    }

    /// A new reservation on meter `k`, held for [`HOLD_TTL_MS`].
    fn new_reserve(&mut self, k: usize) -> Reserve {
        let m = self.gen.meters()[k].clone();
        Reserve {
            id: self.gen.next_id("r"),
            meter: m.name.clone(),
            units: self.hold_units(&m),
            ttl: HOLD_TTL_MS,
        }
    }

    /// `expiring`: a hold on `m` for `customer` that ends at `ends_at` (at the barrier).
    pub(super) fn reserve_until(
        &mut self,
        customer: &str,
        m: &Meter,
        ends_at: i64,
    ) -> anyhow::Result<()> {
        let r = Reserve {
            id: self.gen.next_id("r"),
            meter: m.name.clone(),
            units: self.hold_units(m),
            ttl: 1,
        };
        self.send_reservation(customer, ReservationCmd::Reserve(r), Some(ends_at))
    }

    /// Settles `o` with a usage event naming it: 0.5x-1.5x the held units.
    fn settle(&mut self, o: &Open) -> anyhow::Result<()> {
        let (customer, mut e) = self.gen.usage_event_of(o.index, o.meter);
        e.reservation = Some(o.reserve.id.clone());
        let m = &self.gen.meters()[o.meter];
        if let Some(p) = sum_property(m).map(String::from) {
            let pct = Decimal::from(self.gen.rng.random_range(50..=150u32));
            let q = (o.reserve.units * pct / Decimal::from(100))
                .round_dp(1)
                .normalize();
            e.properties.insert(p, q.to_string());
        }
        self.send_event(&customer, e)
    }

    /// The `reservations` phase (see the module docs).
    pub(super) fn phase_reservations(&mut self) -> anyhow::Result<()> {
        let steps = self.gen.events;
        let mut open: Vec<Open> = Vec::new();
        // (customer, reservation id) of those ended.
        let mut ended: Vec<(String, String)> = Vec::new();
        for step in 0..steps {
            if open.is_empty() || self.gen.rng.random_bool(0.5) {
                let index = self.gen.pick_index();
                let k = self.gen.rng.random_range(0..self.gen.meters().len());
                let reserve = self.new_reserve(k);
                let customer = self.gen.customer(index);
                self.send_reservation(&customer, ReservationCmd::Reserve(reserve.clone()), None)?;
                open.push(Open {
                    index,
                    meter: k,
                    reserve,
                });
            } else {
                let o = open.swap_remove(self.gen.rng.random_range(0..open.len()));
                let customer = self.gen.customer(o.index);
                match self.gen.rng.random_range(0..10) {
                    0..=5 => self.settle(&o)?,
                    6..=8 => {
                        let release = ReservationCmd::Release(o.reserve.id.clone());
                        self.send_reservation(&customer, release, None)?;
                    }
                    _ => {
                        let mut again = o.reserve.clone();
                        again.units += Decimal::ONE;
                        self.send_reservation(&customer, ReservationCmd::Reserve(again), None)?;
                        open.push(o);
                        continue;
                    }
                }
                ended.push((customer, o.reserve.id));
            }
            if !ended.is_empty() && self.gen.rng.random_bool(0.03) {
                let (c, id) = ended[self.gen.rng.random_range(0..ended.len())].clone();
                self.send_reservation(&c, ReservationCmd::Release(id), None)?;
            }
            if self.gen.rng.random_bool(0.01) {
                let i = self.gen.pick_index();
                let c = self.gen.customer(i);
                let unknown = self.gen.next_id("unknown");
                self.send_reservation(&c, ReservationCmd::Release(unknown), None)?;
            }
            self.maybe_bad(step, steps)?;
        }
        Ok(())
    }
}
