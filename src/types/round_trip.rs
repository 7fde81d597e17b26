//! Issue #12 §3's round trips: PostgreSQL text → message JSON → ClickHouse insert value, compared
//! exactly, for every type on the list, on 18.16 (LEGACY) and current servers.

use serde_json::{json, Value};

use super::*;

fn arr(element: PgType) -> PgType {
    PgType::Array {
        element: Box::new(element),
    }
}

fn numeric(p: u16, s: i16) -> PgType {
    PgType::Numeric {
        precision: Some(p),
        scale: Some(s),
    }
}

const ANY_NUMERIC: PgType = PgType::Numeric {
    precision: None,
    scale: None,
};

/// (type, PostgreSQL text, message JSON, ClickHouse value on 18.16, on current servers)
fn cases() -> Vec<(PgType, &'static str, Value, Value, Value)> {
    let same =
        |kind: PgType, text: &'static str, msg: Value, ch: Value| (kind, text, msg, ch.clone(), ch);
    vec![
        same(PgType::Int2, "-32768", json!(-32768), json!(-32768)),
        same(
            PgType::Int4,
            "2147483647",
            json!(2147483647),
            json!(2147483647),
        ),
        same(
            PgType::Int8,
            "9223372036854775807",
            json!(i64::MAX),
            json!(i64::MAX),
        ),
        same(
            PgType::Int8,
            "-9223372036854775808",
            json!(i64::MIN),
            json!(i64::MIN),
        ),
        same(
            numeric(10, 2),
            "-12345678.90",
            json!("-12345678.90"),
            json!("-12345678.90"),
        ),
        same(numeric(10, 2), "0.00", json!("0.00"), json!("0.00")),
        same(
            numeric(38, 0),
            "99999999999999999999999999999999999999",
            json!("99999999999999999999999999999999999999"),
            json!("99999999999999999999999999999999999999"),
        ),
        same(
            ANY_NUMERIC,
            "1234567890123456789012345678901234567890.5",
            json!("1234567890123456789012345678901234567890.5"),
            json!("1234567890123456789012345678901234567890.5"),
        ),
        same(ANY_NUMERIC, "NaN", json!("NaN"), json!("NaN")),
        same(
            ANY_NUMERIC,
            "Infinity",
            json!("Infinity"),
            json!("Infinity"),
        ),
        same(
            ANY_NUMERIC,
            "-Infinity",
            json!("-Infinity"),
            json!("-Infinity"),
        ),
        same(PgType::Float4, "1.1", json!(1.1), json!(1.1)),
        same(
            PgType::Float8,
            "0.30000000000000004",
            json!(0.30000000000000004),
            json!(0.30000000000000004),
        ),
        same(
            PgType::Float8,
            "-1.7976931348623157e+308",
            json!(f64::MIN),
            json!(f64::MIN),
        ),
        same(PgType::Float8, "5e-324", json!(5e-324), json!(5e-324)),
        same(PgType::Float8, "NaN", json!("NaN"), json!("nan")),
        same(PgType::Float4, "Infinity", json!("Infinity"), json!("inf")),
        same(
            PgType::Float8,
            "-Infinity",
            json!("-Infinity"),
            json!("-inf"),
        ),
        same(PgType::Bool, "t", json!(true), json!(1)),
        same(PgType::Bool, "f", json!(false), json!(0)),
        same(
            PgType::Text,
            "it's \"quoted\"\n",
            json!("it's \"quoted\"\n"),
            json!("it's \"quoted\"\n"),
        ),
        same(
            PgType::Varchar { length: Some(20) },
            "héllo",
            json!("héllo"),
            json!("héllo"),
        ),
        same(
            PgType::Char { length: Some(4) },
            "ab  ",
            json!("ab  "),
            json!("ab  "),
        ),
        same(PgType::Citext, "MiXeD", json!("MiXeD"), json!("MiXeD")),
        same(
            PgType::Uuid,
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        ),
        same(
            PgType::Date,
            "2024-02-29",
            json!("2024-02-29"),
            json!("2024-02-29"),
        ),
        same(
            PgType::Date,
            "0044-03-15 BC",
            json!("0044-03-15 BC"),
            json!("0044-03-15 BC"),
        ),
        same(
            PgType::Date,
            "infinity",
            json!("infinity"),
            json!("infinity"),
        ),
        same(
            PgType::Time,
            "23:59:59.999999",
            json!("23:59:59.999999"),
            json!("23:59:59.999999"),
        ),
        same(
            PgType::TimeTz,
            "10:00:00+05:30",
            json!("10:00:00+05:30"),
            json!("10:00:00+05:30"),
        ),
        same(
            PgType::Interval,
            "-1 years +2 mons 3 days 04:05:06.789",
            json!("-1 years +2 mons 3 days 04:05:06.789"),
            json!("-1 years +2 mons 3 days 04:05:06.789"),
        ),
        (
            PgType::Timestamp,
            "2024-01-01 10:00:00.123456",
            json!("2024-01-01T10:00:00.123456"),
            json!(1_704_103_200_123_456_i64),
            json!("2024-01-01 10:00:00.123456"),
        ),
        (
            PgType::Timestamp,
            "2024-01-01 10:00:00",
            json!("2024-01-01T10:00:00"),
            json!(1_704_103_200_000_000_i64),
            json!("2024-01-01 10:00:00.000000"),
        ),
        (
            PgType::Timestamp,
            "infinity",
            json!("infinity"),
            json!(i64::MAX),
            json!("2299-12-31 23:59:59.999999"),
        ),
        (
            PgType::Timestamp,
            "-infinity",
            json!("-infinity"),
            json!(i64::MIN),
            json!("1900-01-01 00:00:00.000000"),
        ),
        (
            PgType::TimestampTz,
            "2024-01-01 10:00:00+02",
            json!("2024-01-01T08:00:00Z"),
            json!(1_704_096_000_000_000_i64),
            json!("2024-01-01 08:00:00.000000"),
        ),
        (
            PgType::TimestampTz,
            "2024-01-01 05:30:00.5+05:30",
            json!("2024-01-01T00:00:00.500000Z"),
            json!(1_704_067_200_500_000_i64),
            json!("2024-01-01 00:00:00.500000"),
        ),
        (
            PgType::TimestampTz,
            "1900-01-01 00:00:00+00",
            json!("1900-01-01T00:00:00Z"),
            json!(-2_208_988_800_000_000_i64),
            json!("1900-01-01 00:00:00.000000"),
        ),
        same(PgType::Bytea, "\\x00ff", json!("AP8="), json!("00ff")),
        same(PgType::Bytea, "\\x", json!(""), json!("")),
        same(
            PgType::Json,
            r#"{"a": {"b": [1, "x"]}}"#,
            json!({"a": {"b": [1, "x"]}}),
            json!(r#"{"a":{"b":[1,"x"]}}"#),
        ),
        same(
            PgType::Jsonb,
            r#"[null, 1.5, {"k": false}]"#,
            json!([null, 1.5, {"k": false}]),
            json!(r#"[null,1.5,{"k":false}]"#),
        ),
        same(
            PgType::Jsonb,
            "\"just a string\"",
            json!("just a string"),
            json!("\"just a string\""),
        ),
        same(
            PgType::Inet,
            "192.168.0.1/24",
            json!("192.168.0.1/24"),
            json!("192.168.0.1/24"),
        ),
        same(
            PgType::Cidr,
            "2001:db8::/32",
            json!("2001:db8::/32"),
            json!("2001:db8::/32"),
        ),
        same(
            PgType::MacAddr,
            "08:00:2b:01:02:03",
            json!("08:00:2b:01:02:03"),
            json!("08:00:2b:01:02:03"),
        ),
        same(
            PgType::MacAddr8,
            "08:00:2b:01:02:03:04:05",
            json!("08:00:2b:01:02:03:04:05"),
            json!("08:00:2b:01:02:03:04:05"),
        ),
        same(
            PgType::Enum {
                name: "mood".into(),
            },
            "happy",
            json!("happy"),
            json!("happy"),
        ),
        same(
            PgType::Domain {
                name: "posint".into(),
                base: Box::new(PgType::Int4),
            },
            "7",
            json!(7),
            json!(7),
        ),
        same(
            PgType::Other {
                name: "money".into(),
            },
            "$1,000.00",
            json!("$1,000.00"),
            json!("$1,000.00"),
        ),
        same(
            arr(PgType::Int4),
            "{1,NULL,3}",
            json!([1, null, 3]),
            json!([1, null, 3]),
        ),
        same(
            arr(PgType::Int8),
            "[0:1]={-9223372036854775808,9223372036854775807}",
            json!([i64::MIN, i64::MAX]),
            json!([i64::MIN, i64::MAX]),
        ),
        same(
            arr(PgType::Text),
            r#"{"a b","c\"d",NULL,"NULL"}"#,
            json!(["a b", "c\"d", null, "NULL"]),
            json!(["a b", "c\"d", null, "NULL"]),
        ),
        same(arr(PgType::Text), "{}", json!([]), json!([])),
        same(
            arr(numeric(5, 2)),
            "{1.50,NULL,NaN}",
            json!(["1.50", null, "NaN"]),
            json!(null),
        ),
        same(
            arr(PgType::Float8),
            "{NaN,1.5}",
            json!(["NaN", 1.5]),
            json!(["nan", 1.5]),
        ),
        same(
            arr(PgType::Bool),
            "{t,f,NULL}",
            json!([true, false, null]),
            json!([1, 0, null]),
        ),
        same(
            arr(PgType::Bytea),
            r#"{"\\x00ff",NULL}"#,
            json!(["AP8=", null]),
            json!(["00ff", null]),
        ),
        same(
            arr(PgType::Jsonb),
            r#"{"{\"a\": [1]}"}"#,
            json!([{"a": [1]}]),
            json!([r#"{"a":[1]}"#]),
        ),
        same(
            arr(PgType::Uuid),
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
            json!(["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]),
            json!(["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]),
        ),
        same(
            arr(PgType::Enum {
                name: "mood".into(),
            }),
            "{happy,sad}",
            json!(["happy", "sad"]),
            json!(["happy", "sad"]),
        ),
        (
            arr(PgType::TimestampTz),
            r#"{"2024-01-01 10:00:00+02",NULL}"#,
            json!(["2024-01-01T08:00:00Z", null]),
            json!([1_704_096_000_000_000_i64, null]),
            json!(["2024-01-01 08:00:00.000000", null]),
        ),
    ]
}

#[test]
fn every_type_round_trips_exactly() {
    for (kind, text, msg, legacy, current) in cases() {
        let got = to_json(&kind, text).unwrap_or_else(|e| panic!("{kind:?} {text:?}: {e}"));
        assert_eq!(got, msg, "message JSON of {kind:?} {text:?}");
        // Through the wire: what the sink reads is what was written.
        let wire: Value = serde_json::from_str(&got.to_string()).unwrap();
        assert_eq!(wire, msg);
        for (caps, want) in [(ServerCaps::LEGACY, legacy), (ServerCaps::CURRENT, current)] {
            let ch = clickhouse_json(&kind, &wire, caps);
            if want.is_null() {
                // A value the column type cannot hold is an error, never a guess.
                assert!(ch.is_err(), "{kind:?} {text:?} on {caps:?} gave {ch:?}");
            } else {
                assert_eq!(
                    ch.unwrap_or_else(|e| panic!("{e}")),
                    want,
                    "{kind:?} {text:?} on {caps:?}"
                );
            }
        }
    }
}

#[test]
fn column_types() {
    let t = |k: PgType, null: bool, caps| clickhouse_type(&k, null, caps);
    let (old, new) = (ServerCaps::LEGACY, ServerCaps::CURRENT);
    assert_eq!(t(PgType::Int8, false, old), "Int64");
    assert_eq!(t(PgType::Bool, true, new), "Nullable(UInt8)");
    assert_eq!(t(numeric(10, 2), true, old), "Nullable(Decimal(10, 2))");
    assert_eq!(t(numeric(39, 2), false, old), "String");
    assert_eq!(t(numeric(5, -2), false, old), "String");
    assert_eq!(t(numeric(2, 5), false, old), "String");
    assert_eq!(t(ANY_NUMERIC, false, new), "String");
    assert_eq!(t(PgType::TimestampTz, false, old), "Int64");
    assert_eq!(
        t(PgType::Timestamp, true, new),
        "Nullable(DateTime64(6, 'UTC'))"
    );
    assert_eq!(t(PgType::Uuid, false, new), "String");
    assert_eq!(t(PgType::Date, false, new), "String");
    assert_eq!(t(arr(PgType::Int4), true, old), "Array(Nullable(Int32))");
    assert_eq!(
        t(arr(PgType::TimestampTz), false, new),
        "Array(Nullable(DateTime64(6, 'UTC')))"
    );
    let domain = PgType::Domain {
        name: "d".into(),
        base: Box::new(arr(PgType::Text)),
    };
    assert_eq!(t(domain, true, old), "Array(Nullable(String))");
    assert_eq!(ServerCaps::from_version("18.16.1"), Some(old));
    assert_eq!(ServerCaps::from_version("24.8.4.13"), Some(new));
    assert_eq!(ServerCaps::from_version("banana"), None);
}

#[test]
fn what_clickhouse_cannot_hold_is_an_error() {
    let new = ServerCaps::CURRENT;
    let ts = |text: &str| {
        clickhouse_json(
            &PgType::Timestamp,
            &to_json(&PgType::Timestamp, text).unwrap(),
            new,
        )
    };
    assert!(ts("1899-12-31 23:59:59.999999").is_err());
    assert!(ts("2300-01-01 00:00:00").is_err());
    assert!(ts("0044-03-15 12:00:00 BC").is_err());
    assert_eq!(
        ts("2299-12-31 23:59:59.999999").unwrap(),
        json!("2299-12-31 23:59:59.999999")
    );
    // BC and far-future instants fit Int64 microseconds on 18.16.
    let bc = to_json(&PgType::Timestamp, "0044-03-15 12:00:00 BC").unwrap();
    assert_eq!(bc, json!("-0043-03-15T12:00:00"));
    assert_eq!(
        clickhouse_json(&PgType::Timestamp, &bc, ServerCaps::LEGACY).unwrap(),
        json!(-63_517_780_800_000_000_i64)
    );
    // Multi-dimensional values do not fit a one-dimensional column; the message keeps them.
    let nested = to_json(&arr(PgType::Int4), "{{1,2},{3,4}}").unwrap();
    assert_eq!(nested, json!([[1, 2], [3, 4]]));
    assert!(clickhouse_json(&arr(PgType::Int4), &nested, new).is_err());
    // NULL: null for scalars, [] for arrays (ClickHouse has no Nullable(Array)).
    assert_eq!(
        clickhouse_json(&PgType::Int4, &Value::Null, new).unwrap(),
        Value::Null
    );
    assert_eq!(
        clickhouse_json(&arr(PgType::Int4), &Value::Null, new).unwrap(),
        json!([])
    );
    // A value of the wrong JSON shape is refused.
    assert!(clickhouse_json(&PgType::Int4, &json!("1"), new).is_err());
    assert!(clickhouse_json(&PgType::Bytea, &json!("not base64!"), new).is_err());
    assert!(clickhouse_json(&numeric(10, 2), &json!("Infinity"), new).is_err());
}
