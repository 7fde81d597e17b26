//! A table's schema changing while the sink runs: what a new [`RelationSchema`] needs done to the
//! existing ClickHouse table, or why it cannot be done safely. Pure: the caller reads
//! `system.columns`, runs the statements and re-creates the view.
//!
//! A column is its `attnum`, never its name: PostgreSQL keeps the attnum across a `RENAME COLUMN`
//! and never reuses it, while names move (`RENAME a TO a_old; ADD a`, swaps, `DROP x; ADD x`). Each
//! storage column records the attnum it holds in its ClickHouse comment (`PostgreSQL attnum 3`),
//! written with the column in one statement, and keeps the name it was created with: a rename is
//! only a new label, which the current-rows view shows (`email AS email_old`). So no stored value
//! ever moves, no other sink's plan goes stale, and 18.16 (no `RENAME COLUMN`) behaves as the
//! current servers do.
//!
//! - a new attnum: `ADD COLUMN`, Nullable (older rows have no value), under its name or, when a
//!   storage column has that name already, `<name>__<attnum>`;
//! - a wider type (Int16 → Int32 → Int64, Float32 → Float64, Decimal(p, s) → Decimal(p', s) with
//!   p' > p, NOT NULL → NULL): `MODIFY COLUMN`, repeating the column's `DEFAULT` (18.16 drops it
//!   otherwise); a narrower one keeps the wider ClickHouse column;
//! - a dropped column stays (older rows keep their values) and is not written any more; a
//!   non-Nullable one becomes Nullable so new rows can leave it out;
//! - anything else (String → Int32, a key column's type or the primary key itself): refused.
//!
//! Tables of earlier releases have no comments, and on a cluster there are none (18.16 refuses
//! them on replicated tables): their attnums are inferred from the names (identity.rs); on one
//! server the comment is then written.

use std::collections::HashMap;
use std::sync::Arc;

use crate::types::RelationSchema;

use super::config::{quote_ident, quote_string};
pub use super::identity::{attnum_comment, same_key, view_columns, Stored};
use super::identity::{attnum_in, free_name, legacy_attnum};
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
        /// What the rows stored before read (`DEFAULT …`): PostgreSQL's value for the rows that
        /// were there when the column was added with a default.
        default: Option<String>,
        /// Recorded in the column's comment, in the same statement.
        attnum: Option<i16>,
    },
    Modify {
        column: String,
        from: String,
        to: String,
        /// The column's `DEFAULT` expression, repeated: 18.16 drops a default a `MODIFY COLUMN`
        /// does not name, and older rows would read NULL instead of it.
        default: Option<String>,
    },
    /// Records the attnum of a column of an earlier release's table.
    Comment { column: String, attnum: i16 },
}

impl Change {
    /// The change of the table's storage; on a cluster `ALTER <table>_local ON CLUSTER`, after which
    /// the caller brings the Distributed table over it along (`GenericWriter::sync_distributed`).
    pub fn sql(&self, names: &TableNames) -> String {
        format!(
            "ALTER TABLE {}{} {}",
            names.storage(),
            super::cluster::on_cluster(names.cluster()),
            self.clause(names)
        )
    }

    /// What follows `ALTER TABLE <table>`.
    fn clause(&self, names: &TableNames) -> String {
        let with_default = |ty: &str, default: &Option<String>| match default {
            None => ty.to_string(),
            Some(value) => format!("{ty} DEFAULT CAST({value} AS {ty})"),
        };
        match self {
            Change::Add {
                column,
                ty,
                default,
                attnum,
            } => {
                let add = format!(
                    "ADD COLUMN {} {}",
                    quote_ident(column),
                    with_default(ty, default)
                );
                match attnum.filter(|_| names.cluster().is_none()) {
                    // 18.16 ignores a COMMENT inside ADD COLUMN, and takes it as a second command.
                    Some(n) => format!(
                        "{add}, COMMENT COLUMN {} {}",
                        quote_ident(column),
                        quote_string(&attnum_comment(n, names.source.as_deref()))
                    ),
                    None => add,
                }
            }
            Change::Modify {
                column,
                to,
                default,
                ..
            } => format!(
                "MODIFY COLUMN {} {}",
                quote_ident(column),
                with_default(to, default)
            ),
            Change::Comment { column, attnum } => format!(
                "COMMENT COLUMN {} {}",
                quote_ident(column),
                quote_string(&attnum_comment(*attnum, names.source.as_deref()))
            ),
        }
    }
}

