//! `verify`: drawdown's API and output topics against the expectation.
//!
//! It compares, for every (customer, meter) of the expectation:
//! - (a) the HTTP API: totals, `expired`, `voided`, `reserved`, version, and each grant's remainder in the
//!   order listed (retrying mismatches until `--settle` has passed);
//! - (b) every `balance-changed` record of the expectation's customers: exactly one per version,
//!   no gaps, the reason of each version, the last balance;
//! - (c) the transitions on `balance-exhausted`, one for one;
//! - (d) the automatic top-up requests on `top-up-requests`, one for one (request id, pack);
//! - (e) the DLQ records of the run's customers (`void_duplicate`, `void_unknown`,
//!   `reservation_unknown`, the total).
//!
//! Exits non-zero on any mismatch.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use drawdown::codec;
use drawdown::config::Config;
use drawdown::ledger::TransitionKind;
use drawdown_model::{MeterBook, Reason};
use rust_decimal::Decimal;
use serde_json::Value;

use crate::args::VerifyArgs;
use crate::expect::{CustomerExpect, Expectation, ExpectedTransition, MeterLog};
use crate::topics::read_topic;

/// What the API shows of one (customer, meter), compared as a whole.
#[derive(Clone, Debug, PartialEq)]
struct Totals {
    balance: Decimal,
    credited: Decimal,
    consumed: Decimal,
    overage: Decimal,
    blocked: Decimal,
    expired: Decimal,
    voided: Decimal,
    /// Units held by reservations.
    reserved: Decimal,
    version: u64,
    /// (grant id, remainder, active), in the listed order (active in draw-down order).
    grants: Vec<(String, Decimal, bool)>,
}

impl From<&MeterBook> for Totals {
    fn from(b: &MeterBook) -> Self {
        Self {
            balance: b.balance(),
            credited: b.credited,
            consumed: b.consumed,
            overage: b.overage,
            blocked: b.blocked,
            expired: b.expired,
            voided: b.voided,
            reserved: b.reserved(),
            version: b.version,
            grants: b
                .listed()
                .into_iter()
                .map(|s| (s.grant.id.clone(), s.remaining, s.active))
                .collect(),
        }
    }
}

impl Totals {
    /// The fields that differ, for the report.
    fn diff(&self, want: &Totals) -> String {
        let mut out = Vec::new();
        let decimals = [
            ("balance", self.balance, want.balance),
            ("credited", self.credited, want.credited),
            ("consumed", self.consumed, want.consumed),
            ("overage", self.overage, want.overage),
            ("blocked", self.blocked, want.blocked),
            ("expired", self.expired, want.expired),
            ("voided", self.voided, want.voided),
            ("reserved", self.reserved, want.reserved),
        ];
        for (name, got, exp) in decimals {
            if got != exp {
                out.push(format!("{name} {got} != {exp}"));
            }
        }
        if self.version != want.version {
            out.push(format!("version {} != {}", self.version, want.version));
        }
        if self.grants != want.grants {
            out.push(format!("grants {:?} != {:?}", self.grants, want.grants));
        }
        out.join(", ")
    }

