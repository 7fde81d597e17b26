//! The idempotent producer `stream` uses. Every change is keyed by row id, so one row's changes stay
//! in one partition in order; idempotence keeps librdkafka's retries from reordering or doubling them.
//!
//! The size limit follows the topic's `max.message.bytes`: a change too large for the topic is
//! refused here, at once, instead of by the broker after retries, so the stream can send it to its
//! dead-letter topic and go on with the rows behind it.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use crate::event::{schemas_topic, ChangeEvent, StreamDeadLetter, SCHEMA_HEADER};
use crate::types::RelationSchema;

use super::{KafkaConnection, KafkaError, RdKafkaError};

/// Room left under the topic's limit for the record batch's own headers: a message that fits
/// `message.max.bytes` must still fit the broker's check of the whole batch.
const BATCH_OVERHEAD: usize = 512;

pub struct KafkaProducer {
    producer: FutureProducer,
    dead_letter_topic: String,
    limit: usize,
    /// Schemas whose record the schemas topic has (acknowledged), with their ids. A shape is one
    /// `Arc` per relation, so the usual lookup is a pointer comparison, not a hash of the schema.
    published: Mutex<Vec<(Arc<RelationSchema>, String)>>,
}

/// Settings of the stream's producer.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    pub connection: KafkaConnection,
    /// Every topic the producer writes changes to (its size limit is the smallest of theirs).
    pub topics: Vec<String>,
    /// Where changes go that cannot be produced to `topic`.
    pub dead_letter_topic: String,
    /// librdkafka's local queue; kept near the relay's own in-flight bound so memory stays bounded.
    pub queue_messages: usize,
    /// Produce inside Kafka transactions with this `transactional.id` (exactly-once mode).
    pub transactional_id: Option<String>,
}

/// Longest wait for a schema record's acknowledgement: the stream waits for it before the
/// message that names it, and must keep answering the server.
const SCHEMA_TIMEOUT: Duration = Duration::from_secs(20);

/// How long one transaction call may take; a retriable failure is tried once more.
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(20);

/// What became of one message.
pub type DeliveryResult = Result<(), KafkaError>;

impl KafkaProducer {
    pub async fn new(cfg: &ProducerConfig) -> Result<Self, KafkaError> {
        let mut limit = max_message_bytes(&cfg.connection, &cfg.dead_letter_topic).await?;
        for topic in &cfg.topics {
            limit = limit.min(max_message_bytes(&cfg.connection, topic).await?);
        }
        let limit = limit.saturating_sub(BATCH_OVERHEAD).max(1000);
        let mut producer = cfg.connection.client_config();
        producer
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", "lz4")
            .set("linger.ms", "5")
            .set("batch.num.messages", "10000")
            .set("message.max.bytes", limit.to_string())
            .set("batch.size", limit.min(1_000_000).to_string())
            // Deliveries are retried inside librdkafka for this long (a broker restart fits);
            // past it the message fails and the stream restarts from its last confirmed position.
            .set("message.timeout.ms", "120000")
            .set(
                "queue.buffering.max.messages",
                cfg.queue_messages.max(1000).to_string(),
            )
            .set("queue.buffering.max.kbytes", "65536");
        let producer: FutureProducer = match &cfg.transactional_id {
            None => producer.create(),
            Some(id) => producer
                .clone()
                .set("transactional.id", id)
                // Above the delivery timeout (librdkafka requires it) plus a checkpoint and a
                // commit: the broker aborts a transaction open longer, which fences us.
                .set("transaction.timeout.ms", "300000")
                .create(),
        }
        .map_err(KafkaError::client("creating the producer"))?;
        tracing::debug!(limit, "producer message size limit");
        Ok(KafkaProducer {
            producer,
            dead_letter_topic: cfg.dead_letter_topic.clone(),
            limit,
            published: Mutex::new(Vec::new()),
        })
    }

    /// Registers the transactional id with the cluster: fences any earlier producer with the same id
    /// and aborts its open transaction, so none of it ever becomes visible.
    pub async fn init_transactions(&self) -> Result<(), KafkaError> {
        let p = self.producer.clone();
        self.blocking("starting transactions", move || {
            p.init_transactions(Timeout::After(TRANSACTION_TIMEOUT))
        })
        .await
    }

    pub fn begin_transaction(&self) -> Result<(), KafkaError> {
        self.producer
            .begin_transaction()
            .map_err(|e| transaction_error("beginning a transaction", e))
    }

