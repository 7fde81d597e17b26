//! The sink's handling of messages in the columns form: the schema they name, its table brought to
//! that schema before any of its rows is written, and the batch's rows completed before the insert.

use std::sync::Arc;

use crate::backoff::Backoff;
use crate::event::{schemas_topic, ChangeEvent, Op, SCHEMA_HEADER};
use crate::kafka::consumer::{Consumed, SchemaHeader};
use crate::sink::clickhouse::batch::{
    fill_from_batch, fill_from_stored, keep_last_of_equal_versions,
};
use crate::sink::clickhouse::tables::Applied;
use crate::sink::clickhouse::{SeedRow, SinkError};
use crate::types::RelationSchema;

use super::batch::{Batch, SeedMessage};
use super::SinkCommand;

/// Why a columns message did not become a row.
enum Outcome {
    Stored,
    /// To the dead-letter topic, with this reason.
    Reject(String),
    /// Shutdown came first: the message is read again next time.
    Interrupted,
    /// Waiting cannot mend it (a table of the other layout): the sink stops, the message is read
    /// again by the next start.
    Fatal(SinkError),
}

impl SinkCommand {
    /// Handles one message of the columns form. `false` if shutdown interrupted it (the message
    /// is then not marked handled).
    pub(super) async fn columns_message(
        &mut self,
        msg: &Consumed,
        event: ChangeEvent,
        batch: &mut Batch,
    ) -> Result<bool, SinkError> {
        let outcome = self.columns_outcome(msg, event, batch).await;
        self.settle(msg, outcome).await
    }

    async fn settle(&mut self, msg: &Consumed, outcome: Outcome) -> Result<bool, SinkError> {
        match outcome {
            Outcome::Stored => Ok(true),
            Outcome::Interrupted => Ok(false),
            Outcome::Reject(reason) => Ok(self.dead_letter(msg, &reason).await),
            Outcome::Fatal(e) => Err(e),
        }
    }

    async fn columns_outcome(
        &mut self,
        msg: &Consumed,
        event: ChangeEvent,
        batch: &mut Batch,
    ) -> Outcome {
        let (id, rel) = match self.schema_of(msg).await {
            Ok(found) => found,
            Err(reason) => return Outcome::Reject(reason),
        };
        if self.tables.applied(&id).is_none() {
            // The change may rename a column earlier rows are written under: store them first.
            if !self.flush(batch).await || !self.finish_insert().await {
                return Outcome::Interrupted;
            }
            // Every schema written so far: the view shows the newest names, whichever sink plans.
            self.registries[msg.topic_index].read_to_end().await;
            let history = self.registries[msg.topic_index].history(&rel);
            let mut backoff = Backoff::new();
            let outcome = loop {
                match self.tables.apply(&id, &rel, &history).await {
                    Ok(o) => break o,
                    Err(e) if e.needs_operator() => return Outcome::Fatal(e),
                    Err(e) => {
                        if !self
                            .pause_after(&e, "applying a table's schema", &mut backoff)
                            .await
                        {
                            return Outcome::Interrupted;
                        }
                    }
                }
            };
            self.metrics.schema_changes.add(outcome.changes as u64);
            if outcome.refused {
                self.metrics.schema_changes_refused.inc();
            }
        }
        let state = match self.tables.applied(&id) {
            Some(Applied::Ready(state)) => state.clone(),
            Some(Applied::Refused(r)) => return Outcome::Reject(r.to_string()),
            None => return Outcome::Interrupted,
        };
        if event.op == Op::Truncate {
            // Everything before the truncate must be stored before it applies.
            if !self.flush(batch).await || !self.finish_insert().await {
                return Outcome::Interrupted;
            }
            let (writer, table, version) = (
                self.tables.writer().clone(),
                state.names.table.clone(),
                event.version,
            );
            let applied = self
                .retry("applying a truncate", || {
                    writer.truncate_before(&table, version)
                })
                .await;
            if applied.is_none() {
                return Outcome::Interrupted;
            }
            self.tables.raise_watermark(&table, version);
            return Outcome::Stored;
        }
        match state.row(event) {
            Ok(p) => {
                batch.push_generic(&state, p.row, p.unchanged, p.fill_from);
                Outcome::Stored
            }
            Err(e) => Outcome::Reject(e.to_string()),
        }
    }

    /// The schema a message names in its header, read from its topic's schemas topic; `Err` is
    /// why the message goes to the dead-letter topic.
    async fn schema_of(&mut self, msg: &Consumed) -> Result<(String, Arc<RelationSchema>), String> {
        let topic = self.consumer.topics()[msg.topic_index].clone();
        let id = match msg.schema {
            SchemaHeader::Id(_) => msg.schema.id().unwrap_or_default().to_string(),
            SchemaHeader::Absent => {
                return Err(format!(
                    "a message with columns but without the {SCHEMA_HEADER} header: the sink cannot tell their types (was it written by a stream that publishes schemas to {}?)",
                    schemas_topic(&topic)
                ))
            }
            SchemaHeader::Malformed => {
                return Err(format!(
                    "the {SCHEMA_HEADER} header is not a schema id (16 hex digits)"
                ))
            }
        };
        let wait = self.args.schema_wait;
        let registry = &mut self.registries[msg.topic_index];
        match registry.find(&id, wait).await {
            Some(rel) => Ok((id, rel)),
            None => Err(format!(
                "schema {id} (the message's {SCHEMA_HEADER} header) is not in {} after waiting {}s. The stream writes every schema there before the first message naming it, so the record is gone: check that the topic exists, was not deleted or recreated, and is compacted (cleanup.policy=compact), never deleted by retention",
                registry.topic(),
                wait.as_secs()
            )),
        }
    }

