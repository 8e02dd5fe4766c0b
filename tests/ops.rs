//! Operations: the metrics the dashboard and the alerts query exist, the API answers what its
//! OpenAPI document says, and the deployment files hang together. Against the real broker.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml_docs(path: &str) -> Vec<Value> {
    use serde::Deserialize;
    let text = read(path);
    serde_norway::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{path}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Metrics: every name the dashboard and the rules query is exported.

/// Every PromQL expression of the dashboard (panel targets, also inside collapsed rows, and the
/// template variables' queries), as (where, expression).
fn dashboard_exprs(dash: &Value) -> Vec<(String, String)> {
    fn panels(list: &Value, out: &mut Vec<(String, String)>) {
        for p in list.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?");
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push((
                        format!("panel '{title}' {}", t["refId"].as_str().unwrap_or("")),
                        e.to_string(),
                    ));
                }
            }
            panels(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dash["panels"], &mut out);
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        if let Some(q) = v["query"]["query"].as_str().or(v["definition"].as_str()) {
            if v["type"] == "query" {
                out.push((format!("variable {}", v["name"]), q.to_string()));
            }
        }
    }
    out
}

/// Every rule expression of a Prometheus rules file, as (where, expression).
fn rule_exprs(rules: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for g in rules["groups"].as_array().expect("groups") {
        for r in g["rules"].as_array().expect("rules") {
            let name = r["alert"].as_str().or(r["record"].as_str()).unwrap_or("?");
            out.push((
                format!("rule {name}"),
                r["expr"].as_str().expect("expr").to_string(),
            ));
        }
    }
    out
}

/// The metric names (`drawdown_*`) an expression mentions: identifiers outside string literals.
/// Not a PromQL parser, but label names and function names never start with `drawdown_`.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut chars = expr.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' | '\'' | '`' => {
                let mut escaped = false;
                for (_, d) in chars.by_ref() {
                    if escaped {
                        escaped = false;
                    } else if d == '\\' && c != '`' {
                        escaped = true;
                    } else if d == c {
                        break;
                    }
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let mut end = i + c.len_utf8();
                while let Some(&(j, d)) = chars.peek() {
                    if d.is_ascii_alphanumeric() || d == '_' || d == ':' {
                        end = j + d.len_utf8();
                        chars.next();
                    } else {
                        break;
                    }
                }
                let word = &expr[i..end];
                if word.starts_with("drawdown_") {
                    out.insert(word.to_string());
                }
            }
            _ => {}
        }
    }
    out
}

/// A scrape: family -> type (from `# TYPE`), and the sample names seen.
struct Scrape {
    types: BTreeMap<String, String>,
    samples: BTreeSet<String>,
}

impl Scrape {
    fn parse(text: &str) -> Self {
        let mut types = BTreeMap::new();
        let mut samples = BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (it.next(), it.next()) {
                    types.insert(name.to_string(), kind.to_string());
                }
            } else if !line.starts_with('#') && !line.trim().is_empty() {
                let end = line.find(['{', ' ']).unwrap_or(line.len());
                samples.insert(line[..end].to_string());
            }
        }
        Self { types, samples }
    }

    /// Whether a series name a query uses exists: a counter/gauge family with samples, or the
    /// `_bucket`/`_sum`/`_count` series of a histogram (`_sum`/`_count` of a summary). A bare
    /// histogram name is not a series, and a counter named `..._count` is not a histogram's.
    fn explain(&self, name: &str) -> Result<(), String> {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                match self.types.get(base).map(String::as_str) {
                    Some("histogram") if self.samples.contains(name) => return Ok(()),
                    Some("summary") if suffix != "_bucket" && self.samples.contains(name) => {
                        return Ok(())
                    }
                    Some(kind @ ("histogram" | "summary")) => {
                        return Err(format!("{kind} {base} exported without {name} samples"))
                    }
                    _ => {}
                }
            }
        }
        match self.types.get(name).map(String::as_str) {
            Some("histogram" | "summary") => Err(format!(
                "{name} is a histogram: query its _bucket/_sum/_count"
            )),
            Some(_) if self.samples.contains(name) => Ok(()),
            Some(kind) => Err(format!("{kind} {name} has no samples")),
            None => Err(format!("{name} is not exported")),
        }
    }
}

