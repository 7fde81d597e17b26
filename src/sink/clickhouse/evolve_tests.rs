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
fn existing(rel: &RelationSchema) -> Vec<Stored> {
    existing_on(rel, "18.16")
}

fn existing_on(rel: &RelationSchema, version: &str) -> Vec<Stored> {
    let caps = caps_of(v(version));
    (0..rel.columns.len())
        .map(|i| Stored {
            attnum: rel.columns[i].attnum,
            in_key: rel.key.contains(&i),
            ..Stored::new(&rel.columns[i].name, &column_type(rel, i, caps))
        })
        .chain(META_COLUMNS_FOR_TEST.iter().map(|(n, t)| Stored::new(n, t)))
        .collect()
}

fn set_type(have: &mut [Stored], name: &str, ty: &str) {
    have.iter_mut().find(|s| s.name == name).unwrap().ty = ty.into();
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
                to: "Nullable(Int64)".into(),
                default: None,
            },
            Change::Add {
                column: "note".into(),
                ty: "Nullable(String)".into(),
                default: None,
                attnum: Some(7),
            },
        ]
    );
    assert_eq!(
        p2.changes[1].sql(&names()),
        "ALTER TABLE `db`.`orders` ADD COLUMN `note` Nullable(String), COMMENT COLUMN `note` 'PostgreSQL attnum 7'"
    );
    // v3 drops `price` (Nullable: nothing to do) and `op` after it was made NOT NULL.
    let mut v3 = v2.clone();
    v3.columns.retain(|c| c.name != "price");
    let mut have = existing(&v2);
    set_type(&mut have, "op", "Int64");
    v3.columns.retain(|c| c.name != "op");
    v3.key = vec![0, 1];
    let plan3 = plan(&names(), &have, &v3, &history, v("18.16")).unwrap();
    assert_eq!(
        plan3.changes,
        vec![Change::Modify {
            column: "op".into(),
            from: "Int64".into(),
            to: "Nullable(Int64)".into(),
            default: None,
        }]
    );
    assert!(!plan3.state.columns.contains_key("price"));
}

/// `rel` with the column of `attnum` renamed to `name`.
fn renamed(rel: &RelationSchema, attnum: i16, name: &str) -> RelationSchema {
    let mut r = rel.clone();
    r.columns
        .iter_mut()
        .find(|c| c.attnum == Some(attnum))
        .unwrap()
        .name = name.into();
    r
}

fn added(rel: &RelationSchema, attnum: i16, name: &str, oid: u32, ty: &str) -> RelationSchema {
    let mut r = rel.clone();
    r.columns.push(ColumnSchema {
        attnum: Some(attnum),
        ..ColumnSchema::builtin(name, oid, -1, ty, true)
    });
    r
}

fn view_of(p: &Plan) -> Vec<(&str, &str)> {
    p.view
        .iter()
        .map(|(s, l)| (s.as_str(), l.as_str()))
        .collect()
}

#[test]
fn a_rename_is_a_new_label_on_every_server() {
    let v1 = orders();
    let v2 = renamed(&v1, 6, "kind");
    let history = vec![Arc::new(v1.clone()), Arc::new(v2.clone())];
    for version in ["18.16", "26.9"] {
        let have = existing_on(&v1, version);
        let p = plan(&names(), &have, &v2, &history, v(version)).unwrap();
        assert!(p.changes.is_empty(), "{version}: {:?}", p.changes);
        assert_eq!(&*p.state.columns["kind"].ch_name, "op");
        assert_eq!(view_of(&p)[5], ("op", "kind"), "{version}");
        // Late rows of v1 write the same storage column; the view keeps the newest name.
        let late = plan(&names(), &have, &v1, &history, v(version)).unwrap();
        assert!(late.changes.is_empty());
        assert_eq!(&*late.state.columns["op"].ch_name, "op");
        assert_eq!(view_of(&late)[5], ("op", "kind"));
    }
}

#[test]
fn a_renamed_column_and_a_new_one_of_its_old_name_keep_their_values_apart() {
    // BEGIN; RENAME COLUMN op TO op_old; ADD COLUMN op integer; COMMIT;
    let v1 = orders();
    let v2 = added(&renamed(&v1, 6, "op_old"), 7, "op", 23, "integer");
    let history = vec![Arc::new(v1.clone()), Arc::new(v2.clone())];
    let p = plan(&names(), &existing(&v1), &v2, &history, v("18.16")).unwrap();
    assert_eq!(
        p.changes,
        vec![Change::Add {
            column: "op__7".into(),
            ty: "Nullable(Int32)".into(),
            default: None,
            attnum: Some(7),
        }]
    );
    assert_eq!(&*p.state.columns["op_old"].ch_name, "op");
    assert_eq!(&*p.state.columns["op"].ch_name, "op__7");
    let view = view_of(&p);
    assert!(view.contains(&("op", "op_old")) && view.contains(&("op__7", "op")));
    // A v1 row arriving late (another partition, a re-read) still writes attnum 6.
    let mut have = existing(&v1);
    have.push(Stored {
        attnum: Some(7),
        ..Stored::new("op__7", "Nullable(Int32)")
    });
    let late = plan(&names(), &have, &v1, &history, v("18.16")).unwrap();
    assert!(late.changes.is_empty(), "{:?}", late.changes);
    assert_eq!(&*late.state.columns["op"].ch_name, "op");
    assert_eq!(view_of(&late), view);
}

