//! Which storage column holds which PostgreSQL column. A column is its `attnum`: each storage
//! column records it (and its source table) in its ClickHouse comment and keeps the name it was
//! created with; the current-rows view shows the newest PostgreSQL name of each. Where there are
//! no comments (tables of earlier releases; clusters, whose 18.16 replicated tables refuse them)
//! the attnums are inferred from the names. [`super::evolve`] plans with these.

use std::sync::Arc;

use crate::types::{ColumnSchema, RelationSchema};

use super::table::is_meta;

/// One storage column as `system.columns` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stored {
    pub name: String,
    pub ty: String,
    /// `default_expression`, empty when none.
    pub default: String,
    /// The PostgreSQL column it holds, from its comment.
    pub attnum: Option<i16>,
    /// The PostgreSQL table it holds a column of, from its comment (`schema.table`).
    pub source: Option<String>,
    /// Part of the table's ORDER BY: the key rows are told apart by.
    pub in_key: bool,
}

impl Stored {
    pub fn new(name: &str, ty: &str) -> Self {
        Stored {
            name: name.to_string(),
            ty: ty.to_string(),
            ..Stored::default()
        }
    }

    /// From `system.columns`' name, type, default_expression and comment.
    pub fn from_catalog(
        name: String,
        ty: String,
        default: String,
        comment: &str,
        in_key: bool,
    ) -> Self {
        let (attnum, source) = parse_comment(comment);
        Stored {
            name,
            ty,
            default,
            attnum,
            source,
            in_key,
        }
    }
}

/// The comment that records which PostgreSQL column (and of which table) a storage column holds.
pub fn attnum_comment(attnum: i16, source: Option<&str>) -> String {
    match source {
        Some(s) => format!("PostgreSQL attnum {attnum} of {s}"),
        None => format!("PostgreSQL attnum {attnum}"),
    }
}

fn parse_comment(comment: &str) -> (Option<i16>, Option<String>) {
    let Some(rest) = comment.strip_prefix("PostgreSQL attnum ") else {
        return (None, None);
    };
    match rest.split_once(" of ") {
        Some((n, source)) => (n.trim().parse().ok(), Some(source.to_string())),
        None => (rest.trim().parse().ok(), None),
    }
}

/// Whether two schemas of a table have the same key: the same columns, by attnum where both know
/// it (a renamed key column is the same key).
pub fn same_key(a: &RelationSchema, b: &RelationSchema) -> bool {
    let (Some(ka), Some(kb)) = (a.key_columns(), b.key_columns()) else {
        return false;
    };
    ka.len() == kb.len()
        && ka.iter().zip(&kb).all(|(x, y)| match (x.attnum, y.attnum) {
            (Some(m), Some(n)) => m == n,
            _ => x.name == y.name,
        })
}

/// `c`'s attnum; for a column a historic schema described without one (the catalog no longer
/// had its name when the stream replayed it), the attnum its name had in the newest schema that
/// knew it.
pub(super) fn attnum_in(c: &ColumnSchema, history: &[Arc<RelationSchema>]) -> Option<i16> {
    c.attnum.or_else(|| {
        history
            .iter()
            .rev()
            .find_map(|h| h.columns.iter().find(|o| o.name == c.name)?.attnum)
    })
}

/// The attnum an uncommented column (of an earlier release's table, or on a cluster) holds: the
/// one its `<name>__<attnum>` says when a schema gave that name that attnum (a column added while
/// its name was taken), else its name's in the oldest schema that has the name (`newest`: in the
/// newest, for tables an earlier release renamed columns of). Storage columns are never renamed or
/// dropped now, so a plain name was the column's when the table was created or the column added;
/// this is exact unless a name was reused for another column before the table
/// was first created.
pub(super) fn legacy_attnum(
    name: &str,
    history: &[Arc<RelationSchema>],
    newest: bool,
) -> Option<i16> {
    if let Some((base, n)) = name.rsplit_once("__") {
        if let Ok(n) = n.parse::<i16>() {
            let known = history.iter().any(|h| {
                h.columns
                    .iter()
                    .any(|c| c.name == base && c.attnum == Some(n))
            });
            if known {
                return Some(n);
            }
        }
    }
    let attnum_in =
        |h: &Arc<RelationSchema>| h.columns.iter().find(|o| o.name == name).map(|o| o.attnum);
    let found = if newest {
        history.iter().rev().find_map(attnum_in)
    } else {
        history.iter().find_map(attnum_in)
    };
    found.flatten()
}

/// The storage name of a new column: its own, unless a storage column (of a dropped or renamed
/// attnum) has it.
pub(super) fn free_name(name: &str, attnum: Option<i16>, storage: &[Stored]) -> String {
    let taken = |n: &str| storage.iter().any(|s| s.name == n) || is_meta(n);
    if !taken(name) {
        return name.to_string();
    }
    let base = match attnum {
        Some(n) => format!("{name}__{n}"),
        None => format!("{name}__new"),
    };
    let mut candidate = base.clone();
    let mut i = 2;
    while taken(&candidate) {
        candidate = format!("{base}_{i}");
        i += 1;
    }
    candidate
}

/// The view's user columns: each attnum once (its newest storage column), under the newest name
/// the known schemas give it; the columns of live attnums first claim their names, a dropped
/// column whose name a live one took is left out of the view (its values stay in the table).
pub fn view_columns(
    storage: &[Stored],
    rel: &RelationSchema,
    history: &[Arc<RelationSchema>],
) -> Vec<(String, String)> {
    let mut schemas: Vec<&RelationSchema> = history.iter().map(|h| &**h).collect();
    if !history.iter().any(|h| **h == *rel) {
        schemas.push(rel);
    }
    let newest = schemas.last().copied().unwrap_or(rel);
    let newest_name = |n: i16| -> Option<&str> {
        schemas
            .iter()
            .rev()
            .find_map(|h| h.columns.iter().find(|c| c.attnum == Some(n)))
            .map(|c| c.name.as_str())
    };
    let live = |s: &Stored| match s.attnum {
        Some(n) => newest.columns.iter().any(|c| c.attnum == Some(n)),
        None => newest.columns.iter().any(|c| c.name == s.name),
    };
    let shown: Vec<&Stored> = storage
        .iter()
        .enumerate()
        .filter(|(i, s)| {
            s.attnum.is_none() || storage[i + 1..].iter().all(|t| t.attnum != s.attnum)
        })
        .map(|(_, s)| s)
        .collect();
    let mut out: Vec<(String, String)> = Vec::new();
    for pass_live in [true, false] {
        for s in shown.iter().filter(|s| live(s) == pass_live) {
            let label = s
                .attnum
                .and_then(newest_name)
                .unwrap_or(&s.name)
                .to_string();
            if !out.iter().any(|(_, l)| *l == label) {
                out.push((s.name.clone(), label));
            }
        }
    }
    // In table order, as the view showed them before.
    out.sort_by_key(|(n, _)| storage.iter().position(|s| s.name == *n));
    out
}
