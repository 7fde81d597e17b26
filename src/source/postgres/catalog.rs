//! Preflight checks, the publication and the slot: what must hold before streaming can start, each
//! failure worded as what is wrong and how to fix it.

use tokio_postgres::Client;

use crate::event::Lsn;

use super::client::{quote_ident, quote_literal, CreatedSlot, ReplicationClient};
use super::relation::SeedMode;
use super::{parse_lsn, SourceConfig, SourceError, TableSpec, HEARTBEAT_MESSAGE_PREFIX};

/// Checks the server, the table and the role. Run once at start, before anything is created.
pub async fn preflight(cfg: &mut SourceConfig, sql: &Client) -> Result<(), SourceError> {
    let wal_level: String = sql
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(SourceError::sql("reading wal_level"))?
        .get(0);
    if wal_level != "logical" {
        return Err(SourceError::WalLevel { actual: wal_level });
    }

    let role = sql
        .query_one(
            "SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(SourceError::sql("reading the role's attributes"))?;
    if !role.get::<_, bool>(0) {
        return Err(SourceError::Privilege(
            "the PostgreSQL role may not replicate: run `ALTER ROLE <role> WITH REPLICATION` as a superuser (see sql/postgres/roles.sql)".into(),
        ));
    }

    for spec in &mut cfg.tables {
        check_table(spec, sql).await?;
    }
    Ok(())
}

/// Checks one table: it exists, has a primary key, and (when it has the ledger column) a key the
/// ledger can use. Keeps the ledger column only when the table has it.
async fn check_table(spec: &mut TableSpec, sql: &Client) -> Result<(), SourceError> {
    let table = spec.qualified();
    // Each column, and its place in the primary key (NULL outside it).
    let cols = sql
        .query(
            "SELECT a.attname::text, a.atttypid IN (20, 21, 23), \
                    array_position(pk.indkey::int2[], a.attnum) \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
             LEFT JOIN pg_index pk ON pk.indrelid = c.oid AND pk.indisprimary \
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&spec.schema, &spec.table],
        )
        .await
        .map_err(SourceError::sql(format!("reading the columns of {table}")))?;
    let schema_err = |reason: String| SourceError::Schema {
        table: table.clone(),
        reason,
    };
    if cols.is_empty() {
        return Err(schema_err(
            "does not exist (or this role cannot see it): create it with sql/postgres/schema.sql or pass --table".into(),
        ));
    }
    let key: Vec<(String, bool)> = cols
        .iter()
        .filter(|r| r.get::<_, Option<i32>>(2).is_some())
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    if key.is_empty() {
        return Err(schema_err(
            "has no primary key; every message, the ClickHouse table's ORDER BY and the ledger are keyed by it. Add one: ALTER TABLE … ADD PRIMARY KEY (…)".into(),
        ));
    }
    if let Some(index) = replica_identity_index(sql, &spec.schema, &spec.table).await? {
        return Err(schema_err(replica_identity_refusal(&table, &index)));
    }
    let int_key = match key.as_slice() {
        [(name, true)] => Some(name.clone()),
        _ => None,
    };
    let ledger = spec
        .ledger_column
        .clone()
        .filter(|l| cols.iter().any(|r| r.get::<_, String>(0) == *l));
    if let (Some(l), None) = (&ledger, &int_key) {
        return Err(schema_err(format!(
            "has the ledger column {l} but its primary key is not one smallint, integer or bigint column, which the ledger and the backfill key rows by. Drop the column (the table then streams without a ledger) or name another with --ledger-column"
        )));
    }
    if ledger.is_none() {
        tracing::info!(table = %table, ledger_column = ?spec.ledger_column, "the table has no ledger column: it streams without a ledger and without a backfill");
    }
    spec.ledger_column = ledger;
    spec.key_column = int_key;
    spec.oid = table_oid(sql, &spec.schema, &spec.table)
        .await?
        .unwrap_or_default();
    if spec.seed == SeedMode::IfShaped {
        // The seed's table keeps the form it starts in (relation.rs, `SeedMode`).
        let (shape, _) = super::backfill::describe_table(sql, spec).await?;
        spec.seed = if shape.is_seed_shape() {
            SeedMode::Required
        } else {
            tracing::info!(table = %table, "the seed's table has not the seed's shape: its changes go in the columns form");
            SeedMode::Never
        };
    }
    Ok(())
}

