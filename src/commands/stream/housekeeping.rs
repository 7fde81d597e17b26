//! The stream's own SQL session: heartbeats that keep the slot moving on a quiet table, and the
//! slot's WAL retention check. Each call is bounded, so a hung server never holds the main loop.

use std::time::Duration;

use super::StreamCommand;
use crate::event::Lsn;
use crate::source::postgres::{catalog, SourceError};

impl StreamCommand {
    /// The heartbeat and retention session, reopened when lost; bounded so a hung server never
    /// holds the main loop.
    pub(super) async fn heartbeat(&mut self) -> Result<Lsn, SourceError> {
        let sql = self.sql_session().await?;
        match tokio::time::timeout(Duration::from_secs(10), catalog::emit_heartbeat(sql)).await {
            Ok(r) => r,
            Err(_) => {
                self.sql = None;
                // Transient: a server that went away without closing the connection (a crashed
                // primary during a failover) looks like this until TCP gives up.
                Err(SourceError::Interrupted(
                    "a heartbeat took over 10 s; reconnecting".into(),
                ))
            }
        }
    }

    pub(super) async fn sql_session(&mut self) -> Result<&tokio_postgres::Client, SourceError> {
        if self.sql.as_ref().is_none_or(|c| c.is_closed()) {
            let connect = tokio::time::timeout(Duration::from_secs(15), self.cfg.connect_sql());
            match connect.await {
                Ok(client) => self.sql = Some(client?),
                Err(_) => {
                    return Err(SourceError::Interrupted(
                        "connecting to PostgreSQL took over 15 s".into(),
                    ))
                }
            }
        }
        Ok(self.sql.as_ref().expect("connected above"))
    }

    /// Warns when the slot holds more WAL than allowed; every 30 s, best effort.
    pub(super) async fn check_retention(&mut self) {
        let cfg = self.cfg.clone();
        let Ok(sql) = self.sql_session().await else {
            return;
        };
        let check = catalog::slot_retention(&cfg, sql);
        if let Ok(Ok(Some((bytes, status)))) =
            tokio::time::timeout(Duration::from_secs(10), check).await
        {
            self.metrics.retained_wal.set(bytes);
            let limit = self.args.max_retained_wal_mb.saturating_mul(1 << 20);
            if bytes as u64 > limit || status.as_deref() == Some("unreserved") {
                tracing::warn!(slot = %self.cfg.slot, retained_mb = bytes >> 20, limit_mb = self.args.max_retained_wal_mb, wal_status = ?status,
                    "the slot retains a lot of WAL: is the relay keeping up? See docs/operations.md (max_slot_wal_keep_size)");
            }
        }
    }
}
