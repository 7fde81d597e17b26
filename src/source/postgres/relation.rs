//! A relayed table's shape as data: its [`RelationSchema`] read from the catalog, and the
//! conversion of one tuple (pgoutput's, or the backfill's text columns) into a [`ChangeEvent`].
//!
//! Both paths go through [`RelationShape::event`], so a row reads the same whichever way it came.
//! The column list is the tuple's own (pgoutput's Relation message, or the backfill's select list):
//! the catalog only adds what the tuple does not carry (nullability, type names, enum and domain
//! kinds, the primary key), and is read when the shape is made, which may be after the WAL position
//! of the tuples. A column the catalog no longer has (dropped or renamed since) keeps the type the
//! tuple names and counts as nullable.

use std::sync::Arc;

use tokio_postgres::Client;

use crate::event::{format_event_time, parse_event_time, ChangeEvent, Columns, Lsn, Op, Row};
use crate::event::{RowKey, SeedRow};
use crate::types::{to_json, ColumnSchema, PgType, RelationSchema};

use super::pgoutput::Value;
use super::SourceError;

/// A column as the tuple carries it: name, type OID and typmod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TupleColumn {
    pub name: String,
    pub type_oid: u32,
    pub typmod: i32,
    /// Part of the replica identity by the Relation message's flags (`None` from the catalog).
    pub identity: Option<bool>,
    /// The type's name as a Type message gave it, for a type the catalog no longer has.
    pub type_hint: Option<String>,
}

/// The seed's columns, whose values travel under the seed's field names.
const SEED_COLUMNS: [&str; 3] = ["username", "event_type", "event_time"];

/// Reads from the catalog what the mappings need about `columns` of relation `oid`, and which of
/// them form the primary key. `ledger_column` is the relay's bookkeeping, not part of the schema.
pub async fn describe(
    sql: &Client,
    oid: u32,
    namespace: &str,
    name: &str,
    columns: &[TupleColumn],
    ledger_column: Option<&str>,
    seed: SeedMode,
) -> Result<RelationShape, SourceError> {
    let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
    let oids: Vec<u32> = columns.iter().map(|c| c.type_oid).collect();
    let typmods: Vec<i32> = columns.iter().map(|c| c.typmod).collect();
    // One row per tuple column, in its order. Domains and enums need `typtype`; a domain is
    // classified as its base type (one level: a domain over a domain maps as text).
    let rows = sql
        .query(
            "SELECT c.name, format_type(c.typid, c.typmod), t.typtype::text, \
                    t.typbasetype, t.typtypmod, format_type(t.typbasetype, t.typtypmod), \
                    coalesce(NOT a.attnotnull, true), a.attnum, \
                    array_position(pk.indkey::int2[], a.attnum), \
                    CASE WHEN a.atthasmissing THEN a.attmissingval::text END \
             FROM unnest($2::text[], $3::oid[], $4::int4[]) WITH ORDINALITY AS c(name, typid, typmod, ord) \
             LEFT JOIN pg_type t ON t.oid = c.typid \
             LEFT JOIN pg_attribute a ON a.attrelid = $1 AND a.attname = c.name \
                                      AND a.attnum > 0 AND NOT a.attisdropped \
             LEFT JOIN pg_index pk ON pk.indrelid = $1 AND pk.indisprimary \
             ORDER BY c.ord",
            &[&oid, &names, &oids, &typmods],
        )
        .await
        .map_err(SourceError::sql(format!(
            "reading the column types of {namespace}.{name}"
        )))?;
    if rows.len() != columns.len() {
        return Err(SourceError::Schema {
            table: format!("{namespace}.{name}"),
            reason: format!(
                "the catalog describes {} of its {} columns (a type was dropped?)",
                rows.len(),
                columns.len()
            ),
        });
    }
    let mut described = Vec::with_capacity(columns.len());
    let mut key: Vec<(i32, usize)> = Vec::new();
    // A Relation message of a change written before the table's key columns were renamed names
    // them as they were; its flags still tell them (with REPLICA IDENTITY FULL every column is
    // flagged, so there the catalog's primary key decides).
    let flagged: Vec<usize> = (0..columns.len())
        .filter(|&i| columns[i].identity == Some(true))
        .collect();
    let from_flags = !flagged.is_empty() && flagged.len() < columns.len();
    for (i, (col, row)) in columns.iter().zip(&rows).enumerate() {
        let typtype: Option<String> = row.get(2);
        let Some(typtype) = typtype else {
            // The type is gone from the catalog (a historic change of a column whose type a later
            // migration dropped, as the enum-swap migration does): its values are text.
            let name = col
                .type_hint
                .clone()
                .unwrap_or_else(|| format!("type {}", col.type_oid));
            if from_flags && col.identity == Some(true) {
                key.push((i32::MAX, i));
            }
            described.push(ColumnSchema {
                name: col.name.clone(),
                type_oid: col.type_oid,
                type_name: name.clone(),
                typmod: col.typmod,
                nullable: true,
                attnum: row.get(7),
                missing: None,
                kind: PgType::Other { name },
            });
            continue;
        };
        let type_name: String = row.get(1);
        let kind = match typtype.as_str() {
            "e" => PgType::Enum {
                name: type_name.clone(),
            },
            "d" => PgType::Domain {
                name: type_name.clone(),
                base: Box::new(PgType::from_catalog(row.get(3), row.get(4), row.get(5))),
            },
            _ => PgType::from_catalog(col.type_oid, col.typmod, &type_name),
        };
        let pk_position = row.get::<_, Option<i32>>(8);
        if from_flags {
            if col.identity == Some(true) {
                key.push((pk_position.unwrap_or(i32::MAX), i));
            }
        } else if let Some(pos) = pk_position {
            key.push((pos, i));
        }
        described.push(ColumnSchema {
            name: col.name.clone(),
            type_oid: col.type_oid,
            type_name,
            typmod: col.typmod,
            nullable: row.get(6),
            attnum: row.get(7),
            missing: row
                .get::<_, Option<String>>(9)
                .and_then(|one| missing_value(&one)),
            kind,
        });
    }
    key.sort_unstable();
    let key: Vec<usize> = key.into_iter().map(|(_, i)| i).collect();
    RelationShape::new(namespace, name, described, key, ledger_column, seed)
}

