//! The decoded replication stream of one table: [`ChangeEvent`]s plus the positions that become safe
//! to confirm once everything before them is handled.
//!
//! Versions: every change of a transaction is versioned by the transaction's commit position (the
//! Begin message's final LSN), so changes order as their transactions committed, whatever order their
//! row changes were written in (an INSERT that waited on a unique check behind a DELETE commits after
//! it). A TRUNCATE bumps the versions of the rest of its transaction by one, so rows written before it
//! in the same transaction fall below it and rows written after stay. A commit record is at least 24
//! bytes long, so `final LSN + bump` (bump < 16) never reaches the next transaction's versions.

use std::collections::HashMap;

use crate::event::{ChangeEvent, ChangeOrder, Lsn, Op, StreamDeadLetter};

use super::client::ReplicationClient;
use super::pgoutput::{decode, OldTuple, PgOutput, Relation, RelationCache, Value};
use super::relation::{describe, RelationShape, TupleColumn};
use super::replication::{ReplicationMessage, ReplicationStream};
use super::{
    SourceConfig, SourceError, TableId, TableSpec, HEARTBEAT_MESSAGE_PREFIX, LEDGER_MESSAGE_PREFIX,
    WATERMARK_MESSAGE_PREFIX,
};

/// Most version bumps (TRUNCATEs) inside one transaction; later ones share the last bump.
const MAX_BUMP: u64 = 15;

/// What the stream hands to the command.
#[derive(Debug)]
pub enum SourceMessage {
    /// A change of a row of a relayed table (or a truncate of it), and its place in the stream.
    Change(TableId, ChangeEvent, ChangeOrder),
    /// A change that cannot become an event (a value that cannot be encoded): it goes to the
    /// stream's dead-letter topic instead of stopping everything behind it.
    DeadLetter(TableId, StreamDeadLetter, ChangeOrder),
    /// Every change before `lsn` has been handed out: once those are handled, `lsn` may be confirmed.
    /// Comes at each commit, between transactions on keepalives, and with heartbeats.
    Position { lsn: Lsn },
    /// The server wants a status update now (or it will drop the connection), with the position
    /// its keepalive carried when that position may be confirmed (between transactions). A server
    /// that is shutting down asks this way until the client has confirmed everything it sent, so
    /// the position must not be dropped.
    ReplyRequested { position: Option<Lsn> },
    /// A backfill chunk's high watermark came by: every transaction that committed before the
    /// chunk was read has been handed out. `tag` names the run and the chunk.
    Watermark { tag: String, lsn: Lsn },
}

/// The transaction being read.
#[derive(Debug, Clone, Copy)]
struct Transaction {
    final_lsn: Lsn,
    /// TRUNCATEs seen so far in it (capped at [`MAX_BUMP`]).
    bump: u64,
    /// Changes handed out so far in it.
    index: u32,
}

pub struct ReplicationSource {
    stream: ReplicationStream,
    relations: RelationCache,
    /// Names of non-builtin types from Type messages, by OID.
    type_names: HashMap<u32, String>,
    /// Relayed relations by OID: which table, and how its tuples read.
    shapes: HashMap<u32, (TableId, RelationShape)>,
    /// For what a Relation message does not say (nullability, enums, domains, the primary key).
    catalog: tokio_postgres::Client,
    /// A Relation message read but not yet described.
    pending_relation: Option<Relation>,
    tables: Vec<TableSpec>,
    publication: String,
    /// Between Begin and Commit.
    tx: Option<Transaction>,
    /// The current transaction is the relay's own ledger write: its row changes are dropped.
    skipping_ledger_tx: bool,
    pub skipped_ledger_changes: u64,
    slot: String,
    /// This slot's ledger transactions decoded (by their marker) since [`Self::take_ledger_transactions`]:
    /// zero when the server filters them by origin.
    ledger_transactions: u64,
    /// The server's WAL end as last reported: how far behind the stream is.
    server_wal_end: Lsn,
    /// Events still to hand out of a change that became several (a key update: delete, then the
    /// row; a TRUNCATE of several relayed tables: one each).
    queued: std::collections::VecDeque<SourceMessage>,
}

