//! The whole path for tables of any shape (issue #12): three tables (integer, uuid and composite
//! keys) streamed by one `stream` (one slot, one publication, a topic each) and written by one
//! `sink` consuming all three topics; after inserts,
//! updates (one changing a key, one leaving a TOASTed value out), deletes and a column added while
//! rows flow, each ClickHouse current view equals its PostgreSQL table row by row.

mod common;

use std::time::Duration;

use common::*;

/// Every row of `sql`'s result as text columns, sorted (PostgreSQL side).
async fn pg_rows(pg: &tokio_postgres::Client, sql: &str) -> Vec<Vec<Option<String>>> {
    let mut rows: Vec<Vec<Option<String>>> = pg
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (0..r.len()).map(|i| r.get(i)).collect())
        .collect();
    rows.sort();
    rows
}

/// The same from ClickHouse: `sql` must select `toString(…)` columns as one tab-separated line per
/// row (TSV), NULL as `\N`. `None` while the table does not exist yet.
async fn ch_rows(ch: &clickhouse::Client, sql: &str) -> Option<Vec<Vec<Option<String>>>> {
    let mut cursor = ch.query(sql).fetch_bytes("TabSeparated").ok()?;
    let bytes = cursor.collect().await.ok()?;
    let mut rows: Vec<Vec<Option<String>>> = String::from_utf8(bytes.to_vec())
        .unwrap()
        .lines()
        .map(|l| {
            l.split('\t')
                .map(|f| (f != "\\N").then(|| f.replace("\\\\", "\\")))
                .collect()
        })
        .collect();
    rows.sort();
    Some(rows)
}

