//! Any table's ClickHouse side at run time: creating it, applying each new schema to it
//! ([`super::evolve`]), inserting its rows, recording its truncates and reading stored rows back for
//! unchanged TOAST columns. Schemas are named by an opaque id (the caller's; the same schema has
//! the same id); each is applied once per process, before its first row is written.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::value::RawValue;

use crate::types::RelationSchema;

use super::config::{quote_ident, quote_string};
use super::evolve::{plan, Refusal, Stored};
use super::schema::ServerVersion;
use super::table::{
    columns_sql, create_table_sql, create_truncates_sql, create_view_sql, drop_view_sql,
    insert_body, is_meta, key_text, GenericRow, TableNames, TableState,
};
use super::{ClickHouseConfig, SinkError};

/// What became of a schema: how its rows are written (a table's [`TableState`], or the seed
/// table's added columns), or why they are not.
#[derive(Debug, Clone)]
pub enum Applied<S = TableState> {
    Ready(Arc<S>),
    /// Its rows go to the dead-letter topic with this reason.
    Refused(Arc<Refusal>),
}

/// The generic tables of one sink.
pub struct GenericTables {
    writer: GenericWriter,
    /// `--clickhouse-table`: the seed's, which no table in the columns form may write into.
    seed_table: String,
    version: ServerVersion,
    applied: HashMap<String, Applied>,
    /// Truncate watermark per table whose objects exist.
    watermarks: HashMap<String, u64>,
}

/// Counts of what [`GenericTables::apply`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyOutcome {
    pub changes: usize,
    pub refused: bool,
}

impl GenericTables {
    pub fn new(cfg: &ClickHouseConfig, version: ServerVersion) -> Self {
        GenericTables {
            writer: GenericWriter::new(cfg),
            seed_table: cfg.table.clone(),
            version,
            applied: HashMap::new(),
            watermarks: HashMap::new(),
        }
    }

    pub fn writer(&self) -> &GenericWriter {
        &self.writer
    }

    /// The schema's state once [`Self::apply`] ran for it.
    pub fn applied(&self, id: &str) -> Option<&Applied> {
        self.applied.get(id)
    }

    pub fn watermark(&self, table: &str) -> u64 {
        self.watermarks.get(table).copied().unwrap_or(0)
    }

    pub fn raise_watermark(&mut self, table: &str, version: u64) {
        let w = self.watermarks.entry(table.to_string()).or_insert(0);
        *w = (*w).max(version);
    }

