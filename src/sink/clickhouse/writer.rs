//! Inserts batches of rows. An insert is all or nothing for the sink: either ClickHouse confirmed it,
//! or the batch is retried whole (a retried batch that had in fact landed only adds versions that
//! ReplacingMergeTree collapses).

use super::{ClickHouseConfig, SinkError, UserLoginRow};

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
