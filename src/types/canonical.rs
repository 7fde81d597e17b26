//! The canonical text `cdc-relay verify` hashes on both servers: for every PostgreSQL type, the SQL
//! that prints a value of it the same way in PostgreSQL and in the ClickHouse column the sink
//! wrote it to ([`super::clickhouse_type`]). It is the third type mapping, kept as one table here
//! (docs/type-mapping.md, "Canonical form"); `tests/verify.rs` runs every row of it on both servers.
//!
//! Both sides compute a row's hash as the first 8 bytes of MD5 over the concatenation of its
//! fields, each `<bytes>:<text>` or `-` for NULL, so no two different rows print alike by accident
//! of a separator. Where the servers print a value differently, both print something else:
//! floats as their IEEE bits, decimals without trailing zeros, timestamps as microseconds.

use super::{PgType, ServerCaps};

/// What the report says of json/jsonb columns, which are compared for NULL only.
pub const JSON_COMPARED: &str =
    "compared for NULL only: the sink stores json re-serialised (key order, spacing, number text), which PostgreSQL cannot print alike in SQL";

/// A value's canonical text as SQL on each server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalSql {
    pub postgres: String,
    pub clickhouse: String,
    /// The canonical text is PostgreSQL's own text of the value, so it can be given back to
    /// PostgreSQL as a literal of the type (`verify --repair` deletes extra keys with it).
    pub is_pg_text: bool,
    /// A double on ClickHouse 18.16, printed without its last [`FLOAT8_SLACK_BITS`] bits: keys
    /// that still differ are compared again with [`float8_bits_sql`], one ulp allowed.
    pub loose: bool,
}

/// ClickHouse 18.16 reads some doubles one ulp off (`2.857142857142857` becomes
/// `2.8571428571428568`, whatever the format: JSONEachRow, TSV, VALUES, toFloat64): on such a
/// server a double's canonical text leaves out this many of its lowest bits.
pub const FLOAT8_SLACK_BITS: u32 = 20;

/// A double's IEEE bits as a signed integer's text (`NaN` for NaN) on each server; `pg` may be
/// NULL (then the result is), `ch` is never NULL.
pub fn float8_bits_sql(pg: &str, ch: &str) -> (String, String) {
    (
        format!("CASE WHEN {pg} = 'NaN' THEN 'NaN' ELSE ((('x' || encode(float8send({pg}), 'hex'))::bit(64))::bigint)::text END"),
        format!("if(isNaN({ch}), 'NaN', toString(reinterpretAsInt64(reinterpretAsString({ch}))))"),
    )
}

/// Why a column's values are not compared (the column is still counted in every row).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NotCompared(pub String);

