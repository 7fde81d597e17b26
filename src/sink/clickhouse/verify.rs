//! The ClickHouse side of `cdc-relay verify`: per-bucket row counts and hash sums of a table's
//! current-rows view, computed by the server, and the hashes of the rows of a few buckets.
//!
//! The SQL of the canonical text comes from `types::canonical`; this module only runs it.

use super::config::quote_string;
use super::schema::{server_version, ServerVersion};
use super::table::TableNames;
use super::{ClickHouseConfig, SinkError};

/// Reads current-rows views.
pub struct ViewReader {
    client: clickhouse::Client,
    url: String,
}

impl ViewReader {
    pub fn new(cfg: &ClickHouseConfig) -> Self {
        ViewReader {
            client: cfg.client(),
            url: cfg.url.clone(),
        }
    }

    fn err(&self, context: String) -> impl FnOnce(clickhouse::error::Error) -> SinkError {
        let url = self.url.clone();
        move |source| SinkError::Client {
            url,
            context,
            source,
        }
    }

    pub async fn version(&self) -> Result<ServerVersion, SinkError> {
        server_version(&self.client, &self.url).await
    }

    async fn tsv(&self, sql: &str, context: String) -> Result<String, SinkError> {
        let mut cursor = self
            .client
            .query_raw(sql)
            .fetch_bytes("TSV")
            .map_err(self.err(context.clone()))?;
        let mut out = Vec::new();
        while let Some(chunk) = cursor.next().await.map_err(self.err(context.clone()))? {
            out.extend_from_slice(&chunk);
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// The view's columns (name, type); empty when there is no such view.
    pub async fn columns(&self, view: &TableNames) -> Result<Vec<(String, String)>, SinkError> {
        let sql = format!(
            "SELECT name, type FROM system.columns WHERE database = {} AND table = {} FORMAT TSV",
            quote_string(&view.database),
            quote_string(&view.table)
        );
        let text = self
            .tsv(&sql, format!("reading the columns of {}", view.qualified()))
            .await?;
        Ok(text
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect())
    }

    /// The largest `_version` the view shows (0 when empty).
    pub async fn max_version(&self, view: &TableNames) -> Result<u64, SinkError> {
        let sql = format!("SELECT max(_version) FROM {} FORMAT TSV", view.qualified());
        let text = self
            .tsv(
                &sql,
                format!("reading the versions of {}", view.qualified()),
            )
            .await?;
        Ok(text.trim().parse().unwrap_or(0))
    }

    /// The smallest and largest value of an integer key among the rows `filter` selects.
    pub async fn key_bounds(
        &self,
        view: &TableNames,
        key: &str,
        filter: &str,
    ) -> Result<(Option<i64>, Option<i64>), SinkError> {
        let sql = format!(
            "SELECT toString(min(toInt64({key}))), toString(max(toInt64({key}))), count() FROM {} WHERE {filter} FORMAT TSV",
            view.qualified()
        );
        let text = self
            .tsv(&sql, format!("reading a key range of {}", view.qualified()))
            .await?;
        let mut f = text.trim_end().split('\t');
        let (min, max, n) = (f.next(), f.next(), f.next());
        if n == Some("0") {
            return Ok((None, None));
        }
        Ok((
            min.and_then(|v| v.parse().ok()),
            max.and_then(|v| v.parse().ok()),
        ))
    }

    /// (bucket, rows, hash sum) of every bucket of the rows `filter` selects; `bucket`, `hash` and
    /// `filter` are SQL over the view's columns.
    pub async fn bucket_sums(
        &self,
        view: &TableNames,
        bucket: &str,
        hash: &str,
        filter: &str,
    ) -> Result<Vec<(i64, u64, u64)>, SinkError> {
        // No alias: ClickHouse aliases are global, one named like a column (`b`) would replace
        // that column inside the hash.
        let sql = format!(
            "SELECT toInt64({bucket}), count(), sum({hash}) FROM {} WHERE {filter} GROUP BY toInt64({bucket}) FORMAT TSV",
            view.qualified()
        );
        let context = format!("summing the buckets of {}", view.qualified());
        let text = self.tsv(&sql, context.clone()).await?;
        text.lines()
            .map(|l| {
                let mut f = l.split('\t');
                let mut next = || f.next().unwrap_or_default();
                let (b, n, h) = (next(), next(), next());
                match (b.parse(), n.parse(), h.parse()) {
                    (Ok(b), Ok(n), Ok(h)) => Ok((b, n, h)),
                    _ => Err(SinkError::Output(format!(
                        "{context}: unexpected line {l:?}"
                    ))),
                }
            })
            .collect()
    }

    /// The key text, hash and `_version` of every row `filter` selects.
    pub async fn row_hashes(
        &self,
        view: &TableNames,
        key: &str,
        hash: &str,
        filter: &str,
    ) -> Result<Vec<(String, u64, u64)>, SinkError> {
        // The key as hex: TSV would escape it.
        let sql = format!(
            "SELECT hex({key}), {hash}, _version FROM {} WHERE {filter} FORMAT TSV",
            view.qualified()
        );
        let context = format!("hashing rows of {}", view.qualified());
        let text = self.tsv(&sql, context.clone()).await?;
        text.lines()
            .map(|l| {
                let mut f = l.split('\t');
                let mut next = || f.next().unwrap_or_default();
                let (k, h, v) = (next(), next(), next());
                match (unhex(k), h.parse(), v.parse()) {
                    (Some(k), Ok(h), Ok(v)) => Ok((k, h, v)),
                    _ => Err(SinkError::Output(format!(
                        "{context}: unexpected line {l:?}"
                    ))),
                }
            })
            .collect()
    }
}

impl ViewReader {
    /// `exprs` (SQL over the view's columns, each a String, `\\N` for NULL) for every row
    /// `filter` selects.
    pub async fn text_rows(
        &self,
        view: &TableNames,
        exprs: &[String],
        filter: &str,
    ) -> Result<Vec<Vec<Option<String>>>, SinkError> {
        let select: Vec<String> = exprs.iter().map(|e| format!("hex({e})")).collect();
        let sql = format!(
            "SELECT {} FROM {} WHERE {filter} FORMAT TSV",
            select.join(", "),
            view.qualified()
        );
        let context = format!("reading rows of {}", view.qualified());
        let text = self.tsv(&sql, context.clone()).await?;
        text.lines()
            .map(|l| {
                l.split('\t')
                    .map(|f| match unhex(f) {
                        Some(v) if v == "\\N" => Ok(None),
                        Some(v) => Ok(Some(v)),
                        None => Err(SinkError::Output(format!(
                            "{context}: unexpected line {l:?}"
                        ))),
                    })
                    .collect()
            })
            .collect()
    }
}

fn unhex(hex: &str) -> Option<String> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn unhex_reads_clickhouse_hex() {
        assert_eq!(super::unhex("313A61").as_deref(), Some("1:a"));
        assert_eq!(super::unhex("").as_deref(), Some(""));
        assert!(super::unhex("3").is_none());
        assert!(super::unhex("ZZ").is_none());
    }
}