#[test]
fn a_swap_of_two_names_swaps_the_labels_not_the_values() {
    let v1 = orders();
    // RENAME id TO tmp; RENAME op TO id ... on non-key columns: price (3) and op (6).
    let v2 = renamed(&renamed(&v1, 3, "op_swap"), 6, "price");
    let v2 = renamed(&v2, 3, "op");
    let history = vec![Arc::new(v1.clone()), Arc::new(v2.clone())];
    let mut have = existing(&v1);
    // Both text, so that a name match alone would have planned nothing.
    set_type(&mut have, "price", "Nullable(String)");
    let mut v2t = v2.clone();
    v2t.columns[2] = ColumnSchema {
        attnum: Some(3),
        ..ColumnSchema::builtin("op", 25, -1, "text", true)
    };
    let p = plan(&names(), &have, &v2t, &history, v("18.16")).unwrap();
    assert!(p.changes.is_empty(), "{:?}", p.changes);
    assert_eq!(&*p.state.columns["op"].ch_name, "price");
    assert_eq!(&*p.state.columns["price"].ch_name, "op");
    let view = view_of(&p);
    assert!(view.contains(&("price", "op")) && view.contains(&("op", "price")));
}

#[test]
fn a_dropped_and_re_added_column_is_a_new_column() {
    // DROP COLUMN op; ADD COLUMN op integer DEFAULT 0;
    let v1 = orders();
    let mut v2 = v1.clone();
    v2.columns.retain(|c| c.name != "op");
    let mut v2 = added(&v2, 7, "op", 23, "integer");
    v2.columns[5].missing = Some("0".into());
    let history = vec![Arc::new(v1.clone()), Arc::new(v2.clone())];
    let p = plan(&names(), &existing(&v1), &v2, &history, v("18.16")).unwrap();
    assert_eq!(
        p.changes,
        vec![Change::Add {
            column: "op__7".into(),
            ty: "Nullable(Int32)".into(),
            default: Some("0".into()),
            attnum: Some(7),
        }]
    );
    // The dropped column's values stay in the table but not under the new column's name.
    let view = view_of(&p);
    assert!(view.contains(&("op__7", "op")), "{view:?}");
    assert!(!view.iter().any(|(s, _)| *s == "op"), "{view:?}");
}

#[test]
fn a_historic_schema_without_attnums_is_matched_through_the_history() {
    // A replay across RENAME a TO b: the stream described a's old rows without an attnum.
    let v1 = orders();
    let v2 = renamed(&v1, 6, "kind");
    let history = vec![Arc::new(v1.clone()), Arc::new(v2.clone())];
    let mut replayed = v1.clone();
    replayed.columns[5].attnum = None;
    let p = plan(&names(), &existing(&v1), &replayed, &history, v("18.16")).unwrap();
    assert!(p.changes.is_empty(), "{:?}", p.changes);
    assert_eq!(&*p.state.columns["op"].ch_name, "op");
}

#[test]
fn tables_of_earlier_releases_get_their_attnums_recorded() {
    let v1 = orders();
    let v2 = renamed(&v1, 6, "kind");
    let history = vec![Arc::new(v1.clone()), Arc::new(v2.clone())];
    // 18.16 before this release: `kind DEFAULT CAST(op)` added after `op`, no comments.
    let mut have: Vec<Stored> = existing(&v1)
        .into_iter()
        .map(|s| Stored { attnum: None, ..s })
        .collect();
    have.insert(
        6,
        Stored {
            default: "CAST(op, 'Nullable(String)')".into(),
            ..Stored::new("kind", "Nullable(String)")
        },
    );
    let p = plan(&names(), &have, &v2, &history, v("18.16")).unwrap();
    assert_eq!(p.changes.len(), 7, "{:?}", p.changes);
    assert!(p.changes.contains(&Change::Comment {
        column: "kind".into(),
        attnum: 6
    }));
    assert_eq!(
        p.changes[0].sql(&names()),
        "ALTER TABLE `db`.`orders` COMMENT COLUMN `tenant` 'PostgreSQL attnum 1'"
    );
    assert_eq!(&*p.state.columns["kind"].ch_name, "kind");
    assert_eq!(view_of(&p)[5], ("kind", "kind"));
    assert_eq!(view_of(&p).len(), 6);
}

