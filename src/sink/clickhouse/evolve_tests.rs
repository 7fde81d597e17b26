use super::*;
use crate::sink::clickhouse::table::tests::orders;
use crate::types::ColumnSchema;

fn v(text: &str) -> ServerVersion {
    ServerVersion::parse(text).unwrap()
}

fn names() -> TableNames {
    TableNames::new("db", "orders")
}

/// The ClickHouse columns a table created from `rel` on 18.16 has.
fn existing(rel: &RelationSchema) -> Vec<(String, String)> {
    existing_on(rel, "18.16")
}

fn existing_on(rel: &RelationSchema, version: &str) -> Vec<(String, String)> {
    let caps = caps_of(v(version));
    (0..rel.columns.len())
        .map(|i| (rel.columns[i].name.clone(), column_type(rel, i, caps)))
        .chain(
            META_COLUMNS_FOR_TEST
                .iter()
                .map(|(n, t)| (n.to_string(), t.to_string())),
        )
        .collect()
}

const META_COLUMNS_FOR_TEST: &[(&str, &str)] = &[
    ("_op", "String"),
    ("_version", "UInt64"),
    ("_ingested_at", "DateTime"),
];

#[test]
fn widening_decision_table() {
    for (from, to, widen) in [
        ("Int16", "Int32", true),
        ("Int32", "Int64", true),
        ("Int16", "Int64", true),
        ("Int64", "Int32", false),
        ("Float32", "Float64", true),
        ("Float64", "Float32", false),
        ("Decimal(10, 2)", "Decimal(20, 2)", true),
        ("Decimal(10, 2)", "Decimal(20, 3)", false),
        ("Decimal(20, 2)", "Decimal(10, 2)", false),
        ("String", "Int32", false),
        ("Int32", "String", false),
        ("Int32", "Float64", false),
    ] {
        assert_eq!(widens(from, to), widen, "{from} -> {to}");
    }
    assert_eq!(reconcile("String", "String"), Reconcile::Keep);
    assert_eq!(
        reconcile("Nullable(Int32)", "Nullable(Int64)"),
        Reconcile::Modify("Nullable(Int64)".into())
    );
    assert_eq!(
        reconcile("Nullable(Int64)", "Int32"),
        Reconcile::Keep,
        "narrower and NOT NULL: the wider column holds it"
    );
    assert_eq!(
        reconcile("Int32", "Nullable(Int32)"),
        Reconcile::Modify("Nullable(Int32)".into())
    );
    assert_eq!(
        reconcile("Nullable(String)", "Nullable(Int32)"),
        Reconcile::Refuse
    );
    assert_eq!(
        reconcile("Array(Nullable(Int32))", "Array(Nullable(Int64))"),
        Reconcile::Refuse
    );
}

#[test]
fn add_widen_and_drop() {
    let v1 = orders();
    let mut v2 = v1.clone();
    v2.columns.push(ColumnSchema {
        attnum: Some(7),
        ..ColumnSchema::builtin("note", 25, -1, "text", false)
    });
    v2.columns[5] = ColumnSchema {
        attnum: Some(6),
        ..ColumnSchema::builtin("op", 20, -1, "bigint", true)
    };
    let mut v1_text_op = v1.clone();
    v1_text_op.columns[5] = ColumnSchema {
        attnum: Some(6),
        ..ColumnSchema::builtin("op", 23, -1, "integer", false)
    };
    let have = existing(&v1_text_op);
    let history = vec![Arc::new(v1_text_op.clone()), Arc::new(v2.clone())];
    let p2 = plan(&names(), &have, &v2, &history, v("18.16")).unwrap();
    assert_eq!(
        p2.changes,
        vec![
            Change::Modify {
                column: "op".into(),
                from: "Int32".into(),
                to: "Nullable(Int64)".into()
            },
            Change::Add {
                column: "note".into(),
                ty: "Nullable(String)".into(),
                default: None,
            },
        ]
    );
    assert_eq!(
        p2.changes[1].sql(&names()),
        "ALTER TABLE `db`.`orders` ADD COLUMN `note` Nullable(String)"
    );
    // v3 drops `price` (Nullable: nothing to do) and `op` after it was made NOT NULL.
    let mut v3 = v2.clone();
    v3.columns.retain(|c| c.name != "price");
    let mut have = existing(&v2);
    have.iter_mut().find(|(n, _)| n == "op").unwrap().1 = "Int64".into();
    v3.columns.retain(|c| c.name != "op");
    v3.key = vec![0, 1];
    let plan3 = plan(&names(), &have, &v3, &history, v("18.16")).unwrap();
    assert_eq!(
        plan3.changes,
        vec![Change::Modify {
            column: "op".into(),
            from: "Int64".into(),
            to: "Nullable(Int64)".into()
        }]
    );
    assert!(!plan3.state.columns.contains_key("price"));
}

