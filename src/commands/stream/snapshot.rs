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
use crate::commands::Error;
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
pub(super) async fn pending(
    connection: &KafkaConnection,
    topic: &str,
    database: &str,
    slot: &str,
    tables: Vec<(TableId, String)>,
) -> Result<Vec<TableId>, Error> {
    let (c, t, prefix) = (
        connection.clone(),
        topic.to_string(),
        key(database, slot, ""),
    );
    let records = tokio::task::spawn_blocking(move || {
        checkpoint::read_latest(&c, &t, |k| k.starts_with(prefix.as_bytes()))
    })
    .await
    .map_err(|e| Error::Config(format!("reading the snapshot records failed: {e}")))??;
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
                // Inside the open transaction: an aborted one takes the record with it.
                eo.before_produce(&self.producer)?;
            }
            let payload = serde_json::to_vec(&record).unwrap_or_default();
            self.producer
                .send_and_wait(&self.checkpoint_topic, &key, payload)
                .await?;
            tracing::info!(table = %name, "initial snapshot done");
            self.snapshot_produced.remove(0);
            self.snapshot_pending.retain(|&p| p != table);
        }
        Ok(())
    }
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
