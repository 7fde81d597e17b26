//! The replication connection of each session, and what changes when it reaches another server
//! than the session before: after a failover the promoted standby has the slot only as far as
//! its synchronized copy got, and the rows' ledger marks only as far as its replay got.

use super::{BackfillState, StreamCommand};
use crate::event::Lsn;
use crate::source::postgres::client::ReplicationClient;
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
        let identity = client.identify_system().await?;
        if let Some(before) = self.server.as_ref().filter(|b| **b != identity) {
            let slot_at = client.slot_confirmed(&self.cfg.slot).await?;
            tracing::warn!(
                server = %client.endpoint_name(),
                system = %identity.system_id,
                timeline = identity.timeline,
                timeline_before = before.timeline,
                slot = %self.cfg.slot,
                slot_confirmed = ?slot_at.map(|l| l.to_string()),
                confirmed_before = %confirmed,
                "the replication connection reached another server or timeline (a failover?): streaming from the slot's position there; changes after it are sent again, and unsent rows are backfilled again"
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
