//! Inserts batches of rows. An insert is all or nothing for the sink: either ClickHouse confirmed it,
//! or the batch is retried whole (a retried batch that had in fact landed only adds versions that
//! ReplacingMergeTree collapses).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::value::RawValue;

use super::config::quote_ident;
use super::row::{Cells, SeedRow};
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

    /// Inserts the rows: those without added columns as typed rows, the others as `JSONEachRow`,
    /// one statement per set of added columns (see [`super::tables::GenericWriter::insert`] for
    /// why a row leaves out the columns its message lacks).
    pub async fn insert(&self, rows: &[SeedRow]) -> Result<(), SinkError> {
        let plain: Vec<&UserLoginRow> = rows
            .iter()
            .filter(|r| r.extra.is_empty())
            .map(|r| &r.row)
            .collect();
        self.insert_plain(&plain).await?;
        let mut groups: Vec<Vec<&SeedRow>> = Vec::new();
        let same = |a: &SeedRow, b: &SeedRow| {
            a.extra.len() == b.extra.len()
                && a.extra.iter().zip(&b.extra).all(|((x, _), (y, _))| x == y)
        };
        for row in rows.iter().filter(|r| !r.extra.is_empty()) {
            match groups.iter_mut().find(|g| same(g[0], row)) {
                Some(group) => group.push(row),
                None => groups.push(vec![row]),
            }
        }
        for group in groups {
            self.insert_with_added(&group).await?;
        }
        Ok(())
    }

    async fn insert_plain(&self, rows: &[&UserLoginRow]) -> Result<(), SinkError> {
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
            insert.write(*row).await.map_err(err)?;
        }
        insert.end().await.map_err(err)
    }

    /// Rows that all carry the same added columns.
    async fn insert_with_added(&self, rows: &[&SeedRow]) -> Result<(), SinkError> {
        let Some(first) = rows.first() else {
            return Ok(());
        };
        let mut cols: Vec<String> = super::schema::COLUMNS
            .iter()
            .map(|(n, _)| n.to_string())
            .collect();
        cols.extend(first.extra.iter().map(|(n, _)| quote_ident(n)));
        let sql = format!(
            "INSERT INTO {} ({}) FORMAT JSONEachRow",
            self.cfg.qualified_table(),
            cols.join(", ")
        );
        let mut body = Vec::with_capacity(rows.len() * 160);
        for r in rows {
            let line = serde_json::to_vec(&r.row).unwrap_or_default();
            // The typed row's object, then the added columns: `{...}` → `{..., "c": v}`.
            let Some(open) = line.strip_suffix(b"}") else {
                continue;
            };
            body.extend_from_slice(open);
            for (name, text) in &r.extra {
                body.push(b',');
                // Serialising a str cannot fail.
                let _ = serde_json::to_writer(&mut body, &**name);
                body.push(b':');
                body.extend_from_slice(text.as_bytes());
            }
            body.extend_from_slice(b"}\n");
        }
        let context = format!(
            "inserting {} rows into {}",
            rows.len(),
            self.cfg.qualified_table()
        );
        let err = |source| SinkError::Client {
            url: self.cfg.url.clone(),
            context: context.clone(),
            source,
        };
        let mut insert = self.client.insert_formatted_with(sql);
        insert.send(Bytes::from(body)).await.map_err(err)?;
        insert.end().await.map_err(err)
    }

    /// Stored rows of these ids with a `_version` below `below` and at or above the truncate
    /// watermark, with the added columns `added` too (to complete updates that left TOASTed
    /// columns out; [`super::batch::fill_from_stored`] picks).
    pub async fn rows_below(
        &self,
        ids: &[i64],
        added: &[String],
        below: u64,
    ) -> Result<Vec<SeedRow>, SinkError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // Numbers only, so formatting them in is safe; 18.16 cannot bind an array to IN.
        let filter = format!(
            "FROM {} WHERE id IN ({}) AND _version < {below} \
             AND _version >= (SELECT max(version) FROM {})",
            self.cfg.qualified_table(),
            ids.iter().map(i64::to_string).collect::<Vec<_>>().join(","),
            self.cfg.qualified_truncates(),
        );
        let err = |context: &str| {
            let (url, context) = (self.cfg.url.clone(), context.to_string());
            move |source| SinkError::Client {
                url,
                context,
                source,
            }
        };
        let rows: Vec<UserLoginRow> = self
            .client
            .query(&format!("SELECT ?fields {filter}"))
            .fetch_all()
            .await
            .map_err(err("reading earlier rows for unchanged TOAST columns"))?;
        let mut rows: Vec<SeedRow> = rows.into_iter().map(SeedRow::plain).collect();
        if added.is_empty() {
            return Ok(rows);
        }
        let select: Vec<String> = added.iter().map(|c| quote_ident(c)).collect();
        let mut cursor = self
            .client
            .query_raw(&format!(
                "SELECT id, _version, {} {filter} FORMAT JSONEachRow",
                select.join(", ")
            ))
            .with_setting("output_format_json_quote_64bit_integers", "0")
            .with_setting("output_format_json_quote_denormals", "1")
            .fetch_bytes("JSONEachRow")
            .map_err(err("reading earlier rows' added columns"))?;
        let mut text = Vec::new();
        while let Some(chunk) = cursor
            .next()
            .await
            .map_err(err("reading earlier rows' added columns"))?
        {
            text.extend_from_slice(&chunk);
        }
        let mut cells: HashMap<(i64, u64), Cells> = HashMap::new();
        for line in String::from_utf8_lossy(&text).lines() {
            let Ok(map) = serde_json::from_str::<HashMap<String, Box<RawValue>>>(line) else {
                continue;
            };
            let num = |c: &str| map.get(c).map(|v| v.get().trim_matches('"').to_string());
            let (Some(Ok(id)), Some(Ok(version))) = (
                num("id").map(|t| t.parse::<i64>()),
                num("_version").map(|t| t.parse::<u64>()),
            ) else {
                continue;
            };
            let row = added
                .iter()
                .filter_map(|c| {
                    map.get(c)
                        .map(|v| (Arc::from(c.as_str()), v.get().to_string()))
                })
                .collect();
            cells.insert((id, version), row);
        }
        for r in &mut rows {
            if let Some(c) = cells.remove(&(r.row.id, r.row._version)) {
                r.extra = c;
            }
        }
        Ok(rows)
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
