//! A table's schema changing while the sink runs: what a new [`RelationSchema`] needs done to the
//! existing ClickHouse table, or why it cannot be done safely. Pure: the caller reads
//! `system.columns`, runs the statements and re-creates the view.
//!
//! - a new column: `ADD COLUMN`, Nullable (older rows have no value);
//! - a wider type (Int16 → Int32 → Int64, Float32 → Float64, Decimal(p, s) → Decimal(p', s) with
//!   p' > p, NOT NULL → NULL): `MODIFY COLUMN`; a narrower one keeps the wider ClickHouse column;
//! - a dropped column stays (older rows keep their values) and is not written any more; a
//!   non-Nullable one becomes Nullable so new rows can leave it out;
//! - a rename (same `attnum`, new name): `RENAME COLUMN` from 20.4; on older servers (18.16) the new
//!   name is added with `DEFAULT CAST(old AS …)`, so the rows stored before the rename read their
//!   value under the new name too (computed on read, kept by merges), and new rows write it;
//! - anything else (String → Int32, a key column's type or the primary key itself): refused.

use std::collections::HashMap;
use std::sync::Arc;

use crate::types::RelationSchema;

use super::config::quote_ident;
use super::schema::ServerVersion;
use super::table::{
    added_column_type, caps_of, column_type, is_meta, Column, TableNames, TableState,
};

/// One statement's worth of change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Add {
        column: String,
        ty: String,
        /// What the rows stored before read (`DEFAULT …`): the old column of a rename on a
        /// server without `RENAME COLUMN`, or PostgreSQL's value for the rows that were there
        /// when the column was added with a default.
        default: Option<String>,
    },
    Modify {
        column: String,
        from: String,
        to: String,
    },
    Rename {
        from: String,
        to: String,
    },
}

impl Change {
    /// The change of the table's storage; on a cluster `ALTER <table>_local ON CLUSTER`, after which
    /// the caller brings the Distributed table over it along (`GenericWriter::sync_distributed`).
    pub fn sql(&self, names: &TableNames) -> String {
        format!(
            "ALTER TABLE {}{} {}",
            names.storage(),
            super::cluster::on_cluster(names.cluster()),
            self.clause()
        )
    }

    /// What follows `ALTER TABLE <table>`.
    fn clause(&self) -> String {
        match self {
            Change::Add {
                column,
                ty,
                default: None,
            } => format!("ADD COLUMN {} {ty}", quote_ident(column)),
            Change::Add {
                column,
                ty,
                default: Some(value),
            } => format!(
                "ADD COLUMN {} {ty} DEFAULT CAST({value} AS {ty})",
                quote_ident(column)
            ),
            Change::Modify { column, to, .. } => {
                format!("MODIFY COLUMN {} {to}", quote_ident(column))
            }
            Change::Rename { from, to } => {
                format!("RENAME COLUMN {} TO {}", quote_ident(from), quote_ident(to))
            }
        }
    }
}

/// What applying a schema takes.
#[derive(Debug, Clone)]
pub struct Plan {
    pub changes: Vec<Change>,
    /// The table as the schema's rows are written to it once the changes are made.
    pub state: Arc<TableState>,
}

/// PostgreSQL's value for the rows already there when `c` was added with a default, as a
/// ClickHouse literal; `None` when there is none or it is not a scalar.
fn missing_literal(
    c: &crate::types::ColumnSchema,
    caps: crate::types::ServerCaps,
) -> Option<String> {
    let value = crate::types::to_json(&c.kind, c.missing.as_deref()?).ok()?;
    match crate::types::clickhouse_json(&c.kind, &value, caps).ok()? {
        serde_json::Value::String(s) => Some(super::config::quote_string(&s)),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(u8::from(b).to_string()),
        _ => None,
    }
}

/// Whether a ClickHouse column of type `from` can take `to`'s values with `MODIFY COLUMN`, every
/// stored value unchanged.
pub fn widens(from: &str, to: &str) -> bool {
    const INTS: [&str; 4] = ["Int8", "Int16", "Int32", "Int64"];
    let rank = |t: &str| INTS.iter().position(|i| *i == t);
    if let (Some(a), Some(b)) = (rank(from), rank(to)) {
        return a < b;
    }
    if from == "Float32" && to == "Float64" {
        return true;
    }
    match (decimal(from), decimal(to)) {
        (Some((p1, s1)), Some((p2, s2))) => s1 == s2 && p2 > p1,
        _ => false,
    }
}

