//! The backfill as the stream command runs it: a task reads chunks (source/postgres/backfill.rs)
//! and hands each to the main loop, which opens the chunk's window before the read and releases
//! its rows when the stream reaches the chunk's watermark. One chunk at a time, so at most one
//! chunk's rows wait in memory; the tables with the ledger one after the other.

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::event::{ChangeEvent, Lsn, Op, RowKey, StreamDeadLetter};
use crate::failpoints;
use crate::progress::Progress;
use crate::source::postgres::backfill::{Backfill, Chunk, ChunkWindow, Scope};
use crate::source::postgres::{SourceConfig, SourceError, TableId};

/// What the backfill task tells the main loop.
pub(super) enum BackfillMsg {
    /// The backfill of this table begins (its watermarks carry `run`).
    Table {
        table: TableId,
        scope: Scope,
        run: String,
    },
    /// How many rows are to do, for progress reports (counted in the task: on a large table the
    /// count takes long, and the main loop must keep answering the server meanwhile).
    Total(u64),
    /// Open the window now; the read starts once the reply arrives.
    Open(oneshot::Sender<()>),
    /// A chunk was read and its watermark written; the reply is sent when its rows were produced.
    Chunk(Chunk, oneshot::Sender<()>),
    /// Every table is done.
    Done,
    Failed(SourceError),
}

/// A chunk's rows let go at its watermark's position `lsn`, and its rows that did not convert.
pub(super) struct Released {
    pub table: TableId,
    pub rows: Vec<ChangeEvent>,
    pub dead: Vec<StreamDeadLetter>,
    pub lsn: Lsn,
}

#[derive(Default)]
pub(super) struct BackfillRun {
    rx: Option<mpsc::Receiver<BackfillMsg>>,
    task: Option<JoinHandle<()>>,
    pub window: ChunkWindow,
    /// The table being backfilled: the window notes only its changes.
    table: Option<TableId>,
    /// Windows of whole-table snapshots still to come, noting their tables' changes from the
    /// session's start, so a row the stream delivers meanwhile is not read a second time.
    early: Vec<(TableId, ChunkWindow)>,
    /// The go-ahead of the chunk waiting for its watermark.
    release: Option<oneshot::Sender<()>>,
    /// The go-ahead of a released chunk, kept until the main loop lets it go.
    held: Option<oneshot::Sender<()>>,
    progress: Option<Progress>,
    released: u64,
    /// Keep a released chunk's go-ahead until the main loop lets it go (exactly-once mode).
    hold: bool,
    /// Per table, the version of a truncate produced for it at the session's start (a table
    /// created again, identity.rs): the stream's changes below it are hidden in ClickHouse, so
    /// they must not keep a row out of the table's read.
    notes_from: Vec<(TableId, u64)>,
}

impl BackfillRun {
    /// A chunk of `table` is about to be read (`ChunkWindow::open`). A table read whole after a
    /// truncate takes no keys from the ledger's backlog: the changes those are of may lie below
    /// the truncate, and the ones above it are noted as they are handed out.
    pub fn open_window(&mut self, table: TableId, unrecorded: impl IntoIterator<Item = i64>) {
        if self.notes_from.iter().any(|&(t, _)| t == table) {
            self.window.open(std::iter::empty());
        } else {
            self.window.open(unrecorded);
        }
    }

    /// Changes of `table` below `version` are not noted (see `notes_from`).
    pub fn note_from(&mut self, table: TableId, version: u64) {
        self.notes_from.push((table, version));
    }

    /// Starts backfilling `tables` (each in its scope), one after the other.
    pub fn start(
        &mut self,
        cfg: &SourceConfig,
        tables: Vec<(TableId, Scope)>,
        chunk: i64,
        hold: bool,
    ) {
        self.hold = hold;
        let (tx, rx) = mpsc::channel(1);
        self.task = Some(tokio::spawn(read_chunks(cfg.clone(), tables, chunk, tx)));
        self.rx = Some(rx);
    }

    /// Starts noting the changes of the whole tables among `tables` now, before their turn.
    pub fn note_early(&mut self, tables: &[(TableId, Scope)]) {
        for &(table, scope) in tables {
            if scope == Scope::Whole {
                let mut window = ChunkWindow::default();
                window.start("", scope);
                self.early.push((table, window));
            }
        }
    }

    /// A table's backfill begins: from now on the window notes its changes.
    pub fn on_table(&mut self, table: TableId, scope: Scope, run: &str) {
        self.table = Some(table);
        match self.early.iter().position(|(t, _)| *t == table) {
            Some(i) => {
                self.window = self.early.swap_remove(i).1;
                self.window.set_run(run);
            }
            None => self.window.start(run, scope),
        }
    }

    /// The table being backfilled.
    pub fn table(&self) -> Option<TableId> {
        self.table
    }