/// The OID of the table of that name now; `None` when there is none.
async fn table_oid(sql: &Client, schema: &str, table: &str) -> Result<Option<u32>, SourceError> {
    let row = sql
        .query_opt(
            "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&schema, &table],
        )
        .await
        .map_err(SourceError::sql(format!(
            "reading the OID of {schema}.{table}"
        )))?;
    Ok(row.map(|r| r.get(0)))
}

/// Why a relayed table is not the one the stream started with any more, with what to run; `None`
/// while it is. The publication follows a table by OID: a table dropped and created again, or
/// swapped in by rename (`RENAME t TO t_old, t_new TO t`, as online schema-change tools do), is not
/// in it, and none of its changes reach the slot.
pub async fn table_replaced(
    sql: &Client,
    spec: &TableSpec,
    publication: &str,
) -> Result<Option<String>, SourceError> {
    let (schema, table) = (&spec.schema, &spec.table);
    let now = table_oid(sql, schema, table).await?;
    let published = sql
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication_tables \
                            WHERE pubname = $1 AND schemaname = $2 AND tablename = $3)",
            &[&publication, schema, table],
        )
        .await
        .map_err(SourceError::sql(format!(
            "reading whether publication {publication} has {schema}.{table}"
        )))?
        .get::<_, bool>(0);
    let add = format!(
        "`ALTER PUBLICATION {} ADD TABLE {}` (as the table's owner)",
        quote_ident(publication),
        spec.qualified()
    );
    Ok(match now {
        None => Some(format!(
            "was dropped (OID {}): take it out of --table, or create it again, run {add} and start the stream again",
            spec.oid
        )),
        Some(oid) if oid != spec.oid => Some(format!(
            "was dropped and created again, or another table was renamed to its name (OID {} is now {oid}); its changes are not in the slot until the publication has it: run {add} and start the stream again, which hides the old table's rows in ClickHouse and reads the new one whole",
            spec.oid
        )),
        Some(_) if !published => Some(format!(
            "is not in publication {publication} any more, so its changes do not reach the slot: run {add} and start the stream again (changes made meanwhile: `cdc-relay verify --repair`)"
        )),
        Some(_) => None,
    })
}

/// The index of a `REPLICA IDENTITY USING INDEX` that is not the primary key, if the table has one.
/// Its old-key tuples carry that index's columns, not the key's: a delete could not say which row
/// went, and a key update would not say the old key. `USING INDEX` of the primary key's own index
/// is the default identity under another name.
pub async fn replica_identity_index(
    sql: &Client,
    schema: &str,
    table: &str,
) -> Result<Option<String>, SourceError> {
    let row = sql
        .query_opt(
            "SELECT i.indexrelid::regclass::text              FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace              JOIN pg_index i ON i.indrelid = c.oid AND i.indisreplident AND NOT i.indisprimary              WHERE n.nspname = $1 AND c.relname = $2 AND c.relreplident = 'i'",
            &[&schema, &table],
        )
        .await
        .map_err(SourceError::sql(format!(
            "reading the replica identity of {schema}.{table}"
        )))?;
    Ok(row.map(|r| r.get(0)))
}

/// What to say of a table whose replica identity is an index other than its primary key.
pub fn replica_identity_refusal(table: &str, index: &str) -> String {
    format!(
        "its REPLICA IDENTITY is the index {index}, not the primary key: deletes and key updates would not carry the key ClickHouse rows are keyed by. Run `ALTER TABLE {table} REPLICA IDENTITY DEFAULT` (or FULL, which also carries unchanged TOASTed values), then start the relay again"
    )
}

/// Checks what the publication does to the table: a partitioned table must be published through
/// its root (else changes arrive under each partition's name), and a row filter or column list
/// would hide rows or columns from the stream while the backfill still reads them, so both are
/// refused with the statement that fixes them.
pub async fn check_publication(cfg: &SourceConfig, sql: &Client) -> Result<(), SourceError> {
    for spec in &cfg.tables {
        check_published_table(cfg, spec, sql).await?;
    }
    Ok(())
}