/// Whether a table's changes travel in the seed's message form: a property of the seed's table
/// (the seed's contract), never of a table's column names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeedMode {
    /// Not the seed's table: the columns form, whatever its columns.
    Never,
    /// The seed's table, its form not decided yet: the seed's form if it has the seed's shape.
    IfShaped,
    /// The seed's table, started in the seed's form: a shape without it is refused (its changes
    /// go to the stream's dead-letter topic, saying why) rather than switching form under the
    /// sink, which writes the seed's form into its own table.
    Required,
}

/// The tuple indexes of `username`, `event_type` and `event_time` when the table has the seed's
/// shape: an integer key `id`, `username` and `event_type` (their text travels, whatever the type:
/// an enum is common) and a `timestamp` `event_time` (a timestamptz or date is not the seed's).
fn seed_shape(columns: &[ColumnSchema], key: &[usize], int_key: bool) -> Option<[usize; 3]> {
    if !int_key || columns[key[0]].name != "id" {
        return None;
    }
    let find = |n: &str| columns.iter().position(|c| c.name == n);
    let [u, e, t] = SEED_COLUMNS.map(find);
    let (u, e, t) = (u?, e?, t?);
    let time = matches!(columns[t].kind.resolved(), PgType::Timestamp);
    time.then_some([u, e, t])
}

/// The element of `attmissingval`, a one-element array literal of the column's type (`{dflt}`,
/// `{"a b"}`), as the column's own text; `None` for NULL or what does not parse.
fn missing_value(array: &str) -> Option<String> {
    let elem = PgType::Array {
        element: Box::new(PgType::Text),
    };
    match crate::types::to_json(&elem, array).ok()? {
        serde_json::Value::Array(mut v) if v.len() == 1 => match v.pop()? {
            serde_json::Value::String(s) => Some(s),
            _ => None,
        },
        _ => None,
    }
}