/// PostgreSQL's canonical text of `pg` (an expression of type `kind`, possibly NULL: the result
/// is then NULL) and ClickHouse's of `ch` (an expression that is never NULL).
pub fn canonical_sql(
    kind: &PgType,
    pg: &str,
    ch: &str,
    caps: ServerCaps,
) -> Result<CanonicalSql, NotCompared> {
    let both = |postgres: String, clickhouse: String| CanonicalSql {
        postgres,
        clickhouse,
        is_pg_text: false,
        loose: false,
    };
    // The type's output function, as pgoutput and the backfill send it (`::text` would drop a
    // char(n)'s padding and add an inet's netmask).
    let text = || CanonicalSql {
        postgres: format!("concat({pg})"),
        clickhouse: ch.to_string(),
        is_pg_text: true,
        loose: false,
    };
    Ok(match kind.resolved() {
        PgType::Bool => both(format!("(({pg})::int)::text"), format!("toString({ch})")),
        PgType::Int2 | PgType::Int4 | PgType::Int8 => CanonicalSql {
            postgres: format!("({pg})::text"),
            clickhouse: format!("toString({ch})"),
            is_pg_text: true,
            loose: false,
        },
        PgType::Numeric { .. } => match super::clickhouse::decimal(kind) {
            // 18.16 prints a Decimal128 wrongly (docs/type-mapping.md); one that fits Decimal64
            // prints right. Current servers drop trailing zeros, 18.16 keeps them: neither does.
            Some((p, _)) if p > 18 && !caps.has_datetime64 => {
                return Err(NotCompared(format!(
                    "numeric({p}, …) is Decimal128, which ClickHouse 18.16 cannot print exactly"
                )))
            }
            // Not PostgreSQL's own text (`1.5` for `1.50`): the stream keys such a row `1.50`.
            Some(_) => both(
                format!("(trim_scale({pg}))::text"),
                format!(
                    "replaceRegexpOne(toString({ch}), '(\\\\.[0-9]*[1-9])0+$|\\\\.0+$', '\\\\1')"
                ),
            ),
            None => text(),
        },
        // The IEEE bits as a signed integer: the servers print floats differently.
        PgType::Float4 => both(
            format!("CASE WHEN {pg} = 'NaN' THEN 'NaN' ELSE ((('x' || encode(float4send({pg}), 'hex'))::bit(32))::int)::text END"),
            format!("if(isNaN({ch}), 'NaN', toString(reinterpretAsInt32(reinterpretAsString({ch}))))"),
        ),
        PgType::Float8 if caps.has_datetime64 => {
            let (postgres, clickhouse) = float8_bits_sql(pg, ch);
            both(postgres, clickhouse)
        }
        PgType::Float8 => CanonicalSql {
            postgres: format!(
                "CASE WHEN {pg} = 'NaN' THEN 'NaN' ELSE (((('x' || encode(float8send({pg}), 'hex'))::bit(64))::bigint) >> {FLOAT8_SLACK_BITS})::text END"
            ),
            clickhouse: format!(
                "if(isNaN({ch}), 'NaN', toString(bitShiftRight(reinterpretAsInt64(reinterpretAsString({ch})), {FLOAT8_SLACK_BITS})))"
            ),
            is_pg_text: false,
            loose: true,
        },
        PgType::Timestamp | PgType::TimestampTz => {
            // What the sink stores for ±infinity (types/clickhouse.rs).
            let (pos, neg, clickhouse) = if caps.has_datetime64 {
                (
                    super::clickhouse::DATETIME64_END - 1,
                    super::clickhouse::DATETIME64_MIN,
                    format!("toString(toUnixTimestamp64Micro({ch}))"),
                )
            } else {
                (
                    i128::from(i64::MAX),
                    i128::from(i64::MIN),
                    format!("toString({ch})"),
                )
            };
            both(
                format!(
                    "CASE WHEN {pg} = 'infinity' THEN '{pos}' WHEN {pg} = '-infinity' THEN '{neg}' \
                     ELSE ((extract(epoch FROM {pg}) * 1000000)::bigint)::text END"
                ),
                clickhouse,
            )
        }
        PgType::Bytea => both(format!("encode({pg}, 'hex')"), ch.to_string()),
        // The sink stores json re-serialised (key order, spacing, number text), which PostgreSQL
        // cannot print alike in SQL: only whether it is NULL is compared (JSON's `null` is the
        // text `null` on both sides, SQL NULL is NULL). [`JSON_COMPARED`] says so in the report.
        PgType::Json | PgType::Jsonb => both("''".into(), "''".into()),
        PgType::Array { element } => {
            let elem = canonical_sql(element, "e", "assumeNotNull(x)", caps)?;
            // ClickHouse holds one dimension: a PostgreSQL array of more never reads alike
            // (`{{1,2},{3,4}}` would otherwise print as `{1,2,3,4}`).
            let dims = format!(
                "CASE WHEN array_ndims({pg}) > 1 THEN 'dims ' || array_ndims({pg}) || ':' ELSE '' END || "
            );
            // Each element a field of its own (`<bytes>:<text>`, `-` for NULL), so no element's
            // text can pass for two. A NULL array is `[]` in ClickHouse (no Nullable(Array)):
            // both print it empty.
            both(
                format!(
                    "{dims}coalesce(array_to_string(ARRAY(SELECT {} FROM unnest({pg}) AS u(e)), ''), '')",
                    pg_field("e", &elem.postgres)
                ),
                format!(
                    "arrayStringConcat(arrayMap(x -> {}, {ch}))",
                    ch_field("x", &elem.clickhouse, true)
                ),
            )
        }
        PgType::Text
        | PgType::Varchar { .. }
        | PgType::Char { .. }
        | PgType::Citext
        | PgType::Uuid
        | PgType::Date
        | PgType::Time
        | PgType::TimeTz
        | PgType::Interval
        | PgType::Inet
        | PgType::Cidr
        | PgType::MacAddr
        | PgType::MacAddr8
        | PgType::Enum { .. }
        | PgType::Other { .. }
        | PgType::Domain { .. } => text(),
    })
}

