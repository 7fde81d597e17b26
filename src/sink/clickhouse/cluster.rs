//! The sink's tables on a ClickHouse cluster (`--clickhouse-cluster NAME`, a cluster of the servers'
//! `remote_servers`): every DDL runs `ON CLUSTER`, and a table the sink writes becomes two.
//!
//! - `<table>_local`, a `ReplicatedReplacingMergeTree` on every node, replicated within its shard
//!   (ZooKeeper path `/clickhouse/tables/{shard}/<db>/<table>_local`, replica `{replica}`: the
//!   servers' macros);
//! - `<table>`, a `Distributed` table over them, sharded by `cityHash64(<key columns>)`
//!   ([`sharding_key`]). The sink inserts into it, and the current-rows view reads it.
//!
//! Why insert through the Distributed table rather than into the local tables: the shard of a key
//! is then ClickHouse's own sharding expression, the one every reader goes through, so every
//! version of a key lands on one shard, where `FINAL` collapses them; and with
//! `insert_distributed_sync = 1` the insert returns only once every shard's part is written to one
//! of its replicas (replication then copies it within the shard), so an acknowledged batch is
//! never only in a local spool directory of the node the sink talked to. That is what lets the sink
//! commit its Kafka offsets after the insert.
//!
//! `<table>_truncates` is replicated across the whole cluster (one ZooKeeper path, no `{shard}`):
//! each node's view reads its own copy of the watermark.

use super::config::{quote_ident, quote_string};
use super::SinkError;

/// Suffix of the replicated table under a Distributed one.
pub const LOCAL_SUFFIX: &str = "_local";

/// `` ON CLUSTER `name` `` for a DDL statement, or nothing on a single server.
pub fn on_cluster(cluster: Option<&str>) -> String {
    match cluster {
        Some(c) => format!(" ON CLUSTER {}", quote_ident(c)),
        None => String::new(),
    }
}

/// The table that holds a written table's rows: itself on one server, `<table>_local` on a cluster.
pub fn storage_name(table: &str, cluster: Option<&str>) -> String {
    match cluster {
        Some(_) => format!("{table}{LOCAL_SUFFIX}"),
        None => table.to_string(),
    }
}

/// `<table>_current`: the current-rows view of a written table.
pub fn view_name(table: &str) -> String {
    format!("{table}_current")
}

/// The engine of a written table's storage; `args` are ReplacingMergeTree's (`_version[, _deleted]`).
pub fn replacing_engine(
    cluster: Option<&str>,
    database: &str,
    storage: &str,
    args: &str,
) -> String {
    match cluster {
        None => format!("ReplacingMergeTree({args})"),
        Some(_) => format!(
            "ReplicatedReplacingMergeTree({}, '{{replica}}', {args})",
            quote_string(&format!(
                "/clickhouse/tables/{{shard}}/{database}/{storage}"
            ))
        ),
    }
}

/// The engine of a truncates table: on a cluster, one copy on every node of every shard.
pub fn truncates_engine(cluster: Option<&str>, database: &str, table: &str) -> String {
    match cluster {
        None => "MergeTree".to_string(),
        Some(_) => format!(
            "ReplicatedMergeTree({}, '{{replica}}')",
            quote_string(&format!("/clickhouse/tables/all/{database}/{table}"))
        ),
    }
}

/// The sharding expression of a new Distributed table: `cityHash64` of the key columns (name,
/// ClickHouse type). ClickHouse 18.16's `cityHash64` refuses UUID and Decimal arguments (Code 43),
/// so those go in as their text, on every version: a table's expression must never change, or the
/// versions of one key would land on two shards (`recreate_distributed_sql` keeps it).
pub fn sharding_key(key: &[(String, String)]) -> String {
    let args: Vec<String> = key
        .iter()
        .map(|(name, ty)| {
            let col = quote_ident(name);
            if ty.contains("UUID") || ty.contains("Decimal") {
                format!("toString({col})")
            } else {
                col
            }
        })
        .collect();
    format!("cityHash64({})", args.join(", "))
}

/// The Distributed table `qualified` over `database`.`storage` on `cluster`, sharded by
/// `sharding` ([`sharding_key`]); `None` on a single server.
pub fn distributed_sql(
    cluster: Option<&str>,
    qualified: &str,
    database: &str,
    storage: &str,
    sharding: &str,
) -> Option<String> {
    let c = cluster?;
    Some(format!(
        "CREATE TABLE IF NOT EXISTS {qualified}{} AS {}.{} ENGINE = Distributed({}, {}, {}, {sharding})",
        on_cluster(cluster),
        quote_ident(database),
        quote_ident(storage),
        quote_ident(c),
        quote_ident(database),
        quote_ident(storage),
    ))
}

/// The Distributed table `qualified` made again over the storage's current columns with the
/// engine it had (`system.tables.engine_full`): the same cluster and the same sharding expression.
pub fn recreate_distributed_sql(
    cluster: Option<&str>,
    qualified: &str,
    database: &str,
    storage: &str,
    engine_full: &str,
) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {qualified}{} AS {}.{} ENGINE = {engine_full}",
        on_cluster(cluster),
        quote_ident(database),
        quote_ident(storage),
    )
}

