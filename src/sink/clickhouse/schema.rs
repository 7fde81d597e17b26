//! Table and view DDL, chosen by server version, and the check of an existing table.
//!
//! ClickHouse 18.16 (Debian's) has `ReplacingMergeTree(ver)` but not the `is_deleted` argument
//! (23.2+), nor DateTime64, so the common schema uses what both have; on a newer server the engine
//! also gets `_deleted`, which lets merges drop deleted rows. Either way the view filters deleted rows.
//!
//! A truncate is a row in `<table>_truncates` (no mutation): the view hides every row whose
//! `_version` is below the highest truncate version, including rows that arrive after the truncate
//! was applied (from other partitions) with lower versions. Views of earlier releases lack that
//! filter and are re-created; tables of earlier releases (`id UInt64`) keep working.

use super::cluster;
use super::config::{quote_ident, quote_string};
use super::{ClickHouseConfig, SinkError};

/// `major.minor` of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServerVersion {
    pub major: u32,
    pub minor: u32,
}

impl std::fmt::Display for ServerVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
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

    /// `ALTER TABLE … RENAME COLUMN` exists from 20.4 on (18.16 refuses it: Code 62).
    pub fn has_rename_column(self) -> bool {
        self >= ServerVersion {
            major: 20,
            minor: 4,
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
    ("id", "Int64"),
    ("username", "Nullable(String)"),
    ("event_type", "Nullable(String)"),
    ("event_time", "Nullable(DateTime)"),
    ("event_time_us", "Nullable(Int64)"),
    ("op", "String"),
    ("_lsn", "String"),
    ("_version", "UInt64"),
    ("_deleted", "UInt8"),
];

pub fn create_database_sql(cfg: &ClickHouseConfig) -> String {
    format!(
        "CREATE DATABASE IF NOT EXISTS {}{}",
        quote_ident(&cfg.database),
        on_cluster(cfg)
    )
}

fn on_cluster(cfg: &ClickHouseConfig) -> String {
    cluster::on_cluster(cfg.cluster.as_deref())
}

/// On a cluster, the Distributed table over the storage, sharded by id (cluster.rs).
pub fn create_distributed_sql(cfg: &ClickHouseConfig) -> Option<String> {
    cluster::distributed_sql(
        cfg.cluster.as_deref(),
        &cfg.qualified_table(),
        &cfg.database,
        &cfg.storage_name(),
        "cityHash64(id)",
    )
}

pub fn create_table_sql(cfg: &ClickHouseConfig, version: ServerVersion) -> String {
    let cols: Vec<String> = COLUMNS
        .iter()
        .map(|(n, t)| format!("    {n} {t}"))
        .chain(std::iter::once(
            "    _ingested_at DateTime DEFAULT now()".to_string(),
        ))
        .collect();
    let args = if version.has_is_deleted() {
        "_version, _deleted"
    } else {
        "_version"
    };
    let engine = cluster::replacing_engine(
        cfg.cluster.as_deref(),
        &cfg.database,
        &cfg.storage_name(),
        args,
    );
    format!(
        "CREATE TABLE IF NOT EXISTS {}{} (\n{}\n) ENGINE = {engine} ORDER BY id",
        cfg.qualified_storage(),
        on_cluster(cfg),
        cols.join(",\n")
    )
}

/// The id column type of tables created by releases before negative ids were stored.
pub const LEGACY_ID_TYPE: &str = "UInt64";

/// One row per applied truncate. `max(version)` of an empty table is 0, which hides nothing.
pub fn create_truncates_sql(cfg: &ClickHouseConfig) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {}{} (\n    version UInt64,\n    applied_at DateTime DEFAULT now()\n) ENGINE = {} ORDER BY version",
        cfg.qualified_truncates(),
        on_cluster(cfg),
        cluster::truncates_engine(cfg.cluster.as_deref(), &cfg.database, &cfg.truncates_name())
    )
}

/// One current, non-deleted row per id, at or above the truncate watermark: FINAL collapses
/// versions at read time, so the view is exact even before background merges ran.
pub fn create_view_sql(cfg: &ClickHouseConfig) -> String {
    create_view_with_sql(cfg, &[])
}

