//! PostgreSQL column types: what a relation looks like, and the two type mappings.
//!
//! Issue #12 makes the relay carry any table. This module is the part of that which needs no
//! services: the table's shape as data ([`RelationSchema`]), the classification of a column's type
//! ([`PgType`]), and the two mappings, each one table in one place:
//!
//! - [`to_json`]: a value as PostgreSQL prints it (pgoutput text, `::text`) → the JSON in the message;
//! - [`clickhouse_type`] / [`clickhouse_json`]: the column type ClickHouse gets, and the message JSON
//!   → the JSON a `JSONEachRow` insert into that column takes.
//!
//! docs/type-mapping.md shows both tables; the tests here are the reference for every row of them.
//! Nothing here talks to a server: the caller reads the catalog and the server version.

mod array;
mod bytea;
pub mod canonical;
mod clickhouse;
pub(crate) mod datetime;
mod json;
mod kind;
#[cfg(test)]
mod round_trip;

use serde::{Deserialize, Serialize};

pub use array::{format_array, parse_array, ArrayElem};
pub use clickhouse::{clickhouse_json, clickhouse_json_text, clickhouse_type, ServerCaps};
pub use json::to_json;
pub use kind::{oid, PgType};

/// A table as the stream publishes it to the sink, before the rows that need it.
///
/// Serialised as JSON (the schema record), e.g.
///
/// ```json
/// {"schema":"public","table":"orders",
///  "columns":[
///    {"name":"id","type_oid":20,"type_name":"bigint","typmod":-1,"nullable":false,"kind":{"type":"int8"}},
///    {"name":"price","type_oid":1700,"type_name":"numeric(10,2)","typmod":655366,"nullable":true,
///     "kind":{"type":"numeric","precision":10,"scale":2}},
///    {"name":"tags","type_oid":1009,"type_name":"text[]","typmod":-1,"nullable":true,
///     "kind":{"type":"array","element":{"type":"text"}}}],
///  "key":[0]}
/// ```
///
/// - `columns` are in the table's attribute order (pgoutput's Relation message order);
/// - `key` holds indexes into `columns`, in the primary key's order (composite keys have several);
/// - `type_name` is `format_type(atttypid, atttypmod)`, kept for people and for `status`; the code
///   decides by `kind`, which carries what the mappings need (typmod already decoded);
/// - `type_oid` and `typmod` are PostgreSQL's raw values, kept so a later release can re-classify.
///
/// Readers ignore fields they do not know, as for the change message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelationSchema {
    pub schema: String,
    pub table: String,
    pub columns: Vec<ColumnSchema>,
    pub key: Vec<usize>,
}

/// One column of a [`RelationSchema`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnSchema {
    pub name: String,
    pub type_oid: u32,
    /// `format_type` output: `numeric(10,2)`, `character varying(20)`, `integer[]`, `mood`.
    pub type_name: String,
    /// PostgreSQL's `atttypmod`; -1 when the type has none.
    pub typmod: i32,
    pub nullable: bool,
    pub kind: PgType,
    /// `pg_attribute.attnum` when the catalog knew the column: it stays with a column across a
    /// `RENAME COLUMN`, so a reader can tell a rename from a drop and an add.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attnum: Option<i16>,
    /// What rows stored before the column was added read (PostgreSQL's fast default,
    /// `attmissingval`), as PostgreSQL prints it: `ADD COLUMN … DEFAULT 'x'` writes no row
    /// change for the rows already there, so a reader must fill them from this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing: Option<String>,
}

impl ColumnSchema {
    /// A column of a builtin type (or one classified by name, like citext), classified from the
    /// catalog's values. Enums and domains need the catalog's `typtype`: build `kind` for them with
    /// [`PgType::Enum`] / [`PgType::Domain`] instead.
    pub fn builtin(
        name: &str,
        type_oid: u32,
        typmod: i32,
        type_name: &str,
        nullable: bool,
    ) -> Self {
        ColumnSchema {
            name: name.to_owned(),
            type_oid,
            type_name: type_name.to_owned(),
            typmod,
            nullable,
            kind: PgType::from_catalog(type_oid, typmod, type_name),
            attnum: None,
            missing: None,
        }
    }
}

