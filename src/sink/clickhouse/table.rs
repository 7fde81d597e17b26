//! Any table's ClickHouse shape, from the [`RelationSchema`] the stream publishes: its DDL per
//! server version, and its change events as rows ([`GenericRow`]) for a `JSONEachRow` insert.
//!
//! The table is named after the source table, in the sink's database. Every schema column keeps its
//! PostgreSQL name and gets [`clickhouse_type`] (key columns never Nullable); the sink's own columns
//! start with an underscore (`_op`, `_lsn`, `_version`, `_deleted`, `_ingested_at`), so a user
//! column named `op` or `version` never collides. Truncates and the current-rows view work as the
//! seed table's (schema.rs).

use std::collections::HashMap;
use std::sync::Arc;

use crate::event::{ChangeEvent, Op, Row, RowKey};
use crate::types::{clickhouse_json_text, clickhouse_type, PgType, RelationSchema, ServerCaps};

use super::cluster;
use super::config::{quote_ident, quote_string};
use super::schema::ServerVersion;

/// The sink's columns of a generic table, after the user's.
pub const META_COLUMNS: &[(&str, &str)] = &[
    ("_op", "String"),
    ("_lsn", "String"),
    ("_version", "UInt64"),
    ("_deleted", "UInt8"),
];

/// Set by ClickHouse on insert; not in the view.
pub const INGESTED_AT: &str = "_ingested_at";

/// Whether a ClickHouse column is one of the sink's own.
pub fn is_meta(name: &str) -> bool {
    name == INGESTED_AT || META_COLUMNS.iter().any(|(n, _)| *n == name)
}

/// The names of one table's ClickHouse objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableNames {
    pub database: String,
    pub table: String,
    /// `--clickhouse-cluster`: DDL runs ON CLUSTER, rows live in `<table>_local` (cluster.rs).
    pub cluster: Option<String>,
    /// The PostgreSQL table (`schema.table`) whose rows it holds, recorded in its columns'
    /// comments: two source tables whose names map to one ClickHouse name are told apart.
    pub source: Option<String>,
}

impl TableNames {
    pub fn new(database: &str, table: &str) -> Self {
        TableNames {
            database: database.to_string(),
            table: table.to_string(),
            cluster: None,
            source: None,
        }
    }

    pub fn with_source(mut self, source: &str) -> Self {
        self.source = Some(source.to_string());
        self
    }

    pub fn with_cluster(mut self, cluster: Option<String>) -> Self {
        self.cluster = cluster;
        self
    }

    pub fn cluster(&self) -> Option<&str> {
        self.cluster.as_deref()
    }

    /// The table that holds the rows (itself, or on a cluster `<table>_local`).
    pub fn storage_name(&self) -> String {
        cluster::storage_name(&self.table, self.cluster())
    }

    pub fn storage(&self) -> String {
        self.qualify(&self.storage_name())
    }

    /// The storage as a table of its own (to read its columns).
    pub fn storage_names(&self) -> TableNames {
        TableNames::new(&self.database, &self.storage_name())
    }

    fn on_cluster(&self) -> String {
        cluster::on_cluster(self.cluster())
    }

    fn qualify(&self, name: &str) -> String {
        format!("{}.{}", quote_ident(&self.database), quote_ident(name))
    }

    pub fn qualified(&self) -> String {
        self.qualify(&self.table)
    }

    pub fn truncates(&self) -> String {
        self.qualify(&format!("{}_truncates", self.table))
    }

    pub fn view(&self) -> String {
        self.qualify(&cluster::view_name(&self.table))
    }

    /// The current-rows view as a table of its own (to read its columns).
    pub fn view_names(&self) -> TableNames {
        TableNames::new(&self.database, &cluster::view_name(&self.table))
    }
}

/// The ClickHouse type of `rel`'s column `idx` in a new table.
pub fn column_type(rel: &RelationSchema, idx: usize, caps: ServerCaps) -> String {
    let c = &rel.columns[idx];
    clickhouse_type(&c.kind, c.nullable && !rel.key.contains(&idx), caps)
}

/// The type a column gets when it is added to an existing table: Nullable (older rows have no
/// value), unless it is an array (ClickHouse has no Nullable(Array); older rows get `[]`).
pub fn added_column_type(kind: &PgType, caps: ServerCaps) -> String {
    clickhouse_type(kind, true, caps)
}