impl ReplicationSource {
    /// Starts streaming from `start` (`Lsn::ZERO`: the slot's confirmed position) on a
    /// replication connection already open.
    pub async fn start(
        cfg: &SourceConfig,
        client: ReplicationClient,
        start: Lsn,
    ) -> Result<Self, SourceError> {
        let stream = client
            .start_replication(
                &cfg.slot,
                start,
                &cfg.publication,
                cfg.ledger_origin.is_some(),
            )
            .await
            .map_err(|e| match e.code() {
                // undefined_object: dropped; object_not_in_prerequisite_state: invalidated.
                Some("42704") | Some("55000") => SourceError::SlotLost {
                    slot: cfg.slot.clone(),
                    reason: e.to_string(),
                },
                _ => e.into(),
            })?;
        let catalog = cfg.connect_sql().await?;
        Ok(ReplicationSource {
            stream,
            relations: RelationCache::default(),
            type_names: HashMap::new(),
            shapes: HashMap::new(),
            catalog,
            pending_relation: None,
            tables: cfg.tables.clone(),
            publication: cfg.publication.clone(),
            tx: None,
            skipping_ledger_tx: false,
            skipped_ledger_changes: 0,
            ledger_transactions: 0,
            slot: cfg.slot.clone(),
            server_wal_end: start,
            queued: Default::default(),
        })
    }

    /// The ledger transactions decoded since the last call.
    pub fn take_ledger_transactions(&mut self) -> u64 {
        std::mem::take(&mut self.ledger_transactions)
    }

    /// The next message; `None` when the server ended the stream. Cancel-safe.
    pub async fn next(&mut self) -> Result<Option<SourceMessage>, SourceError> {
        if let Some(m) = self.queued.pop_front() {
            return Ok(Some(m));
        }
        loop {
            if let Some(rel) = self.pending_relation.clone() {
                self.on_relation(rel).await?;
                self.pending_relation = None;
            }
            let Some(msg) = self.stream.next().await? else {
                return Ok(None);
            };
            match msg {
                ReplicationMessage::Keepalive {
                    wal_end,
                    reply_requested,
                } => {
                    self.server_wal_end = self.server_wal_end.max(wal_end);
                    // Inside a transaction the server's position can be past changes still to come.
                    let position = self.tx.is_none().then_some(wal_end);
                    if reply_requested {
                        return Ok(Some(SourceMessage::ReplyRequested { position }));
                    }
                    if let Some(lsn) = position {
                        tracing::trace!(%lsn, "keepalive position");
                        return Ok(Some(SourceMessage::Position { lsn }));
                    }
                }
                ReplicationMessage::XLogData {
                    wal_start,
                    wal_end,
                    data,
                } => {
                    self.server_wal_end = self.server_wal_end.max(wal_end);
                    match decode(&data)? {
                        // Described at the top of the loop: kept until then, so a `next` that
                        // is cancelled while the catalog answers loses nothing.
                        PgOutput::Relation(rel) => self.pending_relation = Some(rel),
                        msg => {
                            if let Some(out) = self.handle(wal_start, msg)? {
                                return Ok(Some(out));
                            }
                        }
                    }
                }
            }
        }
    }