    /// Creates the table if missing and brings it to `rel` (the caller has stored every row
    /// written before: a change may rename a column earlier rows are written under). `history`:
    /// the table's schemas known to the caller, oldest first. A refusal is an outcome, not an
    /// error; errors are ClickHouse's, to retry.
    pub async fn apply(
        &mut self,
        id: &str,
        rel: &RelationSchema,
        history: &[Arc<RelationSchema>],
    ) -> Result<ApplyOutcome, SinkError> {
        let w = &self.writer;
        let table = clickhouse_table_name(rel);
        let names = w.names(&table).with_source(&rel.qualified_name());
        if table == self.seed_table {
            // The seed's table in the columns form (it lost the seed's shape while the stream was
            // down), or another table of that name: never into the seed's table.
            let refusal = Refusal {
                table: names.qualified(),
                column: "(every column)".into(),
                old: "the seed's table (--clickhouse-table)".into(),
                new: format!("{}.{} in the columns form", rel.schema, rel.table),
                why: "its rows would be written into the seed's table. Give the seed's table another --clickhouse-table, or restore the seed's shape of the PostgreSQL table".into(),
            };
            return Ok(self.refuse(id, refusal));
        }
        super::cluster::check_existing(
            &w.client,
            &w.url,
            names.cluster(),
            &names.database,
            &names.table,
        )
        .await?;
        // Planned against the storage: on a cluster the Distributed table may lag behind it after
        // an interrupted change (see `sync_distributed`).
        let storage = names.storage_names();
        let mut existing = w.stored_columns(&storage).await?;
        let created = existing.is_empty();
        if created {
            if let Err(refusal) = plan(&names, &[], rel, history, self.version) {
                return Ok(self.refuse(id, refusal));
            }
            // After a key change (the table dropped to take it), from the newest schema: rows of the
            // old key are then the ones refused.
            let newest = history.last().map_or(rel, |h| &**h);
            let from = if super::evolve::same_key(newest, rel) {
                rel
            } else {
                newest
            };
            w.create_missing(
                &names,
                &names.storage_name(),
                &create_table_sql(&names, from, self.version),
                "creating a table",
            )
            .await?;
            existing = w.stored_columns(&storage).await?;
        }
        let p = match plan(&names, &existing, rel, history, self.version) {
            Ok(p) => p,
            Err(refusal) => return Ok(self.refuse(id, refusal)),
        };
        for change in &p.changes {
            tracing::info!(table = %names.qualified(), change = ?change, "applying a schema change");
            w.execute(&change.sql(&names), "changing a table's columns")
                .await?;
        }
        let key: Vec<String> = p
            .state
            .key
            .iter()
            .filter_map(|k| p.state.columns.get(k))
            .map(|c| c.ch_name.to_string())
            .collect();
        w.sync_distributed(&names, &key).await?;
        if !self.watermarks.contains_key(&table) {
            let truncates = format!("{}_truncates", names.table);
            w.create_missing(
                &names,
                &truncates,
                &create_truncates_sql(&names),
                "creating a truncates table",
            )
            .await?;
            let mark = w.truncate_watermark(&names).await?;
            self.watermarks.insert(table.clone(), mark);
        }
        // The view lists its columns when created: after a change (or one whose view step was cut
        // short by a kill or a server down, so that this run plans no change) it is made again
        // until it shows exactly the planned columns under their names.
        let shown: Vec<String> = w
            .columns(&names.view_names())
            .await?
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| !is_meta(n))
            .collect();
        let labels: Vec<&String> = p.view.iter().map(|(_, l)| l).collect();
        if !p.changes.is_empty() || created || shown.iter().collect::<Vec<_>>() != labels {
            w.execute(&drop_view_sql(&names), "dropping the current-rows view")
                .await?;
            w.execute(
                &create_view_sql(&names, &p.view),
                "creating the current-rows view",
            )
            .await?;
        }
        if !p.changes.is_empty() {
            // The table changed (a renamed column above all): what the table's other schemas
            // were applied as may no longer hold; each is planned again before its next row.
            self.applied.retain(|_, a| match a {
                Applied::Ready(s) => s.names.table != names.table,
                Applied::Refused(_) => true,
            });
        }
        self.applied
            .insert(id.to_string(), Applied::Ready(p.state.clone()));
        Ok(ApplyOutcome {
            changes: p.changes.len(),
            refused: false,
        })
    }

    fn refuse(&mut self, id: &str, refusal: Refusal) -> ApplyOutcome {
        tracing::error!(error = %refusal, "schema change refused");
        self.applied
            .insert(id.to_string(), Applied::Refused(Arc::new(refusal)));
        ApplyOutcome {
            changes: 0,
            refused: true,
        }
    }
}

/// The statements of generic tables; cheap to clone into the insert task.
#[derive(Clone)]
pub struct GenericWriter {
    client: clickhouse::Client,
    url: String,
    database: String,
    cluster: Option<String>,
}

impl GenericWriter {
    pub fn new(cfg: &ClickHouseConfig) -> Self {
        GenericWriter {
            client: cfg.client(),
            url: cfg.url.clone(),
            database: cfg.database.clone(),
            cluster: cfg.cluster.clone(),
        }
    }

