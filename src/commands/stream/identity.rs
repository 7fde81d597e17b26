//! A relayed table is its OID, not its name. The publication follows a table by OID, so a table
//! dropped and created again, or swapped in by rename (`CREATE t_new …; RENAME t TO t_old, t_new TO
//! t`, as online schema-change tools do), silently leaves the stream: none of its changes reach
//! the slot. Two guards:
//!
//! - while the stream runs, at every heartbeat tick (`--heartbeat-interval`) each table's OID and
//!   its place in the publication are checked: a change stops the stream with the table's name and
//!   the statement to run;
//! - each table's OID is recorded in the checkpoint topic. A start that finds another OID (the
//!   operator ran that statement) hides the old table's rows in ClickHouse with a truncate at a
//!   position above all of them, then reads the new table whole, versioned above the truncate;
//!   the record takes the new OID only once that read is acknowledged, so a crash meanwhile does
//!   both again.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::StreamCommand;
use crate::commands::Error;
use crate::kafka::{checkpoint, KafkaError};
use crate::source::postgres::{backfill::describe_table, catalog, SourceError, TableId};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct IdentityRecord {
    /// `schema.table`.
    table: String,
    oid: u32,
}

/// The checkpoint topic's key of `table`'s identity record for the stream on `slot`.
fn key(database: &str, slot: &str, table: &str) -> String {
    format!("identity.{database}.{slot}.{table}")
}

impl StreamCommand {
    /// Reads the recorded OIDs: a table recorded under another OID is re-created (its read whole
    /// comes next, [`Self::truncate_recreated`] first); one without a record gets one now.
    pub(super) async fn resolve_identities(&mut self) -> Result<(), KafkaError> {
        let (c, t, prefix) = (
            self.connection.clone(),
            self.checkpoint_topic.clone(),
            key(&self.cfg.database(), &self.cfg.slot, ""),
        );
        let records = tokio::task::spawn_blocking(move || {
            checkpoint::read_latest(&c, &t, |k| k.starts_with(prefix.as_bytes()))
        })
        .await
        .map_err(|e| KafkaError::Delivery(format!("reading the identity records failed: {e}")))??;
        let recorded: HashMap<String, u32> = records
            .values()
            .filter_map(|(_, v)| serde_json::from_slice::<IdentityRecord>(v).ok())
            .map(|r| (r.table, r.oid))
            .collect();
        for table in 0..self.cfg.tables.len() {
            let spec = &self.cfg.tables[table];
            match recorded.get(&spec.name()) {
                Some(&oid) if oid == spec.oid => {}
                Some(&oid) => {
                    tracing::warn!(table = %spec.name(), was = oid, now = spec.oid,
                        "the table was created again since the stream last ran: its rows in ClickHouse are hidden by a truncate and the table is read whole");
                    if !self.recreated.contains(&table) {
                        self.recreated.push(table);
                    }
                }
                None => self.record_identity(table).await?,
            }
        }
        Ok(())
    }

    /// Writes every table's identity record without waiting for Kafka: on a checkpoint topic
    /// created at this start, while the stream already runs. One that is lost only means the next
    /// start writes it.
    pub(super) async fn record_identities(&mut self) -> Result<(), KafkaError> {
        let mut acks = Vec::new();
        for table in 0..self.cfg.tables.len() {
            let (key, payload) = self.identity_record(table);
            if let Some(eo) = self.eo.as_mut() {
                eo.before_produce(&self.producer)?;
            }
            let (ack, _) = self
                .producer
                .send_bytes(&self.checkpoint_topic, Some(&key), payload)
                .await?;
            acks.push(ack);
        }
        tokio::spawn(async move {
            for ack in acks {
                if let Err(e) = ack.await {
                    tracing::warn!(error = %e, "an identity record was not written; the next start writes it");
                }
            }
        });
        Ok(())
    }

    /// `table`'s identity record: its key and payload.
    fn identity_record(&self, table: TableId) -> (String, Vec<u8>) {
        let spec = &self.cfg.tables[table];
        let record = IdentityRecord {
            table: spec.name(),
            oid: spec.oid,
        };
        let key = key(&self.cfg.database(), &self.cfg.slot, &record.table);
        (key, serde_json::to_vec(&record).unwrap_or_default())
    }

    /// Writes `table`'s OID as its identity record.
    pub(super) async fn record_identity(&mut self, table: TableId) -> Result<(), KafkaError> {
        let (key, payload) = self.identity_record(table);
        if let Some(eo) = self.eo.as_mut() {
            eo.before_produce(&self.producer)?;
        }
        self.producer
            .send_and_wait(&self.checkpoint_topic, &key, payload)
            .await
    }

    /// A truncate of each re-created table at the current position, acknowledged, and the table
    /// queued to be read whole (above it); done at every start until that read is. Returns each
    /// table's truncate version.
    pub(super) async fn truncate_recreated(&mut self) -> Result<Vec<(TableId, u64)>, Error> {
        let mut versions = Vec::new();
        for table in self.recreated.clone() {
            let lsn = self.heartbeat().await?;
            let spec = self.cfg.tables[table].clone();
            let sql = self.sql_session().await?;
            let (shape, _) = describe_table(sql, &spec).await?;
            let event = shape.truncate(lsn, lsn.0);
            self.before_produce()?;
            let (ack, _) = self.producer.send(&event, &self.topics[table]).await?;
            ack.await?;
            tracing::info!(table = %spec.name(), version = lsn.0, "truncate of the table's earlier rows acknowledged");
            if !self.snapshot_pending.contains(&table) {
                self.snapshot_pending.push(table);
            }
            versions.push((table, lsn.0));
        }
        Ok(versions)
    }

    /// Stops the stream when a relayed table was dropped, replaced or left the publication.
    pub(super) async fn check_tables(&mut self) -> Result<(), SourceError> {
        let (tables, publication) = (self.cfg.tables.clone(), self.cfg.publication.clone());
        let Ok(sql) = self.sql_session().await else {
            return Ok(());
        };
        for spec in &tables {
            match catalog::table_replaced(sql, spec, &publication).await {
                Ok(Some(reason)) => {
                    return Err(SourceError::Schema {
                        table: spec.name(),
                        reason,
                    })
                }
                Ok(None) => {}
                // Best effort, as the retention check: the next tick asks again.
                Err(e) => tracing::debug!(error = %e, "checking the relayed tables failed"),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_keyed_by_database_slot_and_table() {
        assert_eq!(key("db", "s", "public.t"), "identity.db.s.public.t");
        let r = IdentityRecord {
            table: "public.t".into(),
            oid: 16384,
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"table":"public.t","oid":16384}"#
        );
    }
}
