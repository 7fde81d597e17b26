//! PostgreSQL text → message JSON: the one table of how each type appears in a change message.
//!
//! The input is a value as PostgreSQL prints it (pgoutput's text columns, `::text` in the backfill)
//! with the ISO DateStyle and, for servers before 12, `extra_float_digits = 3`. SQL NULL never
//! reaches here: the caller writes JSON `null` for it (and keeps unchanged TOAST apart).

use serde_json::{Number, Value};

use super::array::{parse_array, ArrayElem};
use super::kind::PgType;
use super::{bytea, datetime, TypeError};

/// One column value → its JSON in the message.
///
/// | PostgreSQL | JSON |
/// |---|---|
/// | smallint, integer, bigint | number (bigint exact: built from the i64, never a double) |
/// | numeric | string with the exact decimal; `"NaN"`, `"Infinity"`, `"-Infinity"` |
/// | real, double precision | number (shortest text that reads back to the same float); `"NaN"`, `"Infinity"`, `"-Infinity"` |
/// | boolean | `true` / `false` |
/// | timestamp | `"YYYY-MM-DDTHH:MM:SS[.ffffff]"`, `"infinity"`, `"-infinity"`; BC as astronomical `-YYYY` |
/// | timestamptz | the instant in UTC: `"…Z"` (the offset in the text applied) |
/// | bytea | string, standard base64 with padding |
/// | json, jsonb | the JSON value itself, embedded |
/// | arrays | JSON arrays (nested for more dimensions), elements mapped by this table, NULL → `null` |
/// | domain | as its base type |
/// | everything else (text kinds, uuid, date, time, timetz, interval, inet, cidr, macaddr, enums, money, …) | PostgreSQL's text as a string |
pub fn to_json(kind: &PgType, text: &str) -> Result<Value, TypeError> {
    scalar(kind, text).map_err(|reason| TypeError::new(kind, text, reason))
}

fn scalar(kind: &PgType, text: &str) -> Result<Value, String> {
    Ok(match kind.resolved() {
        PgType::Bool => match text {
            "t" | "true" => Value::Bool(true),
            "f" | "false" => Value::Bool(false),
            _ => return Err("not a boolean".into()),
        },
        PgType::Int2 => Value::from(text.parse::<i16>().map_err(|_| "not a smallint")?),
        PgType::Int4 => Value::from(text.parse::<i32>().map_err(|_| "not an integer")?),
        PgType::Int8 => Value::from(text.parse::<i64>().map_err(|_| "not a bigint")?),
        PgType::Numeric { .. } => {
            check_numeric(text)?;
            Value::String(text.to_owned())
        }
        PgType::Float4 | PgType::Float8 => float(kind.resolved(), text)?,
        PgType::Timestamp => {
            Value::String(datetime::format_iso(datetime::parse(text, false)?, false))
        }
        PgType::TimestampTz => {
            Value::String(datetime::format_iso(datetime::parse(text, true)?, true))
        }
        PgType::Bytea => Value::String(bytea::encode_base64(&bytea::decode_pg(text)?)),
        PgType::Json | PgType::Jsonb => {
            check_json_numbers(text)?;
            serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?
        }
        PgType::Array { element } => {
            let elems = parse_array(text, element.array_delimiter())?;
            array(element, &elems)?
        }
        _ => Value::String(text.to_owned()),
    })
}

