//! What one message means to the sink, and the batch of rows that fills between inserts.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::event::{ChangeEvent, Columns, Op, Row};
use crate::kafka::consumer::Consumed;
use crate::sink::clickhouse::batch::Unfilled;
use crate::sink::clickhouse::table::{GenericRow, TableState};
use crate::sink::clickhouse::{SeedRow, UserLoginRow};

/// The rows of one generic table in a batch.
pub(super) struct TableBatch {
    /// The newest schema state its rows were made with (its key columns name the stored rows).
    pub state: Arc<TableState>,
    pub rows: Vec<GenericRow>,
    pub unchanged: Vec<Unfilled<String>>,
}

pub(super) struct Batch {
    pub rows: Vec<SeedRow>,
    /// Rows whose update left TOASTed columns out (index into `rows`, the columns).
    pub unchanged: Vec<Unfilled>,
    /// Generic tables' rows, by ClickHouse table.
    pub tables: BTreeMap<String, TableBatch>,
    pub generic_rows: usize,
    /// Highest handled offset per (topic index, partition).
    pub handled: BTreeMap<(usize, i32), i64>,
    pub deadline: Option<Instant>,
}

impl Batch {
    pub fn new() -> Self {
        Batch {
            rows: Vec::new(),
            unchanged: Vec::new(),
            tables: BTreeMap::new(),
            generic_rows: 0,
            handled: BTreeMap::new(),
            deadline: None,
        }
    }

    pub fn mark(&mut self, msg: &Consumed, interval: Duration) {
        let e = self
            .handled
            .entry((msg.topic_index, msg.partition))
            .or_insert(msg.offset);
        *e = (*e).max(msg.offset);
        self.deadline
            .get_or_insert_with(|| Instant::now() + interval);
    }

    pub fn is_empty(&self) -> bool {
        self.handled.is_empty()
    }

    pub fn len(&self) -> usize {
        self.rows.len() + self.generic_rows
    }

    /// A seed row; `unchanged`: its columns to fill from an earlier state (ClickHouse names).
    pub fn push_seed(&mut self, row: SeedRow, unchanged: Vec<String>, moved_from: Option<i64>) {
        if !unchanged.is_empty() {
            self.unchanged.push(Unfilled {
                idx: self.rows.len(),
                cols: unchanged,
                from: moved_from.unwrap_or(row.row.id),
            });
        }
        self.rows.push(row);
    }

    pub fn push_generic(
        &mut self,
        state: &Arc<TableState>,
        row: GenericRow,
        unchanged: Vec<String>,
        fill_from: String,
    ) {
        let t = self
            .tables
            .entry(state.names.table.clone())
            .or_insert_with(|| TableBatch {
                state: state.clone(),
                rows: Vec::new(),
                unchanged: Vec::new(),
            });
        t.state = state.clone();
        if !unchanged.is_empty() {
            t.unchanged.push(Unfilled {
                idx: t.rows.len(),
                cols: unchanged,
                from: fill_from,
            });
        }
        t.rows.push(row);
        self.generic_rows += 1;
    }
}

/// What one message means to the sink.
pub(super) enum Parsed {
    /// A seed row to store.
    Row(SeedMessage),
    /// Hide every row of the seed's table stored before this version.
    Truncate { version: u64 },
    /// A change in the columns form (a row or a truncate): its table is in the schema it names.
    Columns(Box<ChangeEvent>),
}

/// A seed row as read from its message.
pub(super) struct SeedMessage {
    pub row: UserLoginRow,
    /// Columns the change left out (unchanged TOAST values), by PostgreSQL name.
    pub unchanged: Vec<String>,
    /// The id a key update moved the row from.
    pub moved_from: Option<i64>,
    /// Columns a user added to the seed's table (their types are in the schema the message names).
    pub added: Columns,
}

impl Parsed {
    /// Whether the message's fate is decided after parsing (so its payload is kept).
    pub fn decided_later(&self) -> bool {
        match self {
            Parsed::Columns(_) => true,
            Parsed::Row(m) => !m.added.is_empty(),
            Parsed::Truncate { .. } => false,
        }
    }
}

/// A message as the sink uses it; `Err` sends it to the dead-letter topic with the reason.
/// `unsigned_id`: the seed table's id is UInt64, so a negative id cannot be stored.
pub(super) fn parse(payload: &[u8], unsigned_id: bool) -> Result<Parsed, String> {
    let (mut event, micros) =
        ChangeEvent::from_json_with_time(payload).map_err(|e| e.to_string())?;
    let added = match &mut event.row {
        Row::Columns(_) => return Ok(Parsed::Columns(Box::new(event))),
        Row::Seed(seed) => std::mem::take(&mut seed.extra),
    };
    if event.op == Op::Truncate {
        return Ok(Parsed::Truncate {
            version: event.version,
        });
    }
    let unchanged = std::mem::take(&mut event.unchanged);
    let moved_from = event
        .moved_from
        .as_ref()
        .and_then(crate::event::RowKey::as_int);
    let row = UserLoginRow::from_parts(event, micros).map_err(|e| e.to_string())?;
    row.check_storable(unsigned_id).map_err(|e| e.to_string())?;
    Ok(Parsed::Row(SeedMessage {
        row,
        unchanged,
        moved_from,
        added,
    }))
}