    /// The totals in an API response (`GET /v1/customers/{c}/meters/{m}`).
    fn of_json(v: &Value) -> Option<Totals> {
        let dec = |v: Option<&Value>| match v? {
            Value::String(s) => Decimal::from_str(s).ok(),
            Value::Number(n) => Decimal::from_str(&n.to_string()).ok(),
            _ => None,
        };
        let grants = v
            .get("grants")?
            .as_array()?
            .iter()
            .map(|g| {
                Some((
                    g.get("id")?.as_str()?.to_string(),
                    dec(g.get("remaining"))?,
                    g.get("active")?.as_bool()?,
                ))
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Totals {
            balance: dec(v.get("balance"))?,
            credited: dec(v.get("credited"))?,
            consumed: dec(v.get("consumed"))?,
            overage: dec(v.get("overage"))?,
            blocked: dec(v.get("blocked"))?,
            expired: dec(v.get("expired"))?,
            voided: dec(v.get("voided"))?,
            reserved: dec(v.get("reserved"))?,
            version: v.get("version")?.as_u64()?,
            grants,
        })
    }
}

async fn fetch_totals(
    client: &reqwest::Client,
    base: &str,
    c: &str,
    m: &str,
) -> Result<Totals, String> {
    let url = format!("{base}/v1/customers/{c}/meters/{m}");
    let resp = client
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = resp.status();
    let body = resp.bytes().await.map_err(|e| format!("GET {url}: {e}"))?;
    if !status.is_success() {
        return Err(format!(
            "GET {url}: {status} {}",
            String::from_utf8_lossy(&body)
        ));
    }
    let v: Value = serde_json::from_slice(&body).map_err(|e| format!("GET {url}: {e}"))?;
    Totals::of_json(&v).ok_or_else(|| format!("GET {url}: unexpected body {v}"))
}

/// Checks every (customer, meter) against the API, retrying the mismatches until `settle` has
/// passed. Returns the mismatches.
async fn check_api(
    base: &str,
    wanted: Vec<(String, String, Totals)>,
    settle: Duration,
) -> anyhow::Result<Vec<String>> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let deadline = Instant::now() + settle;
    let mut pending = wanted;
    loop {
        let mut set = tokio::task::JoinSet::new();
        let mut next = pending.into_iter();
        let mut failed: Vec<((String, String, Totals), String)> = Vec::new();
        loop {
            while set.len() < 32 {
                let Some((c, m, want)) = next.next() else {
                    break;
                };
                let (client, base) = (client.clone(), base.to_string());
                set.spawn(async move {
                    let got = fetch_totals(&client, &base, &c, &m).await;
                    (c, m, want, got)
                });
            }
            let Some(joined) = set.join_next().await else {
                break;
            };
            let (c, m, want, got) = joined.context("API check task")?;
            match got {
                Ok(got) if got == want => {}
                Ok(got) => {
                    let why = format!("{c}/{m}: api != expected: {}", got.diff(&want));
                    failed.push(((c, m, want), why));
                }
                Err(e) => failed.push(((c, m, want), e)),
            }
        }
        if failed.is_empty() || Instant::now() > deadline {
            return Ok(failed.into_iter().map(|(_, why)| why).collect());
        }
        pending = failed.into_iter().map(|(w, _)| w).collect();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// One `balance-changed` version as seen: how many records, the last balance and reason.
struct VersionSeen {
    count: u32,
    balance: Decimal,
    reason: Option<Reason>,
}

type Pair = (String, String);

/// What the output topics showed for the expectation's customers.
#[derive(Default)]
struct Outputs {
    /// (customer, meter) -> version -> what was seen.
    changed: HashMap<Pair, BTreeMap<u64, VersionSeen>>,
    changed_records: u64,
    /// Of which applied late (`"late": true`).
    late: u64,
    undecodable: u64,
    transitions: HashMap<Pair, Vec<ExpectedTransition>>,
    /// `forecast` transitions: estimates of the burn rate, which the model does not predict.
    forecasts: u64,
    top_ups: HashMap<Pair, Vec<(String, String)>>,
    /// DLQ records of the run's customers by `error.reason`.
    dlq: BTreeMap<String, u64>,
}

/// The run's customer a DLQ key names (the `--bad` records include keys with `-other`).
fn dlq_customer<'a>(key: &'a [u8], customers: &HashSet<&str>) -> Option<&'a str> {
    let k = std::str::from_utf8(key).ok()?;
    let c = k.strip_suffix("-other").unwrap_or(k);
    customers.contains(c).then_some(k)
}

