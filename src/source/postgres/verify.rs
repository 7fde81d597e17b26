//! The PostgreSQL side of `cdc-relay verify`: a read at one snapshot and the WAL position it
//! stands at, per-bucket row counts and hash sums computed by the server (no row leaves it for a
//! clean table), the hashes of the rows of a few buckets, and the rows `--repair` sends again.
//!
//! The SQL of the canonical text comes from `types::canonical`; this module only runs it.

use tokio_postgres::{Client, SimpleQueryMessage};

use super::pgoutput::Value;
use super::{parse_lsn, SourceError};
use crate::event::Lsn;

/// A sum of signed 64-bit hashes, as ClickHouse's wrapping UInt64 sum of the same bits.
pub fn wrap_sum(sum: i128) -> u64 {
    sum.rem_euclid(1i128 << 64) as u64
}

/// Makes the session fit for `verify`: literals are standard strings whatever the server's
/// default, a bucket scan of a large table is not cut by a `statement_timeout` the URL set, and
/// the server is one whose SQL the canonical form uses (`trim_scale`, exact `extract(epoch)`).
pub async fn prepare_session(client: &Client) -> Result<(), SourceError> {
    client
        .batch_execute("SET standard_conforming_strings = on; SET statement_timeout = 0")
        .await
        .map_err(SourceError::sql("preparing the verify session"))?;
    let version = super::catalog::server_version(client).await?;
    if version < 140_000 {
        return Err(SourceError::Config(format!(
            "verify needs PostgreSQL 14 or later (this server is {}.{}): its canonical form uses trim_scale() and the exact extract(epoch) of 14",
            version / 10_000,
            version % 10_000
        )));
    }
    Ok(())
}

/// Starts a read-only REPEATABLE READ transaction and returns the WAL position its snapshot
/// stands at: every change it sees was committed at or below it. Statements until
/// [`end_snapshot`] read that snapshot.
pub async fn begin_snapshot(client: &Client) -> Result<Lsn, SourceError> {
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(SourceError::sql("starting the verify snapshot"))?;
    // The snapshot is taken by this first statement, before the position is read. The insert
    // position, not the write position: with synchronous_commit off a transaction is visible
    // before its commit record is written out.
    let row = client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .map_err(SourceError::sql("reading the snapshot's WAL position"))?;
    parse_lsn(row.get::<_, &str>(0))
}

/// The WAL position now.
pub async fn current_position(client: &Client) -> Result<Lsn, SourceError> {
    let row = client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .map_err(SourceError::sql("reading the WAL position"))?;
    parse_lsn(row.get::<_, &str>(0))
}

pub async fn end_snapshot(client: &Client) -> Result<(), SourceError> {
    client
        .batch_execute("COMMIT")
        .await
        .map_err(SourceError::sql("ending the verify snapshot"))
}

/// The smallest and largest value of an integer key among the rows `filter` selects.
pub async fn key_bounds(
    client: &Client,
    table: &str,
    key: &str,
    filter: &str,
) -> Result<(Option<i64>, Option<i64>), SourceError> {
    let row = client
        .query_one(
            &format!(
                "SELECT min({key})::bigint, max({key})::bigint FROM {table} AS t WHERE {filter}"
            ),
            &[],
        )
        .await
        .map_err(SourceError::sql(format!("reading a key range of {table}")))?;
    Ok((row.get(0), row.get(1)))
}

/// The table's rows as the planner estimates them, or counted when it has no estimate (before
/// the table's first ANALYZE; always for a partitioned table's root).
pub async fn rows_estimate(client: &Client, table: &str) -> Result<f64, SourceError> {
    let row = client
        .query_one(
            "SELECT reltuples::float8 FROM pg_class WHERE oid = $1::text::regclass",
            &[&table],
        )
        .await
        .map_err(SourceError::sql(format!("reading the size of {table}")))?;
    let estimate: f64 = row.get(0);
    if estimate >= 0.0 {
        return Ok(estimate);
    }
    let row = client
        .query_one(&format!("SELECT count(*)::float8 FROM {table}"), &[])
        .await
        .map_err(SourceError::sql(format!("counting the rows of {table}")))?;
    Ok(row.get(0))
}

