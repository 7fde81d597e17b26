//! The sink's consumer-group member, and the dead-letter producer.
//!
//! Auto-commit is off: offsets are committed only by [`KafkaConsumer::commit`], which the sink calls
//! after ClickHouse confirmed every message below those offsets. A rebalance therefore never commits
//! anything by itself; a partition taken away mid-batch is simply read again by its next owner.
//!
//! A commit is synchronous in librdkafka (it returns once the coordinator answered), so it runs on
//! a blocking thread, never on a runtime thread; the sink awaits each commit before it starts the
//! next, so commits reach the coordinator in order and a later one never goes behind an earlier.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use super::{KafkaConnection, KafkaError};

/// Where a consumed message came from. Its key and payload are copied out of librdkafka's buffers
/// only when parsing it failed (for the dead-letter topic): copying every payload was a tenth of
/// the sink's time.
#[derive(Debug, Clone)]
pub struct Consumed {
    /// Set only when the key and payload are (see [`KafkaConsumer::recv_parsed`]).
    pub topic: String,
    /// Which of the subscribed topics ([`KafkaConsumer::topics`]) it came from.
    pub topic_index: usize,
    pub partition: i32,
    pub offset: i64,
    /// Payload size in bytes.
    pub len: usize,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    /// The [`crate::event::SCHEMA_HEADER`] of the message.
    pub schema: SchemaHeader,
}

/// The schema id a message names, kept without allocating (ids are 16 hex digits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchemaHeader {
    /// Written by a stream of an earlier release: the seed's form, for the seed's table.
    Absent,
    Id([u8; 16]),
    /// Not 16 ASCII characters: no schema can be found by it.
    Malformed,
}

impl SchemaHeader {
    fn of(value: Option<&[u8]>) -> Self {
        match value {
            None => SchemaHeader::Absent,
            Some(v) => match <[u8; 16]>::try_from(v) {
                Ok(id) if id.is_ascii() => SchemaHeader::Id(id),
                _ => SchemaHeader::Malformed,
            },
        }
    }

    /// The id as text, if there is a well-formed one.
    pub fn id(&self) -> Option<&str> {
        match self {
            SchemaHeader::Id(id) => std::str::from_utf8(id).ok(),
            _ => None,
        }
    }
}

pub struct KafkaConsumer {
    consumer: Arc<StreamConsumer>,
    topics: Vec<String>,
}

