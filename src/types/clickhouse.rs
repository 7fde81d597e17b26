//! PostgreSQL → ClickHouse: the column type a table is created with, and the value a `JSONEachRow`
//! insert gives that column. One table for both, read from the message JSON (never guessed from it).

use serde_json::Value;

use super::kind::PgType;
use super::{bytea, datetime, TypeError};

/// What the ClickHouse server can store, from `SELECT version()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerCaps {
    /// `DateTime64` (20.1+). Without it (18.16) timestamps are `Int64` microseconds.
    pub has_datetime64: bool,
}

impl ServerCaps {
    /// ClickHouse 18.16 (Debian's): no DateTime64, Bool, Date32.
    pub const LEGACY: ServerCaps = ServerCaps {
        has_datetime64: false,
    };
    pub const CURRENT: ServerCaps = ServerCaps {
        has_datetime64: true,
    };

    /// From `SELECT version()`'s text (`18.16.1`, `24.8.4.13`); `None` if it is not a version.
    pub fn from_version(version: &str) -> Option<ServerCaps> {
        let mut parts = version.trim().split('.');
        let major: u32 = parts.next()?.parse().ok()?;
        let minor: u32 = parts.next()?.parse().ok()?;
        Some(ServerCaps {
            has_datetime64: (major, minor) >= (20, 1),
        })
    }
}

/// DateTime64's range on current servers; a finite timestamp outside it is refused, not clamped.
/// 1900-01-01 00:00:00 UTC and 2300-01-01 00:00:00 UTC in microseconds since the epoch.
pub(crate) const DATETIME64_MIN: i128 = -2_208_988_800_000_000;
pub(crate) const DATETIME64_END: i128 = 10_413_792_000_000_000;
const DATETIME64_MIN_TEXT: &str = "1900-01-01 00:00:00.000000";
const DATETIME64_MAX_TEXT: &str = "2299-12-31 23:59:59.999999";

/// The ClickHouse column type for a PostgreSQL column.
///
/// | PostgreSQL | ClickHouse |
/// |---|---|
/// | smallint / integer / bigint | Int16 / Int32 / Int64 |
/// | real / double precision | Float32 / Float64 |
/// | boolean | UInt8 (18.16 has no Bool; one shape on every server) |
/// | numeric(p,s), 1 ≤ p ≤ 38, 0 ≤ s ≤ p | Decimal(p,s) (stable since 18.14.9) |
/// | numeric without typmod, or p > 38, or s < 0, or s > p | String (exact decimal text) |
/// | timestamp, timestamptz | DateTime64(6, 'UTC') where supported, else Int64 (µs since the epoch, UTC) |
/// | date, time, timetz, interval, uuid, inet, cidr, macaddr, text kinds, enums, other | String |
/// | json, jsonb | String (the JSON text) |
/// | bytea | String (lowercase hex; `unhex()` gives the bytes) |
/// | T[] | Array(Nullable(T')), never Nullable itself (ClickHouse has no Nullable(Array)) |
///
/// A nullable column is `Nullable(T')`, except arrays (see above: a NULL array is stored as `[]`).
pub fn clickhouse_type(kind: &PgType, nullable: bool, caps: ServerCaps) -> String {
    match kind.resolved() {
        PgType::Array { element } => format!("Array({})", element_type(element, caps)),
        _ if nullable => format!("Nullable({})", base_type(kind, caps)),
        _ => base_type(kind, caps),
    }
}

/// PostgreSQL does not enforce an array's dimensions, nor forbid NULL elements: elements are always
/// Nullable. Nested arrays (`integer[][]` is the same type as `integer[]`) stay one-dimensional in
/// ClickHouse; a multi-dimensional value is refused by [`clickhouse_json`].
fn element_type(element: &PgType, caps: ServerCaps) -> String {
    format!("Nullable({})", base_type(element, caps))
}

fn base_type(kind: &PgType, caps: ServerCaps) -> String {
    match kind.resolved() {
        PgType::Bool => "UInt8".into(),
        PgType::Int2 => "Int16".into(),
        PgType::Int4 => "Int32".into(),
        PgType::Int8 => "Int64".into(),
        PgType::Float4 => "Float32".into(),
        PgType::Float8 => "Float64".into(),
        PgType::Numeric { .. } => match decimal(kind) {
            Some((p, s)) => format!("Decimal({p}, {s})"),
            None => "String".into(),
        },
        PgType::Timestamp | PgType::TimestampTz if caps.has_datetime64 => {
            "DateTime64(6, 'UTC')".into()
        }
        PgType::Timestamp | PgType::TimestampTz => "Int64".into(),
        // An array of arrays cannot occur (PostgreSQL has no such type); keep it text if asked.
        _ => "String".into(),
    }
}

