//! `stream --exactly-once`: changes are produced inside Kafka transactions of at most
//! `--transaction-max-changes` changes or `--transaction-max-ms`, and each transaction also writes a
//! checkpoint (how far its output reaches, in the stream's order) to a compacted topic. The
//! transactional id is derived from the slot, so a restarted or second instance fences the old one
//! and aborts its open transaction. After any crash the slot replays from its confirmed position,
//! which is never past the ledger, and the ledger never past a committed transaction; replayed
//! changes at or below the last checkpoint are dropped (their rows still go to the ledger). A
//! `read_committed` consumer therefore sees every change exactly once.
//!
//! Backfilled rows are not replayed by the slot: a checkpoint also names the backfilled rows of
//! committed transactions the ledger has not recorded yet, and a restart records them first, so
//! the backfill does not read them again.

use std::time::{Duration, Instant};

use super::tracker::{LedgerRow, Tracker};
use crate::event::{ChangeOrder, Lsn, StreamCheckpoint};
use crate::kafka::producer::KafkaProducer;
use crate::kafka::{checkpoint, KafkaConnection, KafkaError};
use crate::source::postgres::ledger::Ledger;
use crate::source::postgres::{SourceConfig, SourceError};

/// Longest wait for the checkpoint's acknowledgement: the main loop waits meanwhile, and the
/// server drops a replication connection that stays silent for `wal_sender_timeout` (60 s).
const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(20);

pub(super) struct ExactlyOnce {
    /// The transactional id, also the checkpoints' key.
    key: String,
    topic: String,
    connection: KafkaConnection,
    /// `init_transactions` done (it must not run twice).
    transactions_ready: bool,
    /// The last checkpoint was read back.
    checkpoint_read: bool,
    /// The committed output reaches this far: replayed changes at or below it are dropped.
    committed: Option<ChangeOrder>,
    /// Backfilled rows in committed transactions to record in the ledger before anything else.
    repair: Vec<LedgerRow>,
    /// The stream's tables by [`TableId`], as checkpoints name them.
    tables: Vec<String>,
    open: bool,
    started: Instant,
    messages: usize,
    last: Option<ChangeOrder>,
    /// The transaction is full or old enough: produce nothing more until it committed.
    pub committing: bool,
    max_changes: usize,
    max_age: Duration,
}

/// A transaction that could not commit: `Fatal` ends the stream, anything else the session
/// (after an abort, so none of it is ever visible).
pub(super) type TxResult = Result<(), KafkaError>;

impl ExactlyOnce {
    pub fn new(
        database: &str,
        slot: &str,
        topic: String,
        connection: KafkaConnection,
        max_changes: usize,
        max_age: Duration,
        tables: Vec<String>,
    ) -> Self {
        ExactlyOnce {
            key: transactional_id(database, slot),
            topic,
            connection,
            transactions_ready: false,
            checkpoint_read: false,
            committed: None,
            repair: Vec::new(),
            tables,
            open: false,
            started: Instant::now(),
            messages: 0,
            last: None,
            committing: false,
            max_changes: max_changes.max(1),
            max_age,
        }
    }

    /// Once per process, after the slot is ours: fences earlier producers with this id (aborting
    /// their open transaction), then reads the last checkpoint. Every session: records the
    /// backfilled rows of committed transactions the ledger may lack.
    pub async fn start(
        &mut self,
        producer: &KafkaProducer,
        cfg: &SourceConfig,
    ) -> Result<(), SessionStart> {
        if !self.transactions_ready {
            producer
                .init_transactions()
                .await
                .map_err(SessionStart::Kafka)?;
            self.transactions_ready = true;
        }
        if !self.checkpoint_read {
            let (connection, topic, key) = (
                self.connection.clone(),
                self.topic.clone(),
                self.key.clone(),
            );
            let last = tokio::task::spawn_blocking(move || {
                checkpoint::read_last(&connection, &topic, &key)
            })
            .await
            .map_err(|e| SessionStart::Kafka(KafkaError::Delivery(e.to_string())))?
            .map_err(SessionStart::Kafka)?;
            if let Some(cp) = last {
                let order = cp.order().map_err(|e| {
                    SessionStart::Kafka(KafkaError::Topic {
                        topic: self.topic.clone(),
                        reason: e.to_string(),
                    })
                })?;
                tracing::info!(lsn = %order.lsn, index = order.index, backfill_unrecorded = cp.backfill_unrecorded.len(), "exactly-once: resuming after the last committed checkpoint");
                self.committed = Some(order);
                for (table, id) in cp.backfill_rows(&self.tables[0]) {
                    match self.tables.iter().position(|t| *t == table) {
                        Some(t) => self.repair.push((t, id)),
                        None => {
                            tracing::warn!(%table, id, "exactly-once: the last checkpoint names a backfilled row of a table this stream no longer relays; its ledger is left as it is")
                        }
                    }
                }
            }
            self.checkpoint_read = true;
        }
        let mut locked = Vec::new();
        for (table, spec) in cfg.tables.iter().enumerate() {
            let mut ids: Vec<i64> = self
                .repair
                .iter()
                .filter(|(t, _)| *t == table)
                .map(|(_, id)| *id)
                .collect();
            if ids.is_empty() {
                continue;
            }
            if spec.ledger_column.is_none() {
                tracing::warn!(table = %spec.name(), rows = ids.len(), "exactly-once: the last checkpoint names backfilled rows of a table that has no ledger column any more; nothing to record");
                continue;
            }
            let outcome = Ledger::new(cfg, spec)
                .mark_sent(&mut ids)
                .await
                .map_err(SessionStart::Source)?;
            locked.extend(outcome.locked.into_iter().map(|id| (table, id)));
        }
        self.repair = locked;
        if !self.repair.is_empty() {
            return Err(SessionStart::Source(SourceError::Interrupted(format!(
                "{} backfilled rows already in Kafka are locked by another transaction; recording them again shortly",
                self.repair.len()
            ))));
        }
        Ok(())
    }