/// One field of the row text in PostgreSQL: `<bytes>:<text>`, or `-` for NULL. `array`: the
/// canonical text of an array is never NULL (see [`canonical_sql`]).
pub fn pg_field(column: &str, canonical: &str) -> String {
    format!(
        "CASE WHEN {column} IS NULL THEN '-' ELSE octet_length({canonical})::text || ':' || {canonical} END"
    )
}

/// The same field in ClickHouse; `nullable`: the column is Nullable. `canonical` is the canonical
/// SQL over `assumeNotNull(column)` when the column is Nullable.
pub fn ch_field(column: &str, canonical: &str, nullable: bool) -> String {
    let field = format!("concat(toString(length({canonical})), ':', {canonical})");
    if nullable {
        format!("if(isNull({column}), '-', {field})")
    } else {
        field
    }
}

/// The 64-bit hash of a row text in PostgreSQL, as a signed bigint (its bits are ClickHouse's).
pub fn pg_hash(text: &str) -> String {
    format!("('x' || left(md5({text}), 16))::bit(64)::bigint")
}

/// The same hash in ClickHouse, as UInt64.
pub fn ch_hash(text: &str) -> String {
    format!("reinterpretAsUInt64(reverse(substring(MD5({text}), 1, 8)))")
}

/// A bucket of a key text by hash, `0 .. buckets`, in PostgreSQL (60 bits: never negative).
pub fn pg_hash_bucket(text: &str, buckets: u64) -> String {
    format!("(('x' || left(md5({text}), 15))::bit(60)::bigint % {buckets})")
}

/// The same bucket in ClickHouse.
pub fn ch_hash_bucket(text: &str, buckets: u64) -> String {
    format!("(bitShiftRight({}, 4) % {buckets})", ch_hash(text))
}

/// Concatenation of SQL texts (`||` in PostgreSQL, `concat` in ClickHouse).
pub fn pg_concat(parts: &[String]) -> String {
    if parts.is_empty() {
        return "''".into();
    }
    parts
        .iter()
        .map(|p| format!("({p})"))
        .collect::<Vec<_>>()
        .join(" || ")
}

pub fn ch_concat(parts: &[String]) -> String {
    match parts.len() {
        0 => "''".into(),
        1 => parts[0].clone(),
        _ => format!("concat({})", parts.join(", ")),
    }
}

/// Splits a key text (the concatenated fields of the key columns) back into the columns' texts;
/// `None` for a NULL field; an error when it is not such a text.
pub fn split_fields(text: &str) -> Option<Vec<Option<&str>>> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('-') {
            out.push(None);
            rest = r;
            continue;
        }
        let (len, r) = rest.split_once(':')?;
        let len: usize = len.parse().ok()?;
        let value = r.get(..len)?;
        out.push(Some(value));
        rest = &r[len..];
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_split_back() {
        assert_eq!(
            split_fields("2:ab-3:a:b").unwrap(),
            vec![Some("ab"), None, Some("a:b")]
        );
        assert_eq!(split_fields("").unwrap(), Vec::<Option<&str>>::new());
        assert!(split_fields("9:ab").is_none());
        assert!(split_fields("x").is_none());
    }

    #[test]
    fn json_is_compared_for_null_only_and_decimal128_not_on_18_16() {
        let json = canonical_sql(&PgType::Jsonb, "c", "c", ServerCaps::CURRENT).unwrap();
        assert_eq!(
            (json.postgres.as_str(), json.clickhouse.as_str()),
            ("''", "''")
        );
        let arr = PgType::Array {
            element: Box::new(PgType::Int4),
        };
        let dims = canonical_sql(&arr, "c", "c", ServerCaps::CURRENT).unwrap();
        assert!(
            dims.postgres.starts_with("CASE WHEN array_ndims(c) > 1"),
            "{}",
            dims.postgres
        );
        let wide = PgType::Numeric {
            precision: Some(38),
            scale: Some(10),
        };
        assert!(canonical_sql(&wide, "c", "c", ServerCaps::LEGACY).is_err());
        assert!(canonical_sql(&wide, "c", "c", ServerCaps::CURRENT).is_ok());
    }
}