pub fn create_table_sql(
    names: &TableNames,
    rel: &RelationSchema,
    version: ServerVersion,
) -> String {
    let caps = caps_of(version);
    let cols: Vec<String> = (0..rel.columns.len())
        .map(|i| {
            let c = &rel.columns[i];
            let ty = column_type(rel, i, caps);
            // Rows of older schemas (other partitions, a re-read) leave a column added with a
            // default out: they read PostgreSQL's value for them, as in an ALTERed table.
            let default = super::evolve::missing_literal(c, caps)
                .map_or(String::new(), |v| format!(" DEFAULT CAST({v} AS {ty})"));
            // No comments on a cluster: 18.16's replicated tables refuse them (evolve.rs).
            let attnum = c.attnum.filter(|_| names.cluster().is_none());
            let comment = attnum.map_or(String::new(), |n| {
                format!(
                    " COMMENT {}",
                    quote_string(&super::evolve::attnum_comment(n, names.source.as_deref()))
                )
            });
            format!("    {} {ty}{default}{comment}", quote_ident(&c.name))
        })
        .chain(META_COLUMNS.iter().map(|(n, t)| format!("    {n} {t}")))
        .chain(std::iter::once(format!(
            "    {INGESTED_AT} DateTime DEFAULT now()"
        )))
        .collect();
    let args = if version.has_is_deleted() {
        "_version, _deleted"
    } else {
        "_version"
    };
    let engine = cluster::replacing_engine(
        names.cluster(),
        &names.database,
        &names.storage_name(),
        args,
    );
    format!(
        "CREATE TABLE IF NOT EXISTS {}{} (\n{}\n) ENGINE = {engine} ORDER BY ({})",
        names.storage(),
        names.on_cluster(),
        cols.join(",\n"),
        key_columns(rel).join(", ")
    )
}

/// The key columns, quoted: the ORDER BY of the storage.
pub fn key_columns(rel: &RelationSchema) -> Vec<String> {
    key_names(rel).iter().map(|n| quote_ident(n)).collect()
}

/// The key columns' names (the sharding key on a cluster, with their types).
pub fn key_names(rel: &RelationSchema) -> Vec<String> {
    rel.key
        .iter()
        .filter_map(|&i| rel.columns.get(i))
        .map(|c| c.name.clone())
        .collect()
}

pub fn create_truncates_sql(names: &TableNames) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {}{} (\n    version UInt64,\n    applied_at DateTime DEFAULT now()\n) ENGINE = {} ORDER BY version",
        names.truncates(),
        names.on_cluster(),
        cluster::truncates_engine(
            names.cluster(),
            &names.database,
            &format!("{}_truncates", names.table)
        )
    )
}

/// The view over `user_columns`: (storage column, the name it is shown under) for every non-meta
/// column the ClickHouse table has, dropped ones too (older rows keep their values there), as
/// [`super::evolve::view_columns`] names them. A view of 18.16 records its column types when it is
/// created, so it is re-created whenever the table's columns change.
pub fn create_view_sql(names: &TableNames, user_columns: &[(String, String)]) -> String {
    let cols: Vec<(String, String)> = user_columns
        .iter()
        .cloned()
        .chain(["_op", "_lsn", "_version"].map(|m| (m.to_string(), m.to_string())))
        .collect();
    format!(
        "CREATE VIEW IF NOT EXISTS {}{} AS {}",
        names.view(),
        names.on_cluster(),
        view_select(
            &cols,
            &format!(
                "{} FINAL WHERE _deleted = 0 AND _version >= (SELECT max(version) FROM {})",
                names.qualified(),
                names.truncates()
            )
        )
    )
}

/// `SELECT` of `cols` (storage column, the name it is shown under) `FROM source`.
///
/// ClickHouse puts an alias in place of every identifier of its name in the same SELECT, so in
/// `a AS b, b AS a` (a swap) or `email AS email_old, email__3 AS email` one storage column would be
/// read twice. When a name shown is another storage column's, the storage columns get neutral
/// names one level down first.
pub fn view_select(cols: &[(String, String)], source: &str) -> String {
    let ident = |n: &str| {
        if is_meta(n) {
            // The sink's own names as they always were written.
            n.to_string()
        } else {
            quote_ident(n)
        }
    };
    let clash = cols
        .iter()
        .any(|(s, l)| s != l && cols.iter().any(|(t, _)| t == l));
    if !clash {
        let list: Vec<String> = cols
            .iter()
            .map(|(s, l)| {
                if s == l {
                    ident(s)
                } else {
                    format!("{} AS {}", ident(s), ident(l))
                }
            })
            .collect();
        return format!("SELECT {} FROM {source}", list.join(", "));
    }
    let inner: Vec<String> = cols
        .iter()
        .enumerate()
        .map(|(i, (s, _))| format!("{} AS _cdc_relay_{i}", ident(s)))
        .collect();
    let outer: Vec<String> = cols
        .iter()
        .enumerate()
        .map(|(i, (_, l))| format!("_cdc_relay_{i} AS {}", ident(l)))
        .collect();
    format!(
        "SELECT {} FROM (SELECT {} FROM {source})",
        outer.join(", "),
        inner.join(", ")
    )
}