    /// After a switch to another server or timeline: changes after `to` (the slot's position
    /// there) are produced again even if an earlier checkpoint covers their position. Without
    /// `synchronized_standby_slots` the new timeline may reuse positions the old one committed
    /// for other transactions, and dropping those as replays would lose them; with it they are
    /// the same changes, sent twice (at-least-once across a failover, docs/operations.md).
    pub fn rewind(&mut self, to: Lsn) {
        let floor = ChangeOrder { lsn: to, index: 0 };
        self.committed = self.committed.map(|c| c.min(floor));
    }

    /// Whether a replayed change is already in a committed transaction.
    pub fn replayed(&self, order: ChangeOrder) -> bool {
        self.committed.is_some_and(|c| order <= c)
    }

    /// Opens a transaction if none is.
    pub fn before_produce(&mut self, producer: &KafkaProducer) -> TxResult {
        if !self.open {
            producer.begin_transaction()?;
            self.open = true;
            self.started = Instant::now();
            self.messages = 0;
        }
        Ok(())
    }

    pub fn produced(&mut self, order: ChangeOrder) {
        self.messages += 1;
        self.last = self.last.max(Some(order));
        if self.messages >= self.max_changes {
            self.committing = true;
        }
    }

    /// When the open transaction is old enough to commit.
    pub fn due(&self) -> Option<Instant> {
        (self.open && !self.committing).then_some(self.started + self.max_age)
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Commits the open transaction with its checkpoint. Every delivery must be acknowledged.
    pub async fn commit(&mut self, producer: &KafkaProducer, t: &mut Tracker) -> TxResult {
        self.committing = false;
        if !self.open {
            return Ok(());
        }
        // Never behind an earlier checkpoint: a chunk's rows can go out after later transactions.
        if let Some(last) = self.committed.max(self.last) {
            let rows = t
                .backfill_unrecorded_ids()
                .into_iter()
                .map(|(table, id)| (self.tables[table].clone(), id));
            let cp = StreamCheckpoint::new(last, rows, &self.tables[0]);
            let send = producer.send_and_wait(&self.topic, &self.key, cp.to_json());
            match tokio::time::timeout(CHECKPOINT_TIMEOUT, send).await {
                Ok(r) => r?,
                Err(_) => {
                    return Err(KafkaError::Delivery(format!(
                        "the checkpoint was not acknowledged within {CHECKPOINT_TIMEOUT:?}"
                    )))
                }
            }
        }
        producer.commit_transaction().await?;
        t.transaction_committed();
        self.committed = self.committed.max(self.last);
        self.open = false;
        self.last = None;
        Ok(())
    }

    /// Aborts the open transaction (its messages never become visible).
    pub async fn abort(&mut self, producer: &KafkaProducer, t: &mut Tracker) {
        self.committing = false;
        if self.open {
            if let Err(e) = producer.abort_transaction().await {
                tracing::warn!(error = %e, "aborting the Kafka transaction failed; the broker aborts it at its timeout");
            }
            t.transaction_aborted();
            self.open = false;
            self.last = None;
        }
    }

    /// As a session ends: backfilled rows in committed transactions the ledger did not record.
    pub fn remember_unrecorded(&mut self, t: &Tracker) {
        self.repair.extend(t.committed_backfill_unrecorded());
    }
}

/// Why a session could not start in exactly-once mode.
pub(super) enum SessionStart {
    Kafka(KafkaError),
    Source(SourceError),
}

/// The transactional id of the stream on `slot` of `database`: one per slot, so a second stream on
/// it fences the first, while relays of other databases with the default slot name do not.
pub fn transactional_id(database: &str, slot: &str) -> String {
    format!("cdc-relay.{database}.{slot}")
}
