//! The migrations real tools run, on the real services: a column is its attnum, never its name.
//! Each test writes rows before and after every step and ends with the ClickHouse current view
//! equal to PostgreSQL row by row, column by column (issue #25).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;

/// PostgreSQL's rows, each column as JSON text the way [`clickhouse_current`] gives ClickHouse's.
async fn pg_rows(t: &AnyTable, cols: &[&str]) -> Vec<HashMap<String, String>> {
    let sql = format!(
        "SELECT json_build_array({})::text FROM {} ORDER BY id",
        cols.join(", "),
        t.name
    );
    t.pg.query(&sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let values: Vec<serde_json::Value> = serde_json::from_str(r.get::<_, &str>(0)).unwrap();
            cols.iter()
                .zip(values)
                .map(|(c, v)| (c.to_string(), canon(&v.to_string())))
                .collect()
        })
        .collect()
}

/// Waits until ClickHouse's current view of `t` equals PostgreSQL on `cols` (the first is `id`).
async fn assert_converges(t: &AnyTable, cols: &[&str], sinks: &[&Relay]) {
    let want = pg_rows(t, cols).await;
    let logs = || {
        sinks
            .iter()
            .map(|s| s.log_text())
            .collect::<Vec<_>>()
            .join("\n----\n")
    };
    let table = format!("default.{}", t.name);
    wait_current_equal(
        &table,
        &cols.join(", "),
        "id",
        &want,
        Duration::from_secs(90),
        logs,
    )
    .await;
}

/// Waits until the slot has confirmed everything written so far.
async fn wait_confirmed(t: &AnyTable) {
    eventually("the slot to confirm every change", Duration::from_secs(60), || async {
        let row = t
            .pg
            .query_one(
                "SELECT confirmed_flush_lsn >= pg_current_wal_insert_lsn() FROM pg_replication_slots WHERE slot_name = $1",
                &[&t.name],
            )
            .await
            .ok()?;
        // A heartbeat or the next change moves it past the last commit.
        let done: Option<bool> = row.get(0);
        if done != Some(true) {
            t.pg.batch_execute("SELECT pg_logical_emit_message(false, 'cdc_relay_test', '')")
                .await
                .ok()?;
        }
        done.filter(|d| *d)
    })
    .await;
}