#[tokio::test(flavor = "multi_thread")]
async fn three_tables_one_sink_each_current_view_equals_postgres_row_by_row() {
    let ints = AnyTable::new(
        "pti",
        "CREATE TABLE {t} (id bigint PRIMARY KEY, n integer, note text); \
         ALTER TABLE {t} ALTER COLUMN note SET STORAGE EXTERNAL",
    )
    .await;
    let uuids = AnyTable::new(
        "ptu",
        "CREATE TABLE {t} (id uuid PRIMARY KEY, v text, price numeric(10,2))",
    )
    .await;
    let pairs = AnyTable::new(
        "ptc",
        "CREATE TABLE {t} (tenant integer, code text, qty integer, PRIMARY KEY (tenant, code))",
    )
    .await;
    let tables = [&ints, &uuids, &pairs];
    // One publication of the three, made by their owner (the relay role may not).
    let (slot, publication) = (format!("{}_all", ints.name), format!("{}_all", ints.name));
    ints.pg
        .batch_execute(&format!(
            "CREATE PUBLICATION {publication} FOR TABLE {}, {}, {} WITH (publish = 'insert, update, delete, truncate')",
            ints.name, uuids.name, pairs.name
        ))
        .await
        .unwrap();
    let mut stream_args = vec![
        "stream",
        "--slot",
        &slot,
        "--publication",
        &publication,
        "--ops",
        "insert,update,delete,truncate",
    ];
    for t in tables {
        stream_args.extend(["--table", t.name.as_str()]);
    }
    let stream = Relay::start(&slot, &stream_args, &[]);
    wait_slot_streaming(&ints.pg, &slot, Duration::from_secs(30)).await;
    // Each table to its own topic, <schema>.<table>.
    let topics: Vec<String> = tables
        .iter()
        .map(|t| format!("public.{}", t.name))
        .collect();
    let seed_table = format!("{}_seed", ints.name);
    let dlq = format!("{}.sink-dlq", ints.name);
    let mut sink_args = vec![
        "sink",
        "--group",
        &ints.name,
        "--clickhouse-table",
        &seed_table,
        "--dlq-topic",
        &dlq,
    ];
    for topic in &topics {
        sink_args.extend(["--topic", topic.as_str()]);
    }
    let sink = Relay::start(&format!("{}_sink", ints.name), &sink_args, &[]);

    ints.exec(
        "INSERT INTO {t} SELECT g, g * 10, CASE WHEN g = 1 THEN repeat('big', 3000) END \
           FROM generate_series(1, 300) g; \
         UPDATE {t} SET n = -1 WHERE id = 1; \
         UPDATE {t} SET id = 1001 WHERE id = 2; \
         DELETE FROM {t} WHERE id BETWEEN 10 AND 19; \
         ALTER TABLE {t} ADD COLUMN added text; \
         INSERT INTO {t} (id, n, added) VALUES (5000, 5, 'new column');",
    )
    .await;
    uuids
        .exec(
            "INSERT INTO {t} SELECT md5(g::text)::uuid, 'v' || g, g / 7.0 FROM generate_series(1, 200) g; \
             UPDATE {t} SET v = NULL WHERE price > 20; \
             DELETE FROM {t} WHERE price < 1;",
        )
        .await;
    pairs
        .exec(
            "INSERT INTO {t} SELECT g % 5, 'c' || g, g FROM generate_series(1, 250) g; \
             UPDATE {t} SET code = code || '-moved' WHERE qty % 50 = 0; \
             DELETE FROM {t} WHERE tenant = 3 AND qty < 100;",
        )
        .await;

    let ch = clickhouse(&env("CDC_RELAY_CLICKHOUSE_URL"));
    let checks = [
        (
            &ints,
            "SELECT id::text, n::text, note, added FROM {t}",
            "SELECT toString(id), toString(n), note, added FROM {t}_current",
        ),
        (
            &uuids,
            "SELECT id::text, v, price::text FROM {t}",
            "SELECT toString(id), v, toString(price) FROM {t}_current",
        ),
        (
            &pairs,
            "SELECT tenant::text, code, qty::text FROM {t}",
            "SELECT toString(tenant), code, toString(qty) FROM {t}_current",
        ),
    ];
    for (t, pg_sql, ch_sql) in checks {
        let want = pg_rows(&t.pg, &pg_sql.replace("{t}", &t.name)).await;
        assert!(want.len() > 100, "{}: {} rows", t.name, want.len());
        let ch_sql = ch_sql.replace("{t}", &format!("default.{}", t.name));
        let got = eventually(
            &format!("ClickHouse's {} equals PostgreSQL's", t.name),
            Duration::from_secs(60),
            || {
                let (ch, want, ch_sql) = (ch.clone(), want.clone(), ch_sql.clone());
                async move {
                    let got = ch_rows(&ch, &ch_sql).await?;
                    (got == want).then_some(got)
                }
            },
        )
        .await;
        assert_eq!(got.len(), want.len());
    }
    // The update that left the TOASTed note out kept it; the moved row has its note (NULL) at 1001.
    let note = ch_rows(
        &ch,
        &format!(
            "SELECT toString(length(note)) FROM default.{}_current WHERE id = 1",
            ints.name
        ),
    )
    .await;
    assert_eq!(note, Some(vec![vec![Some("9000".to_string())]]));

    assert_eq!(sink.stop(), 0);
    assert_eq!(stream.stop(), 0);
    drop_pipeline(&ints.pg, &slot).await;
    for t in [ints, uuids, pairs] {
        t.drop().await;
    }
}

