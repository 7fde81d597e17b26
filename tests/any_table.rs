//! Any table through `stream` (issue #12): every column under its PostgreSQL name and faithfully
//! typed, the schema published before the rows that name it, any primary key, tables without the
//! ledger, live schema changes, and the seed's form kept for a table of its shape.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// The schema records of `topic`, by id.
fn schemas(topic: &str, at_least: usize) -> std::collections::HashMap<String, Value> {
    read_topic(
        &format!("{topic}.schemas"),
        at_least,
        Duration::from_secs(20),
        Duration::from_millis(500),
    )
    .into_iter()
    .map(|r| (r.key.unwrap(), r.value))
    .collect()
}

fn columns(msg: &Received) -> &serde_json::Map<String, Value> {
    msg.value["columns"].as_object().expect("columns form")
}

#[tokio::test(flavor = "multi_thread")]
async fn every_type_arrives_as_documented_with_its_schema_published_first() {
    let t = AnyTable::new(
        "anytypes",
        "CREATE TYPE {t}_mood AS ENUM ('sad', 'happy'); \
         CREATE DOMAIN {t}_pos AS integer CHECK (VALUE > 0); \
         CREATE TABLE {t} (id bigint PRIMARY KEY, i2 smallint, i4 integer NOT NULL, i8 bigint, \
           n numeric, n2 numeric(10,2), f4 real, f8 double precision, fnan double precision, \
           finf double precision, b boolean, tx text, vc varchar(5), ch char(3), u uuid, d date, \
           tm time, tz timetz, ts timestamp, tstz timestamptz, iv interval, by bytea, j json, \
           jb jsonb, ai integer[], at text[], m {t}_mood, dom {t}_pos, ip inet, cd cidr, \
           mac macaddr, big text)",
    )
    .await;
    let relay = t.start();
    wait_slot_streaming(&t.pg, &t.name, Duration::from_secs(30)).await;
    t.exec(
        "INSERT INTO {t} VALUES (9223372036854775807, -32768, 2147483647, -9007199254740993, \
           '12345678901234567890.123456789', 12.30, 1.5, 0.1, 'NaN', '-Infinity', true, \
           'tab\there \"q\" ü', 'abc', 'ab', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2024-02-29', \
           '23:59:59.999999', '10:00:00+05:30', '2024-01-01 10:00:00.123456', \
           '2024-01-01 05:30:00.5+05:30', '1 year 2 mons 3 days 04:05:06.789', '\\x00ff', \
           '{\"b\": 1, \"a\": [1, 2]}', '{\"k\": null}', '{1,NULL,3}', '{\"a b\",NULL}', 'happy', 5, \
           '192.168.0.1/24', '10.0.0.0/8', '08:00:2b:01:02:03', repeat('x', 100000)); \
         INSERT INTO {t} (id, i4) VALUES (1, 0);",
    )
    .await;
    let mut msgs = read_topic(&t.name, 2, Duration::from_secs(30), Duration::from_secs(1));
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    // Two keys, so maybe two partitions: the big key first.
    msgs.sort_by_key(|m| std::cmp::Reverse(m.key.clone()));
    let full = columns(&msgs[0]);
    let expected = json!({
        "id": 9223372036854775807_i64, "i2": -32768, "i4": 2147483647, "i8": -9007199254740993_i64,
        "n": "12345678901234567890.123456789", "n2": "12.30", "f4": 1.5, "f8": 0.1,
        "fnan": "NaN", "finf": "-Infinity", "b": true, "tx": "tab\there \"q\" ü", "vc": "abc",
        "ch": "ab ", "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "d": "2024-02-29",
        "tm": "23:59:59.999999", "tz": "10:00:00+05:30", "ts": "2024-01-01T10:00:00.123456",
        "tstz": "2024-01-01T00:00:00.500000Z", "iv": "1 year 2 mons 3 days 04:05:06.789",
        "by": "AP8=", "j": {"a": [1, 2], "b": 1}, "jb": {"k": null}, "ai": [1, null, 3],
        "at": ["a b", null], "m": "happy", "dom": 5, "ip": "192.168.0.1/24", "cd": "10.0.0.0/8",
        "mac": "08:00:2b:01:02:03", "big": "x".repeat(100_000),
    });
    for (name, want) in expected.as_object().unwrap() {
        assert_eq!(
            full.get(name),
            Some(want),
            "column {name} of {}",
            msgs[0].value
        );
    }
    let names: Vec<&String> = full.keys().collect();
    assert_eq!(
        names.len(),
        expected.as_object().unwrap().len(),
        "{names:?}"
    );
    assert_eq!(msgs[0].key.as_deref(), Some("9223372036854775807"));
    assert_eq!(msgs[0].value["op"], "insert");
    // NULL is null, and the second row's key is its own.
    assert_eq!(columns(&msgs[1])["i8"], Value::Null);
    assert_eq!(msgs[1].key.as_deref(), Some("1"));

    // The header names a record that describes the table.
    let id = msgs[0].schema.clone().expect("schema header");
    assert_eq!(msgs[1].schema.as_deref(), Some(id.as_str()));
    let records = schemas(&t.name, 1);
    let record = &records[&id];
    assert_eq!(record["table"], t.name.as_str());
    assert_eq!(record["key"], json!([0]));
    let col = |n: &str| {
        record["columns"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == n)
            .unwrap()
            .clone()
    };
    assert_eq!(col("i4")["nullable"], false);
    assert_eq!(col("i8")["nullable"], true);
    assert_eq!(
        col("n2")["kind"],
        json!({"type": "numeric", "precision": 10, "scale": 2})
    );
    assert_eq!(col("vc")["type_name"], "character varying(5)");
    assert_eq!(col("m")["kind"]["type"], "enum");
    assert_eq!(col("dom")["kind"]["base"], json!({"type": "int4"}));
    assert_eq!(
        col("ai")["kind"],
        json!({"type": "array", "element": {"type": "int4"}})
    );
    assert_eq!(relay.stop(), 0);
    t.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn composite_and_uuid_keys_key_their_messages_and_a_key_change_is_a_delete_and_a_move() {
    let t = AnyTable::new(
        "anykeys",
        "CREATE TABLE {t} (tenant integer, code text, qty integer, note text, \
           PRIMARY KEY (tenant, code)); \
         CREATE TABLE {t}_u (id uuid PRIMARY KEY, v text); \
         ALTER TABLE {t} ALTER COLUMN note SET STORAGE EXTERNAL;",
    )
    .await;
    let relay = t.start();
    wait_slot_streaming(&t.pg, &t.name, Duration::from_secs(30)).await;
    t.exec(
        "INSERT INTO {t} VALUES (1, 'a', 10, repeat('n', 5000)); \
         UPDATE {t} SET qty = 11 WHERE tenant = 1 AND code = 'a'; \
         UPDATE {t} SET code = 'b' WHERE tenant = 1 AND code = 'a'; \
         DELETE FROM {t} WHERE tenant = 1 AND code = 'b';",
    )
    .await;
    let msgs = read_topic(&t.name, 5, Duration::from_secs(30), Duration::from_secs(1));
    let ops: Vec<(&str, Option<&str>)> = msgs
        .iter()
        .map(|m| (m.value["op"].as_str().unwrap(), m.key.as_deref()))
        .collect();
    let (a, b) = (r#"{"code":"a","tenant":1}"#, r#"{"code":"b","tenant":1}"#);
    assert_eq!(
        ops,
        vec![
            ("insert", Some(a)),
            ("update", Some(a)),
            ("delete", Some(a)),
            ("update", Some(b)),
            ("delete", Some(b)),
        ]
    );
    // The update that left the TOASTed note out says so; the move names the old key.
    assert_eq!(msgs[1].value["unchanged"], json!(["note"]));
    assert_eq!(
        msgs[3].value["moved_from"],
        json!({"code": "a", "tenant": 1})
    );
    assert_eq!(
        columns(&msgs[4]),
        json!({"tenant": 1, "code": "b"}).as_object().unwrap(),
        "a delete carries its key columns"
    );
    assert_eq!(relay.stop(), 0);

    // A uuid key is the Kafka key as its text.
    let u = format!("{}_u", t.name);
    t.pg.batch_execute(&format!(
        "GRANT SELECT ON {u} TO cdc_relay; CREATE PUBLICATION {u} FOR TABLE {u} WITH (publish = 'insert'); \
         INSERT INTO {u} VALUES ('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'before the slot')"
    ))
    .await
    .unwrap();
    let relay = Relay::start(&u, &stream_args(&u, &[]), &[]);
    wait_slot_streaming(&t.pg, &u, Duration::from_secs(30)).await;
    t.pg.batch_execute(&format!(
        "INSERT INTO {u} VALUES ('00000000-0000-0000-0000-000000000001', 'x')"
    ))
    .await
    .unwrap();
    let mut msgs = read_topic(&u, 2, Duration::from_secs(30), Duration::from_secs(1));
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    msgs.sort_by_key(|m| m.key.clone());
    // The row from before the slot comes with the initial snapshot, the later one streamed.
    assert_eq!(
        msgs[0].key.as_deref(),
        Some("00000000-0000-0000-0000-000000000001")
    );
    assert_eq!(msgs[0].value["op"], "insert");
    assert_eq!(
        msgs[1].key.as_deref(),
        Some("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
    );
    assert_eq!(msgs[1].value["op"], "snapshot");
    assert_eq!(relay.stop(), 0);
    drop_pipeline(&t.pg, &u).await;
    t.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_without_a_primary_key_is_refused_with_the_fix() {
    let t = AnyTable::new("anynopk", "CREATE TABLE {t} (a integer, b text)").await;
    let mut relay = t.start();
    let status = relay.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(2), "{}", relay.log_text());
    assert!(
        relay.log_text().contains("ADD PRIMARY KEY"),
        "{}",
        relay.log_text()
    );
    t.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn schema_changes_under_load_reach_the_topic_before_the_rows_that_need_them() {
    let t = AnyTable::new(
        "anyddl",
        "CREATE TABLE {t} (id integer PRIMARY KEY, a integer, dropme text, old text)",
    )
    .await;
    let relay = t.start();
    wait_slot_streaming(&t.pg, &t.name, Duration::from_secs(30)).await;
    let writer = {
        let name = t.name.clone();
        tokio::spawn(async move {
            let pg = pg().await;
            for i in 1..=600 {
                pg.batch_execute(&format!("INSERT INTO {name} (id, a) VALUES ({i}, {i})"))
                    .await
                    .unwrap();
            }
        })
    };
    for ddl in [
        "ALTER TABLE {t} ADD COLUMN c1 text DEFAULT 'dflt'",
        "ALTER TABLE {t} ALTER COLUMN a TYPE bigint",
        "ALTER TABLE {t} DROP COLUMN dropme",
        "ALTER TABLE {t} RENAME COLUMN old TO new",
        "ALTER TABLE {t} ADD COLUMN c2 numeric(12,3)",
    ] {
        tokio::time::sleep(Duration::from_millis(150)).await;
        t.exec(ddl).await;
    }
    writer.await.unwrap();
    t.exec("INSERT INTO {t} (id, a, c2) VALUES (1000, 5000000000, 1.5)")
        .await;
    let msgs = read_topic(
        &t.name,
        601,
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    assert_eq!(msgs.len(), 601);
    let records = schemas(&t.name, 2);
    let mut ids = std::collections::HashSet::new();
    for m in &msgs {
        // Every message's columns are exactly its schema record's.
        let id = m.schema.clone().expect("schema header");
        let record = records.get(&id).unwrap_or_else(|| panic!("no record {id}"));
        let names: Vec<&str> = record["columns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        let got: Vec<&str> = columns(m).keys().map(String::as_str).collect();
        let mut want = names.clone();
        want.sort_unstable();
        assert_eq!(got, want, "{}", m.value);
        ids.insert(id);
    }
    assert!(ids.len() >= 2, "the DDL made new schemas: {ids:?}");
    let last = msgs
        .iter()
        .find(|m| m.key.as_deref() == Some("1000"))
        .unwrap();
    assert_eq!(
        columns(last),
        json!({"id": 1000, "a": 5000000000_i64, "c1": "dflt", "new": null, "c2": "1.500"})
            .as_object()
            .unwrap()
    );
    let record = &records[last.schema.as_ref().unwrap()];
    let a = record["columns"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "a")
        .unwrap();
    assert_eq!(a["kind"], json!({"type": "int8"}));
    assert_eq!(relay.stop(), 0);
    t.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_column_added_to_a_ledger_table_travels_in_backfilled_and_streamed_rows() {
    let table = Table::new("anyseed").await;
    table
        .pg
        .batch_execute(&format!(
            "ALTER TABLE {0} ADD COLUMN country text; \
             INSERT INTO {0} (username, event_type, event_time, country) VALUES ('u1', 'login', '2024-01-01', 'NL')",
            table.name
        ))
        .await
        .unwrap();
    let relay = Relay::start(&table.name, &stream_args(&table.name, &[]), &[]);
    wait_slot_streaming(&table.pg, &table.name, Duration::from_secs(30)).await;
    table
        .pg
        .batch_execute(&format!(
            "INSERT INTO {} (username, event_type, event_time, country) VALUES ('u2', 'logout', '2024-01-02', 'DE')",
            table.name
        ))
        .await
        .unwrap();
    let msgs = read_topic(
        &table.name,
        2,
        Duration::from_secs(30),
        Duration::from_secs(1),
    );
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    let mut by_user: Vec<(String, Value, Value)> = msgs
        .iter()
        .map(|m| {
            (
                m.value["user"].as_str().unwrap().to_string(),
                m.value["columns"].clone(),
                m.value["op"].clone(),
            )
        })
        .collect();
    by_user.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        by_user,
        vec![
            ("u1".into(), json!({"country": "NL"}), json!("snapshot")),
            ("u2".into(), json!({"country": "DE"}), json!("insert")),
        ]
    );
    // The seed's fields are still there, and the ledger still records.
    assert_eq!(msgs[0].value["event_time"].as_str().unwrap().len(), 19);
    eventually("both rows marked sent", Duration::from_secs(20), || async {
        let n: i64 = table
            .pg
            .query_one(
                &format!("SELECT count(*) FROM {} WHERE sent_to_kafka", table.name),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (n == 2).then_some(())
    })
    .await;
    assert_eq!(relay.stop(), 0);
    table.drop().await;
}

/// Peak resident memory of a process, in kB.
fn peak_rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_columns_and_near_megabyte_jsonb_values_arrive_whole_in_bounded_memory() {
    let cols: Vec<String> = (1..=1000)
        .map(|i| format!("c{i} integer DEFAULT {i}"))
        .collect();
    let t = AnyTable::new(
        "anywide",
        &format!(
            "CREATE TABLE {{t}} (id integer PRIMARY KEY, {}, doc jsonb)",
            cols.join(", ")
        ),
    )
    .await;
    let relay = t.start();
    wait_slot_streaming(&t.pg, &t.name, Duration::from_secs(30)).await;
    // 60 rows of ~0.9 MB each, in one transaction: 54 MB through a stream whose Kafka queue is
    // bounded at 64 MB.
    t.exec(
        "INSERT INTO {t} (id, doc) SELECT g, (SELECT jsonb_agg(repeat(g::text, 900 / length(g::text)) || left(e.n::text, 0)) \
         FROM generate_series(1, 1000) AS e(n)) FROM generate_series(1, 60) g",
    )
    .await;
    let msgs = read_topic(&t.name, 60, Duration::from_secs(90), Duration::from_secs(1));
    assert_eq!(msgs.len(), 60);
    for m in &msgs {
        let c = columns(m);
        assert_eq!(c.len(), 1002);
        assert_eq!(c["c1000"], 1000);
        let id = c["id"].as_i64().unwrap();
        let doc = c["doc"].as_array().unwrap();
        assert_eq!(doc.len(), 1000);
        let s = id.to_string();
        assert_eq!(doc[999], Value::String(s.repeat(900 / s.len())));
    }
    let peak_mb = peak_rss_kb(relay.child.id()) / 1024;
    println!("stream peak RSS with 60 x 0.9 MB rows of 1002 columns: {peak_mb} MB");
    assert!(peak_mb < 400, "peak RSS {peak_mb} MB");
    assert_eq!(relay.stop(), 0);
    t.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_added_to_the_list_later_is_backfilled_then_streamed_and_the_other_loses_nothing() {
    let a = AnyTable::new(
        "anyadda",
        "CREATE TABLE {t} (id integer PRIMARY KEY, v text)",
    )
    .await;
    let b = Table::new("anyaddb").await;
    let ops = ["--ops", "insert,update,delete,truncate"];
    let first = Relay::start(&a.name, &stream_args(&a.name, &ops), &[]);
    wait_slot_streaming(&a.pg, &a.name, Duration::from_secs(30)).await;
    a.exec("INSERT INTO {t} SELECT g, 'a' FROM generate_series(1, 50) g")
        .await;
    let seen = read_topic(
        &a.name,
        50,
        Duration::from_secs(30),
        Duration::from_millis(200),
    );
    assert_eq!(seen.len(), 50);
    // A's initial snapshot (it has no ledger) runs beside those rows; a stop before it is
    // recorded done would make the next start read the whole table again, sending 1..50 a second
    // time as snapshot rows (docs/operations.md: an interrupted snapshot starts over).
    eventually("A's initial snapshot done", Duration::from_secs(30), || {
        let log = first.log_text();
        async move { log.contains("initial snapshot done").then_some(()) }
    })
    .await;
    assert_eq!(first.stop(), 0);

    // While it is stopped: more rows in A, and B's rows (unsent) before B is relayed at all.
    a.exec("INSERT INTO {t} SELECT g, 'a' FROM generate_series(51, 100) g")
        .await;
    b.exec("INSERT INTO {t} (username, event_type, event_time) SELECT 'b' || g, 'login', now() FROM generate_series(1, 30) g")
        .await;
    // Adding a table to the publication is its owner's to do (the relay role gets the statement).
    a.exec(&format!("ALTER PUBLICATION {{t}} ADD TABLE {}", b.name))
        .await;
    let args = tables_stream_args(&a.name, &[&a.name, &b.name], &ops);
    let second = start_relay(&a.name, &args);
    wait_slot_streaming(&a.pg, &a.name, Duration::from_secs(30)).await;
    a.exec("INSERT INTO {t} SELECT g, 'a' FROM generate_series(101, 120) g")
        .await;
    b.exec("INSERT INTO {t} (username, event_type, event_time) SELECT 'b' || g, 'login', now() FROM generate_series(31, 60) g")
        .await;
    b.wait_all_sent(Duration::from_secs(30)).await;

    let in_a = read_topic(
        &a.name,
        120,
        Duration::from_secs(30),
        Duration::from_secs(1),
    );
    let counts = by_key(&in_a);
    assert_eq!(counts.len(), 120, "every row of A");
    assert!(counts.values().all(|&n| n == 1), "none twice: {counts:?}");
    let in_b = read_topic(&b.name, 60, Duration::from_secs(30), Duration::from_secs(1));
    let counts = by_key(&in_b);
    assert_eq!(counts.len(), 60, "every row of B");
    assert!(counts.values().all(|&n| n == 1), "none twice: {counts:?}");
    let snapshots = in_b.iter().filter(|m| m.value["op"] == "snapshot").count();
    assert_eq!(
        snapshots, 30,
        "B's earlier rows are backfilled, the later streamed"
    );
    assert_eq!(second.stop(), 0);
    b.drop().await;
    a.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_initial_snapshot_reads_a_whole_table_once_merged_with_its_concurrent_changes() {
    let t = AnyTable::new(
        "anysnap",
        "CREATE TABLE {t} (tenant integer, code text, v integer, PRIMARY KEY (tenant, code)); \
         INSERT INTO {t} SELECT g % 7, 'c' || g, g FROM generate_series(1, 6000) g; \
         CREATE TABLE {t}_never (id integer PRIMARY KEY); INSERT INTO {t}_never VALUES (1);",
    )
    .await;
    let relay = Relay::start(
        &t.name,
        &stream_args(
            &t.name,
            &[
                "--ops",
                "insert,update,delete,truncate",
                "--backfill-chunk",
                "500",
            ],
        ),
        &[],
    );
    wait_slot_streaming(&t.pg, &t.name, Duration::from_secs(30)).await;
    // Changes while the chunks are read: each row's last message must be its final state.
    for round in 0..20 {
        t.exec(&format!(
            "UPDATE {{t}} SET v = -v WHERE v % 97 = {round}; \
             DELETE FROM {{t}} WHERE v % 89 = {round}; \
             INSERT INTO {{t}} VALUES (100, 'new{round}', {round})"
        ))
        .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let want: std::collections::HashMap<String, i64> =
        t.pg.query(&format!("SELECT tenant, code, v FROM {}", t.name), &[])
            .await
            .unwrap()
            .iter()
            .map(|r| {
                let key = json!({"tenant": r.get::<_, i32>(0), "code": r.get::<_, String>(1)});
                (key.to_string(), i64::from(r.get::<_, i32>(2)))
            })
            .collect();
    let total = eventually(
        "every row's final state",
        Duration::from_secs(60),
        || async {
            let msgs = read_topic(
                &t.name,
                want.len(),
                Duration::from_secs(5),
                Duration::from_secs(1),
            );
            // Per key, the messages are in order on its partition: the last one is the state.
            let mut last: std::collections::HashMap<String, &Received> = Default::default();
            for m in &msgs {
                last.insert(m.key.clone().unwrap(), m);
            }
            let current: std::collections::HashMap<String, i64> = last
                .iter()
                .filter(|(_, m)| m.value["op"] != "delete")
                .map(|(k, m)| (k.clone(), m.value["columns"]["v"].as_i64().unwrap()))
                .collect();
            (current == want).then_some(msgs)
        },
    )
    .await;
    // A row nobody touched during the test: one message, from the snapshot. A row the stream
    // carried while the snapshot ran is not read a second time by a later chunk.
    let mut per_key: std::collections::HashMap<String, Vec<&str>> = Default::default();
    for m in &total {
        per_key
            .entry(m.key.clone().unwrap())
            .or_default()
            .push(m.value["op"].as_str().unwrap());
    }
    let untouched: Vec<String> = (1..=6000)
        .filter(|g| g % 97 >= 20 && g % 89 >= 20)
        .map(|g| json!({"tenant": g % 7, "code": format!("c{g}")}).to_string())
        .collect();
    assert!(untouched.len() > 3500, "{}", untouched.len());
    for key in &untouched {
        assert_eq!(per_key.get(key), Some(&vec!["snapshot"]), "{key}");
    }
    let snapshot_rows = total.iter().filter(|m| m.value["op"] == "snapshot").count();
    let snapshot_keys: std::collections::HashSet<&String> = total
        .iter()
        .filter(|m| m.value["op"] == "snapshot")
        .filter_map(|m| m.key.as_ref())
        .collect();
    assert_eq!(snapshot_keys.len(), snapshot_rows, "each row read once");
    assert_eq!(relay.stop(), 0);

    // Restarted with a second table that asks for no snapshot: the done one is not read again,
    // the new one streams only what comes now.
    let never = format!("{}_never", t.name);
    t.exec(&format!(
        "GRANT SELECT ON {never} TO cdc_relay; ALTER PUBLICATION {{t}} ADD TABLE {never}"
    ))
    .await;
    let again = start_relay(
        &t.name,
        &tables_stream_args(
            &t.name,
            &[&t.name, &never],
            &[
                "--ops",
                "insert,update,delete,truncate",
                "--snapshot",
                "never",
            ],
        ),
    );
    wait_slot_streaming(&t.pg, &t.name, Duration::from_secs(30)).await;
    t.exec(&format!("INSERT INTO {never} VALUES (2)")).await;
    let in_never = read_topic(&never, 1, Duration::from_secs(30), Duration::from_secs(1));
    assert_eq!(
        in_never
            .iter()
            .map(|m| m.key.clone().unwrap())
            .collect::<Vec<_>>(),
        vec!["2"],
        "--snapshot never: only changes from now on"
    );
    let after = read_topic(
        &t.name,
        total.len(),
        Duration::from_secs(5),
        Duration::from_secs(2),
    );
    assert_eq!(
        after.len(),
        total.len(),
        "the done snapshot is not read again"
    );
    assert_eq!(again.stop(), 0);
    drop_pipeline(&t.pg, &never).await;
    t.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_truncate_of_two_relayed_tables_truncates_both() {
    let a = AnyTable::new(
        "anytrunc",
        "CREATE TABLE {t} (id integer PRIMARY KEY); CREATE TABLE {t}_b (id integer PRIMARY KEY)",
    )
    .await;
    let b = format!("{}_b", a.name);
    a.exec(&format!(
        "GRANT SELECT ON {b} TO cdc_relay; ALTER PUBLICATION {{t}} ADD TABLE {b}"
    ))
    .await;
    let relay = start_relay(
        &a.name,
        &tables_stream_args(
            &a.name,
            &[&a.name, &b],
            &["--ops", "insert,update,delete,truncate"],
        ),
    );
    wait_slot_streaming(&a.pg, &a.name, Duration::from_secs(30)).await;
    a.exec(&format!(
        "INSERT INTO {{t}} VALUES (1); INSERT INTO {b} VALUES (1); TRUNCATE {{t}}, {b}"
    ))
    .await;
    for topic in [&a.name, &b] {
        let msgs = read_topic(topic, 2, Duration::from_secs(30), Duration::from_secs(1));
        // Maybe on two partitions (a truncate has no key): compared as a set.
        let mut ops: Vec<&str> = msgs
            .iter()
            .map(|m| m.value["op"].as_str().unwrap())
            .collect();
        ops.sort_unstable();
        assert_eq!(ops, vec!["insert", "truncate"], "{topic}");
    }
    assert_eq!(relay.stop(), 0);
    drop_pipeline(&a.pg, &b).await;
    a.drop().await;
}
