//! Read-only views of a topic and a consumer group, for `cdc-relay status`.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use super::{KafkaConnection, KafkaError, RdKafkaError};

#[derive(Debug, Clone, Serialize)]
pub struct PartitionLag {
    pub partition: i32,
    /// Oldest offset the topic still holds.
    pub low: i64,
    /// Next offset to be written.
    pub high: i64,
    /// The group's committed offset, if it has one.
    pub committed: Option<i64>,
    /// Messages the group has not committed yet.
    pub lag: i64,
}

const TIMEOUT: Duration = Duration::from_secs(10);

fn client(connection: &KafkaConnection, group: &str) -> Result<BaseConsumer, KafkaError> {
    connection
        .client_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        // An inspected offset deleted meanwhile reads from the oldest message, not the newest.
        .set("auto.offset.reset", "earliest")
        .create()
        .map_err(KafkaError::client("creating an inspection client"))
}

fn partitions(c: &BaseConsumer, topic: &str) -> Result<Vec<i32>, KafkaError> {
    let md = c
        .fetch_metadata(Some(topic), TIMEOUT)
        .map_err(KafkaError::client(format!("reading metadata of {topic}")))?;
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .filter(|t| t.error().is_none())
        .ok_or_else(|| KafkaError::Topic {
            topic: topic.into(),
            reason: "does not exist".into(),
        })?;
    Ok(t.partitions().iter().map(|p| p.id()).collect())
}

/// Low and high offsets of one partition.
fn watermarks(c: &BaseConsumer, topic: &str, p: i32) -> Result<(i64, i64), KafkaError> {
    c.fetch_watermarks(topic, p, TIMEOUT)
        .map_err(KafkaError::client(format!(
            "reading watermarks of {topic}/{p}"
        )))
}

/// `group`'s committed offset on each of `parts` of `topic` (`None`: nothing committed).
fn committed(
    c: &BaseConsumer,
    topic: &str,
    group: &str,
    parts: &[i32],
) -> Result<BTreeMap<i32, Option<i64>>, KafkaError> {
    let mut tpl = TopicPartitionList::new();
    for p in parts {
        tpl.add_partition(topic, *p);
    }
    let committed = c
        .committed_offsets(tpl, TIMEOUT)
        .map_err(KafkaError::client(format!(
            "reading the offsets of group {group}"
        )))?;
    Ok(parts
        .iter()
        .map(|&p| {
            let at = committed
                .find_partition(topic, p)
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                });
            (p, at)
        })
        .collect())
}

/// Lag of `group` on every partition of `topic`.
pub fn group_lag(
    connection: &KafkaConnection,
    topic: &str,
    group: &str,
) -> Result<Vec<PartitionLag>, KafkaError> {
    let c = client(connection, group)?;
    let parts = partitions(&c, topic)?;
    let offsets = committed(&c, topic, group, &parts)?;
    let mut out = Vec::new();
    for p in parts {
        let (low, high) = watermarks(&c, topic, p)?;
        let committed = offsets.get(&p).copied().flatten();
        let lag = high - committed.unwrap_or(low).max(low);
        out.push(PartitionLag {
            partition: p,
            low,
            high,
            committed,
            lag,
        });
    }
    Ok(out)
}

/// The timestamp (ms since the epoch) of the oldest message the group has not consumed, for every
/// partition with lag: the message at the committed offset, or at the low watermark when nothing
/// (or something already deleted) is committed.
pub fn oldest_unconsumed(
    connection: &KafkaConnection,
    topic: &str,
    group: &str,
    parts: &[PartitionLag],
) -> Result<BTreeMap<i32, i64>, KafkaError> {
    let mut out = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in parts.iter().filter(|p| p.lag > 0) {
        let offset = p.committed.unwrap_or(p.low).max(p.low);
        tpl.add_partition_offset(topic, p.partition, Offset::Offset(offset))
            .map_err(KafkaError::client("positioning the inspection client"))?;
    }
    if tpl.count() == 0 {
        return Ok(out);
    }
    let c = client(connection, group)?;
    c.assign(&tpl)
        .map_err(KafkaError::client("assigning the inspection client"))?;
    let deadline = std::time::Instant::now() + TIMEOUT;
    while out.len() < tpl.count() && std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            use rdkafka::message::Message;
            if let Some(ts) = m.timestamp().to_millis() {
                out.entry(m.partition()).or_insert(ts);
            }
        }
    }
    Ok(out)
}