#[test]
fn a_type_change_keeps_the_columns_default() {
    let v1 = added(&orders(), 7, "qty", 23, "integer");
    let mut v2 = v1.clone();
    v2.columns[6] = ColumnSchema {
        attnum: Some(7),
        ..ColumnSchema::builtin("qty", 20, -1, "bigint", true)
    };
    let mut have = existing(&v1);
    have[6].default = "CAST(1, 'Nullable(Int32)')".into();
    let history = vec![Arc::new(v1.clone()), Arc::new(v2.clone())];
    let p = plan(&names(), &have, &v2, &history, v("18.16")).unwrap();
    assert_eq!(
        p.changes[0].sql(&names()),
        "ALTER TABLE `db`.`orders` MODIFY COLUMN `qty` Nullable(Int64) DEFAULT CAST(CAST(1, 'Nullable(Int32)') AS Nullable(Int64))"
    );
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
fn a_key_change_is_judged_by_the_tables_order_not_by_the_history() {
    // ALTER TABLE … DROP CONSTRAINT …_pkey, ADD PRIMARY KEY (tenant, id, price) on a (tenant, id)
    // table: its rows are refused while the table is ordered by the old key …
    let v1 = orders();
    let mut v2 = v1.clone();
    v2.key = vec![0, 1, 2];
    let history = vec![Arc::new(v1.clone()), Arc::new(v2.clone())];
    let old_table = existing(&v1);
    let r = plan(&names(), &old_table, &v2, &history, v("18.16")).unwrap_err();
    assert!(r.to_string().contains("verify --repair"), "{r}");
    // … rows of the old key still go in (the new key in the history does not poison them) …
    assert!(plan(&names(), &old_table, &v1, &history, v("18.16")).is_ok());
    // … and once the table is made again from the newest schema, its rows go in and the old
    // key's are refused.
    assert!(!same_key(&v1, &v2));
    let new_table = existing(&v2);
    assert!(plan(&names(), &new_table, &v2, &history, v("18.16")).is_ok());
    assert!(plan(&names(), &new_table, &v1, &history, v("18.16")).is_err());
    // A renamed key column is the same key.
    let renamed_key = renamed(&v1, 2, "code");
    assert!(same_key(&v1, &renamed_key));
    assert!(plan(&names(), &old_table, &renamed_key, &history, v("18.16")).is_ok());
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
        r"ALTER TABLE `db`.`orders` ADD COLUMN `note` Nullable(String) DEFAULT CAST('it\'s' AS Nullable(String)), COMMENT COLUMN `note` 'PostgreSQL attnum 40'"
    );
}

