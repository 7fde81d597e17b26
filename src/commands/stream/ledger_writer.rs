//! The ledger, off the stream's main loop: a task that runs one ledger write at a time while the
//! stream keeps reading, producing and answering keepalives. A write that meets a lock steps back
//! (see `source::postgres::ledger`); its rows are tried again later, and only the slot's confirmed
//! position waits for them.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::metrics::StreamMetrics;
use super::tracker::{LedgerRow, Tracker};
use crate::backoff::Backoff;
use crate::failpoints;
use crate::source::postgres::ledger::{Ledger, LedgerOutcome};
use crate::source::postgres::{SourceConfig, SourceError};

type Outcome = Result<TablesOutcome, SourceError>;

/// What one write did across the tables.
#[derive(Debug, Default)]
pub(super) struct TablesOutcome {
    /// Rows still not recorded because another transaction holds them (or their table) locked.
    locked: Vec<LedgerRow>,
    /// A table itself was locked (DDL).
    table_locked: bool,
}

/// One statement per table, in table order (so concurrent writers lock alike); stops at the
/// first error, the caller retries the whole batch (marking a row twice changes nothing).
async fn mark_sent(
    ledgers: &mut [Option<Ledger>],
    rows: Vec<LedgerRow>,
) -> Result<TablesOutcome, SourceError> {
    let mut out = TablesOutcome::default();
    for (table, ledger) in ledgers.iter_mut().enumerate() {
        let mut ids: Vec<i64> = rows
            .iter()
            .filter(|(t, _)| *t == table)
            .map(|(_, id)| *id)
            .collect();
        let Some(ledger) = ledger.as_mut().filter(|_| !ids.is_empty()) else {
            continue;
        };
        let o: LedgerOutcome = ledger.mark_sent(&mut ids).await?;
        out.locked
            .extend(o.locked.into_iter().map(|id| (table, id)));
        out.table_locked |= o.table_locked;
    }
    Ok(out)
}

pub(super) struct LedgerWriter {
    requests: mpsc::Sender<Vec<LedgerRow>>,
    outcomes: mpsc::Receiver<Outcome>,
    task: JoinHandle<()>,
    /// The write in progress: (delivery, id) pairs and when it started.
    busy: Option<(Vec<(u64, LedgerRow)>, Instant)>,
    /// After an error: no new write before this.
    not_before: Option<Instant>,
    /// Rows another transaction held locked, tried again apart from fresh rows (which then keep
    /// the fast path) and at most every half second.
    held: Vec<(u64, LedgerRow)>,
    held_retry_at: Option<Instant>,
    backoff: Backoff,
    last_warning: Option<Instant>,
}

impl LedgerWriter {
    pub fn start(cfg: &SourceConfig) -> Self {
        let (requests, mut rx) = mpsc::channel::<Vec<LedgerRow>>(1);
        let (tx, outcomes) = mpsc::channel::<Outcome>(1);
        // One ledger per table that has the ledger column (`None` for the others).
        let mut ledgers: Vec<Option<Ledger>> = cfg
            .tables
            .iter()
            .map(|spec| spec.ledger_column.is_some().then(|| Ledger::new(cfg, spec)))
            .collect();
        let task = tokio::spawn(async move {
            while let Some(rows) = rx.recv().await {
                let outcome = mark_sent(&mut ledgers, rows).await;
                if tx.send(outcome).await.is_err() {
                    return;
                }
            }
        });
        LedgerWriter {
            requests,
            outcomes,
            task,
            busy: None,
            not_before: None,
            held: Vec::new(),
            held_retry_at: None,
            backoff: Backoff::new(),
            last_warning: None,
        }
    }

    pub fn is_busy(&self) -> bool {
        self.busy.is_some()
    }

    /// Starts a write of acknowledged rows if none is running and there is enough to write (or
    /// `force`). Never waits.
    pub fn maybe_start(&mut self, t: &mut Tracker, batch: usize, force: bool) {
        let now = Instant::now();
        if self.busy.is_some() || self.not_before.is_some_and(|at| now < at) {
            return;
        }
        let held_due = !self.held.is_empty() && self.held_retry_at.is_none_or(|at| now >= at);
        let rows = if !t.to_ledger.is_empty() && (force || t.to_ledger.len() >= batch) {
            t.take_ledger_batch(batch)
        } else if held_due {
            self.held_retry_at = Some(now + Duration::from_millis(500));
            std::mem::take(&mut self.held)
        } else {
            return;
        };
        failpoints::hit(failpoints::STREAM_AFTER_KAFKA_ACK);
        let ids = rows.iter().map(|(_, row)| *row).collect();
        match self.requests.try_send(ids) {
            Ok(()) => self.busy = Some((rows, Instant::now())),
            // The task is gone (it only ends when this writer is dropped): keep the rows.
            Err(_) => t.to_ledger.extend(rows),
        }
    }

