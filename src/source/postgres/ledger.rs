//! The confirmation ledger: `sent_to_kafka = TRUE` for rows whose message Kafka acknowledged.
//!
//! One statement per batch, and inside it a transactional logical decoding message written before any
//! row is touched. The stream sees that message first in the transaction and drops the transaction's
//! row changes, so the relay's own updates never come back as events, whatever the publication
//! publishes, while a user's UPDATE of the same row still does.
//!
//! The ledger never waits long on anybody: its session has a short `lock_timeout`. A row another
//! transaction holds locked is skipped (`FOR NO KEY UPDATE SKIP LOCKED`, which a foreign key's check
//! does not block) and reported back, to be tried
//! again later; a table-level lock (a TRUNCATE or ALTER TABLE waiting or running) makes the whole
//! batch wait for a later try. Either way only the slot's confirmed position waits, never the stream.

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use super::client::quote_literal;
use super::{SourceConfig, SourceError, TableSpec, LEDGER_MESSAGE_PREFIX};

/// How long a ledger statement waits for a lock before it steps back.
const LOCK_TIMEOUT: &str = "250ms";

/// What a ledger write did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LedgerOutcome {
    /// Rows set to TRUE.
    pub marked: u64,
    /// Ids still not TRUE because another transaction holds them (or the table) locked.
    pub locked: Vec<i64>,
    /// The table itself was locked (DDL): nothing was written.
    pub table_locked: bool,
}

pub struct Ledger {
    cfg: SourceConfig,
    spec: TableSpec,
    client: Option<Client>,
    statement: String,
    skip_locked_statement: String,
    unsent_statement: String,
}

impl Ledger {
    /// The ledger of one table (`spec`, which has the ledger column).
    pub fn new(cfg: &SourceConfig, spec: &TableSpec) -> Self {
        let table = spec.qualified();
        let (id, sent) = (spec.key(), spec.ledger().unwrap_or_default());
        // The marker names the slot, so a stream can tell its own ledger from another relay's
        // (each is dropped; only its own counts in the metrics). It sits in a one-row subquery
        // joined to the update, so it is evaluated before the first row reaches the update, and
        // its WAL record comes first in the transaction.
        // Ids go in as ranges of consecutive ids: acknowledged ids are mostly runs, and a range is
        // one index range scan where a list is one probe per id (about twice as fast measured).
        let marker = format!(
            "(SELECT pg_logical_emit_message(true, '{LEDGER_MESSAGE_PREFIX}', {}) AS lsn) AS marker",
            quote_literal(&cfg.slot)
        );
        let statement = format!(
            "UPDATE {table} AS t SET {sent} = TRUE \
             FROM {marker}, unnest($1::int8[], $2::int8[]) AS r(lo, hi) \
             WHERE t.{id} BETWEEN r.lo AND r.hi AND t.{sent} IS NOT TRUE"
        );
        // Only after the plain statement met a lock: locking first costs a second write per row.
        let skip_locked_statement = format!(
            "UPDATE {table} AS t SET {sent} = TRUE \
             FROM {marker}, \
                  (SELECT l.{id} FROM {table} AS l, unnest($1::int8[], $2::int8[]) AS r(lo, hi) \
                   WHERE l.{id} BETWEEN r.lo AND r.hi AND l.{sent} IS NOT TRUE \
                   FOR NO KEY UPDATE OF l SKIP LOCKED) AS s \
             WHERE t.{id} = s.{id}"
        );
        let unsent_statement = format!(
            "SELECT t.{id}::int8 FROM {table} AS t, unnest($1::int8[], $2::int8[]) AS r(lo, hi) \
             WHERE t.{id} BETWEEN r.lo AND r.hi AND t.{sent} IS NOT TRUE"
        );
        Ledger {
            cfg: cfg.clone(),
            spec: spec.clone(),
            client: None,
            statement,
            skip_locked_statement,
            unsent_statement,
        }
    }