/// (column, its type, a PostgreSQL literal, the value ClickHouse 18.16 gives back as JSON).
const TYPES: &[(&str, &str, &str, &str)] = &[
    ("i8", "bigint", "9007199254740993", "9007199254740993"),
    ("num", "numeric(10,2)", "-12345678.90", "-12345678.90"),
    (
        "num_any",
        "numeric",
        "123456789012345678901234567890.123456789",
        "\"123456789012345678901234567890.123456789\"",
    ),
    ("f_nan", "double precision", "NaN", "\"nan\""),
    ("f_inf", "real", "Infinity", "\"inf\""),
    ("f_ninf", "double precision", "-Infinity", "\"-inf\""),
    ("f", "double precision", "0.1", "0.1"),
    ("b", "boolean", "true", "1"),
    (
        "txt",
        "text",
        "héllo \"q\" /slash\ttab",
        "\"héllo \\\"q\\\" /slash\\ttab\"",
    ),
    ("vc", "varchar(20)", "varchar", "\"varchar\""),
    ("ch", "char(5)", "ab", "\"ab   \""),
    (
        "u",
        "uuid",
        "9b2f0c4e-1111-4a5b-8c6d-000000000001",
        "\"9b2f0c4e-1111-4a5b-8c6d-000000000001\"",
    ),
    ("d", "date", "2024-02-29", "\"2024-02-29\""),
    ("tm", "time", "12:34:56.789", "\"12:34:56.789\""),
    ("tmz", "timetz", "12:34:56+02", "\"12:34:56+02\""),
    (
        "ts",
        "timestamp",
        "2024-01-01 12:00:00.123456",
        "1704110400123456",
    ),
    (
        "tsz",
        "timestamptz",
        "2024-01-01 12:00:00+02",
        "1704103200000000",
    ),
    (
        "iv",
        "interval",
        "1 year 2 mons 3 days 04:05:06",
        "\"1 year 2 mons 3 days 04:05:06\"",
    ),
    ("by", "bytea", "\\x00ff10", "\"00ff10\""),
    (
        "js",
        "json",
        "{\"b\": 1, \"a\": [1, 2]}",
        "\"{\\\"a\\\":[1,2],\\\"b\\\":1}\"",
    ),
    (
        "jb",
        "jsonb",
        "{\"a\": [1, 2], \"b\": 1}",
        "\"{\\\"a\\\":[1,2],\\\"b\\\":1}\"",
    ),
    ("ia", "integer[]", "{1,NULL,3}", "[1,null,3]"),
    ("ta", "text[]", "{a,NULL,\"b c\"}", "[\"a\",null,\"b c\"]"),
    ("e", "{mood}", "happy", "\"happy\""),
    ("ip", "inet", "192.168.0.1/24", "\"192.168.0.1/24\""),
    (
        "n38",
        "numeric(38,10)",
        "-1234567890123456789012345678.0123456789",
        "-1234567890123456789012345678.0123456789",
    ),
];