    fn handle(
        &mut self,
        wal_start: Lsn,
        msg: PgOutput,
    ) -> Result<Option<SourceMessage>, SourceError> {
        match msg {
            PgOutput::Begin { final_lsn, .. } => {
                self.tx = Some(Transaction {
                    final_lsn,
                    bump: 0,
                    index: 0,
                });
                self.skipping_ledger_tx = false;
                Ok(None)
            }
            PgOutput::Commit { end_lsn, .. } => {
                self.tx = None;
                self.skipping_ledger_tx = false;
                tracing::trace!(lsn = %end_lsn, "commit position");
                Ok(Some(SourceMessage::Position { lsn: end_lsn }))
            }
            PgOutput::Relation(rel) => {
                self.pending_relation = Some(rel);
                Ok(None)
            }
            PgOutput::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => {
                if transactional && prefix == LEDGER_MESSAGE_PREFIX {
                    self.skipping_ledger_tx = true;
                    if content.as_ref() == self.slot.as_bytes() {
                        self.ledger_transactions += 1;
                    }
                    Ok(None)
                } else if !transactional && self.tx.is_none() && prefix == HEARTBEAT_MESSAGE_PREFIX
                {
                    tracing::trace!(lsn = %lsn, "heartbeat position");
                    Ok(Some(SourceMessage::Position { lsn }))
                } else if !transactional && prefix == WATERMARK_MESSAGE_PREFIX {
                    let tag = String::from_utf8_lossy(&content).into_owned();
                    Ok(Some(SourceMessage::Watermark { tag, lsn }))
                } else {
                    Ok(None)
                }
            }
            PgOutput::Type {
                oid,
                namespace,
                name,
            } => {
                // Sent before a Relation that uses a non-builtin type: its name, should the
                // catalog no longer have it when the Relation is described.
                self.type_names.insert(oid, format!("{namespace}.{name}"));
                Ok(None)
            }
            PgOutput::Origin { .. } => Ok(None),
            PgOutput::Insert { relation, new } => self.row(Op::Insert, relation, &new, wal_start),
            PgOutput::Update { relation, old, new } => {
                self.update(relation, old.as_ref(), new, wal_start)
            }
            PgOutput::Delete { relation, old } => self.row(Op::Delete, relation, &old, wal_start),
            PgOutput::Truncate { relations, .. } => {
                if self.skipping_ledger_tx {
                    return Ok(None);
                }
                let mut ours = Vec::new();
                for oid in &relations {
                    if self.our_relation(*oid)? && !ours.contains(oid) {
                        ours.push(*oid);
                    }
                }
                if ours.is_empty() {
                    return Ok(None);
                }
                // Rows written before the TRUNCATE in this transaction fall below it.
                let version = match self.tx.as_mut() {
                    Some(tx) => {
                        tx.bump = (tx.bump + 1).min(MAX_BUMP);
                        tx.final_lsn.0.saturating_add(tx.bump)
                    }
                    None => wal_start.0,
                };
                // One truncate per relayed table of the statement (`TRUNCATE a, b`, a CASCADE).
                for oid in ours {
                    let order = self.next_order(wal_start);
                    let (table, shape) = &self.shapes[&oid];
                    let event = shape.truncate(wal_start, version);
                    self.queued
                        .push_back(SourceMessage::Change(*table, event, order));
                }
                Ok(self.queued.pop_front())
            }
        }
    }

    /// A relation's (new) shape: sent before its first change and again after every change of
    /// its columns, so each row is read with the columns it was written with.
    async fn on_relation(&mut self, rel: Relation) -> Result<(), SourceError> {
        let table = self
            .tables
            .iter()
            .position(|t| t.schema == rel.namespace && t.table == rel.name);
        if let Some(table) = table {
            // 'i': an identity index; refused unless it is the primary key's (catalog.rs).
            if rel.replica_identity == b'i' {
                let qualified = self.tables[table].qualified();
                let index = super::catalog::replica_identity_index(
                    &self.catalog,
                    &rel.namespace,
                    &rel.name,
                )
                .await?;
                if let Some(index) = index {
                    return Err(SourceError::Schema {
                        reason: super::catalog::replica_identity_refusal(&qualified, &index),
                        table: qualified,
                    });
                }
            }
            let columns: Vec<TupleColumn> = rel
                .columns
                .iter()
                .map(|c| TupleColumn {
                    name: c.name.clone(),
                    type_oid: c.type_oid,
                    typmod: c.type_modifier,
                    identity: Some(c.is_key),
                    type_hint: self.type_names.get(&c.type_oid).cloned(),
                })
                .collect();
            let shape = describe(
                &self.catalog,
                rel.oid,
                &rel.namespace,
                &rel.name,
                &columns,
                self.tables[table].ledger_column.as_deref(),
                self.tables[table].seed,
            )
            .await?;
            tracing::info!(table = %shape.schema().qualified_name(), schema_id = %shape.schema().id(), columns = shape.schema().columns.len(), "relation shape");
            if let Some((_, before)) = self.shapes.get(&rel.oid) {
                warn_on_rewrites(before.schema(), shape.schema());
            }
            self.shapes.insert(rel.oid, (table, shape));
        } else {
            self.shapes.remove(&rel.oid);
        }
        self.relations.insert(rel);
        Ok(())
    }