    /// Commits the open transaction (flushing what is still queued first). A retriable failure
    /// (a timeout) is resumed once; if its outcome stays unknown the producer cannot go on safely,
    /// and the error is fatal: a restart resolves it (`init_transactions`) and reads the real
    /// checkpoint. An abortable failure is `Delivery`: abort, and replay.
    pub async fn commit_transaction(&self) -> Result<(), KafkaError> {
        self.resumable("committing a transaction", |p| {
            p.commit_transaction(Timeout::After(TRANSACTION_TIMEOUT))
        })
        .await
    }

    pub async fn abort_transaction(&self) -> Result<(), KafkaError> {
        // A schema record produced in the aborted transaction is gone with it: publish again.
        self.lock_published().clear();
        self.resumable("aborting a transaction", |p| {
            p.abort_transaction(Timeout::After(TRANSACTION_TIMEOUT))
        })
        .await
    }

    async fn resumable(
        &self,
        what: &'static str,
        call: fn(&FutureProducer) -> Result<(), RdKafkaError>,
    ) -> Result<(), KafkaError> {
        let mut last = None;
        for _ in 0..2 {
            let p = self.producer.clone();
            let r = tokio::task::spawn_blocking(move || call(&p))
                .await
                .map_err(|e| KafkaError::Delivery(format!("{what}: {e}")))?;
            match r {
                Ok(()) => return Ok(()),
                Err(RdKafkaError::Transaction(t)) if t.is_retriable() => {
                    last = Some(t.to_string());
                }
                Err(e) => return Err(transaction_error(what, e)),
            }
        }
        Err(KafkaError::Fatal(format!(
            "{what}: its outcome is unknown ({}); restart the stream, which settles it and resumes from the last committed checkpoint",
            last.unwrap_or_default()
        )))
    }

    /// librdkafka's fatal error, if the producer has one (fenced by a newer producer with the same
    /// transactional id): nothing it produces can succeed any more.
    pub fn fatal_error(&self) -> Option<KafkaError> {
        self.producer
            .client()
            .fatal_error()
            .map(|(code, reason)| fatal(code, reason))
    }

