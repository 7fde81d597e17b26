//! `verify --repair`: sends what differs again through the normal path, as the stream would: the
//! rows PostgreSQL holds for missing and mismatched keys as `snapshot` events, and a `delete` for
//! every extra key, each with a version above every change ClickHouse holds of it (the WAL
//! position before the read), to the table's topic, where the running sink applies them.
//!
//! The same path for ledger tables and the others: resetting `sent_to_kafka` would reach the
//! stream only as an UPDATE (not published by the seed's default `--ops insert`, and without
//! unchanged TOAST values), and could not delete an extra key at all.

use super::report::Report;
use super::{Subject, Verifier};
use crate::commands::Error;
use crate::event::Op;
use crate::kafka::producer::{KafkaProducer, ProducerConfig};
use crate::source::postgres::pgoutput::Value;
use crate::source::postgres::verify as pg;
use crate::types::canonical::split_fields;

/// Keys per statement when reading rows again.
const KEYS_PER_READ: usize = 1000;

/// Produces the repairs of every table `report` found drift in; the number of messages sent.
pub(super) async fn send_again(v: &Verifier, report: &Report) -> Result<u64, Error> {
    let mut sent = 0;
    for (i, t) in report.tables.iter().enumerate() {
        if t.diff.is_empty() {
            continue;
        }
        let s = v.subject(i).await?;
        sent += send_table(v, &s, &t.diff).await?;
    }
    Ok(sent)
}

async fn send_table(
    v: &Verifier,
    s: &Subject,
    diff: &super::compare::RowDiff,
) -> Result<u64, Error> {
    let producer = KafkaProducer::new(&ProducerConfig {
        connection: v.kafka.clone(),
        topics: vec![s.topic.clone()],
        // Nothing goes there: a change too large for the topic is an error here.
        dead_letter_topic: s.topic.clone(),
        queue_messages: 10_000,
        transactional_id: None,
    })
    .await?;
    // Read before the rows: a change committed after it has a larger version and wins.
    let at = pg::current_position(&v.sql).await?;
    let mut acks = Vec::new();
    let resend: Vec<&String> = diff.missing.iter().chain(&diff.mismatched).collect();
    pg::begin_snapshot(&v.sql).await?;
    let mut rows = Vec::new();
    for chunk in resend.chunks(KEYS_PER_READ) {
        rows.extend(
            pg::rows_as_text(
                &v.sql,
                &s.plan.pg_table,
                &s.columns,
                &super::pg_key_filter(&s.plan, chunk),
            )
            .await?,
        );
    }
    pg::end_snapshot(&v.sql).await?;
    for values in &rows {
        let event = s.shape.event(Op::Snapshot, values, at, at.0)?;
        acks.push(producer.send(&event, &s.topic).await?.0);
    }
    let mut skipped = 0;
    for key in &diff.extra {
        let Some(values) = key_tuple(s, key) else {
            skipped += 1;
            continue;
        };
        let event = s.shape.event(Op::Delete, &values, at, at.0)?;
        acks.push(producer.send(&event, &s.topic).await?.0);
    }
    if skipped > 0 {
        tracing::warn!(table = %s.plan.name, keys = skipped, "extra keys of a key type whose text verify cannot give back to PostgreSQL's types were not deleted; delete them in ClickHouse by hand");
    }
    let sent = acks.len() as u64;
    for ack in acks {
        ack.await?;
    }
    tracing::info!(table = %s.plan.name, rows = rows.len(), deletes = diff.extra.len() - skipped, "sent again");
    Ok(sent)
}

/// A tuple holding only the key's values (as a delete's old key), from a key text; `None` when
/// the key's canonical text is not PostgreSQL's own.
fn key_tuple(s: &Subject, key: &str) -> Option<Vec<Value>> {
    if !s.plan.key_is_pg_text {
        return None;
    }
    let texts: Vec<String> = if s.plan.int_key.is_some() {
        vec![key.to_string()]
    } else {
        split_fields(key)?
            .into_iter()
            .map(|f| f.map(str::to_string))
            .collect::<Option<Vec<_>>>()?
    };
    let schema = s.shape.schema();
    let mut values = vec![Value::Null; s.columns.len()];
    for (&k, text) in schema.key.iter().zip(texts) {
        let name = &schema.columns[k].name;
        let pos = s.columns.iter().position(|c| c == name)?;
        values[pos] = Value::Text(bytes::Bytes::from(text));
    }
    Some(values)
}