async fn check_published_table(
    cfg: &SourceConfig,
    spec: &TableSpec,
    sql: &Client,
) -> Result<(), SourceError> {
    let version = server_version(sql).await?;
    // Row filters and column lists exist from PostgreSQL 15 on.
    let filters = if version >= 150000 {
        "r.prqual IS NOT NULL, r.prattrs IS NOT NULL"
    } else {
        "false, false"
    };
    let row = sql
        .query_opt(
            &format!(
                "SELECT c.relkind = 'p', p.pubviaroot, {filters} \
                 FROM pg_publication p JOIN pg_class c ON c.oid = to_regclass($2) \
                 LEFT JOIN pg_publication_rel r ON r.prpubid = p.oid AND r.prrelid = c.oid \
                 WHERE p.pubname = $1"
            ),
            &[&cfg.publication, &spec.qualified()],
        )
        .await
        .map_err(SourceError::sql("reading the publication's settings"))?;
    let Some(row) = row else { return Ok(()) };
    let (partitioned, via_root, row_filter, column_list): (bool, bool, bool, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let name = quote_ident(&cfg.publication);
    let table = spec.qualified();
    if partitioned && !via_root {
        return Err(SourceError::Config(format!(
            "{table} is partitioned and publication {name} publishes each partition under its own name; \
             have the owner run: ALTER PUBLICATION {name} SET (publish_via_partition_root = true)"
        )));
    }
    if row_filter || column_list {
        let what = if row_filter {
            "a row filter (WHERE)"
        } else {
            "a column list"
        };
        return Err(SourceError::Config(format!(
            "publication {name} publishes {table} with {what}: the stream would miss changes the \
             backfill still reads. Publish the whole table: ALTER PUBLICATION {name} SET TABLE {table}"
        )));
    }
    Ok(())
}

/// Creates the publication if it is missing. An existing one is checked: it must contain the table,
/// and publish exactly the operations of `--ops`; one that publishes others is refused (exit code
/// 2) with the statement that changes it. Only `setup` ([`setup_publication`]) alters an existing
/// publication: a stream started with a stray `--ops` must not widen or narrow what it publishes.
/// The operations a publication publishes, as an array of names.
const PUBLICATION_OPS: &str = "ARRAY_REMOVE(ARRAY[CASE WHEN pubinsert THEN 'insert' END, \
     CASE WHEN pubupdate THEN 'update' END, CASE WHEN pubdelete THEN 'delete' END, \
     CASE WHEN pubtruncate THEN 'truncate' END], NULL)";

pub async fn ensure_publication(cfg: &SourceConfig, sql: &Client) -> Result<(), SourceError> {
    publication(cfg, sql, false).await
}

/// For `setup`: like [`ensure_publication`], but an existing publication that publishes other
/// operations than `--ops` is altered to publish them (which needs table ownership; a
/// least-privilege role gets an error naming the statement for the owner to run).
pub async fn setup_publication(cfg: &SourceConfig, sql: &Client) -> Result<(), SourceError> {
    publication(cfg, sql, true).await
}

async fn publication(cfg: &SourceConfig, sql: &Client, alter: bool) -> Result<(), SourceError> {
    let publish = quote_literal(&cfg.ops.as_publish_option());
    let name = quote_ident(&cfg.publication);
    let tables: Vec<String> = cfg.tables.iter().map(TableSpec::qualified).collect();
    // The operations, and the tables it lacks.
    let existing = sql
        .query_opt(
            &format!(
                "SELECT {PUBLICATION_OPS}, ARRAY(SELECT t FROM unnest($2::text[]) AS t WHERE NOT puballtables \
                        AND NOT EXISTS (SELECT 1 FROM pg_publication_rel r WHERE r.prpubid = p.oid \
                                        AND r.prrelid = to_regclass(t))) \
                 FROM pg_publication p WHERE pubname = $1"
            ),
            &[&cfg.publication, &tables],
        )
        .await
        .map_err(SourceError::sql("looking up the publication"))?;
    let tables = tables.join(", ");
    let stmt = match existing {
        // A partitioned table is published through its root, so its changes carry its own name
        // (check_publication refuses it otherwise); the option is harmless for a plain table.
        None => format!(
            "CREATE PUBLICATION {name} FOR TABLE {tables} WITH (publish = {publish}, publish_via_partition_root = true)"
        ),
        Some(row) => {
            let ops: Vec<String> = row.get(0);
            let missing: Vec<String> = row.get(1);
            if !missing.is_empty() {
                // A table added to --table: the stream adds it when it may (the owner's right),
                // then backfills its unsent rows; changes before the ALTER are not published.
                let stmt = format!(
                    "ALTER PUBLICATION {name} ADD TABLE {}",
                    missing.join(", ")
                );
                run_publication_statement(&stmt, &tables, sql).await?;
                tracing::info!(publication = %cfg.publication, tables = %missing.join(", "), "tables added to the publication");
            }
            let mut want: Vec<&str> = cfg.ops.0.clone();
            want.sort_unstable();
            want.dedup();
            let mut have: Vec<&str> = ops.iter().map(String::as_str).collect();
            have.sort_unstable();
            if want == have {
                return Ok(());
            }
            let stmt = format!("ALTER PUBLICATION {name} SET (publish = {publish})");
            if !alter {
                let have = if ops.is_empty() {
                    "nothing".to_string()
                } else {
                    ops.join(", ")
                };
                let otherwise = if ops.is_empty() {
                    String::new()
                } else {
                    format!("; or start the stream with --ops {}", ops.join(","))
                };
                return Err(SourceError::Config(format!(
                    "publication {name} publishes {have}, but --ops asks for {}. The stream does not change an existing publication: \
                     to publish {} run `{stmt}` as the table's owner, or `cdc-relay setup --ops {}`{otherwise}",
                    cfg.ops.as_publish_option(),
                    cfg.ops.as_publish_option(),
                    cfg.ops.0.join(","),
                )));
            }
            stmt
        }
    };
    run_publication_statement(&stmt, &tables, sql).await?;
    tracing::info!(publication = %cfg.publication, publish = %cfg.ops.as_publish_option(), "publication set up");
    Ok(())
}

/// Creates or alters the publication; a role that may not gets the statement for the owner.
async fn run_publication_statement(
    stmt: &str,
    tables: &str,
    sql: &Client,
) -> Result<(), SourceError> {
    sql.batch_execute(stmt).await.map_err(|e| {
        if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
            SourceError::Privilege(format!(
                "cannot create or alter the publication: that needs ownership of {tables}. Have the owner run: {stmt}"
            ))
        } else {
            SourceError::Sql {
                context: format!("running `{stmt}`"),
                source: e,
            }
        }
    })
}

