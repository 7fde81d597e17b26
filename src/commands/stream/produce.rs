//! Producing what the session hands over: changes, backfilled rows and dead letters, each inside
//! a Kafka transaction in exactly-once mode.

use super::backfill::Released;
use super::tracker::{LedgerRow, Tracker};
use super::StreamCommand;
use crate::commands::Error;
use crate::event::{ChangeEvent, ChangeOrder, Lsn, Op, StreamDeadLetter};
use crate::kafka::KafkaError;
use crate::source::postgres::backfill::Scope;
use crate::source::postgres::TableId;

impl StreamCommand {
    /// Produces one change; one too large for the topic goes to the dead-letter topic instead.
    pub(super) async fn produce(
        &mut self,
        t: &mut Tracker,
        table: TableId,
        event: &ChangeEvent,
        from_backfill: bool,
        order: ChangeOrder,
    ) -> Result<(), Error> {
        let ledger_id = self.ledger_id(table, event.op, event.id());
        self.before_produce()?;
        match self.producer.send(event, &self.topics[table]).await {
            Ok((ack, bytes)) => {
                t.push_delivery(ledger_id, Box::pin(ack), from_backfill);
                self.metrics.events.inc();
                self.metrics.bytes.add(bytes as u64);
                if let Some(eo) = self.eo.as_mut() {
                    eo.produced(order);
                }
                Ok(())
            }
            // The schema record the change names did not arrive: the change is not produced,
            // and the session ends (positions stop here) and replays it.
            Err(KafkaError::Delivery(reason)) => {
                tracing::warn!(error = %reason, "publishing a schema record failed");
                t.broken = true;
                Ok(())
            }
            Err(e @ KafkaError::TooLarge { .. }) => {
                let dead = StreamDeadLetter::of_event(
                    event,
                    &self.cfg.tables[table].name(),
                    e.to_string(),
                );
                self.dead_letter(t, &dead, ledger_id, from_backfill, order)
                    .await
            }
            Err(e) => Err(e.into()),
        }
    }

    /// In exactly-once mode, opens a Kafka transaction if none is open.
    pub(super) fn before_produce(&mut self) -> Result<(), Error> {
        if let Some(eo) = self.eo.as_mut() {
            eo.before_produce(&self.producer)?;
        }
        Ok(())
    }

    /// A chunk's rows, in the stream's order at its watermark `lsn`.
    pub(super) async fn produce_backfill(
        &mut self,
        t: &mut Tracker,
        released: Released,
    ) -> Result<(), Error> {
        let Released {
            table,
            rows,
            dead,
            lsn,
        } = released;
        // The watermark's position is the end of its record, where the next transaction's commit
        // record may start: one below is ours alone (records start 8-aligned).
        let at = Lsn(lsn.0.saturating_sub(1));
        for (index, event) in rows.iter().enumerate() {
            let order = ChangeOrder {
                lsn: at,
                index: index as u32,
            };
            self.produce(t, table, event, true, order).await?;
        }
        for (index, d) in dead.iter().enumerate() {
            let order = ChangeOrder {
                lsn: at,
                index: (rows.len() + index) as u32,
            };
            let ledger_id = self.ledger_id(table, d.op, d.id);
            self.dead_letter(t, d, ledger_id, true, order).await?;
        }
        self.metrics.backfill_rows.add(rows.len() as u64);
        Ok(())
    }

    /// Sends a change the topic cannot take to the stream's dead-letter topic. Its row is then
    /// recorded in the ledger like any delivered row: the dead-letter topic holds it.
    pub(super) async fn dead_letter(
        &mut self,
        t: &mut Tracker,
        dead: &StreamDeadLetter,
        ledger_id: Option<LedgerRow>,
        from_backfill: bool,
        order: ChangeOrder,
    ) -> Result<(), Error> {
        self.before_produce()?;
        self.dead_lettered += 1;
        self.metrics.dead_lettered.inc();
        let n = self.dead_lettered;
        if n <= 10 || n.is_power_of_two() {
            tracing::warn!(id = ?dead.id, lsn = %dead.lsn, error = %dead.error, topic = %self.producer.dead_letter_topic(), dead_lettered_total = n, "change sent to the stream's dead-letter topic");
        }
        let (ack, _) = self.producer.send_dead_letter(dead).await?;
        t.push_delivery(ledger_id, Box::pin(ack), from_backfill);
        if let Some(eo) = self.eo.as_mut() {
            eo.produced(order);
        }
        Ok(())
    }

    /// The row a delivery records in the ledger once Kafka has it: the row's id, for changes
    /// that leave a row behind, of a table that has the ledger.
    pub(super) fn ledger_id(&self, table: TableId, op: Op, id: Option<i64>) -> Option<LedgerRow> {
        match op {
            _ if self.cfg.tables[table].ledger_column.is_none() => None,
            Op::Snapshot | Op::Insert | Op::Update => id.map(|id| (table, id)),
            Op::Delete | Op::Truncate => None,
        }
    }

    /// What the backfill reads, in table order: the unsent rows of every table with the ledger,
    /// and each whole table whose initial snapshot is still to do.
    pub(super) fn backfill_tables(&self) -> Vec<(TableId, Scope)> {
        (0..self.cfg.tables.len())
            .filter_map(|t| {
                // A table with the ledger is read whole too when it was created again
                // (identity.rs).
                if self.snapshot_pending.contains(&t) {
                    Some((t, Scope::Whole))
                } else {
                    self.cfg.tables[t]
                        .ledger_column
                        .is_some()
                        .then_some((t, Scope::Unsent))
                }
            })
            .collect()
    }

    /// The backfill of `table` produced its last row: a whole-table snapshot is done once Kafka
    /// has acknowledged everything produced so far.
    pub(super) fn snapshot_produced_upto(&mut self, table: Option<TableId>, t: &Tracker) {
        if let Some(table) = table.filter(|t| self.snapshot_pending.contains(t)) {
            self.snapshot_produced.push((table, t.next_seq()));
        }
    }
}
