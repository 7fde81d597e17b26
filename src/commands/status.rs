//! `cdc-relay status`: the state of every stage in one table (or JSON), and an exit code that says
//! whether the pipeline is healthy, so it can serve as a health check.

use serde::Serialize;

use crate::config::StatusArgs;
use crate::error::Error;
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
            let k = tokio::task::spawn_blocking(move || -> Result<KafkaStatus, Error> {
                let partitions = inspect::group_lag(&connection, &topic, &group)?;
                let total_lag = partitions.iter().map(|p| p.lag).sum();
                Ok(KafkaStatus {
                    dead_letters: inspect::topic_messages(&connection, &dlq).ok(),
                    topic,
                    group,
                    partitions,
                    total_lag,
                })
            })
            .await
            .map_err(|e| Error::Config(format!("status task failed: {e}")))??;
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
            "dead-lettered messages",
            k.dead_letters
                .map(|d| d.to_string())
                .unwrap_or_else(|| "-".into()),
        );
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