#[test]
fn on_a_cluster_a_change_alters_the_replicated_storage_on_every_server() {
    let change = Change::Add {
        column: "c".into(),
        ty: "Nullable(Int32)".into(),
        default: None,
        attnum: None,
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

#[test]
fn defaults_of_added_columns_reach_tables_created_later_and_arrays_have_them_too() {
    // ADD COLUMN tags text[] NOT NULL DEFAULT '{new,"a b"}', and a table first created from it.
    let mut v2 = orders();
    v2.columns.push(ColumnSchema {
        attnum: Some(7),
        missing: Some(r#"{new,"a b"}"#.into()),
        ..ColumnSchema::builtin("labels", 1009, -1, "text[]", false)
    });
    v2.columns.push(ColumnSchema {
        attnum: Some(8),
        missing: Some("5".into()),
        ..ColumnSchema::builtin("qty", 23, -1, "integer", false)
    });
    let create = crate::sink::clickhouse::table::create_table_sql(&names(), &v2, v("18.16"));
    assert!(
        create.contains("`labels` Array(Nullable(String)) DEFAULT CAST(['new', 'a b'] AS Array(Nullable(String))) COMMENT 'PostgreSQL attnum 7'"),
        "{create}"
    );
    assert!(
        create.contains("`qty` Int32 DEFAULT CAST(5 AS Int32) COMMENT 'PostgreSQL attnum 8'"),
        "{create}"
    );
    let history = vec![Arc::new(orders()), Arc::new(v2.clone())];
    let p = plan(&names(), &existing(&orders()), &v2, &history, v("18.16")).unwrap();
    assert_eq!(
        p.changes[0].sql(&names()),
        "ALTER TABLE `db`.`orders` ADD COLUMN `labels` Array(Nullable(String)) DEFAULT CAST(['new', 'a b'] AS Array(Nullable(String))), COMMENT COLUMN `labels` 'PostgreSQL attnum 7'"
    );
}

#[test]
fn on_a_cluster_attnums_are_inferred_from_names_without_comments() {
    // BEGIN; RENAME COLUMN op TO op_old; ADD COLUMN op integer; COMMIT; then a swap later.
    let cluster = names().with_cluster(Some("c".into()));
    let v1 = orders();
    let v2 = added(&renamed(&v1, 6, "op_old"), 7, "op", 23, "integer");
    let history = vec![Arc::new(v1.clone()), Arc::new(v2.clone())];
    let uncommented = |rel: &RelationSchema| -> Vec<Stored> {
        existing(rel)
            .into_iter()
            .map(|s| Stored { attnum: None, ..s })
            .collect()
    };
    let p = plan(&cluster, &uncommented(&v1), &v2, &history, v("18.16")).unwrap();
    assert_eq!(
        p.changes[0].sql(&cluster),
        "ALTER TABLE `db`.`orders_local` ON CLUSTER `c` ADD COLUMN `op__7` Nullable(Int32)"
    );
    assert_eq!(p.changes.len(), 1, "{:?}", p.changes);
    // The next plan finds both by their names.
    let mut have = uncommented(&v1);
    have.push(Stored::new("op__7", "Nullable(Int32)"));
    let again = plan(&cluster, &have, &v2, &history, v("18.16")).unwrap();
    assert!(again.changes.is_empty(), "{:?}", again.changes);
    assert_eq!(&*again.state.columns["op"].ch_name, "op__7");
    assert_eq!(&*again.state.columns["op_old"].ch_name, "op");
    let create = crate::sink::clickhouse::table::create_table_sql(&cluster, &v1, v("18.16"));
    assert!(!create.contains("COMMENT"), "{create}");
}

#[test]
fn two_source_tables_of_one_clickhouse_name_are_told_apart() {
    // public.app_orders and app.orders both map to `app_orders`.
    let v1 = orders();
    let ours = names().with_source("public.app_orders");
    let create = crate::sink::clickhouse::table::create_table_sql(&ours, &v1, v("18.16"));
    assert!(
        create.contains("COMMENT 'PostgreSQL attnum 1 of public.app_orders'"),
        "{create}"
    );
    let have: Vec<Stored> = existing(&v1)
        .into_iter()
        .map(|s| Stored {
            source: s.attnum.map(|_| "public.app_orders".to_string()),
            ..s
        })
        .collect();
    assert!(plan(&ours, &have, &v1, &[Arc::new(v1.clone())], v("18.16")).is_ok());
    let theirs = names().with_source("app.orders");
    let r = plan(&theirs, &have, &v1, &[Arc::new(v1.clone())], v("18.16")).unwrap_err();
    assert!(r.to_string().contains("public.app_orders"), "{r}");
    assert_eq!(
        Stored::from_catalog(
            "x".into(),
            "String".into(),
            String::new(),
            "PostgreSQL attnum 12 of app.orders",
            false
        ),
        Stored {
            attnum: Some(12),
            source: Some("app.orders".into()),
            ..Stored::new("x", "String")
        }
    );
}

#[test]
fn an_added_column_is_named_as_it_first_was_whichever_schema_adds_it() {
    // v2 adds attnum 7 as `c`, v3 renames it `d`; a sink that meets v3 first still adds `c`.
    let v1 = orders();
    let v2 = added(&v1, 7, "c", 25, "text");
    let v3 = renamed(&v2, 7, "d");
    let history = vec![Arc::new(v1.clone()), Arc::new(v2), Arc::new(v3.clone())];
    let p = plan(&names(), &existing(&v1), &v3, &history, v("18.16")).unwrap();
    assert_eq!(
        p.changes,
        vec![Change::Add {
            column: "c".into(),
            ty: "Nullable(String)".into(),
            default: None,
            attnum: Some(7),
        }]
    );
    assert_eq!(&*p.state.columns["d"].ch_name, "c");
}

#[test]
fn tables_an_earlier_release_renamed_on_current_servers_take_the_newest_names() {
    // 26.9 under the earlier release: RENAME op TO kind ran on the storage, no comments.
    let v1 = orders();
    let v2 = renamed(&v1, 6, "kind");
    let v3 = renamed(&renamed(&v2, 3, "op"), 6, "kind");
    let history = vec![
        Arc::new(v1.clone()),
        Arc::new(v2.clone()),
        Arc::new(v3.clone()),
    ];
    // After `RENAME op TO kind` then `RENAME price TO op`: storage `kind` (6) and `op` (3).
    let have: Vec<Stored> = existing_on(&v3, "26.9")
        .into_iter()
        .map(|s| Stored { attnum: None, ..s })
        .collect();
    let p = plan(&names(), &have, &v3, &history, v("26.9")).unwrap();
    assert_eq!(&*p.state.columns["op"].ch_name, "op");
    assert_eq!(&*p.state.columns["kind"].ch_name, "kind");
    assert!(p.changes.contains(&Change::Comment {
        column: "op".into(),
        attnum: 3
    }));
}