/// The next offset to be written on every partition of `topic`.
pub fn high_watermarks(
    connection: &KafkaConnection,
    topic: &str,
) -> Result<Vec<(i32, i64)>, KafkaError> {
    let c = client(connection, "cdc-relay.inspect")?;
    partitions(&c, topic)?
        .into_iter()
        .map(|p| Ok((p, watermarks(&c, topic, p)?.1)))
        .collect()
}

/// The partitions of `topic` on which `group` has not yet consumed (committed) every message
/// below `highs`, with its committed offset (`None`: nothing committed). In exactly-once mode a
/// transaction's commit marker takes an offset of its own, which no consumer ever commits past,
/// so a partition committed below its mark counts as consumed when a `read_committed` read from
/// the committed offset finds no message below the mark.
pub fn behind(
    connection: &KafkaConnection,
    topic: &str,
    group: &str,
    highs: &[(i32, i64)],
) -> Result<Vec<(i32, Option<i64>, i64)>, KafkaError> {
    let c = client(connection, group)?;
    let parts: Vec<i32> = highs.iter().map(|h| h.0).collect();
    let offsets = committed(&c, topic, group, &parts)?;
    let mut open = Vec::new();
    for &(p, high) in highs {
        let (low, _) = watermarks(&c, topic, p)?;
        let at = offsets.get(&p).copied().flatten();
        if at.unwrap_or(low).max(low) < high {
            open.push((p, at, high));
        }
    }
    if open.is_empty() {
        return Ok(open);
    }
    // Which of them still hold a message below the mark.
    let reader: BaseConsumer = connection
        .client_config()
        .set("group.id", "cdc-relay.verify")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .create()
        .map_err(KafkaError::client(
            "creating a read_committed inspection client",
        ))?;
    let mut tpl = TopicPartitionList::new();
    for &(p, at, _) in &open {
        let (low, _) = watermarks(&c, topic, p)?;
        tpl.add_partition_offset(topic, p, Offset::Offset(at.unwrap_or(low).max(low)))
            .map_err(KafkaError::client("positioning the inspection client"))?;
    }
    reader
        .assign(&tpl)
        .map_err(KafkaError::client("assigning the inspection client"))?;
    let mut unsettled: BTreeMap<i32, (Option<i64>, i64)> =
        open.iter().map(|&(p, at, high)| (p, (at, high))).collect();
    let mut holding = Vec::new();
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !unsettled.is_empty() && std::time::Instant::now() < deadline {
        use rdkafka::message::Message;
        match reader.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                if let Some((at, high)) = unsettled.remove(&m.partition()) {
                    if m.offset() < high {
                        holding.push((m.partition(), at, high));
                    }
                }
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                unsettled.remove(&p);
            }
            _ => {}
        }
    }
    // Not known in time: still behind.
    holding.extend(unsettled.into_iter().map(|(p, (at, high))| (p, at, high)));
    holding.sort_unstable();
    Ok(holding)
}

/// The topic's `retention.ms`; `None` when retention is unlimited (-1).
pub async fn retention_ms(
    connection: &KafkaConnection,
    topic: &str,
) -> Result<Option<i64>, KafkaError> {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = connection
        .client_config()
        .create()
        .map_err(KafkaError::client("creating the admin client"))?;
    let opts = AdminOptions::new().request_timeout(Some(TIMEOUT));
    let results = admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], &opts)
        .await
        .map_err(KafkaError::client(format!(
            "reading the configuration of {topic}"
        )))?;
    for r in results {
        let resource = r.map_err(|code| KafkaError::Topic {
            topic: topic.into(),
            reason: format!("its configuration cannot be read: {code}"),
        })?;
        if let Some(v) = resource
            .get("retention.ms")
            .and_then(|e| e.value.as_deref())
        {
            let ms: i64 = v.parse().map_err(|_| KafkaError::Topic {
                topic: topic.into(),
                reason: format!("retention.ms {v:?} is not a number"),
            })?;
            return Ok((ms >= 0).then_some(ms));
        }
    }
    Ok(None)
}

/// Messages currently held by `topic` (all partitions).
pub fn topic_messages(connection: &KafkaConnection, topic: &str) -> Result<i64, KafkaError> {
    let c = client(connection, "cdc-relay-status")?;
    let mut total = 0;
    for p in partitions(&c, topic)? {
        let (low, high) = watermarks(&c, topic, p)?;
        total += high - low;
    }
    Ok(total)
}

