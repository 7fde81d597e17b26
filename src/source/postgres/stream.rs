//! The decoded replication stream of one table: [`ChangeEvent`]s plus the positions that become safe
//! to confirm once everything before them is handled.

use std::collections::HashMap;

use crate::event::{ChangeEvent, Lsn, Op};

use super::change::{change_event, TableShape};
use super::client::ReplicationClient;
use super::pgoutput::{decode, PgOutput, RelationCache, Value};
use super::replication::{ReplicationMessage, ReplicationStream};
use super::{SourceConfig, SourceError, HEARTBEAT_MESSAGE_PREFIX, LEDGER_MESSAGE_PREFIX};

/// What the stream hands to the command.
#[derive(Debug)]
pub enum SourceMessage {
    /// A change of a row of the table (or a truncate of the table).
    Change(ChangeEvent),
    /// Every change before `lsn` has been handed out: once those are handled, `lsn` may be confirmed.
    /// Comes at each commit, between transactions on keepalives, and with heartbeats.
    Position { lsn: Lsn },
    /// The server wants a status update now (or it will drop the connection), with the position
    /// its keepalive carried when that position may be confirmed (between transactions). A server
    /// that is shutting down asks this way until the client has confirmed everything it sent, so
    /// the position must not be dropped.
    ReplyRequested { position: Option<Lsn> },
}

pub struct ReplicationSource {
    stream: ReplicationStream,
    relations: RelationCache,
    shapes: HashMap<u32, TableShape>,
    schema: String,
    table: String,
    in_transaction: bool,
    /// The current transaction is the relay's own ledger write: its row changes are dropped.
    skipping_ledger_tx: bool,
    pub skipped_ledger_changes: u64,
    /// The server's WAL end as last reported: how far behind the stream is.
    server_wal_end: Lsn,
}

impl ReplicationSource {
    /// Starts streaming from `start` (`Lsn::ZERO`: the slot's confirmed position). `client` is a
    /// connection already open (the one that created the slot), or `None` to open one.
    pub async fn start(
        cfg: &SourceConfig,
        client: Option<ReplicationClient>,
        start: Lsn,
    ) -> Result<Self, SourceError> {
        let client = match client {
            Some(c) => c,
            None => ReplicationClient::connect(&cfg.replication_params()?).await?,
        };
        let stream = client
            .start_replication(&cfg.slot, start, &cfg.publication)
            .await
            .map_err(|e| match e.code() {
                // undefined_object: dropped; object_not_in_prerequisite_state: invalidated.
                Some("42704") | Some("55000") => SourceError::SlotLost {
                    slot: cfg.slot.clone(),
                    reason: e.to_string(),
                },
                _ => e.into(),
            })?;
        Ok(ReplicationSource {
            stream,
            relations: RelationCache::default(),
            shapes: HashMap::new(),
            schema: cfg.schema.clone(),
            table: cfg.table.clone(),
            in_transaction: false,
            skipping_ledger_tx: false,
            skipped_ledger_changes: 0,
            server_wal_end: start,
        })
    }

    /// The next message; `None` when the server ended the stream. Cancel-safe.
    pub async fn next(&mut self) -> Result<Option<SourceMessage>, SourceError> {
        loop {
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
                    let position = (!self.in_transaction).then_some(wal_end);
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
                    if let Some(out) = self.handle(wal_start, decode(&data)?)? {
                        return Ok(Some(out));
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
            PgOutput::Begin { .. } => {
                self.in_transaction = true;
                self.skipping_ledger_tx = false;
                Ok(None)
            }
            PgOutput::Commit { end_lsn, .. } => {
                self.in_transaction = false;
                self.skipping_ledger_tx = false;
                tracing::trace!(lsn = %end_lsn, "commit position");
                Ok(Some(SourceMessage::Position { lsn: end_lsn }))
            }
            PgOutput::Relation(rel) => {
                if rel.namespace == self.schema && rel.name == self.table {
                    self.shapes.insert(rel.oid, TableShape::of(&rel)?);
                } else {
                    self.shapes.remove(&rel.oid);
                }
                self.relations.insert(rel);
                Ok(None)
            }
            PgOutput::Message {
                transactional,
                lsn,
                prefix,
                ..
            } => {
                if transactional && prefix == LEDGER_MESSAGE_PREFIX {
                    self.skipping_ledger_tx = true;
                    Ok(None)
                } else if !transactional
                    && prefix == HEARTBEAT_MESSAGE_PREFIX
                    && !self.in_transaction
                {
                    tracing::trace!(lsn = %lsn, "heartbeat position");
                    Ok(Some(SourceMessage::Position { lsn }))
                } else {
                    Ok(None)
                }
            }
            PgOutput::Origin { .. } | PgOutput::Type { .. } => Ok(None),
            PgOutput::Insert { relation, new } => self.row(Op::Insert, relation, &new, wal_start),
            PgOutput::Update { relation, old, new } => {
                let new = fill_unchanged_toast(new, old.as_deref());
                self.row(Op::Update, relation, &new, wal_start)
            }
            PgOutput::Delete { relation, old } => self.row(Op::Delete, relation, &old, wal_start),
            PgOutput::Truncate { relations, .. } => {
                if self.skipping_ledger_tx || !relations.iter().any(|r| self.shapes.contains_key(r))
                {
                    return Ok(None);
                }
                Ok(Some(SourceMessage::Change(ChangeEvent {
                    id: None,
                    op: Op::Truncate,
                    user: None,
                    event: None,
                    timestamp: None,
                    event_time: None,
                    lsn: wal_start.to_string(),
                    version: wal_start.0,
                    unchanged: Vec::new(),
                })))
            }
        }
    }

    fn row(
        &mut self,
        op: Op,
        relation: u32,
        values: &[Value],
        lsn: Lsn,
    ) -> Result<Option<SourceMessage>, SourceError> {
        if self.skipping_ledger_tx {
            self.skipped_ledger_changes += 1;
            return Ok(None);
        }
        let Some(shape) = self.shapes.get(&relation) else {
            if self.relations.get(relation).is_none() {
                return Err(SourceError::Replication(super::ReplicationError::Protocol(
                    format!("change for relation {relation} before its Relation message"),
                )));
            }
            // Another table added to the publication by hand: not ours to relay.
            return Ok(None);
        };
        let row = shape.row(values)?;
        // The change's own WAL position orders the writes of one row (row locks serialise them).
        let event = change_event(op, &row, lsn, lsn.0)?;
        Ok(Some(SourceMessage::Change(event)))
    }

    /// The server's WAL end as last reported.
    pub fn server_wal_end(&self) -> Lsn {
        self.server_wal_end
    }

    /// Between a Begin and its Commit: stopping now would leave a half-handled transaction that the
    /// next start replays.
    pub fn in_transaction(&self) -> bool {
        self.in_transaction
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
