use super::*;
use crate::types::ColumnSchema;
use serde_json::json;

fn v(text: &str) -> ServerVersion {
    ServerVersion::parse(text).unwrap()
}

pub(crate) fn orders() -> RelationSchema {
    let mut tags = ColumnSchema::builtin("tags", 1009, -1, "text[]", true);
    tags.attnum = Some(4);
    let mut cols = vec![
        ColumnSchema::builtin("tenant", 23, -1, "integer", false),
        ColumnSchema::builtin("id", 25, -1, "text", false),
        ColumnSchema::builtin("price", 1700, (10 << 16) + 2 + 4, "numeric(10,2)", true),
        tags,
        ColumnSchema::builtin("at", 1184, -1, "timestamp with time zone", true),
        ColumnSchema::builtin("op", 25, -1, "text", true),
    ];
    for (i, c) in cols.iter_mut().enumerate() {
        c.attnum = Some(i as i16 + 1);
    }
    RelationSchema {
        schema: "public".into(),
        table: "orders".into(),
        columns: cols,
        key: vec![0, 1],
    }
}

#[test]
fn ddl_per_server_version() {
    let names = TableNames::new("db", "orders");
    assert_eq!(
        create_table_sql(&names, &orders(), v("18.16.1")),
        "CREATE TABLE IF NOT EXISTS `db`.`orders` (\n    `tenant` Int32 COMMENT 'PostgreSQL attnum 1',\n    `id` String COMMENT 'PostgreSQL attnum 2',\n    `price` Nullable(Decimal(10, 2)) COMMENT 'PostgreSQL attnum 3',\n    `tags` Array(Nullable(String)) COMMENT 'PostgreSQL attnum 4',\n    `at` Nullable(Int64) COMMENT 'PostgreSQL attnum 5',\n    `op` Nullable(String) COMMENT 'PostgreSQL attnum 6',\n    _op String,\n    _lsn String,\n    _version UInt64,\n    _deleted UInt8,\n    _ingested_at DateTime DEFAULT now()\n) ENGINE = ReplacingMergeTree(_version) ORDER BY (`tenant`, `id`)"
    );
    let new = create_table_sql(&names, &orders(), v("26.9"));
    assert!(
        new.contains("`at` Nullable(DateTime64(6, 'UTC')) COMMENT 'PostgreSQL attnum 5',"),
        "{new}"
    );
    assert!(
        new.ends_with("ENGINE = ReplacingMergeTree(_version, _deleted) ORDER BY (`tenant`, `id`)")
    );
    assert_eq!(
        create_view_sql(
            &names,
            &[
                ("tenant".into(), "tenant".into()),
                ("id".into(), "id".into()),
                ("email".into(), "email_old".into())
            ]
        ),
        "CREATE VIEW IF NOT EXISTS `db`.`orders_current` AS SELECT `tenant`, `id`, `email` AS `email_old`, _op, _lsn, _version FROM `db`.`orders` FINAL WHERE _deleted = 0 AND _version >= (SELECT max(version) FROM `db`.`orders_truncates`)"
    );
    assert!(create_truncates_sql(&names)
        .starts_with("CREATE TABLE IF NOT EXISTS `db`.`orders_truncates` ("));
}

fn state() -> TableState {
    let names = TableNames::new("db", "orders");
    crate::sink::clickhouse::evolve::plan(&names, &[], &orders(), &[], v("18.16"))
        .unwrap()
        .state
        .as_ref()
        .clone()
}

fn event(json: serde_json::Value) -> ChangeEvent {
    ChangeEvent::from_json(&serde_json::to_vec(&json).unwrap()).unwrap()
}

fn event_text(json: &str) -> ChangeEvent {
    ChangeEvent::from_json(json.as_bytes()).unwrap()
}

#[test]
fn rows_carry_clickhouse_values_and_a_canonical_key() {
    let s = state();
    let p = s
        .row(event_text(
            r#"{"op":"update","lsn":"0/2","version":9,
            "columns":{"tenant":3,"id":"a\"b","price":"12.50","tags":["x",null],"at":"2024-01-01T00:00:00Z","op":null},
            "unchanged":["op"], "moved_from":{"id":"old","tenant":3}}"#,
        ))
        .unwrap();
    assert_eq!(p.row.key, r#"[3,"a\"b"]"#);
    assert_eq!(p.fill_from, r#"[3,"old"]"#);
    assert_eq!(p.unchanged, vec!["op".to_string()]);
    let cells: Vec<(&str, &str)> = p
        .row
        .cells
        .iter()
        .map(|(n, t)| (&**n, t.as_str()))
        .collect();
    assert_eq!(
        cells,
        vec![
            ("tenant", "3"),
            ("id", r#""a\"b""#),
            ("price", "12.50"),
            ("tags", r#"["x",null]"#),
            ("at", "1704067200000000")
        ]
    );
    let with_null = s
        .row(event_text(
            r#"{"op":"insert","lsn":"0/3","version":10,"columns":{"tenant":3,"id":"n","price":null,"tags":null}}"#,
        ))
        .unwrap();
    assert_eq!(
        with_null
            .row
            .cells
            .iter()
            .map(|(n, t)| (&**n, t.as_str()))
            .collect::<Vec<_>>(),
        vec![("tenant", "3"), ("id", r#""n""#), ("price", "null"), ("tags", "[]")],
        "a NULL is written, so that a column's DEFAULT (an added column's value for older rows) does not replace it"
    );
    let (names, body) = insert_body(std::slice::from_ref(&p.row));
    assert_eq!(names.len(), 9);
    assert_eq!(
        String::from_utf8(body).unwrap(),
        "{\"tenant\":3,\"id\":\"a\\\"b\",\"price\":12.50,\"tags\":[\"x\",null],\"at\":1704067200000000,\"_op\":\"update\",\"_lsn\":\"0/2\",\"_version\":9,\"_deleted\":0}\n"
    );
}

#[test]
fn bad_rows_are_errors_not_panics() {
    let s = state();
    let bad_value = s.row(event(
        json!({"op":"insert","lsn":"0/1","version":1,"columns":{"tenant":"x","id":"a"}}),
    ));
    assert!(
        matches!(bad_value, Err(GenericRowError::Type(_))),
        "{bad_value:?}"
    );
    let no_key = s.row(event(
        json!({"op":"delete","lsn":"0/1","version":1,"columns":{"tenant":1,"id":null}}),
    ));
    assert!(matches!(no_key, Err(GenericRowError::NoKey { .. })));
    let unknown = s.row(event(
        json!({"op":"insert","lsn":"0/1","version":1,"columns":{"tenant":1,"id":"a","zz":1}}),
    ));
    assert!(matches!(
        unknown,
        Err(GenericRowError::UnknownColumn { .. })
    ));
    let moved = s.row(event(json!({"op":"update","lsn":"0/1","version":1,"columns":{"tenant":1,"id":"a"},"moved_from":7})));
    assert!(matches!(moved, Err(GenericRowError::BadMovedFrom { .. })));
}