fn array(element: &PgType, elems: &[ArrayElem]) -> Result<Value, String> {
    elems
        .iter()
        .map(|e| match e {
            ArrayElem::Null => Ok(Value::Null),
            ArrayElem::Value(text) => scalar(element, text),
            ArrayElem::Array(inner) => array(element, inner),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

/// numeric's output: `[-]digits[.digits]` (never an exponent), or one of the special values.
pub(crate) fn check_numeric(text: &str) -> Result<(), String> {
    if matches!(text, "NaN" | "Infinity" | "-Infinity") {
        return Ok(());
    }
    let unsigned = text.strip_prefix('-').unwrap_or(text);
    let (int, frac) = unsigned.split_once('.').unwrap_or((unsigned, "0"));
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if all_digits(int) && all_digits(frac) {
        Ok(())
    } else {
        Err("not a numeric".into())
    }
}

/// Floats as JSON numbers, exactly: PostgreSQL 12+ prints the shortest text that reads back to the
/// same float, and so does serde_json (ryu) for the f64 read from it. A real is read as an f64 too:
/// its shortest decimal text, read as an f64 and printed shortest, is that same text, and reading
/// that back as an f32 gives the original real. JSON has no NaN or infinities: those become strings.
fn float(kind: &PgType, text: &str) -> Result<Value, String> {
    match text {
        "NaN" | "Infinity" | "-Infinity" => return Ok(Value::String(text.to_owned())),
        _ => {}
    }
    let v: f64 = text.parse().map_err(|_| "not a float")?;
    if *kind == PgType::Float4 && !text.parse::<f32>().is_ok_and(f32::is_finite) {
        return Err("not a real".into());
    }
    Number::from_f64(v)
        .map(Value::Number)
        .ok_or_else(|| "not a finite float".into())
}

/// serde_json (built without `arbitrary_precision`) reads a JSON number that is not an i64/u64 as
/// an f64. jsonb numbers are numerics of any length, so a long one would silently change; refuse
/// it instead. Safe: integers that fit 64 bits, and decimals whose double prints back as the same
/// decimal (any of at most 15 significant digits, and the shortest texts of doubles that programs
/// write, like `0.30000000000000004`) in the normal f64 range.
fn check_json_numbers(text: &str) -> Result<(), String> {
    let mut in_string = false;
    let mut escaped = false;
    let mut token = String::new();
    let check = |token: &mut String| -> Result<(), String> {
        if !token.is_empty() {
            let t = std::mem::take(token);
            if !json_number_is_exact(&t) {
                return Err(format!("JSON number {t} does not fit a double exactly"));
            }
        }
        Ok(())
    };
    for c in text.chars() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if c.is_ascii_digit() || matches!(c, '-' | '+' | '.' | 'e' | 'E') {
            token.push(c);
        } else {
            check(&mut token)?;
            in_string = c == '"';
        }
    }
    check(&mut token)
}

fn json_number_is_exact(t: &str) -> bool {
    if !t.bytes().any(|b| b.is_ascii_digit()) {
        return true; // not a number (e.g. the `e` of `true`); the parser judges the text
    }
    if t.parse::<i64>().is_ok() || t.parse::<u64>().is_ok() {
        return true;
    }
    match t.parse::<f64>() {
        // Exact when the double's shortest text (what the message carries) is the same decimal:
        // `0.30000000000000004`, the 17 digits JavaScript and Python write, is; `0.1000000000000000055`
        // or a 30-digit integer are not.
        Ok(v) => {
            v.is_finite()
                && (v == 0.0 || v.abs() >= f64::MIN_POSITIVE)
                && decimal(t)
                    == decimal(
                        &serde_json::Number::from_f64(v).map_or(String::new(), |n| n.to_string()),
                    )
        }
        Err(_) => true, // malformed: serde_json reports it
    }
}

/// A decimal number's value as (negative, significant digits, exponent) with the digits stripped
/// of leading and trailing zeros: `0.0250` and `2.5e-2` give the same.
fn decimal(t: &str) -> Option<(bool, String, i64)> {
    let (neg, t) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let (mantissa, exp) = match t.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i64>().ok()?),
        None => (t, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits = format!("{int}{frac}");
    let lead = digits.bytes().take_while(|&b| b == b'0').count();
    let digits = digits[lead..].trim_end_matches('0');
    if digits.is_empty() {
        return Some((false, String::new(), 0));
    }
    // The value is 0.<digits> x 10^point.
    let point = int.len() as i64 - lead as i64 + exp;
    Some((neg, digits.to_string(), point))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn arr(element: PgType) -> PgType {
        PgType::Array {
            element: Box::new(element),
        }
    }

    #[test]
    fn scalars() {
        assert_eq!(
            to_json(&PgType::Int8, "9223372036854775807")
                .unwrap()
                .to_string(),
            "9223372036854775807"
        );
        assert_eq!(
            to_json(&PgType::Int8, "-9223372036854775808")
                .unwrap()
                .to_string(),
            "-9223372036854775808"
        );
        assert!(to_json(&PgType::Int8, "9223372036854775808").is_err());
        assert!(to_json(&PgType::Int2, "32768").is_err());
        assert_eq!(to_json(&PgType::Float8, "0.1").unwrap().to_string(), "0.1");
        assert_eq!(
            to_json(&PgType::Float8, "1e+308").unwrap().to_string(),
            "1e+308"
        );
        assert_eq!(
            to_json(&PgType::Float4, "3.4028235e+38")
                .unwrap()
                .to_string(),
            "3.4028235e+38"
        );
        assert!(to_json(&PgType::Float4, "1e39").is_err());
        assert!(to_json(&PgType::Float8, "inf").is_err());
        assert_eq!(
            to_json(&PgType::Float8, "-Infinity").unwrap(),
            json!("-Infinity")
        );
        assert!(to_json(
            &PgType::Numeric {
                precision: None,
                scale: None
            },
            "1e5"
        )
        .is_err());
        assert!(to_json(&PgType::Bool, "yes").is_err());
    }

    #[test]
    fn json_values_embed_and_long_numbers_are_refused() {
        let v = to_json(
            &PgType::Jsonb,
            r#"{"a": {"b": [1, 2.5, null, "x\"1e999"]}, "c": true}"#,
        )
        .unwrap();
        assert_eq!(
            v,
            json!({"a": {"b": [1, 2.5, null, "x\"1e999"]}, "c": true})
        );
        assert_eq!(
            to_json(&PgType::Json, "18446744073709551615")
                .unwrap()
                .to_string(),
            "18446744073709551615"
        );
        assert!(to_json(&PgType::Jsonb, r#"{"id": 123456789012345678901}"#).is_err());
        assert!(to_json(&PgType::Jsonb, "0.12345678901234567").is_err());
        // The 16–17-digit shortest texts JavaScript and Python write are exact doubles.
        for exact in [
            "0.30000000000000004",
            "4.899431199999999",
            "-1.7976931348623157e308",
            "2.5E-5",
            "1.50",
            "0.0",
        ] {
            let v = to_json(&PgType::Jsonb, exact).unwrap();
            assert_eq!(
                decimal(&v.to_string()),
                decimal(exact),
                "{exact} became {v}"
            );
        }
        assert!(to_json(&PgType::Jsonb, "0.1000000000000000055").is_err());
        assert!(to_json(&PgType::Jsonb, "9007199254740993.5").is_err());
        assert!(to_json(&PgType::Jsonb, "1e400").is_err());
        assert!(to_json(&PgType::Jsonb, "{").is_err());
        let deep = "[".repeat(10_000);
        assert!(to_json(&PgType::Jsonb, &deep).is_err());
    }

    #[test]
    fn arrays_map_their_elements() {
        assert_eq!(
            to_json(&arr(PgType::Int4), "{1,NULL,3}").unwrap(),
            json!([1, null, 3])
        );
        assert_eq!(
            to_json(&arr(PgType::Int4), "[0:1]={{1,2},{3,4}}").unwrap(),
            json!([[1, 2], [3, 4]])
        );
        assert_eq!(
            to_json(&arr(PgType::Text), r#"{"NULL",NULL,"a,b"}"#).unwrap(),
            json!(["NULL", null, "a,b"])
        );
        assert_eq!(
            to_json(&arr(PgType::Jsonb), r#"{"{\"a\": 1}",NULL}"#).unwrap(),
            json!([{"a": 1}, null])
        );
        assert_eq!(
            to_json(&arr(PgType::Bytea), r#"{"\\x00ff"}"#).unwrap(),
            json!(["AP8="])
        );
        assert!(to_json(&arr(PgType::Int4), "{1,x}").is_err());
    }

    #[test]
    fn everything_else_is_its_text() {
        for (kind, text) in [
            (
                PgType::Other {
                    name: "money".into(),
                },
                "$1.00",
            ),
            (
                PgType::Enum {
                    name: "mood".into(),
                },
                "happy",
            ),
            (PgType::Interval, "1 year 2 mons 3 days 04:05:06.7"),
            (PgType::Char { length: Some(3) }, "a  "),
        ] {
            assert_eq!(to_json(&kind, text).unwrap(), json!(text));
        }
    }
}