/// Counts `database` (with `name` `None`) or the table or view `database`.`name` on the server
/// asked: `0` or `1`.
///
/// On a cluster the sink sends a `CREATE … ON CLUSTER` only when the object is missing on the server
/// it talks to: such a statement waits for every server of the cluster, up to
/// `distributed_ddl_task_timeout` (180 s), so one server down would hold up the start of every
/// sink for minutes, though the objects were created long ago.
pub fn exists_sql(database: &str, name: Option<&str>) -> String {
    match name {
        None => format!(
            "SELECT count() FROM system.databases WHERE name = {}",
            quote_string(database)
        ),
        Some(n) => format!(
            "SELECT count() FROM system.tables WHERE database = {} AND name = {}",
            quote_string(database),
            quote_string(n)
        ),
    }
}

/// Runs `create` unless on a cluster the object already exists on the server `client` talks to
/// (see [`exists_sql`]); on one server `CREATE … IF NOT EXISTS` costs nothing.
pub async fn create_missing(
    client: &clickhouse::Client,
    cluster: Option<&str>,
    database: &str,
    name: Option<&str>,
    create: &str,
) -> Result<(), clickhouse::error::Error> {
    if cluster.is_some() {
        let n: u64 = client
            .query_raw(&exists_sql(database, name))
            .fetch_one()
            .await?;
        if n > 0 {
            return Ok(());
        }
    }
    client.query_raw(create).execute().await
}

/// What is wrong with an existing table's engine for the way the sink writes it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error(
        "ClickHouse table {table} is a {engine} table, not the Distributed table that \
         --clickhouse-cluster writes through: it was created without --clickhouse-cluster, or it \
         is the {LOCAL_SUFFIX} storage of another table. The sink leaves it alone: run without \
         --clickhouse-cluster, or point --clickhouse-database elsewhere (and copy its rows over \
         with INSERT … SELECT)"
    )]
    NotDistributed { table: String, engine: String },
    #[error(
        "ClickHouse table {table} is a {engine} table, not the replicated storage that \
         --clickhouse-cluster writes under its Distributed table: it was created without \
         --clickhouse-cluster, or it is another table's Distributed table (two PostgreSQL tables \
         named T and T{LOCAL_SUFFIX}). The sink leaves it alone: rename one of the tables through \
         --route, or point --clickhouse-database elsewhere"
    )]
    NotReplicated { table: String, engine: String },
    #[error(
        "ClickHouse table {table} is a Distributed table: a sink with --clickhouse-cluster created \
         it. Inserting into it without that flag would be acknowledged from a local spool before \
         the shards have the rows. Give every sink the same --clickhouse-cluster \
         (CDC_RELAY_CLICKHOUSE_CLUSTER)"
    )]
    Distributed { table: String },
    #[error(
        "ClickHouse table {table} is a {engine} table, not the current-rows view the sink keeps \
         there (it drops and re-creates that view): most likely a PostgreSQL table of that name \
         is relayed too. The sink leaves it alone: route one of the tables to another name with \
         --route"
    )]
    NotAView { table: String, engine: String },
}

/// Checks the engines of an existing written table, of its storage and of its current-rows view
/// (empty: none) against the layout the sink writes. On a cluster the written table must be
/// Distributed and its storage replicated: anything else would be dropped and re-created by
/// `sync_distributed`, or written unreplicated. On one server it must not be Distributed: an
/// insert into it without `insert_distributed_sync` returns before the shards have the rows. The
/// view must be a view: the sink drops it to make it again.
pub fn check_layout(
    cluster: Option<&str>,
    (table, table_engine): (&str, &str),
    (storage, storage_engine): (&str, &str),
    (view, view_engine): (&str, &str),
) -> Result<(), LayoutError> {
    if !view_engine.is_empty() && view_engine != "View" {
        return Err(LayoutError::NotAView {
            table: view.to_string(),
            engine: view_engine.to_string(),
        });
    }
    let distributed = table_engine == "Distributed";
    match cluster {
        Some(_) if !table_engine.is_empty() && !distributed => Err(LayoutError::NotDistributed {
            table: table.to_string(),
            engine: table_engine.to_string(),
        }),
        Some(_) if !storage_engine.is_empty() && !storage_engine.starts_with("Replicated") => {
            Err(LayoutError::NotReplicated {
                table: storage.to_string(),
                engine: storage_engine.to_string(),
            })
        }
        None if distributed => Err(LayoutError::Distributed {
            table: table.to_string(),
        }),
        _ => Ok(()),
    }
}