/// Reads the output topics (blocking).
fn read_outputs(cfg: &Config, exp: &Expectation) -> anyhow::Result<Outputs> {
    let mut o = Outputs::default();
    let customers: HashSet<&str> = exp.customers.keys().map(String::as_str).collect();
    let ours = |c: &str| customers.contains(c);
    let t = &cfg.topics;
    read_topic(cfg, &t.balance_changed, |r| {
        match codec::decode_changed(Some(r.payload), r.content_type()) {
            Ok(ch) if ours(ch.customer_id.as_str()) => {
                o.changed_records += 1;
                o.late += u64::from(ch.late);
                let seen = o
                    .changed
                    .entry((ch.customer_id.to_string(), ch.meter.to_string()))
                    .or_default()
                    .entry(ch.version)
                    .or_insert(VersionSeen {
                        count: 0,
                        balance: ch.balance,
                        reason: None,
                    });
                seen.count += 1;
                seen.balance = ch.balance;
                seen.reason = Reason::from_label(ch.reason.as_str());
            }
            Ok(_) => {}
            Err(_) => o.undecodable += 1,
        }
    })?;
    read_topic(
        cfg,
        &t.balance_exhausted,
        |r| match codec::decode_transition(Some(r.payload), r.content_type()) {
            Ok(tr) if tr.kind == TransitionKind::Forecast => {
                o.forecasts += u64::from(ours(tr.customer_id.as_str()));
            }
            Ok(tr) if ours(tr.customer_id.as_str()) => o
                .transitions
                .entry((tr.customer_id.to_string(), tr.meter.to_string()))
                .or_default()
                .push(ExpectedTransition {
                    kind: codec::transition_label(tr.kind).into(),
                    version: tr.version,
                    threshold: tr.threshold,
                }),
            Ok(_) => {}
            Err(_) => o.undecodable += 1,
        },
    )?;
    read_topic(cfg, &t.top_up_requests, |r| {
        match codec::decode_top_up(Some(r.payload), r.content_type()) {
            Ok(up) if ours(up.customer_id.as_str()) => o
                .top_ups
                .entry((up.customer_id.to_string(), up.meter.to_string()))
                .or_default()
                .push((up.request_id, up.pack)),
            Ok(_) => {}
            Err(_) => o.undecodable += 1,
        }
    })?;
    read_topic(cfg, &t.dlq, |r| {
        if dlq_customer(r.key, &customers).is_some() {
            let reason = r.header("error.reason").unwrap_or("?").to_string();
            *o.dlq.entry(reason).or_default() += 1;
        }
    })?;
    Ok(o)
}

/// The comparison of the output topics with the expectation, as it goes.
#[derive(Default)]
struct Report {
    failures: Vec<String>,
    dups: u64,
    gaps: u64,
    extra: u64,
    wrong_reason: u64,
    by_reason: BTreeMap<&'static str, u64>,
    /// (matched in order, expected), per kind of list.
    transitions: (usize, usize),
    top_ups: (usize, usize),
}

impl Report {
    /// (b): one `balance-changed` record per version, with its reason, and the last balance.
    fn changed(&mut self, key: &Pair, book: &MeterBook, log: &MeterLog, o: &Outputs) {
        let (c, m) = key;
        let versions = o.changed.get(key);
        let mut missing = 0;
        let mut first_wrong: Option<String> = None;
        let mut codes = log.reasons.chars();
        for v in 1..=book.version {
            let want = codes.next().and_then(Reason::from_letter);
            if let Some(w) = want {
                *self.by_reason.entry(w.label()).or_default() += 1;
            }
            match versions.and_then(|vs| vs.get(&v)) {
                None => missing += 1,
                Some(s) => {
                    self.dups += u64::from(s.count.saturating_sub(1));
                    if want.is_some_and(|w| s.reason != Some(w)) {
                        self.wrong_reason += 1;
                        first_wrong.get_or_insert_with(|| {
                            format!(
                                "v{v} is {:?}, expected {:?}",
                                s.reason.map(Reason::label),
                                want.map(Reason::label)
                            )
                        });
                    }
                }
            }
        }
        if log.reasons.chars().count() as u64 != book.version {
            self.failures.push(format!(
                "model: {c}/{m}: {} reasons for {} versions",
                log.reasons.chars().count(),
                book.version
            ));
        }
        if let Some(w) = first_wrong {
            self.failures
                .push(format!("changed: {c}/{m}: wrong reason: {w}"));
        }
        self.gaps += missing;
        let beyond = versions
            .map(|vs| vs.range(book.version + 1..).count() as u64)
            .unwrap_or(0);
        self.extra += beyond;
        if missing > 0 || beyond > 0 {
            self.failures.push(format!(
                "changed: {c}/{m}: {missing} versions missing of 1..={}, {beyond} beyond",
                book.version
            ));
        }
        let last = versions
            .and_then(|vs| vs.get(&book.version))
            .map(|s| s.balance);
        if book.version > 0 && last.is_some() && last != Some(book.balance()) {
            self.failures.push(format!(
                "changed: {c}/{m}: balance at v{} is {:?}, expected {}",
                book.version,
                last,
                book.balance()
            ));
        }
    }