    /// `create`, unless on a cluster the object `name` of `names`' database exists already on the
    /// server asked (cluster.rs, `create_missing`).
    async fn create_missing(
        &self,
        names: &TableNames,
        name: &str,
        create: &str,
        context: &str,
    ) -> Result<(), SinkError> {
        super::cluster::create_missing(
            &self.client,
            names.cluster(),
            &names.database,
            Some(name),
            create,
        )
        .await
        .map_err(self.err(context))
    }

    /// On a cluster: the Distributed table created if missing, and dropped and created again when
    /// its columns are not the storage's: after every column change, and after one whose `ALTER`
    /// ran while this did not (a kill -9, a server down). ClickHouse 18.16 refuses `ALTER … ON
    /// CLUSTER` of a Distributed table whose shards replicate internally (Code 371), and a
    /// Distributed table holds no rows, so re-creating it loses nothing; a query that reaches it in
    /// between fails with "doesn't exist" (Code 60, transient) and is retried. Nothing on one server.
    pub async fn sync_distributed(
        &self,
        names: &TableNames,
        key: &[String],
    ) -> Result<(), SinkError> {
        let Some(cluster) = names.cluster() else {
            return Ok(());
        };
        let (qualified, storage) = (names.qualified(), names.storage_name());
        let distributed = self.columns(names).await?;
        let stored = self.columns(&names.storage_names()).await?;
        if distributed.is_empty() {
            let typed: Vec<(String, String)> = key
                .iter()
                .map(|k| {
                    let ty = stored.iter().find(|(n, _)| n == k).map(|(_, t)| t.clone());
                    (k.clone(), ty.unwrap_or_default())
                })
                .collect();
            let sharding = super::cluster::sharding_key(&typed);
            let create = super::cluster::distributed_sql(
                Some(cluster),
                &qualified,
                &names.database,
                &storage,
                &sharding,
            )
            .unwrap_or_default();
            return self
                .execute(&create, "creating the Distributed table over the cluster")
                .await;
        }
        if distributed != stored {
            // Never drop what is not a Distributed table (it would be rows).
            super::cluster::check_existing(
                &self.client,
                &self.url,
                names.cluster(),
                &names.database,
                &names.table,
            )
            .await?;
            // Made again with the engine it had: the same sharding expression, whatever this
            // release would choose for a new table.
            let engine_full = self.engine_full(names).await?;
            tracing::info!(table = %qualified, "the Distributed table's columns are not its storage's; re-creating it");
            self.execute(
                &format!(
                    "DROP TABLE IF EXISTS {qualified}{}",
                    super::cluster::on_cluster(names.cluster())
                ),
                "dropping a stale Distributed table",
            )
            .await?;
            self.execute(
                &super::cluster::recreate_distributed_sql(
                    Some(cluster),
                    &qualified,
                    &names.database,
                    &storage,
                    &engine_full,
                ),
                "creating the Distributed table over the cluster",
            )
            .await?;
        }
        Ok(())
    }

    /// The full engine clause of `names`' table (`Distributed(…, <sharding expression>)`).
    async fn engine_full(&self, names: &TableNames) -> Result<String, SinkError> {
        let sql = format!(
            "SELECT engine_full FROM system.tables WHERE database = {} AND name = {} FORMAT TSV",
            quote_string(&names.database),
            quote_string(&names.table)
        );
        let text = self
            .text(&sql, "reading the Distributed table's engine")
            .await?;
        let engine = unescape_tsv(text.trim_end_matches('\n'));
        if engine.starts_with("Distributed(") {
            Ok(engine)
        } else {
            Err(SinkError::Output(format!(
                "the engine of {} is {engine:?}, not a Distributed one",
                names.qualified()
            )))
        }
    }

    /// The objects of `table` in the sink's database (and cluster).
    pub fn names(&self, table: &str) -> TableNames {
        TableNames::new(&self.database, table).with_cluster(self.cluster.clone())
    }

    fn err(
        &self,
        context: impl Into<String>,
    ) -> impl FnOnce(clickhouse::error::Error) -> SinkError {
        let (url, context) = (self.url.clone(), context.into());
        move |source| SinkError::Client {
            url,
            context,
            source,
        }
    }