    /// The place of the next change handed out.
    fn next_order(&mut self, wal_start: Lsn) -> ChangeOrder {
        match self.tx.as_mut() {
            Some(tx) => {
                let order = ChangeOrder {
                    lsn: tx.final_lsn,
                    index: tx.index,
                };
                tx.index = tx.index.saturating_add(1);
                order
            }
            None => ChangeOrder {
                lsn: wal_start,
                index: 0,
            },
        }
    }

    /// Whether a row change of `relation` goes out: not part of the relay's own ledger write
    /// (counted and dropped), and of the table the stream relays.
    fn relays(&mut self, relation: u32) -> Result<bool, SourceError> {
        if self.skipping_ledger_tx {
            self.skipped_ledger_changes += 1;
            return Ok(false);
        }
        self.our_relation(relation)
    }

    /// Whether a change of relation `oid` is one to relay. A relation the stream was not asked
    /// for is an error, never skipped: the slot would move past changes nobody relayed.
    fn our_relation(&self, oid: u32) -> Result<bool, SourceError> {
        if self.shapes.contains_key(&oid) {
            return Ok(true);
        }
        let Some(rel) = self.relations.get(oid) else {
            return Err(SourceError::Replication(super::ReplicationError::Protocol(
                format!("change for relation {oid} before its Relation message"),
            )));
        };
        let publication = super::client::quote_ident(&self.publication);
        let other = format!(
            "{}.{}",
            super::client::quote_ident(&rel.namespace),
            super::client::quote_ident(&rel.name)
        );
        Err(SourceError::Schema {
            table: other.clone(),
            reason: format!(
                "publication {publication} sends changes of this table, but the stream relays only {}. \
                 If it is a partition of that table, publish through the root: ALTER PUBLICATION {publication} SET (publish_via_partition_root = true). \
                 Otherwise add it to --table, or remove it: ALTER PUBLICATION {publication} DROP TABLE {other}. The slot has not moved past this change",
                self.tables
                    .iter()
                    .map(TableSpec::qualified)
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
        })
    }

    fn version(&self, wal_start: Lsn) -> u64 {
        match self.tx {
            Some(tx) => tx.final_lsn.0.saturating_add(tx.bump),
            None => wal_start.0,
        }
    }

    /// An UPDATE. One that changed the primary key becomes two events: a delete of the old key,
    /// then the new row, so no consumer keeps a row under the old key.
    fn update(
        &mut self,
        relation: u32,
        old: Option<&OldTuple>,
        new: Vec<Value>,
        wal_start: Lsn,
    ) -> Result<Option<SourceMessage>, SourceError> {
        if !self.relays(relation)? {
            return Ok(None);
        }
        let (_, shape) = &self.shapes[&relation];
        let key_changed = old.is_some_and(|o| shape.key_changed(o.values(), &new));
        // Only a whole old row (REPLICA IDENTITY FULL) holds the values an update left out; a
        // key-only old tuple has NULL there, which must never be written over a kept value.
        let new = match old {
            Some(OldTuple::Full(o)) => fill_unchanged_toast(new, Some(o)),
            _ => new,
        };
        if !key_changed {
            return self.row(Op::Update, relation, &new, wal_start);
        }
        // The delete first, also in the stream's order of changes.
        let old = old.map(OldTuple::values).unwrap_or_default();
        let moved_from = shape.key_of(old);
        let delete = self.row(Op::Delete, relation, old, wal_start)?;
        let mut update = self.row(Op::Update, relation, &new, wal_start)?;
        if let Some(SourceMessage::Change(_, event, _)) = &mut update {
            event.moved_from = moved_from;
        }
        self.queued.extend(update);
        Ok(delete)
    }

    fn row(
        &mut self,
        op: Op,
        relation: u32,
        values: &[Value],
        lsn: Lsn,
    ) -> Result<Option<SourceMessage>, SourceError> {
        if !self.relays(relation)? {
            return Ok(None);
        }
        let version = self.version(lsn);
        let order = self.next_order(lsn);
        let (table, shape) = &self.shapes[&relation];
        match shape.event(op, values, lsn, version) {
            Ok(event) => Ok(Some(SourceMessage::Change(*table, event, order))),
            Err(e) => Ok(Some(SourceMessage::DeadLetter(
                *table,
                StreamDeadLetter {
                    table: shape.schema().qualified_name(),
                    op,
                    id: shape.key_of(values).and_then(|k| k.as_int()),
                    key: shape
                        .key_of(values)
                        .filter(|k| k.as_int().is_none())
                        .map(|k| k.kafka_key()),
                    lsn: lsn.to_string(),
                    version,
                    error: e.to_string(),
                    row: Some(shape.describe(values)),
                    row_truncated: false,
                },
                order,
            ))),
        }
    }

    /// The server's WAL end as last reported.
    pub fn server_wal_end(&self) -> Lsn {
        self.server_wal_end
    }

    /// Between a Begin and its Commit: stopping now would leave a half-handled transaction that the
    /// next start replays.
    pub fn in_transaction(&self) -> bool {
        self.tx.is_some() || !self.queued.is_empty()
    }

    pub async fn send_status(&mut self, confirmed: Lsn, reply: bool) -> Result<(), SourceError> {
        Ok(self.stream.send_status(confirmed, reply).await?)
    }

    /// Ends the stream cleanly, confirming `confirmed` as the last act.
    pub async fn finish(self, confirmed: Lsn) -> Result<(), SourceError> {
        Ok(self.stream.finish(confirmed).await?)
    }
}

/// An update leaves TOASTed values it did not change out of the new tuple. With `REPLICA IDENTITY
/// FULL` the old tuple carries them, so they are taken from there; otherwise they stay marked
/// unchanged (see docs/message-format.md).
fn fill_unchanged_toast(mut new: Vec<Value>, old: Option<&[Value]>) -> Vec<Value> {
    if let Some(old) = old {
        for (i, v) in new.iter_mut().enumerate() {
            if *v == Value::UnchangedToast {
                if let Some(o @ (Value::Text(_) | Value::Binary(_) | Value::Null)) = old.get(i) {
                    *v = o.clone();
                }
            }
        }
    }
    new
}

/// `ALTER COLUMN … TYPE` rewrites the stored rows in PostgreSQL and logical decoding carries none
/// of them: where the conversion is more than a widening (`USING`, `timestamp` → `timestamptz`
/// under a TimeZone other than UTC, text ↔ varchar(n)), the rows ClickHouse holds keep their old
/// values. Said once per change, with what mends it.
fn warn_on_rewrites(before: &crate::types::RelationSchema, after: &crate::types::RelationSchema) {
    for c in &after.columns {
        let Some(old) = before
            .columns
            .iter()
            .find(|o| o.attnum.is_some() && o.attnum == c.attnum)
        else {
            continue;
        };
        if old.type_name != c.type_name {
            tracing::warn!(table = %after.qualified_name(), column = %c.name, from = %old.type_name, to = %c.type_name,
                "a column's type changed: PostgreSQL rewrote the rows it holds and sent none of them; if the conversion changed values (USING, timestamp to timestamptz, a narrower text), run `cdc-relay verify --repair` for this table");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn unchanged_toast_comes_from_the_old_row_when_it_has_it() {
        let new = vec![
            Value::Text(Bytes::from_static(b"1")),
            Value::UnchangedToast,
            Value::UnchangedToast,
        ];
        let old = vec![
            Value::Text(Bytes::from_static(b"1")),
            Value::Text(Bytes::from_static(b"big")),
            Value::UnchangedToast,
        ];
        let merged = fill_unchanged_toast(new.clone(), Some(&old));
        assert_eq!(merged[1], Value::Text(Bytes::from_static(b"big")));
        assert_eq!(merged[2], Value::UnchangedToast);
        assert_eq!(fill_unchanged_toast(new.clone(), None), new);
    }
}