    async fn session(&mut self) -> Result<&Client, SourceError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            let client = self.cfg.connect_sql().await?;
            client
                .batch_execute(&format!(
                    "SET lock_timeout = '{LOCK_TIMEOUT}'; SET statement_timeout = '120s'; \
                     SET application_name = 'cdc-relay ledger'"
                ))
                .await
                .map_err(SourceError::sql("setting up the ledger session"))?;
            if let Some(origin) = &self.cfg.ledger_origin {
                super::origin::set_up_session(&client, origin).await;
            }
            self.client = Some(client);
        }
        Ok(self.client.as_ref().expect("connected above"))
    }

    /// Marks the rows sent. `ids` is sorted and deduplicated first so concurrent writers lock rows in
    /// one order. On error the connection is dropped and the next call opens a new one.
    pub async fn mark_sent(&mut self, ids: &mut Vec<i64>) -> Result<LedgerOutcome, SourceError> {
        if ids.is_empty() {
            return Ok(LedgerOutcome::default());
        }
        ids.sort_unstable();
        ids.dedup();
        let (lo, hi) = ranges(ids);
        let result = self.try_mark(&lo, &hi).await;
        if result.is_err() {
            self.client = None;
        }
        result
    }

    async fn try_mark(&mut self, lo: &[i64], hi: &[i64]) -> Result<LedgerOutcome, SourceError> {
        self.session().await?;
        let client = self.client.as_ref().expect("session opened above");
        let lock_timeout =
            |e: &tokio_postgres::Error| e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE);
        match client.execute(&self.statement, &[&lo, &hi]).await {
            Ok(marked) => {
                return Ok(LedgerOutcome {
                    marked,
                    ..Default::default()
                })
            }
            Err(e) if lock_timeout(&e) => {}
            Err(e) => return Err(self.explain(e)),
        }
        let all = || -> Vec<i64> { lo.iter().zip(hi).flat_map(|(&l, &h)| l..=h).collect() };
        let table_locked = || LedgerOutcome {
            marked: 0,
            locked: all(),
            table_locked: true,
        };
        let marked = match client
            .execute(&self.skip_locked_statement, &[&lo, &hi])
            .await
        {
            Ok(n) => n,
            Err(e) if lock_timeout(&e) => return Ok(table_locked()),
            Err(e) => return Err(self.explain(e)),
        };
        match client.query(&self.unsent_statement, &[&lo, &hi]).await {
            Ok(rows) => Ok(LedgerOutcome {
                marked,
                locked: rows.iter().map(|r| r.get(0)).collect(),
                table_locked: false,
            }),
            Err(e) if lock_timeout(&e) => Ok(LedgerOutcome {
                marked,
                ..table_locked()
            }),
            Err(e) => Err(self.explain(e)),
        }
    }

    fn explain(&self, e: tokio_postgres::Error) -> SourceError {
        if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
            let table = self.spec.qualified();
            return SourceError::Privilege(format!(
                "the ledger cannot update {table}: GRANT UPDATE (sent_to_kafka) ON {table} TO <role> (see sql/postgres/roles.sql): {}",
                super::pg_text(&e)
            ));
        }
        SourceError::Sql {
            context: "writing the sent_to_kafka ledger".into(),
            source: e,
        }
    }
}

/// Sorted, deduplicated ids as ranges of consecutive ids: `[1,2,3,7]` → `([1,7], [3,7])`.
fn ranges(ids: &[i64]) -> (Vec<i64>, Vec<i64>) {
    let (mut lo, mut hi): (Vec<i64>, Vec<i64>) = (Vec::new(), Vec::new());
    for &id in ids {
        match hi.last_mut() {
            Some(last) if last.checked_add(1) == Some(id) => *last = id,
            _ => {
                lo.push(id);
                hi.push(id);
            }
        }
    }
    (lo, hi)
}

#[cfg(test)]
mod tests {
    use super::ranges;

    #[test]
    fn consecutive_ids_become_ranges() {
        assert_eq!(
            ranges(&[1, 2, 3, 7, 9, 10]),
            (vec![1, 7, 9], vec![3, 7, 10])
        );
        assert_eq!(ranges(&[]), (vec![], vec![]));
        assert_eq!(
            ranges(&[i64::MAX - 1, i64::MAX]),
            (vec![i64::MAX - 1], vec![i64::MAX])
        );
    }
}