    /// The outcome of the write in progress; never resolves when none is. Cancel-safe.
    pub async fn outcome(&mut self) -> Option<Outcome> {
        if self.busy.is_none() {
            return std::future::pending().await;
        }
        self.outcomes.recv().await
    }

    /// Applies a write's outcome: recorded rows let positions move; rows held locked go back to be
    /// tried again. Only a non-transient failure is an error.
    pub fn finish(
        &mut self,
        outcome: Option<Outcome>,
        t: &mut Tracker,
        metrics: &StreamMetrics,
    ) -> Result<(), SourceError> {
        let Some((rows, started)) = self.busy.take() else {
            return Ok(());
        };
        let outcome = outcome.unwrap_or_else(|| {
            Err(SourceError::Config(
                "the ledger task ended unexpectedly".into(),
            ))
        });
        match outcome {
            Ok(o) => {
                metrics.ledger_seconds.record(started.elapsed());
                metrics.ledger_writes.inc();
                let locked: HashSet<LedgerRow> = o.locked.iter().copied().collect();
                let (held, done): (Vec<_>, Vec<_>) =
                    rows.into_iter().partition(|(_, row)| locked.contains(row));
                metrics.ledger_rows.add(done.len() as u64);
                t.recorded(done.into_iter().map(|(seq, _)| seq));
                failpoints::hit(failpoints::STREAM_AFTER_LEDGER_WRITE);
                self.backoff.reset();
                self.not_before = None;
                if !held.is_empty() {
                    self.warn_held(&held, o.table_locked);
                    if o.table_locked {
                        // DDL: everything waits alike; try again shortly.
                        self.not_before = Some(Instant::now() + Duration::from_millis(500));
                    }
                    self.held.extend(held);
                    self.held_retry_at
                        .get_or_insert(Instant::now() + Duration::from_millis(500));
                }
                metrics.ledger_locked.set(self.held.len() as i64);
                Ok(())
            }
            // A lock, a deadlock, a timeout: try again, the stream goes on. A lost connection or
            // a server going away ends the session instead: a stopping server waits for its
            // walsenders, and ours must not keep it waiting for a ledger it refuses.
            Err(e) if e.is_transient() && !e.is_connection_loss() => {
                let pause = self.backoff.next_pause();
                tracing::warn!(error = %e, retry_in = ?pause, rows = rows.len(), "ledger write failed; retrying (the stream goes on, the confirmed position waits)");
                t.to_ledger.extend(rows);
                self.not_before = Some(Instant::now() + pause);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn warn_held(&mut self, held: &[(u64, LedgerRow)], table_locked: bool) {
        if self
            .last_warning
            .is_some_and(|at| at.elapsed() < Duration::from_secs(10))
        {
            return;
        }
        self.last_warning = Some(Instant::now());
        let sample: Vec<i64> = held.iter().take(5).map(|(_, (_, id))| *id).collect();
        if table_locked {
            tracing::warn!(rows = held.len(), "ledger waiting: the table is locked (a TRUNCATE or ALTER TABLE running or queued?); the stream goes on, the confirmed position waits");
        } else {
            tracing::warn!(rows = held.len(), ids = ?sample, "ledger waiting: rows locked by another transaction (SELECT … FOR UPDATE, an open UPDATE?); the stream goes on, the confirmed position waits behind them");
        }
    }

    /// Writes everything acknowledged before `deadline`, as a session ends. Errors are logged: the
    /// rows not written are simply sent again after the restart.
    pub async fn drain(
        &mut self,
        t: &mut Tracker,
        batch: usize,
        metrics: &StreamMetrics,
        deadline: Instant,
    ) -> bool {
        loop {
            if !self.is_busy() {
                if t.to_ledger.is_empty() {
                    return true;
                }
                if let Some(at) = self.not_before.take() {
                    tokio::time::sleep_until(at.min(deadline).into()).await;
                }
                self.maybe_start(t, batch, true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.outcome()).await {
                Ok(outcome) => {
                    if let Err(e) = self.finish(outcome, t, metrics) {
                        tracing::warn!(error = %e, "ledger write failed while stopping");
                        return false;
                    }
                }
                Err(_) => return false,
            }
            if Instant::now() >= deadline {
                return t.to_ledger.is_empty() && self.held.is_empty() && !self.is_busy();
            }
        }
    }
}

impl Drop for LedgerWriter {
    fn drop(&mut self) {
        self.task.abort();
    }
}