/// `server_version_num`, e.g. 170002.
pub async fn server_version(sql: &Client) -> Result<i32, SourceError> {
    Ok(sql
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(SourceError::sql("reading the server version"))?
        .get(0))
}

/// The slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone)]
pub struct SlotInfo {
    pub plugin: Option<String>,
    pub active: bool,
    pub confirmed_flush: Option<Lsn>,
    pub wal_status: Option<String>,
    /// Whether a standby may keep a copy of it (PostgreSQL 17+; `None` before).
    pub failover: Option<bool>,
}

pub async fn slot_info(cfg: &SourceConfig, sql: &Client) -> Result<Option<SlotInfo>, SourceError> {
    let failover = if server_version(sql).await? >= 170000 {
        "failover"
    } else {
        "NULL::bool"
    };
    let row = sql
        .query_opt(
            &format!(
                "SELECT plugin::text, active, confirmed_flush_lsn::text, wal_status, {failover} \
                 FROM pg_replication_slots WHERE slot_name = $1"
            ),
            &[&cfg.slot],
        )
        .await
        .map_err(SourceError::sql("looking up the replication slot"))?;
    let Some(row) = row else { return Ok(None) };
    let confirmed: Option<String> = row.get(2);
    Ok(Some(SlotInfo {
        plugin: row.get(0),
        active: row.get(1),
        confirmed_flush: confirmed.as_deref().map(parse_lsn).transpose()?,
        wal_status: row.get(3),
        failover: row.get(4),
    }))
}