impl KafkaConsumer {
    /// A member of `group` subscribed to every one of `topics`.
    pub fn new(
        connection: &KafkaConnection,
        group: &str,
        topics: &[String],
    ) -> Result<Self, KafkaError> {
        let consumer: StreamConsumer = connection
            .client_config()
            .set("group.id", group)
            // Only what committed transactions hold (`stream --exactly-once`): an aborted
            // transaction's messages are never stored. (librdkafka's default; said here because
            // the guarantee depends on it.)
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("session.timeout.ms", "10000")
            .set("fetch.wait.max.ms", "50")
            // Bound what librdkafka prefetches, so memory stays flat under any backlog; and once
            // that bound is reached, fetch again as soon as there is room: the default waits a
            // whole second, which left the sink idle two thirds of the time (docs/benchmarks.md).
            .set("queued.max.messages.kbytes", "4096")
            .set("fetch.queue.backoff.ms", "10")
            .create()
            .map_err(KafkaError::client("creating the consumer"))?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&names)
            .map_err(KafkaError::client(format!(
                "subscribing to {}",
                names.join(", ")
            )))?;
        Ok(KafkaConsumer {
            consumer: Arc::new(consumer),
            topics: topics.to_vec(),
        })
    }

    pub fn topics(&self) -> &[String] {
        &self.topics
    }

    /// The next message, parsed by `parse` straight from librdkafka's buffer. Its key and payload
    /// are copied out when parsing failed or `keep` asks for them (a message whose fate is decided
    /// later, which may send it to the dead-letter topic). Cancel-safe.
    pub async fn recv_parsed<T, E>(
        &self,
        parse: impl FnOnce(&[u8]) -> Result<T, E>,
        keep: impl FnOnce(&T) -> bool,
    ) -> Result<(Consumed, Result<T, E>), KafkaError> {
        let m = self
            .consumer
            .recv()
            .await
            .map_err(KafkaError::client(format!(
                "reading {}",
                self.topics.join(", ")
            )))?;
        let payload = m.payload().unwrap_or_default();
        let parsed = parse(payload);
        let failed = parsed.as_ref().map_or(true, keep);
        let schema = SchemaHeader::of(m.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == crate::event::SCHEMA_HEADER)
                .and_then(|h| h.value)
        }));
        let topic_index = self.topics.iter().position(|t| t == m.topic()).unwrap_or(0);
        let consumed = Consumed {
            schema,
            topic_index,
            topic: if failed {
                m.topic().to_string()
            } else {
                String::new()
            },
            partition: m.partition(),
            offset: m.offset(),
            len: payload.len(),
            key: m.key().filter(|_| failed).map(<[u8]>::to_vec),
            payload: if failed { payload.to_vec() } else { Vec::new() },
        };
        Ok((consumed, parsed))
    }

    /// Commits, per (topic index, partition), the offset after the highest message handled, and
    /// waits (off the runtime's threads) until the coordinator answered.
    pub async fn commit(&self, handled: &BTreeMap<(usize, i32), i64>) -> Result<(), KafkaError> {
        if handled.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), offset) in handled {
            let topic = &self.topics[*topic];
            tpl.add_partition_offset(topic, *partition, Offset::Offset(offset + 1))
                .map_err(KafkaError::client("building the offsets to commit"))?;
        }
        let consumer = Arc::clone(&self.consumer);
        tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync))
            .await
            .map_err(|e| KafkaError::Delivery(format!("the offset commit task failed: {e}")))?
            .map_err(KafkaError::client("committing offsets"))
    }
}

/// Where messages the sink cannot use go, with why and where they came from in headers.
pub struct DeadLetters {
    producer: FutureProducer,
    topic: String,
}

impl DeadLetters {
    pub fn new(connection: &KafkaConnection, topic: &str) -> Result<Self, KafkaError> {
        let producer: FutureProducer = connection
            .client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .create()
            .map_err(KafkaError::client("creating the dead-letter producer"))?;
        Ok(DeadLetters {
            producer,
            topic: topic.to_string(),
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Sends the original key, payload and schema header (so that the message can be produced
    /// to its topic again as it was), and waits until Kafka has it.
    pub async fn send(&self, original: &Consumed, error: &str) -> Result<(), KafkaError> {
        let partition = original.partition.to_string();
        let offset = original.offset.to_string();
        let mut headers = OwnedHeaders::new();
        if let Some(id) = original.schema.id() {
            headers = headers.insert(Header {
                key: crate::event::SCHEMA_HEADER,
                value: Some(id),
            });
        }
        let headers = headers
            .insert(Header {
                key: "cdc_relay.error",
                value: Some(error),
            })
            .insert(Header {
                key: "cdc_relay.original_topic",
                value: Some(&original.topic),
            })
            .insert(Header {
                key: "cdc_relay.original_partition",
                value: Some(&partition),
            })
            .insert(Header {
                key: "cdc_relay.original_offset",
                value: Some(&offset),
            });
        let mut record = FutureRecord::to(&self.topic)
            .payload(&original.payload)
            .headers(headers);
        if let Some(k) = &original.key {
            record = record.key(k);
        }
        self.producer
            .send(record, Duration::from_secs(60))
            .await
            .map(|_| ())
            .map_err(|(e, _)| {
                KafkaError::Delivery(format!("dead-letter topic {}: {e}", self.topic))
            })
    }
}
