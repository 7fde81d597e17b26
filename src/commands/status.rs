//! `cdc-relay status`: the state of every stage in one table (or JSON), and an exit code that says
//! whether the pipeline is healthy, so it can serve as a health check.

use serde::Serialize;

use crate::commands::Error;
use crate::config::StatusArgs;
use crate::kafka::inspect::{self, PartitionLag};
use crate::sink::clickhouse::ClickHouseWriter;
use crate::source::postgres::catalog::{self, SourceStatus};
use crate::source::postgres::PublishOps;

#[derive(Debug, Serialize)]
pub struct Status {
    pub postgres: SourceStatus,
    pub kafka: Option<KafkaStatus>,
    pub clickhouse: Option<ClickHouseStatus>,
    pub healthy: bool,
    pub problems: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct KafkaStatus {
    pub topic: String,
    pub group: String,
    pub partitions: Vec<PartitionLag>,
    pub total_lag: i64,
    pub dead_letters: Option<i64>,
    /// Changes the stream could not produce (its dead-letter topic).
    pub stream_dead_letters: Option<i64>,
    /// Schema changes the sink refused, as its dead letters of the last [`RECENT_DEAD_LETTERS`]
    /// say (the refusal's text, and how many of those messages carry it).
    pub refused_schema_changes: Vec<RefusedSchemaChange>,
    /// The topic's `retention.ms` (`None`: unlimited, or it could not be read).
    pub retention_ms: Option<i64>,
    /// Partitions whose oldest unconsumed message has reached 80 % of the retention.
    pub retention_warnings: Vec<RetentionWarning>,
}

#[derive(Debug, Serialize)]
pub struct RefusedSchemaChange {
    pub reason: String,
    pub dead_letters: u64,
}

/// How many of the sink's latest dead letters (per partition) `status` reads for refusals.
const RECENT_DEAD_LETTERS: i64 = 10_000;

/// The sink's dead-letter reasons that are refused schema changes (sink/clickhouse/evolve.rs).
fn refused_changes(reasons: std::collections::BTreeMap<String, u64>) -> Vec<RefusedSchemaChange> {
    reasons
        .into_iter()
        .filter(|(r, _)| r.starts_with("schema change of "))
        .map(|(reason, dead_letters)| RefusedSchemaChange {
            reason,
            dead_letters,
        })
        .collect()
}

/// The group is so far behind on a partition that Kafka will soon delete messages it has not read.
#[derive(Debug, Serialize)]
pub struct RetentionWarning {
    pub partition: i32,
    /// Age of the oldest unconsumed message (its timestamp against now).
    pub oldest_unconsumed_age_ms: i64,
    pub retention_ms: i64,
    pub message: String,
}

/// Share of the retention at which an unconsumed message counts as about to be lost.
const RETENTION_WARN_PERCENT: i64 = 80;

/// Warnings for partitions whose oldest unconsumed message (timestamp in ms, per partition) is at
/// least [`RETENTION_WARN_PERCENT`] of `retention_ms` old at `now_ms`.
fn retention_warnings(
    topic: &str,
    group: &str,
    oldest: &std::collections::BTreeMap<i32, i64>,
    retention_ms: i64,
    now_ms: i64,
) -> Vec<RetentionWarning> {
    oldest
        .iter()
        .filter_map(|(&partition, &ts)| {
            let age = now_ms - ts;
            (age * 100 >= retention_ms * RETENTION_WARN_PERCENT).then(|| RetentionWarning {
                partition,
                oldest_unconsumed_age_ms: age,
                retention_ms,
                message: format!(
                    "consumer group {group} on {topic} p{partition}: the oldest unconsumed message is {:.0} s old, {}% of the topic's retention.ms {retention_ms}: Kafka deletes it soon and the sink never sees it (is `cdc-relay sink` running and keeping up?)",
                    age as f64 / 1000.0,
                    age * 100 / retention_ms.max(1),
                ),
            })
        })
        .collect()
}

#[derive(Debug, Serialize)]
pub struct ClickHouseStatus {
    pub table: String,
    pub raw_rows: u64,
    pub current_rows: u64,
}

/// Collects the status; `Ok` even when unhealthy (see `healthy`).
pub async fn collect(args: &StatusArgs) -> Result<Status, Error> {
    let cfg = super::source_config(&args.postgres, PublishOps(vec![]))?;
    let sql = cfg.connect_sql().await?;
    let postgres = catalog::status(&cfg, &sql).await?;
    let mut problems = Vec::new();
    match &postgres.slot {
        None => problems.push(format!("replication slot {} does not exist", cfg.slot)),
        Some(s) if s.wal_status.as_deref() == Some("lost") => problems.push(format!(
            "replication slot {} is lost (see docs/operations.md)",
            cfg.slot
        )),
        Some(s) if !s.active => problems.push(format!(
            "replication slot {} is not active: is `cdc-relay stream` running?",
            cfg.slot
        )),
        Some(_) => {}
    }
    if postgres.publication_ops.is_none() {
        problems.push(format!("publication {} does not exist", cfg.publication));
    }

    let kafka = match &args.kafka_brokers {
        None => None,
        Some(brokers) => {
            let (connection, topic, group, dlq) = (
                super::kafka_connection(brokers, &args.kafka_security).await?,
                args.topic.clone(),
                args.group.clone(),
                args.dlq_topic.clone(),
            );
            let stream_dlq = args
                .stream_dlq_topic
                .clone()
                .unwrap_or_else(|| format!("{topic}.stream-dlq"));
            let retention_ms = inspect::retention_ms(&connection, &topic).await;
            let (mut k, oldest) = tokio::task::spawn_blocking(move || -> Result<_, Error> {
                let partitions = inspect::group_lag(&connection, &topic, &group)?;
                let oldest = inspect::oldest_unconsumed(&connection, &topic, &group, &partitions)?;
                let total_lag = partitions.iter().map(|p| p.lag).sum();
                let refused = inspect::recent_header_values(
                    &connection,
                    &dlq,
                    "cdc_relay.error",
                    RECENT_DEAD_LETTERS,
                )
                .map(refused_changes)
                .unwrap_or_default();
                let k = KafkaStatus {
                    refused_schema_changes: refused,
                    dead_letters: inspect::topic_messages(&connection, &dlq).ok(),
                    stream_dead_letters: inspect::topic_messages(&connection, &stream_dlq).ok(),
                    topic,
                    group,
                    partitions,
                    total_lag,
                    retention_ms: None,
                    retention_warnings: Vec::new(),
                };
                Ok((k, oldest))
            })
            .await
            .map_err(|e| Error::Config(format!("status task failed: {e}")))??;
            match retention_ms {
                Ok(Some(retention)) => {
                    let now_ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as i64);
                    k.retention_ms = Some(retention);
                    k.retention_warnings =
                        retention_warnings(&k.topic, &k.group, &oldest, retention, now_ms);
                    // Data is about to be lost: unhealthy.
                    problems.extend(k.retention_warnings.iter().map(|w| w.message.clone()));
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "cannot read the topic's retention.ms"),
            }
            if k.total_lag > args.max_lag {
                problems.push(format!(
                    "consumer group {} is {} messages behind (more than --max-lag {})",
                    k.group, k.total_lag, args.max_lag
                ));
            }
            Some(k)
        }
    };

