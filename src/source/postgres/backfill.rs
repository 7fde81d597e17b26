//! Backfill: rows with `sent_to_kafka` not TRUE that the stream will never deliver, read in chunks of
//! ascending `id` so memory stays bounded whatever the table's size.
//!
//! At slot creation the read runs inside the slot's exported snapshot: exactly the rows committed
//! before the slot's consistent point, so nothing is missed or doubled at the handover. When the slot
//! already exists there is no such snapshot; the stream command then runs the backfill once the stream
//! has caught up, and it picks up rows left unsent from before (a crash mid-backfill, rows older than
//! the slot, rows a user reset to FALSE).

use tokio_postgres::Client;

use crate::event::{ChangeEvent, Lsn, Op};

use super::change::{change_event, RowText};
use super::{SourceConfig, SourceError};

pub struct Backfill {
    client: Client,
    query: String,
    chunk: i64,
    after_id: i64,
    lsn: Lsn,
    done: bool,
    in_snapshot: bool,
}

impl Backfill {
    /// A backfill that reads inside the snapshot exported by `CREATE_REPLICATION_SLOT`. Must be
    /// opened before the replication connection runs its next command.
    pub async fn in_snapshot(
        cfg: &SourceConfig,
        snapshot: &str,
        consistent_point: Lsn,
        chunk: i64,
    ) -> Result<Self, SourceError> {
        let client = cfg.connect_sql().await?;
        client
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
                super::client::quote_literal(snapshot)
            ))
            .await
            .map_err(SourceError::sql(
                "importing the slot's snapshot for the backfill",
            ))?;
        Ok(Self::new(cfg, client, consistent_point, chunk, true))
    }

    /// A backfill of what is unsent now, each chunk in its own statement.
    pub async fn current(cfg: &SourceConfig, lsn: Lsn, chunk: i64) -> Result<Self, SourceError> {
        let client = cfg.connect_sql().await?;
        Ok(Self::new(cfg, client, lsn, chunk, false))
    }

    fn new(cfg: &SourceConfig, client: Client, lsn: Lsn, chunk: i64, in_snapshot: bool) -> Self {
        // `ORDER BY t.id`, qualified: a bare `id` would name the output column `id::text` and sort
        // as text ("10" < "9"), which breaks the keyset `t.id > $1` and skips rows.
        let query = format!(
            "SELECT t.id::text, t.username, t.event_type, t.event_time::text FROM {} AS t \
             WHERE t.id > $1::int8 AND t.sent_to_kafka IS NOT TRUE ORDER BY t.id LIMIT $2",
            cfg.qualified_table()
        );
        Backfill {
            client,
            query,
            chunk: chunk.max(1),
            after_id: i64::MIN,
            lsn,
            done: false,
            in_snapshot,
        }
    }

    /// Rows still to do, for progress reports.
    pub async fn count_remaining(&self, cfg: &SourceConfig) -> Result<i64, SourceError> {
        let row = self
            .client
            .query_one(
                &format!(
                    "SELECT count(*) FROM {} WHERE id > $1::int8 AND sent_to_kafka IS NOT TRUE",
                    cfg.qualified_table()
                ),
                &[&self.after_id],
            )
            .await
            .map_err(SourceError::sql("counting rows to backfill"))?;
        Ok(row.get(0))
    }

    /// The next chunk of events; `None` when done.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<ChangeEvent>>, SourceError> {
        if self.done {
            return Ok(None);
        }
        let rows = self
            .client
            .query(&self.query, &[&self.after_id, &self.chunk])
            .await
            .map_err(SourceError::sql("reading rows to backfill"))?;
        if (rows.len() as i64) < self.chunk {
            self.done = true;
        }
        let mut events = Vec::with_capacity(rows.len());
        for row in &rows {
            let text = RowText {
                id: row.get(0),
                username: row.get(1),
                event_type: row.get(2),
                event_time: row.get(3),
                unchanged: Vec::new(),
            };
            let event = change_event(Op::Snapshot, &text, self.lsn, 0)?;
            if let Some(id) = event.id {
                self.after_id = id;
            }
            events.push(event);
        }
        if self.done && self.in_snapshot {
            self.client
                .batch_execute("COMMIT")
                .await
                .map_err(SourceError::sql("ending the backfill snapshot"))?;
        }
        if events.is_empty() {
            return Ok(None);
        }
        Ok(Some(events))
    }
}