/// How one relation's tuples become events.
#[derive(Debug, Clone)]
pub struct RelationShape {
    /// What the stream publishes: every column but the ledger's.
    schema: Arc<RelationSchema>,
    /// Tuple index → index in `schema.columns`; `None` for the ledger column.
    slots: Vec<Option<usize>>,
    /// Tuple indexes of the primary key, in key order.
    key: Vec<usize>,
    /// The key is one integer column: ledger and backfill key rows by it.
    int_key: bool,
    /// The seed's shape (`id` integer key, `username`, `event_type`, `event_time`): the tuple
    /// indexes of the three, and the seed's message form.
    seed: Option<[usize; 3]>,
    /// Why this shape's changes are not relayed (the seed's table lost its shape).
    refusal: Option<String>,
}

impl RelationShape {
    /// `columns` in tuple order; `key` indexes them in key order.
    pub fn new(
        namespace: &str,
        name: &str,
        columns: Vec<ColumnSchema>,
        key: Vec<usize>,
        ledger_column: Option<&str>,
        seed_mode: SeedMode,
    ) -> Result<Self, SourceError> {
        let table = format!("{namespace}.{name}");
        if key.is_empty() {
            return Err(SourceError::Schema {
                table,
                reason: "has no primary key; every message, the ClickHouse table's ORDER BY and the ledger are keyed by it. Add one: ALTER TABLE … ADD PRIMARY KEY (…)".into(),
            });
        }
        let int_key = key.len() == 1
            && matches!(
                columns[key[0]].kind.resolved(),
                PgType::Int2 | PgType::Int4 | PgType::Int8
            );
        let shaped = seed_shape(&columns, &key, int_key);
        let (seed, refusal) = match seed_mode {
            SeedMode::Never => (None, None),
            SeedMode::IfShaped => (shaped, None),
            SeedMode::Required => match shaped {
                Some(s) => (Some(s), None),
                None => (None, Some(format!(
                    "is the seed's table and no longer has the seed's shape (an integer key `id`, `username`, `event_type`, `event_time` timestamp) its messages and ClickHouse table have: its changes go to the stream's dead-letter topic while other tables flow. Restore the columns, or relay it as any table: stop the stream, point --seed-table elsewhere, move the ClickHouse table `{name}` of the seed's form aside (the sink's --clickhouse-table), and start again"
                ))),
            },
        };
        let mut slots = Vec::with_capacity(columns.len());
        let mut published = Vec::with_capacity(columns.len());
        let mut published_key = Vec::with_capacity(key.len());
        for (i, c) in columns.into_iter().enumerate() {
            if Some(c.name.as_str()) == ledger_column && !key.contains(&i) {
                slots.push(None);
                continue;
            }
            if let Some(k) = key.iter().position(|&k| k == i) {
                published_key.push((k, published.len()));
            }
            slots.push(Some(published.len()));
            published.push(c);
        }
        published_key.sort_unstable();
        Ok(RelationShape {
            schema: Arc::new(RelationSchema {
                schema: namespace.to_owned(),
                table: name.to_owned(),
                columns: published,
                key: published_key.into_iter().map(|(_, i)| i).collect(),
            }),
            slots,
            key,
            int_key,
            seed,
            refusal,
        })
    }

    pub fn schema(&self) -> &Arc<RelationSchema> {
        &self.schema
    }

    /// Tuple indexes of the primary key's columns, in key order.
    pub fn key_indexes(&self) -> &[usize] {
        &self.key
    }

    /// The index in [`Self::schema`]'s columns of tuple column `tuple_index`.
    pub fn slot_of(&self, tuple_index: usize) -> Option<usize> {
        self.slots.get(tuple_index).copied().flatten()
    }

    /// The key is one integer column (what the ledger and the backfill need).
    pub fn has_int_key(&self) -> bool {
        self.int_key
    }