    let clickhouse = match &args.clickhouse_url {
        None => None,
        Some(url) => {
            let ch = super::clickhouse_config(
                url,
                &args.clickhouse_user,
                &args.clickhouse_password,
                args.clickhouse_password_file.as_deref(),
                args.clickhouse_ca_file.as_deref(),
                &args.clickhouse_database,
                &args.clickhouse_table,
            )?;
            match ClickHouseWriter::new(&ch).counts().await {
                Ok((raw_rows, current_rows)) => Some(ClickHouseStatus {
                    table: ch.qualified_table(),
                    raw_rows,
                    current_rows,
                }),
                Err(e) => {
                    problems.push(format!("clickhouse: {e}"));
                    None
                }
            }
        }
    };
    Ok(Status {
        healthy: problems.is_empty(),
        problems,
        postgres,
        kafka,
        clickhouse,
    })
}

pub fn render_table(s: &Status) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<28} {v}\n"));
    let pg = &s.postgres;
    match &pg.slot {
        Some(slot) => {
            line(
                "slot",
                if slot.active {
                    "active".into()
                } else {
                    "inactive".into()
                },
            );
            line(
                "slot confirmed LSN",
                slot.confirmed_lsn.clone().unwrap_or_else(|| "-".into()),
            );
            line(
                "slot retained WAL",
                slot.retained_wal_bytes
                    .map(human_bytes)
                    .unwrap_or_else(|| "-".into()),
            );
            line(
                "slot WAL status",
                slot.wal_status.clone().unwrap_or_else(|| "-".into()),
            );
        }
        None => line("slot", "missing".into()),
    }
    line(
        "publication",
        pg.publication_ops
            .as_ref()
            .map(|o| o.join(", "))
            .unwrap_or_else(|| "missing".into()),
    );
    line("rows unsent (sent_to_kafka)", pg.unsent_rows.to_string());
    line("rows sent", pg.sent_rows.to_string());
    // What a waiting ledger waits on: other sessions' locks on the table.
    for l in &pg.table_locks {
        line(
            &format!("  lock pid {}", l.pid),
            format!(
                "{} {}{}{}",
                if l.granted { "holds" } else { "waits for" },
                l.mode,
                l.transaction_seconds
                    .map(|s| format!(" (transaction open {s:.0} s)"))
                    .unwrap_or_default(),
                l.query
                    .as_deref()
                    .map(|q| format!(": {}", q.split_whitespace().collect::<Vec<_>>().join(" ")))
                    .unwrap_or_default(),
            ),
        );
    }
    if let Some(k) = &s.kafka {
        line(
            "topic",
            format!("{} ({} partitions)", k.topic, k.partitions.len()),
        );
        for p in &k.partitions {
            line(
                &format!("  lag of {} p{}", k.group, p.partition),
                format!(
                    "{} (end {}, committed {})",
                    p.lag,
                    p.high,
                    p.committed
                        .map(|c| c.to_string())
                        .unwrap_or_else(|| "-".into())
                ),
            );
        }
        line("consumer lag total", k.total_lag.to_string());
        line(
            "topic retention",
            k.retention_ms
                .map(|r| format!("{r} ms"))
                .unwrap_or_else(|| "unlimited or unknown".into()),
        );
        for w in &k.retention_warnings {
            line(&format!("  WARNING p{}", w.partition), w.message.clone());
        }
        line(
            "dead-lettered messages",
            k.dead_letters
                .map(|d| d.to_string())
                .unwrap_or_else(|| "-".into()),
        );
        line(
            "stream dead letters",
            k.stream_dead_letters
                .map(|d| d.to_string())
                .unwrap_or_else(|| "-".into()),
        );
        for r in &k.refused_schema_changes {
            line(
                "  REFUSED schema change",
                format!("{} dead letters: {}", r.dead_letters, r.reason),
            );
        }
    }
    if let Some(c) = &s.clickhouse {
        line("clickhouse table", c.table.clone());
        line("clickhouse rows (raw)", c.raw_rows.to_string());
        line("clickhouse rows (current)", c.current_rows.to_string());
    }
    line(
        "health",
        if s.healthy {
            "ok".into()
        } else {
            format!("UNHEALTHY: {}", s.problems.join("; "))
        },
    );
    out
}

fn human_bytes(b: i64) -> String {
    let b = b as f64;
    if b >= 1073741824.0 {
        format!("{:.1} GiB", b / 1073741824.0)
    } else if b >= 1048576.0 {
        format!("{:.1} MiB", b / 1048576.0)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b} B")
    }
}

/// Prints the status; exit code 1 when unhealthy.
pub async fn run(args: StatusArgs) -> Result<i32, Error> {
    let status = collect(&args).await?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).unwrap_or_default()
        );
    } else {
        print!("{}", render_table(&status));
    }
    Ok(if status.healthy { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_from_80_percent_of_the_retention() {
        let oldest = [(0, 1_000), (1, 40_000), (2, 52_000)].into_iter().collect();
        // now 100 s: ages 99 s, 60 s, 48 s against a retention of 75 s (80 % = 60 s).
        let w = retention_warnings("t", "g", &oldest, 75_000, 100_000);
        assert_eq!(
            w.iter().map(|w| w.partition).collect::<Vec<_>>(),
            vec![0, 1]
        );
        assert_eq!(w[1].oldest_unconsumed_age_ms, 60_000);
        assert!(
            w[1].message
                .contains("80% of the topic's retention.ms 75000"),
            "{}",
            w[1].message
        );
    }
}
