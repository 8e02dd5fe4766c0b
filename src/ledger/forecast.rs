//! Burn rate and forecast: how fast a meter is being used, and when it will run out.
//!
//! # Burn rate
//! Each meter keeps `burn`: the usage units it has seen, each weighted by `e^(-age/τ)`, where τ
//! is the meter's `burn_window` (default 1 h), as of `burn_at`, the time of its last usage. The
//! times are the ledger's (event time, see "Time" in the module docs), never the wall clock, so a
//! replay gives the same figures. A usage of `q` units at `t`:
//!
//! `burn = burn · e^(-(t - burn_at)/τ) + q`, `burn_at = t`
//!
//! and the rate at `t` is `burn · e^(-(t - burn_at)/τ) / τ`, given in units per hour: usage at a
//! steady `r` units/hour converges to `r` (an exponentially weighted moving rate, as the Unix load
//! averages), and an idle meter's rate decays by `e` every τ. A usage counts its whole quantity,
//! also what overage or block took (the demand, not what the grants paid); a void does not take
//! it back. Every step is rounded to [`BURN_SCALE`] decimal places (exact decimals, no floats).
//!
//! # Forecast
//! `runs_out_at` is when the balance would reach 0 if usage goes on at the current rate, with
//! what the meter already knows about its future: a grant's expiry forfeits what is left of it
//! then (usage drains the grants in draw-down order, so a grant drawn first is used before it
//! expires), and a pending grant adds its amount when it becomes active (paying the debt first).
//! A pending cycle grant's end of the previous cycle is not anticipated. It is `None` when the
//! rate is 0, when the balance is already <= 0 (the status says `exhausted`), or when it is later
//! than the meter's `forecast_horizon` (default 30 days) from now.
//!
//! # The `forecast` transition
//! With `forecast_alert` set on a meter, every change of it compares `runs_out_at` with the time
//! of the change: at most `forecast_alert` ahead fires one `forecast` transition (on
//! `balance-exhausted`, carrying `runs_out_at`) and disarms it; it is re-armed once `runs_out_at`
//! is further than that again, or `None` (for instance when the meter is exhausted, or topped up
//! past the horizon). So it fires once per approach, as `low` does once per crossing.

use rust_decimal::prelude::ToPrimitive;
use rust_decimal::{Decimal, MathematicalOps};

use super::{GrantSlot, MeterDef, MeterState};

/// The decimal places `burn` is kept to.
pub const BURN_SCALE: u32 = 12;

/// Above this many time constants the old burn counts for nothing (`e^-50` < 2e-22).
const FORGOTTEN: i64 = 50;

/// Milliseconds in an hour.
const HOUR_MS: i64 = 3_600_000;

/// The burn window of `def` in ms (at least 1).
fn tau_ms(def: &MeterDef) -> i64 {
    i64::try_from(def.burn_window.as_millis())
        .unwrap_or(i64::MAX)
        .max(1)
}

/// `e^(-dt/τ)` for `dt >= 0`, exact to well below [`BURN_SCALE`]: the series to the fourth
/// power for small steps (the usual case: events come much closer together than τ), the full
/// exponential otherwise.
fn decay(dt: i64, tau: i64) -> Decimal {
    if dt <= 0 {
        return Decimal::ONE;
    }
    if dt / tau >= FORGOTTEN {
        return Decimal::ZERO;
    }
    // The usual case, x = dt/τ < 1e-3, in integers scaled by 1e19 (the hot path: one usage
    // event each; Decimal's divisions cost several times more). Every product stays below 1e32.
    if (dt as i128) * 1_000 < tau as i128 {
        const S: i128 = 10_000_000_000_000_000_000; // 1e19
        let x = (dt as i128) * S / (tau as i128);
        let x2 = x * x / S;
        let x3 = x2 * x / S;
        let x4 = x2 * x2 / S;
        // 1 - x + x²/2 - x³/6 + x⁴/24; the next term is below 1e-17.
        return Decimal::from_i128_with_scale(S - x + x2 / 2 - x3 / 6 + x4 / 24, 19);
    }
    let x = Decimal::from(dt) / Decimal::from(tau);
    match x.checked_exp() {
        Some(e) if !e.is_zero() => Decimal::ONE / e,
        _ => Decimal::ZERO,
    }
}

