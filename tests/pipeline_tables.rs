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
