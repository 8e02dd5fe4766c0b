//! The seed corpora (`corpus/<target>/seed-*`), written from here so they stay valid as the
//! formats change, and a run of every target over every committed corpus file.
//!
//! `DRAWDOWN_FUZZ_WRITE_SEEDS=1 cargo test --manifest-path fuzz/Cargo.toml` rewrites the seeds;
//! without it, the test fails when a committed seed differs from what this file makes.

use std::path::{Path, PathBuf};

use drawdown::codec::pb;
use drawdown::credentials::{PortalClaims, PortalSigner};
use drawdown::ledger::CustomerId;
use prost::Message;

use crate::token::{NOW, SECRET};

/// A target's name and the function it runs.
type Target = (&'static str, fn(&[u8]));

/// A target's seeds: (name, bytes).
type Seeds = Vec<(&'static str, Vec<u8>)>;

/// The targets, with the function each runs.
const TARGETS: [Target; 6] = [
    ("decode_usage", crate::decode::run_usage),
    ("decode_command", crate::decode::run_command),
    ("portal_token", crate::token::run),
    ("history_cursor", crate::cursor::run),
    ("config", crate::config::run),
    ("ledger", crate::ledger::run),
];

/// Selectors of `decode::content_type` and `decode::key`.
const NO_TYPE: u8 = 0;
const JSON: u8 = 1;
const PROTOBUF: u8 = 2;
const NO_KEY: u8 = 0;
const KEY: u8 = 2;

fn record(ct: u8, key: u8, payload: &[u8]) -> Vec<u8> {
    [&[ct, key][..], payload].concat()
}

fn usage_seeds() -> Seeds {
    let pb_usage = pb::UsageEvent {
        id: "evt_2".into(),
        customer_id: "cus_1".into(),
        name: "llm_completion".into(),
        timestamp_ms: 1_767_225_600_000,
        properties: [("tokens".to_string(), "1250".to_string())].into(),
        reservation_id: "job_9".into(),
    };
    vec![
        ("json", record(NO_TYPE, KEY, br#"{"id": "evt_1", "customer_id": "cus_1", "name": "llm_completion", "timestamp": "2026-11-28T12:00:00Z", "properties": {"tokens": 1250, "model": "small"}}"#)),
        ("json-ms-settles", record(JSON, NO_KEY, br#"{"id":"evt_3","customer_id":"cus_1","name":"api_call","timestamp":1767225600000,"properties":{"units":0.25,"ok":true,"none":null},"reservation_id":"job_9"}"#)),
        ("json-escapes", record(JSON, KEY, br#"{"id":"e\u0031","customer_id":"cus_1","name":"n\"x","properties":{}, "id":"e2"}"#)),
        ("protobuf", record(PROTOBUF, KEY, &pb_usage.encode_to_vec())),
    ]
}

fn command_seeds() -> Seeds {
    use pb::credit_command::Command;
    let pb_cmd = |c: Command| pb::CreditCommand { command: Some(c) }.encode_to_vec();
    let grant = pb::Grant {
        grant_id: "gr_2".into(),
        customer_id: "cus_1".into(),
        meter: "tokens".into(),
        amount: "1000.5".into(),
        kind: pb::GrantKind::Cycle as i32,
        priority: 1,
        effective_at_ms: 1_767_225_600_000,
        expires_at_ms: 1_769_904_000_000,
        subscription_id: "sub_1".into(),
        rollover: "100".into(),
    };
    vec![
        ("json-grant", record(NO_TYPE, KEY, br#"{"type": "grant", "grant_id": "gr_1", "customer_id": "cus_1", "meter": "tokens", "amount": "100000", "kind": "top_up", "priority": 10, "expires_at": "2027-01-01T00:00:00Z"}"#)),
        ("json-cycle", record(JSON, NO_KEY, br#"{"type":"grant","grant_id":"gr_c","customer_id":"cus_1","meter":"api","amount":500.25,"kind":"cycle","subscription_id":"sub_1","rollover":"50","effective_at":1767225600000}"#)),
        ("json-void-grant", record(JSON, KEY, br#"{"type":"void_grant","customer_id":"cus_1","grant_id":"gr_1"}"#)),
        ("json-void-usage", record(JSON, KEY, br#"{"type": "void_usage", "customer_id": "cus_1", "event_id": "evt_1"}"#)),
        ("json-reserve", record(JSON, KEY, br#"{"type": "reserve", "reservation_id": "job_9", "customer_id": "cus_1", "meter": "tokens", "units": "4000", "ttl": "10m"}"#)),
        ("json-reserve-secs", record(JSON, KEY, br#"{"type":"reserve","reservation_id":"job_8","customer_id":"cus_1","meter":"api","units":3,"ttl":90}"#)),
        ("json-release", record(JSON, KEY, br#"{"type":"release","reservation_id":"job_9","customer_id":"cus_1"}"#)),
        ("protobuf-grant", record(PROTOBUF, KEY, &pb_cmd(Command::Grant(grant)))),
        ("protobuf-void-grant", record(PROTOBUF, KEY, &pb_cmd(Command::VoidGrant(pb::VoidGrant { customer_id: "cus_1".into(), grant_id: "gr_2".into() })))),
        ("protobuf-void-usage", record(PROTOBUF, NO_KEY, &pb_cmd(Command::VoidUsage(pb::VoidUsage { customer_id: "cus_1".into(), event_id: "evt_2".into() })))),
        ("protobuf-reserve", record(PROTOBUF, KEY, &pb_cmd(Command::Reserve(pb::Reserve { reservation_id: "job_7".into(), customer_id: "cus_1".into(), meter: "tokens".into(), units: "12.5".into(), ttl_ms: 600_000 })))),
        ("protobuf-release", record(PROTOBUF, KEY, &pb_cmd(Command::Release(pb::Release { customer_id: "cus_1".into(), reservation_id: "job_7".into() })))),
    ]
}

fn token_seeds() -> Seeds {
    let signer = PortalSigner::new(SECRET);
    let token = |customer: &str, expires_at| {
        let claims = PortalClaims {
            customer: CustomerId::parse(customer).unwrap(),
            expires_at,
        };
        [&[0u8][..], signer.sign(&claims).as_bytes()].concat()
    };
    vec![
        ("valid", token("cus_1", NOW + 3_600_000)),
        ("expired", token("cus_1", NOW)),
        ("unicode", token("kund_ä_\u{1F600}", i64::MAX)),
        ("junk", b"\0ddp1.e30.AAAA".to_vec()),
        (
            "sign",
            [
                &[1u8][..],
                b"cus_1\x05\x00\x00\x00\x00\x00\x00\x00\x09\x00\x00",
            ]
            .concat(),
        ),
    ]
}

fn cursor_seeds() -> Seeds {
    [
        "0",
        "42",
        "+007",
        "18446744073709551615",
        "18446744073709551616",
        "-1",
    ]
    .iter()
    .enumerate()
    .map(|(i, c)| {
        (
            ["zero", "small", "plus", "max", "max-plus-1", "negative"][i],
            c.as_bytes().to_vec(),
        )
    })
    .collect()
}

fn config_seeds() -> Seeds {
    let sample = std::fs::read(root().join("../config/drawdown.toml")).expect("the sample config");
    let env = b"\0DRAWDOWN__KAFKA__PARTITIONS=4\nDRAWDOWN__KAFKA__INSTANCE_ID=7\nDRAWDOWN__API__KEYS=[{ name = \"billing\", sha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\" }]\nDRAWDOWN__PIPELINE__GRACE=1m\nPATH=/usr/bin\n";
    vec![
        ("sample", sample.clone()),
        ("sample-env", [&sample[..], env].concat()),
        ("empty-env", env.to_vec()),
        ("meter", b"[[meters]]\nname = \"m\"\nevent = \"e\"\naggregation = { type = \"sum\", property = \"p\" }\non_exhausted = \"block\"\nlow_balance = [{ fraction = \"0.5\" }]\nforecast_alert = \"1h\"\n".to_vec()),
    ]
}

/// Deterministic bytes (xorshift): the ledger driver reads them as ops.
fn ledger_seeds() -> Seeds {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut bytes = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    vec![
        ("short", bytes(64)),
        ("medium", bytes(512)),
        ("long", bytes(2048)),
        ("longer", bytes(4096)),
    ]
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn seeds() -> Vec<(&'static str, Seeds)> {
    vec![
        ("decode_usage", usage_seeds()),
        ("decode_command", command_seeds()),
        ("portal_token", token_seeds()),
        ("history_cursor", cursor_seeds()),
        ("config", config_seeds()),
        ("ledger", ledger_seeds()),
    ]
}

#[test]
fn seeds_are_current() {
    let write = std::env::var_os("DRAWDOWN_FUZZ_WRITE_SEEDS").is_some();
    for (target, files) in seeds() {
        let dir = root().join("corpus").join(target);
        for (name, bytes) in files {
            let path = dir.join(format!("seed-{name}"));
            if write {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &bytes).unwrap();
            } else {
                let committed = std::fs::read(&path).unwrap_or_else(|e| {
                    panic!("{}: {e} (DRAWDOWN_FUZZ_WRITE_SEEDS=1)", path.display())
                });
                assert!(
                    committed == bytes,
                    "{} is stale (DRAWDOWN_FUZZ_WRITE_SEEDS=1)",
                    path.display()
                );
            }
        }
    }
}

fn corpus_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    files
}

#[test]
fn every_target_passes_its_seeds_and_corpus() {
    let made = seeds();
    for (target, run) in TARGETS {
        for (_, bytes) in &made.iter().find(|(t, _)| *t == target).unwrap().1 {
            run(bytes);
        }
        for f in corpus_files(&root().join("corpus").join(target)) {
            run(&std::fs::read(&f).unwrap());
        }
    }
}

#[test]
fn the_seeds_decode() {
    use drawdown::codec::{decode_command, decode_usage};
    for (name, bytes) in usage_seeds() {
        let ct = crate::decode::content_type(bytes[0]);
        let key = crate::decode::key(bytes[1]);
        assert!(
            decode_usage(Some(&bytes[2..]), ct, key).is_ok(),
            "usage seed {name}"
        );
    }
    for (name, bytes) in command_seeds() {
        let ct = crate::decode::content_type(bytes[0]);
        let key = crate::decode::key(bytes[1]);
        assert!(
            decode_command(Some(&bytes[2..]), ct, key).is_ok(),
            "command seed {name}"
        );
    }
    let sample = std::fs::read_to_string(root().join("../config/drawdown.toml")).unwrap();
    assert!(drawdown::config::Config::from_text(&sample, []).is_ok());
}
