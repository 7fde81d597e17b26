//! Inserts batches of rows. An insert is all or nothing for the sink: either ClickHouse confirmed it,
//! or the batch is retried whole (a retried batch that had in fact landed only adds versions that
//! ReplacingMergeTree collapses).

use super::{ClickHouseConfig, SinkError, UserLoginRow};

#[derive(Clone)]
pub struct ClickHouseWriter {
    client: clickhouse::Client,
    cfg: ClickHouseConfig,
}

impl ClickHouseWriter {
    pub fn new(cfg: &ClickHouseConfig) -> Self {
        ClickHouseWriter {
            client: cfg.client(),
            cfg: cfg.clone(),
        }
    }

    pub async fn insert(&self, rows: &[UserLoginRow]) -> Result<(), SinkError> {
        if rows.is_empty() {
            return Ok(());
        }
        let err = |source| SinkError::Client {
            url: self.cfg.url.clone(),
            context: format!(
                "inserting {} rows into {}",
                rows.len(),
                self.cfg.qualified_table()
            ),
            source,
        };
        let mut insert = self
            .client
            .insert::<UserLoginRow>(&self.cfg.table)
            .await
            .map_err(err)?;
        for row in rows {
            insert.write(row).await.map_err(err)?;
        }
        insert.end().await.map_err(err)
    }

    /// The current stored rows of these ids (to complete updates that left TOASTed columns out).
    pub async fn current_rows(&self, ids: &[u64]) -> Result<Vec<UserLoginRow>, SinkError> {
        self.client
            // Numbers only, so formatting them in is safe; 18.16 cannot bind an array to IN.
            .query(&format!(
                "SELECT ?fields FROM {} FINAL WHERE id IN ({})",
                self.cfg.qualified_table(),
                ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
            ))
            .fetch_all()
            .await
            .map_err(|source| SinkError::Client {
                url: self.cfg.url.clone(),
                context: "reading current rows for unchanged TOAST columns".into(),
                source,
            })
    }

    /// Marks every row older than `version` deleted (what a PostgreSQL TRUNCATE means here). A
    /// mutation: asynchronous in ClickHouse, and rows written later (higher versions) are untouched.
    pub async fn truncate_before(&self, version: u64) -> Result<(), SinkError> {
        self.client
            .query(&format!(
                "ALTER TABLE {} UPDATE _deleted = 1 WHERE _version < ?",
                self.cfg.qualified_table()
            ))
            .bind(version)
            .execute()
            .await
            .map_err(|source| SinkError::Client {
                url: self.cfg.url.clone(),
                context: "applying a truncate".into(),
                source,
            })
    }
}

/// Completes rows whose update did not carry some TOASTed columns from the latest earlier row of
/// the same id in the batch; returns those with no such row, to be completed from the table.
pub fn fill_from_batch(
    rows: &mut [UserLoginRow],
    unchanged: Vec<(usize, Vec<String>)>,
) -> Vec<(usize, Vec<String>)> {
    let mut rest = Vec::new();
    for (idx, cols) in unchanged {
        let id = rows[idx].id;
        match rows[..idx].iter().rposition(|r| r.id == id) {
            Some(prev) => {
                let prev = rows[prev].clone();
                copy_columns(&mut rows[idx], &prev, &cols);
            }
            None => rest.push((idx, cols)),
        }
    }
    rest
}

/// Completes rows from the stored current rows; columns with no stored value stay NULL.
pub fn fill_from_current(
    rows: &mut [UserLoginRow],
    rest: &[(usize, Vec<String>)],
    current: &[UserLoginRow],
) {
    for (idx, cols) in rest {
        if let Some(prev) = current.iter().find(|r| r.id == rows[*idx].id) {
            copy_columns(&mut rows[*idx], prev, cols);
        }
    }
}

fn copy_columns(row: &mut UserLoginRow, from: &UserLoginRow, cols: &[String]) {
    for c in cols {
        match c.as_str() {
            "username" => row.username = from.username.clone(),
            "event_type" => row.event_type = from.event_type.clone(),
            "event_time" => {
                row.event_time = from.event_time;
                row.event_time_us = from.event_time_us;
            }
            _ => {}
        }
    }
}

impl ClickHouseWriter {
    /// Stored versions and current rows, for `cdc-relay status`.
    pub async fn counts(&self) -> Result<(u64, u64), SinkError> {
        let err = |source| SinkError::Client {
            url: self.cfg.url.clone(),
            context: "counting rows".into(),
            source,
        };
        let raw: u64 = self
            .client
            .query(&format!(
                "SELECT count() FROM {}",
                self.cfg.qualified_table()
            ))
            .fetch_one()
            .await
            .map_err(err)?;
        let current: u64 = self
            .client
            .query(&format!(
                "SELECT count() FROM {}",
                self.cfg.qualified_view()
            ))
            .fetch_one()
            .await
            .map_err(err)?;
        Ok((raw, current))
    }
}