    /// A seed row, with the columns a user added to the seed's table. `false` if shutdown
    /// interrupted it (the message is then not marked handled).
    pub(super) async fn seed_message(
        &mut self,
        msg: &Consumed,
        m: SeedMessage,
        batch: &mut Batch,
    ) -> Result<bool, SinkError> {
        let outcome = self.seed_outcome(msg, m, batch).await;
        self.settle(msg, outcome).await
    }

    async fn seed_outcome(&mut self, msg: &Consumed, m: SeedMessage, batch: &mut Batch) -> Outcome {
        if m.added.is_empty() {
            batch.push_seed(SeedRow::plain(m.row), m.unchanged, m.moved_from);
            return Outcome::Stored;
        }
        let (id, rel) = match self.schema_of(msg).await {
            Ok(found) => found,
            Err(reason) => return Outcome::Reject(reason),
        };
        if self.seed_table.applied(&id).is_none() {
            // A rename moves where later rows are written: store the earlier ones first.
            if !self.flush(batch).await || !self.finish_insert().await {
                return Outcome::Interrupted;
            }
            // Every schema written so far: the view shows the newest names, whichever sink plans.
            self.registries[msg.topic_index].read_to_end().await;
            let history = self.registries[msg.topic_index].history(&rel);
            let mut backoff = Backoff::new();
            let outcome = loop {
                match self.seed_table.apply(&id, &rel, &history).await {
                    Ok(o) => break o,
                    Err(e) if e.needs_operator() => return Outcome::Fatal(e),
                    Err(e) => {
                        if !self
                            .pause_after(
                                &e,
                                "applying the seed table's added columns",
                                &mut backoff,
                            )
                            .await
                        {
                            return Outcome::Interrupted;
                        }
                    }
                }
            };
            self.metrics.schema_changes.add(outcome.changes as u64);
            if outcome.refused {
                self.metrics.schema_changes_refused.inc();
            }
        }
        let added = match self.seed_table.applied(&id) {
            Some(Applied::Ready(a)) => a.clone(),
            Some(Applied::Refused(r)) => return Outcome::Reject(r.to_string()),
            None => return Outcome::Interrupted,
        };
        match added.cells(&m.added, &m.unchanged) {
            Ok((extra, unchanged)) => {
                batch.push_seed(SeedRow { row: m.row, extra }, unchanged, m.moved_from);
                Outcome::Stored
            }
            Err(e) => Outcome::Reject(e.to_string()),
        }
    }

    /// Logs a failed ClickHouse step and waits before the next try; `false` on shutdown. Every
    /// failure but one that needs the operator is retried, as inserts are: a refused statement is
    /// a bug to see in the log, not a reason to drop rows.
    async fn pause_after(&mut self, e: &SinkError, what: &str, backoff: &mut Backoff) -> bool {
        let pause = backoff.next_pause();
        self.metrics.retries.inc();
        tracing::warn!(error = %e, retry_in = ?pause, "{what} failed; retrying");
        if *self.shutdown.borrow() {
            return false;
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => true,
            _ = self.shutdown.changed() => false,
        }
    }

    /// Completes the generic tables' rows of the batch (unchanged TOAST columns) and keeps the
    /// last of equal versions. `false` on shutdown.
    pub(super) async fn complete_generic(&mut self, batch: &mut Batch) -> bool {
        for (name, t) in batch.tables.iter_mut() {
            if !t.unchanged.is_empty() {
                let unchanged = std::mem::take(&mut t.unchanged);
                let watermark = self.tables.watermark(name);
                let rest = fill_from_batch(&mut t.rows, unchanged, watermark);
                if !rest.is_empty() {
                    let mut keys: Vec<String> = rest.iter().map(|u| u.from.clone()).collect();
                    keys.sort_unstable();
                    keys.dedup();
                    let mut cols: Vec<String> =
                        rest.iter().flat_map(|u| u.cols.iter().cloned()).collect();
                    cols.sort_unstable();
                    cols.dedup();
                    let below = rest
                        .iter()
                        .map(|u| t.rows[u.idx].version)
                        .max()
                        .unwrap_or(0);
                    let (writer, state) = (self.tables.writer().clone(), t.state.clone());
                    let Some(stored) = self
                        .retry("reading values an update left unchanged", || {
                            writer.rows_below(&state, &keys, &cols, below)
                        })
                        .await
                    else {
                        return false;
                    };
                    fill_from_stored(&mut t.rows, &rest, &stored);
                }
            }
            keep_last_of_equal_versions(&mut t.rows);
        }
        batch.generic_rows = batch.tables.values().map(|t| t.rows.len()).sum();
        true
    }
}
