//! The sink's side of the schemas topic (`<topic>.schemas`, [`crate::event::schemas_topic`]): a
//! compacted topic of [`RelationSchema`] records keyed by schema id, which the stream writes (and
//! waits for) before the first message that names the id in its [`crate::event::SCHEMA_HEADER`].
//!
//! Read by a plain assigned consumer (no group, nothing committed) from the beginning. A message
//! naming an id not read yet makes the reader read on to the end, and then wait a bounded time:
//! the record is always written first, so an id still unknown then means the record is gone (the
//! schemas topic deleted, or its records removed) and the message goes to the dead-letter topic.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::event::schemas_topic;
use crate::types::RelationSchema;

use super::{KafkaConnection, KafkaError};

/// The schemas of one data topic, by id.
pub struct SchemaRegistry {
    topic: String,
    consumer: Arc<BaseConsumer>,
    schemas: HashMap<String, Arc<RelationSchema>>,
    /// Ids in the order their records came, so a table's schemas can be given oldest first.
    order: Vec<String>,
    /// Ids waited for in vain: the next message naming one only reads to the end, no waiting.
    missing: HashSet<String>,
}

impl SchemaRegistry {
    /// A reader of `data_topic`'s schemas topic. Reads nothing yet ([`Self::read_to_end`]).
    pub fn new(connection: &KafkaConnection, data_topic: &str) -> Result<Self, KafkaError> {
        let topic = schemas_topic(data_topic);
        let consumer: BaseConsumer = connection
            .client_config()
            .set("group.id", "cdc-relay.schemas-reader")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // A record of an aborted transaction still describes its schema truly.
            .set("isolation.level", "read_uncommitted")
            .create()
            .map_err(KafkaError::client("creating the schemas reader"))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Beginning)
            .map_err(KafkaError::client(format!("assigning {topic}")))?;
        consumer
            .assign(&tpl)
            .map_err(KafkaError::client(format!("assigning {topic}")))?;
        Ok(SchemaRegistry {
            topic,
            consumer: Arc::new(consumer),
            schemas: HashMap::new(),
            order: Vec::new(),
            missing: HashSet::new(),
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    pub fn get(&self, id: &str) -> Option<&Arc<RelationSchema>> {
        self.schemas.get(id)
    }

    /// Every known schema of `rel`'s table, oldest record first.
    pub fn history(&self, rel: &RelationSchema) -> Vec<Arc<RelationSchema>> {
        self.order
            .iter()
            .filter_map(|id| self.schemas.get(id))
            .filter(|s| s.schema == rel.schema && s.table == rel.table)
            .cloned()
            .collect()
    }

    /// Reads every record written so far (off the runtime's threads); `false` if Kafka could not
    /// say where the topic ends (it is unreachable, or the topic does not exist).
    pub async fn read_to_end(&mut self) -> bool {
        let (consumer, topic) = (Arc::clone(&self.consumer), self.topic.clone());
        let records = tokio::task::spawn_blocking(move || read_until_end(&consumer, &topic))
            .await
            .ok()
            .flatten();
        let Some(records) = records else {
            return false;
        };
        for (id, rel) in records {
            if !self.schemas.contains_key(&id) {
                self.order.push(id.clone());
            }
            self.missing.remove(&id);
            self.schemas.insert(id, Arc::new(rel));
        }
        true
    }

    /// The schema `id`, reading on for up to `wait` if it is not known yet (once per id: an id
    /// that was not found is looked for again only to the topic's current end).
    pub async fn find(&mut self, id: &str, wait: Duration) -> Option<Arc<RelationSchema>> {
        if let Some(s) = self.schemas.get(id) {
            return Some(Arc::clone(s));
        }
        let mut deadline = Instant::now() + wait;
        loop {
            if !self.read_to_end().await {
                // Not "absent" while Kafka cannot be asked: the sink cannot go on without it
                // anyway, and a valid row must not go to the dead-letter topic over a blip.
                tracing::warn!(topic = %self.topic, schema_id = id, "the schemas topic cannot be read; retrying");
                deadline = Instant::now() + wait;
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            if let Some(s) = self.schemas.get(id) {
                return Some(Arc::clone(s));
            }
            if self.missing.contains(id) || Instant::now() >= deadline {
                self.missing.insert(id.to_string());
                return None;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// The records from the consumer's position to the partition's current end. A missing topic has
/// none (the stream of an earlier release writes no schemas).
fn read_until_end(consumer: &BaseConsumer, topic: &str) -> Option<Vec<(String, RelationSchema)>> {
    let mut out = Vec::new();
    let high = match consumer.fetch_watermarks(topic, 0, Duration::from_secs(5)) {
        Ok((_, high)) => high,
        // A missing topic holds no records (the stream of an earlier release writes none).
        Err(e)
            if e.rdkafka_error_code()
                == Some(rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition) =>
        {
            return Some(out)
        }
        Err(_) => return None,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut idle = 0;
    while Instant::now() < deadline {
        let position = consumer
            .position()
            .ok()
            .and_then(|tpl| tpl.find_partition(topic, 0).map(|p| p.offset()));
        let at = match position {
            Some(Offset::Offset(o)) => o,
            _ => 0,
        };
        // A transaction's closing marker takes an offset no message is delivered for: a reader at
        // the last one is at the end once nothing comes.
        if at >= high || (idle >= 2 && at + 1 >= high) {
            break;
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                idle = 0;
                let (Some(key), Some(value)) = (m.key(), m.payload()) else {
                    continue; // a tombstone: the record was removed on purpose
                };
                match serde_json::from_slice::<RelationSchema>(value) {
                    Ok(rel) => out.push((String::from_utf8_lossy(key).into_owned(), rel)),
                    Err(e) => {
                        tracing::warn!(topic, offset = m.offset(), error = %e, "skipping a schema record that is not a valid schema")
                    }
                }
            }
            Some(Err(e)) => {
                idle += 1;
                tracing::debug!(topic, error = %e, "reading the schemas topic");
            }
            None => idle += 1,
        }
    }
    Some(out)
}
