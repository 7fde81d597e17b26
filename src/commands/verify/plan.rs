//! What `verify` computes for one table: the SQL of its key text and row hash on both servers, from
//! the table's schema, the ClickHouse view's columns and `types::canonical`.

use crate::sink::clickhouse::config::quote_ident as ch_ident;
use crate::sink::clickhouse::table::TableNames;
use crate::source::postgres::client::quote_ident as pg_ident;
use crate::source::postgres::relation::RelationShape;
use crate::types::canonical::{self, canonical_sql};
use crate::types::{PgType, ServerCaps};

/// One table's comparison.
#[derive(Debug, Clone)]
pub struct TablePlan {
    /// `schema.table`.
    pub name: String,
    /// Quoted for PostgreSQL.
    pub pg_table: String,
    /// The current-rows view.
    pub view: TableNames,
    /// The key is one integer column: its SQL on each side (buckets by range, found by index).
    pub int_key: Option<(String, String)>,
    /// The key's text: the integer, or the key columns' canonical fields.
    pub pg_key: String,
    pub ch_key: String,
    pub pg_hash: String,
    pub ch_hash: String,
    /// Every key column's canonical text is its PostgreSQL text (a deleted key can be named).
    pub key_is_pg_text: bool,
    /// The key columns (quoted, `t.`) and their types, for a filter the primary key's index serves.
    pub pg_key_columns: Vec<(String, String)>,
    /// Columns whose values are not compared, with the reason.
    pub not_compared: Vec<String>,
    /// Columns of the PostgreSQL table that the view does not have.
    pub absent: Vec<String>,
    /// Doubles compared without their last bits (ClickHouse 18.16): the keys that still differ are
    /// compared again with these, one ulp allowed.
    pub loose: Option<Loose>,
}

/// The second look at keys of a table with doubles on ClickHouse 18.16.
#[derive(Debug, Clone)]
pub struct Loose {
    /// The row hash without the doubles.
    pub pg_rest: String,
    pub ch_rest: String,
    /// Each double's exact bits (`NaN`, or NULL / `\N`): (column, PostgreSQL, ClickHouse).
    pub columns: Vec<(String, String, String)>,
}

/// Where a PostgreSQL column is in ClickHouse: its name there and the kind its canonical text
/// is computed for.
fn clickhouse_column(shape: &RelationShape, name: &str, kind: &PgType) -> (String, PgType) {
    // The seed's table keeps `event_time` as DateTime (seconds) and, exactly, as microseconds.
    if shape.is_seed_shape() && name == "event_time" {
        return ("event_time_us".into(), PgType::Timestamp);
    }
    (name.to_string(), kind.clone())
}

