//! Table and view DDL, chosen by server version, and the check of an existing table.
//!
//! ClickHouse 18.16 (Debian's) has `ReplacingMergeTree(ver)` but not the `is_deleted` argument
//! (23.2+), nor DateTime64, so the common schema uses what both have; on a newer server the engine
//! also gets `_deleted`, which lets merges drop deleted rows. Either way the view filters deleted rows.

use super::config::quote_ident;
use super::{ClickHouseConfig, SinkError};

/// `major.minor` of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServerVersion {
    pub major: u32,
    pub minor: u32,
}

impl ServerVersion {
    pub fn parse(text: &str) -> Result<Self, SinkError> {
        let mut parts = text.trim().split('.');
        let mut next = || parts.next().and_then(|p| p.parse::<u32>().ok());
        match (next(), next()) {
            (Some(major), Some(minor)) => Ok(ServerVersion { major, minor }),
            _ => Err(SinkError::Version(text.to_string())),
        }
    }

    /// `ReplacingMergeTree(ver, is_deleted)` exists from 23.2 on.
    pub fn has_is_deleted(self) -> bool {
        self >= ServerVersion {
            major: 23,
            minor: 2,
        }
    }
}

/// The columns the sink writes and reads, with their types.
pub const COLUMNS: &[(&str, &str)] = &[
    ("id", "UInt64"),
    ("username", "Nullable(String)"),
    ("event_type", "Nullable(String)"),
    ("event_time", "Nullable(DateTime)"),
    ("event_time_us", "Nullable(Int64)"),
    ("op", "String"),
    ("_lsn", "String"),
    ("_version", "UInt64"),
    ("_deleted", "UInt8"),
];

pub fn create_table_sql(cfg: &ClickHouseConfig, version: ServerVersion) -> String {
    let cols: Vec<String> = COLUMNS
        .iter()
        .map(|(n, t)| format!("    {n} {t}"))
        .chain(std::iter::once(
            "    _ingested_at DateTime DEFAULT now()".to_string(),
        ))
        .collect();
    let engine = if version.has_is_deleted() {
        "ReplacingMergeTree(_version, _deleted)"
    } else {
        "ReplacingMergeTree(_version)"
    };
    format!(
        "CREATE TABLE IF NOT EXISTS {} (\n{}\n) ENGINE = {engine} ORDER BY id",
        cfg.qualified_table(),
        cols.join(",\n")
    )
}

/// One current, non-deleted row per id: FINAL collapses versions at read time, so the view is
/// exact even before background merges ran.
pub fn create_view_sql(cfg: &ClickHouseConfig) -> String {
    let cols: Vec<&str> = COLUMNS
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| *n != "_deleted")
        .collect();
    format!(
        "CREATE VIEW IF NOT EXISTS {} AS SELECT {} FROM {} FINAL WHERE _deleted = 0",
        cfg.qualified_view(),
        cols.join(", "),
        cfg.qualified_table()
    )
}

/// Reads the server version.
pub async fn server_version(
    client: &clickhouse::Client,
    url: &str,
) -> Result<ServerVersion, SinkError> {
    let text: String = client
        .query("SELECT version()")
        .fetch_one()
        .await
        .map_err(|source| SinkError::Client {
            url: url.to_string(),
            context: "reading the server version".into(),
            source,
        })?;
    ServerVersion::parse(&text)
}

/// Creates the table and view if missing, then checks that the table has every column with the
/// type the sink writes.
pub async fn ensure_schema(
    client: &clickhouse::Client,
    cfg: &ClickHouseConfig,
    version: ServerVersion,
) -> Result<(), SinkError> {
    let err = |context: &str| {
        let context = context.to_string();
        let url = cfg.url.clone();
        move |source| SinkError::Client {
            url,
            context,
            source,
        }
    };
    client
        .query(&format!(
            "CREATE DATABASE IF NOT EXISTS {}",
            quote_ident(&cfg.database)
        ))
        .execute()
        .await
        .map_err(err("creating the database"))?;
    client
        .query(&create_table_sql(cfg, version))
        .execute()
        .await
        .map_err(err("creating the table"))?;
    check_table(client, cfg).await?;
    client
        .query(&create_view_sql(cfg))
        .execute()
        .await
        .map_err(err("creating the current-rows view"))?;
    Ok(())
}

async fn check_table(client: &clickhouse::Client, cfg: &ClickHouseConfig) -> Result<(), SinkError> {
    #[derive(clickhouse::Row, serde::Deserialize)]
    struct Col {
        name: String,
        r#type: String,
    }
    let cols: Vec<Col> = client
        .query("SELECT name, type FROM system.columns WHERE database = ? AND table = ?")
        .bind(&cfg.database)
        .bind(&cfg.table)
        .fetch_all()
        .await
        .map_err(|source| SinkError::Client {
            url: cfg.url.clone(),
            context: "reading the table's columns".into(),
            source,
        })?;
    for (name, ty) in COLUMNS {
        match cols.iter().find(|c| c.name == *name) {
            None => {
                return Err(SinkError::Schema {
                    table: cfg.qualified_table(),
                    column: (*name).into(),
                    reason: "is missing".into(),
                })
            }
            // DateTime may carry a time zone on newer servers.
            Some(c)
                if c.r#type != *ty
                    && !(c.r#type.starts_with("Nullable(DateTime(") && *name == "event_time") =>
            {
                return Err(SinkError::Schema {
                    table: cfg.qualified_table(),
                    column: (*name).into(),
                    reason: format!("has type {}, the sink writes {ty}", c.r#type),
                })
            }
            Some(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ClickHouseConfig {
        ClickHouseConfig {
            url: "http://x".into(),
            user: "u".into(),
            password: "p".into(),
            database: "default".into(),
            table: "user_logins".into(),
            tls: None,
        }
    }

    #[test]
    fn reference_ddl_matches_the_code() {
        let reference = include_str!("../../../sql/clickhouse/schema.sql");
        for (name, ty) in COLUMNS {
            assert!(
                reference.contains(&format!("{name} {ty},")),
                "{name} {ty} missing from sql/clickhouse/schema.sql"
            );
        }
    }

    #[test]
    fn engine_follows_the_version() {
        let old = ServerVersion::parse("18.16.1").unwrap();
        let new = ServerVersion::parse("25.8.2.29").unwrap();
        assert!(create_table_sql(&cfg(), old).contains("ReplacingMergeTree(_version)"));
        assert!(create_table_sql(&cfg(), new).contains("ReplacingMergeTree(_version, _deleted)"));
        assert!(ServerVersion::parse("x").is_err());
        assert!(create_view_sql(&cfg()).contains("FINAL WHERE _deleted = 0"));
    }
}