pub fn drop_view_sql(names: &TableNames) -> String {
    format!(
        "DROP TABLE IF EXISTS {}{}",
        names.view(),
        names.on_cluster()
    )
}

pub fn columns_sql(names: &TableNames) -> String {
    format!(
        "SELECT name, type, default_expression, comment, is_in_sorting_key FROM system.columns WHERE database = {} AND table = {} FORMAT TSV",
        quote_string(&names.database),
        quote_string(&names.table)
    )
}

/// What a server of `version` stores (DateTime64 or not).
pub fn caps_of(version: ServerVersion) -> ServerCaps {
    ServerCaps::from_version(&version.to_string()).unwrap_or(ServerCaps::LEGACY)
}

/// One column of a schema as the sink writes it.
#[derive(Debug, Clone)]
pub struct Column {
    /// The storage column it is written to: the one that holds its attnum (evolve.rs), named as
    /// the column was when it was added.
    pub ch_name: Arc<str>,
    pub kind: PgType,
}

/// A schema applied to its ClickHouse table: how its messages become rows.
#[derive(Debug, Clone)]
pub struct TableState {
    pub names: TableNames,
    pub caps: ServerCaps,
    /// By PostgreSQL name.
    pub columns: HashMap<String, Column>,
    /// PostgreSQL names of the key columns, in key order.
    pub key: Vec<String>,
}

/// Why a message of a generic table cannot become a row (it goes to the dead-letter topic).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GenericRowError {
    #[error("the message is in the seed's form, but its schema names table {0}")]
    NotColumns(String),
    #[error("column {column} is not in the schema of {table} the message names")]
    UnknownColumn { table: String, column: String },
    #[error("{op} of {table} without a value for key column {column}")]
    NoKey {
        op: &'static str,
        table: String,
        column: String,
    },
    #[error("moved_from does not hold key column {column} of {table}")]
    BadMovedFrom { table: String, column: String },
    #[error(transparent)]
    Type(#[from] crate::types::TypeError),
}

/// One change of a generic table, as its `JSONEachRow` insert writes it.
#[derive(Debug, Clone, PartialEq)]
pub struct GenericRow {
    /// The key columns' values as canonical JSON text (`[3,"a"]`): what rows are compared by.
    pub key: String,
    /// ClickHouse column, JSON text of the value (`null` for NULL). A column the message does not
    /// carry (an older schema, an unchanged TOAST value) is not listed: the insert leaves it at
    /// its default.
    pub cells: Vec<(Arc<str>, String)>,
    pub op: Op,
    pub lsn: String,
    pub version: u64,
    pub deleted: bool,
}

/// A generic row and what the batch must still do for it.
#[derive(Debug)]
pub struct Prepared {
    pub row: GenericRow,
    /// ClickHouse columns the update left out (unchanged TOAST values), to fill from earlier rows.
    pub unchanged: Vec<String>,
    /// The key to fill them from: the row's own, or after a key update the old key.
    pub fill_from: String,
}

/// Canonical key text from the JSON texts of the key columns' values.
pub fn key_text<'a>(texts: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = String::from("[");
    for (i, t) in texts.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(t);
    }
    out.push(']');
    out
}

impl TableState {
    fn column(&self, name: &str) -> Result<&Column, GenericRowError> {
        self.columns
            .get(name)
            .ok_or_else(|| GenericRowError::UnknownColumn {
                table: self.names.table.clone(),
                column: name.to_string(),
            })
    }