impl TablePlan {
    /// `view_columns`: (name, type) of the view, as `system.columns` lists them.
    pub fn new(
        shape: &RelationShape,
        view: TableNames,
        view_columns: &[(String, String)],
        caps: ServerCaps,
    ) -> Result<TablePlan, String> {
        let schema = shape.schema();
        let mut pg_fields = Vec::new();
        let mut ch_fields = Vec::new();
        let mut pg_key_fields = Vec::new();
        let mut ch_key_fields = Vec::new();
        let mut not_compared = Vec::new();
        let mut absent = Vec::new();
        let mut key_is_pg_text = true;
        let mut pg_key_columns = Vec::new();
        let mut rest_pg = Vec::new();
        let mut rest_ch = Vec::new();
        let mut loose = Vec::new();
        for (i, col) in schema.columns.iter().enumerate() {
            let (ch_name, kind) = clickhouse_column(shape, &col.name, &col.kind);
            let Some((_, ch_type)) = view_columns.iter().find(|(n, _)| *n == ch_name) else {
                absent.push(col.name.clone());
                continue;
            };
            // The seed's event_time_us is Int64 microseconds on every server.
            let caps = if ch_name == "event_time_us" {
                ServerCaps::LEGACY
            } else {
                caps
            };
            let nullable = ch_type.starts_with("Nullable(");
            let pg_col = if ch_name == "event_time_us" {
                // The sink stores the seed's ±infinity as NULL there (event.rs parse_event_time).
                format!(
                    "(CASE WHEN isfinite(t.{0}) THEN t.{0} END)",
                    pg_ident(&col.name)
                )
            } else {
                format!("t.{}", pg_ident(&col.name))
            };
            let ch_col = ch_ident(&ch_name);
            let ch_value = if nullable {
                format!("assumeNotNull({ch_col})")
            } else {
                ch_col.clone()
            };
            let canon = match canonical_sql(&kind, &pg_col, &ch_value, caps) {
                Ok(c) if matches!(kind.resolved(), PgType::Json | PgType::Jsonb) => {
                    not_compared.push(format!(
                        "{} ({}): {}",
                        col.name,
                        col.type_name,
                        crate::types::canonical::JSON_COMPARED
                    ));
                    c
                }
                Ok(c) => c,
                Err(reason) => {
                    not_compared.push(format!("{} ({}): {reason}", col.name, col.type_name));
                    continue;
                }
            };
            let is_array = matches!(kind.resolved(), PgType::Array { .. });
            let pg_field = if is_array {
                // Never NULL (see types::canonical): a field like any non-NULL one.
                format!("octet_length({0})::text || ':' || {0}", canon.postgres)
            } else {
                canonical::pg_field(&pg_col, &canon.postgres)
            };
            let ch_field = canonical::ch_field(&ch_col, &canon.clickhouse, nullable);
            if schema.key.contains(&i) {
                key_is_pg_text &= canon.is_pg_text;
                pg_key_columns.push((pg_col.clone(), col.type_name.clone()));
                pg_key_fields.push(pg_field.clone());
                ch_key_fields.push(ch_field.clone());
            }
            if canon.loose && !schema.key.contains(&i) {
                let (pg_bits, ch_bits) = canonical::float8_bits_sql(&pg_col, &ch_value);
                let ch_bits = if nullable {
                    format!("if(isNull({ch_col}), '\\\\N', {ch_bits})")
                } else {
                    ch_bits
                };
                loose.push((col.name.clone(), pg_bits, ch_bits));
            } else {
                rest_pg.push(pg_field.clone());
                rest_ch.push(ch_field.clone());
            }
            pg_fields.push(pg_field);
            ch_fields.push(ch_field);
        }
        if pg_key_fields.len() != schema.key.len() {
            return Err(format!(
                "{}: a primary key column is not in {} or cannot be compared ({}{})",
                schema.qualified_name(),
                view.qualified(),
                absent.join(", "),
                not_compared.join("; ")
            ));
        }
        let int_key = shape.has_int_key().then(|| {
            let k = &schema.columns[schema.key[0]].name;
            (format!("t.{}", pg_ident(k)), ch_ident(k))
        });
        let (pg_key, ch_key) = match &int_key {
            Some((pg, ch)) => (format!("({pg})::text"), format!("toString({ch})")),
            None => (
                canonical::pg_concat(&pg_key_fields),
                canonical::ch_concat(&ch_key_fields),
            ),
        };
        Ok(TablePlan {
            name: schema.qualified_name(),
            pg_table: format!("{}.{}", pg_ident(&schema.schema), pg_ident(&schema.table)),
            view,
            int_key,
            pg_key,
            ch_key,
            pg_hash: canonical::pg_hash(&canonical::pg_concat(&pg_fields)),
            ch_hash: canonical::ch_hash(&canonical::ch_concat(&ch_fields)),
            key_is_pg_text,
            pg_key_columns,
            not_compared,
            absent,
            loose: (!loose.is_empty()).then(|| Loose {
                pg_rest: canonical::pg_hash(&canonical::pg_concat(&rest_pg)),
                ch_rest: canonical::ch_hash(&canonical::ch_concat(&rest_ch)),
                columns: loose,
            }),
        })
    }
}