/// `numeric(p,s)` that ClickHouse's Decimal holds exactly.
pub(crate) fn decimal(kind: &PgType) -> Option<(u16, i16)> {
    match kind.resolved() {
        PgType::Numeric {
            precision: Some(p),
            scale: Some(s),
        } if (1..=38).contains(p) && *s >= 0 && i32::from(*s) <= i32::from(*p) => Some((*p, *s)),
        _ => None,
    }
}

/// A message value (what [`super::to_json`] made) → the value a `JSONEachRow` insert gives the
/// column [`clickhouse_type`] made. `null` stays `null` (an array's becomes `[]`).
pub fn clickhouse_json(kind: &PgType, value: &Value, caps: ServerCaps) -> Result<Value, TypeError> {
    convert(kind, value, caps).map_err(|reason| TypeError::new(kind, &excerpt(value), reason))
}

/// [`clickhouse_json`] as the text of the value in a `JSONEachRow` row. A Decimal (also inside an
/// array) is written as a bare number, its exact text: ClickHouse 18.16 refuses a quoted Decimal
/// ("Cannot parse input: expected ,"), and every server reads the bare text exactly, with no double
/// in between. Everything else is the value's JSON.
pub fn clickhouse_json_text(
    kind: &PgType,
    value: &Value,
    caps: ServerCaps,
) -> Result<String, TypeError> {
    let v = clickhouse_json(kind, value, caps)?;
    let mut out = String::new();
    render(kind, &v, &mut out);
    Ok(out)
}

fn render(kind: &PgType, v: &Value, out: &mut String) {
    match (kind.resolved(), v) {
        // check_numeric let only `-?digits[.digits]` through: safe to write bare.
        (PgType::Numeric { .. }, Value::String(s)) if decimal(kind).is_some() => out.push_str(s),
        (PgType::Array { element }, Value::Array(items)) if decimal(element).is_some() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                render(element, item, out);
            }
            out.push(']');
        }
        _ => out.push_str(&v.to_string()),
    }
}

fn excerpt(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        // Bounded: a 1 MB array is not copied for an error message.
        Value::Array(a) if a.len() > 8 => format!("[{} elements]", a.len()),
        Value::Object(_) => "{…}".into(),
        other => other.to_string(),
    }
}

fn convert(kind: &PgType, value: &Value, caps: ServerCaps) -> Result<Value, String> {
    let kind = kind.resolved();
    if let PgType::Array { element } = kind {
        return match value {
            Value::Null => Ok(Value::Array(Vec::new())),
            Value::Array(items) => items
                .iter()
                .map(|item| match item {
                    Value::Array(_) => {
                        Err("a multi-dimensional array in a one-dimensional column".into())
                    }
                    v => convert(element, v, caps),
                })
                .collect::<Result<Vec<_>, String>>()
                .map(Value::Array),
            _ => Err("not an array".into()),
        };
    }
    if value.is_null() {
        return Ok(Value::Null);
    }
    let text = || value.as_str().ok_or_else(|| "not a string".to_owned());
    Ok(match kind {
        PgType::Bool => Value::from(u8::from(value.as_bool().ok_or("not a boolean")?)),
        PgType::Int2 | PgType::Int4 | PgType::Int8 => {
            Value::from(value.as_i64().ok_or("not a 64-bit integer")?)
        }
        // ClickHouse reads nan/inf/-inf from quoted floats; finite ones stay numbers.
        PgType::Float4 | PgType::Float8 => match value {
            Value::Number(_) => value.clone(),
            Value::String(s) => Value::from(match s.as_str() {
                "NaN" => "nan",
                "Infinity" => "inf",
                "-Infinity" => "-inf",
                _ => return Err("not a float".into()),
            }),
            _ => return Err("not a float".into()),
        },
        PgType::Numeric { .. } => {
            let s = text()?;
            super::json::check_numeric(s)?;
            if decimal(kind).is_some() && matches!(s, "NaN" | "Infinity" | "-Infinity") {
                return Err("Decimal has no NaN or infinity".into());
            }
            // Kept as the exact text: a Decimal(38, s) does not fit a double. An insert writes it
            // unquoted ([`clickhouse_json_text`]): ClickHouse 18.16 refuses a quoted Decimal.
            Value::from(s)
        }
        PgType::Timestamp | PgType::TimestampTz => {
            let stamp = datetime::parse(text()?, *kind == PgType::TimestampTz)?;
            timestamp(stamp, caps)?
        }
        PgType::Bytea => Value::from(bytea::encode_hex(&bytea::decode_base64(text()?)?)),
        PgType::Json | PgType::Jsonb => Value::from(value.to_string()),
        _ => Value::from(text()?),
    })
}