fn decimal(t: &str) -> Option<(u32, u32)> {
    let inner = t.strip_prefix("Decimal(")?.strip_suffix(')')?;
    let (p, s) = inner.split_once(',')?;
    Some((p.trim().parse().ok()?, s.trim().parse().ok()?))
}

fn split_nullable(t: &str) -> (&str, bool) {
    match t
        .strip_prefix("Nullable(")
        .and_then(|r| r.strip_suffix(')'))
    {
        Some(inner) => (inner, true),
        None => (t, false),
    }
}

/// What an existing column needs to take values of a wanted type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reconcile {
    /// It already can.
    Keep,
    /// `MODIFY COLUMN` to this type.
    Modify(String),
    /// No type change keeps every stored value.
    Refuse,
}

/// What an existing column of type `existing` needs to take values of `wanted`.
pub fn reconcile(existing: &str, wanted: &str) -> Reconcile {
    if existing == wanted {
        return Reconcile::Keep;
    }
    let (eb, en) = split_nullable(existing);
    let (wb, wn) = split_nullable(wanted);
    let base = if eb == wb || widens(wb, eb) {
        eb
    } else if widens(eb, wb) {
        wb
    } else {
        return Reconcile::Refuse;
    };
    let ty = if en || wn {
        format!("Nullable({base})")
    } else {
        base.to_string()
    };
    if ty == existing {
        Reconcile::Keep
    } else {
        Reconcile::Modify(ty)
    }
}

/// A change the sink will not make. Its text says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("schema change of {table} refused: column {column} is {old} in ClickHouse and PostgreSQL now has {new}: {why}. The rows of this schema go to the dead-letter topic; to go on, recreate the ClickHouse table for the new shape (drop {table} and its _current view; the sink recreates them) and re-read the topic with a new --group, or ALTER the ClickHouse column to a type that holds both, then restart the sink")]
pub struct Refusal {
    pub table: String,
    pub column: String,
    pub old: String,
    pub new: String,
    pub why: String,
}

