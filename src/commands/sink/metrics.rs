//! What `sink` exports at /metrics, and the consumer-lag probe.

use std::time::Duration;

use crate::kafka::inspect;
use crate::kafka::KafkaConnection;
use crate::metrics::{Counter, Gauge, Registry, Seconds};

#[derive(Clone)]
pub(super) struct SinkMetrics {
    pub messages: Counter,
    pub bytes: Counter,
    pub rows_inserted: Counter,
    pub batches: Counter,
    pub insert_seconds: Seconds,
    pub dead_lettered: Counter,
    pub retries: Counter,
    pub commits: Counter,
    pub consumer_lag: Gauge,
    pub schema_changes: Counter,
    pub schema_changes_refused: Counter,
}

impl SinkMetrics {
    pub fn new(r: &Registry) -> Self {
        SinkMetrics {
            messages: r.counter("sink_messages_total", "Messages consumed from Kafka."),
            bytes: r.counter("sink_bytes_total", "Payload bytes consumed."),
            rows_inserted: r.counter("sink_rows_inserted_total", "Rows inserted into ClickHouse."),
            batches: r.counter("sink_batches_total", "ClickHouse inserts."),
            insert_seconds: r.seconds(
                "sink_insert_seconds_total",
                "Time spent in ClickHouse inserts.",
            ),
            dead_lettered: r.counter(
                "sink_dead_lettered_total",
                "Messages sent to the dead-letter topic.",
            ),
            retries: r.counter(
                "sink_retries_total",
                "Retried operations (inserts, dead letters, truncates).",
            ),
            commits: r.counter("sink_commits_total", "Offset commits."),
            consumer_lag: r.gauge(
                "sink_consumer_lag",
                "Messages of the topics the group has not committed.",
            ),
            schema_changes: r.counter(
                "sink_schema_changes_total",
                "Column changes applied to ClickHouse tables (ADD, MODIFY, RENAME COLUMN).",
            ),
            schema_changes_refused: r.counter(
                "sink_schema_changes_refused_total",
                "Schemas whose change could not be applied safely (their rows are dead-lettered).",
            ),
        }
    }
}

/// Refreshes the consumer-lag gauge every 10 s (watermarks and committed offsets, off the runtime).
pub(super) fn spawn_lag_probe(
    connection: &KafkaConnection,
    topics: &[String],
    group: &str,
    gauge: Gauge,
) {
    let (connection, topics, group) = (connection.clone(), topics.to_vec(), group.to_string());
    tokio::spawn(async move {
        loop {
            let (c, t, g) = (connection.clone(), topics.clone(), group.clone());
            let lag = tokio::task::spawn_blocking(move || {
                let mut sum = 0;
                for topic in &t {
                    let parts = inspect::group_lag(&c, topic, &g)?;
                    sum += parts.iter().map(|p| p.lag).sum::<i64>();
                }
                Ok::<_, crate::kafka::KafkaError>(sum)
            })
            .await;
            if let Ok(Ok(sum)) = lag {
                gauge.set(sum);
            }
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    });
}