/// DateTime64(6, 'UTC') takes `YYYY-MM-DD HH:MM:SS.ffffff` in UTC; ±infinity are stored as the
/// type's ends (they sort right; DateTime64 has no infinity), and other out-of-range instants are
/// refused rather than wrapped. Int64 holds microseconds since the epoch, ±infinity as i64 MAX/MIN.
fn timestamp(stamp: datetime::Stamp, caps: ServerCaps) -> Result<Value, String> {
    use datetime::Stamp;
    if caps.has_datetime64 {
        let text = match stamp {
            Stamp::Infinity => DATETIME64_MAX_TEXT.to_owned(),
            Stamp::NegInfinity => DATETIME64_MIN_TEXT.to_owned(),
            Stamp::At(micros) if (DATETIME64_MIN..DATETIME64_END).contains(&micros) => {
                // format_iso: `YYYY-MM-DDTHH:MM:SS[.ffffff]`, a four-digit year in this range.
                let iso = datetime::format_iso(stamp, false).replacen('T', " ", 1);
                if iso.len() == 19 {
                    format!("{iso}.000000")
                } else {
                    iso
                }
            }
            Stamp::At(_) => {
                return Err("outside DateTime64's range (1900-01-01 to 2299-12-31)".into())
            }
        };
        return Ok(Value::from(text));
    }
    Ok(Value::from(match stamp {
        Stamp::Infinity => i64::MAX,
        Stamp::NegInfinity => i64::MIN,
        Stamp::At(micros) => i64::try_from(micros)
            .ok()
            .filter(|&m| m != i64::MAX && m != i64::MIN)
            .ok_or("outside Int64 microseconds")?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sink reads a message's floats back with serde_json, which without `float_roundtrip`
    /// reads 0.018867924528301886 one ulp off (found by `verify` on 3000 rows of 1/g).
    #[test]
    fn a_message_float_reads_back_exactly() {
        let v: Value = serde_json::from_str("0.018867924528301886").unwrap();
        assert_eq!(v.as_f64().unwrap().to_bits(), 0x3f93_521c_fb2b_78c1);
        let text = clickhouse_json_text(&PgType::Float8, &v, ServerCaps::LEGACY).unwrap();
        assert_eq!(text, "0.018867924528301886");
    }
    use serde_json::json;

    #[test]
    fn decimals_are_written_bare_everything_else_as_json() {
        let dec = PgType::Numeric {
            precision: Some(38),
            scale: Some(10),
        };
        let caps = ServerCaps::LEGACY;
        let text = |k: &PgType, v: Value| clickhouse_json_text(k, &v, caps).unwrap();
        assert_eq!(
            text(&dec, json!("-1234567890123456789012345678.0123456789")),
            "-1234567890123456789012345678.0123456789"
        );
        let arr = PgType::Array {
            element: Box::new(dec.clone()),
        };
        assert_eq!(text(&arr, json!(["1.5", null, "-2"])), "[1.5,null,-2]");
        assert_eq!(text(&dec, Value::Null), "null");
        let any = PgType::Numeric {
            precision: None,
            scale: None,
        };
        assert_eq!(text(&any, json!("1e5".replace('e', ""))), "\"15\"");
        assert_eq!(text(&PgType::Float8, json!("NaN")), "\"nan\"");
        assert_eq!(text(&PgType::Int8, json!(i64::MAX)), i64::MAX.to_string());
        assert!(clickhouse_json_text(&dec, &json!("1e5"), caps).is_err());
    }
}