/// Plans applying `rel` to a table whose columns are `existing` (name, type; empty when the table
/// was just created from `rel`). `history` holds the table's schemas the sink knows of, oldest
/// first (it tells renames and key changes).
pub fn plan(
    names: &TableNames,
    existing: &[(String, String)],
    rel: &RelationSchema,
    history: &[Arc<RelationSchema>],
    version: ServerVersion,
) -> Result<Plan, Refusal> {
    let caps = caps_of(version);
    let refuse = |column: &str, old: &str, new: &str, why: &str| Refusal {
        table: names.qualified(),
        column: column.to_string(),
        old: old.to_string(),
        new: new.to_string(),
        why: why.to_string(),
    };
    let key_names: Vec<&str> = rel
        .key_columns()
        .ok_or_else(|| refuse("?", "?", "?", "the schema's key points past its columns"))?
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    if let Some(c) = rel.columns.iter().find(|c| is_meta(&c.name)) {
        return Err(refuse(
            &c.name,
            "the sink's own column",
            &c.type_name,
            "a column of this name is the sink's bookkeeping (_op, _lsn, _version, _deleted, _ingested_at); rename it in PostgreSQL",
        ));
    }
    if key_names.is_empty() {
        return Err(refuse(
            "(none)",
            "-",
            "-",
            "the table has no primary key, so its rows cannot be told apart",
        ));
    }
    for old in history {
        let old_key: Vec<&str> = old
            .key_columns()
            .unwrap_or_default()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        if old_key != key_names {
            return Err(refuse(
                &key_names.join(", "),
                &format!("primary key ({})", old_key.join(", ")),
                &format!("primary key ({})", key_names.join(", ")),
                "the ClickHouse table is ordered by the old key",
            ));
        }
    }
    let type_of = |name: &str| {
        existing
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.as_str())
    };
    let rel_pos = history.iter().position(|h| **h == *rel);
    let mut changes = Vec::new();
    let mut columns = HashMap::new();
    let mut written: Vec<String> = Vec::new();
    for (i, c) in rel.columns.iter().enumerate() {
        let wanted = column_type(rel, i, caps);
        let is_key = rel.key.contains(&i);
        let mut column = |ch_name: &str| {
            let col = Column {
                ch_name: Arc::from(ch_name),
                kind: c.kind.clone(),
            };
            columns.insert(c.name.clone(), col);
        };
        if existing.is_empty() {
            column(&c.name);
            continue;
        }
        // The column as ClickHouse has it now, and the name its rows are written under.
        let (source, ch_name) = if type_of(&c.name).is_some() {
            (c.name.clone(), c.name.clone())
        } else {
            if is_key {
                return Err(refuse(
                    &c.name,
                    "absent",
                    &wanted,
                    "a new key column changes the table's order",
                ));
            }
            match renamed_from(c, rel, history, existing) {
                Some((old, at))
                    if version.has_rename_column() && rel_pos.is_some_and(|p| at < p) =>
                {
                    changes.push(Change::Rename {
                        from: old.clone(),
                        to: c.name.clone(),
                    });
                    (old, c.name.clone())
                }
                // A schema older than the rename: its rows write the column's current name.
                Some((old, _)) if version.has_rename_column() => (old.clone(), old),
                other => {
                    // Without RENAME COLUMN (18.16) a rename reads the old column's values.
                    let default = match other.filter(|_| !version.has_rename_column()) {
                        Some((old, _)) => Some(quote_ident(&old)),
                        None => missing_literal(c, caps),
                    };
                    changes.push(Change::Add {
                        column: c.name.clone(),
                        ty: added_column_type(&c.kind, caps),
                        default,
                    });
                    column(&c.name);
                    continue;
                }
            }
        };
        let have = type_of(&source).unwrap_or_default();
        match reconcile(have, &wanted) {
            Reconcile::Keep => {}
            Reconcile::Modify(_) if is_key => {
                return Err(refuse(
                    &c.name,
                    have,
                    &wanted,
                    "a key column's type cannot change in ClickHouse",
                ))
            }
            Reconcile::Modify(to) => changes.push(Change::Modify {
                column: ch_name.clone(),
                from: have.to_string(),
                to,
            }),
            Reconcile::Refuse => {
                return Err(refuse(
                    &c.name,
                    have,
                    &format!("{} ({wanted})", c.type_name),
                    "ClickHouse cannot convert the stored values to the new type without loss",
                ))
            }
        }
        column(&ch_name);
        written.push(source);
    }
    // Columns the schema no longer has stay; new rows leave them out, so they must take a default.
    for (name, ty) in existing {
        if is_meta(name) || written.iter().any(|w| w == name) {
            continue;
        }
        let (_, nullable) = split_nullable(ty);
        if !nullable && !ty.starts_with("Array(") {
            changes.push(Change::Modify {
                column: name.clone(),
                from: ty.clone(),
                to: format!("Nullable({ty})"),
            });
        }
    }
    Ok(Plan {
        changes,
        state: Arc::new(TableState {
            names: names.clone(),
            caps,
            columns,
            key: key_names.iter().map(|k| k.to_string()).collect(),
        }),
    })
}

/// The ClickHouse column `c` had under another name in an earlier schema of the table (same
/// `attnum`, which PostgreSQL keeps across a rename and never reuses), and the position in
/// `history` of the schema that named it so.
fn renamed_from(
    c: &crate::types::ColumnSchema,
    rel: &RelationSchema,
    history: &[Arc<RelationSchema>],
    existing: &[(String, String)],
) -> Option<(String, usize)> {
    let attnum = c.attnum?;
    history.iter().enumerate().find_map(|(at, h)| {
        h.columns
            .iter()
            .find(|o| o.attnum == Some(attnum) && o.name != c.name)
            .filter(|o| existing.iter().any(|(n, _)| *n == o.name))
            .filter(|o| rel.columns.iter().all(|r| r.name != o.name))
            .map(|o| (o.name.clone(), at))
    })
}

#[cfg(test)]
#[path = "evolve_tests.rs"]
mod tests;