/// (bucket, rows, hash sum mod 2^64) of every bucket of the rows `filter` selects; `bucket`,
/// `hash` and `filter` are SQL over the table's columns (aliased `t`).
pub async fn bucket_sums(
    client: &Client,
    table: &str,
    bucket: &str,
    hash: &str,
    filter: &str,
) -> Result<Vec<(i64, u64, u64)>, SourceError> {
    let sql = format!(
        "SELECT ({bucket})::bigint, count(*), sum({hash})::text FROM {table} AS t WHERE {filter} GROUP BY 1"
    );
    let rows = client
        .query(&sql, &[])
        .await
        .map_err(SourceError::sql(format!("summing the buckets of {table}")))?;
    rows.iter()
        .map(|r| {
            let sum: &str = r.get(2);
            let sum: i128 = sum.parse().map_err(|_| SourceError::Value {
                column: "sum",
                reason: format!("not an integer: {sum:?}"),
            })?;
            Ok((r.get(0), r.get::<_, i64>(1) as u64, wrap_sum(sum)))
        })
        .collect()
}

/// The key text and hash of every row `filter` selects.
pub async fn row_hashes(
    client: &Client,
    table: &str,
    key: &str,
    hash: &str,
    filter: &str,
) -> Result<Vec<(String, u64)>, SourceError> {
    let sql = format!("SELECT ({key})::text, {hash} FROM {table} AS t WHERE {filter}");
    let rows = client
        .query(&sql, &[])
        .await
        .map_err(SourceError::sql(format!("hashing rows of {table}")))?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u64))
        .collect())
}

/// `exprs` (SQL over the table's columns, aliased `t`) as text, for every row `filter` selects.
pub async fn text_rows(
    client: &Client,
    table: &str,
    exprs: &[String],
    filter: &str,
) -> Result<Vec<Vec<Option<String>>>, SourceError> {
    let select: Vec<String> = exprs.iter().map(|e| format!("({e})::text")).collect();
    let sql = format!(
        "SELECT {} FROM {table} AS t WHERE {filter}",
        select.join(", ")
    );
    let rows = client
        .query(&sql, &[])
        .await
        .map_err(SourceError::sql(format!("reading rows of {table}")))?;
    Ok(rows
        .iter()
        .map(|r| (0..exprs.len()).map(|i| r.get(i)).collect())
        .collect())
}

/// The slot's confirmed position; `None` when there is no such slot.
pub async fn confirmed_position(client: &Client, slot: &str) -> Result<Option<Lsn>, SourceError> {
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(SourceError::sql("reading the slot's confirmed position"))?;
    match row.and_then(|r| r.get::<_, Option<String>>(0)) {
        Some(text) => Ok(Some(parse_lsn(&text)?)),
        None => Ok(None),
    }
}

/// What the publication publishes (`insert`, `update`, …); `None` when it does not exist.
pub async fn publication_ops(
    client: &Client,
    publication: &str,
) -> Result<Option<Vec<&'static str>>, SourceError> {
    let row = client
        .query_opt(
            "SELECT pubinsert, pubupdate, pubdelete, pubtruncate FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(SourceError::sql("reading the publication"))?;
    Ok(row.map(|r| {
        ["insert", "update", "delete", "truncate"]
            .into_iter()
            .enumerate()
            .filter(|(i, _)| r.get::<_, bool>(*i))
            .map(|(_, op)| op)
            .collect()
    }))
}

/// The rows `filter` selects, every column in `columns` as its text (as the backfill reads
/// them), in column order.
pub async fn rows_as_text(
    client: &Client,
    table: &str,
    columns: &[String],
    filter: &str,
) -> Result<Vec<Vec<Value>>, SourceError> {
    let select: Vec<String> = columns
        .iter()
        .map(|c| format!("t.{}", super::client::quote_ident(c)))
        .collect();
    let sql = format!(
        "SELECT {} FROM {table} AS t WHERE {filter}",
        select.join(", ")
    );
    let messages = client
        .simple_query(&sql)
        .await
        .map_err(SourceError::sql(format!(
            "reading rows of {table} to send again"
        )))?;
    let mut out = Vec::new();
    for m in messages {
        if let SimpleQueryMessage::Row(row) = m {
            out.push(
                (0..row.len())
                    .map(|i| match row.get(i) {
                        Some(text) => Value::Text(bytes::Bytes::copy_from_slice(text.as_bytes())),
                        None => Value::Null,
                    })
                    .collect(),
            );
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_wrap_like_clickhouse() {
        // Measured: PostgreSQL's sum of the signed hashes of 0..999 and ClickHouse's UInt64 sum.
        assert_eq!(
            wrap_sum(-11_625_520_898_470_335_541),
            6_821_223_175_239_216_075
        );
        assert_eq!(wrap_sum(-1), u64::MAX);
        assert_eq!(wrap_sum(1i128 << 64), 0);
    }
}
