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

    /// Stored rows of these ids with a `_version` below `below` and at or above the truncate
    /// watermark (to complete updates that left TOASTed columns out;
    /// [`super::batch::fill_from_stored`] picks).
    pub async fn rows_below(
        &self,
        ids: &[i64],
        below: u64,
    ) -> Result<Vec<UserLoginRow>, SinkError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        self.client
            // Numbers only, so formatting them in is safe; 18.16 cannot bind an array to IN.
            .query(&format!(
                "SELECT ?fields FROM {} WHERE id IN ({}) AND _version < {below} \
                 AND _version >= (SELECT max(version) FROM {})",
                self.cfg.qualified_table(),
                ids.iter().map(i64::to_string).collect::<Vec<_>>().join(","),
                self.cfg.qualified_truncates(),
            ))
            .fetch_all()
            .await
            .map_err(|source| SinkError::Client {
                url: self.cfg.url.clone(),
                context: "reading earlier rows for unchanged TOAST columns".into(),
                source,
            })
    }

    /// Records a truncate: every row with a `_version` below `version` is gone, whenever it
    /// arrives (the view filters on the highest recorded version). Recording it twice is harmless.
    pub async fn truncate_before(&self, version: u64) -> Result<(), SinkError> {
        self.client
            .query(&format!(
                "INSERT INTO {} (version) VALUES ({version})",
                self.cfg.qualified_truncates()
            ))
            .execute()
            .await
            .map_err(|source| SinkError::Client {
                url: self.cfg.url.clone(),
                context: "recording a truncate".into(),
                source,
            })
    }

    /// The highest recorded truncate version (0 when there was none).
    pub async fn truncate_watermark(&self) -> Result<u64, SinkError> {
        self.client
            .query(&format!(
                "SELECT max(version) FROM {}",
                self.cfg.qualified_truncates()
            ))
            .fetch_one()
            .await
            .map_err(|source| SinkError::Client {
                url: self.cfg.url.clone(),
                context: "reading the truncate watermark".into(),
                source,
            })
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