/// The view with the columns a user added to the seed's table too (after the seed's).
/// `added`: (storage column, the name it is shown under), as [`super::evolve::view_columns`] names
/// them.
pub fn create_view_with_sql(cfg: &ClickHouseConfig, added: &[(String, String)]) -> String {
    let cols: Vec<(String, String)> = COLUMNS
        .iter()
        .map(|(n, _)| n.to_string())
        .filter(|n| n != "_deleted")
        .map(|n| (n.clone(), n))
        .chain(added.iter().cloned())
        .collect();
    format!(
        "CREATE VIEW IF NOT EXISTS {}{} AS {}",
        cfg.qualified_view(),
        on_cluster(cfg),
        super::table::view_select(
            &cols,
            &format!(
                "{} FINAL WHERE _deleted = 0 AND _version >= (SELECT max(version) FROM {})",
                cfg.qualified_table(),
                cfg.qualified_truncates()
            )
        )
    )
}

/// The table's columns and their types, as [`check_table`] compares them with [`COLUMNS`].
pub fn columns_sql(cfg: &ClickHouseConfig) -> String {
    format!(
        "SELECT name, type FROM system.columns WHERE database = {} AND table = {}",
        quote_string(&cfg.database),
        quote_string(&cfg.table)
    )
}

/// The current-rows view's DDL (no row when there is no view yet).
pub fn view_ddl_sql(cfg: &ClickHouseConfig) -> String {
    format!(
        "SELECT create_table_query FROM system.tables WHERE database = {} AND name = {}",
        quote_string(&cfg.database),
        quote_string(&cfg.view_name())
    )
}

/// Drops a view of an earlier release, which lacks the truncate filter.
pub fn drop_view_sql(cfg: &ClickHouseConfig) -> String {
    format!(
        "DROP TABLE IF EXISTS {}{}",
        cfg.qualified_view(),
        on_cluster(cfg)
    )
}

/// One statement [`ensure_schema`] sends, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub when: &'static str,
    pub sql: String,
}

/// Every statement [`ensure_schema`] sends to a server of `version`, in order (`cdc-relay config
/// clickhouse-schema` prints them without connecting anywhere).
pub fn schema_statements(cfg: &ClickHouseConfig, version: ServerVersion) -> Vec<Statement> {
    let always = |sql| Statement {
        when: "always",
        sql,
    };
    let mut out = vec![
        always(create_database_sql(cfg)),
        always(create_table_sql(cfg, version)),
    ];
    out.extend(create_distributed_sql(cfg).map(|sql| Statement {
        when: "always, on a cluster",
        sql,
    }));
    out.extend([
        Statement {
            when: "always: the sink checks that every column has the type it writes",
            sql: columns_sql(cfg),
        },
        always(create_truncates_sql(cfg)),
        Statement {
            when: "always: a view whose DDL lacks the truncates table is of an earlier release",
            sql: view_ddl_sql(cfg),
        },
        Statement {
            when: "only when the view is of an earlier release",
            sql: drop_view_sql(cfg),
        },
        always(create_view_sql(cfg)),
    ]);
    out
}

/// What the sink must know about the table it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableInfo {
    /// `id` is `UInt64` (a table of an earlier release): negative ids cannot be stored.
    pub unsigned_id: bool,
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

