//! Topic creation. Brokers may run with `auto.create.topics.enable=false` (ours do), so the relay
//! creates what it needs explicitly and checks what exists.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::Consumer;
use rdkafka::types::RDKafkaErrorCode;

use super::{KafkaError, RdKafkaError};

/// The replication factor of a topic the relay creates, unless told otherwise: three copies where
/// the cluster has three live brokers, as many as there are on a smaller one; but never fewer than
/// the brokers' own `default.replication.factor`. A broker down when the topic is created leaves
/// fewer live brokers than the cluster has: counting them would make the topic 2 copies (and
/// `min.insync.replicas` 1) for good, while a KRaft controller places the third replica on the
/// stopped broker, which catches up once back (an older controller refuses, and the creation is
/// tried again).
pub fn auto_replication(live_brokers: usize, broker_default: Option<i32>) -> i32 {
    (live_brokers.clamp(1, 3) as i32).max(broker_default.unwrap_or(1))
}

/// `min.insync.replicas` of a topic the relay creates with `replication` copies: with three or
/// more, 2, so a write acknowledged by `acks=all` is on two brokers and survives the loss of any
/// one while the topic stays writable with one broker down. With 2 copies (a 3-broker cluster with
/// one broker down when the topic is created), 1: a broker default of 2 would stop every write as
/// soon as one of the two is down. With one, the broker's default.
pub fn min_insync_replicas(replication: i32) -> Option<i32> {
    match replication {
        i32::MIN..=1 => None,
        2 => Some(1),
        _ => Some(2),
    }
}

/// Creates `topic` with `partitions` partitions if it does not exist; returns its partition count.
/// `replication` `None` is [`auto_replication`] of the brokers in the cluster metadata.
pub async fn ensure_topic(
    base: &ClientConfig,
    topic: &str,
    partitions: i32,
    replication: Option<i32>,
) -> Result<usize, KafkaError> {
    ensure_topic_with(base, topic, partitions, replication, &[]).await
}

/// [`ensure_topic`] with topic settings (e.g. `cleanup.policy=compact`) for a topic it creates.
pub async fn ensure_topic_with(
    base: &ClientConfig,
    topic: &str,
    partitions: i32,
    replication: Option<i32>,
    settings: &[(&str, &str)],
) -> Result<usize, KafkaError> {
    let admin: AdminClient<DefaultClientContext> = base
        .create()
        .map_err(KafkaError::client("creating the admin client"))?;
    let auto = replication.is_none();
    let replication = match replication {
        Some(r) => r,
        None => {
            let md = metadata(base, topic)?;
            if md.topic_exists {
                // Nothing to create: no need to ask a broker for its defaults.
                return partition_count(base, topic).await;
            }
            auto_replication(
                md.live_brokers,
                default_replication(&admin, md.a_broker).await,
            )
        }
    };
    let mut new = NewTopic::new(topic, partitions, TopicReplication::Fixed(replication));
    for (k, v) in settings {
        new = new.set(k, v);
    }
    let min_isr = min_insync_replicas(replication).map(|n| n.to_string());
    if let Some(n) = &min_isr {
        if !settings.iter().any(|(k, _)| *k == "min.insync.replicas") {
            new = new.set("min.insync.replicas", n);
        }
    }
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics([&new], &opts)
        .await
        .map_err(KafkaError::client(format!("creating topic {topic}")))?;
    for r in results {
        match r {
            Ok(_) => {
                tracing::info!(topic, partitions, replication, min_insync_replicas = ?min_isr, "created Kafka topic")
            }
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            // The controller did not answer in time (a broker restarting): worth another try.
            // More replicas than live brokers, though the count came from the metadata a moment
            // ago: a broker stopping or restarting in between. Another try counts again.
            Err((t, RDKafkaErrorCode::InvalidReplicationFactor)) if auto => {
                return Err(KafkaError::TopicNotYet {
                    topic: t,
                    reason: format!(
                        "{replication} replicas are more than the live brokers (one down or restarting?); waiting for it rather than making the topic with fewer copies"
                    ),
                })
            }
            Err((t, code)) if super::is_transient(&RdKafkaError::AdminOp(code)) => {
                return Err(KafkaError::Client {
                    context: format!("creating topic {t}"),
                    source: RdKafkaError::AdminOp(code),
                })
            }
            Err((t, code)) => {
                return Err(KafkaError::Topic {
                    topic: t,
                    reason: format!("cannot be created: {code}"),
                })
            }
        }
    }
    partition_count(base, topic).await
}