    /// (c) and (d): a list on a topic against the expected one, one for one in order.
    fn one_for_one<T: PartialEq + std::fmt::Debug>(
        failures: &mut Vec<String>,
        counts: &mut (usize, usize),
        what: &str,
        key: &Pair,
        want: &[T],
        got: &[T],
    ) {
        let same = want.iter().zip(got).take_while(|(w, g)| w == g).count();
        *counts = (counts.0 + same, counts.1 + want.len());
        if got != want {
            failures.push(format!(
                "{what}: {}/{}: {} expected, {} on the topic; first difference at #{same}: expected {:?}, got {:?}",
                key.0,
                key.1,
                want.len(),
                got.len(),
                want.get(same),
                got.get(same)
            ));
        }
    }

    fn customer(&mut self, c: &str, cm: &CustomerExpect, o: &Outputs, seen: &mut HashSet<Pair>) {
        let empty = MeterLog::default();
        for (m, book) in &cm.book.meters {
            let key = (c.to_string(), m.clone());
            seen.insert(key.clone());
            let log = cm.logs.get(m).unwrap_or(&empty);
            self.changed(&key, book, log, o);
            let got = o
                .transitions
                .get(&key)
                .map(Vec::as_slice)
                .unwrap_or_default();
            Self::one_for_one(
                &mut self.failures,
                &mut self.transitions,
                "transitions",
                &key,
                &log.transitions,
                got,
            );
            let got = o.top_ups.get(&key).map(Vec::as_slice).unwrap_or_default();
            Self::one_for_one(
                &mut self.failures,
                &mut self.top_ups,
                "top-ups",
                &key,
                &log.top_ups,
                got,
            );
        }
    }

    /// (e): the voids the rules must refuse, by reason, and nothing else beyond the malformed
    /// records.
    fn dlq(&mut self, exp: &Expectation, o: &Outputs) {
        for reason in ["void_duplicate", "void_unknown", "reservation_unknown"] {
            let (got, want) = (
                o.dlq.get(reason).copied().unwrap_or(0),
                exp.dlq.get(reason).copied().unwrap_or(0),
            );
            if got != want {
                self.failures
                    .push(format!("dlq: {got} records {reason}, expected {want}"));
            }
        }
        let (got, want): (u64, u64) = (o.dlq.values().sum(), exp.dlq.values().sum());
        if got != want {
            self.failures.push(format!(
                "dlq: {got} records {:?}, expected {want} {:?}",
                o.dlq, exp.dlq
            ));
        }
    }
}