/// The burn of `state` carried forward to `at`.
fn burn_at(state: &MeterState, def: &MeterDef, at: i64) -> Decimal {
    if state.burn.is_zero() {
        return Decimal::ZERO;
    }
    if at <= state.burn_at {
        // Nothing decayed (several usages at one time, or out of order): no arithmetic.
        return state.burn.round_dp(BURN_SCALE);
    }
    (state.burn * decay(at - state.burn_at, tau_ms(def))).round_dp(BURN_SCALE)
}

/// Adds a usage of `units` at `at` to the meter's burn.
pub(super) fn record_usage(state: &mut MeterState, def: &MeterDef, units: Decimal, at: i64) {
    let at = at.max(state.burn_at);
    let carried = burn_at(state, def, at);
    state.burn = carried
        .checked_add(units)
        .unwrap_or(carried)
        .round_dp(BURN_SCALE);
    state.burn_at = at;
}

/// The usage rate at `at`, in units per hour (rounded to 6 places; 0 for a meter never used).
pub fn burn_rate(state: &MeterState, def: &MeterDef, at: i64) -> Decimal {
    let b = burn_at(state, def, at);
    if b.is_zero() {
        return Decimal::ZERO;
    }
    (b * Decimal::from(HOUR_MS) / Decimal::from(tau_ms(def))).round_dp(6)
}

/// A grant as the forecast sees it: its draw-down order key and what is left of it.
struct Slot<'a> {
    key: (u8, i64, i64, &'a str),
    remaining: Decimal,
    expires_at: Option<i64>,
}

impl<'a> Slot<'a> {
    fn of(g: &'a GrantSlot) -> Self {
        Self {
            key: g.order_key(),
            remaining: g.remaining,
            expires_at: g.expires_at,
        }
    }
}

