//! The confirmation ledger: `sent_to_kafka = TRUE` for rows whose message Kafka acknowledged.
//!
//! One statement per batch, and inside it a transactional logical decoding message written before any
//! row is touched. The stream sees that message first in the transaction and drops the transaction's
//! row changes, so the relay's own updates never come back as events, whatever the publication
//! publishes, while a user's UPDATE of the same row still does.

use tokio_postgres::Client;

use super::{SourceConfig, SourceError, LEDGER_MESSAGE_PREFIX};

pub struct Ledger {
    cfg: SourceConfig,
    client: Option<Client>,
    statement: String,
}

impl Ledger {
    pub fn new(cfg: &SourceConfig) -> Self {
        // The marker sits in a one-row subquery joined to the update, so it is evaluated before the
        // first row reaches the update, and its WAL record comes first in the transaction.
        // Ids go in as ranges of consecutive ids: acknowledged ids are mostly runs, and a range is
        // one index range scan where a list is one probe per id (about twice as fast measured).
        let statement = format!(
            "UPDATE {} AS t SET sent_to_kafka = TRUE \
             FROM (SELECT pg_logical_emit_message(true, '{LEDGER_MESSAGE_PREFIX}', '') AS lsn) AS marker, \
                  unnest($1::int8[], $2::int8[]) AS r(lo, hi) \
             WHERE t.id BETWEEN r.lo AND r.hi AND t.sent_to_kafka IS NOT TRUE",
            cfg.qualified_table()
        );
        Ledger {
            cfg: cfg.clone(),
            client: None,
            statement,
        }
    }

    /// The ledger's SQL session, reopened if it was lost. Also used for heartbeats.
    pub async fn sql(&mut self) -> Result<&Client, SourceError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = Some(self.cfg.connect_sql().await?);
        }
        Ok(self.client.as_ref().expect("connected above"))
    }

    /// Marks the rows sent. `ids` is sorted and deduplicated first so concurrent writers lock rows in
    /// one order. Returns how many rows changed (rows already TRUE or deleted since do not count).
    /// On error the connection is dropped and the next call opens a new one.
    pub async fn mark_sent(&mut self, ids: &mut Vec<i64>) -> Result<u64, SourceError> {
        if ids.is_empty() {
            return Ok(0);
        }
        ids.sort_unstable();
        ids.dedup();
        let (lo, hi) = ranges(ids);
        let statement = self.statement.clone();
        let client = self.sql().await?;
        match client.execute(&statement, &[&lo, &hi]).await {
            Ok(n) => Ok(n),
            Err(e) => {
                self.client = None;
                let privilege =
                    e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE);
                if privilege {
                    return Err(SourceError::Privilege(format!(
                        "the ledger cannot update {}: GRANT UPDATE (sent_to_kafka) ON {} TO <role> (see sql/postgres/roles.sql): {e}",
                        self.cfg.qualified_table(),
                        self.cfg.qualified_table()
                    )));
                }
                Err(SourceError::Sql {
                    context: "writing the sent_to_kafka ledger".into(),
                    source: e,
                })
            }
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