    /// The seed's shape: its changes travel in the seed's message form, into the sink's
    /// `--clickhouse-table`.
    pub fn is_seed_shape(&self) -> bool {
        self.seed.is_some()
    }

    fn column(&self, tuple_index: usize) -> Option<&ColumnSchema> {
        self.slots
            .get(tuple_index)
            .copied()
            .flatten()
            .map(|i| &self.schema.columns[i])
    }

    /// The tuple's key, if it carries one that reads.
    pub fn key_of(&self, values: &[Value]) -> Option<RowKey> {
        self.key_value(values).ok()
    }

    /// Whether the two tuples name different keys (an UPDATE that moved the row).
    pub fn key_changed(&self, old: &[Value], new: &[Value]) -> bool {
        self.key.iter().any(|&i| {
            let (was, is) = (old.get(i), new.get(i));
            matches!(was, Some(Value::Text(_))) && was != is
        })
    }

    fn key_value(&self, values: &[Value]) -> Result<RowKey, SourceError> {
        let mut parts = Vec::with_capacity(self.key.len());
        for &i in &self.key {
            let col = self.column(i).ok_or_else(|| self.null_key())?;
            let text = match values.get(i) {
                Some(v @ Value::Text(_)) => v.as_text().ok_or_else(|| self.not_utf8(&col.name))?,
                _ => return Err(self.null_key()),
            };
            if self.int_key {
                return text
                    .parse::<i64>()
                    .map(RowKey::Int)
                    .map_err(|e| SourceError::Type(type_error(col, text, e.to_string())));
            }
            let value = to_json(&col.kind, text).map_err(|e| in_column(e, col))?;
            parts.push((col.name.clone(), value));
        }
        if parts.len() == 1 {
            return Ok(RowKey::Json(parts.pop().expect("one part").1));
        }
        Ok(RowKey::Json(serde_json::Value::Object(
            parts.into_iter().collect(),
        )))
    }

    fn not_utf8(&self, column: &str) -> SourceError {
        SourceError::Schema {
            table: self.schema.qualified_name(),
            reason: format!("column {column}: text value is not UTF-8"),
        }
    }

    fn null_key(&self) -> SourceError {
        SourceError::Schema {
            table: self.schema.qualified_name(),
            reason: "a change without its primary key values".into(),
        }
    }

    /// The tuple as JSON text for a dead letter: each column's text (lossy UTF-8), `null`, or
    /// `"(unchanged)"`, so an operator can see what could not be relayed.
    pub fn describe(&self, values: &[Value]) -> String {
        let mut row = serde_json::Map::new();
        for (i, v) in values.iter().enumerate() {
            let Some(col) = self.column(i) else { continue };
            let v = match v {
                Value::Null => serde_json::Value::Null,
                Value::UnchangedToast => "(unchanged)".into(),
                Value::Text(b) | Value::Binary(b) => String::from_utf8_lossy(b).into_owned().into(),
            };
            row.insert(col.name.clone(), v);
        }
        serde_json::Value::Object(row).to_string()
    }