    /// Notes a change for the chunk window, if it is of the table being backfilled.
    pub fn note(
        &mut self,
        table: TableId,
        op: Op,
        key: Option<&RowKey>,
        partial: bool,
        version: u64,
    ) {
        if self
            .notes_from
            .iter()
            .any(|&(t, from)| t == table && version < from)
        {
            return;
        }
        if self.table == Some(table) {
            self.window.note(op, key, partial, version);
        } else if let Some((_, w)) = self.early.iter_mut().find(|(t, _)| *t == table) {
            w.note(op, key, partial, version);
        }
    }

    /// The task's next message; never resolves when no backfill runs. Cancel-safe.
    pub async fn next(&mut self) -> BackfillMsg {
        let Some(rx) = self.rx.as_mut() else {
            return std::future::pending().await;
        };
        let msg = rx.recv().await.unwrap_or_else(|| {
            // A task that ends without saying so failed (it panicked): never take it for done.
            BackfillMsg::Failed(SourceError::Interrupted(
                "the backfill task ended without finishing; it is started again".into(),
            ))
        });
        if matches!(msg, BackfillMsg::Done | BackfillMsg::Failed(_)) {
            if let Some(p) = self.progress.take() {
                p.finish();
            }
            self.stop();
        }
        msg
    }

    /// A chunk was read: its rows if they may go out now.
    pub fn on_chunk(&mut self, chunk: Chunk, release: oneshot::Sender<()>) -> Option<Released> {
        if let Some(p) = self.progress.as_mut() {
            p.add((chunk.rows.len() + chunk.dead.len()) as u64);
        }
        self.release = Some(release);
        let table = chunk.table;
        let (rows, lsn) = self.window.on_chunk(chunk)?;
        Some(self.released(table, rows, lsn))
    }

    /// The stream reached a watermark: the chunk's rows (and the watermark's position) if it was
    /// this run's chunk's.
    pub fn on_watermark(&mut self, tag: &str, lsn: Lsn) -> Option<Released> {
        let table = self.table?;
        let (rows, lsn) = self.window.on_watermark(tag, lsn)?;
        Some(self.released(table, rows, lsn))
    }

    /// Lets the backfill read its next chunk, if a released chunk holds it back.
    pub fn let_next_chunk_go(&mut self) {
        if let Some(r) = self.held.take() {
            let _ = r.send(());
        }
    }

    /// The total to report progress against.
    pub fn set_total(&mut self, total: u64) {
        self.progress = Some(Progress::new("backfill", Some(total)));
    }

    fn released(&mut self, table: TableId, rows: Vec<ChangeEvent>, lsn: Lsn) -> Released {
        if self.released > 0 {
            // A chunk is in flight or in the ledger: a crash here leaves a partly done backfill.
            failpoints::hit(failpoints::STREAM_MID_BACKFILL);
        }
        self.released += 1;
        self.held = self.release.take();
        if !self.hold {
            self.let_next_chunk_go();
        }
        Released {
            table,
            rows,
            dead: self.window.take_dead(),
            lsn,
        }
    }

    /// Ends the run (shutdown, session end): what was not released is read again next time.
    pub fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        self.rx = None;
        self.release = None;
        self.held = None;
        // `table` stays: the caller asks which table the run ended with.
        self.early.clear();
        self.window.close();
    }
}

async fn read_chunks(
    cfg: SourceConfig,
    tables: Vec<(TableId, Scope)>,
    chunk: i64,
    tx: mpsc::Sender<BackfillMsg>,
) {
    for (table, scope) in tables {
        let backfill = match Backfill::new(&cfg, table, scope, chunk).await {
            Ok(b) => b,
            Err(e) => {
                let _ = tx.send(BackfillMsg::Failed(e)).await;
                return;
            }
        };
        let run = backfill.run().to_string();
        if tx
            .send(BackfillMsg::Table { table, scope, run })
            .await
            .is_err()
            || !read_table(backfill, &tx).await
        {
            return;
        }
    }
    let _ = tx.send(BackfillMsg::Done).await;
}

/// One table's chunks; `false` if the backfill ends here (failed, or the main loop is gone).
async fn read_table(mut backfill: Backfill, tx: &mpsc::Sender<BackfillMsg>) -> bool {
    if let Ok(total) = backfill.count_remaining().await {
        if tx.send(BackfillMsg::Total(total as u64)).await.is_err() {
            return false;
        }
    }
    loop {
        let (open, opened) = oneshot::channel();
        if tx.send(BackfillMsg::Open(open)).await.is_err() || opened.await.is_err() {
            return false;
        }
        match backfill.read_chunk().await {
            Ok(Some(chunk)) => {
                let last = chunk.last;
                let (release, released) = oneshot::channel();
                if tx.send(BackfillMsg::Chunk(chunk, release)).await.is_err()
                    || released.await.is_err()
                {
                    return false;
                }
                if last {
                    return true;
                }
            }
            Ok(None) => return true,
            Err(e) => {
                let _ = tx.send(BackfillMsg::Failed(e)).await;
                return false;
            }
        }
    }
}