/// Creates the slot (no snapshot), as a failover slot on PostgreSQL 17+ so that a standby with
/// `sync_replication_slots = on` keeps a copy the stream can go on from once it is promoted.
/// Returns the connection that created it, to stream on.
pub async fn create_slot(
    cfg: &SourceConfig,
) -> Result<(ReplicationClient, CreatedSlot), SourceError> {
    let mut client = ReplicationClient::connect(&cfg.replication_params()?).await?;
    let failover = client.supports_failover_slots();
    let created = client
        .create_logical_slot(&cfg.slot, false, failover)
        .await?;
    tracing::info!(slot = %cfg.slot, consistent_point = %created.consistent_point, failover,
        "created replication slot{}",
        if failover { " as a failover slot (PostgreSQL 17+: a standby with sync_replication_slots keeps a copy)" } else { " (failover slots need PostgreSQL 17+)" });
    Ok((client, created))
}

/// On PostgreSQL 17+, makes an existing slot created without `failover` (by an older relay, or
/// by hand) a failover slot. Best effort: a slot that stays without failover streams as before,
/// it only does not survive a promotion, so a refusal (the slot still held by a walsender that
/// is going away) is logged and the next start tries again.
pub async fn ensure_failover(cfg: &SourceConfig, slot: &SlotInfo) {
    match slot.failover {
        None => {
            tracing::info!(slot = %cfg.slot, "failover slots need PostgreSQL 17+; the slot will not survive a switch to a standby")
        }
        Some(true) => tracing::info!(slot = %cfg.slot, "the slot is a failover slot"),
        Some(false) => {
            let altered = async {
                let mut client = ReplicationClient::connect(&cfg.replication_params()?).await?;
                client.enable_failover(&cfg.slot).await?;
                Ok::<(), SourceError>(())
            };
            match altered.await {
                Ok(()) => {
                    tracing::info!(slot = %cfg.slot, "the slot was created without failover; enabled it (ALTER_REPLICATION_SLOT … (FAILOVER true))")
                }
                Err(e) => {
                    tracing::warn!(slot = %cfg.slot, error = %e, "the slot has no failover and enabling it failed; it streams as before but will not survive a switch to a standby (the next start tries again)")
                }
            }
        }
    }
}

/// Checks that an existing slot can serve this stream.
pub fn check_slot(cfg: &SourceConfig, slot: &SlotInfo) -> Result<(), SourceError> {
    if slot.plugin.as_deref() != Some("pgoutput") {
        return Err(SourceError::Config(format!(
            "replication slot {:?} exists but uses plugin {:?}, not pgoutput: choose another --slot or drop it",
            cfg.slot, slot.plugin
        )));
    }
    if slot.wal_status.as_deref() == Some("lost") {
        return Err(SourceError::SlotLost {
            slot: cfg.slot.clone(),
            reason: "wal_status = lost: the WAL it needed was removed (max_slot_wal_keep_size)"
                .into(),
        });
    }
    Ok(())
}

/// WAL the slot keeps (bytes from its restart position to the current end) and its WAL status.
pub async fn slot_retention(
    cfg: &SourceConfig,
    sql: &Client,
) -> Result<Option<(i64, Option<String>)>, SourceError> {
    let row = sql
        .query_opt(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8, wal_status \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&cfg.slot],
        )
        .await
        .map_err(SourceError::sql("reading the slot's WAL retention"))?;
    Ok(row.map(|r| (r.get::<_, Option<i64>>(0).unwrap_or(0), r.get(1))))
}

/// Drops the slot and its ledger origin (`teardown`, or to replace a lost slot).
pub async fn drop_slot(cfg: &SourceConfig, sql: &Client) -> Result<(), SourceError> {
    sql.execute("SELECT pg_drop_replication_slot($1)", &[&cfg.slot])
        .await
        .map_err(SourceError::sql("dropping the replication slot"))?;
    super::origin::drop_origin(cfg, sql).await;
    Ok(())
}

/// Writes a non-transactional logical decoding message and returns its position. The stream sees it
/// even when the table is quiet, which lets the slot's confirmed position move on.
pub async fn emit_heartbeat(sql: &Client) -> Result<Lsn, SourceError> {
    let row = sql
        .query_one(
            "SELECT pg_logical_emit_message(false, $1, '')::text",
            &[&HEARTBEAT_MESSAGE_PREFIX],
        )
        .await
        .map_err(SourceError::sql("writing a heartbeat message"))?;
    parse_lsn(row.get::<_, &str>(0))
}

