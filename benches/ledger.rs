//! The pure rules' cost per usage event (no I/O): `cargo bench --bench ledger`.

use std::collections::BTreeMap;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use drawdown::ledger::{
    Aggregation, Book, CustomerId, EventId, Grant, GrantId, Input, Ledger, MeterDef, MeterName,
    Meters, OnExhausted, Usage,
};
use rust_decimal::Decimal;

fn ledger() -> Ledger {
    let def = |name: &str, event: &str, aggregation, on_exhausted| MeterDef {
        name: MeterName::parse(name).unwrap(),
        event: event.into(),
        filter: BTreeMap::new(),
        aggregation,
        on_exhausted,
        low_balance: vec![],
        top_up_packs: vec![],
        auto_top_up: None,
        burn_window: drawdown::ledger::default_burn_window(),
        forecast_horizon: drawdown::ledger::default_forecast_horizon(),
        forecast_alert: None,
    };
    Ledger::new(
        Meters::new(vec![
            def(
                "api_calls",
                "api_call",
                Aggregation::Count,
                OnExhausted::Overage,
            ),
            def(
                "tokens",
                "llm",
                Aggregation::Sum {
                    property: "tokens".into(),
                },
                OnExhausted::Block,
            ),
            def(
                "llm_requests",
                "llm",
                Aggregation::Count,
                OnExhausted::Overage,
            ),
        ])
        .unwrap(),
    )
}

fn bench(c: &mut Criterion) {
    let l = ledger();
    let customer = CustomerId::parse("c1").unwrap();
    let n = 1000;
    let inputs: Vec<Input> = (0..n)
        .map(|i| {
            Input::Usage(Usage {
                id: EventId::parse(format!("e{i}")).unwrap(),
                customer: customer.clone(),
                name: if i % 2 == 0 {
                    "api_call".into()
                } else {
                    "llm".into()
                },
                timestamp_ms: 0,
                properties: [("tokens".to_string(), "12.5".to_string())]
                    .into_iter()
                    .collect(),
                reservation_id: None,
            })
        })
        .collect();
    let mut base = Book::new(customer.clone());
    for (i, meter) in ["api_calls", "tokens", "llm_requests"].iter().enumerate() {
        let gid = GrantId::parse(format!("g{i}")).unwrap();
        base.grants.insert(gid.clone(), None);
        let g = Input::Grant(Grant::top_up(
            gid,
            customer.clone(),
            MeterName::parse(*meter).unwrap(),
            Decimal::from(1_000_000),
        ));
        l.apply(&mut base, &g, 0, &mut Vec::new()).unwrap();
    }
    for i in 0..n {
        base.events
            .insert(EventId::parse(format!("e{i}")).unwrap(), None);
    }
    let mut g = c.benchmark_group("ledger");
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("apply_1000_usage_events", |b| {
        b.iter_batched(
            || base.clone(),
            |mut book| {
                let mut out = Vec::with_capacity(2 * n);
                for input in &inputs {
                    l.apply(&mut book, input, 1, &mut out).unwrap();
                }
                out
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