#[test]
fn renames_follow_the_server() {
    let v1 = orders();
    let mut v2 = v1.clone();
    v2.columns[5].name = "kind".into();
    let history = vec![Arc::new(v1.clone()), Arc::new(v2.clone())];
    let have = existing(&v1);
    let old = plan(&names(), &have, &v2, &history, v("18.16")).unwrap();
    assert_eq!(
        old.changes,
        vec![Change::Add {
            column: "kind".into(),
            ty: "Nullable(String)".into(),
            default: Some("`op`".into()),
        }]
    );
    assert_eq!(
        old.changes[0].sql(&names()),
        "ALTER TABLE `db`.`orders` ADD COLUMN `kind` Nullable(String) DEFAULT CAST(`op` AS Nullable(String))"
    );
    let have = existing_on(&v1, "26.9");
    let new = plan(&names(), &have, &v2, &history, v("26.9")).unwrap();
    assert_eq!(
        new.changes,
        vec![Change::Rename {
            from: "op".into(),
            to: "kind".into()
        }]
    );
    assert_eq!(
        new.changes[0].sql(&names()),
        "ALTER TABLE `db`.`orders` RENAME COLUMN `op` TO `kind`"
    );
    // After the rename, rows of v1 write the column's new name.
    let mut renamed = have.clone();
    renamed.iter_mut().find(|(n, _)| n == "op").unwrap().0 = "kind".into();
    let late_v1 = plan(&names(), &renamed, &v1, &history, v("26.9")).unwrap();
    assert!(late_v1.changes.is_empty(), "{:?}", late_v1.changes);
    assert_eq!(&*late_v1.state.columns["op"].ch_name, "kind");
}

#[test]
fn unsafe_changes_are_refused_with_what_to_do() {
    let v1 = orders();
    let mut v2 = v1.clone();
    v2.columns[5] = ColumnSchema {
        attnum: Some(6),
        ..ColumnSchema::builtin("op", 23, -1, "integer", true)
    };
    let history = vec![Arc::new(v1.clone()), Arc::new(v2.clone())];
    let r = plan(&names(), &existing(&v1), &v2, &history, v("18.16")).unwrap_err();
    assert_eq!(
        (r.column.as_str(), r.old.as_str()),
        ("op", "Nullable(String)")
    );
    let text = r.to_string();
    assert!(
        text.contains("`db`.`orders`")
            && text.contains("integer (Nullable(Int32))")
            && text.contains("dead-letter"),
        "{text}"
    );
    // A key column's type, and the key itself.
    let mut k = v1.clone();
    k.columns[0] = ColumnSchema {
        attnum: Some(1),
        ..ColumnSchema::builtin("tenant", 20, -1, "bigint", false)
    };
    assert!(plan(
        &names(),
        &existing(&v1),
        &k,
        &[Arc::new(v1.clone())],
        v("18.16")
    )
    .is_err());
    let mut rekeyed = v1.clone();
    rekeyed.key = vec![1];
    assert!(plan(
        &names(),
        &existing(&v1),
        &rekeyed,
        &[Arc::new(v1.clone())],
        v("18.16")
    )
    .is_err());
    let mut keyless = v1.clone();
    keyless.key = vec![];
    assert!(plan(&names(), &[], &keyless, &[], v("18.16")).is_err());
}

#[test]
fn a_column_added_with_a_default_gives_the_rows_already_there_its_value() {
    let v1 = orders();
    let mut v2 = v1.clone();
    v2.columns.push(ColumnSchema {
        attnum: Some(40),
        missing: Some("it's".into()),
        ..ColumnSchema::builtin("note", 25, -1, "text", true)
    });
    let history = vec![Arc::new(v1.clone()), Arc::new(v2.clone())];
    let p = plan(&names(), &existing(&v1), &v2, &history, v("18.16")).unwrap();
    assert_eq!(
        p.changes[0].sql(&names()),
        r"ALTER TABLE `db`.`orders` ADD COLUMN `note` Nullable(String) DEFAULT CAST('it\'s' AS Nullable(String))"
    );
}

#[test]
fn on_a_cluster_a_change_alters_the_replicated_storage_on_every_server() {
    let change = Change::Add {
        column: "c".into(),
        ty: "Nullable(Int32)".into(),
        default: None,
    };
    assert_eq!(
        change.sql(&names()),
        "ALTER TABLE `db`.`orders` ADD COLUMN `c` Nullable(Int32)"
    );
    assert_eq!(
        change.sql(&names().with_cluster(Some("cdc_relay".into()))),
        "ALTER TABLE `db`.`orders_local` ON CLUSTER `cdc_relay` ADD COLUMN `c` Nullable(Int32)"
    );
}