/// Reads the engines of `database`.`table`, of its storage and of its current-rows view on the
/// server `url` and checks them ([`check_layout`]); before anything is created or dropped. Only
/// that server is asked: a table of that name on another server of the cluster is not seen.
pub async fn check_existing(
    client: &clickhouse::Client,
    url: &str,
    cluster: Option<&str>,
    database: &str,
    table: &str,
) -> Result<(), SinkError> {
    let storage = storage_name(table, cluster);
    let view = view_name(table);
    let found: Vec<(String, String)> = client
        .query_raw(&format!(
            "SELECT name, engine FROM system.tables WHERE database = {} AND name IN ({}, {}, {})",
            quote_string(database),
            quote_string(table),
            quote_string(&storage),
            quote_string(&view)
        ))
        .fetch_all()
        .await
        .map_err(|source| SinkError::Client {
            url: url.to_string(),
            context: "reading the engines of the table and of its storage".into(),
            source,
        })?;
    let engine = |n: &str| {
        found
            .iter()
            .find(|(name, _)| name == n)
            .map_or("", |(_, e)| e.as_str())
    };
    let qualified = |n: &str| format!("{}.{}", quote_ident(database), quote_ident(n));
    check_layout(
        cluster,
        (&qualified(table), engine(table)),
        (&qualified(&storage), engine(&storage)),
        (&qualified(&view), engine(&view)),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_server_keeps_the_plain_names_and_engines() {
        assert_eq!(on_cluster(None), "");
        assert_eq!(storage_name("t", None), "t");
        assert_eq!(
            replacing_engine(None, "db", "t", "_version"),
            "ReplacingMergeTree(_version)"
        );
        assert_eq!(truncates_engine(None, "db", "t_truncates"), "MergeTree");
        assert_eq!(
            distributed_sql(None, "`db`.`t`", "db", "t", "cityHash64(id)"),
            None
        );
    }

    #[test]
    fn a_cluster_gets_replicated_storage_under_a_sharded_distributed_table() {
        let c = Some("cdc_relay");
        assert_eq!(on_cluster(c), " ON CLUSTER `cdc_relay`");
        assert_eq!(storage_name("t", c), "t_local");
        assert_eq!(
            replacing_engine(c, "db", "t_local", "_version, _deleted"),
            "ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/db/t_local', '{replica}', _version, _deleted)"
        );
        assert_eq!(
            truncates_engine(c, "db", "t_truncates"),
            "ReplicatedMergeTree('/clickhouse/tables/all/db/t_truncates', '{replica}')"
        );
        let key = [("a", "Int64"), ("b", "String")].map(|(n, t)| (n.to_string(), t.to_string()));
        assert_eq!(
            distributed_sql(c, "`db`.`t`", "db", "t_local", &sharding_key(&key)).unwrap(),
            "CREATE TABLE IF NOT EXISTS `db`.`t` ON CLUSTER `cdc_relay` AS `db`.`t_local` ENGINE = Distributed(`cdc_relay`, `db`, `t_local`, cityHash64(`a`, `b`))"
        );
        assert_eq!(
            recreate_distributed_sql(c, "`db`.`t`", "db", "t_local", "Distributed(x, y, z, cityHash64(a))"),
            "CREATE TABLE IF NOT EXISTS `db`.`t` ON CLUSTER `cdc_relay` AS `db`.`t_local` ENGINE = Distributed(x, y, z, cityHash64(a))"
        );
    }

    #[test]
    fn keys_18_16_cannot_hash_are_hashed_as_text() {
        let key = [("u", "UUID"), ("n", "Decimal(10, 2)"), ("i", "Int32")]
            .map(|(n, t)| (n.to_string(), t.to_string()));
        assert_eq!(
            sharding_key(&key),
            "cityHash64(toString(`u`), toString(`n`), `i`)"
        );
    }

    #[test]
    fn a_table_of_the_other_layout_is_refused_not_dropped() {
        let c = Some("cdc_relay");
        let (t, l, v) = ("`db`.`t`", "`db`.`t_local`", "`db`.`t_current`");
        let none = (v, "");
        assert_eq!(check_layout(c, (t, ""), (l, ""), none), Ok(()));
        assert_eq!(check_layout(None, (t, ""), (t, ""), none), Ok(()));
        let replicated = "ReplicatedReplacingMergeTree";
        let view = (v, "View");
        assert_eq!(
            check_layout(c, (t, "Distributed"), (l, replicated), view),
            Ok(())
        );
        assert_eq!(check_layout(c, (t, ""), (l, replicated), none), Ok(()));
        let plain = "ReplacingMergeTree";
        assert_eq!(check_layout(None, (t, plain), (t, plain), view), Ok(()));
        let e = check_layout(c, (t, plain), (l, ""), none).unwrap_err();
        assert!(
            e.to_string()
                .contains("`db`.`t` is a ReplacingMergeTree table, not the Distributed"),
            "{e}"
        );
        let e = check_layout(c, (t, "Distributed"), (l, "Distributed"), none).unwrap_err();
        assert!(
            e.to_string()
                .contains("`db`.`t_local` is a Distributed table, not the replicated storage"),
            "{e}"
        );
        let e = check_layout(None, (t, "Distributed"), (t, "Distributed"), none).unwrap_err();
        assert!(e.to_string().contains("same --clickhouse-cluster"), "{e}");
        let e = check_layout(None, (t, plain), (t, plain), (v, plain)).unwrap_err();
        assert!(
            e.to_string().contains(
                "`db`.`t_current` is a ReplacingMergeTree table, not the current-rows view"
            ),
            "{e}"
        );
    }
}