    /// The event of one row change. `version` orders changes of the same key (see event.rs).
    /// A delete carries only its key columns (the rest of its tuple is NULL).
    pub fn event(
        &self,
        op: Op,
        values: &[Value],
        lsn: Lsn,
        version: u64,
    ) -> Result<ChangeEvent, SourceError> {
        if let Some(reason) = &self.refusal {
            return Err(SourceError::Schema {
                table: self.schema.qualified_name(),
                reason: reason.clone(),
            });
        }
        let key = self.key_value(values)?;
        let mut unchanged = Vec::new();
        let mut json_null = Vec::new();
        let mut columns: Columns = Vec::with_capacity(self.schema.columns.len());
        let mut seed_text: [Option<&str>; 3] = [None; 3];
        for (i, v) in values.iter().enumerate() {
            let Some(col) = self.column(i) else { continue };
            if op == Op::Delete && !self.key.contains(&i) {
                continue;
            }
            let seed_field = self.seed.and_then(|s| s.iter().position(|&x| x == i));
            if seed_field.is_none() && self.seed.is_some() && i == self.key[0] {
                continue; // the seed's `id`
            }
            let value = match v {
                Value::Null => serde_json::Value::Null,
                Value::UnchangedToast => {
                    unchanged.push(col.name.clone());
                    serde_json::Value::Null
                }
                Value::Text(_) => {
                    let text = v.as_text().ok_or_else(|| self.not_utf8(&col.name))?;
                    if let Some(f) = seed_field {
                        seed_text[f] = Some(text);
                        continue;
                    }
                    let value = to_json(&col.kind, text).map_err(|e| in_column(e, col))?;
                    if value.is_null()
                        && matches!(col.kind.resolved(), PgType::Json | PgType::Jsonb)
                    {
                        json_null.push(col.name.clone());
                    }
                    value
                }
                Value::Binary(_) => {
                    return Err(SourceError::Type(type_error(
                        col,
                        "",
                        "binary value in a text-mode stream".into(),
                    )))
                }
            };
            if seed_field.is_none() {
                columns.push((col.name.clone(), value));
            }
        }
        let row = match self.seed {
            None => Row::Columns(columns),
            Some(_) => Row::Seed(seed_row(seed_text, columns)?),
        };
        Ok(ChangeEvent {
            key: Some(key),
            op,
            row,
            lsn: lsn.to_string(),
            version,
            unchanged,
            json_null,
            moved_from: None,
            schema: Some(self.schema.clone()),
        })
    }

    /// The event of a TRUNCATE of this relation.
    pub fn truncate(&self, lsn: Lsn, version: u64) -> ChangeEvent {
        let row = match self.seed {
            Some(_) => Row::Seed(SeedRow::default()),
            // The seed's table without its shape: a truncate of it is still the seed table's.
            None if self.refusal.is_some() => Row::Seed(SeedRow::default()),
            None => Row::Columns(Vec::new()),
        };
        ChangeEvent {
            key: None,
            op: Op::Truncate,
            row,
            lsn: lsn.to_string(),
            version,
            unchanged: Vec::new(),
            json_null: Vec::new(),
            moved_from: None,
            schema: Some(self.schema.clone()),
        }
    }
}

/// The seed's fields from the text of `username`, `event_type` and `event_time`.
fn seed_row(text: [Option<&str>; 3], extra: Columns) -> Result<SeedRow, SourceError> {
    let [username, event_type, event_time] = text;
    let (timestamp, event_time) = match event_time {
        None => (None, None),
        Some(text) => match parse_event_time(text).map_err(|e| SourceError::Value {
            column: "event_time",
            reason: e.to_string(),
        })? {
            Some(us) => (Some(us as f64 / 1e6), Some(format_event_time(us))),
            None => (None, Some(text.to_string())),
        },
    };
    Ok(SeedRow {
        user: username.map(str::to_string),
        event: event_type.map(str::to_string),
        timestamp,
        event_time,
        extra,
    })
}

fn type_error(col: &ColumnSchema, text: &str, reason: String) -> crate::types::TypeError {
    crate::types::TypeError::new(&col.kind, text, reason).in_column(&col.name)
}