/// `verify` (see the module docs).
pub async fn verify(cfg: &Config, args: VerifyArgs) -> anyhow::Result<()> {
    let exp = Expectation::load(&args.expect)?
        .with_context(|| format!("no expectation at {}", args.expect.display()))?;
    if let Some((first, _)) = exp.due {
        bail!(
            "the expectation has pending activations/expiries (from {first}); run the expire \
             phase first"
        );
    }
    let base = args
        .api
        .clone()
        .unwrap_or_else(|| format!("http://{}", cfg.api.listen));
    let base = base.trim_end_matches('/').to_string();
    let mut wanted = Vec::new();
    let mut meter_names = BTreeSet::new();
    let mut pruned = 0;
    for (c, cm) in &exp.customers {
        for (m, book) in &cm.book.meters {
            meter_names.insert(m.clone());
            wanted.push((c.clone(), m.clone(), Totals::from(book)));
            pruned += book.pruned;
        }
    }
    let n_balances = wanted.len();
    let started = Instant::now();
    // (a) the API.
    let api_failures = check_api(&base, wanted, args.settle).await?;

    // (b) to (e): the output topics.
    let exp = Arc::new(exp);
    let (exp2, cfg2) = (exp.clone(), cfg.clone());
    let outputs = tokio::task::spawn_blocking(move || read_outputs(&cfg2, &exp2))
        .await
        .context("topic check task")??;

    let mut report = Report {
        failures: api_failures.iter().map(|f| format!("api: {f}")).collect(),
        ..Report::default()
    };
    let mut seen = HashSet::new();
    for (c, cm) in &exp.customers {
        report.customer(c, cm, &outputs, &mut seen);
    }
    let keys = outputs.changed.keys();
    for key in keys
        .chain(outputs.transitions.keys())
        .chain(outputs.top_ups.keys())
    {
        if seen.insert(key.clone()) {
            report.failures.push(format!(
                "topics: records for {}/{} which the expectation does not have",
                key.0, key.1
            ));
        }
    }
    if report.dups > 0 {
        let dups = report.dups;
        report
            .failures
            .push(format!("changed: {dups} duplicate versions"));
    }
    if outputs.undecodable > 0 {
        report.failures.push(format!(
            "topics: {} undecodable records",
            outputs.undecodable
        ));
    }
    report.dlq(&exp, &outputs);
    let dlq_count = |r: &str| outputs.dlq.get(r).copied().unwrap_or(0);
    let reasons: Vec<String> = report
        .by_reason
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let r = &report;
    let summary = format!(
        "customers={} meters={} balances={}/{n_balances} changed={} (dups={} gaps={} extra={} wrong_reason={} late={}) transitions={}/{} forecasts={} top_ups={}/{} dlq={} (void_duplicate={} void_unknown={} reservation_unknown={}) elapsed={:.1}s\nverify: versions by reason: {}{}",
        exp.customers.len(),
        meter_names.len(),
        n_balances - api_failures.len(),
        outputs.changed_records,
        r.dups,
        r.gaps,
        r.extra,
        r.wrong_reason,
        outputs.late,
        r.transitions.0,
        r.transitions.1,
        outputs.forecasts,
        r.top_ups.0,
        r.top_ups.1,
        outputs.dlq.values().sum::<u64>(),
        dlq_count("void_duplicate"),
        dlq_count("void_unknown"),
        dlq_count("reservation_unknown"),
        started.elapsed().as_secs_f64(),
        reasons.join(" "),
        if pruned > 0 {
            format!(" (model pruned {pruned} drained grants)")
        } else {
            String::new()
        }
    );
    if r.failures.is_empty() {
        println!("verify: OK {summary}");
        return Ok(());
    }
    println!("verify: FAILED {summary}");
    for f in r.failures.iter().take(20) {
        println!("  {f}");
    }
    if r.failures.len() > 20 {
        println!("  ... and {} more", r.failures.len() - 20);
    }
    bail!("verification failed: {} mismatches", r.failures.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_body_is_read_as_exact_totals() {
        let v: Value = serde_json::from_str(
            r#"{"balance":"-0.5","credited":"10","consumed":"10.5","overage":"0.5","blocked":"0",
                "expired":"0","voided":"0","reserved":"0","version":3,
                "grants":[{"id":"g1","remaining":"0","active":true}]}"#,
        )
        .unwrap();
        let t = Totals::of_json(&v).unwrap();
        assert_eq!(t.balance, Decimal::new(-5, 1));
        assert_eq!(t.grants, vec![("g1".to_string(), Decimal::ZERO, true)]);
        let mut other = t.clone();
        other.version = 4;
        other.consumed = Decimal::new(11, 0);
        assert_eq!(other.diff(&t), "consumed 11 != 10.5, version 4 != 3");
    }

    #[test]
    fn lists_are_compared_one_for_one_in_order() {
        let key = ("c".to_string(), "m".to_string());
        let (mut failures, mut counts) = (Vec::new(), (0, 0));
        Report::one_for_one(
            &mut failures,
            &mut counts,
            "x",
            &key,
            &[1, 2, 3],
            &[1, 2, 3],
        );
        assert!(failures.is_empty());
        Report::one_for_one(&mut failures, &mut counts, "x", &key, &[1, 2], &[1, 3, 2]);
        assert_eq!(counts, (4, 5));
        assert_eq!(failures.len(), 1);
        assert!(
            failures[0].contains("first difference at #1"),
            "{failures:?}"
        );
    }

    #[test]
    fn dlq_keys_of_misrouted_records_count_for_their_customer() {
        let customers: HashSet<&str> = ["cus-1"].into();
        assert_eq!(
            dlq_customer(b"cus-1-other", &customers),
            Some("cus-1-other")
        );
        assert_eq!(dlq_customer(b"cus-1", &customers), Some("cus-1"));
        assert_eq!(dlq_customer(b"cus-2", &customers), None);
    }
}
