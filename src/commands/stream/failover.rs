//! The replication connection of each session, and what changes when it reaches another server
//! than the session before: after a failover the promoted standby has the slot only as far as
//! its synchronized copy got, and the rows' ledger marks only as far as its replay got.

use super::{BackfillState, StreamCommand};
use crate::event::Lsn;
use crate::source::postgres::client::{ReplicationClient, SystemIdentity};
use crate::source::postgres::SourceError;

impl StreamCommand {
    /// Opens the session's replication connection (or takes the one that created the slot) and
    /// checks which server it reached. A new timeline or system (a promoted standby, a restored
    /// backup) means what this relay confirmed may be ahead of what that server has: the session
    /// then starts from the slot's own position there, so changes after it are sent again
    /// (at-least-once) instead of being skipped, and unsent rows are backfilled again (ledger
    /// marks written just before the switch may not have reached the standby).
    pub(super) async fn replication_client(
        &mut self,
        client: Option<ReplicationClient>,
        confirmed: &mut Lsn,
        backfill_state: &mut BackfillState,
    ) -> Result<ReplicationClient, SourceError> {
        let mut client = match client {
            Some(c) => c,
            None => ReplicationClient::connect(&self.cfg.replication_params()?).await?,
        };
        let (identity, flushed) = client.identify_system().await?;
        if let Some(before) = self
            .server
            .as_ref()
            .filter(|b| moved_elsewhere(b, &identity, flushed, *confirmed))
        {
            let slot_at = client.slot_confirmed(&self.cfg.slot).await?;
            tracing::warn!(
                server = %client.endpoint_name(),
                system = %identity.system_id,
                timeline = identity.timeline,
                timeline_before = before.timeline,
                slot = %self.cfg.slot,
                slot_confirmed = ?slot_at.map(|l| l.to_string()),
                confirmed_before = %confirmed,
                server_flushed = %flushed,
                "the replication connection reached another server or timeline (a failover?), or a server whose WAL ends before what was confirmed (a restored backup?): streaming from the slot's position there; changes after it are sent again, and unsent rows are backfilled again"
            );
            // Lsn::ZERO: START_REPLICATION resumes from the slot's confirmed position.
            *confirmed = slot_at.unwrap_or(Lsn::ZERO);
            *backfill_state = BackfillState::Pending;
            // The SQL session may still be attached to the old server (a crashed one looks open
            // until TCP gives up): heartbeats and retention checks go to the new one.
            self.sql = None;
            if let Some(eo) = self.eo.as_mut() {
                eo.rewind(slot_at.unwrap_or(Lsn::ZERO));
            }
        }
        self.server = Some(identity);
        Ok(client)
    }
}

/// Whether the server reached now may lack what was confirmed on the one before: another system or
/// timeline (a promoted standby), or the same one whose WAL now ends before the confirmed position
/// (restored from a storage snapshot: it writes new transactions at positions the stream already
/// confirmed, and resuming from there would skip them).
fn moved_elsewhere(
    before: &SystemIdentity,
    now: &SystemIdentity,
    flushed: Lsn,
    confirmed: Lsn,
) -> bool {
    before != now || flushed < confirmed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_timeline_or_a_wal_behind_the_confirmed_position_is_a_switch() {
        let id = |system: &str, timeline| SystemIdentity {
            system_id: system.into(),
            timeline,
        };
        let before = id("7", 1);
        // The same server, reconnected: its WAL is at or past what was confirmed.
        assert!(!moved_elsewhere(&before, &id("7", 1), Lsn(100), Lsn(100)));
        assert!(!moved_elsewhere(&before, &id("7", 1), Lsn(500), Lsn(100)));
        // A promoted standby, another system, a restored backup.
        assert!(moved_elsewhere(&before, &id("7", 2), Lsn(500), Lsn(100)));
        assert!(moved_elsewhere(&before, &id("8", 1), Lsn(500), Lsn(100)));
        assert!(moved_elsewhere(&before, &id("7", 1), Lsn(99), Lsn(100)));
    }
}
