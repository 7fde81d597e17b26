//! Backfill: rows with `sent_to_kafka` not TRUE that the stream will never deliver (rows older than
//! the slot, an interrupted backfill, rows a user reset to FALSE), read in chunks of ascending `id`.
//!
//! Each chunk is one short statement, so the backfill never holds a lock for longer than one read: a
//! TRUNCATE or ALTER TABLE issued meanwhile waits for one chunk at most, never for the whole backfill
//! (holding the slot's exported snapshot for the whole backfill did, and the ledger queued behind
//! the DDL, which queued behind the backfill: a stall PostgreSQL cannot see).
//!
//! A chunk is merged into the change stream with watermarks, as in Netflix's DBLog:
//! 1. the stream command opens a [`ChunkWindow`], seeded with the keys of changes it produced that
//!    the ledger has not recorded yet (the read would still see those rows as unsent);
//! 2. the chunk is read, then a non-transactional logical message (the high watermark) is written;
//! 3. until the stream reaches that watermark, every key it changes is noted in the window;
//! 4. at the watermark, the chunk's rows are released without the noted keys (the stream already
//!    carries a newer or equal state of those rows) and without any row if the table was truncated,
//!    each versioned at the watermark's position: above every transaction the read could see, below
//!    every one that commits later.

use std::collections::HashSet;

use tokio_postgres::Client;

use crate::event::{ChangeEvent, Lsn, Op};

use super::change::{change_event, RowText};
use super::{SourceConfig, SourceError, WATERMARK_MESSAGE_PREFIX};

/// Rows read by one chunk, waiting for their watermark.
#[derive(Debug)]
pub struct Chunk {
    pub number: u64,
    pub rows: Vec<ChangeEvent>,
    /// Fewer rows than asked for: nothing is left after this one.
    pub last: bool,
}

pub struct Backfill {
    client: Client,
    query: String,
    count_query: String,
    chunk: i64,
    after_id: i64,
    next_chunk: u64,
    done: bool,
}

impl Backfill {
    /// A backfill of what is unsent now, each chunk in its own statement.
    pub async fn new(cfg: &SourceConfig, chunk: i64) -> Result<Self, SourceError> {
        let client = cfg.connect_sql().await?;
        // Every column as text: the same text pgoutput sends, whatever the column's type (an ENUM
        // or a domain read as `&str` made the read fail).
        // `ORDER BY t.id`, qualified: a bare `id` would name the output column `id::text` and sort
        // as text ("10" < "9"), which breaks the keyset `t.id > $1` and skips rows.
        let query = format!(
            "SELECT t.id::text, t.username::text, t.event_type::text, t.event_time::text FROM {} AS t \
             WHERE t.id > $1::int8 AND t.sent_to_kafka IS NOT TRUE ORDER BY t.id LIMIT $2",
            cfg.qualified_table()
        );
        let count_query = format!(
            "SELECT count(*) FROM {} WHERE id > $1::int8 AND sent_to_kafka IS NOT TRUE",
            cfg.qualified_table()
        );
        Ok(Backfill {
            client,
            query,
            count_query,
            chunk: chunk.max(1),
            after_id: i64::MIN,
            next_chunk: 1,
            done: false,
        })
    }

    /// Rows still to do, for progress reports.
    pub async fn count_remaining(&self) -> Result<i64, SourceError> {
        let row = self
            .client
            .query_one(&self.count_query, &[&self.after_id])
            .await
            .map_err(SourceError::sql("counting rows to backfill"))?;
        Ok(row.get(0))
    }

    /// Reads the next chunk and writes its watermark; `None` when done. The caller must have opened
    /// the chunk's window before calling this.
    pub async fn read_chunk(&mut self) -> Result<Option<Chunk>, SourceError> {
        if self.done {
            return Ok(None);
        }
        let rows = self
            .client
            .query(&self.query, &[&self.after_id, &self.chunk])
            .await
            .map_err(SourceError::sql("reading rows to backfill"))?;
        let last = (rows.len() as i64) < self.chunk;
        let mut events = Vec::with_capacity(rows.len());
        for row in &rows {
            let text = RowText {
                id: row.get(0),
                username: row.get(1),
                event_type: row.get(2),
                event_time: row.get(3),
                unchanged: Vec::new(),
            };
            // Version and position are set when the watermark comes by.
            let event = change_event(Op::Snapshot, &text, Lsn::ZERO, 0)?;
            if let Some(id) = event.id {
                self.after_id = id;
            }
            events.push(event);
        }
        let number = self.next_chunk;
        self.next_chunk += 1;
        // Written after the read finished, so it is later in the WAL than the commit of every
        // transaction the read saw.
        self.client
            .query_one(
                "SELECT pg_logical_emit_message(false, $1, $2)::text",
                &[&WATERMARK_MESSAGE_PREFIX, &number.to_string()],
            )
            .await
            .map_err(SourceError::sql("writing a backfill watermark"))?;
        self.done = last;
        if events.is_empty() {
            return Ok(None);
        }
        Ok(Some(Chunk {
            number,
            rows: events,
            last,
        }))
    }
}