/// What `cdc-relay status` shows of the PostgreSQL side.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SourceStatus {
    pub slot: Option<SlotStatus>,
    /// Operations the publication publishes; `None` when it does not exist.
    pub publication_ops: Option<Vec<String>>,
    /// Rows with `sent_to_kafka` not TRUE (the seed's first monitoring query).
    pub unsent_rows: i64,
    /// Rows with `sent_to_kafka = TRUE` (the seed's second).
    pub sent_rows: i64,
    /// Other sessions holding or waiting for locks on the table: what a waiting ledger waits on.
    pub table_locks: Vec<TableLock>,
}

/// A lock another session holds (or waits for) on the table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TableLock {
    pub pid: i32,
    pub user: Option<String>,
    pub mode: String,
    pub granted: bool,
    /// Seconds since its transaction began (hidden from roles without pg_read_all_stats).
    pub transaction_seconds: Option<f64>,
    pub query: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SlotStatus {
    pub active: bool,
    pub confirmed_lsn: Option<String>,
    /// WAL the slot keeps from being removed.
    pub retained_wal_bytes: Option<i64>,
    pub wal_status: Option<String>,
}

pub async fn status(cfg: &SourceConfig, sql: &Client) -> Result<SourceStatus, SourceError> {
    // The first table: `status` reports on one.
    let spec = cfg.first_table();
    let slot = sql
        .query_opt(
            "SELECT active, confirmed_flush_lsn::text, \
                    pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8, wal_status \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&cfg.slot],
        )
        .await
        .map_err(SourceError::sql("reading the slot"))?
        .map(|r| SlotStatus {
            active: r.get(0),
            confirmed_lsn: r.get(1),
            retained_wal_bytes: r.get(2),
            wal_status: r.get(3),
        });
    let publication_ops = sql
        .query_opt(
            &format!("SELECT {PUBLICATION_OPS} FROM pg_publication WHERE pubname = $1"),
            &[&cfg.publication],
        )
        .await
        .map_err(SourceError::sql("reading the publication"))?
        .map(|r| r.get::<_, Vec<String>>(0));
    // A table without the ledger column has no unsent rows to count (0 and 0).
    let has_ledger = sql
        .query_opt(
            "SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass($1) AND attname = $2 AND NOT attisdropped",
            &[&spec.qualified(), &spec.ledger_column.clone().unwrap_or_default()],
        )
        .await
        .map_err(SourceError::sql("looking for the ledger column"))?
        .is_some();
    let ledger = match (has_ledger, spec.ledger()) {
        (true, Some(l)) => l,
        _ => "NULL::boolean".into(),
    };
    let counts = sql
        .query_one(
            &format!(
                "SELECT count(*) FILTER (WHERE {ledger} IS NOT TRUE AND {has_ledger}), count(*) FILTER (WHERE {ledger}) FROM {}",
                spec.qualified()
            ),
            &[],
        )
        .await
        .map_err(SourceError::sql("counting sent and unsent rows"))?;
    let table_locks = sql
        .query(
            "SELECT l.pid, a.usename::text, l.mode, l.granted, \
                    EXTRACT(epoch FROM now() - a.xact_start)::float8, left(a.query, 200) \
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'relation' AND l.relation = to_regclass($1) \
               AND l.pid <> pg_backend_pid() AND a.application_name NOT LIKE 'cdc-relay%' \
             ORDER BY a.xact_start NULLS LAST",
            &[&spec.qualified()],
        )
        .await
        .map_err(SourceError::sql("reading locks on the table"))?
        .iter()
        .map(|r| TableLock {
            pid: r.get(0),
            user: r.get(1),
            mode: r.get(2),
            granted: r.get(3),
            transaction_seconds: r.get(4),
            query: r.get(5),
        })
        .collect();
    Ok(SourceStatus {
        slot,
        publication_ops,
        unsent_rows: counts.get(0),
        sent_rows: counts.get(1),
        table_locks,
    })
}