/// The distinct values of header `header` among the last `last` messages of each partition of
/// `topic`, with how many messages carry each (what a dead-letter topic says went wrong lately).
pub fn recent_header_values(
    connection: &KafkaConnection,
    topic: &str,
    header: &str,
    last: i64,
) -> Result<BTreeMap<String, u64>, KafkaError> {
    use rdkafka::message::{Headers, Message};
    let c = client(connection, "cdc-relay-status")?;
    let mut out = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    let mut remaining = 0;
    for p in partitions(&c, topic)? {
        let (low, high) = watermarks(&c, topic, p)?;
        if high > low {
            tpl.add_partition_offset(topic, p, Offset::Offset((high - last).max(low)))
                .map_err(KafkaError::client("positioning the inspection client"))?;
            remaining += high - (high - last).max(low);
        }
    }
    if remaining == 0 {
        return Ok(out);
    }
    c.assign(&tpl)
        .map_err(KafkaError::client("assigning the inspection client"))?;
    let deadline = std::time::Instant::now() + TIMEOUT;
    while remaining > 0 && std::time::Instant::now() < deadline {
        let Some(Ok(m)) = c.poll(Duration::from_millis(200)) else {
            continue;
        };
        remaining -= 1;
        let value = m.headers().and_then(|hs| {
            hs.iter()
                .find(|h| h.key == header)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        });
        if let Some(v) = value {
            *out.entry(v).or_insert(0) += 1;
        }
    }
    Ok(out)
}

/// Whether the last message of any partition of `topic` is a cdc-relay change event: then a slot
/// has fed this topic before. Messages of other producers (the seed pipeline's) do not count.
pub fn holds_relay_events(connection: &KafkaConnection, topic: &str) -> Result<bool, KafkaError> {
    let c = client(connection, "cdc-relay-inspect")?;
    let parts = match partitions(&c, topic) {
        Ok(p) => p,
        Err(KafkaError::Topic { .. }) => return Ok(false),
        Err(e) => return Err(e),
    };
    for p in parts {
        let (low, high) = watermarks(&c, topic, p)?;
        if high <= low {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, p, Offset::Offset(high - 1))
            .map_err(KafkaError::client("positioning the inspection client"))?;
        c.assign(&tpl)
            .map_err(KafkaError::client("assigning the inspection client"))?;
        let deadline = std::time::Instant::now() + TIMEOUT;
        while std::time::Instant::now() < deadline {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
                use rdkafka::message::Message;
                if crate::event::ChangeEvent::from_json(m.payload().unwrap_or_default()).is_ok() {
                    return Ok(true);
                }
                break;
            }
        }
    }
    Ok(false)
}

/// Remembers the last error librdkafka reported in the background that settings cause and waiting
/// cannot cure (authentication, TLS), which a request that merely timed out would not say.
#[derive(Default)]
struct SettingsError(std::sync::Mutex<Option<String>>);

impl rdkafka::ClientContext for SettingsError {
    fn error(&self, error: RdKafkaError, reason: &str) {
        use rdkafka::error::RDKafkaErrorCode as C;
        tracing::debug!(%error, reason, "kafka client error");
        let from_settings = matches!(
            error.rdkafka_error_code(),
            Some(C::Authentication | C::SSL | C::SaslAuthenticationFailed | C::InvalidArgument)
        );
        if let (true, Ok(mut last)) = (from_settings, self.0.lock()) {
            *last = Some(reason.to_string());
        }
    }
}

impl rdkafka::consumer::ConsumerContext for SettingsError {}

/// Asks the cluster for its metadata once, so a wrong password or CA fails at start with
/// librdkafka's own reason instead of a timeout further on. A broker that is merely down is not an
/// error here: the steps after this wait for it as they always did.
pub fn check_settings(connection: &KafkaConnection) -> Result<(), KafkaError> {
    let c: BaseConsumer<SettingsError> = connection
        .client_config()
        .create_with_context(SettingsError::default())
        .map_err(KafkaError::client("creating a connection probe"))?;
    if c.fetch_metadata(None, TIMEOUT).is_ok() {
        return Ok(());
    }
    // Background errors reach the context only while the client is polled.
    for _ in 0..5 {
        if let Some(Err(e)) = c.poll(Duration::from_millis(100)) {
            tracing::debug!(error = %e, "kafka probe");
        }
    }
    match c.context().0.lock().ok().and_then(|l| l.clone()) {
        Some(reason) => Err(KafkaError::Refused {
            brokers: connection.brokers.clone(),
            reason,
        }),
        None => Ok(()),
    }
}