/// What applying a schema takes.
#[derive(Debug, Clone)]
pub struct Plan {
    pub changes: Vec<Change>,
    /// The table as the schema's rows are written to it once the changes are made.
    pub state: Arc<TableState>,
    /// The current-rows view's user columns once the changes are made: storage column and the
    /// name it is shown under (the newest known name of its attnum).
    pub view: Vec<(String, String)>,
}

/// PostgreSQL's value for the rows already there when `c` was added with a default, as a
/// ClickHouse literal; `None` when there is none.
pub fn missing_literal(
    c: &crate::types::ColumnSchema,
    caps: crate::types::ServerCaps,
) -> Option<String> {
    let value = crate::types::to_json(&c.kind, c.missing.as_deref()?).ok()?;
    literal(&crate::types::clickhouse_json(&c.kind, &value, caps).ok()?)
}

/// A value as the sink writes it to ClickHouse, as a SQL literal (arrays of any depth too).
fn literal(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(quote_string(s)),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(u8::from(*b).to_string()),
        serde_json::Value::Null => Some("NULL".into()),
        serde_json::Value::Array(items) => {
            let items: Option<Vec<String>> = items.iter().map(literal).collect();
            Some(format!("[{}]", items?.join(", ")))
        }
        serde_json::Value::Object(_) => None,
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
#[error("schema change of {table} refused: column {column} is {old} in ClickHouse and PostgreSQL now has {new}: {why}. The rows of this schema go to the dead-letter topic; to go on, drop {table}, its _current view and its _truncates table and restart the sinks (they create the table again, from the newest schema when its key changed), then run `cdc-relay verify --repair` for the table to send its current rows again; or ALTER the ClickHouse column to a type that holds both, then restart the sinks")]
pub struct Refusal {
    pub table: String,
    pub column: String,
    pub old: String,
    pub new: String,
    pub why: String,
}

/// Plans applying `rel` to a table whose storage columns are `existing` (empty when the table
/// was just created from `rel`). `history` holds the table's schemas the sink knows of, oldest
/// first (it tells the attnums of columns of earlier releases' tables, of historic schemas that
/// lack them, and the names the view shows).
pub fn plan(
    names: &TableNames,
    existing: &[Stored],
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
    // Another source table whose name maps to the same ClickHouse name (`public.app_orders` and
    // `app.orders` both to `app_orders`): its rows would merge with these.
    let other = names.source.as_ref().and_then(|ours| {
        existing
            .iter()
            .find_map(|s| s.source.as_ref().filter(|o| *o != ours))
            .map(|other| (ours, other))
    });
    if let Some((ours, other)) = other {
        return Err(refuse(
            "(every column)",
            &format!("a column of {other}"),
            &format!("{ours}, whose ClickHouse table has the same name"),
            "two source tables would share one ClickHouse table; relay one of them through a sink of its own with another --clickhouse-database",
        ));
    }
    let mut changes = Vec::new();
    // The storage columns as they will be, with the attnum each holds.
    let mut storage: Vec<Stored> = existing
        .iter()
        .filter(|s| !is_meta(&s.name))
        .cloned()
        .collect();
    // 18.16 refuses column comments on replicated tables (Code 48 for COMMENT COLUMN, Code 122
    // for a CREATE with comments on the second replica; measured): on a cluster every attnum is
    // inferred.
    let comments = names.cluster().is_none();
    // An earlier release renamed storage columns on servers with RENAME COLUMN (20.4+): there a
    // plain name is the newest schema's; on 18.16, and for this release's names, the first one's.
    let renamed_storage = comments && version.has_rename_column();
    for s in storage.iter_mut().filter(|s| s.attnum.is_none()) {
        if let Some(n) = legacy_attnum(&s.name, history, renamed_storage) {
            s.attnum = Some(n);
            if comments {
                changes.push(Change::Comment {
                    column: s.name.clone(),
                    attnum: n,
                });
            }
        }
    }
    let mut columns = HashMap::new();
    let mut written: Vec<String> = Vec::new();
    for (i, c) in rel.columns.iter().enumerate() {
        let wanted = column_type(rel, i, caps);
        let is_key = rel.key.contains(&i);
        let attnum = attnum_in(c, history);
        if existing.is_empty() {
            columns.insert(c.name.clone(), column_of(c, &c.name));
            continue;
        }
        // The column that holds this attnum: the last in table order (on a table of an earlier
        // release, an 18.16 rename added the new name after the old one, reading it by DEFAULT).
        let by_name = |storage: &[Stored]| {
            storage
                .iter()
                .rposition(|s| s.attnum.is_none() && s.name == c.name)
        };
        let source = match attnum {
            Some(n) => storage
                .iter()
                .rposition(|s| s.attnum == Some(n))
                .or_else(|| {
                    // An uncommented column no known schema tells about: its name is all there is.
                    let at = by_name(&storage)?;
                    storage[at].attnum = Some(n);
                    if comments {
                        changes.push(Change::Comment {
                            column: c.name.clone(),
                            attnum: n,
                        });
                    }
                    Some(at)
                }),
            None => by_name(&storage),
        };
        let Some(at) = source else {
            if is_key {
                return Err(refuse(
                    &c.name,
                    "absent",
                    &wanted,
                    "a new key column changes the table's order",
                ));
            }
            // Named as the column first was, whatever schema adds it: two sinks adding it at once
            // from different schemas (a rename between) then both name the one column.
            let first_name = attnum
                .and_then(|n| {
                    history
                        .iter()
                        .find_map(|h| h.columns.iter().find(|o| o.attnum == Some(n)))
                })
                .map_or(c.name.as_str(), |o| o.name.as_str());
            let name = free_name(first_name, attnum, &storage);
            let ty = added_column_type(&c.kind, caps);
            changes.push(Change::Add {
                column: name.clone(),
                ty: ty.clone(),
                default: missing_literal(c, caps),
                attnum,
            });
            storage.push(Stored {
                name: name.clone(),
                ty,
                attnum,
                ..Stored::default()
            });
            columns.insert(c.name.clone(), column_of(c, &name));
            written.push(name);
            continue;
        };
        let have = storage[at].clone();
        match reconcile(&have.ty, &wanted) {
            Reconcile::Keep => {}
            Reconcile::Modify(_) if is_key => {
                return Err(refuse(
                    &c.name,
                    &have.ty,
                    &wanted,
                    "a key column's type cannot change in ClickHouse",
                ))
            }
            Reconcile::Modify(to) => {
                changes.push(Change::Modify {
                    column: have.name.clone(),
                    from: have.ty.clone(),
                    to: to.clone(),
                    default: Some(have.default.clone()).filter(|d| !d.is_empty()),
                });
                storage[at].ty = to;
            }
            Reconcile::Refuse => {
                return Err(refuse(
                    &c.name,
                    &have.ty,
                    &format!("{} ({wanted})", c.type_name),
                    "ClickHouse cannot convert the stored values to the new type without loss",
                ))
            }
        }
        columns.insert(c.name.clone(), column_of(c, &have.name));
        written.push(have.name);
    }
    // The key is the table's ORDER BY, by the columns that hold the key's attnums: a renamed key
    // column is the same key, and rows of a schema with another key cannot be told apart in it.
    let ordered_by: Vec<&str> = existing
        .iter()
        .filter(|s| s.in_key)
        .map(|s| s.name.as_str())
        .collect();
    if !ordered_by.is_empty() {
        let mut ours: Vec<&str> = key_names
            .iter()
            .filter_map(|k| columns.get(*k).map(|c: &Column| &*c.ch_name))
            .collect();
        let mut theirs = ordered_by.clone();
        ours.sort_unstable();
        theirs.sort_unstable();
        if ours != theirs {
            return Err(refuse(
                &key_names.join(", "),
                &format!("ordered by ({})", ordered_by.join(", ")),
                &format!("primary key ({})", key_names.join(", ")),
                "a ClickHouse table's key cannot change",
            ));
        }
    }
    // Columns the schema no longer has stay; new rows leave them out, so they must take a default.
    for s in storage.iter_mut() {
        if written.contains(&s.name) {
            continue;
        }
        let (_, nullable) = split_nullable(&s.ty);
        if !nullable && !s.ty.starts_with("Array(") {
            let to = format!("Nullable({})", s.ty);
            changes.push(Change::Modify {
                column: s.name.clone(),
                from: s.ty.clone(),
                to: to.clone(),
                default: Some(s.default.clone()).filter(|d| !d.is_empty()),
            });
            s.ty = to;
        }
    }
    if existing.is_empty() {
        storage = rel
            .columns
            .iter()
            .map(|c| Stored {
                name: c.name.clone(),
                attnum: c.attnum,
                ..Stored::default()
            })
            .collect();
    }
    Ok(Plan {
        changes,
        view: view_columns(&storage, rel, history),
        state: Arc::new(TableState {
            names: names.clone(),
            caps,
            columns,
            key: key_names.iter().map(|k| k.to_string()).collect(),
        }),
    })
}

fn column_of(c: &crate::types::ColumnSchema, ch_name: &str) -> Column {
    Column {
        ch_name: Arc::from(ch_name),
        kind: c.kind.clone(),
    }
}

#[cfg(test)]
#[path = "evolve_tests.rs"]
mod tests;