/// Creates the table, the truncates table and the view if missing, checks that the table has every
/// column with the type the sink writes, and re-creates a view of an earlier release (without the
/// truncate filter).
pub async fn ensure_schema(
    client: &clickhouse::Client,
    cfg: &ClickHouseConfig,
    version: ServerVersion,
) -> Result<TableInfo, SinkError> {
    let err = |context: &str| {
        let context = context.to_string();
        let url = cfg.url.clone();
        move |source| SinkError::Client {
            url,
            context,
            source,
        }
    };
    let on = cfg.cluster.as_deref();
    let db = cfg.database.as_str();
    cluster::create_missing(client, on, db, None, &create_database_sql(cfg))
        .await
        .map_err(err("creating the database"))?;
    cluster::check_existing(client, &cfg.url, on, db, &cfg.table).await?;
    let storage = cfg.storage_name();
    let sql = create_table_sql(cfg, version);
    cluster::create_missing(client, on, db, Some(&storage), &sql)
        .await
        .map_err(err("creating the table"))?;
    if let Some(sql) = create_distributed_sql(cfg) {
        cluster::create_missing(client, on, db, Some(&cfg.table), &sql)
            .await
            .map_err(err("creating the Distributed table over the cluster"))?;
    }
    let info = check_table(client, cfg).await?;
    let truncates = cfg.truncates_name();
    cluster::create_missing(client, on, db, Some(&truncates), &create_truncates_sql(cfg))
        .await
        .map_err(err("creating the truncates table"))?;
    let view: Vec<String> = client
        .query(&view_ddl_sql(cfg))
        .fetch_all()
        .await
        .map_err(err("reading the current-rows view"))?;
    if view
        .first()
        .is_some_and(|ddl| !ddl.contains(&cfg.truncates_name()))
    {
        // Another sink may do the same at the same moment: both statements are idempotent.
        tracing::info!(view = %cfg.qualified_view(), "re-creating the current-rows view of an earlier release with the truncate filter");
        client
            .query(&drop_view_sql(cfg))
            .execute()
            .await
            .map_err(err("dropping the current-rows view of an earlier release"))?;
    }
    let view = cfg.view_name();
    cluster::create_missing(client, on, db, Some(&view), &create_view_sql(cfg))
        .await
        .map_err(err("creating the current-rows view"))?;
    Ok(info)
}

async fn check_table(
    client: &clickhouse::Client,
    cfg: &ClickHouseConfig,
) -> Result<TableInfo, SinkError> {
    #[derive(clickhouse::Row, serde::Deserialize)]
    struct Col {
        name: String,
        r#type: String,
    }
    let cols: Vec<Col> = client
        .query(&columns_sql(cfg))
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
            // DateTime may carry a time zone on newer servers; tables of earlier releases have an
            // unsigned id (only negative ids are refused there, message by message).
            Some(c)
                if c.r#type != *ty
                    && !(c.r#type.starts_with("Nullable(DateTime(") && *name == "event_time")
                    && !(c.r#type == LEGACY_ID_TYPE && *name == "id") =>
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
    Ok(TableInfo {
        unsigned_id: cols
            .iter()
            .any(|c| c.name == "id" && c.r#type == LEGACY_ID_TYPE),
    })
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
            cluster: None,
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
        let squash = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        let reference = squash(reference);
        for ddl in [create_truncates_sql(&cfg()), create_view_sql(&cfg())] {
            let ddl = squash(&ddl.replace('`', ""));
            assert!(
                reference.contains(&ddl),
                "sql/clickhouse/schema.sql lacks {ddl}"
            );
        }
    }

    #[test]
    fn checks_quote_names_as_strings() {
        let mut c = cfg();
        c.database = "it's".into();
        c.table = "a\\b`c".into();
        assert_eq!(
            columns_sql(&c),
            r"SELECT name, type FROM system.columns WHERE database = 'it\'s' AND table = 'a\\b\`c'"
        );
        let statements = schema_statements(&cfg(), ServerVersion::parse("26.9").unwrap());
        assert_eq!(statements.len(), 7);
        assert_eq!(statements[0].sql, "CREATE DATABASE IF NOT EXISTS `default`");
        assert_eq!(statements[6].sql, create_view_sql(&cfg()));
        assert_eq!(
            ServerVersion::parse("26.9.2.1").unwrap().to_string(),
            "26.9"
        );
    }

    #[test]
    fn engine_follows_the_version() {
        let old = ServerVersion::parse("18.16.1").unwrap();
        let new = ServerVersion::parse("25.8.2.29").unwrap();
        assert!(create_table_sql(&cfg(), old).contains("ReplacingMergeTree(_version)"));
        assert!(create_table_sql(&cfg(), new).contains("ReplacingMergeTree(_version, _deleted)"));
        assert!(ServerVersion::parse("x").is_err());
        assert!(create_view_sql(&cfg()).contains("FINAL WHERE _deleted = 0 AND _version >= (SELECT max(version) FROM `default`.`user_logins_truncates`)"));
    }
}
