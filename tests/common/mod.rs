//! Shared helpers for the integration tests: each test gets its own topics, group, data dir
//! and API port, against the real broker (`DRAWDOWN_TEST_BOOTSTRAP`, default 127.0.0.1:9092).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use drawdown::app::Application;
use drawdown::config::Config;
use drawdown::shutdown::Shutdown;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::Value;

/// The API key every test app accepts (its SHA-256 is configured); `TestApp::http` sends it.
pub const API_KEY: &str = "test-api-key-1";
/// A second configured key (rotation).
pub const API_KEY_2: &str = "test-api-key-2";
/// The portal secret of the test apps.
pub const PORTAL_SECRET: &str = "test-portal-secret-of-at-least-32-bytes";

pub fn bootstrap() -> String {
    std::env::var("DRAWDOWN_TEST_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

pub const METERS: &str = r#"
[[meters]]
name = "api_calls"
event = "api_call"
aggregation = { type = "count" }
on_exhausted = "overage"
low_balance = [{ units = "5" }]
top_up_packs = ["calls-100"]

[[meters]]
name = "tokens"
event = "llm_completion"
aggregation = { type = "sum", property = "tokens" }
on_exhausted = "block"
forecast_alert = "24h"

[[meters]]
name = "llm_requests"
event = "llm_completion"
aggregation = { type = "count" }
on_exhausted = "overage"
"#;

/// Removes the data dirs that test processes which have ended left behind
/// (`drawdown-test-t<pid>-<n>`, about 80 KB each). A test's own dir stays while its process
/// runs: an app may still have its store open there when the test's `Names` is dropped.
fn remove_dirs_of_ended_runs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name
            .to_str()
            .and_then(|n| n.strip_prefix("drawdown-test-t"))
        else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A test's names: topics and group are unique per test run.
#[derive(Clone)]
pub struct Names {
    pub id: String,
    pub dir: std::path::PathBuf,
}

impl Names {
    pub fn new() -> Self {
        static SWEPT: std::sync::Once = std::sync::Once::new();
        SWEPT.call_once(remove_dirs_of_ended_runs);
        let id = format!("t{}-{}", std::process::id(), rand::random::<u32>());
        let dir = std::env::temp_dir().join(format!("drawdown-test-{id}"));
        Self { id, dir }
    }

    pub fn config(&self) -> Config {
        self.config_with(METERS, &[])
    }

    /// The config with these meters (TOML) and extra `DRAWDOWN__*` overrides.
    pub fn config_with(&self, meters: &str, extra: &[(&str, &str)]) -> Config {
        let id = &self.id;
        let keys = format!(
            r#"[{{ name = "test", sha256 = "{}" }}, {{ name = "test-2", sha256 = "{}" }}]"#,
            drawdown::credentials::hash_key(API_KEY),
            drawdown::credentials::hash_key(API_KEY_2)
        );
        let mut env = vec![
            (
                "DRAWDOWN__KAFKA__BOOTSTRAP_SERVERS".to_string(),
                bootstrap(),
            ),
            ("DRAWDOWN__KAFKA__GROUP_ID".into(), format!("{id}-group")),
            ("DRAWDOWN__KAFKA__PARTITIONS".into(), "3".into()),
            ("DRAWDOWN__KAFKA__TRANSACTION_TIMEOUT".into(), "10s".into()),
            ("DRAWDOWN__TOPICS__USAGE".into(), format!("{id}-usage")),
            ("DRAWDOWN__TOPICS__GRANTS".into(), format!("{id}-grants")),
            (
                "DRAWDOWN__TOPICS__BALANCE_CHANGED".into(),
                format!("{id}-changed"),
            ),
            (
                "DRAWDOWN__TOPICS__BALANCE_EVENTS".into(),
                format!("{id}-exhausted"),
            ),
            ("DRAWDOWN__TOPICS__DLQ".into(), format!("{id}-dlq")),
            (
                "DRAWDOWN__TOPICS__TOP_UP_REQUESTS".into(),
                format!("{id}-top-ups"),
            ),
            ("DRAWDOWN__API__KEYS".into(), keys),
            ("DRAWDOWN__API__PORTAL_SECRET".into(), PORTAL_SECRET.into()),
            ("DRAWDOWN__PIPELINE__COMMIT_INTERVAL".into(), "50ms".into()),
            // Time rules run this far behind the newest event time: short, so an expiry on a
            // tick comes within the tests' waits.
            ("DRAWDOWN__PIPELINE__GRACE".into(), "1s".into()),
            (
                "DRAWDOWN__STORE__PATH".into(),
                self.dir.join("state").display().to_string(),
            ),
            ("DRAWDOWN__STORE__BLOCK_CACHE_MB".into(), "8".into()),
            ("DRAWDOWN__STORE__WRITE_BUFFER_MB".into(), "8".into()),
            ("DRAWDOWN__API__LISTEN".into(), "127.0.0.1:0".into()),
        ];
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let file = self.dir.join("drawdown.toml");
        std::fs::create_dir_all(&self.dir).unwrap();
        std::fs::write(&file, meters).unwrap();
        Config::load(Some(&file), env).unwrap()
    }
}

/// A running instance.
pub struct TestApp {
    pub names: Names,
    pub cfg: Config,
    pub base: String,
    pub shutdown: Shutdown,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub http: reqwest::Client,
}

/// A client that authenticates with `API_KEY`.
pub fn authed_client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {API_KEY}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

pub async fn spawn_app(names: &Names) -> TestApp {
    spawn_app_with(names, names.config()).await
}

/// Like [`spawn_app`], with a config the test adjusted.
pub async fn spawn_app_with(names: &Names, cfg: Config) -> TestApp {
    let t = start_app_with(names, cfg).await;
    t.wait_ready().await;
    t
}

/// Starts the app without waiting for it to be ready.
pub async fn start_app_with(names: &Names, cfg: Config) -> TestApp {
    let app = Application::build(cfg.clone()).await.expect("app builds");
    let base = format!("http://{}", app.addr());
    let shutdown = app.shutdown_handle();
    let task = tokio::spawn(app.run_until_stopped());
    TestApp {
        names: names.clone(),
        cfg,
        base,
        shutdown,
        task,
        http: authed_client(),
    }
}

impl TestApp {
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = self.http.get(format!("{}/readyz", self.base)).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "not ready within 60 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn stop(self) {
        self.shutdown.trigger();
        self.task.await.unwrap().unwrap();
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        answer(self.http.get(format!("{}{}", self.base, path))).await
    }

    /// The value of counter `name` (without labels) on the app's `/metrics`.
    pub async fn counter(&self, name: &str) -> u64 {
        let text = reqwest::get(format!("{}/metrics", self.base))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("{name} is exported"))
            .parse()
            .unwrap()
    }

    /// Polls the meter endpoint until `check` holds (30 s at most), returning the last body.
    pub async fn meter_until(
        &self,
        customer: &str,
        meter: &str,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body) = self
                .get(&format!("/v1/customers/{customer}/meters/{meter}"))
                .await;
            if status == 200 && check(&body) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "condition not met for {customer}/{meter}; last: {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn producer(&self) -> BaseProducer {
        ClientConfig::new()
            .set("bootstrap.servers", bootstrap())
            .set("enable.idempotence", "true")
            .set("partitioner", "murmur2_random")
            .create()
            .unwrap()
    }

    /// Sends records `(key, payload, content-type)` to `topic`, in order, and flushes.
    pub fn send(&self, topic: &str, records: &[(&str, Vec<u8>, Option<&str>)]) {
        let p = self.producer();
        for (key, payload, ct) in records {
            let mut rec = BaseRecord::<str, [u8]>::to(topic)
                .key(*key)
                .payload(payload.as_slice());
            if let Some(ct) = ct {
                rec = rec.headers(OwnedHeaders::new().insert(Header {
                    key: "content-type",
                    value: Some(*ct),
                }));
            }
            p.send(rec).map_err(|(e, _)| e).unwrap();
        }
        p.flush(Duration::from_secs(30)).unwrap();
    }

    /// Sends JSON records to `topic`, keyed by their `customer_id`.
    pub fn send_json(&self, topic: &str, records: &[Value]) {
        let recs: Vec<_> = records
            .iter()
            .map(|v| {
                (
                    v["customer_id"].as_str().unwrap(),
                    serde_json::to_vec(v).unwrap(),
                    None,
                )
            })
            .collect();
        self.send(topic, &recs);
    }

    pub fn usage(&self, records: &[Value]) {
        self.send_json(&self.cfg.topics.usage, records);
    }

    pub fn grants(&self, records: &[Value]) {
        self.send_json(&self.cfg.topics.grants, records);
    }

    /// Every committed record of `topic` so far: (key, payload, headers).
    pub fn read_all(&self, topic: &str) -> Vec<(String, Vec<u8>, BTreeMap<String, String>)> {
        read_all(topic)
    }
}