fn in_column(e: crate::types::TypeError, col: &ColumnSchema) -> SourceError {
    SourceError::Type(e.in_column(&col.name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn text(s: &str) -> Value {
        Value::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn seed_shape() -> RelationShape {
        let cols = vec![
            ColumnSchema::builtin("id", 23, -1, "integer", false),
            ColumnSchema::builtin("username", 1043, 54, "character varying(50)", true),
            ColumnSchema::builtin("event_type", 1043, 54, "character varying(50)", true),
            ColumnSchema::builtin("event_time", 1114, -1, "timestamp without time zone", true),
            ColumnSchema::builtin("sent_to_kafka", 16, -1, "boolean", true),
        ];
        RelationShape::new(
            "public",
            "user_logins",
            cols,
            vec![0],
            Some("sent_to_kafka"),
            SeedMode::IfShaped,
        )
        .unwrap()
    }

    #[test]
    fn the_seed_table_keeps_its_form_byte_for_byte() {
        let shape = seed_shape();
        let values = [
            text("3"),
            text("user3"),
            text("login"),
            text("2023-01-01 00:00:00.000001"),
            text("f"),
        ];
        let e = shape.event(Op::Insert, &values, Lsn(0x100), 0x100).unwrap();
        assert_eq!(
            String::from_utf8(e.to_json()).unwrap(),
            r#"{"id":3,"op":"insert","user":"user3","event":"login","timestamp":1672531200.000001,"event_time":"2023-01-01T00:00:00.000001","lsn":"0/100","version":256}"#
        );
        assert_eq!(
            shape.schema().columns.len(),
            4,
            "the ledger column is not published"
        );
        assert!(shape.has_int_key());
        let bad = [
            text("x"),
            Value::Null,
            Value::Null,
            Value::Null,
            Value::Null,
        ];
        assert!(shape.event(Op::Insert, &bad, Lsn(1), 1).is_err());
    }

    #[test]
    fn a_column_added_to_the_seed_table_travels_under_its_name() {
        let mut cols = seed_shape().schema().columns.clone();
        cols.push(ColumnSchema::builtin("country", 25, -1, "text", true));
        let shape = RelationShape::new(
            "public",
            "user_logins",
            cols,
            vec![0],
            None,
            SeedMode::IfShaped,
        )
        .unwrap();
        let values = [text("1"), Value::Null, Value::Null, Value::Null, text("NL")];
        let e = shape.event(Op::Insert, &values, Lsn(1), 1).unwrap();
        assert!(String::from_utf8(e.to_json())
            .unwrap()
            .ends_with(r#""version":1,"columns":{"country":"NL"}}"#));
    }

    #[test]
    fn any_table_travels_with_every_column_and_its_key() {
        let cols = vec![
            ColumnSchema::builtin("tenant", 20, -1, "bigint", false),
            ColumnSchema::builtin("code", 25, -1, "text", false),
            ColumnSchema::builtin("price", 1700, (10 << 16) + 2 + 4, "numeric(10,2)", true),
            ColumnSchema::builtin("doc", 3802, -1, "jsonb", true),
        ];
        let shape =
            RelationShape::new("app", "items", cols, vec![1, 0], None, SeedMode::IfShaped).unwrap();
        assert!(!shape.has_int_key());
        assert_eq!(shape.schema().key, vec![1, 0]);
        let values = [
            text("9007199254740993"),
            text("a"),
            text("12.30"),
            Value::UnchangedToast,
        ];
        let e = shape.event(Op::Update, &values, Lsn(16), 16).unwrap();
        assert_eq!(
            String::from_utf8(e.to_json()).unwrap(),
            r#"{"op":"update","lsn":"0/10","version":16,"columns":{"tenant":9007199254740993,"code":"a","price":"12.30","doc":null},"unchanged":["doc"]}"#
        );
        assert_eq!(
            e.key().as_deref(),
            Some(r#"{"code":"a","tenant":9007199254740993}"#)
        );
        let delete = shape
            .event(
                Op::Delete,
                &[text("1"), text("b"), Value::Null, Value::Null],
                Lsn(16),
                16,
            )
            .unwrap();
        assert_eq!(
            delete.row,
            Row::Columns(vec![
                ("tenant".into(), 1.into()),
                ("code".into(), "b".into())
            ])
        );
        let bad = [text("1"), text("b"), text("not a number"), Value::Null];
        let err = shape.event(Op::Insert, &bad, Lsn(1), 1).unwrap_err();
        assert!(err.to_string().contains("price"), "{err}");
    }

    #[test]
    fn a_table_without_a_primary_key_is_refused_with_the_fix() {
        let cols = vec![ColumnSchema::builtin("a", 23, -1, "integer", true)];
        let err =
            RelationShape::new("public", "t", cols, vec![], None, SeedMode::Never).unwrap_err();
        assert!(err.to_string().contains("ADD PRIMARY KEY"), "{err}");
    }
}
