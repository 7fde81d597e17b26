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

use std::collections::HashMap;

use tokio_postgres::{Client, SimpleQueryMessage, SimpleQueryRow};

use crate::event::{ChangeEvent, Lsn, Op, RowKey, StreamDeadLetter};

use super::pgoutput::Value;
use super::relation::{describe, RelationShape, TupleColumn};
use super::{SourceConfig, SourceError, TableId, TableSpec, WATERMARK_MESSAGE_PREFIX};
use crate::types::ColumnSchema;

/// Rows read by one chunk, waiting for their watermark.
#[derive(Debug)]
pub struct Chunk {
    /// The table the rows are of.
    pub table: TableId,
    /// The watermark's content: this run's tag and the chunk's number, so a watermark written by
    /// another relay on the same database (logical messages reach every slot) is never taken for
    /// ours.
    pub tag: String,
    pub rows: Vec<ChangeEvent>,
    /// Rows that do not convert (a value outside its type's mapping): they go to the stream's
    /// dead-letter topic, as a streamed change would, instead of stopping the stream.
    pub dead: Vec<StreamDeadLetter>,
    /// Fewer rows than asked for: nothing is left after this one.
    pub last: bool,
}

/// Which rows a backfill reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Rows the ledger column does not mark sent (a table with the ledger; an integer key).
    Unsent,
    /// Every row: the initial snapshot of a table without the ledger (any key).
    Whole,
}

pub struct Backfill {
    client: Client,
    table: TableId,
    spec: TableSpec,
    scope: Scope,
    /// The table's columns when the chunk query was made; read again when a column it names is
    /// dropped meanwhile.
    shape: RelationShape,
    query: ChunkQuery,
    count_query: String,
    chunk: i64,
    after_id: i64,
    /// [`Scope::Whole`]: the text of the last row's key columns (none before the first chunk).
    after_key: Option<Vec<String>>,
    /// Prefix of this run's watermarks: the slot and a random number.
    run: String,
    next_chunk: u64,
    done: bool,
}

impl Backfill {
    /// A backfill of `table`'s rows in `scope`, each chunk in its own statement.
    pub async fn new(
        cfg: &SourceConfig,
        table: TableId,
        scope: Scope,
        chunk: i64,
    ) -> Result<Self, SourceError> {
        let spec = &cfg.tables[table];
        let client = cfg.connect_sql().await?;
        let (shape, query) = chunk_query(spec, &client, scope).await?;
        let count_query = match scope {
            Scope::Unsent => format!(
                "SELECT count(*) FROM {} WHERE {} IS NOT TRUE",
                spec.qualified(),
                spec.ledger().unwrap_or_default()
            ),
            // The planner's estimate: a count of a large table takes long, and it only feeds
            // the progress report.
            Scope::Whole => format!(
                "SELECT greatest(reltuples, 0)::int8 FROM pg_class WHERE oid = {}::regclass",
                super::client::quote_literal(&spec.qualified())
            ),
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Ok(Backfill {
            client,
            table,
            spec: spec.clone(),
            scope,
            shape,
            query,
            count_query,
            chunk: chunk.max(1),
            after_id: i64::MIN,
            after_key: None,
            run: format!("{}/{:x}{:x}/", cfg.slot, std::process::id(), nanos),
            next_chunk: 1,
            done: false,
        })
    }

    /// The prefix of this run's watermarks.
    pub fn run(&self) -> &str {
        &self.run
    }

    /// Rows still to do, for progress reports.
    pub async fn count_remaining(&self) -> Result<i64, SourceError> {
        let row = self
            .client
            .query_one(&self.count_query, &[])
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
        let rows = match self.query_chunk().await {
            // A column the query names was dropped (or retyped) since: read the shape again.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_COLUMN) => {
                tracing::info!(table = %self.spec.name(), "the table's columns changed during the backfill; reading them again");
                (self.shape, self.query) =
                    chunk_query(&self.spec, &self.client, self.scope).await?;
                self.query_chunk().await
            }
            other => other,
        }
        .map_err(SourceError::sql("reading rows to backfill"))?;
        let last = (rows.len() as i64) < self.chunk;
        let mut events = Vec::with_capacity(rows.len());
        let mut dead = Vec::new();
        let mut values = Vec::new();
        for row in &rows {
            values.clear();
            for i in 0..row.len() {
                values.push(match row.get(i) {
                    Some(text) => Value::Text(bytes::Bytes::copy_from_slice(text.as_bytes())),
                    None => Value::Null,
                });
            }
            // Version and position are set when the watermark comes by.
            match self.shape.event(Op::Snapshot, &values, Lsn::ZERO, 0) {
                Ok(event) => {
                    if let Some(id) = event.id() {
                        self.after_id = id;
                    }
                    events.push(event);
                }
                Err(e) => {
                    let key = self.shape.key_of(&values);
                    if let Some(id) = key.as_ref().and_then(RowKey::as_int) {
                        self.after_id = id;
                    }
                    dead.push(StreamDeadLetter {
                        table: self.spec.name(),
                        op: Op::Snapshot,
                        id: key.as_ref().and_then(RowKey::as_int),
                        key: key.filter(|k| k.as_int().is_none()).map(|k| k.kafka_key()),
                        lsn: Lsn::ZERO.to_string(),
                        version: 0,
                        error: e.to_string(),
                        row: Some(self.shape.describe(&values)),
                        row_truncated: false,
                    });
                }
            }
        }
        if let Some(row) = rows.last() {
            self.after_key = Some(
                self.shape
                    .key_indexes()
                    .iter()
                    .map(|&i| row.get(i).unwrap_or_default().to_string())
                    .collect(),
            );
        }
        let tag = format!("{}{}", self.run, self.next_chunk);
        self.next_chunk += 1;
        // Written after the read finished, so it is later in the WAL than the commit of every
        // transaction the read saw.
        self.client
            .query_one(
                "SELECT pg_logical_emit_message(false, $1, $2)::text",
                &[&WATERMARK_MESSAGE_PREFIX, &tag],
            )
            .await
            .map_err(SourceError::sql("writing a backfill watermark"))?;
        self.done = last;
        if events.is_empty() && dead.is_empty() {
            return Ok(None);
        }
        Ok(Some(Chunk {
            table: self.table,
            tag,
            rows: events,
            dead,
            last,
        }))
    }
}