/// When the balance reaches 0 at the current rate (see the module docs), or `None`.
pub fn runs_out_at(state: &MeterState, def: &MeterDef, now: i64) -> Option<i64> {
    let burn = burn_at(state, def, now);
    if burn <= Decimal::ZERO {
        return None;
    }
    // Units per ms.
    let rate = burn / Decimal::from(tau_ms(def));
    let horizon = i64::try_from(def.forecast_horizon.as_millis()).unwrap_or(i64::MAX);
    let end = now.saturating_add(horizon);
    let balance = state.balance();
    if balance <= Decimal::ZERO {
        return None;
    }
    // The usual case, without allocating: nothing expires or activates before the balance is
    // used up at this rate.
    // (A tiny rate on a large balance can exceed what a Decimal holds: no date then, as for any
    // date past the horizon.)
    let naive = now.checked_add(balance.checked_div(rate)?.ceil().to_i64()?.max(1))?;
    let first_event = state
        .grants
        .iter()
        .filter_map(|g| {
            if g.active {
                g.expires_at
            } else {
                Some(g.effective_at)
            }
        })
        .filter(|&x| x > now)
        .min();
    if first_event.is_none_or(|e| e >= naive) {
        return (naive <= end).then_some(naive);
    }
    // The meter keeps its active grants in draw-down order already.
    let mut active: Vec<Slot> = state
        .grants
        .iter()
        .filter(|g| g.active)
        .map(Slot::of)
        .collect();
    let mut pending: Vec<&GrantSlot> = state.grants.iter().filter(|g| !g.active).collect();
    pending.sort_by_key(|g| g.effective_at);
    let mut pending = pending.into_iter().peekable();
    let mut debt = state.debt;
    let mut t = now;
    loop {
        let balance = active.iter().map(|s| s.remaining).sum::<Decimal>() - debt;
        if balance <= Decimal::ZERO {
            return (t > now).then_some(t);
        }
        let next = active
            .iter()
            .filter_map(|s| s.expires_at)
            .chain(pending.peek().map(|g| g.effective_at))
            .filter(|&x| x > t)
            .min();
        let until = next.unwrap_or(end).min(end);
        let used = rate * Decimal::from(until - t);
        if used >= balance {
            let ms = (balance / rate).ceil().to_i64()?;
            let out = t.checked_add(ms.max(1))?;
            return (out <= end).then_some(out);
        }
        if next.is_none_or(|n| n > end) {
            return None;
        }
        // Usage until then drains the grants in draw-down order.
        let mut left = used;
        for s in active.iter_mut() {
            let take = left.min(s.remaining);
            s.remaining -= take;
            left -= take;
            if left.is_zero() {
                break;
            }
        }
        t = until;
        active.retain(|s| s.expires_at.is_none_or(|x| x > t));
        while let Some(g) = pending.next_if(|g| g.effective_at <= t) {
            let pay = debt.min(g.amount);
            debt -= pay;
            let mut s = Slot::of(g);
            s.remaining = g.amount - pay;
            if s.expires_at.is_none_or(|x| x > t) {
                let at = active.partition_point(|a| a.key < s.key);
                active.insert(at, s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::super::*;
    use super::*;

    const H: i64 = HOUR_MS;
    const T0: i64 = 1_767_225_600_000;

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    fn def(alert: Option<Duration>) -> MeterDef {
        MeterDef {
            name: MeterName::parse("tokens").unwrap(),
            event: "call".into(),
            filter: BTreeMap::new(),
            aggregation: Aggregation::Sum {
                property: "tokens".into(),
            },
            on_exhausted: OnExhausted::Block,
            low_balance: vec![],
            top_up_packs: vec![],
            auto_top_up: None,
            burn_window: default_burn_window(),
            forecast_horizon: default_forecast_horizon(),
            forecast_alert: alert,
        }
    }

    fn slot(id: &str, remaining: &str, expires_at: Option<i64>, active: bool) -> GrantSlot {
        GrantSlot {
            id: GrantId::parse(id).unwrap(),
            kind: GrantKind::TopUp,
            priority: 0,
            effective_at: if active { T0 - H } else { T0 + 2 * H },
            expires_at,
            subscription_id: None,
            rollover: Decimal::ZERO,
            amount: d(remaining),
            remaining: d(remaining),
            active,
            cycle_ended: false,
        }
    }

    /// A meter burning `per_hour` units/hour at T0 (its burn as of T0).
    fn burning(per_hour: &str, grants: Vec<GrantSlot>) -> MeterState {
        MeterState {
            burn: d(per_hour),
            burn_at: T0,
            grants,
            ..MeterState::default()
        }
    }

    struct Run {
        ledger: Ledger,
        book: Book,
        out: Vec<Output>,
        n: u32,
    }

    impl Run {
        fn new(alert: Option<Duration>) -> Self {
            let customer = CustomerId::parse("cus_1").unwrap();
            Self {
                ledger: Ledger::new(Meters::new(vec![def(alert)]).unwrap()),
                book: Book::new(customer),
                out: Vec::new(),
                n: 0,
            }
        }

        fn grant(&mut self, amount: &str, at: i64) {
            self.n += 1;
            let id = GrantId::parse(format!("g{}", self.n)).unwrap();
            self.book.grants.insert(id.clone(), None);
            let g = Grant::top_up(
                id,
                self.book.customer.clone(),
                MeterName::parse("tokens").unwrap(),
                d(amount),
            );
            self.ledger
                .apply(&mut self.book, &Input::Grant(g), at, &mut self.out)
                .unwrap();
        }

        fn use_(&mut self, tokens: u32, at: i64) {
            self.n += 1;
            let id = EventId::parse(format!("e{}", self.n)).unwrap();
            self.book.events.insert(id.clone(), None);
            let u = Usage {
                id,
                customer: self.book.customer.clone(),
                name: "call".into(),
                timestamp_ms: at,
                properties: [("tokens".to_string(), tokens.to_string())].into(),
                reservation_id: None,
            };
            self.ledger
                .apply(&mut self.book, &Input::Usage(u), at, &mut self.out)
                .unwrap();
        }

        fn state(&self) -> &MeterState {
            &self.book.meters[&MeterName::parse("tokens").unwrap()]
        }

        fn forecasts(&self) -> Vec<&Transition> {
            self.out
                .iter()
                .filter_map(|o| match o {
                    Output::Transition(t) if t.kind == TransitionKind::Forecast => Some(t),
                    _ => None,
                })
                .collect()
        }
    }

    #[test]
    fn a_steady_rate_reads_as_itself_and_an_idle_one_decays_by_e_per_window() {
        let mut r = Run::new(None);
        r.grant("1000000", T0);
        // 10 units every 6 minutes: 100 units/hour, for 10 hours.
        for i in 1..=100 {
            r.use_(10, T0 + i * H / 10);
        }
        let at = T0 + 10 * H;
        let rate = burn_rate(r.state(), &def(None), at);
        // Right after an event the weighted rate is above the mean by about half an event.
        assert!(rate > d("99") && rate < d("106"), "{rate}");
        let later = burn_rate(r.state(), &def(None), at + H);
        let ratio = later / rate;
        assert!((ratio - d("0.367879")).abs() < d("0.000001"), "{ratio}");
        assert_eq!(burn_rate(r.state(), &def(None), at + 60 * H), Decimal::ZERO);
        // The same inputs give the same figures to the last place (replays).
        let mut again = Run::new(None);
        again.grant("1000000", T0);
        for i in 1..=100 {
            again.use_(10, T0 + i * H / 10);
        }
        assert_eq!(again.state(), r.state());
    }

    #[test]
    fn runs_out_at_follows_the_rate_the_draw_down_order_and_known_expiries() {
        let def = def(None);
        let minutes = |m: i64| T0 + m * 60_000;
        // 60 units/hour on 100 + 100 units, nothing expiring: 200 minutes.
        let s = burning(
            "60",
            vec![slot("a", "100", None, true), slot("b", "100", None, true)],
        );
        assert_eq!(runs_out_at(&s, &def, T0), Some(minutes(200)));
        // `a` expires after 30 minutes (and is drawn first, expiring soonest): 30 of it used,
        // 70 forfeited, then `b` lasts 100 minutes.
        let s = burning(
            "60",
            vec![
                slot("a", "100", Some(minutes(30)), true),
                slot("b", "100", None, true),
            ],
        );
        assert_eq!(runs_out_at(&s, &def, T0), Some(minutes(130)));
        // The only grant expires before it is used up: it runs out at the expiry.
        let s = burning("60", vec![slot("a", "100", Some(minutes(30)), true)]);
        assert_eq!(runs_out_at(&s, &def, T0), Some(minutes(30)));
        // A pending grant (active from 120 minutes on) adds its units then: 30 of `a` are left
        // at 120, plus 60.
        let s = burning(
            "60",
            vec![slot("a", "150", None, true), slot("p", "60", None, false)],
        );
        assert_eq!(runs_out_at(&s, &def, T0), Some(minutes(210)));
        // ... but only if the balance lasts until then.
        let s = burning(
            "60",
            vec![slot("a", "100", None, true), slot("p", "60", None, false)],
        );
        assert_eq!(runs_out_at(&s, &def, T0), Some(minutes(100)));
        // No usage, no forecast; none beyond the horizon; none when already out.
        assert_eq!(
            runs_out_at(&burning("0", vec![slot("a", "1", None, true)]), &def, T0),
            None
        );
        let s = burning("0.001", vec![slot("a", "100", None, true)]);
        assert_eq!(runs_out_at(&s, &def, T0), None);
        let s = MeterState {
            debt: d("5"),
            ..burning("60", vec![])
        };
        assert_eq!(runs_out_at(&s, &def, T0), None);
    }

    #[test]
    fn a_nearly_idle_meter_with_a_large_balance_has_no_date_and_does_not_panic() {
        // Found by the `ledger` fuzz target: the burn decays to a few 1e-12 a day after the
        // last usage, and 1e15 units at that rate are more ms than a Decimal holds (the
        // division overflowed and panicked, in the pipeline on a meter with `forecast_alert`).
        let s = burning(
            "0.000000000001",
            vec![slot("a", "1000000000000000", None, true)],
        );
        assert_eq!(runs_out_at(&s, &def(None), T0), None);
        let mut r = Run::new(Some(Duration::from_secs(3600)));
        r.grant("1000000000000000", T0);
        r.use_(1, T0);
        r.grant("1", T0 + 27 * H);
        assert!(r.state().burn > Decimal::ZERO && r.forecasts().is_empty());
    }

    #[test]
    fn the_forecast_fires_once_per_approach_and_rearms_when_the_date_moves_away() {
        let mut r = Run::new(Some(Duration::from_secs(24 * 3600)));
        r.grant("10000", T0);
        // 100 tokens every 6 minutes: 1,000/hour; 10,000 tokens last about 10 hours.
        for i in 1..=20 {
            r.use_(100, T0 + i * H / 10);
        }
        let fired = r.forecasts();
        assert_eq!(fired.len(), 1, "{fired:?}");
        let f = fired[0].clone();
        // The fifth usage: 9,500 left at about 413/hour is within a day.
        assert_eq!(f.version, 6);
        let out_at = f.runs_out_at.unwrap();
        assert!(out_at > f.at && out_at - f.at <= 24 * H);
        assert!(r.state().forecast_fired);
        // A top-up that lasts for months at this rate re-arms it, silently.
        r.grant("100000000", T0 + 2 * H + 1);
        assert!(!r.state().forecast_fired);
        assert_eq!(r.forecasts().len(), 1);
        // Heavy usage brings the date back within a day: it fires again, once.
        for i in 1..=10 {
            r.use_(4_000_000, T0 + 3 * H + i * H / 10);
        }
        assert_eq!(r.forecasts().len(), 2);
        let json = serde_json::to_value(r.forecasts()[1]).unwrap();
        assert_eq!(json["kind"], "forecast");
        assert!(json["runs_out_at"].is_i64());
    }

    #[test]
    fn a_meter_without_forecast_alert_never_fires_one() {
        let mut r = Run::new(None);
        r.grant("100", T0);
        for i in 1..=10 {
            r.use_(10, T0 + i * 1000);
        }
        assert!(r.forecasts().is_empty());
        assert!(burn_rate(r.state(), &def(None), T0 + 10_000) > Decimal::ZERO);
    }

    #[test]
    fn the_small_step_series_agrees_with_the_exponential() {
        let tau = 3_600_000;
        for dt in [1, 10, 100, 1_000, 3_599] {
            let series = decay(dt, tau);
            let x = Decimal::from(dt) / Decimal::from(tau);
            let exact = Decimal::ONE / x.exp();
            assert!(
                (series - exact).abs() < Decimal::new(1, 15),
                "dt={dt}: {series} vs {exact}"
            );
        }
        // The integer series against the same series in decimals.
        for (dt, tau) in [
            (1, 3_600_000),
            (3_599, 3_600_000),
            (7, 60_000),
            (1, i64::MAX),
        ] {
            let x = Decimal::from(dt) / Decimal::from(tau);
            let x2 = x * x;
            let series = Decimal::ONE - x + x2 / Decimal::TWO - x2 * x / Decimal::from(6)
                + x2 * x2 / Decimal::from(24);
            assert!(
                (decay(dt, tau) - series).abs() < Decimal::new(1, 18),
                "dt={dt} tau={tau}"
            );
        }
        assert_eq!(decay(0, tau), Decimal::ONE);
        assert_eq!(decay(-5, tau), Decimal::ONE);
        assert_eq!(decay(tau * FORGOTTEN, tau), Decimal::ZERO);
        let one_tau = decay(tau, tau);
        assert!((one_tau - Decimal::new(367_879_441, 9)).abs() < Decimal::new(1, 9));
    }
}
