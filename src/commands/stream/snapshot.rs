//! `--snapshot initial`: which tables without the ledger still need their whole-table read, kept
//! in the checkpoint topic so that a restart (or a table added to `--table` later) knows.
//!
//! A table's record says `done` once every row its read produced is acknowledged by Kafka. Until
//! then a restart reads the table again from its start: an interrupted snapshot sends some rows
//! twice, with versions that let the later copy win (docs/operations.md). The records share the
//! compacted checkpoint topic with exactly-once checkpoints, under keys of their own.

use serde::{Deserialize, Serialize};

use super::tracker::Tracker;
use super::StreamCommand;
use crate::kafka::{checkpoint, KafkaConnection, KafkaError};
use crate::source::postgres::TableId;

/// The record of one table's snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SnapshotRecord {
    /// `schema.table`.
    table: String,
    done: bool,
}

/// The checkpoint topic's key of `table`'s snapshot record for the stream on `slot`.
fn key(database: &str, slot: &str, table: &str) -> String {
    format!("snapshot.{database}.{slot}.{table}")
}

/// Of `tables` (`schema.table` by [`TableId`]), those whose snapshot is not recorded done.
async fn pending(
    connection: &KafkaConnection,
    topic: &str,
    database: &str,
    slot: &str,
    tables: Vec<(TableId, String)>,
) -> Result<Vec<TableId>, KafkaError> {
    let (c, t, prefix) = (
        connection.clone(),
        topic.to_string(),
        key(database, slot, ""),
    );
    let records = tokio::task::spawn_blocking(move || {
        checkpoint::read_latest(&c, &t, |k| k.starts_with(prefix.as_bytes()))
    })
    .await
    .map_err(|e| KafkaError::Delivery(format!("reading the snapshot records failed: {e}")))??;
    Ok(tables
        .into_iter()
        .filter(|(_, name)| {
            let done = records
                .get(key(database, slot, name).as_bytes())
                .and_then(|(_, v)| serde_json::from_slice::<SnapshotRecord>(v).ok())
                .is_some_and(|r| r.done);
            !done
        })
        .map(|(id, _)| id)
        .collect())
}

impl StreamCommand {
    /// Records the snapshots whose rows Kafka has all acknowledged as done.
    pub(super) async fn record_done_snapshots(&mut self, t: &Tracker) -> Result<(), KafkaError> {
        while let Some(&(table, boundary)) = self.snapshot_produced.first() {
            // A failed delivery leaves the queue too: the rows must all have arrived.
            if t.broken || !t.acked_below(boundary) {
                break;
            }
            let name = self.cfg.tables[table].name();
            let record = SnapshotRecord {
                table: name.clone(),
                done: true,
            };
            let key = key(&self.cfg.database(), &self.cfg.slot, &name);
            if let Some(eo) = self.eo.as_mut() {
                // Inside the open transaction: an aborted one takes the record with it, and the
                // snapshot is done only once it commits (`committed`).
                eo.before_produce(&self.producer)?;
            }
            let payload = serde_json::to_vec(&record).unwrap_or_default();
            let send = self
                .producer
                .send_and_wait(&self.checkpoint_topic, &key, payload);
            match tokio::time::timeout(RECORD_TIMEOUT, send).await {
                Ok(r) => r?,
                Err(_) => {
                    return Err(KafkaError::Delivery(format!(
                        "the snapshot record was not acknowledged within {RECORD_TIMEOUT:?}"
                    )))
                }
            }
            tracing::info!(table = %name, "initial snapshot done");
            if self.recreated.contains(&table) {
                // The new table is whole in Kafka, above the truncate: it is the table now. In
                // exactly-once mode only once the transaction commits (`committed`): an aborted one
                // takes the record with it, and the next session truncates and reads again.
                self.record_identity(table).await?;
                if self.eo.is_none() {
                    self.recreated.retain(|&r| r != table);
                }
            }
            self.snapshot_produced.remove(0);
            if self.eo.is_some() {
                self.snapshot_uncommitted.push(table);
            } else {
                self.snapshot_pending.retain(|&p| p != table);
            }
        }
        Ok(())
    }

    /// Reads which of the candidate tables' snapshots are done.
    pub(super) async fn resolve_snapshots(&mut self) -> Result<(), KafkaError> {
        let tables = self
            .snapshot_unresolved
            .iter()
            .map(|&t| (t, self.cfg.tables[t].name()))
            .collect();
        self.snapshot_pending = pending(
            &self.connection,
            &self.checkpoint_topic,
            &self.cfg.database(),
            &self.cfg.slot,
            tables,
        )
        .await?;
        self.snapshot_unresolved.clear();
        Ok(())
    }
}

/// Longest wait for a snapshot record's acknowledgement (the main loop waits meanwhile).
const RECORD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// The open exactly-once transaction committed: the snapshots it recorded are done, and so are
/// the re-created tables among them (identity.rs).
pub(super) fn committed(
    pending: &mut Vec<TableId>,
    uncommitted: &mut Vec<TableId>,
    recreated: &mut Vec<TableId>,
) {
    pending.retain(|t| !uncommitted.contains(t));
    recreated.retain(|t| !uncommitted.contains(t));
    uncommitted.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_keyed_by_database_slot_and_table() {
        assert_eq!(key("db", "s", "public.t"), "snapshot.db.s.public.t");
        let r = SnapshotRecord {
            table: "public.t".into(),
            done: true,
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"table":"public.t","done":true}"#
        );
    }
}