impl Backfill {
    /// The next chunk's rows, each value the text of its type's output function (the simple
    /// query protocol), which is what pgoutput sends: a `::text` cast differs for some types
    /// (`char(n)` loses its padding, `inet` gains a `/32`). The values bound into the statement
    /// are integers or quoted literals.
    async fn query_chunk(&self) -> Result<Vec<SimpleQueryRow>, tokio_postgres::Error> {
        let q = &self.query;
        let sql = match (&q.after, &self.after_key) {
            (After::Id { key, ledger }, _) => format!(
                "{} WHERE t.{key} > {} AND t.{ledger} IS NOT TRUE ORDER BY t.{key} LIMIT {}",
                q.select, self.after_id, self.chunk
            ),
            (After::Key { order, .. }, None) => {
                format!("{} ORDER BY {order} LIMIT {}", q.select, self.chunk)
            }
            (After::Key { order, types }, Some(after)) => {
                let values: Vec<String> = after
                    .iter()
                    .zip(types)
                    .map(|(v, ty)| format!("{}::{ty}", super::client::quote_literal(v)))
                    .collect();
                format!(
                    "{} WHERE ({order}) > ({}) ORDER BY {order} LIMIT {}",
                    q.select,
                    values.join(", "),
                    self.chunk
                )
            }
        };
        Ok(self
            .client
            .simple_query(&sql)
            .await?
            .into_iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(row) => Some(row),
                _ => None,
            })
            .collect())
    }
}

/// How a backfill reads its chunks: every column of the table, after the last row read.
struct ChunkQuery {
    /// `SELECT <every column> FROM <table> AS t`.
    select: String,
    after: After,
}

/// What "after the last row" means.
enum After {
    /// [`Scope::Unsent`]: above the last id, among rows the ledger does not mark sent.
    Id { key: String, ledger: String },
    /// [`Scope::Whole`]: above the last key, compared as a row in its columns' own types and
    /// collations (`(a, b) > ('1'::integer, 'x'::text)`), the order of the key's index.
    Key { order: String, types: Vec<String> },
}