    pub(super) async fn execute(&self, sql: &str, context: &str) -> Result<(), SinkError> {
        // Raw: names and values in the SQL may hold `?`, which bound queries would take as a
        // placeholder.
        self.client
            .query_raw(sql)
            .execute()
            .await
            .map_err(self.err(context))
    }

    async fn text(&self, sql: &str, context: &str) -> Result<String, SinkError> {
        let mut cursor = self
            .client
            .query_raw(sql)
            .with_setting("output_format_json_quote_64bit_integers", "0")
            .with_setting("output_format_json_quote_denormals", "1")
            .fetch_bytes("TSV")
            .map_err(self.err(context))?;
        let mut out = Vec::new();
        while let Some(chunk) = cursor.next().await.map_err(self.err(context))? {
            out.extend_from_slice(&chunk);
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// The table's columns (name, type); empty when there is no such table.
    pub async fn columns(&self, names: &TableNames) -> Result<Vec<(String, String)>, SinkError> {
        Ok(self
            .stored_columns(names)
            .await?
            .into_iter()
            .map(|s| (s.name, s.ty))
            .collect())
    }

    /// The table's columns with their defaults and the attnums their comments record.
    pub async fn stored_columns(&self, names: &TableNames) -> Result<Vec<Stored>, SinkError> {
        let tsv = self
            .text(&columns_sql(names), "reading a table's columns")
            .await?;
        Ok(tsv
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                let mut f = l.split('\t').map(unescape_tsv);
                let mut next = || f.next().unwrap_or_default();
                let (name, ty, default, comment) = (next(), next(), next(), next());
                Stored::from_catalog(name, ty, default, &comment, next() == "1")
            })
            .collect())
    }

    pub async fn truncate_watermark(&self, names: &TableNames) -> Result<u64, SinkError> {
        let sql = format!("SELECT max(version) FROM {} FORMAT TSV", names.truncates());
        let text = self.text(&sql, "reading the truncate watermark").await?;
        Ok(text.trim().parse().unwrap_or(0))
    }

    /// Records a truncate of `table` (see [`super::ClickHouseWriter::truncate_before`]).
    pub async fn truncate_before(&self, table: &str, version: u64) -> Result<(), SinkError> {
        let names = self.names(table);
        let sql = format!(
            "INSERT INTO {} (version) VALUES ({version})",
            names.truncates()
        );
        self.execute(&sql, "recording a truncate").await
    }

    /// Inserts `rows`, one statement per set of columns: a row of an older schema must leave
    /// out the columns it lacks, so that ClickHouse gives them their `DEFAULT` (the value an added
    /// or renamed column has for it), not the type's zero, which is what a field missing from a
    /// JSONEachRow line gets on 18.16.
    pub async fn insert(&self, table: &str, rows: &[GenericRow]) -> Result<(), SinkError> {
        let same = |a: &GenericRow, b: &GenericRow| {
            a.cells.len() == b.cells.len()
                && a.cells.iter().zip(&b.cells).all(|((x, _), (y, _))| x == y)
        };
        if rows.iter().all(|r| same(r, &rows[0])) {
            return self.insert_alike(table, rows).await;
        }
        let mut groups: Vec<Vec<GenericRow>> = Vec::new();
        for row in rows {
            match groups.iter_mut().find(|g| same(&g[0], row)) {
                Some(group) => group.push(row.clone()),
                None => groups.push(vec![row.clone()]),
            }
        }
        for group in groups {
            self.insert_alike(table, &group).await?;
        }
        Ok(())
    }

    /// Inserts rows that all have the same columns.
    async fn insert_alike(&self, table: &str, rows: &[GenericRow]) -> Result<(), SinkError> {
        if rows.is_empty() {
            return Ok(());
        }
        let names = self.names(table);
        let (columns, body) = insert_body(rows);
        let cols: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
        let sql = format!(
            "INSERT INTO {} ({}) FORMAT JSONEachRow",
            names.qualified(),
            cols.join(", ")
        );
        let context = format!("inserting {} rows into {}", rows.len(), names.qualified());
        let mut insert = self.client.insert_formatted_with(sql);
        insert
            .send(Bytes::from(body))
            .await
            .map_err(self.err(context.clone()))?;
        insert.end().await.map_err(self.err(context))
    }

