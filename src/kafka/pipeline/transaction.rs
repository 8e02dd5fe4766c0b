//! One Kafka transaction per commit: the outputs, the changelog records and the input offsets
//! (with the consumer group's metadata, KIP-447), committed together or not at all.

use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use super::clients::Clients;
use super::fold::Commit;
use super::{is_fenced, PipelineError};
use crate::config::Config;
use crate::kafka::{InputTopic, OutputTopic};
use crate::metrics as m;

/// The resolved topic names a transaction writes to.
pub(super) struct TopicNames {
    outputs: Vec<(OutputTopic, String)>,
    usage: String,
    grants: String,
}

impl TopicNames {
    pub(super) fn new(cfg: &Config) -> Self {
        Self {
            outputs: OutputTopic::ALL.iter().map(|t| (*t, t.name(cfg))).collect(),
            usage: InputTopic::Usage.name(&cfg.topics).to_string(),
            grants: InputTopic::Grants.name(&cfg.topics).to_string(),
        }
    }

    fn output(&self, t: OutputTopic) -> &str {
        &self
            .outputs
            .iter()
            .find(|(o, _)| *o == t)
            .expect("every output topic is named")
            .1
    }

    fn input(&self, t: InputTopic) -> &str {
        match t {
            InputTopic::Usage => &self.usage,
            InputTopic::Grants => &self.grants,
        }
    }
}

/// Sends `rec`, waiting for room in the producer's queue.
fn send<'a>(c: &Clients, mut rec: BaseRecord<'a, [u8], [u8]>) -> Result<(), PipelineError> {
    loop {
        match c.producer.send(rec) {
            Ok(()) => return Ok(()),
            Err((
                KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                back,
            )) => {
                rec = back;
                c.producer.poll(Duration::from_millis(10));
            }
            Err((e, _)) => return Err(e.into()),
        }
    }
}

/// Produces `commit`'s records and commits its offsets in one transaction. The output records
/// are taken out of `commit` and each is freed once librdkafka has copied it (at a million
/// customers a batch's outputs were ~90 MB, held twice). Returns the
/// changelog checkpoints (next offset per partition) the store may record once it is committed.
/// On any error the transaction is aborted (if it can be) and nothing of it is visible.
pub(super) fn transact(
    c: &Clients,
    names: &TopicNames,
    commit: &mut Commit,
    timeout: Duration,
) -> Result<Vec<(i32, i64)>, PipelineError> {
    let ctx = c.producer.context();
    ctx.reset();
    c.producer.begin_transaction()?;
    let outputs = std::mem::take(&mut commit.outputs);
    let n_outputs = outputs.len();
    let result = (|| -> Result<(), PipelineError> {
        for o in outputs {
            let mut headers = OwnedHeaders::new_with_capacity(o.headers.len());
            for (k, v) in &o.headers {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v.as_ref()),
                });
            }
            let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(names.output(o.topic))
                .key(o.key.as_slice())
                .headers(headers);
            if let Some(p) = &o.payload {
                rec = rec.payload(p.as_slice());
            }
            send(c, rec)?;
        }
        let changelog = names.output(OutputTopic::Changelog);
        for w in commit.state.iter().filter(|w| w.target.changelog()) {
            let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(changelog)
                .key(w.key.as_slice())
                .partition(w.partition);
            if let Some(v) = &w.value {
                rec = rec.payload(v.as_slice());
            }
            send(c, rec)?;
        }
        // Wait for every delivery report: they carry the changelog offsets.
        let changelog = commit.state.iter().filter(|w| w.target.changelog()).count();
        let want = (n_outputs + changelog) as u64;
        let deadline = Instant::now() + timeout;
        while ctx.delivered() < want {
            if Instant::now() > deadline {
                return Err(PipelineError::Delivery(
                    "timed out waiting for delivery reports".into(),
                ));
            }
            c.producer.poll(Duration::from_millis(5));
        }
        if let Some(f) = ctx.take_failure() {
            return Err(PipelineError::Delivery(f));
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, p), off) in &commit.offsets {
            tpl.add_partition_offset(names.input(*topic), *p, Offset::Offset(*off))?;
        }
        if tpl.count() > 0 {
            let meta = c
                .consumer
                .group_metadata()
                .ok_or_else(|| PipelineError::Delivery("no consumer group metadata".into()))?;
            c.producer
                .send_offsets_to_transaction(&tpl, &meta, Duration::from_secs(30))?;
        }
        c.producer.commit_transaction(Duration::from_secs(60))?;
        Ok(())
    })();
    if let Err(e) = result {
        let reason = match &e {
            PipelineError::Kafka(k) if is_fenced(k) => "fenced",
            _ => "error",
        };
        metrics::counter!(m::TXN_ABORTED, "reason" => reason).increment(1);
        tracing::warn!(error = %e, reason, "aborting the transaction");
        // abort_transaction flushes first, and the delivery reports are served only here.
        let deadline = Instant::now() + timeout;
        while c.producer.in_flight_count() > 0 && Instant::now() < deadline {
            c.producer.poll(Duration::from_millis(10));
        }
        if let Err(abort) = c.producer.abort_transaction(Duration::from_secs(30)) {
            tracing::warn!(error = %abort, "abort_transaction failed");
        }
        return Err(e);
    }
    metrics::counter!(m::TXN_COMMITTED).increment(1);
    Ok(ctx.changelog_checkpoints())
}