/// A table's shape as the catalog describes it now, and its columns in attribute order (generated
/// columns left out: pgoutput does not send them).
pub async fn describe_table(
    client: &Client,
    spec: &TableSpec,
) -> Result<(RelationShape, Vec<TupleColumn>), SourceError> {
    let table = spec.qualified();
    let rows = client
        .query(
            "SELECT c.oid, a.attname::text, a.atttypid, a.atttypmod \
             FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid \
             WHERE c.oid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
             ORDER BY a.attnum",
            &[&table],
        )
        .await
        .map_err(SourceError::sql(format!("reading the columns of {table}")))?;
    let oid: u32 = rows.first().map_or(0, |r| r.get(0));
    let columns: Vec<TupleColumn> = rows
        .iter()
        .map(|r| TupleColumn {
            name: r.get(1),
            type_oid: r.get(2),
            typmod: r.get(3),
            identity: None,
            type_hint: None,
        })
        .collect();
    let shape = describe(
        client,
        oid,
        &spec.schema,
        &spec.table,
        &columns,
        spec.ledger_column.as_deref(),
        spec.seed,
    )
    .await?;
    Ok((shape, columns))
}

/// The table's shape and the chunk query over its columns as they are now (read as text whatever
/// their type: an ENUM or a domain read as `&str` made the read fail). Ordered by the key
/// qualified (`t.id`), so the order is the key's own, never its text's ("10" < "9").
async fn chunk_query(
    spec: &TableSpec,
    client: &Client,
    scope: Scope,
) -> Result<(RelationShape, ChunkQuery), SourceError> {
    let table = spec.qualified();
    let (shape, columns) = describe_table(client, spec).await?;
    let select: Vec<String> = columns
        .iter()
        .map(|c| format!("t.{}", super::client::quote_ident(&c.name)))
        .collect();
    let select = format!("SELECT {} FROM {table} AS t", select.join(", "));
    let after = match scope {
        Scope::Unsent => After::Id {
            key: spec.key(),
            ledger: spec.ledger().unwrap_or_default(),
        },
        Scope::Whole => {
            let key: Vec<&ColumnSchema> = shape
                .key_indexes()
                .iter()
                .filter_map(|&i| shape.slot_of(i).map(|s| &shape.schema().columns[s]))
                .collect();
            After::Key {
                order: key
                    .iter()
                    .map(|c| format!("t.{}", super::client::quote_ident(&c.name)))
                    .collect::<Vec<_>>()
                    .join(", "),
                types: key.iter().map(|c| c.type_name.clone()).collect(),
            }
        }
    };
    let query = ChunkQuery { select, after };
    Ok((shape, query))
}

/// Most notes a whole-table snapshot keeps for keys without an order the relay knows.
pub const MAX_KEPT_NOTES: usize = 1_000_000;

/// What the stream did to a key while a chunk that may hold its row was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Noted {
    /// The stream carries a whole state of the row at least as new as the chunk's: the chunk's
    /// row is left out.
    Superseded,
    /// Only updates that left unchanged TOASTed columns out, the earliest at this version: the
    /// chunk's row goes out just below it, as the base those columns are filled from.
    Partial(u64),
}

/// What the stream does to the table while a backfill runs: from its start, between chunks and
/// while each chunk is read, until the chunk's watermark comes by.
#[derive(Debug, Default)]
pub struct ChunkWindow {
    /// Noting changes (a backfill runs).
    active: bool,
    /// Integer keys at or below this were read by earlier chunks: later chunks cannot hold them.
    floor: Option<i64>,
    /// By the key's text ([`RowKey::kafka_key`]), whatever the key's type.
    noted: HashMap<String, Noted>,
    /// Notes outlive a chunk ([`Scope::Whole`]).
    keep_notes: bool,
    truncated: bool,
    pending: Option<Chunk>,
    /// A watermark of this run that came by before its chunk arrived (the stream can be quicker
    /// than the channel that brings the chunk).
    seen: Option<(String, Lsn)>,
    run: String,
    /// The released chunk's dead letters ([`Self::take_dead`]).
    dead: Vec<StreamDeadLetter>,
}

impl ChunkWindow {
    /// A backfill starts: note changes from now on. `run` prefixes its watermarks.
    ///
    /// [`Scope::Whole`] keeps its notes of whole row states from one chunk to the next: with no
    /// ledger to say which rows the stream already carried, a row the stream delivered (inserted
    /// or changed since the snapshot began) is left out of the later chunk that reads it too,
    /// instead of going out a second time with the same values. Integer keys at or below the
    /// last chunk's are dropped from the notes; past [`MAX_KEPT_NOTES`] kept notes they are all
    /// dropped at the next watermark (such rows may then go out twice, with the same values and
    /// a later version). Notes inside a chunk's window are never dropped: they decide which of
    /// the chunk's rows are stale.
    pub fn start(&mut self, run: &str, scope: Scope) {
        self.close();
        self.active = true;
        self.keep_notes = scope == Scope::Whole;
        self.run = run.to_string();
    }

