//! The API's producer: top-up requests made through the API (the portal's "Top up" button, or a
//! service with an API key). Automatic top-ups are not produced here: the pipeline produces them
//! in its transaction, with the change that crossed the threshold.
//!
//! Not transactional: a request is one record with nothing to be atomic with. It is idempotent
//! per `request_id` downstream (the billing system dedupes on it and grants with
//! `grant_id = request_id`), so a retried click or a redelivery is harmless.
//!
//! The same producer hands the API's reservation commands to the pipeline on `credit-grants`
//! (idempotent per `reservation_id`: a repeated command changes nothing).

use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use tokio::sync::oneshot;

use crate::codec;
use crate::config::{Config, OutputFormat};
use crate::ledger::TopUpRequested;

/// Hands each delivery report to the request waiting for it.
struct Ctx;

impl ClientContext for Ctx {}

impl ProducerContext for Ctx {
    type DeliveryOpaque = Box<oneshot::Sender<Result<(), String>>>;

    fn delivery(&self, result: &DeliveryResult<'_>, tx: Self::DeliveryOpaque) {
        let _ = tx.send(result.as_ref().map(|_| ()).map_err(|(e, _)| e.to_string()));
    }
}

/// Why a request was not published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The record could not be queued or was not acknowledged.
    #[error("publishing the top-up request failed: {0}")]
    Kafka(String),
    /// No acknowledgement in time.
    #[error("publishing the top-up request timed out")]
    Timeout,
}

/// Publishes [`TopUpRequested`] records to `topics.top_up_requests`, and the API's reservation
/// commands to `topics.grants`.
pub struct ApiPublisher {
    producer: ThreadedProducer<Ctx>,
    topic: String,
    commands: String,
    format: OutputFormat,
}

impl ApiPublisher {
    /// An idempotent producer for the configured topic (keyed by customer, murmur2).
    pub fn new(cfg: &Config) -> Result<Self, KafkaError> {
        let producer = super::client_config(&cfg.kafka)
            .set("enable.idempotence", "true")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "0")
            .set("message.timeout.ms", "10000")
            .create_with_context(Ctx)?;
        Ok(Self {
            producer,
            topic: cfg.topics.top_up_requests.clone(),
            commands: cfg.topics.grants.clone(),
            format: cfg.pipeline.output_format,
        })
    }

    /// Publishes `t` and waits for the broker's acknowledgement.
    pub async fn publish(&self, t: &TopUpRequested) -> Result<(), PublishError> {
        let payload = codec::encode_top_up(t, self.format);
        let mut headers = OwnedHeaders::new_with_capacity(2);
        for (key, value) in codec::top_up_headers(t, self.format) {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_str()),
            });
        }
        self.send(&self.topic, t.customer_id.as_str(), &payload, headers)
            .await
    }

    /// Publishes a JSON credit command (a reservation's `reserve` or `release`) on
    /// `credit-grants`, keyed by `customer`, as any producer may, and waits for the broker's
    /// acknowledgement. The pipeline folds it like any other.
    pub async fn command(&self, customer: &str, json: &[u8]) -> Result<(), PublishError> {
        self.send(&self.commands, customer, json, OwnedHeaders::new())
            .await
    }

    async fn send(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: OwnedHeaders,
    ) -> Result<(), PublishError> {
        let (tx, rx) = oneshot::channel();
        let record = BaseRecord::with_opaque_to(topic, Box::new(tx))
            .key(key)
            .payload(payload)
            .headers(headers);
        self.producer
            .send(record)
            .map_err(|(e, _)| PublishError::Kafka(e.to_string()))?;
        match tokio::time::timeout(Duration::from_secs(15), rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(PublishError::Kafka(e)),
            Ok(Err(_)) => Err(PublishError::Kafka("producer closed".into())),
            Err(_) => Err(PublishError::Timeout),
        }
    }
}