/// Sends `req` and returns its status and body (JSON, or the text as a JSON string).
pub async fn answer(req: reqwest::RequestBuilder) -> (u16, Value) {
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Sends `(topic, value, timestamp)` in order, each keyed by its `customer_id`, with that
/// record timestamp, and flushes.
pub fn send_timed(records: &[(String, Value, i64)]) {
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .create()
        .unwrap();
    for (topic, v, ts) in records {
        let payload = serde_json::to_vec(v).unwrap();
        let key = v["customer_id"].as_str().unwrap().to_string();
        p.send(
            BaseRecord::<str, [u8]>::to(topic)
                .key(&key)
                .payload(&payload)
                .timestamp(*ts),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    }
    p.flush(Duration::from_secs(30)).unwrap();
}

/// The committed records of `topic`, per key, in order (payloads as JSON).
pub fn by_key(topic: &str) -> BTreeMap<String, Vec<Value>> {
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for (k, v, _) in read_all(topic) {
        out.entry(k)
            .or_default()
            .push(serde_json::from_slice(&v).unwrap());
    }
    out
}

pub fn read_all(topic: &str) -> Vec<(String, Vec<u8>, BTreeMap<String, String>)> {
    read_raw(topic)
        .into_iter()
        .map(|(k, v, h)| {
            (
                String::from_utf8_lossy(&k).into_owned(),
                v.unwrap_or_default(),
                h,
            )
        })
        .collect()
}

/// A record as read: (key, payload or `None` for a tombstone, headers).
pub type RawRecord = (Vec<u8>, Option<Vec<u8>>, BTreeMap<String, String>);

/// Every committed record of `topic` so far, as it is.
pub fn read_raw(topic: &str) -> Vec<RawRecord> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", "drawdown-test-reader")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let parts = md.topics()[0].partitions().len();
    let mut tpl = TopicPartitionList::new();
    for p in 0..parts {
        tpl.add_partition_offset(topic, p as i32, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut eof = 0;
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while eof < parts && Instant::now() < deadline {
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let mut h = BTreeMap::new();
                if let Some(hs) = m.headers() {
                    for x in hs.iter() {
                        h.insert(
                            x.key.to_string(),
                            String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned(),
                        );
                    }
                }
                out.push((
                    m.key().unwrap_or_default().to_vec(),
                    m.payload().map(<[u8]>::to_vec),
                    h,
                ));
            }
            Some(Err(KafkaError::PartitionEOF(_))) => eof += 1,
            _ => {}
        }
    }
    out
}

/// Reads `topic` until `check` holds on its records (30 s at most).
pub async fn read_until(
    topic: &str,
    check: impl Fn(&[(String, Vec<u8>, BTreeMap<String, String>)]) -> bool,
) -> Vec<(String, Vec<u8>, BTreeMap<String, String>)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t = topic.to_string();
        let recs = tokio::task::spawn_blocking(move || read_all(&t))
            .await
            .unwrap();
        if check(&recs) {
            return recs;
        }
        assert!(
            Instant::now() < deadline,
            "{topic}: condition not met; {} records",
            recs.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn grant(customer: &str, id: &str, meter: &str, amount: &str) -> Value {
    serde_json::json!({"type": "grant", "grant_id": id, "customer_id": customer, "meter": meter, "amount": amount, "kind": "top_up"})
}

pub fn api_call(customer: &str, id: &str) -> Value {
    serde_json::json!({"id": id, "customer_id": customer, "name": "api_call", "timestamp": "2026-11-28T12:00:00Z"})
}

pub fn llm(customer: &str, id: &str, tokens: &str) -> Value {
    serde_json::json!({"id": id, "customer_id": customer, "name": "llm_completion", "timestamp": 1_764_331_200_000i64,
        "properties": {"tokens": serde_json::Value::Number(tokens.parse().unwrap()), "model": "small"}})
}