impl RelationSchema {
    /// Names this schema in message headers and in the schemas topic: FNV-1a (64 bits) of its
    /// JSON, as 16 hex digits. Equal schemas get the same id in every process and release, so
    /// a restarted stream re-publishes under the id it used before.
    pub fn id(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for b in json {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{hash:016x}")
    }

    /// `schema.table`, unquoted.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    /// The key columns, in key order; `None` if `key` points past `columns` (a malformed record).
    pub fn key_columns(&self) -> Option<Vec<&ColumnSchema>> {
        self.key.iter().map(|&i| self.columns.get(i)).collect()
    }
}

/// A value that does not fit its column's type mapping. Never a panic: every input either maps or
/// gives this, so the caller can dead-letter the row and go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("column {}: {type_name} value {excerpt:?}: {reason}", column.as_deref().unwrap_or("?"))]
pub struct TypeError {
    /// Set by the caller, who knows the column ([`TypeError::in_column`]).
    pub column: Option<String>,
    /// The PostgreSQL type (its [`PgType`] name, e.g. `timestamptz`, `int4[]`).
    pub type_name: String,
    /// The start of the value (at most 64 characters): enough to find it, never a whole 1 MB jsonb.
    pub excerpt: String,
    pub reason: String,
}

impl TypeError {
    const EXCERPT_CHARS: usize = 64;

    pub(crate) fn new(kind: &PgType, value: &str, reason: impl Into<String>) -> Self {
        let mut excerpt: String = value.chars().take(Self::EXCERPT_CHARS).collect();
        if value.chars().nth(Self::EXCERPT_CHARS).is_some() {
            excerpt.push('…');
        }
        TypeError {
            column: None,
            type_name: kind.label(),
            excerpt,
            reason: reason.into(),
        }
    }

    pub fn in_column(mut self, column: &str) -> Self {
        self.column = Some(column.to_owned());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_record_json_shape() {
        let rel = RelationSchema {
            schema: "public".into(),
            table: "orders".into(),
            columns: vec![
                ColumnSchema::builtin("id", 20, -1, "bigint", false),
                ColumnSchema::builtin("price", 1700, (10 << 16) + 2 + 4, "numeric(10,2)", true),
                ColumnSchema::builtin("tags", 1009, -1, "text[]", true),
            ],
            key: vec![0],
        };
        let json = serde_json::to_string(&rel).unwrap();
        assert_eq!(
            json,
            r#"{"schema":"public","table":"orders","columns":[{"name":"id","type_oid":20,"type_name":"bigint","typmod":-1,"nullable":false,"kind":{"type":"int8"}},{"name":"price","type_oid":1700,"type_name":"numeric(10,2)","typmod":655366,"nullable":true,"kind":{"type":"numeric","precision":10,"scale":2}},{"name":"tags","type_oid":1009,"type_name":"text[]","typmod":-1,"nullable":true,"kind":{"type":"array","element":{"type":"text"}}}],"key":[0]}"#
        );
        let back: RelationSchema = serde_json::from_str(&json).unwrap();
        assert_eq!(back, rel);
        // The id is a pure function of the record: stable across processes and releases.
        assert_eq!(rel.id(), back.id());
        assert_eq!(rel.id().len(), 16);
        let mut renamed = rel.clone();
        renamed.columns[1].name = "cost".into();
        assert_ne!(renamed.id(), rel.id());
        assert_eq!(back.key_columns().unwrap()[0].name, "id");
    }

    #[test]
    fn bad_key_index_is_none_not_a_panic() {
        let rel = RelationSchema {
            schema: "s".into(),
            table: "t".into(),
            columns: vec![],
            key: vec![3],
        };
        assert!(rel.key_columns().is_none());
    }

    #[test]
    fn error_excerpt_is_bounded() {
        let long = "x".repeat(10_000);
        let e = TypeError::new(&PgType::Int4, &long, "not an integer").in_column("n");
        assert_eq!(e.excerpt.chars().count(), 65);
        assert!(e.to_string().starts_with("column n: int4 value "));
    }
}