    /// Names the run whose watermarks this window takes (a window started before its run was
    /// known keeps what it noted).
    pub fn set_run(&mut self, run: &str) {
        self.run = run.to_string();
    }

    /// A chunk is about to be read. `unrecorded` are keys of changes produced but not yet in the
    /// ledger: the read may still see their rows as unsent.
    pub fn open(&mut self, unrecorded: impl IntoIterator<Item = i64>) {
        for id in unrecorded {
            self.note_key(&RowKey::Int(id), Noted::Superseded);
        }
    }

    /// The backfill ended (done, failed or stopped).
    pub fn close(&mut self) {
        *self = ChunkWindow::default();
    }

    /// The stream handed out a change of `id` (a truncate has none). `partial`: an update that
    /// left unchanged TOASTed columns out; `version`: the change's version.
    pub fn note(&mut self, op: Op, key: Option<&RowKey>, partial: bool, version: u64) {
        if !self.active {
            return;
        }
        match (op, key) {
            (Op::Truncate, _) => self.truncated = true,
            (Op::Update, Some(key)) if partial => self.note_key(key, Noted::Partial(version)),
            (_, Some(key)) => self.note_key(key, Noted::Superseded),
            _ => {}
        }
    }

    fn note_key(&mut self, key: &RowKey, what: Noted) {
        if let (Some(floor), Some(id)) = (self.floor, key.as_int()) {
            if id <= floor {
                return;
            }
        }
        let entry = self.noted.entry(key.kafka_key()).or_insert(what);
        *entry = match (*entry, what) {
            (Noted::Partial(a), Noted::Partial(b)) => Noted::Partial(a.min(b)),
            _ => Noted::Superseded,
        };
    }

    /// The dead letters of the chunk released last.
    pub fn take_dead(&mut self) -> Vec<StreamDeadLetter> {
        std::mem::take(&mut self.dead)
    }

    /// The chunk was read; its rows (and the watermark's position) if its watermark already came
    /// by.
    pub fn on_chunk(&mut self, chunk: Chunk) -> Option<(Vec<ChangeEvent>, Lsn)> {
        let seen = self.seen.take();
        let tag = chunk.tag.clone();
        self.pending = Some(chunk);
        match seen {
            Some((t, lsn)) if t == tag => self.on_watermark(&t, lsn),
            _ => None,
        }
    }

    /// The stream reached a watermark whose message LSN is `lsn`: the chunk's rows to produce now,
    /// if it is this run's pending chunk's.
    pub fn on_watermark(&mut self, tag: &str, lsn: Lsn) -> Option<(Vec<ChangeEvent>, Lsn)> {
        if !self.active || !tag.starts_with(&self.run) {
            return None;
        }
        let Some(chunk) = self.pending.take_if(|c| c.tag == tag) else {
            self.seen = Some((tag.to_string(), lsn));
            return None;
        };
        let top = chunk_max(&chunk.rows);
        let mut rows = chunk.rows;
        let mut dead = chunk.dead;
        if self.truncated {
            rows.clear();
            dead.clear();
        }
        for d in &mut dead {
            d.lsn = lsn.to_string();
            d.version = lsn.0.saturating_sub(1);
        }
        dead.retain(|d| {
            d.row_key()
                .is_none_or(|k| !self.noted.contains_key(&k.kafka_key()))
        });
        self.dead = dead;
        // The message's position is the end of its record: every commit before it is at least a
        // record (24 bytes) below, every one after at or above it.
        let version = lsn.0.saturating_sub(1);
        rows.retain_mut(|r| {
            let Some(key) = r.key.as_ref() else {
                return false;
            };
            r.lsn = lsn.to_string();
            match self.noted.get(&key.kafka_key()) {
                None => r.version = version,
                Some(Noted::Superseded) => return false,
                Some(Noted::Partial(v)) => r.version = v.saturating_sub(1).min(version),
            }
            true
        });
        // Later chunks start above this one's last key, so keys at or below it need no notes; the
        // rest start afresh: the next window is opened at once and seeded again.
        self.floor = top.or(self.floor);
        if self.keep_notes && self.noted.len() <= MAX_KEPT_NOTES {
            // A partial update before a chunk's window must not demote the chunk's full row: the
            // row, read after it, is newer than it.
            let floor = self.floor;
            self.noted.retain(|k, what| {
                *what == Noted::Superseded
                    && floor.is_none_or(|f| k.parse::<i64>().map_or(true, |id| id > f))
            });
        } else {
            self.noted.clear();
        }
        self.truncated = false;
        Some((rows, lsn))
    }
}