#[tokio::test(flavor = "multi_thread")]
async fn every_type_round_trips_postgres_to_clickhouse_backfilled_snapshotted_and_streamed() {
    let name = unique("ptypes");
    let pg = pg().await;
    let (ledger, plain) = (format!("{name}_l"), format!("{name}_p"));
    let columns: Vec<String> = TYPES
        .iter()
        .map(|(c, ty, _, _)| format!("{c} {}", ty.replace("{mood}", &format!("{name}_mood"))))
        .collect();
    pg.batch_execute(&format!(
        "CREATE TYPE {name}_mood AS ENUM ('sad', 'happy'); \
         CREATE TABLE {ledger} (id bigint PRIMARY KEY, {cols}, sent_to_kafka boolean DEFAULT false); \
         CREATE TABLE {plain} (id bigint PRIMARY KEY, {cols}); \
         GRANT SELECT, UPDATE (sent_to_kafka) ON {ledger} TO cdc_relay; GRANT SELECT ON {plain} TO cdc_relay; \
         CREATE PUBLICATION {name} FOR TABLE {ledger}, {plain} WITH (publish = 'insert')",
        cols = columns.join(", ")
    ))
    .await
    .unwrap();
    let names: Vec<&str> = TYPES.iter().map(|(c, ..)| *c).collect();
    let insert = |table: &str, id: i64| {
        let values: Vec<String> = TYPES
            .iter()
            .map(|(_, _, v, _)| format!("'{}'", v.replace('\'', "''")))
            .collect();
        format!(
            "INSERT INTO {table} (id, {}) VALUES ({id}, {})",
            names.join(", "),
            values.join(", ")
        )
    };
    // Row 1 exists before the stream: the ledger table backfills it, the other snapshots it.
    pg.batch_execute(&format!("{}; {}", insert(&ledger, 1), insert(&plain, 1)))
        .await
        .unwrap();
    let stream = start_relay(&name, &tables_stream_args(&name, &[&ledger, &plain], &[]));
    wait_slot_streaming(&pg, &name, Duration::from_secs(30)).await;
    // Row 2 is streamed.
    pg.batch_execute(&format!("{}; {}", insert(&ledger, 2), insert(&plain, 2)))
        .await
        .unwrap();
    let seed_table = format!("{name}_seed");
    let dlq = format!("{name}.sink-dlq");
    let sink = Relay::start(
        &format!("{name}_sink"),
        &[
            "sink",
            "--group",
            &name,
            "--clickhouse-table",
            &seed_table,
            "--dlq-topic",
            &dlq,
            "--topic",
            &ledger,
            "--topic",
            &plain,
        ],
        &[],
    );
    let expected: std::collections::HashMap<String, String> = TYPES
        .iter()
        .map(|(c, _, _, v)| (c.to_string(), v.to_string()))
        .chain([("id".to_string(), String::new())])
        .collect();
    let select = format!("id, {}", names.join(", "));
    for table in [&ledger, &plain] {
        let got = eventually(
            &format!("both rows of {table} in ClickHouse"),
            Duration::from_secs(60),
            || async {
                let rows = clickhouse_current(&format!("default.{table}"), &select, "id").await;
                (rows.len() == 2).then_some(rows)
            },
        )
        .await;
        for (i, row) in got.iter().enumerate() {
            assert_eq!(row["id"], (i + 1).to_string());
            for (column, want) in &expected {
                if column != "id" {
                    assert_eq!(&row[column], want, "{table} row {} column {column}", i + 1);
                }
            }
        }
    }
    assert_eq!(sink.stop(), 0);
    assert_eq!(stream.stop(), 0);
    drop_pipeline(&pg, &name).await;
    let _ = pg
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {ledger}, {plain}; DROP TYPE IF EXISTS {name}_mood"
        ))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn schema_changes_under_a_steady_load_land_every_row_with_its_columns_without_a_restart() {
    let t = AnyTable::new(
        "ptddl",
        "CREATE TABLE {t} (id integer PRIMARY KEY, a integer, gone text DEFAULT 'g', old text DEFAULT 'o')",
    )
    .await;
    let stream = t.start();
    wait_slot_streaming(&t.pg, &t.name, Duration::from_secs(30)).await;
    let seed_table = format!("{}_seed", t.name);
    let dlq = format!("{}.sink-dlq", t.name);
    let sink = Relay::start(
        &format!("{}_sink", t.name),
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
    );
    let writer = {
        let name = t.name.clone();
        tokio::spawn(async move {
            let pg = pg().await;
            for i in 1..=800 {
                pg.batch_execute(&format!("INSERT INTO {name} (id, a) VALUES ({i}, {i})"))
                    .await
                    .unwrap();
                if i % 4 == 0 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        })
    };
    for ddl in [
        "ALTER TABLE {t} ADD COLUMN c1 text DEFAULT 'dflt'",
        "ALTER TABLE {t} ALTER COLUMN a TYPE bigint",
        "ALTER TABLE {t} DROP COLUMN gone",
        "ALTER TABLE {t} RENAME COLUMN old TO renamed",
        "ALTER TABLE {t} ADD COLUMN c2 numeric(12,3)",
    ] {
        tokio::time::sleep(Duration::from_millis(300)).await;
        t.exec(ddl).await;
    }
    writer.await.unwrap();
    t.exec("INSERT INTO {t} (id, a, c2) VALUES (1000, 5000000000, 1.5); UPDATE {t} SET c1 = 'upd' WHERE id % 100 = 0")
        .await;
    // ClickHouse holds PostgreSQL's current rows, column by column of what PostgreSQL has now.
    let want: Vec<std::collections::HashMap<String, String>> =
        t.pg.query(
            &format!(
                "SELECT id, a, c1, renamed, c2::text FROM {} ORDER BY id",
                t.name
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let text = |v: Option<String>| v.map_or("null".to_string(), |s| json_str(&s));
            [
                ("id".to_string(), r.get::<_, i32>(0).to_string()),
                ("a".to_string(), r.get::<_, i64>(1).to_string()),
                ("c1".to_string(), text(r.get(2))),
                ("renamed".to_string(), text(r.get(3))),
                (
                    "c2".to_string(),
                    r.get::<_, Option<String>>(4).unwrap_or("null".into()),
                ),
            ]
            .into_iter()
            .collect()
        })
        .collect();
    assert_eq!(want.len(), 801);
    let table = format!("default.{}", t.name);
    wait_current_equal(
        &table,
        "id, a, c1, renamed, c2",
        "id",
        &want,
        Duration::from_secs(60),
        || sink.log_text(),
    )
    .await;
    assert_eq!(sink.stop(), 0);
    assert_eq!(stream.stop(), 0);
    t.drop().await;
}

fn json_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// Columns a user adds to the seed's table reach its ClickHouse table (which keeps the seed's
/// layout): older rows read PostgreSQL's default, new rows their values, an explicit NULL stays
/// NULL, an update that leaves a TOASTed added value out keeps it. A generic table's NULL in a
/// column added with a default stays NULL too (a left-out value would take the default).
#[tokio::test(flavor = "multi_thread")]
async fn columns_added_to_the_seed_table_reach_clickhouse_and_nulls_stay_null() {
    let seed = Table::new("ptseedadd").await;
    let generic = AnyTable::new(
        "ptnull",
        "CREATE TABLE {t} (id integer PRIMARY KEY, a integer)",
    )
    .await;
    seed.exec(
        "ALTER PUBLICATION {t} SET (publish = 'insert, update, delete, truncate'); \
         INSERT INTO {t} (username, event_type, event_time) \
           SELECT 'before' || g, 'login', '2024-01-01'::timestamp + g * interval '1 s' \
           FROM generate_series(1, 3) g",
    )
    .await;
    seed.exec(&format!(
        "ALTER PUBLICATION {{t}} ADD TABLE {}",
        generic.name
    ))
    .await;
    let args = tables_stream_args(
        &seed.name,
        &[&seed.name, &generic.name],
        &[
            "--ops",
            "insert,update,delete,truncate",
            "--seed-table",
            &seed.name,
        ],
    );
    let stream = start_relay(&seed.name, &args);
    wait_slot_streaming(&seed.pg, &seed.name, Duration::from_secs(30)).await;
    let dlq = format!("{}.sink-dlq", seed.name);
    let sink = Relay::start(
        &format!("{}_sink", seed.name),
        &[
            "sink",
            "--group",
            &seed.name,
            "--clickhouse-table",
            &seed.name,
            "--dlq-topic",
            &dlq,
            "--topic",
            &seed.name,
            "--topic",
            &generic.name,
        ],
        &[],
    );
    seed.exec(
        "INSERT INTO {t} (username, event_type, event_time) \
           SELECT 'plain' || g, 'login', now() FROM generate_series(1, 20) g",
    )
    .await;
    generic.exec("INSERT INTO {t} VALUES (1, 1)").await;
    // Once the first rows are in ClickHouse, the columns are added while rows flow.
    eventually(
        "the plain rows in ClickHouse",
        Duration::from_secs(60),
        || async {
            let rows = clickhouse_current(&format!("default.{}", seed.name), "id", "id").await;
            (rows.len() == 23).then_some(())
        },
    )
    .await;
    seed.exec(
        "ALTER TABLE {t} ADD COLUMN country text DEFAULT 'NL'; \
         ALTER TABLE {t} ADD COLUMN note text; \
         ALTER TABLE {t} ALTER COLUMN note SET STORAGE EXTERNAL; \
         ALTER TABLE {t} ADD COLUMN score integer; \
         INSERT INTO {t} (username, event_type, event_time, country, note, score) VALUES \
           ('de', 'login', now(), 'DE', repeat('n', 5000), 7), \
           ('nulls', 'login', now(), NULL, NULL, NULL); \
         UPDATE {t} SET event_type = 'logout' WHERE username = 'de'; \
         UPDATE {t} SET score = 1 WHERE username = 'before1'; \
         DELETE FROM {t} WHERE username = 'plain3'; \
         UPDATE {t} SET id = 1000 WHERE username = 'plain4'",
    )
    .await;
    generic
        .exec(
            "ALTER TABLE {t} ADD COLUMN c text DEFAULT 'x'; \
             INSERT INTO {t} (id, a, c) VALUES (2, 2, NULL); \
             INSERT INTO {t} (id, a) VALUES (3, 3)",
        )
        .await;

    let ch = clickhouse(&env("CDC_RELAY_CLICKHOUSE_URL"));
    let checks = [
        (
            format!(
                "SELECT id::text, username, event_type, country, score::text, length(note)::text FROM {}",
                seed.name
            ),
            format!(
                "SELECT toString(id), username, event_type, country, toString(score), toString(length(note)) FROM default.{}_current",
                seed.name
            ),
        ),
        (
            format!("SELECT id::text, a::text, c FROM {}", generic.name),
            format!(
                "SELECT toString(id), toString(a), c FROM default.{}_current",
                generic.name
            ),
        ),
    ];
    for (pg_sql, ch_sql) in checks {
        let want = pg_rows(&seed.pg, &pg_sql).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let got = loop {
            let got = ch_rows(&ch, &ch_sql).await.unwrap_or_default();
            if got == want {
                break got;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "ClickHouse ({ch_sql}) has\n{got:?}\nPostgreSQL has\n{want:?}\nsink log: {}",
                sink.log_text()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        assert_eq!(got.len(), want.len());
    }
    // Spot checks of what the comparison covers, so a test that compared nothing cannot pass.
    let row = |sql: String| {
        let ch = ch.clone();
        async move { ch_rows(&ch, &sql).await.unwrap_or_default() }
    };
    assert_eq!(
        row(format!(
            "SELECT country, toString(length(note)), event_type FROM default.{}_current WHERE username = 'de'",
            seed.name
        ))
        .await,
        vec![vec![Some("DE".into()), Some("5000".into()), Some("logout".into())]],
        "the update that left the TOASTed note out kept it"
    );
    assert_eq!(
        row(format!(
            "SELECT country, toString(score) FROM default.{}_current WHERE username IN ('before2', 'nulls')",
            seed.name
        ))
        .await,
        // Sorted: `nulls` (NULL, NULL) first, then `before2` ('NL', NULL).
        vec![vec![None, None], vec![Some("NL".into()), None]],
        "an older row reads PostgreSQL's default; an explicit NULL stays NULL"
    );
    assert_eq!(
        row(format!(
            "SELECT toString(id), c FROM default.{}_current ORDER BY id",
            generic.name
        ))
        .await,
        vec![
            vec![Some("1".into()), Some("x".into())],
            vec![Some("2".into()), None],
            vec![Some("3".into()), Some("x".into())],
        ]
    );
    seed.wait_all_sent(Duration::from_secs(30)).await;
    assert_eq!(sink.stop(), 0);
    assert_eq!(stream.stop(), 0);
    let _ = seed
        .pg
        .batch_execute(&format!("DROP TABLE IF EXISTS {}", generic.name))
        .await;
    seed.drop().await;
}

/// A whole-table snapshot cut by a crash (kill -9 after its first chunk) starts over on restart,
/// while another session holds row locks and an uncommitted update, and rows change: ClickHouse
/// ends equal to PostgreSQL row by row, the locked row's committed value arrives, and a further
/// restart does not read the table again (the snapshot was recorded done).
#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_killed_mid_way_restarts_and_row_locks_do_not_stall_it() {
    let t = AnyTable::new(
        "ptsnapkill",
        "CREATE TABLE {t} (id integer PRIMARY KEY, v integer, pad text); \
         INSERT INTO {t} SELECT g, g, repeat('p', 50) FROM generate_series(1, 20000) g",
    )
    .await;
    let args = stream_args(
        &t.name,
        &[
            "--ops",
            "insert,update,delete,truncate",
            "--backfill-chunk",
            "1000",
        ],
    );
    let mut crashing = Relay::start(
        &t.name,
        &args,
        &[("CDC_RELAY_FAILPOINTS", "stream.mid_backfill")],
    );
    let status = crashing.wait_exit(Duration::from_secs(60));
    assert!(!status.success(), "the failpoint aborts the stream");
    let partial = read_topic(&t.name, 1, Duration::from_secs(10), Duration::from_secs(2));
    assert!(
        !partial.is_empty() && partial.len() < 20000,
        "{} messages before the crash",
        partial.len()
    );

    // Now that the slot exists, another session holds row locks and an uncommitted update.
    let (locker, conn) = tokio_postgres::connect(&env("CDC_RELAY_PG_URL"), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    locker
        .batch_execute(&format!(
            "BEGIN; UPDATE {t} SET v = -777 WHERE id = 777; SELECT * FROM {t} WHERE id BETWEEN 5000 AND 5100 FOR UPDATE",
            t = t.name
        ))
        .await
        .unwrap();
    let stream = Relay::start(&t.name, &args, &[]);
    let dlq = format!("{}.sink-dlq", t.name);
    let seed_table = format!("{}_seed", t.name);
    let sink = Relay::start(
        &format!("{}_sink", t.name),
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
    );
    t.exec(
        // Around the locked rows (5000..=5100), which would make these wait.
        "UPDATE {t} SET v = -v WHERE id % 1000 = 1 AND id NOT BETWEEN 5000 AND 5100; \
         DELETE FROM {t} WHERE id % 1000 = 2 AND id NOT BETWEEN 5000 AND 5100; \
         INSERT INTO {t} VALUES (30001, 1, 'new')",
    )
    .await;
    let ch = clickhouse(&env("CDC_RELAY_CLICKHOUSE_URL"));
    let ch_sql = format!(
        "SELECT toString(id), toString(v), pad FROM default.{}_current",
        t.name
    );
    let pg_sql = format!("SELECT id::text, v::text, pad FROM {}", t.name);
    let equal = |what: &'static str| {
        let (ch, ch_sql, pg_sql, t_pg) = (ch.clone(), ch_sql.clone(), pg_sql.clone(), &t.pg);
        let sink = &sink;
        async move {
            let want = pg_rows(t_pg, &pg_sql).await;
            let deadline = std::time::Instant::now() + Duration::from_secs(90);
            loop {
                let got = ch_rows(&ch, &ch_sql).await.unwrap_or_default();
                if got == want {
                    return got.len();
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{what}: ClickHouse has {} rows, PostgreSQL {}; first missing: {:?}\nsink log: {}",
                    got.len(),
                    want.len(),
                    want.iter().find(|w| !got.contains(w)),
                    sink.log_text()
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    // While the locks are held: the snapshot went through, with the locked row's committed value.
    assert_eq!(equal("while the locks are held").await, 20000 - 19 + 1);
    locker.batch_execute("COMMIT").await.unwrap();
    equal("after the locking transaction committed").await;
    let row777 = ch_rows(
        &ch,
        &format!(
            "SELECT toString(v) FROM default.{}_current WHERE id = 777",
            t.name
        ),
    )
    .await;
    assert_eq!(row777, Some(vec![vec![Some("-777".to_string())]]));
    assert_eq!(stream.stop(), 0);

    // Recorded done: another restart reads no row of the table again.
    let snapshots = |msgs: &[Received]| msgs.iter().filter(|m| m.value["op"] == "snapshot").count();
    let before = read_topic(
        &t.name,
        usize::MAX,
        Duration::from_secs(20),
        Duration::from_secs(2),
    );
    let again = Relay::start(&t.name, &args, &[]);
    wait_slot_streaming(&t.pg, &t.name, Duration::from_secs(30)).await;
    t.exec("INSERT INTO {t} VALUES (30002, 2, 'after')").await;
    equal("after the last restart").await;
    let after = read_topic(
        &t.name,
        before.len() + 1,
        Duration::from_secs(30),
        Duration::from_secs(2),
    );
    assert_eq!(snapshots(&after), snapshots(&before), "no second snapshot");
    assert_eq!(after.len(), before.len() + 1);
    assert!(snapshots(&before) >= 20000, "{}", snapshots(&before));
    assert_eq!(again.stop(), 0);
    assert_eq!(sink.stop(), 0);
    t.drop().await;
}