fn sink(t: &AnyTable, n: usize) -> Relay {
    let seed_table = format!("{}_seed", t.name);
    let dlq = format!("{}.sink-dlq", t.name);
    Relay::start(
        &format!("{}_sink{n}", t.name),
        &[
            "sink",
            "--group",
            &t.name,
            "--clickhouse-table",
            &seed_table,
            "--dlq-topic",
            &dlq,
            "--topic",
            &t.name,
        ],
        &[],
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn expand_contract_migrations_keep_every_rows_values_with_two_sinks_and_a_kill() {
    let t = AnyTable::new(
        "sfmig",
        "CREATE TABLE {t} (id integer PRIMARY KEY, email text, a text, b text, x integer)",
    )
    .await;
    t.exec(
        "INSERT INTO {t} SELECT i, 'e' || i, 'a' || i, 'b' || i, i FROM generate_series(1, 40) i",
    )
    .await;
    let mut stream = t.start();
    wait_slot_streaming(&t.pg, &t.name, Duration::from_secs(30)).await;
    let (s1, s2) = (sink(&t, 1), sink(&t, 2));
    assert_converges(&t, &["id", "email", "a", "b", "x"], &[&s1, &s2]).await;

    // 1. Rename, then re-add the old name, in one transaction; the stream is killed -9 between
    //    the DDL and the next row.
    wait_confirmed(&t).await;
    t.exec("BEGIN; ALTER TABLE {t} RENAME COLUMN email TO email_old; ALTER TABLE {t} ADD COLUMN email text; COMMIT")
        .await;
    stream.kill9();
    t.exec(
        "INSERT INTO {t} SELECT i, 'n' || i, 'a' || i, 'b' || i, i FROM generate_series(41, 50) i; \
         UPDATE {t} SET email = 'n' || id, email_old = 'o' || id WHERE id IN (45, 46); \
         UPDATE {t} SET email = 'new' || id WHERE id <= 5",
    )
    .await;
    stream = t.start();
    assert_converges(
        &t,
        &["id", "email_old", "email", "a", "b", "x"],
        &[&s1, &s2],
    )
    .await;

    // 2. A swap of two names (equal types: a name match would see no change at all).
    t.exec("BEGIN; ALTER TABLE {t} RENAME COLUMN a TO tmp; ALTER TABLE {t} RENAME COLUMN b TO a; ALTER TABLE {t} RENAME COLUMN tmp TO b; COMMIT")
        .await;
    t.exec(
        "INSERT INTO {t} (id, a, b) SELECT i, 'A' || i, 'B' || i FROM generate_series(51, 60) i; \
         UPDATE {t} SET a = 'sw' || id WHERE id BETWEEN 6 AND 10",
    )
    .await;
    assert_converges(
        &t,
        &["id", "email_old", "email", "a", "b", "x"],
        &[&s1, &s2],
    )
    .await;

    // 3. Drop and re-add a name with another type and a default the old rows read.
    t.exec("BEGIN; ALTER TABLE {t} DROP COLUMN x; ALTER TABLE {t} ADD COLUMN x text DEFAULT 'dflt'; COMMIT")
        .await;
    t.exec(
        "INSERT INTO {t} (id, x) SELECT i, 'x' || i FROM generate_series(61, 70) i; \
         UPDATE {t} SET x = 'u' WHERE id = 11",
    )
    .await;
    assert_converges(
        &t,
        &["id", "email_old", "email", "a", "b", "x"],
        &[&s1, &s2],
    )
    .await;

    // 4. Chained renames with rows in between (18.16 lost the middle ones). The stream describes
    //    a Relation with today's catalog, so each step is decoded before the next DDL (a replay
    //    across a rename is issue #25 item 5, not this test).
    t.exec("ALTER TABLE {t} RENAME COLUMN email_old TO e1")
        .await;
    t.exec("INSERT INTO {t} (id, e1) SELECT i, 'c' || i FROM generate_series(71, 75) i")
        .await;
    assert_converges(&t, &["id", "e1", "email", "a", "b", "x"], &[&s1, &s2]).await;
    t.exec("ALTER TABLE {t} RENAME COLUMN e1 TO e2").await;
    t.exec("INSERT INTO {t} (id, e2) SELECT i, 'd' || i FROM generate_series(76, 80) i")
        .await;

    // 5. A column added with a default, then widened: the rows before it keep reading the default
    //    (18.16 dropped a DEFAULT a MODIFY COLUMN did not repeat).
    t.exec("ALTER TABLE {t} ADD COLUMN qty integer DEFAULT 1")
        .await;
    t.exec("INSERT INTO {t} (id, qty) SELECT i, i FROM generate_series(81, 85) i")
        .await;
    assert_converges(
        &t,
        &["id", "e2", "email", "a", "b", "x", "qty"],
        &[&s1, &s2],
    )
    .await;
    t.exec("ALTER TABLE {t} ALTER COLUMN qty TYPE bigint").await;
    t.exec("INSERT INTO {t} (id, qty) VALUES (86, 5000000000)")
        .await;
    let all = ["id", "e2", "email", "a", "b", "x", "qty"];
    assert_converges(&t, &all, &[&s1, &s2]).await;

    // Nothing went to the dead-letter topics; both sinks stop cleanly.
    for s in [&s1, &s2] {
        let log = s.log_text();
        assert!(!log.contains("refused"), "{log}");
    }
    assert_eq!(s1.stop(), 0);
    // A sink started afresh in the same group plans the table from what ClickHouse recorded.
    let s3 = sink(&t, 3);
    t.exec("UPDATE {t} SET e2 = 'late', a = 'late' WHERE id = 1")
        .await;
    assert_converges(&t, &all, &[&s2, &s3]).await;
    assert_eq!(s2.stop(), 0);
    assert_eq!(s3.stop(), 0);
    assert_eq!(stream.stop(), 0);
    t.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn json_doubles_programs_write_arrive_exactly_instead_of_dead_lettering_the_row() {
    let t = AnyTable::new(
        "sfjson",
        "CREATE TABLE {t} (id integer PRIMARY KEY, doc jsonb, note text)",
    )
    .await;
    let stream = t.start();
    wait_slot_streaming(&t.pg, &t.name, Duration::from_secs(30)).await;
    let s1 = sink(&t, 1);
    t.exec(
        r#"INSERT INTO {t} VALUES
             (1, '{"ratio": 0.30000000000000004, "lon": 4.899431199999999}', 'a'),
             (2, '[1e-7, -2.5E+300, 0.1, 12345678901234567]', 'b'),
             (3, '{"n": 1.50}', 'c')"#,
    )
    .await;
    // JSON's null is not SQL's NULL.
    t.exec("INSERT INTO {t} VALUES (4, 'null'::jsonb, 'd'), (5, NULL, 'e')")
        .await;
    let table = format!("default.{}", t.name);
    let got = eventually(
        "five rows in ClickHouse",
        Duration::from_secs(60),
        || async {
            let rows = clickhouse_current(&table, "id, doc, note", "id").await;
            (rows.len() == 5).then_some(rows)
        },
    )
    .await;
    assert_eq!(got[3]["doc"], "\"null\"", "JSON null is stored as its text");
    assert_eq!(got[4]["doc"], "null", "SQL NULL stays NULL");
    let msgs = read_topic(&t.name, 5, Duration::from_secs(30), Duration::from_secs(1));
    let json_null = |key: &str| {
        msgs.iter()
            .find(|m| m.key.as_deref() == Some(key))
            .map(|m| m.value.get("json_null").cloned())
    };
    assert_eq!(json_null("4"), Some(Some(serde_json::json!(["doc"]))));
    assert_eq!(json_null("5"), Some(None));
    // ClickHouse holds each document as JSON text; its numbers are PostgreSQL's, value for value.
    let want =
        t.pg.query(
            &format!("SELECT doc::text FROM {} ORDER BY id", t.name),
            &[],
        )
        .await
        .unwrap();
    for (row, pg) in got.iter().zip(&want).take(3) {
        let stored: serde_json::Value = serde_json::from_str(&row["doc"]).unwrap();
        let stored: serde_json::Value = serde_json::from_str(stored.as_str().unwrap()).unwrap();
        let pg: serde_json::Value = serde_json::from_str(pg.get::<_, &str>(0)).unwrap();
        assert_eq!(stored, pg, "row {}", row["id"]);
    }
    assert_eq!(got[0]["note"], "\"a\"");
    assert!(
        !stream.log_text().contains("does not fit a double"),
        "{}",
        stream.log_text()
    );
    assert_eq!(s1.stop(), 0);
    assert_eq!(stream.stop(), 0);
    t.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_identity_index_other_than_the_key_is_refused_at_start_and_when_it_appears() {
    let t = AnyTable::new(
        "sfident",
        "CREATE TABLE {t} (id integer PRIMARY KEY, sku text NOT NULL UNIQUE, v text); \
         ALTER TABLE {t} REPLICA IDENTITY USING INDEX {t}_sku_key",
    )
    .await;
    let fix = format!(
        "ALTER TABLE \"public\".\"{}\" REPLICA IDENTITY DEFAULT",
        t.name
    );
    let mut refused = t.start();
    assert!(!refused.wait_exit(Duration::from_secs(60)).success());
    let log = refused.log_text();
    assert!(log.contains(&fix) && log.contains("_sku_key"), "{log}");

    // The key's own index is the default identity under another name: accepted.
    t.exec("ALTER TABLE {t} REPLICA IDENTITY USING INDEX {t}_pkey")
        .await;
    let mut stream = t.start();
    wait_slot_streaming(&t.pg, &t.name, Duration::from_secs(30)).await;
    let s1 = sink(&t, 1);
    t.exec("INSERT INTO {t} VALUES (1, 's1', 'a'), (2, 's2', 'b'); DELETE FROM {t} WHERE id = 1")
        .await;
    assert_converges(&t, &["id", "sku", "v"], &[&s1]).await;

    // Switched while the stream runs: the next change of the table stops it, saying what to run.
    t.exec("ALTER TABLE {t} REPLICA IDENTITY USING INDEX {t}_sku_key; DELETE FROM {t} WHERE sku = 's2'")
        .await;
    assert!(!stream.wait_exit(Duration::from_secs(60)).success());
    let log = stream.log_text();
    assert!(log.contains(&fix), "{log}");
    assert_eq!(s1.stop(), 0);
    t.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn changes_decoded_after_later_migrations_are_described_as_they_were_written() {
    // The stream is stopped while a deploy runs its migrations; the changes written before them are
    // decoded after them, when the catalog has another type, key name and column name.
    let t = AnyTable::new(
        "sfhist",
        "CREATE TYPE {t}_mood AS ENUM ('sad', 'ok'); \
         CREATE TABLE {t} (id integer PRIMARY KEY, m {t}_mood, a text)",
    )
    .await;
    let stream = t.start();
    wait_slot_streaming(&t.pg, &t.name, Duration::from_secs(30)).await;
    let s1 = sink(&t, 1);
    t.exec("INSERT INTO {t} VALUES (1, 'sad', 'a1')").await;
    assert_converges(&t, &["id", "m", "a"], &[&s1]).await;
    assert_eq!(stream.stop(), 0);

    t.exec(
        "INSERT INTO {t} VALUES (2, 'ok', 'a2'); UPDATE {t} SET m = 'ok', a = 'a1u' WHERE id = 1",
    )
    .await;
    // The enum-swap migration (the usual way to drop an enum value), a key column renamed, a
    // column renamed.
    t.exec(
        "ALTER TYPE {t}_mood RENAME TO {t}_mood_old; \
         CREATE TYPE {t}_mood AS ENUM ('ok', 'fine'); \
         UPDATE {t} SET m = 'ok' WHERE m = 'sad'; \
         ALTER TABLE {t} ALTER COLUMN m TYPE {t}_mood USING m::text::{t}_mood; \
         DROP TYPE {t}_mood_old; \
         ALTER TABLE {t} RENAME COLUMN id TO order_id; \
         ALTER TABLE {t} RENAME COLUMN a TO b; \
         INSERT INTO {t} VALUES (3, 'fine', 'b3')",
    )
    .await;
    let stream = t.start();
    let cols = ["order_id AS id", "m", "b"];
    // PostgreSQL's names; ClickHouse's view shows the same.
    let want_sql = format!(
        "SELECT json_build_array(order_id, m, b)::text FROM {} ORDER BY order_id",
        t.name
    );
    let want: Vec<Vec<String>> =
        t.pg.query(&want_sql, &[])
            .await
            .unwrap()
            .iter()
            .map(|r| {
                let v: Vec<serde_json::Value> = serde_json::from_str(r.get::<_, &str>(0)).unwrap();
                v.iter().map(|x| canon(&x.to_string())).collect()
            })
            .collect();
    assert_eq!(want.len(), 3);
    let table = format!("default.{}", t.name);
    let got = eventually(
        "ClickHouse equal to PostgreSQL",
        Duration::from_secs(90),
        || async {
            let rows: Vec<Vec<String>> = clickhouse_current(&table, &cols.join(", "), "id")
                .await
                .iter()
                .map(|r| ["id", "m", "b"].iter().map(|c| r[*c].clone()).collect())
                .collect();
            if rows == want {
                Some(rows)
            } else if stream.log_text().contains(" ERROR ") {
                panic!("stream: {}", stream.log_text())
            } else {
                None
            }
        },
    )
    .await;
    assert_eq!(got, want);
    assert_eq!(s1.stop(), 0);
    assert_eq!(stream.stop(), 0);
    let name = t.name.clone();
    t.drop().await;
    let _ = pg()
        .await
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {name}; DROP TYPE IF EXISTS {name}_mood"
        ))
        .await;
}

/// The stream of `t`, checking its tables every second.
fn start_checking(t: &AnyTable) -> Relay {
    Relay::start(
        &t.name,
        &stream_args(
            &t.name,
            &[
                "--ops",
                "insert,update,delete,truncate",
                "--heartbeat-interval",
                "1",
            ],
        ),
        &[],
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_swapped_in_by_rename_stops_the_stream_loudly_then_is_followed_whole() {
    for ledger in [false, true] {
        let extra = if ledger {
            ", sent_to_kafka boolean NOT NULL DEFAULT false"
        } else {
            ""
        };
        let t = AnyTable::new(
            "sfswap",
            &format!("CREATE TABLE {{t}} (id integer PRIMARY KEY, v text{extra})"),
        )
        .await;
        t.exec("GRANT UPDATE ON {t} TO cdc_relay; INSERT INTO {t} (id, v) SELECT i, 'old' || i FROM generate_series(1, 5) i")
            .await;
        let mut stream = start_checking(&t);
        wait_slot_streaming(&t.pg, &t.name, Duration::from_secs(30)).await;
        let s1 = sink(&t, 1);
        assert_converges(&t, &["id", "v"], &[&s1]).await;

        // What online schema-change tools do: build the new table, swap it in by rename.
        t.exec(
            "CREATE TABLE {t}_new (LIKE {t} INCLUDING ALL); \
             INSERT INTO {t}_new (id, v) VALUES (1, 'new1'), (10, 'new10'); \
             GRANT SELECT, UPDATE ON {t}_new TO cdc_relay; \
             BEGIN; ALTER TABLE {t} RENAME TO {t}_old; ALTER TABLE {t}_new RENAME TO {t}; COMMIT; \
             INSERT INTO {t} (id, v) VALUES (11, 'new11')",
        )
        .await;
        assert!(!stream.wait_exit(Duration::from_secs(60)).success());
        let log = stream.log_text();
        let fix = format!(
            "ALTER PUBLICATION \"{0}\" ADD TABLE \"public\".\"{0}\"",
            t.name
        );
        assert!(log.contains(&fix) && log.contains("OID"), "{log}");

        // The operator runs what it says; the restarted stream hides the old table's rows and
        // reads the new one whole.
        t.exec(&format!("ALTER PUBLICATION {0} ADD TABLE {0}", t.name))
            .await;
        t.exec(
            "INSERT INTO {t} (id, v) VALUES (12, 'new12'); UPDATE {t} SET v = 'upd' WHERE id = 10",
        )
        .await;
        let stream = start_checking(&t);
        assert_converges(&t, &["id", "v"], &[&s1]).await;
        // Later changes flow; a second restart does not truncate again.
        assert_eq!(stream.stop(), 0);
        let stream = start_checking(&t);
        t.exec("INSERT INTO {t} (id, v) VALUES (13, 'new13'); DELETE FROM {t} WHERE id = 1")
            .await;
        assert_converges(&t, &["id", "v"], &[&s1]).await;
        // The log file has every run of the stream: one truncate, the second start's.
        assert_eq!(
            stream
                .log_text()
                .matches("truncate of the table's earlier rows")
                .count(),
            1
        );
        if ledger {
            let sql = format!(
                "SELECT array_agg(id) FROM {} WHERE NOT sent_to_kafka",
                t.name
            );
            eventually(
                "the ledger to mark the new table's rows sent",
                Duration::from_secs(30),
                || async {
                    let unsent: Option<Vec<i32>> = t.pg.query_one(&sql, &[]).await.unwrap().get(0);
                    unsent.is_none().then_some(())
                },
            )
            .await;
        }
        assert_eq!(s1.stop(), 0);
        assert_eq!(stream.stop(), 0);
        let name = t.name.clone();
        t.drop().await;
        let _ = pg()
            .await
            .batch_execute(&format!("DROP TABLE IF EXISTS {name}_old"))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_change_dead_letters_its_rows_with_their_schema_header_and_the_table_goes_on() {
    let t = AnyTable::new(
        "sfrefuse",
        "CREATE TABLE {t} (id integer PRIMARY KEY, n text, other text)",
    )
    .await;
    let stream = t.start();
    wait_slot_streaming(&t.pg, &t.name, Duration::from_secs(30)).await;
    let s1 = sink(&t, 1);
    t.exec("INSERT INTO {t} VALUES (1, '5', 'x')").await;
    assert_converges(&t, &["id", "n", "other"], &[&s1]).await;
    // text -> integer: ClickHouse cannot convert the stored strings; the rows of this schema are
    // dead-lettered with their schema id, so they can be produced again once the table is fixed.
    t.exec("ALTER TABLE {t} ALTER COLUMN n TYPE integer USING n::integer; INSERT INTO {t} VALUES (2, 7, 'y')")
        .await;
    let dlq = read_topic(
        &format!("{}.sink-dlq", t.name),
        1,
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    let data = read_topic(&t.name, 2, Duration::from_secs(30), Duration::from_secs(1));
    let original = data
        .iter()
        .find(|m| m.key.as_deref() == Some("2"))
        .expect("row 2 in the topic");
    assert!(original.schema.is_some());
    assert_eq!(
        dlq[0].schema, original.schema,
        "the schema header travels along"
    );
    assert_eq!(dlq[0].value, original.value);
    assert_eq!(s1.stop(), 0);
    assert_eq!(stream.stop(), 0);
    t.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_seed_form_belongs_to_the_seed_table_not_to_column_names() {
    let slot = unique("sfseed");
    let (seed, other) = (format!("{slot}_s"), format!("{slot}_g"));
    let pg = pg().await;
    pg.batch_execute(&format!(
        "CREATE TABLE {seed} (id integer PRIMARY KEY, username text, event_type text, event_time timestamp); \
         CREATE TABLE {other} (id integer PRIMARY KEY, note text); \
         GRANT SELECT ON {seed}, {other} TO cdc_relay; \
         CREATE PUBLICATION {slot} FOR TABLE {seed}, {other} WITH (publish = 'insert, update, delete, truncate')"
    ))
    .await
    .unwrap();
    let sdlq = format!("{slot}.sdlq");
    let stream = start_relay(
        &slot,
        &tables_stream_args(
            &slot,
            &[&seed, &other],
            &[
                "--ops",
                "insert,update,delete,truncate",
                "--seed-table",
                &seed,
                "--stream-dlq-topic",
                &sdlq,
            ],
        ),
    );
    wait_slot_streaming(&pg, &slot, Duration::from_secs(30)).await;
    let seed_ch = format!("{slot}_ch");
    let dlq = format!("{slot}.sink-dlq");
    let sink = Relay::start(
        &format!("{slot}_sink"),
        &[
            "sink",
            "--group",
            &slot,
            "--clickhouse-table",
            &seed_ch,
            "--dlq-topic",
            &dlq,
            "--topic",
            &seed,
            "--topic",
            &other,
        ],
        &[],
    );
    pg.batch_execute(&format!(
        "INSERT INTO {seed} VALUES (1, 'ann', 'login', '2024-01-01 10:00:00'); \
         INSERT INTO {other} VALUES (1, 'n1')"
    ))
    .await
    .unwrap();
    let ch_rows = |sql: String| async move {
        let rows = clickhouse_current(&sql, "*", "id").await;
        rows.len()
    };
    eventually(
        "the seed's row in its table",
        Duration::from_secs(60),
        || {
            let t = format!("default.{seed_ch}");
            async move { (ch_rows(t).await == 1).then_some(()) }
        },
    )
    .await;

    // A table that gains the seed's column names stays in the columns form, in its own table.
    pg.batch_execute(&format!(
        "ALTER TABLE {other} ADD COLUMN username text, ADD COLUMN event_type text, ADD COLUMN event_time timestamp; \
         INSERT INTO {other} VALUES (2, 'n2', 'bob', 'x', '2024-01-02 00:00:00')"
    ))
    .await
    .unwrap();
    let got = eventually(
        "the other table's rows in its own table",
        Duration::from_secs(60),
        || {
            let t = format!("default.{other}");
            async move {
                let rows = clickhouse_current(&t, "id, note, username", "id").await;
                (rows.len() == 2).then_some(rows)
            }
        },
    )
    .await;
    assert_eq!(got[1]["username"], "\"bob\"");
    let msgs = read_topic(&other, 2, Duration::from_secs(30), Duration::from_secs(1));
    assert!(
        msgs.iter()
            .all(|m| m.value.get("columns").is_some() && m.value.get("user").is_none()),
        "{msgs:?}"
    );

    // The seed's table losing its shape is refused for it alone, loudly; the other table flows.
    pg.batch_execute(&format!(
        "ALTER TABLE {seed} DROP COLUMN event_time; INSERT INTO {seed} VALUES (2, 'cy', 'logout'); \
         INSERT INTO {other} (id, note) VALUES (3, 'n3')"
    ))
    .await
    .unwrap();
    let dead = read_topic(&sdlq, 1, Duration::from_secs(60), Duration::from_secs(1));
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(
        dead[0]
            .value
            .to_string()
            .contains("no longer has the seed's shape"),
        "{:?}",
        dead[0].value
    );
    eventually(
        "the other table's third row",
        Duration::from_secs(60),
        || {
            let t = format!("default.{other}");
            async move { (ch_rows(t).await == 3).then_some(()) }
        },
    )
    .await;
    assert_eq!(ch_rows(format!("default.{seed_ch}")).await, 1);
    assert_eq!(sink.stop(), 0);
    assert_eq!(stream.stop(), 0);
    drop_pipeline(&pg, &slot).await;
    let _ = pg
        .batch_execute(&format!("DROP TABLE IF EXISTS {seed}, {other}"))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_tables_whose_clickhouse_names_collide_never_share_a_table() {
    // `public.<x>_orders` and `<x>.orders` both map to ClickHouse `<x>_orders`.
    let x = unique("sfcol");
    let (public, other) = (format!("{x}_orders"), format!("{x}.orders"));
    let pg = pg().await;
    pg.batch_execute(&format!(
        "CREATE SCHEMA {x}; GRANT USAGE ON SCHEMA {x} TO cdc_relay; \
         CREATE TABLE {public} (id integer PRIMARY KEY, v text); \
         CREATE TABLE {other} (id integer PRIMARY KEY, v text); \
         GRANT SELECT ON {public}, {other} TO cdc_relay; \
         CREATE PUBLICATION {x} FOR TABLE {public}, {other} WITH (publish = 'insert, update, delete, truncate'); \
         INSERT INTO {public} SELECT i, 'p' || i FROM generate_series(1, 3) i; \
         INSERT INTO {other} SELECT i, 'o' || i FROM generate_series(101, 103) i"
    ))
    .await
    .unwrap();
    let (t1, t2) = (format!("{x}_t1"), format!("{x}_t2"));
    let stream = start_relay(
        &x,
        &[
            "stream",
            "--slot",
            &x,
            "--publication",
            &x,
            "--table",
            &public,
            "--table",
            &other,
            "--route",
            &format!("public.{public}={t1}"),
            "--route",
            &format!("{other}={t2}"),
            "--ops",
            "insert,update,delete,truncate",
        ]
        .map(String::from),
    );
    let dlq = format!("{x}.sink-dlq");
    let seed_ch = format!("{x}_seed");
    let sink = Relay::start(
        &format!("{x}_sink"),
        &[
            "sink",
            "--group",
            &x,
            "--clickhouse-table",
            &seed_ch,
            "--dlq-topic",
            &dlq,
            "--topic",
            &t1,
            "--topic",
            &t2,
        ],
        &[],
    );
    let dead = read_topic(&dlq, 3, Duration::from_secs(60), Duration::from_secs(2));
    assert_eq!(dead.len(), 3, "one table's rows are refused: {dead:?}");
    let table = format!("default.{x}_orders");
    let rows = eventually("the other table's rows", Duration::from_secs(60), || {
        let table = table.clone();
        async move {
            let rows = clickhouse_current(&table, "id, v", "id").await;
            (rows.len() == 3).then_some(rows)
        }
    })
    .await;
    let ids: Vec<&str> = rows.iter().map(|r| r["id"].as_str()).collect();
    assert!(
        ids == ["1", "2", "3"] || ids == ["101", "102", "103"],
        "rows of one source table only: {rows:?}"
    );
    assert_eq!(sink.stop(), 0);
    assert_eq!(stream.stop(), 0);
    drop_pipeline(&pg, &x).await;
    let _ = pg
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {public}; DROP SCHEMA IF EXISTS {x} CASCADE"
        ))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_primary_key_change_is_refused_then_the_documented_remedy_works() {
    let t = AnyTable::new(
        "sfkey",
        "CREATE TABLE {t} (id integer PRIMARY KEY, tenant integer NOT NULL, v text)",
    )
    .await;
    t.exec("INSERT INTO {t} SELECT i, i % 3, 'v' || i FROM generate_series(1, 20) i")
        .await;
    let stream = t.start();
    wait_slot_streaming(&t.pg, &t.name, Duration::from_secs(30)).await;
    let s1 = sink(&t, 1);
    assert_converges(&t, &["id", "tenant", "v"], &[&s1]).await;
    // The key changes: the table is ordered by the old one, so rows of the new key are refused.
    t.exec(
        "ALTER TABLE {t} DROP CONSTRAINT {t}_pkey, ADD PRIMARY KEY (tenant, id); \
         INSERT INTO {t} VALUES (21, 0, 'after'); UPDATE {t} SET v = 'upd' WHERE id = 5",
    )
    .await;
    let dlq = read_topic(
        &format!("{}.sink-dlq", t.name),
        2,
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    assert_eq!(dlq.len(), 2, "{dlq:?}");
    assert!(s1.log_text().contains("verify --repair"));
    // A restarted sink does not refuse the old key's rows in flight for the new key in the topic.
    assert_eq!(s1.stop(), 0);
    // The remedy the refusal prints: drop the table, its view and truncates; restart the sink
    // (the table is made again from the newest schema, with the new key); verify --repair.
    let ch = clickhouse(&env("CDC_RELAY_CLICKHOUSE_URL"));
    for suffix in ["_current", "", "_truncates"] {
        ch.query(&format!("DROP TABLE IF EXISTS default.{}{suffix}", t.name))
            .execute()
            .await
            .unwrap();
    }
    let s2 = sink(&t, 2);
    t.exec("INSERT INTO {t} VALUES (22, 1, 'new key')").await;
    let table = format!("default.{}", t.name);
    eventually("the table made again", Duration::from_secs(60), || async {
        let rows = clickhouse_current(&table, "id", "id").await;
        rows.iter().any(|r| r["id"] == "22").then_some(())
    })
    .await;
    let seed_ch = format!("{}_seed", t.name);
    let args: Vec<String> = [
        "verify",
        "--json",
        "--repair",
        "--table",
        &t.name,
        "--slot",
        &t.name,
        "--publication",
        &t.name,
        "--topic",
        &t.name,
        "--group",
        &t.name,
        "--clickhouse-table",
        &seed_ch,
    ]
    .map(String::from)
    .to_vec();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = relay(&args, &[]).output().unwrap();
    assert!(
        out.status.code() == Some(0) || out.status.code() == Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_converges(&t, &["id", "tenant", "v"], &[&s2]).await;
    let sorting: String = ch
        .query(&format!(
            "SELECT sorting_key FROM system.tables WHERE database = 'default' AND name = '{}'",
            t.name
        ))
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(sorting, "tenant, id");
    assert_eq!(s2.stop(), 0);
    assert_eq!(stream.stop(), 0);
    t.drop().await;
}