fn chunk_max(rows: &[ChangeEvent]) -> Option<i64> {
    rows.iter().filter_map(|r| r.id()).max()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64) -> ChangeEvent {
        ChangeEvent {
            key: Some(crate::event::RowKey::Int(id)),
            op: Op::Snapshot,
            row: crate::event::Row::Seed(Default::default()),
            lsn: "0/0".into(),
            version: 0,
            unchanged: vec![],
            json_null: vec![],
            moved_from: None,
            schema: None,
        }
    }

    fn chunk(number: u64, ids: &[i64]) -> Chunk {
        Chunk {
            table: 0,
            tag: format!("slot/run/{number}"),
            rows: ids.iter().map(|&i| row(i)).collect(),
            dead: vec![],
            last: false,
        }
    }

    fn ids(rows: &[ChangeEvent]) -> Vec<i64> {
        rows.iter().map(|r| r.id().unwrap()).collect()
    }

    #[test]
    fn keys_the_stream_carries_are_left_out_and_the_rest_versioned_below_the_watermark() {
        let mut w = ChunkWindow::default();
        w.start("slot/run/", Scope::Unsent);
        w.open([2]);
        w.note(Op::Update, Some(&RowKey::Int(3)), false, 70);
        w.note(Op::Delete, Some(&RowKey::Int(5)), false, 71);
        assert!(w.on_chunk(chunk(7, &[1, 2, 3, 4, 5, 6])).is_none());
        w.note(Op::Insert, Some(&RowKey::Int(4)), false, 80);
        // An update that left a TOASTed column out: the chunk's row goes out just below it.
        w.note(Op::Update, Some(&RowKey::Int(6)), true, 90);
        assert!(
            w.on_watermark("slot/run/6", Lsn(95)).is_none(),
            "another chunk's mark"
        );
        assert!(
            w.on_watermark("other/run/7", Lsn(96)).is_none(),
            "another relay's mark"
        );
        let (rows, _) = w.on_watermark("slot/run/7", Lsn(100)).unwrap();
        assert_eq!(ids(&rows), [1, 6]);
        assert_eq!((rows[0].version, rows[0].lsn.as_str()), (99, "0/64"));
        assert_eq!(rows[1].version, 89);
        // Keys up to the chunk's last are never read again: no notes for them.
        w.note(Op::Insert, Some(&RowKey::Int(6)), false, 110);
        w.open([]);
        assert!(w.on_chunk(chunk(8, &[7])).is_none());
        assert_eq!(ids(&w.on_watermark("slot/run/8", Lsn(120)).unwrap().0), [7]);
    }

    #[test]
    fn a_watermark_before_its_chunk_and_a_truncate() {
        let mut w = ChunkWindow::default();
        w.start("slot/run/", Scope::Unsent);
        w.open([]);
        assert!(w.on_watermark("slot/run/1", Lsn(50)).is_none());
        assert_eq!(w.on_chunk(chunk(1, &[5])).unwrap().0[0].version, 49);

        w.open([]);
        w.note(Op::Truncate, None, false, 55);
        w.on_chunk(chunk(2, &[8, 9]));
        assert!(w.on_watermark("slot/run/2", Lsn(60)).unwrap().0.is_empty());
        w.open([]);
        w.on_chunk(chunk(3, &[10]));
        assert_eq!(
            ids(&w.on_watermark("slot/run/3", Lsn(70)).unwrap().0),
            [10],
            "a truncate counts for its chunk only"
        );
    }

    #[test]
    fn rows_of_any_key_that_changed_before_the_watermark_are_left_out() {
        let mut w = ChunkWindow::default();
        w.start("slot/run/", Scope::Unsent);
        let composite = RowKey::Json(serde_json::json!({"a": 1, "b": "x"}));
        let text = RowKey::Json("y".into());
        let (mut changed, mut kept) = (row(0), row(0));
        changed.key = Some(composite.clone());
        kept.key = Some(text.clone());
        w.note(Op::Update, Some(&composite), false, 5);
        let c = Chunk {
            table: 0,
            tag: "slot/run/1".into(),
            rows: vec![changed, kept],
            dead: vec![],
            last: false,
        };
        assert!(w.on_chunk(c).is_none());
        let (rows, _) = w.on_watermark("slot/run/1", Lsn(100)).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].key, Some(text));
        assert_eq!(rows[0].version, 99);
    }
}