    /// The row of a change in the columns form (not a truncate).
    pub fn row(&self, event: ChangeEvent) -> Result<Prepared, GenericRowError> {
        let Row::Columns(columns) = event.row else {
            return Err(GenericRowError::NotColumns(self.names.table.clone()));
        };
        let mut cells = Vec::with_capacity(columns.len());
        for (name, value) in &columns {
            let col = self.column(name)?;
            // A NULL is written as `null`, not left out: a column left out takes its DEFAULT,
            // which for a column added with a default is PostgreSQL's value for older rows.
            if value.is_null() && event.unchanged.iter().any(|u| u == name) {
                continue;
            }
            let text = if value.is_null() && event.json_null.iter().any(|j| j == name) {
                // JSON's null, stored as its text like every json value (SQL NULL stays NULL).
                serde_json::Value::from("null").to_string()
            } else {
                clickhouse_json_text(&col.kind, value, self.caps).map_err(|e| e.in_column(name))?
            };
            cells.push((col.ch_name.clone(), text));
        }
        let mut key_texts = Vec::with_capacity(self.key.len());
        for k in &self.key {
            let ch = &self.column(k)?.ch_name;
            match cells.iter().find(|(n, _)| n == ch) {
                Some((_, t)) if t != "null" => key_texts.push(t.as_str()),
                _ => {
                    return Err(GenericRowError::NoKey {
                        op: event.op.as_str(),
                        table: self.names.table.clone(),
                        column: k.clone(),
                    })
                }
            }
        }
        let key = key_text(key_texts);
        let fill_from = match &event.moved_from {
            Some(old) => self.key_of(old)?,
            None => key.clone(),
        };
        let unchanged = event
            .unchanged
            .iter()
            .map(|u| self.column(u).map(|c| c.ch_name.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Prepared {
            row: GenericRow {
                key,
                cells,
                op: event.op,
                lsn: event.lsn,
                version: event.version,
                deleted: event.op == Op::Delete,
            },
            unchanged,
            fill_from,
        })
    }

    /// The canonical key text of a `moved_from`: the scalar of a one-column key, or an object of
    /// the key columns.
    fn key_of(&self, old: &RowKey) -> Result<String, GenericRowError> {
        let value = old.to_json();
        let mut texts = Vec::with_capacity(self.key.len());
        for k in &self.key {
            let v = if self.key.len() == 1 && !value.is_object() {
                &value
            } else {
                value.get(k).ok_or_else(|| GenericRowError::BadMovedFrom {
                    table: self.names.table.clone(),
                    column: k.clone(),
                })?
            };
            let col = self.column(k)?;
            texts.push(clickhouse_json_text(&col.kind, v, self.caps).map_err(|e| e.in_column(k))?);
        }
        Ok(key_text(texts.iter().map(String::as_str)))
    }
}

impl super::batch::VersionedRow for GenericRow {
    type Key = String;
    fn key(&self) -> &String {
        &self.key
    }
    fn version(&self) -> u64 {
        self.version
    }
    fn deleted(&self) -> bool {
        self.deleted
    }
    fn copy_columns(&mut self, from: &Self, cols: &[String]) {
        for c in cols {
            self.cells.retain(|(n, _)| &**n != c.as_str());
            if let Some(cell) = from.cells.iter().find(|(n, _)| &**n == c.as_str()) {
                self.cells.push(cell.clone());
            }
        }
    }
}

/// The `JSONEachRow` body of `rows`, and the columns it names (in first-seen order, then the
/// sink's).
pub fn insert_body(rows: &[GenericRow]) -> (Vec<Arc<str>>, Vec<u8>) {
    let mut names: Vec<Arc<str>> = Vec::new();
    let mut body = Vec::with_capacity(rows.len() * 128);
    for r in rows {
        body.push(b'{');
        for (name, text) in &r.cells {
            if !names.iter().any(|n| n == name) {
                names.push(name.clone());
            }
            push_json_string(&mut body, name);
            body.push(b':');
            body.extend_from_slice(text.as_bytes());
            body.push(b',');
        }
        body.extend_from_slice(b"\"_op\":");
        push_json_string(&mut body, r.op.as_str());
        body.extend_from_slice(b",\"_lsn\":");
        push_json_string(&mut body, &r.lsn);
        body.extend_from_slice(
            format!(
                ",\"_version\":{},\"_deleted\":{}}}\n",
                r.version,
                u8::from(r.deleted)
            )
            .as_bytes(),
        );
    }
    names.extend(META_COLUMNS.iter().map(|(n, _)| Arc::from(*n)));
    (names, body)
}

fn push_json_string(out: &mut Vec<u8>, s: &str) {
    // Serialising a str cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

#[cfg(test)]
#[path = "table_tests.rs"]
pub(crate) mod tests;