/// What the stream did to the table while one chunk was read and until its watermark came by.
#[derive(Debug, Default)]
pub struct ChunkWindow {
    open: bool,
    /// Keys the stream carries a state of that is at least as new as the chunk's.
    changed: HashSet<i64>,
    truncated: bool,
    pending: Option<Chunk>,
    /// A watermark that came by before its chunk arrived (the stream can be quicker than the
    /// channel that brings the chunk).
    seen: Option<(u64, Lsn)>,
}

impl ChunkWindow {
    /// Starts noting changes, before the chunk is read. `unrecorded` are keys of changes produced
    /// but not yet in the ledger: the read may still see their rows as unsent.
    pub fn open(&mut self, unrecorded: impl IntoIterator<Item = i64>) {
        *self = ChunkWindow {
            open: true,
            ..Default::default()
        };
        self.changed.extend(unrecorded);
    }

    pub fn close(&mut self) {
        *self = ChunkWindow::default();
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    /// The stream handed out a change of `id` (a truncate has none).
    pub fn note(&mut self, op: Op, id: Option<i64>) {
        if !self.open {
            return;
        }
        match (op, id) {
            (Op::Truncate, _) => self.truncated = true,
            (_, Some(id)) => {
                self.changed.insert(id);
            }
            _ => {}
        }
    }

    /// The chunk was read; its rows if its watermark already came by.
    pub fn on_chunk(&mut self, chunk: Chunk) -> Option<Vec<ChangeEvent>> {
        match self.seen {
            Some((number, lsn)) if number == chunk.number => {
                self.pending = Some(chunk);
                self.on_watermark(number, lsn)
            }
            _ => {
                self.pending = Some(chunk);
                None
            }
        }
    }

    /// The stream reached a watermark: the chunk's rows to produce now (and the window closes), if
    /// it is this window's chunk.
    pub fn on_watermark(&mut self, number: u64, lsn: Lsn) -> Option<Vec<ChangeEvent>> {
        if !self.open {
            return None;
        }
        let Some(chunk) = self.pending.take_if(|c| c.number == number) else {
            self.seen = Some((number, lsn));
            return None;
        };
        let mut rows = chunk.rows;
        if self.truncated {
            rows.clear();
        }
        rows.retain(|r| r.id.is_some_and(|id| !self.changed.contains(&id)));
        for r in &mut rows {
            r.version = lsn.0;
            r.lsn = lsn.to_string();
        }
        self.close();
        Some(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64) -> ChangeEvent {
        ChangeEvent {
            id: Some(id),
            op: Op::Snapshot,
            user: None,
            event: None,
            timestamp: None,
            event_time: None,
            lsn: "0/0".into(),
            version: 0,
            unchanged: vec![],
            moved_from: None,
        }
    }

    fn chunk(number: u64, ids: &[i64]) -> Chunk {
        Chunk {
            number,
            rows: ids.iter().map(|&i| row(i)).collect(),
            last: false,
        }
    }

    #[test]
    fn keys_the_stream_carries_are_left_out_and_the_rest_versioned_at_the_watermark() {
        let mut w = ChunkWindow::default();
        w.open([2]);
        let mut changed = row(3);
        changed.op = Op::Update;
        w.note(changed.op, changed.id);
        assert!(w.on_chunk(chunk(7, &[1, 2, 3, 4])).is_none());
        let mut later = row(4);
        later.op = Op::Insert;
        w.note(later.op, later.id);
        assert!(w.on_watermark(6, Lsn(90)).is_none(), "another chunk's mark");
        let rows = w.on_watermark(7, Lsn(100)).unwrap();
        assert_eq!(rows.iter().map(|r| r.id.unwrap()).collect::<Vec<_>>(), [1]);
        assert_eq!((rows[0].version, rows[0].lsn.as_str()), (100, "0/64"));
        assert!(!w.is_open());
    }

    #[test]
    fn a_watermark_before_its_chunk_and_a_truncate() {
        let mut w = ChunkWindow::default();
        w.open([]);
        assert!(w.on_watermark(1, Lsn(50)).is_none());
        assert_eq!(w.on_chunk(chunk(1, &[5])).unwrap()[0].version, 50);

        w.open([]);
        let mut t = row(0);
        t.op = Op::Truncate;
        t.id = None;
        w.note(t.op, t.id);
        w.on_chunk(chunk(2, &[8, 9]));
        assert!(w.on_watermark(2, Lsn(60)).unwrap().is_empty());
    }
}
