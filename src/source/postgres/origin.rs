//! PostgreSQL 16+: the ledger's own UPDATEs filtered out before decoding.
//!
//! Every ledger statement writes WAL that the walsender would otherwise decode (and, with a
//! publication that publishes UPDATE, send), only for the stream to drop it by its marker message.
//! From PostgreSQL 16 on, a session can write under a named replication origin and a stream can ask
//! for `origin = none`: the server then skips those transactions before it assembles them. The
//! marker stays, so a ledger session that could not take the origin is still dropped correctly.
//!
//! An origin that has written holds one of the server's replication states
//! (`max_active_replication_origins` on 18, `max_replication_slots` before) until it is dropped, so
//! it goes with its slot: `teardown` and `--recreate-slot` drop it, and a stream drops the origins
//! of relay slots that no longer exist. When none is free the ledger writes without its origin.
//!
//! `origin = none` drops every transaction that carries an origin, also those a subscription
//! (logical replication into this database) applies. So the filter is used only while the
//! database has no replication origin other than ours; `--ledger-origin off` turns it off.

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use super::SourceConfig;

/// The first server major whose pgoutput takes the `origin` option.
const FIRST_VERSION: i32 = 160000;

/// The origin the ledger of this slot writes under.
pub fn origin_name(cfg: &SourceConfig) -> String {
    format!("cdc_relay_ledger_{}", cfg.slot)
}

/// Decides whether the ledger writes under a replication origin that the stream filters out, and
/// creates the origin if so. `None` (no filter) when not `wanted` (`--ledger-origin off`), on
/// servers before 16, when the cluster has origins other than relays' ledgers, or when the role may
/// not create one. Never an error: the filter only saves the server work, so whatever goes wrong
/// here is logged (with the fix) and the ledger's marker does the job alone.
pub async fn ledger_origin(cfg: &SourceConfig, sql: &Client, wanted: bool) -> Option<String> {
    let version = match super::catalog::server_version(sql).await {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "the ledger's writes are not filtered by origin");
            return None;
        }
    };
    if version < FIRST_VERSION {
        tracing::info!(
            server_version_num = version,
            "ledger writes are decoded and dropped by the stream (filtering them by origin needs PostgreSQL 16)"
        );
        return None;
    }
    // Whatever is decided, stale ledger origins give their replication states back.
    drop_orphans(sql).await;
    if !wanted {
        drop_origin(cfg, sql).await;
        tracing::info!("ledger writes are decoded and dropped by the stream (--ledger-origin off)");
        return None;
    }
    let name = origin_name(cfg);
    let others = sql
        .query(
            "SELECT roname FROM pg_replication_origin \
             WHERE roname NOT LIKE 'cdc\\_relay\\_ledger\\_%' ORDER BY roname",
            &[],
        )
        .await;
    let others: Vec<String> = match others {
        Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
        Err(e) => {
            tracing::warn!(error = %super::pg_text(&e), "could not read the replication origins; the ledger's writes are not filtered by origin");
            return None;
        }
    };
    if !others.is_empty() {
        drop_origin(cfg, sql).await;
        tracing::info!(
            origins = ?others,
            "not filtering the ledger's writes by origin: the cluster has other replication origins (subscriptions), whose changes `origin = none` would drop too"
        );
        return None;
    }
    let created = sql
        .execute(
            "SELECT pg_replication_origin_create($1) \
             WHERE NOT EXISTS (SELECT FROM pg_replication_origin WHERE roname = $1)",
            &[&name],
        )
        .await;
    match created {
        Ok(_) => {
            tracing::info!(origin = %name, "the ledger writes under a replication origin the stream filters out (origin = none)");
            Some(name)
        }
        Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {
            tracing::info!(
                "ledger writes are decoded and dropped by the stream; to have the server skip them, a superuser runs: \
                 GRANT EXECUTE ON FUNCTION pg_replication_origin_create, pg_replication_origin_session_setup, pg_replication_origin_drop TO <relay role> \
                 (sql/postgres/roles.sql)"
            );
            None
        }
        // Two relays of one slot racing to create it: the other one did.
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => Some(name),
        Err(e) => {
            tracing::warn!(origin = %name, error = %super::pg_text(&e), "could not create the ledger's replication origin; its writes are not filtered by origin");
            None
        }
    }
}

/// Drops the ledger origins whose slot is gone (a relay's slot dropped by hand, or by an earlier
/// release that did not drop the origin with it), so they do not hold replication states. A relay
/// creates its origin only after its slot, so a live relay's origin always has its slot.
async fn drop_orphans(sql: &Client) {
    let dropped = sql
        .query(
            "SELECT o.roname, pg_replication_origin_drop(o.roname) FROM pg_replication_origin o \
             WHERE o.roname LIKE 'cdc\\_relay\\_ledger\\_%' AND NOT EXISTS \
             (SELECT FROM pg_replication_slots s WHERE 'cdc_relay_ledger_' || s.slot_name = o.roname)",
            &[],
        )
        .await;
    match dropped {
        Ok(rows) if !rows.is_empty() => {
            let names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
            tracing::info!(origins = ?names, "dropped the ledger origins of slots that no longer exist");
        }
        Ok(_) => {}
        Err(e) => {
            tracing::debug!(error = %super::pg_text(&e), "could not drop the origins of dropped slots")
        }
    }
}

/// Drops the slot's ledger origin, if it has one; run after its slot was dropped. A failure (no
/// privilege) only leaves it to the next stream's clean-up.
pub async fn drop_origin(cfg: &SourceConfig, sql: &Client) {
    if let Err(e) = sql
        .execute(
            "SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin WHERE roname = $1",
            &[&origin_name(cfg)],
        )
        .await
    {
        tracing::debug!(error = %super::pg_text(&e), "could not drop the slot's ledger origin");
    }
}

/// Puts a session under the origin. A failure is not fatal: the ledger's marker message still has
/// the stream drop its writes, they only cost decoding again. One origin can be set up in one
/// session at a time, so a ledger session whose predecessor's backend has not yet gone away
/// (55006, object_in_use) simply writes without it.
pub async fn set_up_session(sql: &Client, origin: &str) {
    if let Err(e) = sql
        .execute("SELECT pg_replication_origin_session_setup($1)", &[&origin])
        .await
    {
        tracing::warn!(origin, error = %super::pg_text(&e), "the ledger session writes without its replication origin: the stream drops its writes by their marker instead");
    }
}