    /// Stored rows of `keys` (canonical key texts) with a `_version` below `below` and at or above
    /// the truncate watermark, with the columns `cols` (for unchanged TOAST values).
    pub async fn rows_below(
        &self,
        state: &TableState,
        keys: &[String],
        cols: &[String],
        below: u64,
    ) -> Result<Vec<GenericRow>, SinkError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let key_cols: Vec<String> = state
            .key
            .iter()
            .filter_map(|k| state.columns.get(k))
            .map(|c| c.ch_name.to_string())
            .collect();
        let mut literals = Vec::with_capacity(keys.len());
        for k in keys {
            // A key text is a JSON array of the key's values, which we made.
            let values: Vec<serde_json::Value> = serde_json::from_str(k).unwrap_or_default();
            let lits: Vec<String> = values.iter().map(sql_literal).collect();
            literals.push(format!("({})", lits.join(", ")));
        }
        let mut select: Vec<String> = key_cols.iter().map(|c| quote_ident(c)).collect();
        select.extend(cols.iter().map(|c| quote_ident(c)));
        let names = &state.names;
        let sql = format!(
            "SELECT {}, _version, _deleted FROM {} WHERE ({}) IN ({}) AND _version < {below} \
             AND _version >= (SELECT max(version) FROM {}) FORMAT JSONEachRow",
            select.join(", "),
            names.qualified(),
            key_cols
                .iter()
                .map(|c| quote_ident(c))
                .collect::<Vec<_>>()
                .join(", "),
            literals.join(", "),
            names.truncates(),
        );
        let text = self
            .text(&sql, "reading earlier rows for unchanged TOAST columns")
            .await?;
        let mut rows = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let Ok(map) = serde_json::from_str::<HashMap<String, Box<RawValue>>>(line) else {
                continue;
            };
            let key = key_text(
                key_cols
                    .iter()
                    .map(|c| map.get(c).map_or("null", |v| v.get()))
                    .map(canonical)
                    .collect::<Vec<_>>()
                    .iter()
                    .map(String::as_str),
            );
            let num = |c: &str| {
                map.get(c)
                    .and_then(|v| v.get().trim_matches('"').parse::<u64>().ok())
            };
            rows.push(GenericRow {
                key,
                cells: cols
                    .iter()
                    .filter_map(|c| {
                        map.get(c)
                            .map(|v| (Arc::from(c.as_str()), v.get().to_string()))
                    })
                    .collect(),
                op: crate::event::Op::Update,
                lsn: String::new(),
                version: num("_version").unwrap_or(0),
                deleted: num("_deleted").unwrap_or(0) != 0,
            });
        }
        Ok(rows)
    }
}

/// A JSON value ClickHouse printed, as our own serialisation prints it: strings re-escaped
/// (ClickHouse escapes `/`), numbers as they are.
fn canonical(raw: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(raw) {
        Ok(v @ serde_json::Value::String(_)) => v.to_string(),
        _ => raw.to_string(),
    }
}

fn sql_literal(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => quote_string(s),
        other => other.to_string(),
    }
}

/// TSV's escapes of names and types (`\t`, `\n`, `\\`).
fn unescape_tsv(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('0') => out.push('\0'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

/// The ClickHouse table of a source table: its name for a table in `public`, `<schema>_<table>`
/// for any other, so that `app.orders` and `archive.orders` do not share one.
pub fn clickhouse_table_name(rel: &RelationSchema) -> String {
    if rel.schema == "public" {
        rel.table.clone()
    } else {
        format!("{}_{}", rel.schema, rel.table)
    }
}