#[test]
fn metric_names_skip_strings_and_keep_suffixes() {
    let e = r#"sum by (le) (rate(drawdown_a_seconds_bucket{route="drawdown_not_a_metric"}[5m])) / drawdown_b_total"#;
    let names: Vec<String> = metric_names(e).into_iter().collect();
    assert_eq!(names, ["drawdown_a_seconds_bucket", "drawdown_b_total"]);
    let scrape = Scrape::parse(
        "# TYPE drawdown_h histogram\ndrawdown_h_bucket{le=\"1\"} 0\ndrawdown_h_sum 0\ndrawdown_h_count 0\n\
         # TYPE drawdown_c_count counter\ndrawdown_c_count 3\n# TYPE drawdown_g gauge\n",
    );
    assert!(scrape.explain("drawdown_h_bucket").is_ok());
    assert!(scrape.explain("drawdown_h_count").is_ok());
    assert!(
        scrape.explain("drawdown_h").is_err(),
        "a bare histogram name has no series"
    );
    assert!(
        scrape.explain("drawdown_c_count").is_ok(),
        "a counter ending in _count is itself"
    );
    assert!(scrape.explain("drawdown_c").is_err());
    assert!(
        scrape.explain("drawdown_g").is_err(),
        "described but never set"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_the_alerts_query_is_exported() {
    let dash: Value =
        serde_json::from_str(&read("deploy/grafana/drawdown.json")).expect("dashboard JSON");
    let rules = yaml_docs("deploy/prometheus/alerts.yml").remove(0);
    let mut exprs = dashboard_exprs(&dash);
    exprs.extend(rule_exprs(&rules));
    let mut wanted: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (place, e) in &exprs {
        for n in metric_names(e) {
            wanted.entry(n).or_default().push(place.clone());
        }
    }
    assert!(
        wanted.len() >= 25,
        "suspiciously few metric names found: {wanted:?}"
    );

    let names = Names::new();
    let app = spawn_app(&names).await;
    // A little traffic: grants, usage, a duplicate, an unmetered event, a malformed record.
    app.grants(&[grant("ops-a", "g1", "api_calls", "3")]);
    app.usage(&[
        api_call("ops-a", "e1"),
        api_call("ops-a", "e1"),
        api_call("ops-a", "e2"),
    ]);
    app.usage(&[json!({"id": "e3", "customer_id": "ops-a", "name": "not_metered"})]);
    let usage = app.cfg.topics.usage.clone();
    app.send(&usage, &[("ops-a", b"not json".to_vec(), None)]);
    app.meter_until("ops-a", "api_calls", |b| b["consumed"] == "2")
        .await;
    app.get("/v1/customers/ops-a/state").await;
    app.get("/v1/customers/nobody/state").await;

    // The lag gauge appears with the first measurement (every 5 s).
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let (_, body) = app.get("/metrics").await;
        let text = body.as_str().unwrap_or_default().to_string();
        if text.contains("drawdown_consumer_lag_records{") {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "no consumer lag gauge within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let scrape = Scrape::parse(&text);
    let missing: Vec<String> = wanted
        .iter()
        .filter_map(|(n, places)| {
            scrape
                .explain(n)
                .err()
                .map(|e| format!("{e} (used by {})", places.join(", ")))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "queried but not exported:\n{}",
        missing.join("\n")
    );
    // Everything drawdown exports is described (has HELP), and named by the house rule.
    for family in scrape.types.keys().filter(|f| f.starts_with("drawdown_")) {
        assert!(
            text.contains(&format!("# HELP {family} ")),
            "{family} has no description"
        );
    }
    app.stop().await;
}

#[test]
fn the_dashboard_has_the_rows_and_the_alerts_have_a_summary_and_a_runbook() {
    let dash: Value = serde_json::from_str(&read("deploy/grafana/drawdown.json")).unwrap();
    let rows: Vec<&str> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] == "row")
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for want in [
        "Throughput",
        "Latency",
        "Lag",
        "Transactions",
        "State and restore",
        "Rejected input",
        "API",
    ] {
        assert!(rows.contains(&want), "no row {want:?} in {rows:?}");
    }
    let mut ids = BTreeSet::new();
    for p in dash["panels"].as_array().unwrap() {
        assert!(
            ids.insert(p["id"].as_i64().unwrap()),
            "duplicate panel id {}",
            p["id"]
        );
    }

    let rules = yaml_docs("deploy/prometheus/alerts.yml").remove(0);
    let runbook = read("docs/runbook.md").to_lowercase();
    let tests = read("deploy/prometheus/alerts_test.yml");
    let mut alerts = Vec::new();
    for g in rules["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            let name = r["alert"].as_str().expect("alerting rules only");
            let a = &r["annotations"];
            for key in ["summary", "description", "runbook", "runbook_url"] {
                assert!(
                    a[key].as_str().is_some_and(|s| !s.is_empty()),
                    "{name}: no {key} annotation"
                );
            }
            assert!(r["labels"]["severity"].is_string(), "{name}: no severity");
            let anchor = a["runbook_url"]
                .as_str()
                .unwrap()
                .rsplit('#')
                .next()
                .unwrap();
            assert!(
                runbook.contains(&format!("## {anchor}")),
                "{name}: docs/runbook.md has no section #{anchor}"
            );
            assert!(
                tests.contains(&format!("alertname: {name}")),
                "{name}: not unit-tested in alerts_test.yml"
            );
            alerts.push(name.to_string());
        }
    }
    for want in [
        "DrawdownConsumerLagGrowing",
        "DrawdownDeadLetterRate",
        "DrawdownTransactionsAborting",
        "DrawdownStalled",
        "DrawdownInstanceNotReady",
        "DrawdownEndToEndLatencyHigh",
    ] {
        assert!(alerts.iter().any(|a| a == want), "no alert {want}");
    }
}

// ---------------------------------------------------------------------------------------------
// OpenAPI: the document is OpenAPI 3 and live responses match it.

/// The document with `additionalProperties: false` on every object schema that lists its
/// properties and says nothing else: a field the server sends but the document does not
/// describe fails the check.
fn strict(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut out: serde_json::Map<String, Value> =
                m.iter().map(|(k, v)| (k.clone(), strict(v))).collect();
            if m.get("type") == Some(&json!("object"))
                && m.contains_key("properties")
                && !m.contains_key("additionalProperties")
            {
                out.insert("additionalProperties".into(), json!(false));
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(strict).collect()),
        other => other.clone(),
    }
}