    async fn blocking<F>(&self, what: &'static str, f: F) -> Result<(), KafkaError>
    where
        F: FnOnce() -> Result<(), RdKafkaError> + Send + 'static,
    {
        match tokio::task::spawn_blocking(f).await {
            Ok(r) => r.map_err(|e| transaction_error(what, e)),
            Err(e) => Err(KafkaError::Delivery(format!("{what}: {e}"))),
        }
    }

    /// Produces one record to `topic` and waits for its acknowledgement.
    pub async fn send_and_wait(
        &self,
        topic: &str,
        key: &str,
        payload: Vec<u8>,
    ) -> Result<(), KafkaError> {
        let (ack, _) = self.send_bytes(topic, Some(key), payload).await?;
        ack.await
    }

    /// Largest message this producer sends.
    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn dead_letter_topic(&self) -> &str {
        &self.dead_letter_topic
    }

    /// Enqueues one event and returns the future of its acknowledgement and the payload size.
    /// Waits (without blocking the runtime) while librdkafka's local queue is full.
    /// [`KafkaError::TooLarge`] when the event does not fit the topic.
    pub async fn send(
        &self,
        event: &ChangeEvent,
        topic: &str,
    ) -> Result<(impl Future<Output = DeliveryResult> + Send + 'static, usize), KafkaError> {
        let schema_id = match &event.schema {
            Some(schema) => Some(self.publish_schema(schema, topic).await?),
            None => None,
        };
        let payload = event.to_json();
        let key = event.key();
        self.send_record(topic, key.as_deref(), payload, schema_id.as_deref())
            .await
    }

    fn lock_published(&self) -> std::sync::MutexGuard<'_, Vec<(Arc<RelationSchema>, String)>> {
        self.published.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The schema's id, once its record is in the schemas topic: a consumer that reads a message
    /// naming the id can always find the record (docs/message-format.md).
    async fn publish_schema(
        &self,
        schema: &Arc<RelationSchema>,
        topic: &str,
    ) -> Result<String, KafkaError> {
        if let Some((_, id)) = self
            .lock_published()
            .iter()
            .find(|(s, _)| Arc::ptr_eq(s, schema))
        {
            return Ok(id.clone());
        }
        let id = schema.id();
        if !self.lock_published().iter().any(|(_, known)| *known == id) {
            let record = serde_json::to_vec(schema.as_ref()).unwrap_or_default();
            let schemas = schemas_topic(topic);
            let send = self.send_and_wait(&schemas, &id, record);
            match tokio::time::timeout(SCHEMA_TIMEOUT, send).await {
                Ok(r) => r?,
                Err(_) => {
                    return Err(KafkaError::Delivery(format!(
                        "the schema record {id} was not acknowledged within {SCHEMA_TIMEOUT:?}"
                    )))
                }
            }
            tracing::info!(table = %schema.qualified_name(), schema_id = %id, columns = schema.columns.len(), "schema published");
        }
        self.lock_published().push((schema.clone(), id.clone()));
        Ok(id)
    }

    /// Enqueues a dead letter for the stream's dead-letter topic, its row cut to fit.
    pub async fn send_dead_letter(
        &self,
        dead: &StreamDeadLetter,
    ) -> Result<(impl Future<Output = DeliveryResult> + Send + 'static, usize), KafkaError> {
        let payload = dead.to_json(self.limit.saturating_sub(64));
        let key = dead
            .id
            .map(|id| id.to_string())
            .or_else(|| dead.key.clone());
        self.send_bytes(&self.dead_letter_topic, key.as_deref(), payload)
            .await
    }

    pub(crate) async fn send_bytes(
        &self,
        topic: &str,
        key: Option<&str>,
        payload: Vec<u8>,
    ) -> Result<(impl Future<Output = DeliveryResult> + Send + 'static, usize), KafkaError> {
        self.send_record(topic, key, payload, None).await
    }

    async fn send_record(
        &self,
        topic: &str,
        key: Option<&str>,
        payload: Vec<u8>,
        schema_id: Option<&str>,
    ) -> Result<(impl Future<Output = DeliveryResult> + Send + 'static, usize), KafkaError> {
        let size = payload.len() + key.map_or(0, str::len);
        if size > self.limit {
            return Err(KafkaError::TooLarge {
                topic: topic.to_string(),
                size,
                limit: self.limit,
            });
        }
        loop {
            let mut record = FutureRecord::to(topic).payload(&payload);
            if let Some(k) = key {
                record = record.key(k);
            }
            if let Some(id) = schema_id {
                record = record.headers(OwnedHeaders::new().insert(Header {
                    key: SCHEMA_HEADER,
                    value: Some(id),
                }));
            }
            match self.producer.send_result(record) {
                Ok(delivery) => {
                    let ack = async move {
                        match delivery.await {
                            Ok(Ok(_)) => Ok(()),
                            Ok(Err((e, _))) => Err(KafkaError::Delivery(e.to_string())),
                            Err(_) => Err(KafkaError::Delivery("producer dropped".into())),
                        }
                    };
                    return Ok((ack, payload.len()));
                }
                Err((RdKafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((
                    RdKafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
                    _,
                )) => {
                    return Err(KafkaError::TooLarge {
                        topic: topic.to_string(),
                        size,
                        limit: self.limit,
                    })
                }
                Err((e, _)) => {
                    return Err(KafkaError::Client {
                        context: format!("producing to {topic}"),
                        source: e,
                    })
                }
            }
        }
    }
}

fn fatal(code: RDKafkaErrorCode, reason: String) -> KafkaError {
    KafkaError::Fatal(format!(
        "{reason} ({code}). If another `cdc-relay stream --exactly-once` with the same slot took over (it fences this one), this one must stop"
    ))
}

/// A transaction call's error: fatal ones (fenced) end the stream, the others end the session,
/// which aborts the transaction and replays from the last checkpoint.
fn transaction_error(what: &str, e: RdKafkaError) -> KafkaError {
    match &e {
        RdKafkaError::Transaction(t) if t.is_fatal() => {
            fatal(t.code(), format!("{what}: {}", t.string()))
        }
        _ => KafkaError::Delivery(format!("{what}: {e}")),
    }
}

/// The topic's `max.message.bytes` (its own setting or the broker's default).
async fn max_message_bytes(connection: &KafkaConnection, topic: &str) -> Result<usize, KafkaError> {
    let admin: AdminClient<DefaultClientContext> = connection
        .client_config()
        .create()
        .map_err(KafkaError::client("creating the admin client"))?;
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], &opts)
        .await
        .map_err(KafkaError::client(format!(
            "reading the settings of topic {topic}"
        )))?;
    for result in results {
        let resource = result.map_err(|code| KafkaError::Topic {
            topic: topic.to_string(),
            reason: format!("its settings cannot be read: {code}"),
        })?;
        if let Some(v) = resource
            .get("max.message.bytes")
            .and_then(|e| e.value.as_deref())
            .and_then(|v| v.parse::<usize>().ok())
        {
            return Ok(v);
        }
    }
    Err(KafkaError::Topic {
        topic: topic.to_string(),
        reason: "its max.message.bytes could not be read".into(),
    })
}
