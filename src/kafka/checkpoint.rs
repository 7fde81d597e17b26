//! The checkpoint topic of `stream --exactly-once`: a compacted topic where each Kafka transaction
//! of the stream also writes how far its committed output reaches ([`StreamCheckpoint`]), keyed by
//! the transactional id. A restarted stream reads the last one back, as a `read_committed`
//! consumer sees it, and drops every replayed change at or below it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError as RdError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::event::StreamCheckpoint;

use super::{KafkaConnection, KafkaError};

/// The last committed checkpoint for `key`, or `None` if there is none. Blocking: call it off the
/// runtime. Only after the transactional producer was initialised, which aborts a predecessor's
/// open transaction: until then a `read_committed` reader cannot read past it.
pub fn read_last(
    connection: &KafkaConnection,
    topic: &str,
    key: &str,
) -> Result<Option<StreamCheckpoint>, KafkaError> {
    let mut last = read_latest(connection, topic, |k| k == key.as_bytes())?;
    let Some((offset, payload)) = last.remove(key.as_bytes()) else {
        return Ok(None);
    };
    StreamCheckpoint::from_json(&payload)
        .map(Some)
        .map_err(|e| KafkaError::Topic {
            topic: topic.to_string(),
            reason: format!("checkpoint at offset {offset} is not valid: {e}"),
        })
}

/// Each key's newest committed value, with its offset.
pub type Latest = HashMap<Vec<u8>, (i64, Vec<u8>)>;

/// The newest committed value (and its offset) of every key `wanted` accepts, as a
/// `read_committed` consumer reads the topic's one partition to its end. Blocking.
pub fn read_latest(
    connection: &KafkaConnection,
    topic: &str,
    wanted: impl Fn(&[u8]) -> bool,
) -> Result<Latest, KafkaError> {
    let consumer: BaseConsumer = connection
        .client_config()
        .set("group.id", format!("{topic}.checkpoint-reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create()
        .map_err(KafkaError::client("creating the checkpoint reader"))?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .map_err(KafkaError::client("assigning the checkpoint topic"))?;
    consumer
        .assign(&tpl)
        .map_err(KafkaError::client("assigning the checkpoint topic"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = HashMap::new();
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(500)) {
            None => {}
            Some(Err(RdError::PartitionEOF(_))) => return Ok(last),
            Some(Err(e)) if super::is_transient(&e) => {}
            Some(Err(e)) => {
                return Err(KafkaError::Client {
                    context: format!("reading checkpoint topic {topic}"),
                    source: e,
                })
            }
            Some(Ok(m)) if m.key().is_some_and(&wanted) => {
                let payload = m.payload().unwrap_or_default().to_vec();
                last.insert(m.key().unwrap_or_default().to_vec(), (m.offset(), payload));
            }
            Some(Ok(_)) => {}
        }
    }
    Err(KafkaError::Topic {
        topic: topic.to_string(),
        reason: "its end could not be reached within 60 s (is a transaction still open?)".into(),
    })
}