struct Checked {
    template: &'static str,
    method: String,
    status: u16,
}

/// The credential a checked request carries.
enum Cred {
    /// The test API key (`TestApp::http`).
    Key,
    /// None.
    Anonymous,
    /// This bearer token (a portal token).
    Bearer(String),
}

async fn check_response(
    app: &TestApp,
    doc: &Value,
    template: &'static str,
    path: &str,
    method: reqwest::Method,
    want: u16,
) -> Checked {
    check_request(app, doc, template, path, method, want, Cred::Key, None).await
}

/// Sends a request and checks its answer against the operation `template` + `method` of the
/// document (`template` "-": outside the documented routes, the error shape).
#[allow(clippy::too_many_arguments)]
async fn check_request(
    app: &TestApp,
    doc: &Value,
    template: &'static str,
    path: &str,
    method: reqwest::Method,
    want: u16,
    cred: Cred,
    body: Option<Value>,
) -> Checked {
    let url = format!("{}{}", app.base, path);
    let mut req = match &cred {
        Cred::Key => app.http.request(method.clone(), url),
        Cred::Anonymous | Cred::Bearer(_) => reqwest::Client::new().request(method.clone(), url),
    };
    if let Cred::Bearer(t) = &cred {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let ctype = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body = resp.text().await.unwrap();
    assert_eq!(status, want, "{method} {path}: {body}");
    let op = &doc["paths"][template][method.as_str().to_lowercase()];
    let spec = if template != "-" {
        let r = &op["responses"][status.to_string()];
        assert!(r.is_object(), "{path}: status {status} is not documented");
        if let Some(reference) = r["$ref"].as_str() {
            let name = reference.rsplit('/').next().unwrap();
            doc["components"]["responses"][name].clone()
        } else {
            r.clone()
        }
    } else {
        // Unknown routes and methods: the one error shape.
        json!({"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
    };
    let media = ctype.split(';').next().unwrap().trim().to_string();
    let schema = spec["content"][&media]["schema"].clone();
    assert!(
        schema.is_object(),
        "{path}: {status} answered {media}, documented {:?}",
        spec["content"]
    );
    let instance: Value = if media == "application/json" {
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {body}"))
    } else {
        Value::String(body)
    };
    // The schema, with the document's components beside it so `#/components/...` resolves.
    let mut root = schema.as_object().unwrap().clone();
    root.insert("components".into(), doc["components"].clone());
    let validator = jsonschema::draft202012::new(&Value::Object(root)).expect("a valid schema");
    let errors: Vec<String> = validator
        .iter_errors(&instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{path} ({status}) does not match its schema:\n{}\n{instance:#}",
        errors.join("\n")
    );
    Checked {
        template,
        method: method.as_str().to_lowercase(),
        status,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_what_the_openapi_document_says() {
    let names = Names::new();
    let app = spawn_app(&names).await;
    let (status, served) = app.get("/openapi.json").await;
    assert_eq!(status, 200);
    let file: Value = serde_json::from_str(&read("docs/openapi.json")).unwrap();
    assert_eq!(served, file, "/openapi.json serves docs/openapi.json");
    assert!(
        file["openapi"].as_str().unwrap().starts_with("3.1"),
        "OpenAPI 3.1 (schemas are JSON Schema 2020-12)"
    );
    let doc = strict(&file);

    // A customer with two grants (one pending), usage beyond them, and history to page through.
    app.grants(&[
        grant("oa-1", "g1", "api_calls", "3"),
        json!({"type": "grant", "grant_id": "g2", "customer_id": "oa-1", "meter": "api_calls", "amount": "5",
               "kind": "cycle", "subscription_id": "sub-1", "rollover": "1", "priority": 3,
               "effective_at": "2099-01-01T00:00:00Z", "expires_at": "2099-02-01T00:00:00Z"}),
        grant("oa-1", "g3", "tokens", "1000"),
    ]);
    app.usage(&[
        api_call("oa-1", "e1"),
        api_call("oa-1", "e2"),
        api_call("oa-1", "e3"),
        api_call("oa-1", "e4"),
        llm("oa-1", "e5", "12.5"),
    ]);
    app.meter_until("oa-1", "api_calls", |b| b["consumed"] == "4")
        .await;

    use reqwest::Method;
    let (state, meter, events) = (
        "/v1/customers/{id}/state",
        "/v1/customers/{id}/meters/{meter}",
        "/v1/customers/{id}/meters/{meter}/events",
    );
    let long = "x".repeat(201);
    let mut checked = vec![
        check_response(
            &app,
            &doc,
            state,
            "/v1/customers/oa-1/state",
            Method::GET,
            200,
        )
        .await,
        check_response(
            &app,
            &doc,
            state,
            "/v1/customers/nobody/state",
            Method::GET,
            404,
        )
        .await,
        check_response(
            &app,
            &doc,
            state,
            &format!("/v1/customers/{long}/state"),
            Method::GET,
            400,
        )
        .await,
        check_response(
            &app,
            &doc,
            meter,
            "/v1/customers/oa-1/meters/api_calls",
            Method::GET,
            200,
        )
        .await,
        check_response(
            &app,
            &doc,
            meter,
            "/v1/customers/oa-1/meters/tokens",
            Method::GET,
            200,
        )
        .await,
        check_response(
            &app,
            &doc,
            meter,
            "/v1/customers/oa-1/meters/nope",
            Method::GET,
            404,
        )
        .await,
        check_response(
            &app,
            &doc,
            meter,
            &format!("/v1/customers/{long}/meters/tokens"),
            Method::GET,
            400,
        )
        .await,
        check_response(
            &app,
            &doc,
            events,
            "/v1/customers/oa-1/meters/api_calls/events",
            Method::GET,
            200,
        )
        .await,
        check_response(
            &app,
            &doc,
            events,
            "/v1/customers/oa-1/meters/api_calls/events?limit=0",
            Method::GET,
            400,
        )
        .await,
        check_response(
            &app,
            &doc,
            events,
            "/v1/customers/oa-1/meters/api_calls/events?limit=x",
            Method::GET,
            400,
        )
        .await,
        check_response(
            &app,
            &doc,
            events,
            "/v1/customers/oa-1/meters/api_calls/events?cursor=x",
            Method::GET,
            400,
        )
        .await,
        check_response(
            &app,
            &doc,
            events,
            "/v1/customers/nobody/meters/api_calls/events",
            Method::GET,
            404,
        )
        .await,
        check_response(&app, &doc, "/healthz", "/healthz", Method::GET, 200).await,
        check_response(&app, &doc, "/readyz", "/readyz", Method::GET, 200).await,
        check_response(&app, &doc, "/metrics", "/metrics", Method::GET, 200).await,
        check_response(
            &app,
            &doc,
            "/openapi.json",
            "/openapi.json",
            Method::GET,
            200,
        )
        .await,
    ];
    // Pagination: pages of 2 follow next_cursor down to the first movement, without overlap.
    let mut cursor: Option<String> = None;
    let mut versions = Vec::new();
    loop {
        let q = cursor
            .as_ref()
            .map(|c| format!("&cursor={c}"))
            .unwrap_or_default();
        let path = format!("/v1/customers/oa-1/meters/api_calls/events?limit=2{q}");
        checked.push(check_response(&app, &doc, events, &path, Method::GET, 200).await);
        let (_, page) = app.get(&path).await;
        versions.extend(
            page["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["version"].as_u64().unwrap()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let (_, m) = app.get("/v1/customers/oa-1/meters/api_calls").await;
    let latest = m["version"].as_u64().unwrap();
    assert_eq!(
        versions,
        (1..=latest).rev().collect::<Vec<_>>(),
        "every movement once, newest first"
    );
    // Outside the documented routes: the same error shape.
    check_response(&app, &doc, "-", "/v2/nothing", Method::GET, 404).await;
    check_response(&app, &doc, "-", "/healthz", Method::POST, 405).await;

    // Access control, portal sessions, top-ups and the portal page.
    let (status, session) = {
        let r = app
            .http
            .post(format!("{}/v1/portal-sessions", app.base))
            .json(&json!({"customer_id": "oa-1", "ttl": 600}))
            .send()
            .await
            .unwrap();
        (r.status(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(status, 201);
    let own = session["token"].as_str().unwrap().to_string();
    let other = app
        .http
        .post(format!("{}/v1/portal-sessions", app.base))
        .json(&json!({"customer_id": "oa-2"}))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let bearer = |t: &str| Cred::Bearer(t.to_string());
    for (template, path) in [
        (state, "/v1/customers/oa-1/state"),
        (meter, "/v1/customers/oa-1/meters/api_calls"),
        (events, "/v1/customers/oa-1/meters/api_calls/events"),
    ] {
        checked.push(
            check_request(
                &app,
                &doc,
                template,
                path,
                Method::GET,
                401,
                Cred::Anonymous,
                None,
            )
            .await,
        );
        checked.push(
            check_request(
                &app,
                &doc,
                template,
                path,
                Method::GET,
                403,
                bearer(&other),
                None,
            )
            .await,
        );
        checked.push(
            check_request(
                &app,
                &doc,
                template,
                path,
                Method::GET,
                200,
                bearer(&own),
                None,
            )
            .await,
        );
    }
    let top_ups = "/v1/customers/{id}/meters/{meter}/top-ups";
    let top_up = "/v1/customers/oa-1/meters/api_calls/top-ups";
    let pack = || Some(json!({"pack": "calls-100", "request_id": "oa-req-1"}));
    for (path, want, cred, body) in [
        (top_up, 202, Cred::Key, pack()),
        (top_up, 202, bearer(&own), pack()),
        (top_up, 400, Cred::Key, Some(json!({"pack": "nope"}))),
        (top_up, 401, Cred::Anonymous, pack()),
        (top_up, 403, bearer(&other), pack()),
        (
            "/v1/customers/oa-1/meters/nope/top-ups",
            404,
            Cred::Key,
            pack(),
        ),
    ] {
        checked
            .push(check_request(&app, &doc, top_ups, path, Method::POST, want, cred, body).await);
    }
    let sessions = "/v1/portal-sessions";
    for (want, cred, body) in [
        (201, Cred::Key, json!({"customer_id": "oa-1", "ttl": "5m"})),
        (400, Cred::Key, json!({"customer_id": "oa-1", "ttl": -5})),
        (401, Cred::Anonymous, json!({"customer_id": "oa-1"})),
        (403, bearer(&own), json!({"customer_id": "oa-1"})),
    ] {
        checked.push(
            check_request(
                &app,
                &doc,
                sessions,
                sessions,
                Method::POST,
                want,
                cred,
                Some(body),
            )
            .await,
        );
    }
    let current = "/v1/portal-sessions/current";
    for (want, cred) in [
        (200, bearer(&own)),
        (401, Cred::Anonymous),
        (403, Cred::Key),
    ] {
        checked
            .push(check_request(&app, &doc, current, current, Method::GET, want, cred, None).await);
    }
    for (template, path, want) in [
        ("/portal", "/portal", 200),
        ("/portal", "/portal?token=x", 200),
        ("/portal/{asset}", "/portal/app.js", 200),
        ("/portal/{asset}", "/portal/app.css", 200),
        ("/portal/{asset}", "/portal/nope.js", 404),
    ] {
        checked.push(
            check_request(
                &app,
                &doc,
                template,
                path,
                Method::GET,
                want,
                Cred::Anonymous,
                None,
            )
            .await,
        );
    }
    check_response(&app, &doc, "-", "/v1/portal-sessions", Method::GET, 405).await;

    // The entitlement check and its batch form.
    let check = "/v1/customers/{id}/meters/{meter}/check";
    for (path, want, cred) in [
        (
            "/v1/customers/oa-1/meters/tokens/check?units=5",
            200,
            Cred::Key,
        ),
        (
            "/v1/customers/oa-1/meters/api_calls/check?units=5",
            200,
            Cred::Key,
        ),
        (
            "/v1/customers/oa-1/meters/nope/check?units=5",
            200,
            Cred::Key,
        ),
        (
            "/v1/customers/oa-1/meters/tokens/check?units=-5",
            400,
            Cred::Key,
        ),
        ("/v1/customers/oa-1/meters/tokens/check", 400, Cred::Key),
        (
            "/v1/customers/oa-1/meters/tokens/check?units=5",
            401,
            Cred::Anonymous,
        ),
        (
            "/v1/customers/oa-1/meters/tokens/check?units=5",
            200,
            bearer(&own),
        ),
        (
            "/v1/customers/oa-1/meters/tokens/check?units=5",
            403,
            bearer(&other),
        ),
    ] {
        checked.push(check_request(&app, &doc, check, path, Method::GET, want, cred, None).await);
    }
    let checks = "/v1/checks";
    let items = json!({"checks": [
        {"customer_id": "oa-1", "meter": "tokens", "units": "1"},
        {"customer_id": "oa-1", "meter": "api_calls", "units": "100"},
        {"customer_id": "oa-2", "meter": "nope", "units": "0"},
    ]});
    for (want, cred, body) in [
        (200, Cred::Key, items.clone()),
        (400, Cred::Key, json!({"checks": []})),
        (401, Cred::Anonymous, items.clone()),
        (403, bearer(&own), items.clone()),
    ] {
        checked.push(
            check_request(
                &app,
                &doc,
                checks,
                checks,
                Method::POST,
                want,
                cred,
                Some(body),
            )
            .await,
        );
    }

    // Reservations: held, refused, bad, unauthenticated, portal token, unknown meter; release.
    let reservations = "/v1/customers/{id}/meters/{meter}/reservations";
    let reserve = "/v1/customers/oa-1/meters/tokens/reservations";
    let job =
        |id: &str, units: &str| Some(json!({"reservation_id": id, "units": units, "ttl": "10m"}));
    for (path, want, cred, body) in [
        (reserve, 200, Cred::Key, job("oa-job-1", "10")),
        (reserve, 409, Cred::Key, job("oa-job-2", "100000")),
        (reserve, 400, Cred::Key, job("oa-job-3", "0")),
        (reserve, 401, Cred::Anonymous, job("oa-job-4", "1")),
        (reserve, 403, bearer(&own), job("oa-job-5", "1")),
        (
            "/v1/customers/oa-1/meters/nope/reservations",
            404,
            Cred::Key,
            job("oa-job-6", "1"),
        ),
    ] {
        checked.push(
            check_request(
                &app,
                &doc,
                reservations,
                path,
                Method::POST,
                want,
                cred,
                body,
            )
            .await,
        );
    }
    let reservation = "/v1/customers/{id}/meters/{meter}/reservations/{reservation_id}";
    let job_1 = "/v1/customers/oa-1/meters/tokens/reservations/oa-job-1";
    for (path, want, cred) in [
        (job_1, 401, Cred::Anonymous),
        (job_1, 403, bearer(&own)),
        (job_1, 200, Cred::Key),
        (
            "/v1/customers/oa-1/meters/tokens/reservations/nope",
            404,
            Cred::Key,
        ),
        (
            "/v1/customers/oa-1/meters/tokens/reservations/%01",
            400,
            Cred::Key,
        ),
    ] {
        checked.push(
            check_request(
                &app,
                &doc,
                reservation,
                path,
                Method::DELETE,
                want,
                cred,
                None,
            )
            .await,
        );
    }

    // Every documented status was seen, but the ones a healthy instance cannot give.
    for (template, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let Some(responses) = op["responses"].as_object() else {
                continue;
            };
            for status in responses.keys() {
                let status: u16 = status.parse().unwrap();
                if status >= 500 {
                    continue;
                }
                assert!(
                    checked.iter().any(|c| c.template == template
                        && &c.method == method
                        && c.status == status),
                    "{method} {template} {status} documented but not exercised"
                );
            }
        }
    }
    app.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Deployment files: compose and Kubernetes manifests parse, refer to files that exist, and
// every DRAWDOWN__* variable they set is a real config key (the loader rejects unknown keys).

fn assert_env_is_valid_config(place: &str, env: &[(String, String)]) {
    let vars: Vec<(String, String)> = env
        .iter()
        .filter(|(k, _)| k.starts_with("DRAWDOWN__"))
        .cloned()
        .collect();
    assert!(!vars.is_empty(), "{place}: no DRAWDOWN__* variables");
    drawdown::config::Config::load(Some(&repo("config/drawdown.toml")), vars.clone())
        .unwrap_or_else(|e| panic!("{place}: {e} ({vars:?})"));
}

#[test]
fn the_compose_file_wires_kafka_drawdown_prometheus_and_grafana() {
    let compose = yaml_docs("deploy/docker-compose.yml").remove(0);
    let services = compose["services"].as_object().expect("services");
    for s in ["kafka", "drawdown", "prometheus", "grafana"] {
        assert!(services.contains_key(s), "no {s} service");
    }
    // Mounted files exist (paths relative to deploy/).
    for (name, s) in services {
        for v in s["volumes"].as_array().into_iter().flatten() {
            let src = v
                .as_str()
                .map(|v| v.split(':').next().unwrap().to_string())
                .unwrap_or_default();
            if src.starts_with('.') {
                assert!(
                    repo("deploy").join(&src).exists(),
                    "{name}: mounts missing {src}"
                );
            }
        }
        if let Some(ctx) = s["build"]["context"].as_str() {
            let dockerfile = s["build"]["dockerfile"].as_str().unwrap_or("Dockerfile");
            assert!(
                repo("deploy").join(ctx).join(dockerfile).exists(),
                "{name}: no {dockerfile} in {ctx}"
            );
        }
        for d in s["depends_on"]
            .as_object()
            .map(|m| m.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
        {
            assert!(services.contains_key(&d), "{name} depends on unknown {d}");
        }
    }
    let env: Vec<(String, String)> = services["drawdown"]["environment"]
        .as_object()
        .expect("environment as a map")
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string()),
            )
        })
        .collect();
    assert_env_is_valid_config("compose drawdown", &env);
    let bootstrap = env
        .iter()
        .find(|(k, _)| k == "DRAWDOWN__KAFKA__BOOTSTRAP_SERVERS")
        .expect("bootstrap set");
    assert!(
        bootstrap.1.starts_with("kafka:"),
        "drawdown talks to the kafka service"
    );
    // Prometheus scrapes drawdown with the rules; Grafana is provisioned with the dashboard.
    let prom = yaml_docs("deploy/prometheus/prometheus.yml").remove(0);
    assert_eq!(prom["rule_files"], json!(["alerts.yml"]));
    let targets = prom["scrape_configs"][0]["static_configs"][0]["targets"].to_string();
    assert!(targets.contains("drawdown:8080"), "{targets}");
    let grafana = services["grafana"]["volumes"].to_string();
    assert!(
        grafana.contains("drawdown.json"),
        "the dashboard is mounted: {grafana}"
    );
    let provider = yaml_docs("deploy/grafana/provisioning/dashboards/drawdown.yml").remove(0);
    assert!(provider["providers"][0]["options"]["path"].is_string());
    let ds = yaml_docs("deploy/grafana/provisioning/datasources/prometheus.yml").remove(0);
    assert_eq!(ds["datasources"][0]["type"], "prometheus");
}

#[test]
fn the_kubernetes_manifests_define_a_statefulset_with_probes_a_volume_a_service_and_a_pdb() {
    let mut docs = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(repo("deploy/k8s"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "yaml"))
    {
        let rel = f
            .strip_prefix(repo(""))
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        for d in yaml_docs(&rel) {
            assert!(
                d["apiVersion"].is_string() && d["kind"].is_string(),
                "{rel}: apiVersion and kind"
            );
            assert!(d["metadata"]["name"].is_string(), "{rel}: metadata.name");
            docs.push(d);
        }
    }
    let kind = |k: &str| docs.iter().filter(|d| d["kind"] == k).collect::<Vec<_>>();
    let sts = kind("StatefulSet");
    assert_eq!(sts.len(), 1);
    let sts = sts[0];
    let labels = &sts["spec"]["template"]["metadata"]["labels"];
    assert_eq!(
        &sts["spec"]["selector"]["matchLabels"]
            .as_object()
            .unwrap()
            .iter()
            .all(|(k, v)| &labels[k] == v),
        &true
    );
    let pod = &sts["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    let claim = sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
        .as_str()
        .expect("a volume claim");
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == claim)
        .expect("claim mounted");
    let data = mount["mountPath"].as_str().unwrap();
    let env: Vec<(String, String)> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let v = e["value"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| "pod-0".into());
            (e["name"].as_str().unwrap().to_string(), v)
        })
        .collect();
    assert_env_is_valid_config("statefulset", &env);
    let store = env
        .iter()
        .find(|(k, _)| k == "DRAWDOWN__STORE__PATH")
        .expect("store path set");
    assert!(
        store.1.starts_with(data),
        "RocksDB ({}) lives on the volume ({data})",
        store.1
    );
    let instance = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "DRAWDOWN__KAFKA__INSTANCE_ID")
        .unwrap();
    assert_eq!(
        instance["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name",
        "a stable instance id per pod"
    );
    // The Services and the PDB select the StatefulSet's pods; the headless Service is its serviceName.
    let selects = |sel: &Value| {
        sel.as_object()
            .unwrap()
            .iter()
            .all(|(k, v)| &labels[k] == v)
    };
    let services = kind("Service");
    assert!(services.iter().all(|s| selects(&s["spec"]["selector"])));
    assert!(services
        .iter()
        .any(|s| s["metadata"]["name"] == sts["spec"]["serviceName"]
            && s["spec"]["clusterIP"] == "None"));
    let pdb = kind("PodDisruptionBudget");
    assert_eq!(pdb.len(), 1);
    assert!(selects(&pdb[0]["spec"]["selector"]["matchLabels"]));
    // The config file comes from the ConfigMap the pod mounts, and it loads.
    let cm = kind("ConfigMap");
    let toml = cm[0]["data"]["drawdown.toml"]
        .as_str()
        .expect("drawdown.toml in the ConfigMap");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("drawdown.toml"), toml).unwrap();
    drawdown::config::Config::load(Some(&dir.path().join("drawdown.toml")), Vec::new())
        .expect("the ConfigMap's config loads");
}

#[test]
fn the_dockerfile_builds_in_one_stage_and_runs_in_a_slim_one() {
    let df = read("Dockerfile");
    let froms: Vec<&str> = df
        .lines()
        .filter(|l| l.trim_start().to_uppercase().starts_with("FROM "))
        .collect();
    assert!(froms.len() >= 2, "multi-stage: {froms:?}");
    assert!(
        froms.last().unwrap().contains("slim"),
        "small runtime image: {froms:?}"
    );
    assert!(df.contains("HEALTHCHECK") || df.contains("EXPOSE 8080"));
    let ignore = read(".dockerignore");
    assert!(
        ignore
            .lines()
            .any(|l| l.trim() == "target" || l.trim() == "/target"),
        ".dockerignore keeps target/ out"
    );
}