/// What the cluster metadata says before a topic is created.
struct TopicMetadata {
    live_brokers: usize,
    /// One live broker's id, to ask for the brokers' defaults.
    a_broker: Option<i32>,
    topic_exists: bool,
}

/// The cluster metadata, asked along with `topic`'s to keep the answer small (a consumer never
/// creates the topic by asking).
/// Whether `topic` exists (a metadata request; blocking).
pub fn topic_exists(base: &ClientConfig, topic: &str) -> Result<bool, KafkaError> {
    Ok(metadata(base, topic)?.topic_exists)
}

fn metadata(base: &ClientConfig, topic: &str) -> Result<TopicMetadata, KafkaError> {
    let consumer: rdkafka::consumer::BaseConsumer = base
        .create()
        .map_err(KafkaError::client("creating a metadata client"))?;
    let md = tokio::task::block_in_place(|| {
        consumer.fetch_metadata(Some(topic), Duration::from_secs(10))
    })
    .map_err(KafkaError::client("reading the cluster metadata"))?;
    Ok(TopicMetadata {
        live_brokers: md.brokers().len(),
        a_broker: md.brokers().first().map(|b| b.id()),
        topic_exists: md
            .topics()
            .iter()
            .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty()),
    })
}

/// The broker's `default.replication.factor`, or `None` where it cannot be read (a user allowed
/// to create topics but not to describe the cluster's configuration): then the live brokers alone
/// decide, as the warning says.
async fn default_replication(
    admin: &AdminClient<DefaultClientContext>,
    broker: Option<i32>,
) -> Option<i32> {
    let broker = broker?;
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let read = admin
        .describe_configs([&ResourceSpecifier::Broker(broker)], &opts)
        .await;
    let value = match read.as_ref().map(|r| r.first()) {
        Ok(Some(Ok(resource))) => resource
            .get("default.replication.factor")
            .and_then(|e| e.value.as_deref())
            .and_then(|v| v.parse().ok()),
        _ => None,
    };
    if value.is_none() {
        tracing::warn!(broker, "could not read the broker's default.replication.factor; a topic created now gets min(3, live brokers) replicas");
    }
    value
}

/// Partitions of `topic` per the cluster metadata (retried briefly: a new topic takes a moment to
/// appear everywhere).
pub async fn partition_count(base: &ClientConfig, topic: &str) -> Result<usize, KafkaError> {
    let consumer: rdkafka::consumer::BaseConsumer = base
        .create()
        .map_err(KafkaError::client("creating a metadata client"))?;
    let topic_owned = topic.to_string();
    for _ in 0..50 {
        let c = topic_owned.clone();
        let md = tokio::task::block_in_place(|| {
            consumer.fetch_metadata(Some(&c), Duration::from_secs(10))
        })
        .map_err(KafkaError::client(format!(
            "reading metadata of topic {topic}"
        )))?;
        if let Some(t) = md.topics().iter().find(|t| t.name() == topic) {
            if t.error().is_none() && !t.partitions().is_empty() {
                return Ok(t.partitions().len());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(KafkaError::Topic {
        topic: topic.to_string(),
        reason: "does not exist or has no partitions".into(),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn replication_is_three_or_every_broker_but_not_below_the_brokers_default() {
        let r: Vec<i32> = [0, 1, 2, 3, 4, 9]
            .into_iter()
            .map(|n| super::auto_replication(n, None))
            .collect();
        assert_eq!(r, vec![1, 1, 2, 3, 3, 3]);
        // A cluster of three whose brokers ask for 3 copies, one broker down: still 3.
        assert_eq!(super::auto_replication(2, Some(3)), 3);
        assert_eq!(super::auto_replication(3, Some(1)), 3);
        assert_eq!(super::auto_replication(1, Some(1)), 1);
        assert_eq!(super::auto_replication(5, Some(5)), 5);
    }

    #[test]
    fn two_in_sync_copies_from_three_replicas_on() {
        let m: Vec<Option<i32>> = [1, 2, 3, 5]
            .into_iter()
            .map(super::min_insync_replicas)
            .collect();
        assert_eq!(m, vec![None, Some(1), Some(2), Some(2)]);
    }
}
