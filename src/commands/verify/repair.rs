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

/// Most deletes in flight at once.
const DELETES_IN_FLIGHT: usize = 1000;

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
    // The extra keys are read as well: one PostgreSQL has again by now gets its row, not a delete.
    let keys: Vec<&String> = diff
        .missing
        .iter()
        .chain(&diff.mismatched)
        .chain(&diff.extra)
        .collect();
    let (mut rows, mut deletes, mut skipped) = (0u64, 0u64, 0u64);
    let mut found = std::collections::HashSet::new();
    pg::begin_snapshot(&v.sql).await?;
    // A chunk at a time, acknowledged before the next: memory holds one chunk's rows.
    for chunk in super::key_chunks(&keys) {
        let values = pg::rows_as_text(
            &v.sql,
            &s.plan.pg_table,
            &s.columns,
            &super::pg_key_filter(&s.plan, chunk),
        )
        .await?;
        let mut acks = Vec::with_capacity(values.len());
        for values in &values {
            let event = s.shape.event(Op::Snapshot, values, at, at.0)?;
            if let Some(key) = key_text(s, values) {
                found.insert(key);
            }
            acks.push(producer.send(&event, &s.topic).await?.0);
        }
        for ack in acks {
            ack.await?;
        }
        rows += values.len() as u64;
    }
    pg::end_snapshot(&v.sql).await?;
    let mut acks = Vec::new();
    for key in &diff.extra {
        if found.contains(key) {
            continue;
        }
        let Some(values) = key_tuple(s, key) else {
            skipped += 1;
            continue;
        };
        let event = s.shape.event(Op::Delete, &values, at, at.0)?;
        acks.push(producer.send(&event, &s.topic).await?.0);
        deletes += 1;
        if acks.len() >= DELETES_IN_FLIGHT {
            for ack in acks.drain(..) {
                ack.await?;
            }
        }
    }
    for ack in acks {
        ack.await?;
    }
    if skipped > 0 {
        tracing::warn!(table = %s.plan.name, keys = skipped, "extra keys of a key type whose text verify cannot give back to PostgreSQL's types were not deleted; delete them in ClickHouse by hand");
    }
    tracing::info!(table = %s.plan.name, rows, deletes, "sent again");
    Ok(rows + deletes)
}

/// The key text (as verify's plan prints it) of a row read by [`pg::rows_as_text`], when the key
/// texts are PostgreSQL's own.
fn key_text(s: &Subject, values: &[Value]) -> Option<String> {
    if !s.plan.key_is_pg_text {
        return None;
    }
    let schema = s.shape.schema();
    let mut out = String::new();
    // The plan's key text lists the key columns in the table's order.
    for k in (0..schema.columns.len()).filter(|i| schema.key.contains(i)) {
        let name = &schema.columns[k].name;
        let pos = s.columns.iter().position(|c| c == name)?;
        let text = values.get(pos)?.as_text()?;
        if s.plan.int_key.is_some() {
            return Some(text.to_string());
        }
        out.push_str(&format!("{}:{text}", text.len()));
    }
    Some(out)
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
    // In the table's order, as the plan's key text lists them.
    let key_columns = (0..schema.columns.len()).filter(|i| schema.key.contains(i));
    for (k, text) in key_columns.zip(texts) {
        let name = &schema.columns[k].name;
        let pos = s.columns.iter().position(|c| c == name)?;
        values[pos] = Value::Text(bytes::Bytes::from(text));
    }
    Some(values)
}
